"""The pairwise ranker kinds by the ``kind`` of their ``rlhfkit.json``: ``pairrm`` (a decoder reading both
responses, `rlhfkit.models.pairrm`) and ``seq2seq`` (SteamSHP style, `rlhfkit.models.seq2seq`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.pairrm import PairRanker, Ranker
from rlhfkit.models.reward import _read_metadata
from rlhfkit.models.seq2seq import Seq2SeqRanker

RANKERS: dict[str, type[Ranker]] = {"pairrm": PairRanker, "seq2seq": Seq2SeqRanker}


def ranker_kind(path: str | os.PathLike) -> str | None:
    """The ranker kind a model folder holds ('pairrm' or 'seq2seq'), or None (a reward model, or no folder)."""
    folder = Path(path)
    meta = _read_metadata(folder) if folder.is_dir() else None
    kind = meta.get("kind") if meta is not None else None
    return kind if kind in RANKERS else None


def load_ranker(path: str | os.PathLike, **kwargs: Any) -> Ranker:
    """The ranker saved in ``path`` (its class chosen by :func:`ranker_kind`); ``kwargs`` go to
    ``from_pretrained``."""
    kind = ranker_kind(path)
    if kind is None:
        raise RlhfkitError(f"{str(path)!r} is not a ranker folder (its rlhfkit.json must say kind "
                           f"{' or '.join(map(repr, RANKERS))})")
    return RANKERS[kind].from_pretrained(path, **kwargs)
