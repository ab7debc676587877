"""PPO prompts, and the field checks shared by every data parser.

A prompt is either a text (``str``) or a conversation: a non-empty list of ``{"role", "content"}`` messages
(both strings, content not blank). Message dicts are normalised to exactly those two keys. A prompt row may also
carry a ``reference`` response text, which a ranker reward source compares each policy response with
(:func:`load_references`).
"""

from __future__ import annotations

import math
from os import PathLike
from typing import Any, Union

from rlhfkit.data.sources import DataSource, rows_of
from rlhfkit.errors import data_error

Message = dict[str, str]
Prompt = Union[str, list[Message]]


# ---- field checks (shared by preference.py and pointwise.py) ---------------------------------------------

def describe_value(value: Any) -> str:
    """A short description of a wrong value for an error message."""
    if isinstance(value, str):
        return f"text {value[:40]!r}" + ("..." if len(value) > 40 else "")
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_text(value: Any, source: Any, row: int, field: str) -> str:
    """Return ``value`` if it is a non-blank string, else raise naming file, row and field."""
    if not isinstance(value, str):
        raise data_error(source, row, field, f"expected text, got {describe_value(value)}")
    if not value.strip():
        raise data_error(source, row, field, "empty or whitespace-only text")
    return value


def check_messages(value: Any, source: Any, row: int, field: str) -> list[Message]:
    """Return ``value`` as a list of ``{"role", "content"}`` dicts, else raise naming file, row and field."""
    if not isinstance(value, list):
        raise data_error(source, row, field, f"expected a list of messages, got {describe_value(value)}")
    if not value:
        raise data_error(source, row, field, "empty list of messages")
    messages = []
    for k, msg in enumerate(value, start=1):
        if not isinstance(msg, dict):
            raise data_error(source, row, field, f"message {k} is not an object with 'role' and 'content' "
                                                 f"(got {describe_value(msg)})")
        for key in ("role", "content"):
            if key not in msg or msg[key] is None:
                raise data_error(source, row, field, f"message {k} has no {key!r}")
            if not isinstance(msg[key], str):
                raise data_error(source, row, field, f"message {k}: {key!r} must be text, "
                                                     f"got {describe_value(msg[key])}")
            if not msg[key].strip():
                raise data_error(source, row, field, f"message {k}: {key!r} is empty or whitespace-only")
        messages.append({"role": msg["role"], "content": msg["content"]})
    return messages


def check_prompt(value: Any, source: Any, row: int, field: str) -> Prompt:
    """A text or a list of messages."""
    if isinstance(value, list):
        return check_messages(value, source, row, field)
    if isinstance(value, str):
        return check_text(value, source, row, field)
    raise data_error(source, row, field, f"expected text or a list of messages, got {describe_value(value)}")


def check_finite(value: Any, source: Any, row: int, field: str) -> float:
    """Return ``value`` as a float if it is a finite int/float (not a bool), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise data_error(source, row, field, f"expected a number, got {describe_value(value)}")
    if not math.isfinite(value):
        raise data_error(source, row, field, f"must be a finite number, got {value}")
    return float(value)


def require(row: dict[str, Any], key: str, source: Any, row_no: int) -> Any:
    """``row[key]``, or an error naming the missing field."""
    if key not in row:
        raise data_error(source, row_no, key, f"missing field (the row has: {', '.join(sorted(row)) or 'nothing'})")
    return row[key]


# ---- prompts for PPO ------------------------------------------------------------------------------------

def parse_prompts(rows: list[dict[str, Any]], source: Any = None) -> list[Prompt]:
    """Validate in-memory rows holding ``prompt`` (text or messages) or ``messages``.

    A ``messages`` row is a conversation; its trailing assistant messages (a reference answer, as chat
    datasets store them) are dropped and the rest is the prompt. A ``prompt`` given as messages must not end
    with an assistant message. The field is chosen from the first row and required on every row.
    """
    if not rows:
        raise data_error(source, None, None, "no rows")
    if "prompt" in rows[0]:
        field = "prompt"
    elif "messages" in rows[0]:
        field = "messages"
    else:
        raise data_error(source, 1, None, "unknown prompt format: found keys "
                         f"[{', '.join(sorted(rows[0]))}]; expected 'prompt' (text or a list of "
                         "{role, content} messages) or 'messages' (a list of messages)")
    prompts: list[Prompt] = []
    for i, row in enumerate(rows, start=1):
        value = require(row, field, source, i)
        if field == "messages":
            messages = check_messages(value, source, i, field)
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if not messages:
                raise data_error(source, i, field, "only assistant messages: no prompt is left")
            prompts.append(messages)
        else:
            prompt = check_prompt(value, source, i, field)
            if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
                raise data_error(source, i, field, "a prompt must not end with an assistant message")
            prompts.append(prompt)
    return prompts


def load_prompts(path: str | PathLike | DataSource, split: str | None = None, name: str = "prompts") -> list[Prompt]:
    """Read and validate PPO prompts from ``path`` (any format of :func:`rlhfkit.data.sources.read_rows`), or from
    in-memory rows (`rlhfkit.data.sources.rows_of`: a list of dicts or a ``datasets.Dataset``; errors name them
    ``name``); in a list, a plain text is the row ``{"prompt": text}``."""
    rows, source = rows_of(_prompt_rows(path), name, split)
    return parse_prompts(rows, source)


def _prompt_rows(path: str | PathLike | DataSource) -> str | PathLike | DataSource:
    """A list's plain texts as ``{"prompt": text}`` rows; anything else as is."""
    if isinstance(path, (list, tuple)):
        return [{"prompt": row} if isinstance(row, str) else row for row in path]
    return path


def parse_references(rows: list[dict[str, Any]], source: Any = None) -> list[str]:
    """The ``reference`` response text of every row (required on each; non-blank text), in row order."""
    if not rows:
        raise data_error(source, None, None, "no rows")
    return [check_text(require(row, "reference", source, i), source, i, "reference")
            for i, row in enumerate(rows, start=1)]


def load_references(path: str | PathLike | DataSource, split: str | None = None, name: str = "prompts") -> list[str]:
    """The reference responses of the PPO prompts ``path`` (a file or in-memory rows, as :func:`load_prompts`
    reads them), one per row (see :func:`parse_references`)."""
    rows, source = rows_of(_prompt_rows(path), name, split)
    return parse_references(rows, source)
