"""Data parallelism: 2 processes (torch.distributed gloo on the CPU, launched by torchrun) each take half of every
global batch; the run must equal a 1-process run with the same global batch: the same steps, evaluations and
checkpoints, and the same first step up to float32 rounding (later steps start from weights that Adam made differ
by up to ±lr wherever a gradient was of rounding size, which no rounding bound covers)."""

from __future__ import annotations

import os
import subprocess
import sys

from rm_helpers import (first_step_tolerances, make_sft_folder, one_thread,  # noqa: F401 (one_thread: autouse)
                        preference_rows, read_weights, write_jsonl)
from tolerances import assert_within

from rlhfkit.cli import main
from rlhfkit.utils import read_jsonl

TIMING_KEYS = ("throughput/tokens_per_s", "time/step")


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(out / "metrics.jsonl")]


def test_two_processes_give_the_same_run_as_one(tmp_path):
    sft = make_sft_folder(tmp_path / "sft")
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(100, seed=4))
    flags = ["rm", "train", "--model", str(sft), "--data", str(data), "--batch_size", "16", "--micro_batch_size", "4",
             "--learning_rate", "1e-3", "--eval_fraction", "0.2", "--eval_steps", "2", "--logging_steps", "1",
             "--save_steps", "3", "--max_grad_norm", "0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*flags, "--output", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "rlhfkit.cli", *flags, "--output", str(two)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2; 16 examples per optimizer step = 2 process(es) × 2 micro-batch(es) × 4" in proc.stdout

    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == [1, 2, 3, 4, 5]
    assert sum("eval/accuracy" in r for r in rows_two) == 3  # steps 2, 4 and the last (5)
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys() and a["train/lr"] == b["train/lr"] and a["train/epoch"] == b["train/epoch"]
    # the first step, from the initial model: train/grad_norm would expose a wrong gradient scale (Adam hides one)
    tolerance = first_step_tolerances([*flags[2:], "--output", "-"])
    assert rows_one[0].keys() == tolerance.keys()
    for k in rows_one[0]:
        assert_within(rows_two[0][k], rows_one[0][k], tolerance[k], k)
    wa, wb = read_weights(one), read_weights(two)
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert (two / "checkpoints" / "step-00000003" / "model.safetensors").is_file()
