"""PPO losses: every clip branch with both advantage signs, by hand; micro-batch gradient equivalence."""

import math

import pytest
import torch

from rlhfkit.core.losses import entropy_bonus, explained_variance, ppo_policy_loss, ppo_total_loss, ppo_value_loss


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


NAN = float("nan")
# ε = 0.2. Five response tokens, row 0: cases 1-3, row 1: cases 4-5, plus padding holding garbage.
#   1: A = +1, ρ = 1.5: -Aρ = -1.5, -A clip(ρ) = -1.2 -> max -1.2 (clipped branch, counted in clipfrac)
#   2: A = +1, ρ = 0.5: -0.5 vs -0.8 -> -0.5 (unclipped branch)
#   3: A = -1, ρ = 1.5: 1.5 vs 1.2 -> 1.5 (unclipped branch)
#   4: A = -1, ρ = 0.5: 0.5 vs 0.8 -> 0.8 (clipped branch, counted)
#   5: A = +2, ρ = 1.1 (inside the range): -2.2 both -> -2.2 (not counted: not strictly larger)
# loss = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5 = -1.6 / 5 = -0.32; clipfrac = 2/5
RATIOS = f64([[1.5, 0.5, 1.5], [0.5, 1.1, 1.0]])
OLD = f64([[-1.0, -2.0, -0.5], [-1.5, -0.7, NAN]])
ADV = f64([[1.0, 1.0, -1.0], [-1.0, 2.0, NAN]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def policy_inputs():
    logprobs = (OLD + RATIOS.log()).nan_to_num(nan=50.0).requires_grad_(True)  # padding: exp(50 - nan)
    return logprobs


def test_policy_loss_four_branches_by_hand():
    logprobs = policy_inputs()
    loss, stats = ppo_policy_loss(logprobs, OLD, ADV, MASK, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.32, abs=1e-14)
    assert stats.clipfrac.item() == pytest.approx(0.4, abs=1e-15)
    loss.backward()
    # d ℓ/d logp = -A ρ on the unclipped branch, 0 on the clipped one; divided by 5 tokens:
    #   case 1: 0; case 2: -0.5/5 = -0.1; case 3: 1.5/5 = 0.3; case 4: 0; case 5: -2.2/5 = -0.44; padding 0
    expected = f64([[0.0, -0.1, 0.3], [0.0, -0.44, 0.0]])
    assert torch.allclose(logprobs.grad, expected, rtol=0, atol=1e-14)
    # approx_kl = mean of (ρ - 1) - ln ρ over the 5 tokens
    k3 = 2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + math.log(2)) + (0.1 - math.log(1.1))
    assert stats.approx_kl.item() == pytest.approx(k3 / 5, abs=1e-15)
    # ratio mean (1.5 + 0.5 + 1.5 + 0.5 + 1.1)/5 = 1.02; var = mean ρ² - 1.02² = 6.21/5 - 1.0404 = 0.2016
    assert stats.ratio_mean.item() == pytest.approx(1.02, abs=1e-15)
    assert stats.ratio_var.item() == pytest.approx(0.2016, abs=1e-14)
    assert not stats.clipfrac.requires_grad and not stats.approx_kl.requires_grad


def test_policy_loss_explicit_num_tokens():
    # the masked sum is -1.6 whatever the normaliser
    loss, _ = ppo_policy_loss(policy_inputs(), OLD, ADV, MASK, 0.2, num_tokens=10)
    assert loss.item() == pytest.approx(-0.16, abs=1e-14)
    with pytest.raises(ValueError, match="num_tokens"):
        ppo_policy_loss(policy_inputs(), OLD, ADV, MASK, 0.2, num_tokens=0)


# c = 0.2, old values 0:
#   a: v = 0.5, R = 1: v_clip = 0.2; (0.5-1)² = 0.25 < (0.2-1)² = 0.64 -> ½·0.64 = 0.32 (clipped, counted)
#   b: v = 0.5, R = 0: 0.25 > (0.2-0)² = 0.04 -> ½·0.25 = 0.125 (unclipped)
#   c: v = 0.1, R = 1 (inside): 0.81 both -> 0.405 (not counted)
#   d: v = -0.5, R = -1: v_clip = -0.2; 0.25 < 0.64 -> 0.32 (clipped, counted)
# loss = (0.32 + 0.125 + 0.405 + 0.32) / 4 = 0.2925; clipfrac 0.5
# value_mean = (0.5 + 0.5 + 0.1 - 0.5)/4 = 0.15; return_mean = (1 + 0 + 1 - 1)/4 = 0.25
# error = (0.25 + 0.25 + 0.81 + 0.25)/4 = 0.39
V = f64([[0.5, 0.5, 99.0], [0.1, -0.5, NAN]])
OLD_V = f64([[0.0, 0.0, NAN], [0.0, 0.0, 3.0]])
RET = f64([[1.0, 0.0, NAN], [1.0, -1.0, 7.0]])
VMASK = torch.tensor([[True, True, False], [True, True, False]])


def test_value_loss_both_branches_by_hand():
    values = V.clone().requires_grad_(True)
    loss, stats = ppo_value_loss(values, OLD_V, RET, VMASK, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.2925, abs=1e-15)
    assert stats.clipfrac.item() == 0.5
    assert stats.value_mean.item() == pytest.approx(0.15, abs=1e-15)
    assert stats.return_mean.item() == pytest.approx(0.25, abs=1e-15)
    assert stats.error.item() == pytest.approx(0.39, abs=1e-15)
    loss.backward()
    # clipped branch: v_clip is constant in v -> gradient 0; unclipped: (v - R)/4: b 0.5/4, c -0.9/4
    assert torch.allclose(values.grad, f64([[0.0, 0.125, 0.0], [-0.225, 0.0, 0.0]]), rtol=0, atol=1e-15)


def test_value_loss_unclipped():
    # ½ mean (v - R)² = ½ · 0.39
    loss, stats = ppo_value_loss(V, OLD_V, RET, VMASK, clip_range_value=None)
    assert loss.item() == pytest.approx(0.195, abs=1e-15)
    assert stats.clipfrac.item() == 0.0


def test_entropy_bonus_and_explained_variance():
    entropy = f64([[1.0, 2.0, NAN], [3.0, 50.0, 50.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert entropy_bonus(entropy, mask).item() == 2.0  # (1 + 2 + 3) / 3
    assert entropy_bonus(entropy, mask, num_tokens=6).item() == 1.0
    # R = (1, 2, 4): var 14/9; R - v = (0, 0, 1): var 2/9 -> 1 - (2/9)/(14/9) = 6/7
    values, returns = f64([[1.0, 2.0, 3.0, 8.0]]), f64([[1.0, 2.0, 4.0, NAN]])
    m = torch.tensor([[True, True, True, False]])
    assert explained_variance(values, returns, m).item() == pytest.approx(6 / 7, abs=1e-15)
    assert math.isnan(explained_variance(values, f64([[2.0, 2.0, 2.0, 0.0]]), m).item())


def ragged_batch(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    mask = torch.arange(T).unsqueeze(0) < torch.tensor([6, 2, 5, 1]).unsqueeze(1)
    draw = lambda scale=1.0: torch.randn(B, T, generator=g, dtype=torch.float64) * scale  # noqa: E731
    return mask, draw


@pytest.mark.parametrize("which", ["policy", "value", "entropy"])
def test_micro_batch_gradient_accumulation_is_exact(which):
    mask, draw = ragged_batch(8)
    a, b, c = draw(0.3), draw(), draw()
    param = draw().requires_grad_(True)  # stands for logprobs / values / entropy

    def loss_fn(rows, num_tokens):
        p = param[rows]
        if which == "policy":
            return ppo_policy_loss(p, a[rows], b[rows], mask[rows], 0.2, num_tokens)[0]
        if which == "value":
            return ppo_value_loss(p, a[rows], b[rows], mask[rows], 0.2, num_tokens)[0]
        return entropy_bonus(p, mask[rows], num_tokens)

    everything = slice(0, 4)
    full_grad = torch.autograd.grad(loss_fn(everything, None), param)[0]
    total = int(mask.sum())  # 14 tokens; the two micro-batches hold 8 and 6
    accumulated = torch.zeros_like(param)
    for rows in (slice(0, 2), slice(2, 4)):
        accumulated += torch.autograd.grad(loss_fn(rows, total), param)[0]
    assert torch.allclose(accumulated, full_grad, rtol=0, atol=1e-15)
    # normalising each micro-batch by its own count would be wrong (the reason num_tokens exists)
    naive = sum(torch.autograd.grad(loss_fn(rows, None), param)[0] for rows in (slice(0, 2), slice(2, 4))) / 2
    assert not torch.allclose(naive, full_grad, rtol=0, atol=1e-6)


def test_ppo_total_loss_by_hand():
    # L = L_clip + c1 * L_vf - c2 * S = 0.5 + 0.1 * 2.0 - 0.01 * 3.0 = 0.67
    out = ppo_total_loss(torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64),
                         torch.tensor(3.0, dtype=torch.float64), vf_coef=0.1, entropy_coef=0.01)
    assert out.item() == pytest.approx(0.67, abs=1e-15)
