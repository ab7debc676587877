"""Shared-prompt packing: run the prompt of rows that share it once.

A pairwise reward-model batch holds each prompt at least twice (chosen and rejected), and K times with K-wise
data. For a causal (decoder) model the hidden states of a row's prompt tokens do not depend on what follows, so
rows that share their prompt can be packed into ONE sequence::

    [prompt | suffix_1 | suffix_2 | ... | suffix_k]

where suffix_i is row i's tokens after the prompt (its response, end token, ...), with

* position ids ``0..P-1`` for the prompt and ``P..P+n_i-1`` for every suffix (each continues the prompt), and
* a 4-D attention mask in which a token sees the prompt tokens and the earlier tokens of its own suffix only:
  ``allowed[q, k] = k <= q  and  (segment[k] = prompt  or  segment[k] = segment[q])``.

Every token then sees exactly the keys, at exactly the positions, it sees in its own row, so its hidden state is
the same (up to floating-point rounding of the different matrix shapes), and so are the reward model's
per-token outputs, its scores and their gradients. :func:`shared_prompt_layout` builds the packed batch and the
index that gathers per-token outputs back into the original (N, L) layout.

The prompt of a row is its tokens before the first ``response_mask`` token. Rows must be right-padded (the
``attention_mask`` of a row is True on a prefix). Idea: "prefix sharing" as in packed K-wise training
(InstructGPT §3.5 runs K responses of a prompt as one batch element); the masking is the standard block-causal
packing mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedLayout", "shared_prompt_layout"]


@dataclass
class PackedLayout:
    """A packed batch and the way back.

    input_ids, position_ids: (G, Lp) long; attention_mask: (G, 1, Lp, Lp) bool (True = may attend);
    gather_index: (N, L) long, for each original row and position the flat index ``g * Lp + j`` of its token in
    the packed batch (padding positions point at index 0 of the row's group; mask them with the original
    ``attention_mask``). ``tokens`` / ``packed_tokens``: real tokens before / after packing.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    gather_index: torch.Tensor
    tokens: int
    packed_tokens: int

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Per-token outputs (G, Lp, ...) of the packed batch → (N, L, ...) in the original layout."""
        flat = packed.reshape(packed.shape[0] * packed.shape[1], *packed.shape[2:])
        return flat[self.gather_index]


def shared_prompt_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                         pad_token_id: int) -> PackedLayout | None:
    """Pack right-padded rows (N, L) that share their prompt (module docstring).

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
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in range(n):
        groups.setdefault(tuple(ids_cpu[r, :starts_l[r]].tolist()), []).append(r)
    if len(groups) == n:
        return None

    rows_ids: list[list[int]] = []
    rows_pos: list[list[int]] = []
    rows_seg: list[list[int]] = []
    gather = torch.zeros((n, width), dtype=torch.long)
    group_of_row = torch.empty(n, dtype=torch.long)
    for g, (prompt, members) in enumerate(groups.items()):
        group_of_row[members] = g
        p = len(prompt)
        ids, pos, seg = list(prompt), list(range(p)), [0] * p
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
