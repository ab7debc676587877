"""Read a data file (or a `datasets.save_to_disk` folder), or take in-memory rows, as a list of row dicts.

Supported: ``.json`` (a top-level JSON array of objects; JSON lines written under a ``.json`` name, as
``datasets.Dataset.to_json`` does, are read too), ``.jsonl``, ``.jsonl.gz``, ``.json.gz``, ``.parquet``,
``.csv``, and folders written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Conventions shared by every format, so that the parsers downstream see one shape:

- Rows are numbered from 1 (the n-th object of the file; blank JSON lines are not rows).
- A top-level value that is ``None`` (JSON ``null``, a Parquet/Arrow null, an empty CSV cell) means *missing*:
  the key is left out of the row dict. Nested values (message lists, score dicts) are kept as they are.
- Errors are :class:`rlhfkit.errors.RlhfkitError` naming the file and, where it applies, the row.

In-memory data (the Python API: a list of dicts or a ``datasets.Dataset``) goes through `rows_of`, which applies
the same conventions and names the rows by the argument they came from (``data, row 3, field 'chosen': ...``).
"""

from __future__ import annotations

import gzip
import json
from os import PathLike
from pathlib import Path
from typing import Any, Union

from rlhfkit.errors import data_error

DataSource = Union[str, PathLike, list, tuple, Any]  # a path, a list of row dicts, or a datasets.Dataset

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".csv")
DEFAULT_SPLIT = "train"


def read_rows(path: str | PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Read every row of ``path`` as a dict (see the module docstring for formats and conventions).

    ``split`` selects a split of a ``DatasetDict`` folder (default ``"train"``); giving it for any other
    source is an error, so that a split never gets silently ignored.
    """
    p = Path(path)
    if not p.exists():
        raise data_error(p, None, None, "file not found")
    if p.is_dir():
        rows = _read_saved_dataset(p, split)
    else:
        if split is not None:
            raise data_error(p, None, None, f"split={split!r} was given, but only a DatasetDict folder "
                                            "(written by save_to_disk) has splits; leave split unset")
        rows = _read_file(p)
    if not rows:
        raise data_error(p, None, None, "the file holds no rows")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise data_error(p, i, None, f"expected an object (key/value pairs), got {type(row).__name__}")
    return [_drop_missing(row) for row in rows]


def rows_of(data: DataSource, name: str, split: str | None = None) -> tuple[list[dict[str, Any]], Any]:
    """The rows of ``data`` and the label its errors name: a path (str or ``os.PathLike``, read by `read_rows`,
    labelled by the path), or in-memory rows labelled ``name`` (the argument they were passed as): a list or
    tuple of dicts, or a ``datasets.Dataset`` (its ``to_list()``). In-memory rows follow the files' conventions:
    numbered from 1, a top-level ``None`` is a missing field, a row that is not a dict is an error naming it. A
    ``DatasetDict`` is refused (pass one split, ``ds["train"]``); ``split`` is for paths only."""
    if isinstance(data, (str, PathLike)):
        return read_rows(data, split), data
    if split is not None:
        raise data_error(name, None, None, f"split={split!r} applies to a saved-dataset folder, not to in-memory rows")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(data, datasets.DatasetDict):
        raise data_error(name, None, None, f"a DatasetDict with splits {sorted(data)}; pass one split, e.g. "
                                           f"{name}=ds['train']")
    if datasets is not None and isinstance(data, datasets.Dataset):
        rows = data.to_list()
    elif isinstance(data, (list, tuple)):
        rows = list(data)
    else:
        raise data_error(name, None, None, f"expected a file path, a list of dicts or a datasets.Dataset, got "
                                           f"{type(data).__name__}")
    if not rows:
        raise data_error(name, None, None, "no rows")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise data_error(name, i, None, f"expected a dict (field names to values), got {type(row).__name__}")
    return [_drop_missing(row) for row in rows], name


def _read_file(p: Path) -> list[Any]:
    name = p.name.lower()
    if name.endswith((".jsonl.gz", ".json.gz")):
        text = _read_text(p, compressed=True)
        return _parse_json_lines(p, text) if name.endswith(".jsonl.gz") else _parse_json_document(p, text)
    if name.endswith(".jsonl"):
        return _parse_json_lines(p, _read_text(p, compressed=False))
    if name.endswith(".json"):
        return _parse_json_document(p, _read_text(p, compressed=False))
    if name.endswith(".parquet"):
        return _read_parquet(p)
    if name.endswith(".csv"):
        return _read_csv(p)
    raise data_error(p, None, None, "unknown file type; supported: " + ", ".join(SUPPORTED_EXTENSIONS)
                     + ", or a folder written by datasets' save_to_disk")


def _read_text(p: Path, compressed: bool) -> str:
    try:
        if compressed:
            with gzip.open(p, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = p.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise data_error(p, None, None, f"cannot read the file: {e}") from e
    if not text.strip():
        raise data_error(p, None, None, "the file is empty")
    return text


def _parse_json_lines(p: Path, text: str) -> list[Any]:
    rows: list[Any] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise data_error(p, len(rows) + 1, None, f"malformed JSON on line {line_no}: {e.msg} "
                                                     f"at column {e.colno}") from e
    return rows


def _parse_json_document(p: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{"):
            # One object per line under a .json name (what datasets' to_json writes): read it as JSON lines.
            return _parse_json_lines(p, text)
        raise data_error(p, None, None, f"malformed JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    if not isinstance(data, list):
        raise data_error(p, None, None, f"expected a top-level JSON array of objects (or one object per line), "
                                        f"got a JSON {type(data).__name__}")
    return data


def _read_parquet(p: Path) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise data_error(p, None, None, f"cannot read the Parquet file: {e}") from e


def _read_csv(p: Path) -> list[Any]:
    import pandas as pd

    try:
        # Only an empty cell is missing: texts such as "NA" or "null" stay texts.
        df = pd.read_csv(p, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError as e:
        raise data_error(p, None, None, "the file is empty") from e
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise data_error(p, None, None, f"cannot read the CSV file: {e}") from e
    missing = df.isna()
    for col in df.columns:
        # A numeric column holding the text "nan" is read as text; make it numeric so that validation
        # reports the NaN itself instead of a confusing type error.
        if df[col].dtype.kind not in "biuf":
            numeric = pd.to_numeric(df[col], errors="coerce")
            literal_nan = df[col].astype(str).str.strip().str.lower() == "nan"
            if (numeric.notna() | missing[col] | literal_nan).all():
                df[col] = numeric
    rows = df.to_dict("records")
    for row, miss in zip(rows, missing.to_dict("records")):
        for key, is_missing in miss.items():
            if is_missing:
                row[key] = None
    return rows


def _read_saved_dataset(p: Path, split: str | None) -> list[Any]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise data_error(p, None, None, "a folder must be written by datasets' save_to_disk "
                                        f"(Dataset or DatasetDict); loading it failed: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        name = DEFAULT_SPLIT if split is None else split
        if name not in loaded:
            raise data_error(p, None, None, f"no split {name!r}; available splits: {', '.join(sorted(loaded))}")
        return loaded[name].to_list()
    if split is not None:
        raise data_error(p, None, None, f"split={split!r} was given, but the folder holds a single Dataset "
                                        "without splits; leave split unset")
    return loaded.to_list()


def _drop_missing(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if v is not None}


__all__ = ["read_rows", "rows_of", "DataSource", "SUPPORTED_EXTENSIONS", "DEFAULT_SPLIT"]
