"""Statistics reduced by name: sums and weighted means, across 2 gloo processes; differing names are an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit.train.engine.stats import NamedSums

SCRIPT = Path(__file__).resolve().parent / "named_stats_script.py"


class _OneProcess:
    distributed = False


def test_sums_and_weighted_means_by_name():
    sums = NamedSums()
    sums.add("loss", 0.5 * 3, 3)  # a mean of 0.5 over weight 3
    sums.add("tokens", 7)
    sums.add("loss", torch.tensor(2.0) * 1, torch.tensor(1))  # 2.0 over weight 1: (1.5 + 2) / 4
    assert sums.values() == {"loss": 3.5 / 4, "tokens": 7.0}
    assert sums.values("rm") == {"rm/loss": 3.5 / 4, "rm/tokens": 7.0}
    assert sums.reduce(_OneProcess()) is sums
    window = NamedSums()
    window.update(sums)
    window.update(sums)
    assert window.values() == {"loss": 7.0 / 8, "tokens": 14.0} and window.total("loss") == 7.0
    assert window.pop("tokens") == 14.0 and window.names() == ["loss"]
    restored = NamedSums.from_state_dict(json.loads(json.dumps(window.state_dict())))
    assert restored.values() == window.values() and restored.state_dict() == window.state_dict()


def test_a_name_is_a_sum_or_a_mean_never_both():
    sums = NamedSums()
    sums.add("x", 1.0)
    with pytest.raises(ValueError, match="'x'"):
        sums.add("x", 1.0, 2.0)


def _run_two(tmp_path, case):
    out = tmp_path / case
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(SCRIPT), str(out), case], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_reduce_by_name_in_any_order(tmp_path):
    """Process 0: tokens 3, approx_kl 0.5 over 4 tokens then 0.25 over 2, a = 1; process 1 (in another order):
    approx_kl 1.0 over 2 tokens, tokens 5, a = 2. Global: tokens 8, a 3, approx_kl (2 + 0.5 + 2) / 8 = 0.5625."""
    results = _run_two(tmp_path, "match")
    expected = {"tokens": 8.0, "policy/approx_kl": 4.5 / 8, "a": 3.0}
    for rank, result in enumerate(results):
        assert result["world_size"] == 2 and result["values"] == expected, (rank, result)
    assert list(results[1]["values"]) == ["policy/approx_kl", "tokens", "a"]  # each process's own order


@pytest.mark.slow
@pytest.mark.parametrize("case", ["names", "kind"])
def test_differing_statistics_between_processes_are_an_error_on_every_process(tmp_path, case):
    for result in _run_two(tmp_path, case):
        assert "statistics differ between processes" in result["error"], result
        assert ("'c'" in result["error"]) if case == "names" else ("'b'" in result["error"])
