"""Packing: rows of a batch run as one sequence, without padding, each token seeing what it sees in its own row.

Two layouts, both gathered back to the original (N, L) per-token layout by :meth:`PackedLayout.unpack`:

1. **Padding-free (variable-length) packing**, :func:`varlen_layout`, the training path. The real tokens of all
   rows (those where ``attention_mask`` is True, in order) are concatenated into ONE packed row of
   ``T = Σ n_i`` tokens, no padding at all; row i's tokens form segment i with position ids ``0..n_i-1`` (restarting
   at 0 per segment, the positions :func:`rlhfkit.core.masks.position_ids_from_mask` gives them in the padded batch,
   left, right or middle padding alike). Attention is restricted to each segment (block-diagonal causal): the
   attention implementation :data:`VARLEN_ATTENTION` (registered with transformers' ``AttentionInterface``) runs
   ``scaled_dot_product_attention`` per segment (``cu_seqlens`` style; segments of similar size batched into one
   call, each padded with a bool mask, :func:`attention_groups`), so the linear layers see only real tokens (``T``
   of them instead of ``N · max n_i``) and attention costs about ``Σ n_i²`` (at most :data:`GROUP_PADDING_SLACK`
   times it), not ``T²`` as a dense 4-D block mask would. With ``share_prompts``, rows that share their prompt
   (the real tokens before the first ``response_mask`` token) are laid out as ``[prompt | suffix_1 | ... |
   suffix_k]``: the prompt is a segment of its own and every suffix segment attends to the prompt's keys and then
   causally to its own (``allowed[q, k] = k <= P + q`` over ``[prompt keys | own keys]``), so each prompt runs
   once. Also with ``share_prompts``, the leading tokens that every row has in common (a chat template's system
   prompt and role header, :func:`shared_prefix`) form one first segment, and every other segment attends to its
   keys first (``[prefix keys | prompt keys | own keys]``), so they run once per batch instead of once per prompt;
   done when that saves at least :data:`MIN_PREFIX_SAVING` tokens.
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

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rlhfkit.models.loading import forward_hidden
from rlhfkit.models.trunk import Trunk, run_blocks

__all__ = ["GROUP_PADDING_SLACK", "MIN_PREFIX_SAVING", "VARLEN_ATTENTION", "AttentionGroup", "PackedLayout",
           "Segment", "attention_groups", "packed_hidden", "shared_prefix", "shared_prompt_layout", "varlen_layout",
           "varlen_problem"]

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

    @property
    def length(self) -> int:
        """Its own tokens: the queries it runs."""
        return self.end - self.start

    @property
    def key_count(self) -> int:
        """The keys its queries attend to: its contexts', then its own."""
        return self.context_length + self.length


@dataclass(frozen=True)
class AttentionGroup:
    """Segments of a variable-length layout that one SDPA call runs (:func:`attention_groups`): S segments, each
    padded to ``n`` query slots and ``m`` key slots (its context keys in order, then its own).

    ``query_index`` (S·n,) and ``key_index`` (S·m,) long: the packed position of each slot (padding slots point at a
    real position, masked out); ``mask`` (S, 1, n, m) bool: True where a query may attend (a context key always, an
    own key at or before the query; a padding query sees its segment's first key only, so that no softmax row is
    empty; its output is dropped); ``real`` (R,) long: the query slots ``s·n + i`` that hold real tokens."""

    query_index: torch.Tensor
    key_index: torch.Tensor
    mask: torch.Tensor
    real: torch.Tensor


# a group of segments padded to its largest query and key counts may compute at most this many times the
# attention scores of its segments computed one by one (attention is a small part of a block's FLOPs; the calls
# and the copies of per-segment slices were the cost: 41 segments per micro-batch in the quickstart's reward model)
GROUP_PADDING_SLACK = 2.0


@dataclass
class PackedLayout:
    """A packed batch and the way back.

    input_ids, position_ids: (G, Lp) long. Dense layout: ``attention_mask`` (G, 1, Lp, Lp) bool (True = may attend),
    ``segments`` None. Variable-length layout: G = 1, no padding, ``segments`` the ordered segments covering the
    packed row (attention runs them in the groups of :meth:`attention_plan`), ``attention_mask`` None, ``source``
    (T,) long the flat index ``r * L + j`` in the original batch of each packed token (the inverse of
    ``gather_index`` on real tokens). gather_index: (N, L) long, for each original row and position the flat index
    ``g * Lp + j`` of its token in the packed batch (padding positions point at index 0 of the row's group; mask
    them with the original ``attention_mask``). ``tokens`` / ``packed_tokens``: real tokens before / after packing.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    gather_index: torch.Tensor
    tokens: int
    packed_tokens: int
    segments: tuple[Segment, ...] | None = None
    source: torch.Tensor | None = None
    _groups: Any = field(default=None, repr=False, compare=False)  # (groups, inverse), built at first use

    def attention_plan(self, device: torch.device) -> tuple[tuple[AttentionGroup, ...], torch.Tensor | None]:
        """:func:`attention_groups` of this layout on ``device``, built once and reused by every layer (and the
        backward pass), with the permutation that puts the groups' real query slots, concatenated, back in packed
        order (None when they already are)."""
        if self._groups is None or self._groups[0][0].mask.device != device:
            groups = attention_groups(self.segments, device)
            order = torch.cat([g.query_index[g.real] for g in groups])
            identity = bool((order == torch.arange(len(order), device=device)).all())
            self._groups = (groups, None if identity else torch.argsort(order))
        return self._groups

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
    return PackedLayout(
        input_ids=input_ids.reshape(-1)[source][None],
        position_ids=torch.cat(positions)[None].to(device),
        attention_mask=None,
        gather_index=gather.to(device),
        tokens=int(att.sum()),
        packed_tokens=length,
        segments=tuple(segments),
        source=source,
    )


def attention_groups(segments: Sequence[Segment], device: torch.device) -> tuple[AttentionGroup, ...]:
    """The segments of a variable-length layout in a few :class:`AttentionGroup` s, each run by one SDPA call.

    Segments are taken in decreasing order of key count (ties: query count, then packed order); a segment joins the
    current group while the group's padded scores ``S · n_max · m_max`` stay within :data:`GROUP_PADDING_SLACK`
    times the exact ones ``Σ n_s · m_s``, else it starts the next group. Each segment's queries see exactly its
    context keys and, causally, its own (the rule of :class:`Segment`), so the attention of every real query is the
    per-segment one up to float rounding (masked keys add exact zeros to the softmax sums)."""
    order = sorted(range(len(segments)), key=lambda i: (-segments[i].key_count, -segments[i].length, i))
    buckets: list[list[int]] = []
    n_max = m_max = exact = 0
    for i in order:
        n, m = segments[i].length, segments[i].key_count
        if buckets:
            nn_, mm_ = max(n_max, n), max(m_max, m)
            if (len(buckets[-1]) + 1) * nn_ * mm_ <= GROUP_PADDING_SLACK * (exact + n * m):
                buckets[-1].append(i)
                n_max, m_max, exact = nn_, mm_, exact + n * m
                continue
        buckets.append([i])
        n_max, m_max, exact = n, m, n * m
    groups = []
    for members in buckets:
        segs = [segments[i] for i in members]
        n_max = max(seg.length for seg in segs)
        m_max = max(seg.key_count for seg in segs)
        query_index = torch.zeros((len(segs), n_max), dtype=torch.long)
        key_index = torch.zeros((len(segs), m_max), dtype=torch.long)
        mask = torch.zeros((len(segs), 1, n_max, m_max), dtype=torch.bool)
        real = []
        for s, seg in enumerate(segs):
            n, c = seg.length, seg.context_length
            keys = [torch.arange(a, b) for a, b in seg.contexts] + [torch.arange(seg.start, seg.end)]
            key_index[s, :c + n] = torch.cat(keys)
            key_index[s, c + n:] = seg.start
            query_index[s, :n] = torch.arange(seg.start, seg.end)
            query_index[s, n:] = seg.start
            mask[s, 0, :n, :c + n] = torch.ones((n, c + n), dtype=torch.bool).tril(c)
            mask[s, 0, n:, 0] = True  # padding queries: one real key, output dropped
            real.append(torch.arange(s * n_max, s * n_max + n))
        groups.append(AttentionGroup(query_index.flatten().to(device), key_index.flatten().to(device),
                                     mask.to(device), torch.cat(real).to(device)))
    return tuple(groups)


def _segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The :data:`VARLEN_ATTENTION` implementation: transformers' SDPA function, per group of segments
    (:meth:`PackedLayout.attention_plan`: the segments padded, with a bool mask, one call per group) when the
    forward carries a segment plan (``query`` (1, H, T, D), ``key``/``value`` (1, H_kv, T, D) -> (1, T, H, D)), else
    as is."""
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
    groups, inverse = layout.attention_plan(query.device)
    q_tokens, k_tokens, v_tokens = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    outputs = []
    for g in groups:
        s, n, m = g.mask.shape[0], g.mask.shape[2], g.mask.shape[3]
        q = q_tokens.index_select(0, g.query_index).unflatten(0, (s, n)).transpose(1, 2)  # (S, H, n, D)
        k = k_tokens.index_select(0, g.key_index).unflatten(0, (s, m)).transpose(1, 2)    # (S, H_kv, m, D)
        v = v_tokens.index_select(0, g.key_index).unflatten(0, (s, m)).transpose(1, 2)
        out, _ = sdpa(module, q, k, v, g.mask, is_causal=False, **kwargs)                 # (S, n, H, D)
        outputs.append(out.reshape(s * n, *out.shape[2:]).index_select(0, g.real))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return (out if inverse is None else out.index_select(0, inverse))[None], None


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
