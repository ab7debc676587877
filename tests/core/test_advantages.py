"""GAE and discounted returns: hand example, plain-loop reference, λ = 1 identity."""

import pytest
import torch

from rlhfkit.core.advantages import discounted_returns, gae


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def test_gae_hand_worked_example():
    # γ = 0.9, λ = 0.8 (γλ = 0.72)
    # row 0 (3 tokens): r = (0.1, -0.2, 1.0), V = (0.5, 0.4, 0.3)
    #   δ2 = 1.0 + 0.9·0 - 0.3 = 0.7;  δ1 = -0.2 + 0.9·0.3 - 0.4 = -0.33;  δ0 = 0.1 + 0.9·0.4 - 0.5 = -0.04
    #   A2 = 0.7;  A1 = -0.33 + 0.72·0.7 = 0.174;  A0 = -0.04 + 0.72·0.174 = 0.08528
    #   returns = A + V = (0.58528, 0.574, 1.0)
    # row 1 (2 tokens, then padding holding garbage r = 9, V = 7 that must not be read):
    #   δ1 = 2.0 + 0 - 0.5 = 1.5;  δ0 = 0.5 + 0.9·0.5 - 1.0 = -0.05
    #   A1 = 1.5;  A0 = -0.05 + 0.72·1.5 = 1.03;  returns = (2.03, 2.0, 0)
    rewards = f64([[0.1, -0.2, 1.0], [0.5, 2.0, 9.0]])
    values = f64([[0.5, 0.4, 0.3], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, gae_lambda=0.8)
    assert torch.allclose(advantages, f64([[0.08528, 0.174, 0.7], [1.03, 1.5, 0.0]]), rtol=0, atol=1e-14)
    assert torch.allclose(returns, f64([[0.58528, 0.574, 1.0], [2.03, 2.0, 0.0]]), rtol=0, atol=1e-14)


def loop_gae(rewards, values, lengths, gamma, lam):
    """Plain Python double loop: for each row, walk back from its last response token."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + values[b][t] if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    return adv, ret


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.5, 1.0)])
def test_gae_matches_python_loop_on_ragged_batches(gamma, lam):
    g = torch.Generator().manual_seed(5)
    B, T = 6, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [9, 1, 4, 7, 2, 9]
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = loop_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert torch.allclose(adv, f64(ref_adv), rtol=0, atol=1e-12)
    assert torch.allclose(ret, f64(ref_ret), rtol=0, atol=1e-12)


def test_discounted_returns_by_hand():
    # γ = 0.5: G2 = 3; G1 = 2 + 0.5·3 = 3.5; G0 = 1 + 0.5·3.5 = 2.75; row 1 has 1 token: G0 = 4
    rewards = f64([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    expected = f64([[2.75, 3.5, 3.0], [4.0, 0.0, 0.0]])
    assert torch.allclose(discounted_returns(rewards, mask, 0.5), expected, rtol=0, atol=1e-15)


def test_gae_with_lambda_one_is_discounted_returns_minus_values():
    # A^{GAE(γ,1)}_t = Σ_l γ^l r_{t+l} - V_t (Schulman et al. 2016, eq. 18)
    g = torch.Generator().manual_seed(6)
    rewards = torch.randn(4, 6, generator=g, dtype=torch.float64)
    values = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([6, 3, 1, 5]).unsqueeze(1)
    adv, _ = gae(rewards, values, mask, gamma=0.95, gae_lambda=1.0)
    expected = torch.where(mask, discounted_returns(rewards, mask, 0.95) - values, 0.0)
    assert torch.allclose(adv, expected, rtol=0, atol=1e-13)


def test_non_prefix_mask_is_rejected():
    mask = torch.tensor([[False, True, True]])  # left padding: not a right-padded response
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), mask, 1.0, 0.95)
    with pytest.raises(ValueError, match="right-padded"):
        discounted_returns(torch.zeros(1, 3), mask, 1.0)
