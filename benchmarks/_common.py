"""Shared helpers of the side-by-side benchmarks (rlhfkit vs Hugging Face TRL 1.9.0).

- :func:`run_measured`: run one side in a fresh subprocess and read its exact peak resident set size from
  ``os.wait4`` (the kernel's ``ru_maxrss`` of that child, taken through a small launcher so that the parent's
  own peak cannot leak into it), plus its wall time and output;
- :func:`anchor_pairs`: the random preference pairs the TRL anchor script draws, reproduced exactly (same
  generator, same order of draws), so that both sides train on the same token ids;
- :func:`save_random_causal_lm`: a random-init SmolLM2-architecture causal LM saved once to a folder (the
  anchor's ``--tiny`` shape on request);
- :func:`machine_info`, :func:`write_results`, :func:`format_table`, :func:`ratio`: the report.

The scripts run as ``python benchmarks/bench_*.py``; this module is imported from the script's own folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_ANCHOR = os.environ.get("RLHFKIT_BENCH_ANCHOR", "/work/shared/bench/anchor_trl.py")
DEFAULT_CONFIG_DIR = os.environ.get("RLHFKIT_BENCH_CONFIG", "/work/shared/bench/smollm2-135m-config")
RESULT_PREFIX = "BENCH_RESULT "

# The anchor script's --tiny shape (anchor_trl.py: 2 layers, hidden 64); keep identical to it.
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}


# ----------------------------------------------------------------------------------------------------------
# Subprocesses and peak memory
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Measured:
    """One side's subprocess: exit status, wall time (s), peak RSS (GiB), and its output."""

    returncode: int
    wall_s: float
    peak_rss_gb: float
    stdout: str
    stderr: str


def child_env() -> dict[str, str]:
    """The environment both sides run in: offline, no tokenizer thread pool, quiet progress bars."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    return env


# A tiny launcher between the harness and the measured command. Linux starts an exec'd process's peak-RSS
# record (``ru_maxrss``) at the high-water mark of the memory image it replaced, and ``subprocess`` spawns with
# vfork, so a command spawned straight from a big parent (a long pytest session, a parent that loaded a model)
# would inherit that parent's peak. Spawned from this launcher instead, the floor is the launcher's own few
# MiB; the launcher reads the command's ``ru_maxrss`` with ``wait4`` and its wall time, and writes both as JSON
# to the file named by its first argument.
_LAUNCHER = """
import json, os, sys, time
report, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(report, "w") as f:
    json.dump({"status": status, "maxrss_kib": usage.ru_maxrss, "wall_s": wall}, f)
"""


def run_measured(cmd: Sequence[str], timeout: float | None = None, cwd: str | None = None) -> Measured:
    """Run ``cmd`` in a fresh process; report its exit status, wall time, peak RSS (GiB) and output.

    The peak is the kernel's ``ru_maxrss`` of exactly that process (and of its own waited-for children), read
    with ``os.wait4`` by a small launcher process (see ``_LAUNCHER``: spawned straight from this possibly big
    process, the command's record would start at this process's peak). Each side is thus measured on its own
    although one parent runs them one after the other. Output goes to temporary files (no pipe can fill up and
    stall the child). On ``timeout`` the whole process group is killed and the return code is negative.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "usage.json"
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), *cmd], stdout=out, stderr=err,
                                env=child_env(), cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        if proc.returncode != 0 or not report.is_file():  # launcher killed (timeout) or could not spawn
            return Measured(proc.returncode or -9, wall, float("nan"), stdout, stderr)
        usage = json.loads(report.read_text())
        return Measured(os.waitstatus_to_exitcode(usage["status"]), usage["wall_s"], usage["maxrss_kib"] / 2**20,
                        stdout, stderr)


def require_ok(m: Measured, what: str) -> None:
    """Stop with the tail of the child's output when it failed."""
    if m.returncode != 0:
        tail = "\n".join((m.stdout + "\n" + m.stderr).strip().splitlines()[-40:])
        raise SystemExit(f"{what} failed (exit status {m.returncode}):\n{tail}")


def last_json(text: str, prefix: str = "") -> dict[str, Any]:
    """The last line of ``text`` that starts with ``prefix`` and holds a JSON object (the prefix removed)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith(prefix) and line[len(prefix):].lstrip().startswith("{"):
            return json.loads(line[len(prefix):])
    raise ValueError(f"no JSON line{' starting with ' + repr(prefix) if prefix else ''} in the output")


def emit(result: dict[str, Any]) -> None:
    """A child's result line for the parent (:func:`last_json` with :data:`RESULT_PREFIX`)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------------------------
def anchor_pairs(vocab_size: int, n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """The anchor's RM pairs: ``n`` chosen then ``n`` rejected sequences of 128..511 ids in [100, V-100).

    Same draws in the same order as ``anchor_trl.py rm``: one generator seeded ``seed``; per sequence first its
    length ``randint(128, 512)``, then its ids ``randint(100, V - 100)``; all chosen sequences before all rejected.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def one() -> list[int]:
        length = int(torch.randint(128, 512, (1,), generator=g))
        return torch.randint(100, vocab_size - 100, (length,), generator=g).tolist()

    chosen = [one() for _ in range(n)]
    rejected = [one() for _ in range(n)]
    return chosen, rejected


def load_bench_config(config_dir: str, tiny: bool) -> Any:
    """The SmolLM2-135M config of ``config_dir``, in the anchor's tiny shape when ``tiny``."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(config_dir)
    if tiny:
        for key, value in TINY_SHAPE.items():
            setattr(cfg, key, value)
    return cfg


def save_random_causal_lm(config_dir: str, out_dir: str | Path, tiny: bool, seed: int = 0) -> Path:
    """A random-init ``LlamaForCausalLM`` of the config (float32) and the tokenizer, saved to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(load_bench_config(config_dir, tiny), dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory and library versions of this machine."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512": any(f.startswith("avx512") for f in flags), "amx": any(f.startswith("amx") for f in flags),
            "mem_total_gb": mem_gb, "cuda": torch.cuda.is_available(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"), "trl": _version("trl"),
            "accelerate": _version("accelerate"), "rlhfkit": _version("rlhfkit"),
            "loadavg_at_start": loadavg()}


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (a busy machine distorts every number of a benchmark)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def ratio(ours: float | None, trl: float | None) -> float | None:
    """``ours / trl`` rounded to 3 digits, None when a side is missing."""
    if ours is None or trl is None or trl == 0:
        return None
    return round(ours / trl, 3)


def write_results(name: str, payload: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """``<out_dir>/<name>-<YYYY-MM-DD>.json`` (a ``-2``, ``-3``... suffix instead of overwriting)."""
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{_dt.date.today().isoformat()}"
    path, k = folder / f"{stem}.json", 1
    while path.exists():
        k += 1
        path = folder / f"{stem}-{k}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table (also valid Markdown)."""
    cells = [list(header)] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def python() -> str:
    """The interpreter both sides run with (the one running the benchmark)."""
    return sys.executable
