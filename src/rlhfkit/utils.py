"""Small shared utilities: atomic writes, metric logging (JSONL + TensorBoard), seeding and RNG state."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from rlhfkit.errors import RlhfkitError, function_name, user_exception


# ----------------------------------------------------------------------------------------------------------
# Atomic writes: a reader (or a resumed run) never sees a half-written file or folder.
# ----------------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a published file gets the usual permissions
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Atomically write `obj` as pretty JSON (non-finite floats become null)."""
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


@contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    If the body raises (or the process is killed), `final` is untouched and the temporary folder is removed
    (or left as ``.name.tmp-*``, which readers ignore). An existing `final` is moved aside first and deleted
    after the rename, so at every instant either the old or the new complete folder exists under a known name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Convert tensors / numpy scalars / paths to plain JSON values; NaN and inf become None."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().tolist() if obj.numel() != 1 else obj.item()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_jsonl(path: Path | str) -> list[dict]:
    """Read a JSONL file written by this project (no validation: use rlhfkit.data for user files)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Metrics: one JSONL line per logging step plus TensorBoard scalars.
# ----------------------------------------------------------------------------------------------------------
class MetricsLogger:
    """Log namespaced scalar metrics (``objective/kl``, ``loss/policy``, ...) to JSONL and TensorBoard.

    `jsonl_path` receives ``{"step": n, **metrics}`` per call. On resume, pass ``resume_step``: lines with a
    step > resume_step (written after the checkpoint being resumed) are dropped, so the file equals that of
    an uninterrupted run. Non-main processes should pass ``enabled=False``.

    ``callbacks`` (the Python API's): each is called as ``callback(step, metrics)`` after the row is written, with a
    fresh dict of the row's metrics (plain numbers, ``step`` left out), on the main process only. A callback that
    raises stops the run: an `RlhfkitError` naming the callback, the step and its exception (the rows written so far
    stay, as after an interrupted run).
    """

    def __init__(self, jsonl_path: Path | str, tensorboard_dir: Path | str | None = None,
                 enabled: bool = True, resume_step: int | None = None,
                 callbacks: Sequence[Callable[[int, dict[str, Any]], Any]] = ()):
        self.enabled = enabled
        self.jsonl_path = Path(jsonl_path)
        self.callbacks = list(callbacks)
        self._tb = None
        if not enabled:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.jsonl_path.write_text("")
        elif self.jsonl_path.exists():
            kept = [r for r in read_jsonl(self.jsonl_path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **to_jsonable(dict(metrics))}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        for callback in self.callbacks:
            try:
                callback(step, {k: v for k, v in row.items() if k != "step"})
            except Exception as e:  # noqa: BLE001 - the user's callback failed: name it and its own error
                raise RlhfkitError(f"callback {function_name(callback)!r} raised at step {step}: {user_exception(e)}; the run was "
                                   "stopped") from e

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


# ----------------------------------------------------------------------------------------------------------
# Seeding and RNG state (for exact resume)
# ----------------------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Capture the global RNG states (python, numpy, torch CPU and CUDA)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Only tensors and plain python values, so that `train.checkpoint.save_state` stores it (JSON + safetensors).
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states captured by `rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def progress(iterable=None, total: int | None = None, desc: str = "", enabled: bool = True, **kw):
    """A tqdm progress bar (disabled on non-main processes or when `enabled` is False)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------------------------------------
# bfloat16: native or emulated on this device
# ----------------------------------------------------------------------------------------------------------
# CPU flags (Linux /proc/cpuinfo spelling) of instructions that compute bf16 matrix products natively. Measured
# on the project's machines (2 cores, torch 2.13): an Intel Xeon with AMX, bf16 GEMM ~2100 GFLOP/s vs fp32 ~340
# (6x faster); an Intel Xeon with AVX-512 but no bf16 instructions, bf16 slower than fp32; an AMD EPYC Zen 2
# (AVX2 only), bf16 ~0.3 GFLOP/s vs fp32 ~128 (~400x slower).
_BF16_MATRIX_FLAGS = ("amx_bf16",)           # tile units: bf16 much faster than fp32
_BF16_VECTOR_FLAGS = ("avx512_bf16", "bf16")  # bf16 dot products (x86 AVX512_BF16, Arm FEAT_BF16): no emulation


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``getrusage``'s ``ru_maxrss``: KiB on Linux, bytes on
    macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of this machine (``flags`` on x86, ``Features`` on Arm, from ``/proc/cpuinfo``; empty
    where that file does not exist). ``cpuinfo`` replaces the file's text (for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def bf16_speed(device: torch.device | str, flags: set[str] | None = None) -> str:
    """How bfloat16 matrix products run on ``device``: ``"fast"`` (faster than float32: a CUDA device that supports
    bf16, a CPU with AMX-BF16), ``"native"`` (bf16 instructions, not known to beat float32: AVX512_BF16 or Arm
    BF16 without AMX), ``"slow"`` (emulated: much slower than float32, e.g. ~400x on an AVX2-only AMD EPYC), or
    ``"unknown"`` (another device type). ``flags`` replaces this machine's CPU flags (for tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "fast" if torch.cuda.is_bf16_supported() else "slow"
    if device.type != "cpu":
        return "unknown"
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in _BF16_MATRIX_FLAGS):
        return "fast"
    if any(f in flags for f in _BF16_VECTOR_FLAGS):
        return "native"
    return "slow"


def auto_bf16(device: torch.device | str) -> bool:
    """The default precision (``--bf16`` unset; the quickstart's ``--precision auto``): bf16 autocast on a device
    whose bf16 is fast (`bf16_speed`) other than a CPU, i.e. a CUDA GPU with bf16; float32 on a CPU, also one with
    AMX, where bf16 is faster but not yet shown to train as well (see `quickstart.pipeline.use_bf16`)."""
    device = torch.device(device)
    return device.type != "cpu" and bf16_speed(device) == "fast"


def resolve_bf16(flag: bool | None, device: torch.device | str) -> bool:
    """``--bf16`` as given (True / False), or `auto_bf16` of ``device`` when it is unset (None)."""
    return auto_bf16(device) if flag is None else bool(flag)


def warn_if_slow_bf16(enabled: bool, device: torch.device | str, what: str,
                      flags: set[str] | None = None) -> bool:
    """Log a warning when ``what`` (e.g. ``"ppo --bf16"``) asks for bf16 autocast on a device that emulates bf16
    (`bf16_speed` ``"slow"``); returns True when it warned. Called by every command that takes ``bf16``."""
    if not enabled or bf16_speed(device, flags) != "slow":
        return False
    logging.getLogger("rlhfkit").warning(
        "%s: bf16 autocast on a %s without bf16 instructions (no AMX-BF16 / AVX512_BF16 / Arm BF16) is emulated "
        "and runs matrix products far slower than float32 (measured ~400x on an AVX2-only AMD EPYC); drop bf16 "
        "to run in float32", what, torch.device(device).type.upper())
    return True


# ----------------------------------------------------------------------------------------------------------
# The C allocator: large tensors reuse freed memory instead of fresh, page-faulted pages.
# ----------------------------------------------------------------------------------------------------------

# glibc ``mallopt`` parameters (malloc.h) and the value set for both: blocks up to 1 GiB come from the heap, and up
# to 1 GiB of freed memory at its top stays mapped for the next ones
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_THRESHOLD_BYTES = 1 << 30
ALLOCATOR_ENV = "RLHFKIT_MALLOC"  # "default": leave the C allocator as it is


def reuse_freed_memory() -> bool:
    """Let large CPU tensors reuse freed memory (glibc): returns True when it changed the allocator.

    PyTorch allocates CPU tensors with the C allocator. glibc serves every block above its mmap threshold (at most
    32 MiB, adjusted as blocks are freed) with a fresh ``mmap`` and unmaps it on free, so each new large tensor of
    the same size touches new pages: the kernel zero-fills and maps every 4 KiB page on first write (a minor page
    fault, about 1 µs each in the VMs measured). Sampling allocates such tensors at every step (a batch's logits,
    441 × 49,152 floats = 87 MB, in a label batch of the quickstart) and every KV-cache buffer per call: a label
    batch took 2.2 million minor faults (8.5 GB of pages). With both glibc thresholds at
    :data:`HEAP_THRESHOLD_BYTES`, blocks up to that size come from the heap and freed ones are reused: 45,000 faults.
    Nothing computed changes (the same kernels on the same values, at other addresses); the process keeps up to that
    much freed memory mapped, and peak memory can be a little higher (a heap fragments where unmapped blocks did
    not: the default quickstart peaked at 7.17 against 6.80 GiB on a 2-core AMX Xeon, and ran 1.045x faster).

    Process-wide and irreversible in effect (the thresholds can be set back, but memory already taken from the heap
    stays there), so the ``rlhfkit`` command calls it once at start and the library never does on import; a
    program using rlhfkit as a library may call it. A no-op (False) outside glibc (macOS, musl, Windows) and when
    the environment variable ``RLHFKIT_MALLOC`` is ``default``.
    """
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() == "default":
        return False
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on a value it refuses
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD_BYTES)) & bool(
        mallopt(_M_TRIM_THRESHOLD, HEAP_THRESHOLD_BYTES))
