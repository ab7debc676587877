"""Configuration: dataclasses are the single source of truth for YAML keys and CLI flags.

Every command has one dataclass config. `parse_config(cls, argv)` builds the command line with transformers'
`HfArgumentParser` (flags ``--learning_rate`` and ``--learning-rate`` both work, booleans accept
``--flag``/``--no-flag``), reads an optional ``--config FILE.yaml`` whose keys are the same field names, and lets
flags override the file. Unknown YAML keys and invalid values are `RlhfkitError`s.

The dataclasses themselves live beside the code that uses them (`rlhfkit.train.rm_config`,
`rlhfkit.train.ppo_config`, ...), so that each command's knobs are documented where they act; `docs/` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from rlhfkit.errors import RlhfkitError, data_error

T = TypeVar("T")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a text"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "texts"}


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]``, else ``(annotation, False)``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def _list_item(annotation: Any) -> Any:
    """The item type of ``list[X]``, else None."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None


def _fits(value: Any, annotation: Any, converted: bool = True) -> bool:
    """True when a YAML value can be a value of the field type ``annotation``. A text fits a number or a boolean
    field too (``converted``): the flag parser converts it as it converts a flag (YAML reads ``1e-4`` as a text),
    and rejects it when it does not convert. Items of a list are not converted."""
    inner, optional = _unwrap_optional(annotation)
    if optional:
        return value is None or _fits(value, inner, converted)
    item = _list_item(annotation)
    if item is not None:
        return isinstance(value, list) and all(_fits(v, item, converted=False) for v in value)
    if annotation not in _KINDS or isinstance(value, str) and (converted or annotation is str):
        return True
    if isinstance(value, bool):
        return annotation is bool
    return isinstance(value, int) and annotation in (int, float) or isinstance(value, float) and annotation is float


def _kind(annotation: Any) -> str:
    inner = _unwrap_optional(annotation)[0]
    item = _list_item(inner)
    if item is not None:
        return f"a list of {_PLURALS.get(item, 'values')}"
    return _KINDS.get(inner, "another value")


def check_types(cls: type, data: dict[str, Any], source: Any) -> dict[str, Any]:
    """``data`` with a single value for a list field taken as a one-item list (``stop_strings: "###"``); a value
    whose type cannot be its field's (a list for a number, a mapping for a list, ...) is an error naming the file
    and the field."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        if key in hints:
            given = value
            is_list = _list_item(_unwrap_optional(hints[key])[0]) is not None
            if is_list and isinstance(value, (str, int, float)):
                value = [value]
            if not _fits(value, hints[key]):
                name = type(given).__name__
                got = "null" if given is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name} {given!r}"
                raise data_error(source, None, key, f"expected {_kind(hints[key])}, got {got}")
        out[key] = value
    return out


def load_yaml(path: str | Path, cls: type | None = None) -> dict[str, Any]:
    """Read a YAML mapping of config keys; with `cls`, reject keys that are not fields of `cls` and values of the
    wrong type (see `check_types`)."""
    p = Path(path)
    if not p.is_file():
        raise RlhfkitError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RlhfkitError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RlhfkitError(f"{p}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    if cls is not None:
        unknown = sorted(set(data) - _field_names(cls))
        if unknown:
            raise RlhfkitError(
                f"{p}: unknown config key(s) {unknown} for {cls.__name__}; valid keys: {sorted(_field_names(cls))}"
            )
        data = check_types(cls, data, p)
    return data


class RaisingParser(argparse.ArgumentParser):
    """An argparse parser whose ``error`` raises RlhfkitError (printed by the CLI as one ``rlhfkit: error:``
    line) instead of printing usage and calling sys.exit(2); ``usage_in_errors`` appends the usage line."""

    usage_in_errors = False

    def error(self, message: str):
        usage = f"\n{self.format_usage().strip()}" if self.usage_in_errors else ""
        raise RlhfkitError(f"{self.prog}: {message}{usage}")


def _bare_optional_bools(parser: argparse.ArgumentParser, cls: type) -> None:
    """A bare ``--flag`` of an ``Optional[bool]`` field (unset = None, e.g. ``--bf16``'s device default) means
    true, as for a plain bool field: HfArgumentParser gives such a field a required value; ``--flag true/false``
    still works."""
    hints = typing.get_type_hints(cls)
    optional_bools = {name for name, hint in hints.items() if _unwrap_optional(hint) == (bool, True)}
    for action in parser._actions:
        if action.dest in optional_bools and action.option_strings:
            action.nargs, action.const = "?", True


class _Parser:
    """HfArgumentParser that raises RlhfkitError instead of exiting on a bad flag."""

    def __init__(self, cls: type, prog: str | None):
        from transformers import HfArgumentParser

        class P(RaisingParser, HfArgumentParser):
            pass

        self.parser = P(cls, prog=prog, description=(cls.__doc__ or "").strip().split("\n")[0])
        _bare_optional_bools(self.parser, cls)
        self.parser.add_argument(
            "--config", type=str, default=None, help="YAML file whose keys are the flags below; flags override it"
        )


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse `argv` (default: sys.argv[1:]) into a `cls` instance, with an optional ``--config FILE.yaml``.

    Precedence: dataclass defaults < YAML file < command-line flags. Required fields (no default) may come
    from either the YAML file or the command line. The instance's ``__post_init__`` validates values.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    parser = _Parser(cls, prog).parser
    if known.config:
        data = load_yaml(known.config, cls)
        parser.set_defaults(**data)
        # A field required by the dataclass but given in the YAML is no longer required on the command line.
        for action in parser._actions:
            if action.dest in data:
                action.required = False
    try:
        # The extra `--config` option comes back as a trailing argparse.Namespace: keep the dataclass only.
        cfg = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)[0]
    except (ValueError, TypeError) as e:
        raise RlhfkitError(f"{prog or cls.__name__}: invalid configuration: {e}") from None
    return cfg


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build a config from a mapping (e.g. a saved run's config.yaml), rejecting unknown keys."""
    unknown = sorted(set(data) - _field_names(cls))
    if unknown:
        raise RlhfkitError(f"{source}: unknown config key(s) {unknown} for {cls.__name__}")
    try:
        return cls(**data)
    except (ValueError, TypeError) as e:
        raise RlhfkitError(f"{source}: invalid configuration: {e}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data dict of a config (for YAML/JSON dumps)."""
    return dataclasses.asdict(cfg)


def field_defaults(cfg: Any) -> dict[str, Any]:
    """Each field's default value (of ``default`` or ``default_factory``) of a config dataclass (class or instance);
    fields without a default are left out."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def changed_settings(cfg: Any, saved: dict[str, Any], may_change: Sequence[str]) -> list[str]:
    """The fields of ``cfg`` whose value differs from the saved run's ``saved`` config dict (the YAML of
    `save_config`), except those in ``may_change``; sorted. A field the saved file lacks (a run written before
    the field existed) counts as having its default value: a new field's default keeps the behaviour of the
    release that did not have it, so such a run resumes while this run keeps that default."""
    now = config_to_dict(cfg)
    defaults = field_defaults(cfg)
    return sorted(k for k in now if k not in may_change and saved.get(k, defaults.get(k)) != now[k])


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config as YAML (keys = fields), so that ``--config`` can replay the run."""
    from rlhfkit.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Validation helper for ``__post_init__``: raise RlhfkitError unless value is one of choices."""
    if value not in choices:
        raise RlhfkitError(f"invalid {name}={value!r}; choose one of {list(choices)}")


def check_range(name: str, value: float | int | None, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, allow_none: bool = False) -> None:
    """Validation helper: lo <= value <= hi (or lo < value when lo_open)."""
    if value is None:
        if allow_none:
            return
        raise RlhfkitError(f"{name} is required")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RlhfkitError(f"invalid {name}={value!r}; must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise RlhfkitError(f"invalid {name}={value!r}; must be <= {hi}")
