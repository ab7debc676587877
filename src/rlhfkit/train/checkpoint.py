"""Checkpoints written atomically and found again for ``--resume``; the one on-disk format of both trainers.

Layout: ``OUTPUT/checkpoints/step-00000012/`` (one folder per saved step) and ``OUTPUT/checkpoints/latest``
(a text file naming the newest complete folder). A folder is built under a temporary name and renamed into
place in one step, and `latest` is replaced atomically after it, so a kill at any moment leaves the previous
checkpoint intact and `latest` pointing at a complete folder.

Format (``FORMAT_VERSION`` 2, named in the folder's ``checkpoint.json``): trainable weights as safetensors, and
every other state (optimizers, schedules, trainer state, RNG) by `save_state` as a JSON file of its plain values
plus one safetensors file of its tensors; nothing is pickled, so loading runs no code. `check_format` refuses,
with an `RlhfkitError` saying so, a checkpoint of the earlier format (torch ``.pt`` state files; rlhfkit before
the run layer): such a run resumes only with the rlhfkit version that wrote it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.utils import atomic_dir, atomic_write_text

_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoints_root(output_dir: Path | str) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: Path | str, step: int, write: Callable[[Path], None], keep_last: int = 2) -> Path:
    """Call ``write(tmp_folder)`` and atomically publish the folder as checkpoint `step`.

    Older checkpoints beyond the newest `keep_last` are deleted after the new one is published.
    """
    root = checkpoints_root(output_dir)
    final = root / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        write(tmp)
    atomic_write_text(root / "latest", final.name + "\n")
    if keep_last > 0:
        steps = sorted(_list_steps(root))
        for s in steps[:-keep_last]:
            shutil.rmtree(root / f"step-{s:08d}", ignore_errors=True)
    return final


def _list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]


def find_latest_checkpoint(output_dir: Path | str) -> Path | None:
    """The newest complete checkpoint folder under `output_dir`, or None when there is none."""
    root = checkpoints_root(output_dir)
    latest = root / "latest"
    if latest.is_file():
        cand = root / latest.read_text().strip()
        if cand.is_dir():
            return cand
    steps = _list_steps(root)
    return root / f"step-{max(steps):08d}" if steps else None


def require_latest_checkpoint(output_dir: Path | str) -> Path:
    ckpt = find_latest_checkpoint(output_dir)
    if ckpt is None:
        raise RlhfkitError(f"--resume: no checkpoint found under {checkpoints_root(output_dir)}")
    return ckpt


def checkpoint_step(ckpt: Path) -> int:
    m = _STEP_RE.match(Path(ckpt).name)
    if not m:
        raise RlhfkitError(f"{ckpt}: not a checkpoint folder (expected step-NNNNNNNN)")
    return int(m.group(1))


FORMAT_VERSION = 2
INFO_FILE = "checkpoint.json"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON value for ``obj``: tensors become ``{"__tensor__": key}`` (stored in ``tensors``), tuples
    ``{"__tuple__": [...]}``, dicts with keys other than strings (optimizer states are keyed by int)
    ``{"__items__": [[key, value], ...]}``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"save_state: cannot store a {type(obj).__name__} (tensors and plain values only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(x, tensors) for x in obj[_TUPLE])
        if _ITEMS in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _tensor_file(path: Path) -> Path:
    return path.with_name(path.stem + ".safetensors")


def save_state(path: Path | str, obj: Any) -> None:
    """Save a state (nested dicts, lists and tuples of tensors and plain values, e.g. an optimizer's
    ``state_dict()``): its plain values as JSON at ``path``, its tensors in ``<stem>.safetensors`` beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(_encode(obj, tensors))
    if tensors:
        save_file(tensors, str(_tensor_file(path)))
    path.write_text(text + "\n")


def load_state(path: Path | str) -> Any:
    """Load a state saved by `save_state` (tensors on the CPU)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise RlhfkitError(f"{p}: checkpoint file missing (the checkpoint folder is incomplete)")
    try:
        encoded = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RlhfkitError(f"{p}: not a state file of this rlhfkit version (JSON); a checkpoint of an older format "
                           f"resumes only with the rlhfkit version that wrote it") from None
    tensor_path = _tensor_file(p)
    tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
    try:
        return _decode(encoded, tensors)
    except KeyError:
        raise RlhfkitError(f"{tensor_path}: checkpoint file missing or incomplete") from None


def write_info(folder: Path, **info: Any) -> None:
    """``checkpoint.json``: the format version and what the trainer records about the checkpoint."""
    (Path(folder) / INFO_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **info}, indent=2) + "\n")


def check_format(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``checkpoint.json``; an `RlhfkitError` for a checkpoint of another format."""
    ckpt = Path(ckpt)
    info_path = ckpt / INFO_FILE
    if not info_path.is_file():
        if any(ckpt.glob("*.pt")):
            raise RlhfkitError(f"{ckpt}: a checkpoint of an older rlhfkit format (torch .pt state files, before "
                               f"format {FORMAT_VERSION}); resume it with the rlhfkit version that wrote it, or start "
                               f"a new run")
        raise RlhfkitError(f"{info_path}: checkpoint file missing (the checkpoint folder is incomplete)")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT_VERSION:
        raise RlhfkitError(f"{ckpt}: checkpoint format {info.get('format')!r}, this rlhfkit reads format "
                           f"{FORMAT_VERSION}; resume it with the rlhfkit version that wrote it, or start a new run")
    return info


def save_weights(path: Path | str, model: nn.Module) -> None:
    """The trainable parameters of ``model`` by name, as safetensors."""
    from safetensors.torch import save_file

    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(path))


def load_weights(path: Path | str, model: nn.Module, what: str) -> None:
    """Copy the tensors of ``path`` into the trainable parameters of ``model`` (names and shapes must match)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RlhfkitError(f"{path}: checkpoint file missing (the checkpoint folder is incomplete)")
    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise RlhfkitError(f"{path}: the saved {what} weights do not match the model (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}); resume with the same model and LoRA / freezing settings")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise RlhfkitError(f"{path}: {what} parameter {name} has shape {tuple(saved[name].shape)}, the "
                                   f"model {tuple(param.shape)}")
            param.copy_(saved[name].to(param.device, param.dtype))


# ----------------------------------------------------------------------------------------------------------
# A trainer's checkpoint: weights, state, per-process RNG, config (the layout both trainers write)
# ----------------------------------------------------------------------------------------------------------
STATE_FILE = "trainer_state.json"


def rank_file(rank: int) -> str:
    return f"rng-rank{rank}.json"


def checkpoint_writer(procs: Any, step: int, *, command: str, models: dict[str, nn.Module], state: dict[str, Any],
                      rank_state: dict[str, Any], config: Any) -> Callable[[Path], None]:
    """The folder writer of checkpoint ``step`` for `save_checkpoint` (collective: every process calls it, with its
    own ``rank_state``; only process 0 then calls `save_checkpoint` with it).

    The folder holds ``checkpoint.json`` (format, ``command``, step, process count), ``<name>.safetensors``: the
    trainable weights of each of ``models``, ``trainer_state.json`` (+ ``.safetensors``): the trainer's
    ``state_dict()`` (optimizers, schedules, positions, ...), ``rng-rank<r>.json`` (+ ``.safetensors``): each
    process's ``rank_state`` (RNG states), and ``config.yaml``: the run's configuration.
    """
    import yaml

    from rlhfkit.config import config_to_dict

    rank_states = procs.gather_object(rank_state)
    sharded = any_sharded(models)

    def write(folder: Path) -> None:
        for name, model in models.items():
            if not sharded:  # sharded: the weights are in the DCP folder (`save_training_checkpoint`)
                save_weights(folder / f"{name}.safetensors", model)
        save_state(folder / STATE_FILE, state)
        for rank, s in enumerate(rank_states):
            save_state(folder / rank_file(rank), s)
        (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        write_info(folder, command=command, step=step, num_processes=procs.world_size, sharded=sharded)

    return write


def any_sharded(models: dict[str, nn.Module]) -> bool:
    from rlhfkit.train.engine.sharding import is_sharded

    return any(is_sharded(m) for m in models.values())


def save_training_checkpoint(procs: Any, output: Path | str, step: int, keep_last: int, *, command: str,
                             models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer | None],
                             state: dict[str, Any], rank_state: dict[str, Any], config: Any) -> None:
    """Collective: write checkpoint ``step`` of a trainer (`checkpoint_writer`'s layout) and publish it atomically.

    With sharded models (``--fsdp``) the trainable weights of ``models`` and the states of ``optimizers`` go, by
    parameter name, into the folder's ``sharded/`` DCP checkpoint (`engine.sharding.save_sharded`: every process
    writes its shards into the temporary folder that process 0 created, then process 0 writes the rest and
    renames it into place); ``state`` then holds `engine.sharding.OPTIMIZER_IN_DCP` for those optimizers."""
    from rlhfkit.train.engine.sharding import DCP_FOLDER, save_sharded

    write = checkpoint_writer(procs, step, command=command, models=models, state=state, rank_state=rank_state,
                              config=config)
    if not any_sharded(models):
        if procs.is_main:
            save_checkpoint(output, step, write, keep_last)
        procs.barrier()
        return
    opts = {name: opt for name, opt in optimizers.items() if opt is not None}
    if procs.is_main:
        def write_all(folder: Path) -> None:
            procs.gather_object(str(folder))  # the temporary folder's name, to every process
            save_sharded(folder / DCP_FOLDER, models, opts)
            procs.barrier()
            write(folder)

        save_checkpoint(output, step, write_all, keep_last)
    else:
        folder = Path(procs.gather_object(None)[0])
        save_sharded(folder / DCP_FOLDER, models, opts)
        procs.barrier()
    procs.barrier()


def read_training_checkpoint(procs: Any, ckpt: Path, command: str, models: dict[str, nn.Module],
                             same_processes: bool = True,
                             optimizers: dict[str, torch.optim.Optimizer | None] | None = None
                             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Load what `save_training_checkpoint` saved: the weights into ``models`` (sharded models: also the states of
    ``optimizers``, from the DCP folder, collective); returns ``(info, state, this process's rank state)``.
    ``same_processes``: refuse a checkpoint written by another number of processes (else a process without a saved
    rank state takes process 0's)."""
    ckpt = Path(ckpt)
    info = check_format(ckpt)
    if info.get("command") != command:
        raise RlhfkitError(f"{ckpt}: a checkpoint of `rlhfkit {info.get('command')}`, not of `rlhfkit {command}`")
    saved_procs = int(info["num_processes"])
    if same_processes and saved_procs != procs.world_size:
        raise RlhfkitError(f"--resume: the checkpoint was written by {saved_procs} processes, this run has "
                           f"{procs.world_size}; resume with the same number of processes")
    sharded = any_sharded(models)
    if bool(info.get("sharded", False)) != sharded:
        raise RlhfkitError(f"--resume: the checkpoint {ckpt} was written {'with' if info.get('sharded') else 'without'}"
                           f" --fsdp (on several processes); resume it {'with' if info.get('sharded') else 'without'}"
                           f" --fsdp and more than one process")
    if sharded:  # weights and optimizer states by name, resharded to this run's processes
        from rlhfkit.train.engine.sharding import DCP_FOLDER, load_sharded

        load_sharded(ckpt / DCP_FOLDER, models, {k: v for k, v in (optimizers or {}).items() if v is not None})
    else:
        for name, model in models.items():
            load_weights(ckpt / f"{name}.safetensors", model, name)
    state = load_state(ckpt / STATE_FILE)
    rank_state = load_state(ckpt / rank_file(procs.rank if procs.rank < saved_procs else 0))
    return info, state, rank_state


# settings whose unset value the trainer resolves from the machine or the run (``bf16``: the device,
# `utils.resolve_bf16`; ``old_logprobs``: the precision and the engine, `ppo_config.resolve_old_logprobs`), with
# that unset value: config.yaml records the resolved one, and a resumed run that leaves them unset takes it
UNSET_SETTINGS: dict[str, Any] = {"bf16": None, "old_logprobs": "auto"}


def adopt_saved_settings(cfg: Any, saved: dict[str, Any]) -> None:
    """Set each `UNSET_SETTINGS` field that ``cfg`` has and leaves unset to its value in ``saved`` (a checkpoint's
    config.yaml), where that records one."""
    for name, unset in UNSET_SETTINGS.items():
        if name in saved and hasattr(cfg, name) and getattr(cfg, name) == unset:
            setattr(cfg, name, saved[name])


def take_saved_settings(cfg: Any) -> None:
    """``--resume``: before a trainer resolves its unset settings, let them take the latest checkpoint's resolved
    values (`adopt_saved_settings`), so that a run resumed on another machine continues as it ran. Nothing when
    ``cfg`` does not resume or no checkpoint with a config.yaml exists (the resume check then names what is
    missing)."""
    import yaml

    if not getattr(cfg, "resume", False):
        return
    ckpt = find_latest_checkpoint(cfg.output)
    if ckpt is not None and (ckpt / "config.yaml").is_file():
        adopt_saved_settings(cfg, yaml.safe_load((ckpt / "config.yaml").read_text()) or {})


def check_resume_settings(cfg: Any, ckpt: Path, may_change: Any) -> dict[str, Any]:
    """The checkpoint's saved configuration (``config.yaml``); an `RlhfkitError` naming every setting that differs
    from ``cfg`` (old and new values), except those in ``may_change`` (`config.changed_settings`). A setting of
    `UNSET_SETTINGS` left unset takes the saved, resolved value (`take_saved_settings`): a resumed run continues
    at its checkpoint's precision and old log-probs."""
    import yaml

    from rlhfkit.config import changed_settings, config_to_dict

    path = Path(ckpt) / "config.yaml"
    if not path.is_file():
        raise RlhfkitError(f"{path}: checkpoint file missing (the checkpoint folder is incomplete)")
    saved = yaml.safe_load(path.read_text()) or {}
    adopt_saved_settings(cfg, saved)
    changed = changed_settings(cfg, saved, may_change)
    if changed:
        now = config_to_dict(cfg)
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:6])
        raise RlhfkitError(f"--resume: the configuration differs from the checkpoint's ({detail}); resume with "
                           f"the same settings (only {', '.join(sorted(may_change))} may change)")
    return saved
