"""Attention of one new token per row against a KV cache, as two batched matrix products (the sampler's decode step).

A decode step asks each row's single new query to attend to that row's cached keys. On a CPU, PyTorch's fused
``scaled_dot_product_attention`` runs this shape, ``(B, H_kv, G, D) x (B, H_kv, L, D)`` with G = H / H_kv query
heads per key head (transformers' ``pack_gqa``), through its tiled flash kernel, whose per-(row, head) overhead
dominates for a handful of queries: measured on a 2-core AMD EPYC Zen 4 at the quickstart's shape (441 rows,
9 heads over 3 key heads, 64 dims, 60-92 keys) 5.5-7.1 ms per call against 2.2-4.0 ms as plain products, about
14 % of a decode step's time there. :func:`grouped_decode_attention` computes the same function

    out[b, h] = softmax(scale · q[b, h] · K[b, h // G]ᵀ + mask[b]) · V[b, h // G]

as ``matmul -> masked softmax -> matmul`` over the key heads, each key head's G query heads as G rows of one
product (no copy of K or V per query head). It is the same attention up to float rounding (tests: float64 to
1e-12 against SDPA and against the sampler's plain path). The sampler's last step with a
:class:`~rlhfkit.rollout.sampling.HiddenCapture` feeds two tokens per row (its last token and an end token) with a
per-token mask; the same products take it with the G heads' two tokens as 2G rows, where SDPA under a mask would
first copy every row's keys and values once per query head (transformers' ``repeat_kv``: in the quickstart's label
batch two 80 MB copies per layer, 7 % of the batch's profile).

:data:`DECODE_ATTENTION` is registered with transformers' ``AttentionInterface``: it takes that path for one query
token per row (up to :data:`MAX_QUERY_TOKENS` with a mask) whose query, keys and values are all float32 (or all
float64) on the CPU, outside autocast, without dropout, with no mask (one token) or a bool / same-dtype mask per
batch row and query token, shared by the heads, and hands every other call (prefill, GPUs, autocast, dropout,
other masks) to transformers' own SDPA function unchanged. :func:`decode_attention`
switches a model to it for the duration of a ``with`` block (the sampler's call) when the model runs SDPA (also
rlhfkit's variable-length attention, which is SDPA without a segment plan) and its config has no sub-configs
(transformers' setter would rewrite theirs too), and restores the previous implementation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rlhfkit.models.packing import VARLEN_ATTENTION

__all__ = ["DECODE_ATTENTION", "MAX_QUERY_TOKENS", "decode_attention", "grouped_decode_attention"]

DECODE_ATTENTION = "rlhfkit_decode"
# keywords that change attention beyond scale + mask: such calls keep transformers' SDPA (which may refuse them)
_UNSUPPORTED = ("softcap", "s_aux", "position_bias")
_SDPA_LIKE = ("sdpa", VARLEN_ATTENTION)  # the variable-length attention is SDPA on calls without segments
# query tokens per row that take the grouped products: a decode step's one, the capture's last step's two; a
# prefill (many) keeps SDPA's fused kernel, whose tiling pays off there
MAX_QUERY_TOKENS = 2


def grouped_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Scaled dot-product attention of one (or a few) query tokens per row (module docstring).

    query (B, H, q, D); key, value (B, H_kv, L, D) with H a multiple of H_kv (query head h reads key head
    h // (H / H_kv), as grouped-query attention repeats them); mask None (only for q = 1), bool (True = may attend)
    or additive float, (B or 1, 1, q, L) (each query token's keys, shared by its heads). Returns
    (B, H, q, D) in the query's dtype. Every query token must be allowed at least one key (a decode step's own
    token always is). Several query tokens: the sampler's last step with a capture (a row's last token and the
    end token after it), whose mask is causal between the two.
    """
    B, H, q_len, D = query.shape
    kv_heads, L = key.shape[1], key.shape[2]
    if q_len < 1 or (q_len > 1 and mask is None) or H % kv_heads or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"one query token per row (or several with a mask) and H a multiple of H_kv: query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}, mask "
                         f"{None if mask is None else tuple(mask.shape)}")
    groups = H // kv_heads
    # head h = k * G + g: the G query heads of key head k, each with its q tokens, as G * q rows of one product
    q = query.reshape(B, kv_heads, groups * q_len, D)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale  # (B, H_kv, G * q, L)
    if mask is not None:
        m = mask.reshape(mask.shape[0], 1, 1, q_len, mask.shape[-1])  # each query token's keys, every head alike
        scores = scores.view(B, kv_heads, groups, q_len, L)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
        scores = scores.view(B, kv_heads, groups * q_len, L)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).reshape(B, H, q_len, value.shape[-1])


def _one_mask_per_row(attention_mask: torch.Tensor | None, batch: int, queries: int, keys: int,
                      dtype: torch.dtype) -> bool:
    """Whether the SDPA mask of a step of ``queries`` tokens per row is one bool or ``dtype`` mask
    (B or 1, 1, queries, L) per row (shared by its heads), or none for a one-token step."""
    if attention_mask is None:
        return queries == 1
    return (attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == queries
            and attention_mask.shape[0] in (1, batch) and attention_mask.shape[3] == keys
            and attention_mask.dtype in (torch.bool, dtype))


def _decode_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The :data:`DECODE_ATTENTION` implementation (transformers' attention-function interface: query (B, H, q, D),
    key / value (B, H_kv, L, D) -> (B, q, H, D), None)."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    fits = (query.shape[2] <= MAX_QUERY_TOKENS and query.device.type == "cpu"
            and query.dtype in (torch.float32, torch.float64) and key.dtype == value.dtype == query.dtype and not dropout and not torch.is_autocast_enabled("cpu")
            and not any(kwargs.get(k) is not None for k in _UNSUPPORTED)
            and _one_mask_per_row(attention_mask, query.shape[0], query.shape[2], key.shape[2], query.dtype))
    if not fits:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = grouped_decode_attention(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, _decode_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def decode_attention(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Run ``model`` with :data:`DECODE_ATTENTION` inside the block (yields True) when ``enabled``, its
    attention implementation is SDPA and its config has no sub-configs; otherwise leave it as it is (yields
    False). The previous implementation is restored on exit, exceptions included."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if not enabled or before not in _SDPA_LIKE or getattr(config, "sub_configs", None):
        yield False
        return
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = before
