"""The quickstart on the real SmolLM2-135M model at a tiny scale, so that the real path cannot silently break."""

from __future__ import annotations

import json

import pytest

from rlhfkit.cli import main
from rlhfkit.quickstart.report import PLOT_NAMES, REQUIRED_FILES


@pytest.mark.slow
def test_quickstart_tiny_real_model_end_to_end(tmp_path, capsys):
    pytest.importorskip("vaderSentiment")
    out = tmp_path / "run"
    assert main(["quickstart", "--scale", "tiny", "--output", str(out), "--seed", "3"]) == 0
    for rel in REQUIRED_FILES:
        assert (out / rel).is_file(), rel
    for name in PLOT_NAMES:
        assert (out / "plots" / name).stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["rm_accuracy"] <= 1.0 and 0.0 <= summary["win_rate"] <= 1.0
    assert summary["scale"] == "tiny" and summary["mean_kl"] == summary["mean_kl"]  # finite, not NaN
    rows = [json.loads(line) for line in (out / "metrics/ppo.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and -1.0 <= rows[0]["gold/mean"] <= 1.0
    assert (out / "models/policy/config.json").is_file()
    assert (out / "models/reward_model/rlhfkit.json").is_file()
    assert "win" in (out / "summary.md").read_text().lower()
    # `rlhfkit report DIR` regenerates the same files
    (out / "summary.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.md").is_file()
    # same seed, same numbers: a second run reproduces every headline number and the PPO metrics (timings aside)
    again = tmp_path / "again"
    assert main(["quickstart", "--scale", "tiny", "--output", str(again), "--seed", "3"]) == 0
    untimed = lambda d: {k: v for k, v in d.items() if not k.startswith(("time", "throughput"))}  # noqa: E731
    assert untimed(json.loads((again / "summary.json").read_text())) == untimed(summary)
    rows_again = [json.loads(line) for line in (again / "metrics/ppo.jsonl").read_text().splitlines()]
    assert [untimed(r) for r in rows_again] == [untimed(r) for r in rows]


def test_quickstart_rejects_contradicting_flags(capsys):
    assert main(["quickstart", "--fast", "--scale", "tiny"]) == 2
    assert "--fast contradicts" in capsys.readouterr().err
