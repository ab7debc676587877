"""The one project exception for user errors (bad data, bad config, missing files).

The CLI prints its message without a traceback and exits non-zero. Messages must be actionable and,
for data problems, name the file, the row (1-based) and the field.
"""

from __future__ import annotations

from os import PathLike


class RlhfkitError(Exception):
    """A user-facing error: bad input, bad configuration or a missing file."""


def data_error(path: str | PathLike | None, row: int | None, field: str | None, problem: str) -> RlhfkitError:
    """Build an error naming the file, the 1-based row and the field, e.g.
    ``data.jsonl, row 7, field 'chosen': empty text``."""
    where = []
    if path is not None:
        where.append(str(path))
    if row is not None:
        where.append(f"row {row}")
    if field is not None:
        where.append(f"field {field!r}")
    prefix = ", ".join(where)
    return RlhfkitError(f"{prefix}: {problem}" if prefix else problem)
