"""GAE and discounted returns: hand example, plain-loop reference, λ = 1 identity; the critic-free estimators
(GRPO / Dr. GRPO, RLOO, ReMax, REINFORCE++ and its -baseline) on hand-worked 2-prompt × 3-sample examples."""

import statistics

import pytest
import torch

from rlhfkit.core.advantages import (discounted_returns, gae, group_centered_scores, grpo_advantages,
                                     outcome_to_tokens, reinforce_pp_advantages, remax_advantages, rloo_advantages)
from rlhfkit.core.rewards import shape_rewards


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


# --------------------------------------------------------------------------- critic-free estimators
# 2 prompts × k = 3 samples, prompt-major: rows 0-2 answer prompt 0, rows 3-5 prompt 1.
#   prompt 0: s = (0, 2, 13): mean 5, deviations d = (-5, -3, 8), unbiased var (25 + 9 + 64)/2 = 49, std 7
#   prompt 1: s = (-1, 1, 3): mean 1, d = (-2, 0, 2), unbiased var (4 + 0 + 4)/2 = 4, std 2
# Ragged responses (lengths 3, 1, 2, 4, 2, 1 of T = 4); padding must be 0 in every output.
SCORES = f64([0.0, 2.0, 13.0, -1.0, 1.0, 3.0])
LENGTHS = [3, 1, 2, 4, 2, 1]
RMASK = torch.arange(4).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)


def per_token(values):
    """The expected (6, 4) tensor: each row's value on its response tokens, 0 on padding (written out by hand)."""
    return f64([[v if t < n else 0.0 for t in range(4)] for v, n in zip(values, LENGTHS)])


def test_outcome_to_tokens_by_hand():
    out = outcome_to_tokens(f64([1.5, -2.0]), torch.tensor([[True, True, False], [True, False, False]]))
    assert torch.equal(out, f64([[1.5, 1.5, 0.0], [-2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="one row per score"):
        outcome_to_tokens(f64([1.0, 2.0, 3.0]), RMASK)


def test_group_centered_scores_by_hand():
    # s - group mean: (0 - 5, 2 - 5, 13 - 5) and (-1 - 1, 1 - 1, 3 - 1)
    assert torch.allclose(group_centered_scores(SCORES, 3), f64([-5.0, -3.0, 8.0, -2.0, 0.0, 2.0]), rtol=0, atol=1e-15)


def test_grpo_two_prompts_three_samples_by_hand():
    # A = d / (std + eps): prompt 0: (-5, -3, 8) / (7 + eps); prompt 1: (-2, 0, 2) / (2 + eps)
    eps = 1e-6
    expected = [-5 / (7 + eps), -3 / (7 + eps), 8 / (7 + eps), -2 / (2 + eps), 0.0, 2 / (2 + eps)]
    out = grpo_advantages(SCORES, RMASK, k=3, eps=eps)
    assert torch.allclose(out, per_token(expected), rtol=0, atol=1e-15)
    # eps = 0: the plain ratios d / std
    out = grpo_advantages(SCORES, RMASK, k=3, eps=0.0)
    assert torch.allclose(out, per_token([-5 / 7, -3 / 7, 8 / 7, -1.0, 0.0, 1.0]), rtol=0, atol=1e-15)


def test_dr_grpo_does_not_divide_by_the_std():
    # A = d: (-5, -3, 8, -2, 0, 2)
    out = grpo_advantages(SCORES, RMASK, k=3, scale_by_std=False)
    assert torch.equal(out, per_token([-5.0, -3.0, 8.0, -2.0, 0.0, 2.0]))


def test_grpo_edge_cases_equal_scores_and_single_sample():
    mask = torch.ones(4, 2, dtype=torch.bool)
    # a group of equal scores: d = 0, std 0 -> 0 / (0 + eps) = 0 exactly (finite); the other group (1, 3): d = ∓1,
    # std sqrt(2) -> ∓1/(sqrt 2 + eps)
    out = grpo_advantages(f64([4.0, 4.0, 1.0, 3.0]), mask, k=2)
    r = 1 / (2**0.5 + 1e-6)
    assert torch.allclose(out, f64([[0.0, 0.0], [0.0, 0.0], [-r, -r], [r, r]]), rtol=0, atol=1e-15)
    assert torch.isfinite(out).all()
    # k = 1: the std of one sample is defined as 0 and s - mean = 0, so every advantage is 0 (no nan)
    assert torch.equal(grpo_advantages(f64([4.0, -1.0, 7.0, 2.0]), mask, k=1), torch.zeros(4, 2, dtype=torch.float64))
    assert torch.equal(grpo_advantages(f64([4.0, -1.0, 7.0, 2.0]), mask, k=1, scale_by_std=False),
                       torch.zeros(4, 2, dtype=torch.float64))


def test_rloo_two_prompts_three_samples_by_hand():
    # baseline_i = (group sum - s_i) / 2
    #   prompt 0, sum 15: b = (15/2, 13/2, 2/2) = (7.5, 6.5, 1) -> A = (0 - 7.5, 2 - 6.5, 13 - 1) = (-7.5, -4.5, 12)
    #   prompt 1, sum 3:  b = (4/2, 2/2, 0/2) = (2, 1, 0)     -> A = (-1 - 2, 1 - 1, 3 - 0) = (-3, 0, 3)
    # (= k/(k-1) · d = 1.5 · d)
    out = rloo_advantages(SCORES, RMASK, k=3)
    assert torch.allclose(out, per_token([-7.5, -4.5, 12.0, -3.0, 0.0, 3.0]), rtol=0, atol=1e-15)
    # all-equal group: every leave-one-out baseline equals the score -> 0
    assert torch.equal(rloo_advantages(f64([2.0, 2.0]), torch.ones(2, 1, dtype=torch.bool), k=2),
                       torch.zeros(2, 1, dtype=torch.float64))


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(SCORES, RMASK, k=1)


def test_remax_two_prompts_three_samples_by_hand():
    # greedy responses score 2 (prompt 0) and 0 (prompt 1):
    #   A = (0 - 2, 2 - 2, 13 - 2, -1 - 0, 1 - 0, 3 - 0) = (-2, 0, 11, -1, 1, 3)
    out = remax_advantages(SCORES, f64([2.0, 0.0]), RMASK)
    assert torch.equal(out, per_token([-2.0, 0.0, 11.0, -1.0, 1.0, 3.0]))
    with pytest.raises(ValueError, match="one score per prompt"):
        remax_advantages(SCORES, f64([1.0, 2.0, 3.0, 4.0]), RMASK)


# REINFORCE++ on the same 2 × 3 batch, shorter responses (lengths 2, 1, 2, 1, 2, 1 of T = 2), β = 0.1, γ = 0.5.
# Per-token KL (k1 = logp - ref_logp): row 0 (1, 2), row 1 (3), row 2 (0, 1), row 3 (2), row 4 (1, 1), row 5 (4);
# the KL part of the reward, -0.1 KL: (-0.1, -0.2), (-0.3), (0, -0.1), (-0.2), (-0.1, -0.1), (-0.4).
RPP_MASK = torch.tensor([[True, True], [True, False], [True, True], [True, False], [True, True], [True, False]])
RPP_KL = f64([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [4.0, 0.0]])
REF_LOGPROBS = -torch.full((6, 2), 3.0, dtype=torch.float64)


def whitened_by_hand(returns):
    """(G - μ) / sqrt(var + 1e-8) over the response tokens, with Python's statistics (unbiased variance)."""
    tokens = [g for row in returns for g in row]
    mu, var = statistics.fmean(tokens), statistics.variance(tokens)
    return [[(g - mu) / (var + 1e-8) ** 0.5 for g in row] for row in returns]


def padded(rows):
    return f64([row + [0.0] * (2 - len(row)) for row in rows])


def rpp_rewards(scores):
    return shape_rewards(scores, REF_LOGPROBS + RPP_KL, REF_LOGPROBS, RPP_MASK, kl_coef=0.1).rewards


def test_reinforce_pp_by_hand():
    # rewards (score added on the last token): (-0.1, -0.2 + 0), (-0.3 + 2), (0, -0.1 + 13), (-0.2 - 1),
    # (-0.1, -0.1 + 1), (-0.4 + 3)
    # reward-to-go G_t = r_t + 0.5 G_{t+1}:
    #   row 0: G1 = -0.2, G0 = -0.1 + 0.5·(-0.2) = -0.2;   row 1: 1.7
    #   row 2: G1 = 12.9, G0 = 0 + 0.5·12.9 = 6.45;        row 3: -1.2
    #   row 4: G1 = 0.9,  G0 = -0.1 + 0.5·0.9 = 0.35;      row 5: 2.6
    returns = [[-0.2, -0.2], [1.7], [6.45, 12.9], [-1.2], [0.35, 0.9], [2.6]]
    rewards = rpp_rewards(SCORES)
    unwhitened = reinforce_pp_advantages(rewards, RPP_MASK, gamma=0.5, whiten=lambda x, m: x)
    assert torch.allclose(unwhitened, padded(returns), rtol=0, atol=1e-14)
    # default: whitened over the 9 response tokens of the batch
    out = reinforce_pp_advantages(rewards, RPP_MASK, gamma=0.5)
    assert torch.allclose(out, padded(whitened_by_hand(returns)), rtol=0, atol=1e-14)


def test_reinforce_pp_baseline_by_hand():
    # the group mean is subtracted from the scores first: (-5, -3, 8, -2, 0, 2); then rewards:
    # (-0.1, -0.2 - 5), (-0.3 - 3), (0, -0.1 + 8), (-0.2 - 2), (-0.1, -0.1 + 0), (-0.4 + 2)
    #   row 0: G1 = -5.2, G0 = -0.1 + 0.5·(-5.2) = -2.7;   row 1: -3.3
    #   row 2: G1 = 7.9,  G0 = 0 + 0.5·7.9 = 3.95;         row 3: -2.2
    #   row 4: G1 = -0.1, G0 = -0.1 + 0.5·(-0.1) = -0.15;  row 5: 1.6
    returns = [[-2.7, -5.2], [-3.3], [3.95, 7.9], [-2.2], [-0.15, -0.1], [1.6]]
    rewards = rpp_rewards(group_centered_scores(SCORES, 3))
    out = reinforce_pp_advantages(rewards, RPP_MASK, gamma=0.5)
    assert torch.allclose(out, padded(whitened_by_hand(returns)), rtol=0, atol=1e-14)


def test_reinforce_pp_without_kl_and_gamma_one_is_the_whitened_outcome():
    # kl_coef 0, γ = 1: every token's return is its row's score, so the advantages are the whitened broadcast scores
    rewards = shape_rewards(SCORES, REF_LOGPROBS + RPP_KL, REF_LOGPROBS, RPP_MASK, kl_coef=0.0).rewards
    out = reinforce_pp_advantages(rewards, RPP_MASK, gamma=1.0)
    rows = [[s] * int(n) for s, n in zip(SCORES.tolist(), RPP_MASK.sum(1).tolist())]
    assert torch.allclose(out, padded(whitened_by_hand(rows)), rtol=0, atol=1e-14)


@pytest.mark.parametrize("estimator", [grpo_advantages, rloo_advantages])
def test_group_layout_errors(estimator):
    with pytest.raises(ValueError, match="whole number of groups"):
        estimator(SCORES, RMASK, k=4)  # 6 scores are not groups of 4
    with pytest.raises(ValueError, match="integer >= 1"):
        estimator(SCORES, RMASK, k=0)
    with pytest.raises(ValueError, match="1-D"):
        estimator(SCORES.reshape(2, 3), RMASK, k=3)


def test_group_estimators_use_the_prompt_major_layout():
    # the same scores listed sample-major (s_p0_j, s_p1_j, ...) would give other groups: the layout is one rule
    interleaved = SCORES.reshape(2, 3).T.reshape(-1)  # (0, -1, 2, 1, 13, 3)
    # groups (0, -1, 2) and (1, 13, 3): means 1/3 and 17/3
    expected = f64([0 - 1 / 3, -1 - 1 / 3, 2 - 1 / 3, 1 - 17 / 3, 13 - 17 / 3, 3 - 17 / 3])
    assert torch.allclose(group_centered_scores(interleaved, 3), expected, rtol=0, atol=1e-14)
