"""The one project exception for user errors (bad data, bad config, missing files).

The CLI prints its message without a traceback and exits non-zero. Messages must be actionable and,
for data problems, name the file, the row (1-based) and the field.
"""

from __future__ import annotations

from os import PathLike

TYPE_CHECKING = False  # (the typing module is not imported: `import rlhfkit` stays light)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable


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


def user_exception(error: BaseException) -> str:
    """``"ValueError: text (at file.py:12, in fn)"``: a user function's exception and the line that raised it (for
    the errors of user code the trainers call: reward functions, callbacks)."""
    import traceback
    from pathlib import Path

    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def function_name(fn: Callable[..., Any]) -> str:
    """A user callable's name for messages and metric names: ``__qualname__`` (else ``__name__``, else its type's)."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
