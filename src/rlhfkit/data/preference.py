"""Preference pairs: load, detect the format, validate every row, return `PreferenceExample`s.

Formats, detected from the first row's keys and then required of every row:

- **explicit**: ``prompt`` (text, or a list of messages), ``chosen`` and ``rejected`` texts.
- **implicit prompt** (Anthropic HH): ``chosen`` and ``rejected`` texts hold the whole dialogue
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is the longest common beginning of the two that ends
  with ``"\\n\\nAssistant:"`` (included in the prompt); chosen/rejected become the remainders, which in HH start
  with a space.
- **conversational**: ``chosen`` and ``rejected`` are lists of ``{"role", "content"}`` messages. With a
  ``prompt`` (a list of messages; a text is taken as one user message), chosen/rejected may repeat the prompt
  messages at their start (they are removed). Without one, the prompt is the common leading messages.
  Either way, what remains of chosen and of rejected must be one or more assistant messages.

Every format takes an optional ``margin`` (a finite number; on every row or on none). Other keys are ignored.
A row is invalid on: missing field, wrong type, empty/whitespace-only text, chosen == rejected, a NaN/inf
margin, a message without role/content, or no prompt/response split. By default the first invalid row raises
one `RlhfkitError` naming file, 1-based row and field (and counting the other invalid rows); with
``skip_invalid=True`` invalid rows are skipped, logged, and listed in the result's ``skipped``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Iterable, Optional, Union

from rlhfkit.data.prompts import Message, Prompt, check_finite, check_messages, check_prompt, check_text, require
from rlhfkit.data.sources import DataSource, rows_of
from rlhfkit.errors import RlhfkitError, data_error

logger = logging.getLogger(__name__)

Response = Union[str, list[Message]]
HH_BOUNDARY = "\n\nAssistant:"
FORMATS = {
    "explicit": "explicit (prompt, chosen, rejected: texts)",
    "implicit": "implicit prompt (chosen, rejected: whole '\\n\\nHuman: ...\\n\\nAssistant: ...' dialogues, "
                "as in Anthropic HH)",
    "conversational": "conversational (chosen, rejected: lists of {role, content} messages; optional prompt)",
}


@dataclass(frozen=True)
class PreferenceExample:
    """One validated preference pair. ``row`` is the 1-based source row (for messages; not compared)."""

    prompt: Prompt
    chosen: Response
    rejected: Response
    margin: Optional[float] = None
    row: Optional[int] = field(default=None, compare=False)


class ExampleList(list):
    """A list of examples plus ``skipped``: one message (file, row, field, problem) per skipped row."""

    def __init__(self, items: Iterable = (), skipped: list[str] | None = None) -> None:
        super().__init__(items)
        self.skipped: list[str] = list(skipped or [])


def detect_format(row: dict[str, Any], source: Any = None) -> str:
    """The preference format of a row, from its keys and the types of ``chosen``/``rejected``."""
    if "chosen" in row and "rejected" in row:
        if isinstance(row["chosen"], list):
            return "conversational"
        return "explicit" if "prompt" in row else "implicit"
    raise data_error(source, 1, None, f"unknown preference format: found keys [{', '.join(sorted(row))}]; "
                                      "accepted formats: " + "; ".join(FORMATS.values()))


def split_dialogue(chosen: str, rejected: str, source: Any, row: int) -> tuple[str, str, str]:
    """Split two HH dialogues into (prompt, chosen remainder, rejected remainder).

    The prompt is the longest common prefix of ``chosen`` and ``rejected`` that ends with ``"\\n\\nAssistant:"``.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_BOUNDARY)
    if cut < 0:
        raise data_error(source, row, "chosen", "no common '\\n\\nAssistant:' turn in chosen and rejected, so the "
                                                "prompt cannot be split off (implicit-prompt format)")
    cut += len(HH_BOUNDARY)
    prompt, chosen_rest, rejected_rest = chosen[:cut], chosen[cut:], rejected[cut:]
    for name, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
        if not rest.strip():
            raise data_error(source, row, name, "empty response after the prompt (nothing follows the final "
                                                "common '\\n\\nAssistant:')")
    return prompt, chosen_rest, rejected_rest


def _split_conversation(row: dict[str, Any], has_prompt: bool, source: Any, i: int
                        ) -> tuple[list[Message], list[Message], list[Message]]:
    chosen = check_messages(require(row, "chosen", source, i), source, i, "chosen")
    rejected = check_messages(require(row, "rejected", source, i), source, i, "rejected")
    if chosen == rejected:
        raise data_error(source, i, "rejected", "identical to 'chosen'")
    if has_prompt:
        prompt_value = require(row, "prompt", source, i)
        prompt = check_prompt(prompt_value, source, i, "prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt:
            chosen, rejected = chosen[n:], rejected[n:]
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise data_error(source, i, "chosen", "chosen and rejected share no leading messages, so there is "
                                                  "no prompt; add a 'prompt' field")
    for name, rest in (("chosen", chosen), ("rejected", rejected)):
        if not rest:
            raise data_error(source, i, name, "no response: nothing follows the prompt messages")
        roles = [m["role"] for m in rest]
        if any(r != "assistant" for r in roles):
            raise data_error(source, i, name, f"after the prompt, the response must be assistant message(s); "
                                              f"got roles {roles}")
    return prompt, chosen, rejected


def _parse_row(row: dict[str, Any], fmt: str, first: dict[str, Any], source: Any, i: int) -> PreferenceExample:
    has_prompt = "prompt" in first
    if "prompt" in row and not has_prompt:
        raise data_error(source, i, "prompt", f"row 1 has no 'prompt' ({FORMATS[fmt]}) but this row has one; "
                                              "every row must use the same format")
    if fmt == "conversational":
        prompt, chosen, rejected = _split_conversation(row, has_prompt, source, i)
    else:
        for name in ("chosen", "rejected"):
            value = require(row, name, source, i)
            if isinstance(value, list):
                raise data_error(source, i, name, f"a list of messages, but row 1 is in the {FORMATS[fmt]} "
                                                  "format; every row must use the same format")
            check_text(value, source, i, name)
        chosen, rejected = row["chosen"], row["rejected"]
        if chosen == rejected:
            raise data_error(source, i, "rejected", "identical to 'chosen'")
        if fmt == "explicit":
            prompt = check_prompt(require(row, "prompt", source, i), source, i, "prompt")
        else:
            prompt, chosen, rejected = split_dialogue(chosen, rejected, source, i)
    if chosen == rejected:
        raise data_error(source, i, "rejected", "identical to 'chosen'")
    margin = None
    if "margin" in first:
        margin = check_finite(require(row, "margin", source, i), source, i, "margin")
    elif "margin" in row:
        raise data_error(source, i, "margin", "this row has a margin but row 1 has none; give a margin on every "
                                              "row or on none")
    return PreferenceExample(prompt, chosen, rejected, margin, row=i)


def parse_preferences(rows: list[dict[str, Any]], source: Any = None, skip_invalid: bool = False) -> ExampleList:
    """Validate in-memory rows (see the module docstring) and return the examples.

    ``source`` names the rows in messages (a path, or any label). Strict by default: all rows are checked,
    then the first invalid one raises (the message counts the others). With ``skip_invalid=True`` the valid
    rows are returned and ``result.skipped`` lists why each other row was skipped.
    """
    if not rows:
        raise data_error(source, None, None, "no rows")
    fmt = detect_format(rows[0], source)
    examples, errors, bad_rows = [], [], []
    for i, row in enumerate(rows, start=1):
        try:
            examples.append(_parse_row(row, fmt, rows[0], source, i))
        except RlhfkitError as e:
            errors.append(str(e))
            bad_rows.append(i)
    if errors and not skip_invalid:
        more = ""
        if len(errors) > 1:
            listed = ", ".join(map(str, bad_rows[1:11])) + (", ..." if len(bad_rows) > 11 else "")
            more = f" (and {len(errors) - 1} more invalid row(s): {listed}; pass skip_invalid=True to skip them)"
        raise RlhfkitError(errors[0] + more)
    if not examples:
        raise data_error(source, None, None, f"every row is invalid; the first: {errors[0]}")
    if errors:
        logger.warning("skipped %d invalid row(s) of %d in %s; first: %s", len(errors), len(rows), source, errors[0])
    return ExampleList(examples, errors)


def load_preferences(path: str | PathLike | DataSource, split: str | None = None, skip_invalid: bool = False,
                     name: str = "data") -> ExampleList:
    """Read ``path`` (any format of :func:`rlhfkit.data.sources.read_rows`), or take in-memory rows (a list of
    dicts or a ``datasets.Dataset``, errors naming them ``name``; `rlhfkit.data.sources.rows_of`), and validate
    them as preference pairs."""
    rows, source = rows_of(path, name, split)
    return parse_preferences(rows, source, skip_invalid=skip_invalid)
