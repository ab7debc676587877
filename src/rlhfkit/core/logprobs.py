"""Log-probabilities of taken tokens and per-token entropy from logits.

Both are computed in float32 even when the logits are bf16/fp16 (a log-softmax over a 50k vocabulary in bf16
loses about two significant digits, which PPO's ratio exp(logp - old_logprobs) turns into noise), and in
chunks of batch rows so that the float32 copy of the (B, T, V) logits is never materialised at once.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 8


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it already is float64 (never a lower precision than float32)."""
    return x if x.dtype == torch.float64 else x.float()


def _check(temperature: float, chunk_rows: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


def logprobs_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Log-probability of each taken token under ``softmax(logits / temperature)``.

    Equation: ``logp[b, t] = z[b, t, y] - logsumexp_v z[b, t, v]`` with ``z = float32(logits) / temperature``
    (float64 logits stay float64)
    and ``y = tokens[b, t]``. The same temperature as at sampling time must be used, otherwise the rollout
    logprobs and the training logprobs come from different distributions.
    Shapes: ``logits`` (B, T, V), ``tokens`` (B, T) integer -> (B, T) float32 (float64 for float64
    logits). ``chunk_rows`` rows at a time.
    Source: the policy-gradient log-likelihood (Williams 1992); temperature scaling as in OpenAI's
    lm-human-preferences (Ziegler et al. 2019) and Huang et al. 2024 ("N+ implementation details", detail 7).
    """
    _check(temperature, chunk_rows)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match")
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        z = upcast(logits[start : start + chunk_rows]) / temperature
        idx = tokens[start : start + chunk_rows].long().unsqueeze(-1)
        taken = torch.gather(z, -1, idx).squeeze(-1)
        out.append(taken - torch.logsumexp(z, dim=-1))
    if not out:
        return logits.new_zeros(tokens.shape, dtype=upcast(logits).dtype)
    return torch.cat(out, dim=0)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at each position.

    Equation: ``H[b, t] = -Σ_v p_v log p_v`` with ``p = softmax(float32(logits) / temperature)``; terms with
    ``p_v = 0`` (logit -inf) contribute 0.
    Shapes: ``logits`` (B, T, V) -> (B, T) float32 (float64 for float64
    logits). ``chunk_rows`` rows at a time.
    Source: the entropy bonus of PPO (Schulman et al. 2017, eq. 9).
    """
    _check(temperature, chunk_rows)
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        logp = torch.log_softmax(upcast(logits[start : start + chunk_rows]) / temperature, dim=-1)
        p = logp.exp()
        # double where: keeps both the value and the gradient finite where p == 0 and log p == -inf
        safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        out.append(-(p * safe_logp).sum(dim=-1))
    if not out:
        return logits.new_zeros(logits.shape[:-1], dtype=upcast(logits).dtype)
    return torch.cat(out, dim=0)
