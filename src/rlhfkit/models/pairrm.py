"""A PairRM-style pairwise ranker: one input holds the prompt and both responses; one logit says "A is better".

Input format (plain-text markers; each part is tokenised on its own, without special tokens, and the ids are
concatenated, so truncation is exact and markers are never merged with their neighbours)::

    <prompt>
    {prompt}
    <response A>
    {response A}
    <response B>
    {response B}
    <verdict>

The logit is read at the last token (the constant ``<verdict>`` marker): ``P(A better than B) = σ(logit)``.
Conversational parts (lists of ``{"role", "content"}`` messages) are written one ``role: content`` line each.

The network is a decoder :class:`~rlhfkit.models.reward.RewardModel` (aggregation ``last``, one output named
``a_better``), so saving, loading (also by ``AutoModelForSequenceClassification``), LoRA and freezing work as for
reward models; ``rlhfkit.json`` says ``"kind": "pairrm"``. Training applies ``core.losses.pointwise_bce`` to both
orders: label 1 for (chosen, rejected), label 0 for (rejected, chosen).

:class:`Ranker` is what every pairwise ranker shares (input building with an equal length cap, padding, the
symmetric probability); `rlhfkit.models.seq2seq.Seq2SeqRanker` (SteamSHP style) is the other one.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import has_tokenizer_files, load_tokenizer
from rlhfkit.models.reward import METADATA_FILE, RewardModel, _read_metadata

Text = str | list[dict]
PROMPT_MARKER = "<prompt>\n"
A_MARKER = "\n<response A>\n"
B_MARKER = "\n<response B>\n"
VERDICT_MARKER = "\n<verdict>"
INPUT_FORMAT = f"{PROMPT_MARKER}{{prompt}}{A_MARKER}{{a}}{B_MARKER}{{b}}{VERDICT_MARKER}"


def _as_text(x: Text) -> str:
    if isinstance(x, str):
        return x
    try:
        return "\n".join(f"{m['role']}: {m['content']}" for m in x)
    except (TypeError, KeyError) as e:
        raise RlhfkitError(f"expected a string or a list of {{'role', 'content'}} messages, got {x!r:.80}") from e


def _equal_cap(lengths: Sequence[int], budget: int) -> int:
    """The largest c with Σ min(l_i, c) <= budget (water-filling: long parts are cut to the same length)."""
    c = 0
    for candidate in range(max(lengths) + 1):
        if sum(min(length, candidate) for length in lengths) > budget:
            break
        c = candidate
    return c


MARKERS = (PROMPT_MARKER, A_MARKER, B_MARKER, VERDICT_MARKER)


def build_input(tokenizer: Any, prompt: Text, a: Text, b: Text, max_length: int | None = None,
                markers: Sequence[str] = MARKERS, end_ids: Sequence[int] = ()) -> list[int]:
    """Token ids of one ranker input: ``markers[0] prompt markers[1] a markers[2] b markers[3] end_ids``.

    The default markers are PairRM's (module docstring); `rlhfkit.models.seq2seq` passes SteamSHP's and the
    tokenizer's end-of-sequence ids. If longer than ``max_length``, the prompt, A and B are cut to a common length
    cap (the prompt keeping its end, the responses their beginnings); the markers and ``end_ids`` are always kept.
    The cut is symmetric in A and B.
    """
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    marker_ids = [enc(m) for m in markers]
    parts = [enc(_as_text(x)) for x in (prompt, a, b)]
    fixed = sum(len(m) for m in marker_ids) + len(end_ids)
    if max_length is not None and fixed + sum(len(p) for p in parts) > max_length:
        budget = max_length - fixed
        if budget < 3:
            raise RlhfkitError(f"max_length={max_length} is too short for the ranker input markers ({fixed} tokens)")
        cap = _equal_cap([len(p) for p in parts], budget)
        parts = [parts[0][len(parts[0]) - min(len(parts[0]), cap):], parts[1][:cap], parts[2][:cap]]
    return (marker_ids[0] + parts[0] + marker_ids[1] + parts[1] + marker_ids[2] + parts[2] + marker_ids[3]
            + list(end_ids))


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into ``input_ids`` (B, L) long and ``attention_mask`` (B, L) bool."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        attention_mask[i, : len(s)] = True
    return input_ids, attention_mask


class Ranker(nn.Module):
    """What every pairwise ranker shares: ``forward(input_ids, attention_mask) -> logits (B,)`` of "A is better
    than B", inputs built by :meth:`input_builder`, right-padded with :attr:`pad_id`, and the symmetric score.

    Subclasses (:class:`PairRanker`, `rlhfkit.models.seq2seq.Seq2SeqRanker`) set ``tokenizer`` and ``max_length``
    and define ``forward``, ``pad_id``, ``input_builder``, ``save_pretrained`` and ``from_pretrained``.
    """

    kind: str  # the ``kind`` its rlhfkit.json says
    label: str  # its name in messages
    tokenizer: Any
    max_length: int | None

    @staticmethod
    def input_builder(tokenizer: Any) -> Callable[..., list[int]]:
        """``build(prompt, a, b, max_length=None) -> ids`` for this kind of ranker with ``tokenizer``."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        raise NotImplementedError

    def build_input(self, prompt: Text, a: Text, b: Text) -> list[int]:
        """The kind's input ids with this ranker's tokenizer and ``max_length``."""
        if self.tokenizer is None:
            raise RlhfkitError(f"this {type(self).__name__} has no tokenizer; pass one to it or to from_pretrained")
        return self.input_builder(self.tokenizer)(prompt, a, b, self.max_length)

    def collate(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad id lists with this model's pad id (see ``reward_pad_token_id``)."""
        return pad_right(sequences, self.pad_id)

    @torch.no_grad()
    def symmetric_logits(self, prompts: Sequence[Text], As: Sequence[Text], Bs: Sequence[Text],
                         symmetric: bool = True) -> torch.Tensor:
        """(N,) float32 CPU: ``(logit(A, B) - logit(B, A)) / 2`` per triple (``symmetric=False``: ``logit(A, B)``).

        The symmetric logit is antisymmetric in A and B, so position bias cancels: ``σ`` of it gives
        ``P(A > B) + P(B > A) = 1`` exactly.
        """
        if not len(prompts) == len(As) == len(Bs):
            raise RlhfkitError(f"need as many prompts as A and B responses; got {len(prompts)}, {len(As)}, {len(Bs)}")
        device = next(self.parameters()).device
        seqs = [self.build_input(p, x, y) for p, x, y in zip(prompts, As, Bs)]
        if symmetric:
            seqs += [self.build_input(p, y, x) for p, x, y in zip(prompts, As, Bs)]
        input_ids, attention_mask = self.collate(seqs)
        logits = self(input_ids.to(device), attention_mask.to(device)).float()
        n = len(prompts)
        return ((logits[:n] - logits[n:]) / 2 if symmetric else logits).cpu()

    def prob_a_better(self, prompt: Text | Sequence[Text], a: Text | Sequence[Text], b: Text | Sequence[Text],
                      symmetric: bool = True) -> float | torch.Tensor:
        """P(A better than B) = σ(:meth:`symmetric_logits`); a float for one triple (strings), a (N,) tensor for
        equal-length lists."""
        single = isinstance(a, str)
        prompts, As, Bs = ([prompt], [a], [b]) if single else (list(prompt), list(a), list(b))
        probs = torch.sigmoid(self.symmetric_logits(prompts, As, Bs, symmetric))
        return float(probs[0]) if single else probs


class PairRanker(Ranker):
    """PairRM-style ranker: ``forward(input_ids, attention_mask) -> logits (B,)`` of "A is better than B"."""

    kind, label = "pairrm", "PairRM"

    def __init__(self, rm: RewardModel, tokenizer: Any = None, max_length: int | None = None) -> None:
        super().__init__()
        if rm.kind != "decoder" or rm.aggregation != "last" or rm.num_aspects != 1:
            raise RlhfkitError("a PairRanker needs a decoder reward model with aggregation 'last' and one output")
        self.rm = rm
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, tokenizer: Any = None, max_length: int | None = None,
                      **kwargs: Any) -> "PairRanker":
        """A new ranker (fresh head) from a language model; ``kwargs`` go to ``RewardModel.from_backbone``."""
        if tokenizer is None:
            tokenizer = load_tokenizer(path, trust_remote_code=kwargs.get("trust_remote_code", False))
        rm = RewardModel.from_backbone(path, kind="decoder", aggregation="last", num_aspects=1,
                                       aspect_names=["a_better"], aspect_weights=[1.0], tokenizer=tokenizer, **kwargs)
        return cls(rm, tokenizer, max_length)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B,) read at the last real token; ``P(A better) = sigmoid(logit)``."""
        return self.rm(input_ids, attention_mask).scores

    @staticmethod
    def input_builder(tokenizer: Any) -> Callable[..., list[int]]:
        """``build(prompt, a, b, max_length=None)``: :func:`build_input` with PairRM's markers."""
        return functools.partial(build_input, tokenizer)

    @property
    def pad_id(self) -> int:
        return self.rm.pad_token_id if self.rm.pad_token_id is not None else 0

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None) -> None:
        """Like ``RewardModel.save_pretrained``; ``rlhfkit.json`` has ``kind: "pairrm"`` and the input format."""
        self.rm.save_pretrained(directory, tokenizer if tokenizer is not None else self.tokenizer, "pairrm",
                                {"input_format": INPUT_FORMAT, "max_length": self.max_length})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> "PairRanker":
        """Restore a ranker saved by :meth:`save_pretrained` (with its tokenizer when saved)."""
        folder = Path(directory)
        meta = _read_metadata(folder) if folder.is_dir() else None
        if meta is None or meta.get("kind") != "pairrm":
            raise RlhfkitError(f"{str(directory)!r} is not a PairRM ranker folder (its {METADATA_FILE} must say "
                               f"kind 'pairrm')")
        rm = RewardModel.from_pretrained(folder, _allow_kind="pairrm", **kwargs)
        tokenizer = load_tokenizer(folder) if has_tokenizer_files(folder) else None
        return cls(rm, tokenizer, meta.get("max_length"))
