"""PPO losses: every clip branch with both advantage signs, by hand (symmetric, asymmetric and dual clip); each
loss aggregation on ragged lengths; micro-batch gradient equivalence for every mode."""

import math

import pytest
import torch

from tolerances import EPS32

from rlhfkit.core.kl import kl_loss
from rlhfkit.core.losses import entropy_bonus, explained_variance, ppo_policy_loss, ppo_total_loss, ppo_value_loss
from rlhfkit.core.masks import LOSS_AGGREGATIONS, aggregate_token_losses, aggregation_count


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


def test_value_inside_the_clip_range_is_never_counted_as_clipped():
    # v - v_old = -0.173 is inside ±0.2, so v^clip = v and clipfrac = 0. In float32, v_old + (v - v_old) rounds to
    # -0.028176158666610718, not v = -0.028176162391901016: a clip written as v_old + clamp(v - v_old, ±c) would
    # put v^clip 3.7e-9 farther from R = -0.03 and count the token as clipped; clamping v itself keeps v^clip = v.
    old = torch.tensor([[0.1450241208076477]])
    values = torch.tensor([[-0.028176162391901016]], requires_grad=True)
    assert (old + (values - old)).item() != values.item()  # the rounding that the old formula tripped on
    returns = torch.tensor([[-0.03]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 1, dtype=torch.bool), clip_range_value=0.2)
    assert stats.clipfrac.item() == 0.0
    error = (values.detach() - returns).item()  # the unclipped branch, in float32
    assert loss.item() == pytest.approx(0.5 * error ** 2, rel=EPS32)
    loss.backward()
    assert values.grad.item() == pytest.approx(error, rel=EPS32)  # the unclipped branch's


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


def test_ppo_total_loss_without_critic_and_with_kl_in_the_loss():
    # no value term: 0.5 - 0.01 · 3.0 = 0.47; plus β · KL = 0.47 + 0.1 · 0.4 = 0.51
    p, s = torch.tensor(0.5, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    kl = torch.tensor(0.4, dtype=torch.float64)
    assert ppo_total_loss(p, None, s, vf_coef=0.1, entropy_coef=0.01).item() == pytest.approx(0.47, abs=1e-15)
    out = ppo_total_loss(p, None, s, vf_coef=0.1, entropy_coef=0.01, kl_loss=kl, kl_coef=0.1)
    assert out.item() == pytest.approx(0.51, abs=1e-15)
    # with the value loss 2.0: 0.67 + 0.04 = 0.71
    out = ppo_total_loss(p, torch.tensor(2.0, dtype=torch.float64), s, 0.1, 0.01, kl_loss=kl, kl_coef=0.1)
    assert out.item() == pytest.approx(0.71, abs=1e-15)


def one_token_rows(ratios, advantages):
    """Each case in its own row of one token: logprobs (requiring grad), old log-probs, advantages, mask."""
    old = torch.full((len(ratios), 1), -1.0, dtype=torch.float64)
    logprobs = (old + f64(ratios).log().unsqueeze(1)).requires_grad_(True)
    return logprobs, old, f64(advantages).unsqueeze(1), torch.ones(len(ratios), 1, dtype=torch.bool)


def test_asymmetric_clip_both_bounds_by_hand():
    # clip-higher: ε_low = 0.1, ε_high = 0.3, clip(ρ) to [0.9, 1.3]
    #   1: A = +1, ρ = 1.25: -1.25 vs -1.25 -> -1.25 (inside: ε = 0.2 would have clipped it to -1.2)
    #   2: A = +1, ρ = 1.5:  -1.5 vs -1.3 -> -1.3 (upper bound, clipped, counted)
    #   3: A = +1, ρ = 0.5:  -0.5 vs -0.9 -> -0.5 (unclipped)
    #   4: A = -1, ρ = 0.85: 0.85 vs 0.9 -> 0.9 (lower bound, clipped, counted)
    #   5: A = -1, ρ = 0.95: 0.95 both -> 0.95 (inside)
    #   6: A = -1, ρ = 1.5:  1.5 vs 1.3 -> 1.5 (unclipped)
    # loss = (-1.25 - 1.3 - 0.5 + 0.9 + 0.95 + 1.5) / 6 = 0.3 / 6 = 0.05; clipfrac 2/6
    logprobs, old, adv, mask = one_token_rows([1.25, 1.5, 0.5, 0.85, 0.95, 1.5], [1, 1, 1, -1, -1, -1])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, 0.2, clip_range_low=0.1, clip_range_high=0.3)
    assert loss.item() == pytest.approx(0.05, abs=1e-14)
    assert stats.clipfrac.item() == pytest.approx(2 / 6, abs=1e-15)
    assert stats.dual_clipfrac.item() == 0.0
    loss.backward()
    # d/dlogp = -A ρ / 6 unclipped, 0 clipped: (-1.25, 0, -0.5, 0, 0.95, 1.5) / 6
    expected = f64([-1.25, 0.0, -0.5, 0.0, 0.95, 1.5]).unsqueeze(1) / 6
    assert torch.allclose(logprobs.grad, expected, rtol=0, atol=1e-15)
    # only one bound given: the other stays ε = clip_range (case 1 with ε_high = 0.2 is clipped to -1.2)
    loss_high_default, _ = ppo_policy_loss(logprobs, old, adv, mask, 0.2, clip_range_low=0.1)
    # (-1.2 - 1.2 - 0.5 + 0.9 + 0.95 + 1.5) / 6 = 0.45 / 6
    assert loss_high_default.item() == pytest.approx(0.075, abs=1e-14)


def test_dual_clip_both_branches_by_hand():
    # ε = 0.2, c = 3
    #   1: A = -1, ρ = 4:   max(4, 1.2) = 4 > bound 3·1 = 3 -> 3 (dual branch, gradient 0, counted)
    #   2: A = -1, ρ = 2:   max(2, 1.2) = 2 < 3 -> 2 (unclipped: the bound does not bind)
    #   3: A = -2, ρ = 3.5: max(7, 2.4) = 7 > 3·2 = 6 -> 6 (dual branch)
    #   4: A = -1, ρ = 0.5: max(0.5, 0.8) = 0.8 (the ordinary clipped branch; 0.8 < 3)
    #   5: A = +1, ρ = 4:   max(-4, -1.2) = -1.2 (positive advantage: no dual bound)
    #   6: A = +2, ρ = 0.5: max(-1, -1.6) = -1 (unclipped)
    # loss = (3 + 2 + 6 + 0.8 - 1.2 - 1) / 6 = 9.6 / 6 = 1.6; dual_clipfrac (cases 1, 3) 2/6; clipfrac counts the
    # tokens whose clipped term is the larger one (cases 4, 5): 2/6
    logprobs, old, adv, mask = one_token_rows([4.0, 2.0, 3.5, 0.5, 4.0, 0.5], [-1, -1, -2, -1, 1, 2])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, 0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(1.6, abs=1e-14)
    assert stats.dual_clipfrac.item() == pytest.approx(2 / 6, abs=1e-15)
    assert stats.clipfrac.item() == pytest.approx(2 / 6, abs=1e-15)
    loss.backward()
    # -A ρ / 6 on the unclipped cases 2 (2/6) and 6 (-1/6); 0 on the clipped and dual-clipped ones
    expected = f64([0.0, 2.0, 0.0, 0.0, 0.0, -1.0]).unsqueeze(1) / 6
    assert torch.allclose(logprobs.grad, expected, rtol=0, atol=1e-15)
    # without dual clip, cases 1 and 3 give 4 and 7: (4 + 2 + 7 + 0.8 - 1.2 - 1) / 6 = 11.6 / 6
    plain, _ = ppo_policy_loss(logprobs, old, adv, mask, 0.2)
    assert plain.item() == pytest.approx(11.6 / 6, abs=1e-14)


def test_default_options_leave_the_loss_unchanged():
    # the new options at their defaults (or equal to clip_range) give the same bits as the plain call
    logprobs = policy_inputs()
    base, base_stats = ppo_policy_loss(logprobs, OLD, ADV, MASK, 0.2)
    same, same_stats = ppo_policy_loss(logprobs, OLD, ADV, MASK, 0.2, clip_range_low=0.2, clip_range_high=0.2,
                                       aggregation="token_mean")
    assert torch.equal(base, same) and torch.equal(base_stats.clipfrac, same_stats.clipfrac)
    # a dual clip far above every token's loss changes nothing either
    far, _ = ppo_policy_loss(logprobs, OLD, ADV, MASK, 0.2, dual_clip=100.0)
    assert torch.equal(base, far)


def test_policy_loss_option_errors():
    logprobs = policy_inputs()
    for kwargs, field in [({"dual_clip": 1.0}, "dual_clip"), ({"clip_range_low": 1.0}, "clip_range_low"),
                          ({"clip_range_high": -0.1}, "clip_range_high"), ({"aggregation": "sum"}, "aggregation"),
                          ({"aggregation": "seq_mean_token_sum_norm"}, "max_length"),
                          ({"aggregation": "seq_mean_token_mean", "num_tokens": 5}, "num_tokens"),
                          ({"num_sequences": 2}, "num_sequences"), ({"max_length": 4}, "max_length")]:
        with pytest.raises(ValueError, match=field):
            ppo_policy_loss(logprobs, OLD, ADV, MASK, 0.2, **kwargs)


# Aggregation on ragged lengths: per-token losses ℓ, rows of 3, 1, 2 tokens and an empty row (garbage in padding).
#   row sums S = (1 + 2 + 3, 4, 5 + 6, 0) = (6, 4, 11, 0); lengths n = (3, 1, 2, 0)
#   token_mean:              (6 + 4 + 11) / 6 tokens = 21/6 = 3.5
#   seq_mean_token_mean:     (6/3 + 4/1 + 11/2) / 3 sequences = (2 + 4 + 5.5) / 3 = 11.5/3 (the empty row: no term)
#   seq_mean_token_sum_norm: (6 + 4 + 11) / (3 sequences · max_length 4) = 21/12 = 1.75
LOSSES = f64([[1.0, 2.0, 3.0], [4.0, NAN, 9.0], [5.0, 6.0, NAN], [NAN, NAN, NAN]])
LMASK = torch.tensor([[True, True, True], [True, False, False], [True, True, False], [False, False, False]])


@pytest.mark.parametrize("aggregation, expected, grad", [
    # d loss / d ℓ_bt: 1/6 for every token; 1/(3 n_b): row 0 1/9, row 1 1/3, row 2 1/6; 1/12 for every token
    ("token_mean", 3.5, [[1 / 6] * 3, [1 / 6, 0, 0], [1 / 6, 1 / 6, 0], [0, 0, 0]]),
    ("seq_mean_token_mean", 11.5 / 3, [[1 / 9] * 3, [1 / 3, 0, 0], [1 / 6, 1 / 6, 0], [0, 0, 0]]),
    ("seq_mean_token_sum_norm", 1.75, [[1 / 12] * 3, [1 / 12, 0, 0], [1 / 12, 1 / 12, 0], [0, 0, 0]]),
])
def test_each_aggregation_on_ragged_lengths_by_hand(aggregation, expected, grad):
    losses = LOSSES.clone().requires_grad_(True)
    max_length = 4 if aggregation == "seq_mean_token_sum_norm" else None
    out = aggregate_token_losses(losses, LMASK, aggregation, max_length=max_length)
    assert out.item() == pytest.approx(expected, abs=1e-15)
    out.backward()
    assert torch.allclose(losses.grad, f64(grad), rtol=0, atol=1e-15)
    # the counts: 6 tokens; 3 non-empty sequences
    assert aggregation_count(LMASK, aggregation).item() == (6 if aggregation == "token_mean" else 3)


def test_policy_loss_aggregations_by_hand():
    # the branch example above: per-token losses row 0 (-1.2, -0.5, 1.5), row 1 (0.8, -2.2)
    #   seq_mean_token_mean: (-0.2/3 + -1.4/2) / 2 = (-0.0666.. - 0.7) / 2 = -0.38333..
    #   seq_mean_token_sum_norm, max_length 3: (-0.2 - 1.4) / (2 · 3) = -1.6/6
    logprobs = policy_inputs()
    loss, _ = ppo_policy_loss(logprobs, OLD, ADV, MASK, 0.2, aggregation="seq_mean_token_mean")
    assert loss.item() == pytest.approx((-0.2 / 3 - 0.7) / 2, abs=1e-14)
    loss, _ = ppo_policy_loss(logprobs, OLD, ADV, MASK, 0.2, aggregation="seq_mean_token_sum_norm", max_length=3)
    assert loss.item() == pytest.approx(-1.6 / 6, abs=1e-14)


def aggregation_kwargs(aggregation, full_mask):
    """The whole batch's normaliser for ``aggregation`` (what a trainer all-reduces), and the constant length."""
    count = aggregation_count(full_mask, aggregation)
    if aggregation == "token_mean":
        return {"num_tokens": count}
    return {"num_sequences": count, "max_length": 6 if aggregation == "seq_mean_token_sum_norm" else None}


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("which", ["policy", "kl"])
def test_random_micro_batch_split_is_exact_for_every_aggregation(aggregation, which):
    # a ragged float64 batch (lengths 6, 2, 5, 1, 3, 4, 6, 2) split at random into micro-batches of 3, 1 and 4 rows,
    # each trimmed to its own longest row (as the update loop trims padding columns): the sum of the parts' losses
    # and gradients equals the one-batch loss and gradient
    g = torch.Generator().manual_seed(11)
    B, T = 8, 6
    mask = torch.arange(T).unsqueeze(0) < torch.tensor([6, 2, 5, 1, 3, 4, 6, 2]).unsqueeze(1)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    param = (old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)

    def loss_fn(rows, **normalisers):
        t = int(mask[rows].sum(1).max())
        p, m = param[rows, :t], mask[rows, :t]
        if which == "kl":
            return kl_loss(p, old[rows, :t], m, "k3", aggregation, **normalisers)
        return ppo_policy_loss(p, old[rows, :t], adv[rows, :t], m, 0.2, clip_range_low=0.1, clip_range_high=0.28,
                               dual_clip=1.5, aggregation=aggregation, **normalisers)[0]

    full = loss_fn(torch.arange(B), **aggregation_kwargs(aggregation, mask))
    # every branch occurs in this batch: clipped tokens on both sides and tokens where the dual bound binds
    _, stats = ppo_policy_loss(param, old, adv, mask, 0.2, clip_range_low=0.1, clip_range_high=0.28, dual_clip=1.5)
    assert stats.clipfrac > 0.1 and stats.dual_clipfrac > 0
    full_grad = torch.autograd.grad(full, param)[0]
    perm = torch.randperm(B, generator=g)
    parts = [perm[:3], perm[3:4], perm[4:]]
    assert sum(int(aggregation_count(mask[p], aggregation)) for p in parts) == int(aggregation_count(mask, aggregation))
    kwargs = aggregation_kwargs(aggregation, mask)
    total, accumulated = 0.0, torch.zeros_like(param)
    for rows in parts:
        part = loss_fn(rows, **kwargs)
        total += part.item()
        accumulated += torch.autograd.grad(part, param)[0]
    assert total == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(accumulated, full_grad, rtol=0, atol=1e-12)
    # negative control: each part normalised by its own count (a mean of the parts' means) is not the same
    naive = sum(loss_fn(rows, **aggregation_kwargs(aggregation, mask[rows])).item() for rows in parts) / len(parts)
    assert abs(naive - full.item()) > 1e-3
