"""Pointwise data: one response per row with a binary label, a score, or several aspect scores.

Every row has ``prompt`` (text or messages) and ``response`` (text or assistant messages), plus exactly one
kind of target, detected from the first row and required of every row:

- ``label``: binary, 0/1 or true/false (1.0/0.0 from a CSV column with gaps is accepted);
- ``score``: a finite number;
- multi-aspect: a ``scores`` dict ``{aspect: number or null}``, or, when ``aspects=[...]`` is given and the row
  has no ``scores``, one column per named aspect (with ``aspects`` and a ``scores`` dict, only the named
  aspects are kept). A missing or null aspect is allowed (it is masked in
  training) but every row needs at least one. The aspect order is ``aspects`` if given, else the order in
  which the keys first appear in the file; every example's ``scores`` dict holds every aspect, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Optional, Sequence

from rlhfkit.data.preference import ExampleList, Response
from rlhfkit.data.prompts import Prompt, check_finite, check_messages, check_prompt, describe_value, require
from rlhfkit.data.sources import DataSource, rows_of
from rlhfkit.errors import data_error

TARGETS = ("label", "score", "scores")


@dataclass(frozen=True)
class PointwiseExample:
    """One validated pointwise row: exactly one of ``label``, ``score``, ``scores`` is set."""

    prompt: Prompt
    response: Response
    label: Optional[int] = None
    score: Optional[float] = None
    scores: Optional[dict[str, Optional[float]]] = None
    row: Optional[int] = field(default=None, compare=False)


def _check_label(value: Any, source: Any, i: int) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    raise data_error(source, i, "label", f"expected 0/1 or true/false, got {describe_value(value)}"
                     + (f" {value}" if isinstance(value, (int, float)) else ""))


def _check_response(value: Any, source: Any, i: int) -> Response:
    if isinstance(value, list):
        messages = check_messages(value, source, i, "response")
        roles = [m["role"] for m in messages]
        if any(r != "assistant" for r in roles):
            raise data_error(source, i, "response", f"response messages must be assistant messages; got roles {roles}")
        return messages
    return check_prompt(value, source, i, "response")


def _target_kind(row: dict[str, Any], aspects: Sequence[str] | None, source: Any, i: int) -> str:
    present = [k for k in TARGETS if k in row]
    if len(present) > 1:
        raise data_error(source, i, present[1], f"the row has {' and '.join(present)}; give exactly one target")
    if present:
        return present[0]
    if aspects:
        return "aspects"
    raise data_error(source, i, None, f"no target: found keys [{', '.join(sorted(row))}]; expected one of "
                                      "'label' (0/1), 'score' (number), 'scores' ({aspect: number}), or the "
                                      "aspect columns named by aspects=[...]")


def parse_pointwise(rows: list[dict[str, Any]], source: Any = None,
                    aspects: Sequence[str] | None = None) -> ExampleList:
    """Validate in-memory rows (see the module docstring); the first invalid row raises naming row and field."""
    if not rows:
        raise data_error(source, None, None, "no rows")
    if aspects is not None:
        aspects = list(aspects)
        if not aspects or len(set(aspects)) != len(aspects) or not all(isinstance(a, str) for a in aspects):
            raise data_error(source, None, None, f"aspects must be distinct names, got {aspects}")
    kind = _target_kind(rows[0], aspects, source, 1)
    names = aspects
    if kind == "scores" and names is None:
        names = list(dict.fromkeys(k for row in rows if isinstance(row.get("scores"), dict) for k in row["scores"]))
    examples = []
    for i, row in enumerate(rows, start=1):
        prompt = check_prompt(require(row, "prompt", source, i), source, i, "prompt")
        response = _check_response(require(row, "response", source, i), source, i)
        row_kind = _target_kind(row, aspects, source, i)
        if row_kind != kind:
            raise data_error(source, i, None, f"this row's target is {row_kind!r} but row 1's is {kind!r}; "
                                              "every row must have the same kind of target")
        label = score = scores = None
        if kind == "label":
            label = _check_label(row["label"], source, i)
        elif kind == "score":
            score = check_finite(row["score"], source, i, "score")
        else:
            given = row["scores"] if kind == "scores" else {a: row[a] for a in names if a in row}
            if not isinstance(given, dict):
                raise data_error(source, i, "scores",
                                 f"expected an object {{aspect: number}}, got {describe_value(given)}")
            scores = {}
            for a in names:
                value = given.get(a)
                where = f"scores.{a}" if kind == "scores" else a
                scores[a] = None if value is None else check_finite(value, source, i, where)
            if all(v is None for v in scores.values()):
                raise data_error(source, i, "scores" if kind == "scores" else None,
                                 f"no aspect score: at least one of {names} is needed")
        examples.append(PointwiseExample(prompt, response, label, score, scores, row=i))
    return ExampleList(examples)


def load_pointwise(path: str | PathLike | DataSource, aspects: Sequence[str] | None = None,
                   split: str | None = None, name: str = "data") -> ExampleList:
    """Read ``path`` (any format of :func:`rlhfkit.data.sources.read_rows`), or take in-memory rows (errors naming
    them ``name``; `rlhfkit.data.sources.rows_of`), and validate them as pointwise data."""
    rows, source = rows_of(path, name, split)
    return parse_pointwise(rows, source, aspects=aspects)
