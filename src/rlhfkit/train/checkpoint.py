"""Checkpoints written atomically and found again for ``--resume``.

Layout: ``OUTPUT/checkpoints/step-00000012/`` (one folder per saved step) and ``OUTPUT/checkpoints/latest``
(a text file naming the newest complete folder). A folder is built under a temporary name and renamed into
place in one step, and `latest` is replaced atomically after it, so a kill at any moment leaves the previous
checkpoint intact and `latest` pointing at a complete folder. Tensors and states are saved with `torch.save` and
loaded with ``weights_only=True`` (no arbitrary pickle is ever executed); model weights are safetensors.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

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


def save_state(path: Path | str, obj: Any) -> None:
    """Save optimizer/scheduler/RNG states (tensors and plain values only)."""
    torch.save(obj, path)


def load_state(path: Path | str) -> Any:
    """Load a state saved by `save_state`, refusing anything but tensors and plain values."""
    p = Path(path)
    if not p.is_file():
        raise RlhfkitError(f"{p}: checkpoint file missing (the checkpoint folder is incomplete)")
    return torch.load(p, map_location="cpu", weights_only=True)
