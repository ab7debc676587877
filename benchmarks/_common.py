"""Shared helpers of the side-by-side benchmarks (rlhfkit vs Hugging Face TRL 1.9.0).

- :func:`run_measured`: run one side in a fresh subprocess and read its exact peak resident set size from
  ``os.wait4`` (the kernel's ``ru_maxrss`` of that child, taken through a small launcher so that the parent's
  own peak cannot leak into it), plus its wall time and output;
- :func:`anchor_pairs`: the random preference pairs the TRL anchor script draws, reproduced exactly (same
  generator, same order of draws), so that both sides train on the same token ids;
- :func:`save_random_causal_lm`: a random-init SmolLM2-architecture causal LM saved once to a folder (the
  anchor's ``--tiny`` shape on request);
- :func:`measure_gemm_peak`: the machine's dense GEMM throughput (GFLOP/s) in float32 and bfloat16, measured in
  the same run, and :func:`utilisation`: a phase's achieved GFLOP/s over the peak of the precision it ran in;
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


def run_measured(cmd: Sequence[str], timeout: float | None = None, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd`` in a fresh process; report its exit status, wall time, peak RSS (GiB) and output.

    The peak is the kernel's ``ru_maxrss`` of exactly that process (and of its own waited-for children), read
    with ``os.wait4`` by a small launcher process (see ``_LAUNCHER``: spawned straight from this possibly big
    process, the command's record would start at this process's peak). Each side is thus measured on its own
    although one parent runs them one after the other. Output goes to temporary files (no pipe can fill up and
    stall the child). On ``timeout`` the whole process group is killed and the return code is negative. ``env``:
    variables set on top of :func:`child_env` (e.g. the ``PYTHONPATH`` of another rlhfkit checkout).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "usage.json"
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(report), *cmd], stdout=out, stderr=err,
                                env={**child_env(), **(env or {})}, cwd=cwd, start_new_session=True)
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


def as_the_cli_runs() -> bool:
    """An rlhfkit child's process set up as the ``rlhfkit`` command sets up its own: the C allocator tuned by
    ``rlhfkit.utils.reuse_freed_memory`` (large tensors reuse freed memory); True when it did. A checkout from
    before that function (``--compare-src``) runs as its command did, untuned. TRL's side is left as TRL runs.
    ``RLHFKIT_MALLOC=default`` in the benchmark's environment turns it off for a comparison."""
    import rlhfkit.utils

    tune = getattr(rlhfkit.utils, "reuse_freed_memory", None)
    return bool(tune()) if tune is not None else False


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
# The limit: measured GEMM peak, utilisation
# ----------------------------------------------------------------------------------------------------------
GEMM_SIZES = (256, 512, 1024, 2048)
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def measure_gemm_peak(sizes: Sequence[int] = GEMM_SIZES, dtypes: Sequence[str] = ("float32", "bfloat16"),
                      repeats: int = 5, min_timing_s: float = 0.02, max_call_s: float = 2.0) -> dict[str, Any]:
    """Dense GEMM throughput of this machine with torch on the CPU, at the threads torch uses (recorded).

    Per dtype and square size n (ascending): two warm-up ``a @ b`` of two (n, n) random matrices, then ``repeats``
    timings, each of ``k`` back-to-back products (``k`` chosen from the warm-up so that a timing lasts at least
    ``min_timing_s``); GFLOP/s = 2·n³·k / median timing / 1e9. The dtype's ``peak_gflops`` is the best size's.
    Larger sizes are skipped once one product takes over ``max_call_s`` (bf16 on a CPU without bf16 matmul
    units is two orders of magnitude slower than fp32: the measurement stays short there too).

    Which peak a phase is compared with is the peak of the precision it ran in (``PRECISION_DTYPES``): on a CPU
    with AMX bf16 is several times fp32, on an AMD Zen 2 it is hundreds of times slower.
    """
    import statistics

    import torch

    out: dict[str, Any] = {"threads": torch.get_num_threads(), "sizes": list(sizes), "repeats": repeats}
    g = torch.Generator().manual_seed(0)
    for name in dtypes:
        dtype = getattr(torch, name)
        by_size: dict[str, float] = {}
        for n in sizes:
            a = torch.randn(n, n, generator=g).to(dtype)
            b = torch.randn(n, n, generator=g).to(dtype)
            for _ in range(2):  # warm-up; the second call (threads and buffers ready) sizes the timings
                start = time.perf_counter()
                a @ b
                first = time.perf_counter() - start
                if first > max_call_s:
                    break
            slow = first > max_call_s
            k, timings = max(1, int(min_timing_s / max(first, 1e-9))), [first] if slow else []
            for _ in range(0 if slow else repeats):
                start = time.perf_counter()
                for _ in range(k):
                    a @ b
                timings.append(time.perf_counter() - start)
            by_size[str(n)] = round(gemm_gflops(n, k, statistics.median(timings)), 1)
            if slow:  # larger sizes would take minutes (no fast matmul units for this dtype)
                break
        out[name] = {"peak_gflops": max(by_size.values()), "by_size": by_size}
    return out


def _time_product(a: Any, b: Any, repeats: int, min_timing_s: float) -> float:
    """Median seconds of one ``a @ b`` (after two warm-up products; each timing ≥ ``min_timing_s``)."""
    import statistics

    for _ in range(2):
        start = time.perf_counter()
        a @ b
        first = time.perf_counter() - start
    k, timings = max(1, int(min_timing_s / max(first, 1e-9))), []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(k):
            a @ b
        timings.append((time.perf_counter() - start) / k)
    return statistics.median(timings)


def measure_gemms(gemms: Sequence[Any], dtype: str = "float32", repeats: int = 5,
                  min_timing_s: float = 0.02) -> dict[str, Any]:
    """The attainable GEMM throughput of a pass: each distinct product of ``gemms`` (`flops.Gemm`: the model's own
    (M, K, N) shapes and operand layouts) timed as in :func:`measure_gemm_peak`, at torch's thread count;
    ``gflops`` = Σ FLOPs / Σ (count × median time) over the pass, i.e. the rate of a pass that did nothing but its
    matmuls, each as fast as torch does it alone. Against the square-GEMM peak it says how much of that peak the
    model's shapes allow; a phase's time against it says how much goes to the rest (attention, norms, softmax,
    elementwise work, Python). ``by_shape``: GFLOP/s of each product ("MxKxN[,transposed]")."""
    import torch

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    seconds: dict[tuple[int, int, int, str], float] = {}
    for gemm in gemms:
        key = (gemm.m, gemm.k, gemm.n, gemm.transposed)
        if key in seconds:
            continue
        a = torch.randn(gemm.k, gemm.m, generator=g).to(dt).t() if gemm.transposed == "a" else \
            torch.randn(gemm.m, gemm.k, generator=g).to(dt)
        b = torch.randn(gemm.n, gemm.k, generator=g).to(dt).t() if gemm.transposed == "b" else \
            torch.randn(gemm.k, gemm.n, generator=g).to(dt)
        seconds[key] = _time_product(a, b, repeats, min_timing_s)
    total_flops = sum(x.flops() for x in gemms)
    total_s = sum(x.count * seconds[(x.m, x.k, x.n, x.transposed)] for x in gemms)
    by_shape = {f"{m}x{k}x{n}" + (f",{t}" if t else ""): round(2.0 * m * k * n / s / 1e9, 1)
                for (m, k, n, t), s in seconds.items()}
    return {"dtype": dtype, "threads": torch.get_num_threads(), "gflop": round(total_flops / 1e9, 3),
            "seconds": round(total_s, 5), "gflops": round(total_flops / total_s / 1e9, 1), "by_shape": by_shape}


def gemm_gflops(n: int, products: int, seconds: float) -> float:
    """GFLOP/s of ``products`` (n, n) @ (n, n) matmuls in ``seconds`` (2·n³ FLOPs each: n³ multiply-adds)."""
    return 2.0 * n ** 3 * products / seconds / 1e9


def peak_of(gemm: dict[str, Any], precision: str) -> float | None:
    """The measured peak GFLOP/s of ``precision`` (``fp32`` / ``bf16``), None when it was not measured."""
    entry = gemm.get(PRECISION_DTYPES.get(precision, precision))
    return entry["peak_gflops"] if entry else None


def utilisation(flops: float, seconds: float | None, peak_gflops: float | None) -> dict[str, float | None]:
    """A phase's ``time_s``, model ``gflop``, achieved ``gflops`` (GFLOP / s) and ``utilisation`` = achieved /
    peak (the GEMM peak of the phase's precision); None where a time or the peak is missing or zero."""
    gflop = flops / 1e9
    achieved = gflop / seconds if seconds else None
    util = achieved / peak_gflops if achieved is not None and peak_gflops else None
    return {"time_s": None if seconds is None else round(seconds, 4), "gflop": round(gflop, 3),
            "gflops": None if achieved is None else round(achieved, 2),
            "utilisation": None if util is None else round(util, 4)}


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(gemm_sizes: Sequence[int] | None = GEMM_SIZES) -> dict[str, Any]:
    """CPU model, core count, memory, library versions of this machine and its measured GEMM peak
    (:func:`measure_gemm_peak` over ``gemm_sizes``; None: not measured)."""
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
            "loadavg_at_start": loadavg(),
            "gemm_peak": measure_gemm_peak(gemm_sizes) if gemm_sizes else None}


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


def src_env(src: str | None) -> dict[str, str]:
    """The environment that makes a child import rlhfkit from checkout ``src`` (``PYTHONPATH=src/src``); empty
    for None (the harness's own rlhfkit)."""
    if src is None:
        return {}
    path = Path(src).expanduser().resolve() / "src"
    if not (path / "rlhfkit" / "__init__.py").is_file():
        raise SystemExit(f"{src}: no rlhfkit checkout there (expected {path}/rlhfkit/__init__.py)")
    return {"PYTHONPATH": str(path)}


def src_commit(src: str | None) -> str | None:
    """The commit checked out in ``src`` (``git rev-parse HEAD``; None outside git or for None)."""
    cwd = str(Path(src).expanduser()) if src else str(BENCH_DIR)
    try:
        out = subprocess.run(["git", "-C", cwd, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def python() -> str:
    """The interpreter both sides run with (the one running the benchmark)."""
    return sys.executable
