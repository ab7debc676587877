"""Tests of the quickstart report: plots and summary.md regenerated from a synthetic run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread

from rlhfkit.errors import RlhfkitError
from rlhfkit.quickstart.report import (
    PLOT_NAMES,
    REQUIRED_FILES,
    eval_headline,
    make_plots,
    md_escape,
    regenerate,
    write_summary,
)
from rlhfkit.train.rm_eval import calibration_bins

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS = [f"Describe a rainy afternoon number {i}." for i in range(8)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _before_after() -> tuple[list[dict], list[dict]]:
    gold_before = [0.0, -0.1] * 4
    gold_after = [0.5] * 6 + [0.0, -0.2]  # 6 wins, a tie (0.0 vs 0.0), a loss (-0.2 vs -0.1)
    before = [{"prompt": p, "response": f"It was grey | wet\nand *dull* {i}.", "gold": gold_before[i],
               "proxy": 0.2 * i - 1.0} for i, p in enumerate(PROMPTS)]
    after = [{"prompt": p, "response": f"A lovely, bright day {i}!", "gold": gold_after[i],
              "proxy": 1.0 + 0.1 * i, "kl": 0.5 + 0.25 * i} for i, p in enumerate(PROMPTS)]
    return before, after


def make_run(root: Path) -> Path:
    run = root / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "config.yaml").write_text("model: smollm2\nlabel_temperature: 0.25\n", encoding="utf-8")
    _write_jsonl(run / "metrics/ppo.jsonl", [
        {"iteration": i, "objective/kl": 0.4 * i, "objective/scores": 0.3 * i, "gold/mean": 0.1 * i - 0.01 * i * i,
         "objective/kl_coef": 0.05 * 0.98 ** i, "loss/policy": 0.01} for i in range(1, 13)])
    # The bins come from the real producer (`rlhfkit rm eval`), so report and evaluator cannot drift apart;
    # the score differences leave the third of 5 bins empty.
    diffs = torch.tensor([0.1, -0.2, 0.3, 0.5, -0.6, 0.7, 2.0, 3.0, -2.5, 4.0])
    bins, _ = calibration_bins(diffs, 5)
    assert bins[2]["n"] == 0
    (run / "rm_eval.json").write_text(json.dumps({"accuracy": 0.84, "ece": 0.0431, "bins": bins}))
    before, after = _before_after()
    _write_jsonl(run / "eval/before.jsonl", before)
    _write_jsonl(run / "eval/after.jsonl", after)
    summary = {"rm_accuracy": 0.84, "rm_ece": 0.0431, "label_agreement": 0.8807, "label_temperature": 0.25,
               **eval_headline(before, after), "time_ppo_s": 123.45, "seed": 7}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_eval_headline_by_hand() -> None:
    before, after = _before_after()
    head = eval_headline(before, after)
    # gold before: 0, -0.1 alternating -> sum -0.4, mean -0.05
    assert head["gold_before_mean"] == pytest.approx(-0.05, rel=0, abs=1e-12)
    # gold after: six 0.5, then 0.0 and -0.2 -> sum 2.8, mean 0.35
    assert head["gold_after_mean"] == pytest.approx(0.35, rel=0, abs=1e-12)
    # six wins, one tie (½), one loss: 6.5 / 8
    assert head["win_rate"] == pytest.approx(6.5 / 8, rel=0, abs=1e-12)
    # kl = 0.5 + 0.25 i -> mean 0.5 + 0.25 * 3.5
    assert head["mean_kl"] == pytest.approx(1.375, rel=0, abs=1e-12)
    # proxy before 0.2 i - 1 -> mean -0.3; after 1 + 0.1 i -> mean 1.35
    assert head["proxy_before_mean"] == pytest.approx(-0.3, rel=0, abs=1e-12)
    assert head["proxy_after_mean"] == pytest.approx(1.35, rel=0, abs=1e-12)
    # pairing is by prompt, not by position
    assert eval_headline(before, list(reversed(after))) == head
    with pytest.raises(RlhfkitError, match="different prompts"):
        eval_headline(before, after[:-1])


def test_regenerate_writes_valid_pngs_and_summary(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    paths = regenerate(run)
    assert [p.name for p in paths] == list(PLOT_NAMES) + ["summary.md"]
    for name in PLOT_NAMES:
        png = run / "plots" / name
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert len(data) > 10_000, (name, len(data))
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # not a blank canvas
    md = (run / "summary.md").read_text(encoding="utf-8")
    for needle in ["| Reward-model accuracy (held-out pairs) | 0.840 |",
                   "| Gold score, SFT policy (mean) | -0.050 |",
                   "| Gold score, trained policy (mean) | 0.350 |",
                   "| Win rate of trained over SFT (gold, ties = ½) | 0.812 |",  # 0.8125, 3 decimals
                   "| Reward-model expected calibration error | 0.043 |",
                   "| Mean KL(trained ‖ SFT) per response (nats) | 1.375 |",
                   "| time: ppo | 123.5 s |", "| seed | 7 |", "PPO iterations logged: 12"]:
        assert needle in md, needle
    for name in PLOT_NAMES:
        assert f"](plots/{name})" in md
    sample_rows = [line for line in md.splitlines() if line.startswith("| Describe a rainy afternoon")]
    assert len(sample_rows) == 5
    # escaped: the response's newline and pipe do not break the table row; emphasis is literal
    assert all(line.count(" | ") == 2 for line in sample_rows)
    assert "It was grey \\| wet<br>and \\*dull\\* 0." in sample_rows[0]
    assert "label_temperature: 0.25" in md


def test_make_plots_and_write_summary_separately(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    assert [p.name for p in make_plots(run)] == list(PLOT_NAMES)
    assert not (run / "summary.md").exists()
    assert write_summary(run) == run / "summary.md"


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_missing_file_named_and_nothing_written(tmp_path: Path, missing: str) -> None:
    run = make_run(tmp_path)
    (run / missing).unlink()
    with pytest.raises(RlhfkitError, match=f"missing {missing}"):
        regenerate(run)
    assert not (run / "plots").exists() and not (run / "summary.md").exists()


def test_bad_rows_named(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    rows = [json.loads(line) for line in (run / "metrics/ppo.jsonl").read_text().splitlines()]
    del rows[2]["gold/mean"]
    _write_jsonl(run / "metrics/ppo.jsonl", rows)
    with pytest.raises(RlhfkitError, match=r"ppo\.jsonl, row 3, field 'gold/mean': missing"):
        regenerate(run)
    with pytest.raises(RlhfkitError, match="does not exist"):
        regenerate(tmp_path / "nowhere")


def test_md_escape() -> None:
    assert md_escape("a|b\nc <d> & *e* _f_ `g` $h") == "a\\|b<br>c &lt;d&gt; &amp; \\*e\\* \\_f\\_ \\`g\\` \\$h"
    assert md_escape("x" * 10, max_chars=5) == "xxxx…"
