"""The benchmark harness (benchmarks/): peak-memory measurement, the anchor's pairs, tiny rlhfkit-side runs.

The benchmarks themselves (timings) are never run here; only the parts whose correctness the reported numbers
rest on, plus tiny end-to-end runs of the rlhfkit side that break when a trainer interface they use changes
(those spawn processes: marked slow and opt-in, ``RLHFKIT_BENCH_TESTS=1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _common as C  # noqa: E402

ANCHOR = Path(C.DEFAULT_ANCHOR)
CONFIG_DIR = Path(C.DEFAULT_CONFIG_DIR)
# The end-to-end checks spawn several processes (20-60 s each on 2 busy cores): opt in with RLHFKIT_BENCH_TESTS=1.
needs_shared = pytest.mark.skipif(
    not (os.environ.get("RLHFKIT_BENCH_TESTS") == "1" and ANCHOR.is_file() and CONFIG_DIR.is_dir()),
    reason="opt-in (RLHFKIT_BENCH_TESTS=1) and needs the team's anchor script and SmolLM2 config folder")


def _alloc(mib: int) -> list[str]:
    # a child that touches `mib` MiB of fresh memory (one write per 4 KiB page makes each page resident)
    return [sys.executable, "-c", f"b = bytearray({mib} * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1"]


def test_run_measured_reads_each_childs_own_peak_rss():
    # Big child first, then a small one: a parent-wide RUSAGE_CHILDREN maximum would report the big peak twice.
    # And this (parent) process holds 400 MiB while it spawns them: a child exec'd straight from it would start
    # its ru_maxrss at the parent's high-water mark (what CI's long pytest process showed: 6 GiB for 10 MiB).
    ballast = bytearray(400 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    big = C.run_measured(_alloc(300))
    small = C.run_measured(_alloc(10))
    del ballast
    assert big.returncode == 0 and small.returncode == 0
    assert 300 / 1024 <= big.peak_rss_gb < 390 / 1024  # the touched bytes + interpreter, not the parent's 400
    assert small.peak_rss_gb < 100 / 1024  # interpreter (~30 MiB) + 10 MiB: far below the big child's peak


def test_run_measured_timeout_kills_the_command():
    m = C.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1.0)
    assert m.returncode < 0 and m.wall_s < 10


def test_run_measured_reports_failure_and_output():
    m = C.run_measured([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (m.returncode, m.stdout.strip(), m.stderr.strip()) == (3, "out", "err")
    with pytest.raises(SystemExit, match="exit status 3"):
        C.require_ok(m, "child")


def test_last_json_takes_the_last_matching_line():
    text = 'noise\n{"a": 1}\nBENCH_RESULT {"b": 2}\n{"a": 3}\ntrailing'
    assert C.last_json(text) == {"a": 3}
    assert C.last_json(text, C.RESULT_PREFIX) == {"b": 2}
    with pytest.raises(ValueError):
        C.last_json("nothing here")


def test_ratio_and_results_file(tmp_path):
    assert C.ratio(3.0, 2.0) == 1.5 and C.ratio(1.0, None) is None and C.ratio(1.0, 0.0) is None
    first = C.write_results("x", {"k": 1}, tmp_path)
    second = C.write_results("x", {"k": 2}, tmp_path)  # same day: a new file, the first is kept
    assert first != second and json.loads(first.read_text()) == {"k": 1} and json.loads(second.read_text()) == {"k": 2}


FAKE_TRL = '''
import json, os
class RewardConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
class RewardTrainer:
    def __init__(self, model, args, processing_class, train_dataset):
        self.ds = train_dataset
    def train(self):
        with open(os.environ["FAKE_TRL_DUMP"], "w") as f:
            rows = self.ds.to_dict()
            json.dump({"chosen": rows["chosen_input_ids"], "rejected": rows["rejected_input_ids"]}, f)
'''


@pytest.mark.slow
@needs_shared
def test_anchor_pairs_equal_the_anchor_scripts_own_pairs(tmp_path):
    # Run the real anchor script with a stand-in `trl` package that only records the dataset it is given.
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "__init__.py").write_text(FAKE_TRL)
    dump = tmp_path / "pairs.json"
    env = {**C.child_env(), "PYTHONPATH": str(tmp_path), "FAKE_TRL_DUMP": str(dump)}
    subprocess.run([sys.executable, str(ANCHOR), "rm", str(CONFIG_DIR), "--tiny", "--iters", "2", "--batch", "3"],
                   check=True, env=env, capture_output=True, timeout=300)
    recorded = json.loads(dump.read_text())
    vocab = C.load_bench_config(str(CONFIG_DIR), tiny=True).vocab_size
    chosen, rejected = C.anchor_pairs(vocab, 6)
    assert recorded == {"chosen": chosen, "rejected": rejected}
    assert all(128 <= len(s) < 512 and min(s) >= 100 and max(s) < vocab - 100 for s in chosen + rejected)


def _bench(script: str, tmp_path: Path, *flags: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), "--tiny", "--which", "ours", "--out", str(tmp_path),
                          *flags], capture_output=True, text=True, timeout=600, env=C.child_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
@needs_shared
def test_bench_rm_ours_side_tiny(tmp_path):
    result = _bench("bench_rm.py", tmp_path, "--precision", "bf16", "--iters", "2", "--batch", "2")
    ours = result["results"]["bf16"]["ours"]
    chosen, rejected = C.anchor_pairs(C.load_bench_config(str(CONFIG_DIR), tiny=True).vocab_size, 4)
    assert ours["tokens"] == sum(map(len, chosen + rejected))
    assert ours["pairs"] == 4 and len(ours["step_s"]) == 2 and ours["tokens_per_s"] > 0
    assert 0 < ours["peak_rss_gb"] < 8


@pytest.mark.slow
@needs_shared
def test_bench_ppo_ours_side_tiny(tmp_path):
    result = _bench("bench_ppo.py", tmp_path, "--precision", "fp32")
    ours = result["results"]["fp32"]["ours"]
    assert ours["iterations"] == 2 and len(ours["iter_s"]) == 2
    assert set(ours["split_mean_s"]) == {"rollout", "score", "forward", "update", "other"}
    assert 0 < ours["response_length_mean"] <= 8 and 0 < ours["peak_rss_gb"] < 8
