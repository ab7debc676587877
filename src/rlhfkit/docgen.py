"""Keep the configuration tables of ``docs/`` in sync with the config dataclasses.

The dataclasses (``RMTrainConfig``, ``RMEvalConfig``, ``ScoreConfig``, ``PPOConfig``) are the single source of
truth for every knob: its flag, type, default and help text. A docs page marks where a class's table goes::

    <!-- knobs:PPOConfig -->
    (generated table; do not edit by hand)
    <!-- /knobs:PPOConfig -->

`update_docs` rewrites every such region with `knob_table` of the named class. Run it as::

    python -m rlhfkit.docgen            # rewrite the tables of docs/*.md in the repository
    python -m rlhfkit.docgen --check    # exit 1 and list the stale tables, write nothing

A page's metric tables sit between ``<!-- metrics -->`` and ``<!-- /metrics -->``; `documented_metrics` reads the
metric names listed there (the first cell of each table row), so a test can compare them with the names the
trainers log.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence

# Classes whose tables may appear in docs pages: name -> "module:attribute".
CONFIG_CLASSES: dict[str, str] = {
    "RMTrainConfig": "rlhfkit.train.rm_config:RMTrainConfig",
    "RMEvalConfig": "rlhfkit.train.rm_config:RMEvalConfig",
    "ScoreConfig": "rlhfkit.train.rm_config:ScoreConfig",
    "PPOConfig": "rlhfkit.train.ppo_config:PPOConfig",
}
DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"
PAGES = ("reward_modeling.md", "ppo.md")

_KNOBS = re.compile(r"<!-- knobs:(?P<name>\w+) -->\n(?P<body>.*?)<!-- /knobs:(?P=name) -->", re.S)
_OPEN = re.compile(r"<!-- knobs:(\w+) -->")
_METRICS = re.compile(r"<!-- metrics -->\n(.*?)<!-- /metrics -->", re.S)
_ROW_NAMES = re.compile(r"`([A-Za-z0-9_]+/(?:[A-Za-z0-9_]+|<[a-z_]+>))`")  # `ns/name` or `ns/<placeholder>`


def config_class(name: str) -> type:
    """The dataclass registered under ``name`` in `CONFIG_CLASSES` (ValueError for an unknown name)."""
    if name not in CONFIG_CLASSES:
        raise ValueError(f"unknown config class {name!r} in a knobs marker; known: {sorted(CONFIG_CLASSES)}")
    module, attr = CONFIG_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), attr)


# ----------------------------------------------------------------------------------------------------------
# One table
# ----------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    """``Optional[X]`` -> ``X`` (the default column shows None), ``list[str]`` -> ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.metadata.get("required"):  # required on the command line; the Python API may give it as an object
        return "required"
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    return f"`{value}`"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _flag(f: dataclasses.Field, tp: Any) -> str:
    flag = f"`--{f.name}`"
    if tp is bool and f.default is True:  # HfArgumentParser adds the negative form for True booleans
        flag += f" / `--no_{f.name}`"
    return flag


def knob_table(cls: type) -> str:
    """Markdown table of a config dataclass: flag, type, default and help of every field, in field order.

    ``Optional[X]`` shows as ``X`` with default ``None``; a field's ``choices`` metadata is listed with its type;
    a field without a default says "required". Raises ValueError for a field without ``metadata["help"]``.
    """
    hints = typing.get_type_hints(cls)
    rows = ["| flag | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help")
        if not help_text:
            raise ValueError(f"{cls.__name__}.{f.name} has no metadata['help']; every knob must be documented")
        tp = hints[f.name]
        type_text = _type_name(tp)
        if f.metadata.get("choices"):
            type_text += ": " + ", ".join(f"`{c}`" for c in f.metadata["choices"])
        rows.append(f"| {_flag(f, tp)} | {_cell(type_text)} | {_cell(_default(f))} | {_cell(help_text)} |")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Pages
# ----------------------------------------------------------------------------------------------------------
def knob_regions(text: str) -> list[tuple[str, str]]:
    """``(class name, region body)`` of every knobs region of a page, in order.

    Raises ValueError when an opening marker has no matching closing marker.
    """
    regions = [(m.group("name"), m.group("body")) for m in _KNOBS.finditer(text)]
    opened = _OPEN.findall(text)
    if len(opened) != len(regions):
        closed = {name for name, _ in regions}
        bad = sorted(set(opened) - closed) or opened
        raise ValueError(f"unbalanced knobs markers for {bad}: each <!-- knobs:X --> needs a <!-- /knobs:X -->")
    return regions


def render_page(text: str) -> str:
    """The page with every knobs region replaced by the freshly generated table of its class."""
    knob_regions(text)  # validates the markers
    return _KNOBS.sub(lambda m: f"<!-- knobs:{m.group('name')} -->\n{knob_table(config_class(m.group('name')))}"
                                f"<!-- /knobs:{m.group('name')} -->", text)


def stale_regions(text: str) -> list[str]:
    """Names of the classes whose region in ``text`` differs from the generated table."""
    return [name for name, body in knob_regions(text) if body != knob_table(config_class(name))]


def update_docs(paths: Iterable[str | Path], check: bool = False) -> list[str]:
    """Rewrite the knobs regions of the given pages (only pages that change are written).

    Returns ``"PATH: ClassName"`` for every region that was stale (and, unless ``check``, is now rewritten).
    With ``check=True`` nothing is written.
    """
    stale: list[str] = []
    for path in map(Path, paths):
        text = path.read_text()
        names = stale_regions(text)
        stale += [f"{path}: {name}" for name in names]
        if names and not check:
            path.write_text(render_page(text))
    return stale


def documented_metrics(text: str) -> set[str]:
    """Metric names (``namespace/name``, or ``namespace/<placeholder>`` for a family of names) in the first cell
    of the table rows inside the page's metrics regions."""
    names: set[str] = set()
    for region in _METRICS.findall(text):
        for line in region.splitlines():
            if line.startswith("|") and not line.startswith("|---"):
                first_cell = line.split(" | ")[0]
                names.update(_ROW_NAMES.findall(first_cell))
    return names


def default_pages() -> list[Path]:
    """The repository's docs pages that carry knob tables."""
    return [DOCS_DIR / name for name in PAGES]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhfkit.docgen",
                                     description="Regenerate the config tables of the docs pages from the dataclasses")
    parser.add_argument("--check", action="store_true", help="list stale tables and exit 1; write nothing")
    parser.add_argument("pages", nargs="*", help=f"pages to process (default: {', '.join(PAGES)} in {DOCS_DIR})")
    args = parser.parse_args(argv)
    pages = [Path(p) for p in args.pages] or default_pages()
    missing = [str(p) for p in pages if not p.is_file()]
    if missing:
        print(f"docgen: page(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        stale = update_docs(pages, check=args.check)
    except ValueError as e:
        print(f"docgen: {e}", file=sys.stderr)
        return 2
    if args.check:
        if stale:
            print("stale config tables (run `python -m rlhfkit.docgen`):\n  " + "\n  ".join(stale))
            return 1
        print("config tables are up to date")
        return 0
    print("rewrote: " + ", ".join(stale) if stale else "config tables already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
