"""Log-probabilities of taken tokens and per-token entropy from logits.

Both are computed in float32 even when the logits are bf16/fp16 (a log-softmax over a 50k vocabulary in bf16
loses about two significant digits, which PPO's ratio exp(logp - old_logprobs) turns into noise), and in
chunks of batch rows so that the float32 copy of the (B, T, V) logits is never materialised at once.
"""

from __future__ import annotations

import threading

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


def _forward_blocks(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_tokens: int,
                    with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs, entropy (empty unless ``with_entropy``) and log-sum-exp (B, T) of (B, T, V) ``logits``, in blocks
    of at most ``chunk_tokens`` tokens (`_blocks`)."""
    work = upcast(logits).dtype
    logprobs = logits.new_empty(tokens.shape, dtype=work)
    entropy = logits.new_zeros(tokens.shape if with_entropy else (0,), dtype=work)
    lse = logits.new_empty(tokens.shape, dtype=work)
    for rows, cols in _blocks(*tokens.shape, chunk_tokens):
        x = logits[rows, cols]
        z = upcast(x)
        if temperature != 1.0:  # z / 1 == z exactly: one pass fewer at temperature 1
            z = z / temperature
        m = z.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows: as logsumexp does
        # z - m, then log p in place (a new tensor where z is still the caller's logits)
        logp = z.sub_(m) if temperature != 1.0 or z.dtype != x.dtype else torch.sub(z, m)
        p = logp.exp()
        s = p.sum(dim=-1, keepdim=True)
        log_s = s.log()
        logp.sub_(log_s)  # z - m - log s: log p, the order of torch.log_softmax
        lse[rows, cols] = (m + log_s).squeeze(-1)
        logprobs[rows, cols] = torch.gather(logp, -1, tokens[rows, cols].long().unsqueeze(-1)).squeeze(-1)
        if with_entropy:
            p.div_(s)
            entropy[rows, cols] = -torch.linalg.vecdot(p, logp.clamp_min_(_LOG_ZERO))
    return logprobs, entropy, lse


def _backward_blocks(logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                     temperature: float, chunk_tokens: int, grad_logprobs: torch.Tensor | None,
                     grad_entropy: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The gradient of the loss w.r.t. (B, T, V) ``logits`` written into ``out`` (the same shape, the working
    dtype; it may BE ``logits``, which is then overwritten block by block), from the outputs' gradients (None:
    that output is not used; not both None)."""
    t = temperature
    g_lp = grad_logprobs if grad_logprobs is not None else torch.zeros_like(lse)
    for rows, cols in _blocks(*tokens.shape, chunk_tokens):
        g, z = out[rows, cols], upcast(logits[rows, cols])
        if t != 1.0:
            torch.div(z, t, out=g)
            z = g
        torch.sub(z, lse[rows, cols].unsqueeze(-1), out=g)  # log p (z / 1 == z exactly)
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
    return out


class _LogprobsEntropy(torch.autograd.Function):
    """One pass over the logits for both the taken-token log-probs and the entropy; the backward recomputes the
    softmax from the saved logits and writes the logits' gradient in place (no other vocabulary-sized tensor).
    Both work in blocks of at most ``chunk_tokens`` tokens (`_blocks`)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk_tokens: int,
                with_entropy: bool):
        logprobs, entropy, lse = _forward_blocks(logits, tokens, temperature, chunk_tokens, with_entropy)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        logits, tokens, lse, entropy = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=lse.dtype, device=logits.device)
        if grad_logprobs is None and grad_entropy is None:
            return grad.zero_().to(logits.dtype), None, None, None, None
        _backward_blocks(logits, tokens, lse, entropy, ctx.temperature, ctx.chunk_tokens, grad_logprobs,
                         grad_entropy, grad)
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


class _LogitBuffers:
    """Free CPU buffers for the (N, V) logits of `head_logprobs_and_entropy`, kept between calls (at most
    ``max_bytes`` in all, per dtype). A (N, V) float32 tensor of a training micro-batch is ~170 MB, far above
    glibc's mmap threshold (32 MB at most): every fresh one is new pages from the kernel, faulted in and zeroed on
    first write. Measured on a 2-core AMD EPYC Zen 4, writing 165 MB: 36 ms into fresh pages, 9 ms into reused
    ones. Other devices allocate through their own caching allocator (CUDA's reuses memory already)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._free: dict[torch.dtype, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least ``rows * cols`` elements (a kept one if one is large enough)."""
        n = rows * cols
        if device.type != "cpu":
            return torch.empty(n, dtype=dtype, device=device)
        with self._lock:
            free = self._free.setdefault(dtype, [])
            fits = [b for b in free if b.numel() >= n]
            if fits:
                buf = min(fits, key=torch.Tensor.numel)
                free.remove(buf)
                return buf
            largest = max((b.numel() for b in free), default=0)
            free.clear()  # too small: let them go before the larger one is allocated
        # a little headroom, so that micro-batches of slowly growing sizes do not each allocate anew; a normal
        # tensor even under inference mode (an inference tensor could not be written outside it later)
        with torch.inference_mode(False):
            return torch.empty(max(n, largest + largest // 4), dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        """Keep ``buf`` (from `take`) for a later call, within ``max_bytes``."""
        if buf.device.type != "cpu" or buf.is_inference():
            return
        with self._lock:
            free = self._free.setdefault(buf.dtype, [])
            free.append(buf)
            free.sort(key=torch.Tensor.numel, reverse=True)
            while free and sum(b.numel() * b.element_size() for b in free) > self.max_bytes:
                free.pop()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


LOGIT_BUFFERS = _LogitBuffers()


class _HeadLogprobsEntropy(torch.autograd.Function):
    """`logprobs_and_entropy` of ``hidden @ weight.T + bias`` with ONE (N, V) buffer from forward to backward: the
    forward writes the logits into it, the backward overwrites them block by block with their own gradient, then
    the LM head's two products read it, and it goes back to `LOGIT_BUFFERS`."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor,
                temperature: float, chunk_tokens: int, with_entropy: bool, backward: bool):
        (N, _), V = hidden.shape, weight.shape[0]
        buf = LOGIT_BUFFERS.take(N, V, hidden.dtype, hidden.device)
        logits = buf[: N * V].view(N, V)
        # the products F.linear makes: mm without a bias, addmm with one
        if bias is None:
            torch.mm(hidden, weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden, weight.t(), out=logits)
        # (N, 1) rows: the blocks of `logprobs_and_entropy`'s packed (N, 1, V) call
        logprobs, entropy, lse = _forward_blocks(logits[:, None], tokens[:, None], temperature, chunk_tokens,
                                                 with_entropy)
        ctx.set_materialize_grads(False)
        if backward:  # else no graph is built (needs_input_grad would still be True under no_grad)
            ctx.save_for_backward(hidden, weight, tokens, lse, entropy)
            ctx.buf, ctx.logits, ctx.has_bias = buf, logits, bias is not None
            ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        else:
            LOGIT_BUFFERS.give(buf)
        lse = lse[:, 0]
        ctx.mark_non_differentiable(lse)
        return logprobs[:, 0], entropy[:, 0] if with_entropy else entropy, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        buf, grad = ctx.buf, ctx.logits
        if grad is None:
            raise RuntimeError("head_logprobs_and_entropy supports one backward per forward (the backward writes "
                               "the gradient over the saved logits): run the forward again instead of "
                               "retain_graph=True")
        ctx.buf = ctx.logits = None
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_logprobs is None and grad_entropy is None:
            grad.zero_()
        else:
            _backward_blocks(grad[:, None], tokens[:, None], lse, entropy, ctx.temperature, ctx.chunk_tokens,
                             grad_logprobs[:, None] if grad_logprobs is not None else None,
                             grad_entropy[:, None] if grad_entropy is not None else None, grad[:, None])
        # the products autograd makes for F.linear's inputs
        grad_hidden = grad.mm(weight) if needs_hidden else None
        grad_weight = grad.t().mm(hidden) if needs_weight else None
        grad_bias = grad.sum(0) if needs_bias and ctx.has_bias else None
        LOGIT_BUFFERS.give(buf)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def head_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = True,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`logprobs_and_entropy` of the logits ``hidden @ weight.T (+ bias)`` of a linear LM head, without a
    second vocabulary-sized tensor.

    Equations: ``logits = hidden W^T + b``, then those of :func:`logprobs_and_entropy`; gradients
    ``∂L/∂hidden = G W``, ``∂L/∂W = G^T hidden``, ``∂L/∂b = Σ_n G_n`` with ``G = ∂L/∂logits``.
    Shapes: ``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``tokens`` (N,) -> two (N,) tensors
    (entropy None unless ``with_entropy``), in ``hidden``'s dtype, which must be ``weight``'s and float32 or
    float64 (a lower precision goes through the head and :func:`logprobs_and_entropy`).
    The same products as ``torch.nn.functional.linear`` (forward and backward) and the same block passes as
    :func:`logprobs_and_entropy` on the same data: the same numbers, bit for bit (a test compares values and
    gradients). The difference is memory: the plain composition keeps the (N, V) logits from the forward to the
    backward and allocates their (N, V) gradient there; this writes the gradient over the logits and, on the CPU,
    takes that one buffer from `LOGIT_BUFFERS` instead of fresh pages.
    Source: as :func:`logprobs_and_entropy`; the linear layer's gradients.
    """
    _check(temperature, chunk_tokens)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or tokens.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and tokens "
                         f"{tuple(tokens.shape)} do not match (N, H), (V, H) and (N,)")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.float64) or (
            bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype, float32 or float64 (got {hidden.dtype}, "
                         f"{weight.dtype}{', ' + str(bias.dtype) if bias is not None else ''})")
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    logprobs, entropy, _ = _HeadLogprobsEntropy.apply(hidden, weight, bias, tokens, temperature, chunk_tokens,
                                                      with_entropy, backward)
    return logprobs, entropy if with_entropy else None
