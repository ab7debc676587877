"""Reward-model losses and PPO losses.

Reward-model losses return the mean over the batch. PPO losses are token-level and divide a masked sum by an
explicit ``num_tokens`` (default: the mask's own count), so that a minibatch split into micro-batches, or over
processes, accumulates to exactly the gradient of the whole minibatch when every part is given the minibatch's
token count. The policy loss also takes the sequence-level aggregations of
:func:`rlhfkit.core.masks.aggregate_token_losses`, exact under the same rule with ``num_sequences``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhfkit.core.masks import aggregate_token_losses, masked_mean, masked_var


# --------------------------------------------------------------------------- reward-model losses


def pairwise_logsigmoid(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry pairwise loss.

    Equation: ``mean_b -log σ(r_c - r_r - m)`` (``m = 0`` without a margin).
    Shapes: ``chosen``, ``rejected``, ``margin`` (B,) -> scalar.
    Source: Ouyang et al. 2022 (InstructGPT) eq. 1; the margin of Touvron et al. 2023 (Llama 2) §3.2.2 eq. 2.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def pairwise_logexp(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Pairwise preference loss in log-exp form (numerically identical to :func:`pairwise_logsigmoid`).

    Equation: ``mean_b log(1 + exp(r_r - r_c))``, computed as the stable softplus
    ``max(x, 0) + log1p(exp(-|x|))`` with ``x = r_r - r_c`` (no overflow, and unlike ``F.softplus`` no
    linear cut-off at x > 20, so it agrees with the log-sigmoid form to float64 precision).
    Shapes: ``chosen``, ``rejected`` (B,) -> scalar.
    Source: Bai et al. 2022 (Anthropic, "Training a helpful and harmless assistant with RLHF"), the preference
    model loss of Askell et al. 2021 §4 ``L_PM = log(1 + exp(r_bad - r_good))``.
    """
    x = rejected - chosen
    return (x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))).mean()


def token_level_pairwise(
    token_scores_c: torch.Tensor,
    mask_c: torch.Tensor,
    token_scores_r: torch.Tensor,
    mask_r: torch.Tensor,
    first_diff: torch.Tensor,
) -> torch.Tensor:
    """Pairwise loss on every position from where the two sequences diverge to the end of the longer one.

    Equation: with ``n_c``, ``n_r`` the real lengths, ``d`` = ``first_diff`` and ``e = max(n_c, n_r)``,
    ``loss_b = mean_{t=d}^{e-1} -log σ(s_c(min(t, n_c - 1)) - s_r(min(t, n_r - 1)))``: past its own end a
    sequence contributes its last real token's score (padding is never read). Returns ``mean_b loss_b``.
    Shapes: ``token_scores_c``, ``mask_c`` (B, Lc); ``token_scores_r``, ``mask_r`` (B, Lr) right-padded;
    ``first_diff`` (B,) (see :func:`rlhfkit.core.masks.first_difference_index`) -> scalar.
    Raises ValueError for an empty sequence or a pair with ``d >= e`` (identical sequences).
    Source: the step-2 reward loss of DeepSpeed-Chat (Yao et al. 2023), which reads padding past the shorter
    sequence's end; here the last real score stands in for it.
    """
    len_c = mask_c.bool().sum(dim=1)
    len_r = mask_r.bool().sum(dim=1)
    if bool(((len_c == 0) | (len_r == 0)).any()):
        raise ValueError("token_level_pairwise: a sequence has no real token")
    end = torch.maximum(len_c, len_r)
    first_diff = first_diff.to(end.device).long()
    if bool((first_diff >= end).any()):
        rows = torch.nonzero(first_diff >= end).flatten().tolist()
        raise ValueError(f"token_level_pairwise: pairs {rows} are identical (no differing position)")
    L = max(token_scores_c.shape[1], token_scores_r.shape[1])
    positions = torch.arange(L, device=end.device).unsqueeze(0)
    idx_c = torch.minimum(positions, (len_c - 1).unsqueeze(1))
    idx_r = torch.minimum(positions, (len_r - 1).unsqueeze(1))
    s_c = torch.gather(token_scores_c, 1, idx_c)
    s_r = torch.gather(token_scores_r, 1, idx_r)
    window = (positions >= first_diff.unsqueeze(1)) & (positions < end.unsqueeze(1))
    per_pair = masked_mean(-F.logsigmoid(s_c - s_r), window, dim=1)
    return per_pair.mean()


def pointwise_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a scalar score against a good (1) / bad (0) label.

    Equation: ``mean_b -[y log σ(z) + (1 - y) log(1 - σ(z))]``.
    Shapes: ``logits`` (B,), ``labels`` (B,) in {0, 1} (or probabilities) -> scalar.
    Source: logistic regression on unpaired good/bad feedback (a standard binary classifier loss).
    """
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def pointwise_ce2(logits2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Two-class cross-entropy; class 1 means "good".

    Equation: ``mean_b -log softmax(z_b)[y_b]``; equals :func:`pointwise_bce` on ``z_b[1] - z_b[0]``.
    Shapes: ``logits2`` (B, 2), ``labels`` (B,) integer in {0, 1} -> scalar.
    Source: standard classification loss (a sequence-classification head with two labels).
    """
    return F.cross_entropy(logits2, labels.long())


def mse_regression(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error against numeric ratings.

    Equation: ``mean (pred - target)²``. Shapes: (B,) -> scalar.
    Source: regression reward models on absolute ratings (e.g. Wang et al. 2023, HelpSteer).
    """
    return (pred - target.to(pred.dtype)).square().mean()


def multi_objective_regression(
    pred: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Squared error over the observed aspects of a multi-aspect reward model.

    Equation: ``Σ_{b,k} m_bk (pred_bk - target_bk)² / Σ_{b,k} m_bk`` (unobserved targets are never read).
    Shapes: ``pred``, ``target``, ``target_mask`` (B, K) -> scalar. ValueError when no target is observed.
    Source: multi-objective reward models (Wang et al. 2024, ArmoRM, stage 1 regression).
    """
    mask = target_mask.bool()
    if not bool(mask.any()):
        raise ValueError("multi_objective_regression: no target is observed in this batch")
    return masked_mean((pred - target.to(pred.dtype)).square(), mask)


def reward_centering(chosen: torch.Tensor, rejected: torch.Tensor, coef: float) -> torch.Tensor:
    """Auxiliary loss that keeps rewards centred on zero.

    Equation: ``coef · mean_b (r_c + r_r)²``.
    Shapes: ``chosen``, ``rejected`` (B,) -> scalar.
    Source: Eisenstein et al. 2023, "Helping or herding? Reward model ensembles mitigate but do not eliminate
    reward hacking" (reward centering).
    """
    return coef * (chosen + rejected).square().mean()


# --------------------------------------------------------------------------- PPO losses


class PolicyStats(NamedTuple):
    """Detached 0-dim tensors over the response tokens of the (micro-)batch."""

    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_var: torch.Tensor
    dual_clipfrac: torch.Tensor


class ValueStats(NamedTuple):
    """Detached 0-dim tensors over the response tokens of the (micro-)batch."""

    clipfrac: torch.Tensor
    value_mean: torch.Tensor
    return_mean: torch.Tensor
    error: torch.Tensor


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float,
    num_tokens: int | torch.Tensor | None = None,
    *,
    clip_range_low: float | None = None,
    clip_range_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    num_sequences: int | torch.Tensor | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, PolicyStats]:
    """Clipped surrogate policy loss of PPO, token level, with asymmetric and dual clipping.

    Equation: ``ρ_t = exp(logp_t - old_logp_t)``,
    ``ℓ_t = max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε_low, 1 + ε_high))`` with ``ε_low = clip_range_low`` and
    ``ε_high = clip_range_high`` (each defaults to ``ε = clip_range``); with ``dual_clip = c`` (> 1), where
    ``A_t < 0``: ``ℓ_t = min(ℓ_t, -c A_t)``, i.e. the loss of a token with a negative advantage is at most
    ``c |A_t|`` however large its ratio (its gradient is 0 there). The loss is
    ``rlhfkit.core.masks.aggregate_token_losses(ℓ, m, aggregation, ...)``; the default ``token_mean`` is
    ``Σ_t m_t ℓ_t / num_tokens``. Stats (masked token means): ``clipfrac`` = fraction of tokens whose clipped
    term is strictly larger, ``approx_kl`` = mean of ``(ρ - 1) - log ρ`` (k3), ``ratio_mean``, ``ratio_var``
    (biased, i.e. divided by the token count), ``dual_clipfrac`` = fraction of tokens where the dual bound is
    strictly smaller (0 without ``dual_clip``).
    Shapes: all inputs (B, T); ``num_tokens`` (``token_mean``) or ``num_sequences`` (the two sequence modes)
    default to this batch's :func:`rlhfkit.core.masks.aggregation_count`; ``max_length`` is the constant of
    ``seq_mean_token_sum_norm`` -> ``(scalar loss, PolicyStats)``.
    Raises ValueError for ``ε_low`` outside [0, 1), ``ε_high < 0``, ``dual_clip <= 1`` and the errors of
    ``aggregate_token_losses``.
    Source: Schulman et al. 2017, "Proximal policy optimization algorithms", eq. 7 (negated for descent);
    clip-higher ``ε_high > ε_low`` of Yu et al. 2025, "DAPO", §3.1; dual clip of Ye et al. 2020, "Mastering
    complex control in MOBA games with deep reinforcement learning" (AAAI), eq. 5; k3 from Schulman 2020,
    "Approximating KL divergence".
    """
    low = clip_range if clip_range_low is None else clip_range_low
    high = clip_range if clip_range_high is None else clip_range_high
    if not 0 <= low < 1:
        raise ValueError(f"clip_range_low must be in [0, 1), got {low}")
    if not high >= 0:
        raise ValueError(f"clip_range_high must be >= 0, got {high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (the bound c·|A| must lie above the clipped loss), got {dual_clip}")
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)  # padding: ratio 1, never inf
    advantages = torch.where(mask, advantages.to(logprobs.dtype), zero)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(mask)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (bound < per_token)
        per_token = torch.where(dual, bound, per_token)
    loss = aggregate_token_losses(per_token, mask, aggregation, num_tokens, num_sequences, max_length)
    with torch.no_grad():
        stats = PolicyStats(
            clipfrac=masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            approx_kl=masked_mean((ratio - 1.0) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
            ratio_var=masked_var(ratio, mask, unbiased=False),
            dual_clipfrac=masked_mean(dual.to(logprobs.dtype), mask),
        )
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range_value: float | None,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, ValueStats]:
    """Clipped value loss of PPO, token level.

    Equation: ``v^clip_t = clip(v_t, v^old_t - c, v^old_t + c)``,
    ``ℓ_t = ½ max((v_t - R_t)², (v^clip_t - R_t)²)`` (``½ (v_t - R_t)²`` when ``clip_range_value`` is None),
    ``loss = Σ_t m_t ℓ_t / num_tokens``. Stats (masked means): ``clipfrac`` = fraction of tokens where the
    clipped error is strictly larger (0 for every token inside the range: ``v^clip_t = v_t`` exactly there),
    ``value_mean``, ``return_mean``, ``error`` = mean ``(v - R)²``.
    Shapes: all inputs (B, T); ``num_tokens`` defaults to ``Σ m`` -> ``(scalar loss, ValueStats)``.
    Source: the value clipping of OpenAI baselines ppo2 (Dhariwal et al. 2017), also in Ziegler et al. 2019's
    lm-human-preferences; discussed by Engstrom et al. 2020 ("Implementation matters") §3.
    """
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    old_values = torch.where(mask, old_values.to(values.dtype), zero)
    returns = torch.where(mask, returns.to(values.dtype), zero)
    values = torch.where(mask, values, zero)
    error = (values - returns).square()
    if clip_range_value is None:
        per_token = error
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        # clamp to [v_old - c, v_old + c] (not v_old + clamp(v - v_old, ±c)): inside the range v^clip IS v, bit
        # for bit, so no rounding tie of the two errors is counted in clipfrac
        clipped_values = torch.minimum(torch.maximum(values, old_values - clip_range_value),
                                       old_values + clip_range_value)
        clipped_error = (clipped_values - returns).square()
        per_token = torch.maximum(error, clipped_error)
        clipfrac = masked_mean((clipped_error > error).to(values.dtype), mask)
    loss = 0.5 * aggregate_token_losses(per_token, mask, "token_mean", num_tokens)
    with torch.no_grad():
        stats = ValueStats(
            clipfrac=clipfrac.detach(),
            value_mean=masked_mean(values, mask),
            return_mean=masked_mean(returns, mask),
            error=masked_mean(error, mask),
        )
    return loss, stats


def entropy_bonus(
    entropy: torch.Tensor, response_mask: torch.Tensor, num_tokens: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean per-token entropy of the response tokens (to be subtracted, times ``entropy_coef``, from the loss).

    Equation: ``Σ_t m_t H_t / num_tokens``. Shapes: (B, T) -> scalar.
    Source: Schulman et al. 2017, eq. 9 (the entropy bonus S).
    """
    mask = response_mask.bool()
    return aggregate_token_losses(entropy, mask, "token_mean", num_tokens)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much of the variance of the returns the critic explains.

    Equation: ``1 - var(R - v) / var(R)`` over the masked tokens (both variances divided by the count);
    nan when ``var(R) = 0``. 1 is perfect, 0 is no better than a constant, negative is worse.
    Shapes: (B, T) -> detached scalar.
    Source: ``explained_variance`` of OpenAI baselines (Dhariwal et al. 2017).
    """
    mask = mask.bool()
    with torch.no_grad():
        var_returns = masked_var(returns, mask, unbiased=False)
        var_residual = masked_var(returns - values, mask, unbiased=False)
        nan = torch.full_like(var_returns, float("nan"))
        return torch.where(var_returns == 0, nan, 1.0 - var_residual / var_returns)


def ppo_total_loss(policy_loss: torch.Tensor, value_loss: torch.Tensor | None, entropy: torch.Tensor,
                   vf_coef: float, entropy_coef: float, kl_loss: torch.Tensor | None = None,
                   kl_coef: float = 0.0) -> torch.Tensor:
    """The combined PPO objective to minimise.

    Equation: ``L = L^CLIP + c_1 L^VF - c_2 S + β_loss KL_loss`` (policy loss, value loss weighted by
    ``vf_coef``, entropy bonus weighted by ``entropy_coef``, and with the KL in the loss the aggregated per-token
    KL of :func:`rlhfkit.core.kl.kl_loss` weighted by ``kl_coef``). ``value_loss=None`` (no critic, a critic-free
    estimator) drops the value term; ``kl_loss=None`` drops the KL term.
    Source: Schulman et al. 2017, eq. 9 (signs for gradient descent); the KL term of GRPO (Shao et al. 2024,
    DeepSeekMath eq. 3).
    """
    if value_loss is None:
        loss = policy_loss - entropy_coef * entropy
    else:
        loss = policy_loss + vf_coef * value_loss - entropy_coef * entropy
    if kl_loss is not None:
        loss = loss + kl_coef * kl_loss
    return loss
