"""Packing: rows of a batch run as one sequence, without padding, each token seeing what it sees in its own row.

Two layouts, both gathered back to the original (N, L) per-token layout by :meth:`PackedLayout.unpack`:

1. **Padding-free (variable-length) packing**, :func:`varlen_layout`, the training path. The real tokens of all
   rows (those where ``attention_mask`` is True, in order) are concatenated into ONE packed row of
   ``T = Σ n_i`` tokens, no padding at all; row i's tokens form segment i with position ids ``0..n_i-1`` (restarting
   at 0 per segment, the positions :func:`rlhfkit.core.masks.position_ids_from_mask` gives them in the padded batch,
   left, right or middle padding alike). Attention is restricted to each segment (block-diagonal causal): the
   attention implementation :data:`VARLEN_ATTENTION` (registered with transformers' ``AttentionInterface``) runs
   ``scaled_dot_product_attention(is_causal=True)`` per segment (``cu_seqlens`` style), so the linear layers see
   only real tokens (``T`` of them instead of ``N · max n_i``) and attention costs ``Σ n_i²``, not ``T²`` as a dense
   4-D block mask would. With ``share_prompts``, rows that share their prompt (the real tokens before the first
   ``response_mask`` token) are laid out as ``[prompt | suffix_1 | ... | suffix_k]``: the prompt is a segment of its
   own and every suffix segment attends to the prompt's keys and then causally to its own
   (``allowed[q, k] = k <= P + q`` over ``[prompt keys | own keys]``), so each prompt runs once. Also with
   ``share_prompts``, the leading tokens that every row has in common (a chat template's system prompt and role
   header, :func:`shared_prefix`) form one first segment, and every other segment attends to its keys first
   (``[prefix keys | prompt keys | own keys]``), so they run once per batch instead of once per prompt; done when
   that saves at least :data:`MIN_PREFIX_SAVING` tokens.
2. **Shared-prompt packing with a dense mask**, :func:`shared_prompt_layout` (``packing`` off): rows that share
   their prompt become one padded packed row each group, with a 4-D bool mask
   ``allowed[q, k] = k <= q and (segment[k] = prompt or segment[k] = segment[q])``, run by plain SDPA.

In both, every token sees exactly the keys, at exactly the positions, it sees in its own row, so its hidden state
is the same up to floating-point rounding of the different matrix shapes, and so are the reward model's per-token
outputs, its scores and their gradients (tests compare them with the plain path in float64 and float32).
:func:`packed_hidden` runs a backbone on a layout. Nothing here is specific to reward models: a causal LM's
per-token outputs come back the same way (``layout.unpack(lm_head(packed_hidden(model.model, layout)))`` is
(N, L, V), for PPO's left-padded prompts with right-padded responses too).

Where variable-length attention applies (:func:`varlen_problem`): a model whose attention implementation is SDPA
(eager attention adds a mask as a float bias and has no per-segment path) and whose attention layers hold no
sliding window, soft-capping, sinks or position bias (they would need their own per-segment rule). The first
packed forward switches the model's implementation from ``"sdpa"`` to :data:`VARLEN_ATTENTION`, which is plain
SDPA (the same mask and attention functions) on every call that carries no segment plan, so unpacked calls and
gradient-checkpoint recomputation behave as before; the name is not saved (``config.json`` never records
``_attn_implementation``).

Idea: the cu_seqlens ("varlen") interface of FlashAttention (Dao et al. 2022) and padding-free packing in
sequence-level training; "prefix sharing" as in packed K-wise training (InstructGPT §3.5 runs K responses of a
prompt as one batch element); the masking is the standard block-causal packing mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rlhfkit.models.loading import forward_hidden
from rlhfkit.models.trunk import Trunk, run_blocks

__all__ = ["MIN_PREFIX_SAVING", "VARLEN_ATTENTION", "PackedLayout", "Segment", "packed_hidden", "shared_prefix",
           "shared_prompt_layout", "varlen_layout", "varlen_problem"]

VARLEN_ATTENTION = "rlhfkit_varlen"  # the registered attention implementation (module docstring)
SEGMENTS_KWARG = "rlhfkit_segments"  # the keyword under which a forward hands the segment plan to it
# attention-layer keywords that change attention beyond causal + mask; their models keep the dense path
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")
# tokens that running the rows' common prefix once must save: below this, its own segment (and on the
# sampler's side its own one-row forward) costs about as much as it saves
MIN_PREFIX_SAVING = 32


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of the packed row; they attend to the tokens of each context range ``(start, end)``
    of ``contexts``, in order (the prefix common to all rows, a shared prompt; none for a whole row), and then
    causally to their own tokens."""

    start: int
    end: int
    contexts: tuple[tuple[int, int], ...] = ()

    @property
    def context_length(self) -> int:
        return sum(end - start for start, end in self.contexts)


@dataclass
class PackedLayout:
    """A packed batch and the way back.

    input_ids, position_ids: (G, Lp) long. Dense layout: ``attention_mask`` (G, 1, Lp, Lp) bool (True = may attend),
    ``segments`` None. Variable-length layout: G = 1, no padding, ``segments`` the ordered segments covering the
    packed row, ``masks`` for each segment its bool (1, 1, n, C + n) mask over [context | own] keys (None for a
    segment without context: causal), ``attention_mask`` None, ``source`` (T,) long the flat index ``r * L + j`` in
    the original batch of each packed token (the inverse of ``gather_index`` on real tokens). gather_index: (N, L)
    long, for each original row and position the flat index ``g * Lp + j`` of its token in the packed batch (padding
    positions point at index 0 of the row's group; mask them with the original ``attention_mask``). ``tokens`` /
    ``packed_tokens``: real tokens before / after packing.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    gather_index: torch.Tensor
    tokens: int
    packed_tokens: int
    segments: tuple[Segment, ...] | None = None
    masks: tuple[torch.Tensor | None, ...] | None = None
    source: torch.Tensor | None = None

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Per-token outputs (G, Lp, ...) of the packed batch → (N, L, ...) in the original layout."""
        flat = packed.reshape(packed.shape[0] * packed.shape[1], *packed.shape[2:])
        return flat[self.gather_index]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token inputs (N, L, ...) in the original layout → (1, T, ...) in the packed row (variable-length
        layout only; a shared prompt takes its first row's values)."""
        if self.source is None:
            raise ValueError("pack needs a variable-length layout")
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[self.source][None]


def _group_by_prompt(prompts: list[tuple[int, ...] | None]) -> list[list[int]]:
    """Row indices grouped by equal prompt, in order of first appearance; a None prompt is a group of its own."""
    groups: dict[Any, list[int]] = {}
    for r, prompt in enumerate(prompts):
        groups.setdefault(("row", r) if prompt is None else prompt, []).append(r)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------
# Variable-length packing
# ----------------------------------------------------------------------------------------------------------
def shared_prefix(tokens: Sequence[Sequence[int]], limits: Sequence[int]) -> int:
    """The number of leading tokens that all sequences ``tokens`` have in common, at most ``min(limits)`` (each
    sequence's longest allowed prefix); 0 for fewer than two sequences."""
    if len(tokens) < 2:
        return 0
    limit, n = min(limits), 0
    for column in zip(*tokens):
        if n >= limit or any(t != column[0] for t in column):
            break
        n += 1
    return n


def varlen_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None,
                  share_prompts: bool = False, min_prefix_saving: int | None = None) -> PackedLayout | None:
    """All rows (N, L) as one padding-free packed row of their real tokens (module docstring, layout 1).

    Any padding (left, right, in the middle) is allowed: a row's tokens are its ``attention_mask`` positions in
    order. ``share_prompts``: rows whose prompts (real tokens before the first response token of ``response_mask``;
    at least one, and at least one response token after them) are equal share one prompt segment; and the
    leading tokens common to all rows with a token (`shared_prefix`; each prompt segment and whole row keeps a
    token of its own) form one prefix segment when that saves at least ``min_prefix_saving`` tokens (default: the
    module's `MIN_PREFIX_SAVING`, read at call time). Returns None when no row has a real token.
    """
    n, width = input_ids.shape
    device = input_ids.device
    att = attention_mask.bool().cpu()
    real = [att[r].nonzero().flatten() for r in range(n)]  # the positions of each row's real tokens
    prompts: list[tuple[int, ...] | None] = [None] * n
    prompt_len = [0] * n
    ids_cpu = input_ids.cpu() if share_prompts else None
    if share_prompts and response_mask is not None:
        resp = response_mask.bool().cpu()
        for r in range(n):
            in_resp = resp[r, real[r]]
            p = int(in_resp.int().argmax()) if bool(in_resp.any()) else 0
            if 0 < p < len(real[r]):
                prompts[r], prompt_len[r] = tuple(ids_cpu[r, real[r][:p]].tolist()), p
    sources: list[torch.Tensor] = []  # per piece: flat indices r * width + j of its tokens in input_ids
    positions: list[torch.Tensor] = []
    segments: list[Segment] = []
    gather = torch.zeros((n, width), dtype=torch.long)
    length = 0

    def piece(r: int, cols: torch.Tensor, first_position: int, contexts: tuple[tuple[int, int], ...] = ()) -> int:
        nonlocal length
        start, k = length, len(cols)
        sources.append(r * width + cols)
        positions.append(torch.arange(first_position, first_position + k))
        segments.append(Segment(start, start + k, contexts))
        length += k
        return start

    # units: a group of rows sharing a prompt, or one whole row; q leading tokens common to all run once
    units = [m for m in _group_by_prompt(prompts) if len(real[m[0]])]
    q = 0
    if share_prompts and len(units) > 1:
        limits = [(prompt_len[m[0]] if len(m) > 1 else len(real[m[0]])) - 1 for m in units]  # each >= 0
        q = shared_prefix([ids_cpu[m[0], real[m[0]][:lim]].tolist() for m, lim in zip(units, limits)], limits)
        least = MIN_PREFIX_SAVING if min_prefix_saving is None else min_prefix_saving
        q = q if q * (len(units) - 1) >= max(least, 1) else 0
    prefix: tuple[tuple[int, int], ...] = ()
    if q:
        prefix = ((piece(units[0][0], real[units[0][0]][:q], 0), q),)
    for members in units:
        for r in members:
            gather[r, real[r][:q]] = torch.arange(q)
        if len(members) == 1:  # a whole row: one causal segment (after the prefix)
            r = members[0]
            gather[r, real[r][q:]] = torch.arange(piece(r, real[r][q:], q, prefix), length)
            continue
        p = prompt_len[members[0]]
        prompt_start = piece(members[0], real[members[0]][q:p], q, prefix)
        for r in members:
            gather[r, real[r][q:p]] = torch.arange(prompt_start, prompt_start + p - q)
            suffix = real[r][p:]
            context = prefix + ((prompt_start, prompt_start + p - q),)
            gather[r, suffix] = torch.arange(piece(r, suffix, p, context), length)
    if length == 0:
        return None
    source = torch.cat(sources).to(device)
    masks = tuple(None if not s.contexts else
                  torch.ones((s.end - s.start, s.context_length + s.end - s.start), dtype=torch.bool,
                             device=device).tril(s.context_length)[None, None]
                  for s in segments)
    return PackedLayout(
        input_ids=input_ids.reshape(-1)[source][None],
        position_ids=torch.cat(positions)[None].to(device),
        attention_mask=None,
        gather_index=gather.to(device),
        tokens=int(att.sum()),
        packed_tokens=length,
        segments=tuple(segments),
        masks=masks,
        source=source,
    )


def _segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The :data:`VARLEN_ATTENTION` implementation: transformers' SDPA function, per segment when the forward
    carries a segment plan (``query`` (1, H, T, D), ``key``/``value`` (1, H_kv, T, D) -> (1, T, H, D)), else as is."""
    layout: PackedLayout | None = kwargs.pop(SEGMENTS_KWARG, None)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if layout is None:
        return sdpa(module, query, key, value, attention_mask, **kwargs)
    used = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if attention_mask is not None or used or query.shape[0] != 1:
        what = "a mask" if attention_mask is not None else used or f"a batch of {query.shape[0]}"
        raise RuntimeError(f"variable-length attention got {what} it cannot apply ({type(module).__name__}); this "
                           f"model must not be packed")
    kwargs.pop("is_causal", None)
    outputs = []
    for seg, mask in zip(layout.segments, layout.masks):
        own = slice(seg.start, seg.end)
        k, v = key[:, :, own], value[:, :, own]
        if mask is not None:
            k = torch.cat([key[:, :, start:end] for start, end in seg.contexts] + [k], dim=2)
            v = torch.cat([value[:, :, start:end] for start, end in seg.contexts] + [v], dim=2)
        out, _ = sdpa(module, query[:, :, own], k, v, mask, is_causal=mask is None, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(VARLEN_ATTENTION, _segment_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def varlen_problem(backbone: nn.Module) -> str | None:
    """Why ``backbone`` (a decoder's base model) cannot run :func:`varlen_layout` batches; None if it can."""
    config = getattr(backbone, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", VARLEN_ATTENTION):
        return f"its attention implementation is {impl!r}; variable-length packing needs 'sdpa'"
    for name in ("sliding_window", "attn_logit_softcapping"):
        if getattr(config, name, None) is not None:
            return f"its config sets {name}={getattr(config, name)!r}, which per-segment SDPA does not apply"
    for module in backbone.modules():
        if getattr(module, "sliding_window", None) is not None:
            return f"{type(module).__name__} has a sliding window, which per-segment SDPA does not apply"
    return None


def packed_hidden(backbone: nn.Module, layout: PackedLayout, trunk: Trunk | None = None) -> torch.Tensor:
    """Last hidden states (G, Lp, H) of ``backbone`` on a packed batch; unpack per-token outputs with
    ``layout.unpack``. A variable-length layout switches the backbone's SDPA to :data:`VARLEN_ATTENTION` (module
    docstring) and hands it the segments. ``trunk`` (variable-length layouts; a backbone that
    `models.trunk.supports_split`): the hidden states (N, L, H) of the UNPACKED batch after the backbone's first
    ``trunk.layers`` blocks; they are packed (:meth:`PackedLayout.pack`) and only the blocks above run."""
    if layout.segments is None:
        if trunk is not None:
            raise ValueError("a trunk needs a variable-length layout")
        return forward_hidden(backbone, layout.input_ids, layout.attention_mask, layout.position_ids)
    problem = varlen_problem(backbone)
    if problem is not None:
        raise ValueError(f"{type(backbone).__name__} cannot run a variable-length packed batch: {problem}")
    if backbone.config._attn_implementation != VARLEN_ATTENTION:
        backbone.config._attn_implementation = VARLEN_ATTENTION
    # an all-True 2-D mask: transformers then builds no mask (SDPA's is_causal path) and does not re-derive
    # packed segments from the position ids
    ones = torch.ones_like(layout.input_ids, dtype=torch.bool)
    if trunk is not None:
        if trunk.hidden.shape[:2] != layout.gather_index.shape:
            raise ValueError(f"trunk hidden states {tuple(trunk.hidden.shape)} do not match the batch "
                             f"{tuple(layout.gather_index.shape)}")
        return run_blocks(backbone, ones, trunk.layers, hidden=layout.pack(trunk.hidden),
                          position_ids=layout.position_ids, **{SEGMENTS_KWARG: layout})
    return forward_hidden(backbone, layout.input_ids, ones, layout.position_ids, **{SEGMENTS_KWARG: layout})


# ----------------------------------------------------------------------------------------------------------
# Shared-prompt packing with a dense mask
# ----------------------------------------------------------------------------------------------------------
def shared_prompt_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                         pad_token_id: int) -> PackedLayout | None:
    """Pack right-padded rows (N, L) that share their prompt, one padded row per prompt (module docstring,
    layout 2).

    Returns None when packing would not save a token (no two rows share a prompt) or does not apply (a row that
    is not right-padded, or whose response starts at position 0 or is empty).
    """
    n, width = input_ids.shape
    att = attention_mask.bool()
    resp = response_mask.bool() & att
    lengths = att.sum(dim=1)
    if n < 2 or not bool((att == (torch.arange(width, device=att.device) < lengths[:, None])).all()):
        return None
    has_resp = resp.any(dim=1)
    starts = resp.float().argmax(dim=1)
    if not bool(has_resp.all()) or bool((starts == 0).any()):
        return None

    ids_cpu, starts_l, lengths_l = input_ids.cpu(), starts.tolist(), lengths.tolist()
    groups = _group_by_prompt([tuple(ids_cpu[r, :starts_l[r]].tolist()) for r in range(n)])
    if len(groups) == n:
        return None

    rows_ids: list[list[int]] = []
    rows_pos: list[list[int]] = []
    rows_seg: list[list[int]] = []
    gather = torch.zeros((n, width), dtype=torch.long)
    group_of_row = torch.empty(n, dtype=torch.long)
    for g, members in enumerate(groups):
        group_of_row[members] = g
        p = starts_l[members[0]]
        ids, pos, seg = ids_cpu[members[0], :p].tolist(), list(range(p)), [0] * p
        gather[members, :p] = torch.arange(p)  # prompt tokens: the packed row's first p positions
        for s, r in enumerate(members, start=1):
            suffix = ids_cpu[r, p:lengths_l[r]].tolist()
            start = len(ids)
            ids += suffix
            pos += range(p, p + len(suffix))
            seg += [s] * len(suffix)
            gather[r, p:lengths_l[r]] = torch.arange(start, start + len(suffix))
        rows_ids.append(ids)
        rows_pos.append(pos)
        rows_seg.append(seg)

    packed_len = max(len(r) for r in rows_ids)
    num = len(rows_ids)
    device = input_ids.device
    packed_ids = torch.full((num, packed_len), pad_token_id, dtype=torch.long)
    packed_pos = torch.zeros((num, packed_len), dtype=torch.long)
    segment = torch.full((num, packed_len), -1, dtype=torch.long)  # -1 = padding
    for g in range(num):
        k = len(rows_ids[g])
        packed_ids[g, :k] = torch.tensor(rows_ids[g])
        packed_pos[g, :k] = torch.tensor(rows_pos[g])
        segment[g, :k] = torch.tensor(rows_seg[g])
    gather += group_of_row[:, None] * packed_len

    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    causal = torch.ones((packed_len, packed_len), dtype=torch.bool).tril()
    allowed = causal & (q_seg >= 0) & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    allowed |= torch.eye(packed_len, dtype=torch.bool) & (q_seg < 0)  # a padding query sees itself (no empty row)
    return PackedLayout(
        input_ids=packed_ids.to(device),
        position_ids=packed_pos.to(device),
        attention_mask=allowed[:, None].to(device),
        gather_index=gather.to(device),
        tokens=int(lengths.sum()),
        packed_tokens=int((segment >= 0).sum()),
    )
