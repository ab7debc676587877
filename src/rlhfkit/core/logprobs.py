"""Log-probabilities of taken tokens and per-token entropy from logits.

Both are computed in float32 even when the logits are bf16/fp16 (a log-softmax over a 50k vocabulary in bf16
loses about two significant digits, which PPO's ratio exp(logp - old_logprobs) turns into noise), and in
chunks of batch rows so that the float32 copy of the (B, T, V) logits is never materialised at once.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 8
# log p below this is p = 0 exactly (exp underflows below -104 in float32, -745 in float64): where log p = -inf
# (a -inf logit) the fused entropy and its gradient use this finite value, so p · log p is 0, not nan
_LOG_ZERO = -1e4


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
        z = upcast(logits[start : start + chunk_rows])
        if temperature != 1.0:  # x / 1 == x exactly: no vocabulary-sized copy at temperature 1
            z = z / temperature
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


# Tokens per block of the fused log-prob/entropy pass (`logprobs_and_entropy`). Every operation of the pass is
# per token (along the vocabulary), so the block size changes no bit of the result; small blocks keep each
# (tokens, V) temporary small: 16 × 49,152 float32 = 3 MB, where 8 rows × ~100 tokens are 165 MB, above glibc's
# 32 MB mmap threshold (fresh page faults at every allocation). Measured on a 2-core Xeon with AMX, 1 thread,
# forward + backward with the entropy over 840 tokens: 710 ms in blocks of 840 tokens, 437 ms in blocks of 16.
CHUNK_TOKENS = 16


def _blocks(rows: int, cols: int, chunk_tokens: int) -> list[tuple[slice, slice]]:
    """(row, column) slices of a (rows, cols) grid of tokens into contiguous blocks of at most ``chunk_tokens``
    tokens (whole rows together when a row is shorter than that, else slices of one row)."""
    if cols <= chunk_tokens:
        step = max(1, chunk_tokens // max(cols, 1))
        return [(slice(r, r + step), slice(None)) for r in range(0, rows, step)]
    return [(slice(r, r + 1), slice(c, c + chunk_tokens)) for r in range(rows) for c in range(0, cols, chunk_tokens)]


class _LogprobsEntropy(torch.autograd.Function):
    """One pass over the logits for both the taken-token log-probs and the entropy; the backward recomputes the
    softmax from the saved logits and writes the logits' gradient in place (no other vocabulary-sized tensor).
    Both work in blocks of at most ``chunk_tokens`` tokens (`_blocks`)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_tokens: int,
                with_entropy: bool):
        work = upcast(logits).dtype
        logprobs = logits.new_empty(tokens.shape, dtype=work)
        entropy = logits.new_zeros(tokens.shape if with_entropy else (0,), dtype=work)
        lse = logits.new_empty(tokens.shape, dtype=work)
        for rows, cols in _blocks(*tokens.shape, chunk_tokens):
            logp = upcast(logits[rows, cols]) / temperature  # z, then z - max, then log p (in place)
            m = logp.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows: as logsumexp does
            logp.sub_(m)
            p = logp.exp()
            s = p.sum(dim=-1, keepdim=True)
            log_s = s.log()
            logp.sub_(log_s)
            lse[rows, cols] = (m + log_s).squeeze(-1)
            logprobs[rows, cols] = torch.gather(logp, -1, tokens[rows, cols].long().unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                p.div_(s)
                entropy[rows, cols] = -torch.linalg.vecdot(p, logp.clamp_min_(_LOG_ZERO))
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        logits, tokens, lse, entropy = ctx.saved_tensors
        t = ctx.temperature
        work = lse.dtype
        grad = torch.empty(logits.shape, dtype=work, device=logits.device)
        if grad_logprobs is None and grad_entropy is None:
            return grad.zero_().to(logits.dtype), None, None, None, None
        g_lp = grad_logprobs if grad_logprobs is not None else torch.zeros_like(lse)
        for rows, cols in _blocks(*tokens.shape, ctx.chunk_tokens):
            g = grad[rows, cols]
            torch.div(upcast(logits[rows, cols]), t, out=g)
            g.sub_(lse[rows, cols].unsqueeze(-1))  # log p
            lp = g_lp[rows, cols].unsqueeze(-1)
            if grad_entropy is None:
                # d logp_y / d z_v = 1[v = y] - p_v
                g.exp_().mul_(-lp / t)
            else:
                # d H / d z_v = -p_v (log p_v + H)
                p = g.exp()
                g.clamp_min_(_LOG_ZERO).add_(entropy[rows, cols].unsqueeze(-1)).mul_(
                    grad_entropy[rows, cols].unsqueeze(-1))
                g.add_(lp).mul_(p).mul_(-1.0 / t)
            g.scatter_add_(-1, tokens[rows, cols].long().unsqueeze(-1), lp / t)
        return grad.to(logits.dtype), None, None, None, None


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = True,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`logprobs_from_logits` and :func:`entropy_from_logits` in one pass, with a hand-written backward.

    Equations: as those two functions, with ``log p = z - m - log Σ_v exp(z_v - m)`` (``m = max_v z_v``, the
    order of ``torch.log_softmax``), ``logp[b, t] = log p_y`` and ``H[b, t] = -Σ_v p_v log p_v``. Gradients
    (w.r.t. ``z = logits / temperature``; the logits' gradient is that / temperature):
    ``∂ logp_y / ∂ z_v = 1[v = y] - p_v`` and ``∂ H / ∂ z_v = -p_v (log p_v + H)`` (differentiate
    ``H = lse - Σ_v p_v z_v`` with ``∂ p_u / ∂ z_v = p_u (1[u = v] - p_v)``).
    Shapes: ``logits`` (B, T, V), ``tokens`` (B, T) -> two (B, T) tensors, float32 (float64 for float64 logits).
    Same numbers as the two plain functions up to float rounding (tests compare values and gradients). The
    plain path's autograd keeps ``z`` and builds several (B, T, V) tensors in its backward (the softmax, the
    one-hot scatter, their sum, the temperature's division); here the forward allocates two per block of
    ``chunk_tokens`` tokens (:data:`CHUNK_TOKENS`; the block size changes no bit of the result) and the backward
    only the logits' gradient (two per block when the entropy has a gradient). An output that the loss does not
    use gets no backward work.
    ``with_entropy=False`` skips the entropy (None); the log-probs are the same bits either way.
    Source: the softmax cross-entropy gradient (e.g. Goodfellow et al., Deep Learning, §6.2.2.3).
    """
    _check(temperature, chunk_tokens)
    if logits.shape[:-1] != tokens.shape or tokens.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match (B, T, V) "
                         f"and (B, T)")
    logprobs, entropy, _ = _LogprobsEntropy.apply(logits, tokens, temperature, chunk_tokens, with_entropy)
    return logprobs, entropy if with_entropy else None
