"""Per-token estimators of KL(π || π_ref), the penalty of the KL-shaped reward, and the KL as a loss term.

With samples y ~ π, ``logp = log π(y)`` and ``logq = log π_ref(y)``:

- ``"kl"``  (k1): ``logp - logq``; unbiased for KL, can be negative per token.
- ``"abs"``: ``|logp - logq|``.
- ``"mse"`` (k2): ``½ (logp - logq)²``; low variance, biased.
- ``"k3"``: ``(exp(logq - logp) - 1) - (logq - logp)``; unbiased and always >= 0.
- ``"full"``: ``Σ_v π_v (log π_v - log π_ref,v)``, the exact KL over the vocabulary at each position
  (needs the logits of both models).

Source: J. Schulman, "Approximating KL divergence" (2020, blog post) for k1/k2/k3; the KL-shaped reward of
Ziegler et al. 2019 §2.2 and Ouyang et al. 2022 (InstructGPT) eq. 2. The KL in the loss (:func:`kl_loss`,
k3 of the current policy, aggregated like the policy loss) is GRPO's (Shao et al. 2024, DeepSeekMath §4.1.1).
"""

from __future__ import annotations

import torch

from rlhfkit.core.logprobs import DEFAULT_CHUNK_ROWS, upcast
from rlhfkit.core.masks import aggregate_token_losses

KL_ESTIMATORS: tuple[str, ...] = ("kl", "abs", "mse", "k3", "full")


def full_kl_from_logits(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Exact per-position KL between the two next-token distributions.

    Equation: ``KL[b, t] = Σ_v p_v (log p_v - log q_v)`` with ``p = softmax(logits / temperature)``,
    ``q = softmax(ref_logits / temperature)`` (float32 or wider); terms with ``p_v = 0`` contribute 0.
    Shapes: ``logits``, ``ref_logits`` (B, T, V) -> (B, T).
    Source: the definition of the KL divergence (Kullback & Leibler 1951), evaluated per token.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logp = torch.log_softmax(upcast(logits[rows]) / temperature, dim=-1)
        logq = torch.log_softmax(upcast(ref_logits[rows]) / temperature, dim=-1)
        p = logp.exp()
        diff = torch.where(p > 0, logp - logq, torch.zeros((), dtype=logp.dtype, device=logp.device))
        out.append((p * diff).sum(dim=-1))
    if not out:
        return logits.new_zeros(logits.shape[:-1], dtype=upcast(logits).dtype)
    return torch.cat(out, dim=0)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k1 estimate of KL(π || π_ref) per sampled token: the log-ratio of the two policies.

    Equation: ``k1_t = log π(y_t) - log π_ref(y_t)``; unbiased for the per-token KL when ``y_t ~ π``, so its sum
    over a response estimates the sequence KL ``KL(π(·|x) || π_ref(·|x))`` in nats.
    Shapes: ``logprobs``, ``ref_logprobs`` (B, T) -> (B, T); padding positions are not masked here (callers mask).
    Source: Schulman 2020, "Approximating KL divergence" (k1); the KL measured by the adaptive controller of
    Ziegler et al. 2019 §2.2 (lm-human-preferences, TRL's classic PPOTrainer: ``logprobs - ref_logprobs``).
    """
    return logprobs - ref_logprobs


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) for the sampled tokens.

    Equations (``d = logp - logq``): ``kl``: d; ``abs``: |d|; ``mse``: ½ d²; ``k3``: ``exp(-d) - 1 + d``;
    ``full``: ``Σ_v p_v (log p_v - log q_v)`` from ``logits`` / ``ref_logits`` divided by ``temperature``.
    Shapes: ``logprobs``, ``ref_logprobs`` (B, T); ``logits``, ``ref_logits`` (B, T, V) -> (B, T). Padding
    positions are not masked here (callers mask).
    Raises ValueError for an unknown estimator or ``"full"`` without both logits.
    Source: Schulman 2020, "Approximating KL divergence" (k1, k2, k3); Ziegler et al. 2019 §2.2.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if estimator == "full":
        if logits is None or ref_logits is None:
            raise ValueError("kl_estimator 'full' needs both logits and ref_logits")
        if logits.shape[:-1] != logprobs.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match logprobs {tuple(logprobs.shape)}")
        return full_kl_from_logits(logits, ref_logits, temperature)
    d = kl_k1(logprobs, ref_logprobs)
    if estimator == "kl":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "mse":
        return 0.5 * d.square()
    # k3 with r = q/p = exp(-d): (r - 1) - log r
    return torch.expm1(-d) + d


KL_LOSS_ESTIMATORS: tuple[str, ...] = ("kl", "abs", "mse", "k3")


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k3",
    aggregation: str = "token_mean",
    num_tokens: int | torch.Tensor | None = None,
    num_sequences: int | torch.Tensor | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """The KL penalty as a loss term (the KL in the loss instead of in the reward), differentiable in ``logprobs``.

    Equation: per response token ``KL_t`` = :func:`kl_penalty` of the *current* policy's log-probs against the
    reference's, by default k3 ``exp(logq - logp) - 1 - (logq - logp)`` (unbiased for KL(π || π_ref), >= 0),
    reduced by :func:`rlhfkit.core.masks.aggregate_token_losses` with the policy loss's ``aggregation`` and
    normalisers (exact under micro-batching by the same rule). The loss to minimise is
    ``L^CLIP + β KL_loss`` (:func:`rlhfkit.core.losses.ppo_total_loss`, ``kl_coef``); the rewards then carry no
    KL. Padding is never read (nor differentiated through).
    Shapes: ``logprobs``, ``ref_logprobs``, ``response_mask`` (B, T) -> 0-dim tensor.
    Raises ValueError for an estimator outside ``KL_LOSS_ESTIMATORS`` (``full`` needs the logits: not here) and
    the errors of ``aggregate_token_losses``.
    Source: Shao et al. 2024, "DeepSeekMath", §4.1.1, eqs. 3-4 (GRPO adds ``β D_KL`` with the k3 estimator to
    the objective instead of a KL reward); J. Schulman 2020, "Approximating KL divergence" (k3).
    """
    if estimator not in KL_LOSS_ESTIMATORS:
        raise ValueError(f"unknown KL-loss estimator {estimator!r}; valid: {', '.join(KL_LOSS_ESTIMATORS)}")
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logp = torch.where(mask, logprobs, zero)
    logq = torch.where(mask, ref_logprobs.to(logprobs.dtype), zero)
    per_token = kl_penalty(logp, logq, estimator)
    return aggregate_token_losses(per_token, mask, aggregation, num_tokens, num_sequences, max_length)
