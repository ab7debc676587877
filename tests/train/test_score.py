"""`rlhfkit score`: raw scores equal one-row-at-a-time scoring; whitening, reference normalisation (fitted and stored
in the model folder), clipping; over-long rows; bad input (exit status 2, nothing written)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from rm_helpers import BAD, GOOD, WORDS, make_sft_folder, make_tokenizer, one_thread, write_jsonl  # noqa: F401
from tolerances import assert_close_f32, forward_factor, linear_terms

from rlhfkit.cli import main
from rlhfkit.models.pairrm import PairRanker
from rlhfkit.models.reward import RewardModel
from rlhfkit.train.rm_eval import load_scoring_model
from rlhfkit.utils import read_jsonl


def score_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS + [GOOD, BAD]) for _ in range(rng.randint(1, 9))]
        rows.append({"id": i, "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
                     "response": " ".join(words), "extra": {"keep": [i, "me"]}})
    return rows


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    sft = make_sft_folder(root / "sft")
    torch.manual_seed(0)
    RewardModel.from_backbone(sft).save_pretrained(root / "rm", tokenizer=make_tokenizer())
    return root / "rm"


def score(rm, data, out, *flags) -> int:
    return main(["score", "--model", str(rm), "--data", str(data), "--output", str(out), *flags])


def test_raw_scores_keep_the_rows_and_equal_scoring_each_row_alone(rm_dir, tmp_path):
    rows = score_rows(13, seed=0)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert score(rm_dir, data, out, "--batch_size", "4") == 0
    scored = read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "score"} for r in scored] == rows  # fields and order kept
    assert all("raw_score" not in r for r in scored)
    model, tok = load_scoring_model(rm_dir)
    for row, got in zip(rows, scored):  # one row, no padding, no batching: the reference value
        ids = tok(row["prompt"])["input_ids"]
        resp = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        input_ids = torch.tensor([ids + resp])
        mask = torch.ones_like(input_ids, dtype=torch.bool)
        with torch.no_grad(), linear_terms(model._head()) as terms:
            want = model(input_ids, mask, mask).scores.item()
        # batched with padding vs alone: float32 through the 2 decoder layers, relative to the head's terms
        assert_close_f32(got["score"], want, terms[0].max(), forward_factor(2), row["prompt"])


def test_whiten_gives_mean_0_std_1_and_keeps_raw_scores(rm_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", score_rows(20, seed=1))
    out = tmp_path / "w.jsonl"
    assert score(rm_dir, data, out, "--normalize", "whiten") == 0
    scored = read_jsonl(out)
    s = torch.tensor([r["score"] for r in scored], dtype=torch.float64)
    raw = torch.tensor([r["raw_score"] for r in scored], dtype=torch.float64)
    # whitening is float64: (s - mean) / (std + 1e-8), so std(s) = std / (std + 1e-8) (float64 rounding: 1e-12)
    assert s.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert s.std(unbiased=True).item() == pytest.approx(raw.std().item() / (raw.std().item() + 1e-8), rel=1e-12)
    assert raw.std().item() != pytest.approx(1.0, abs=1e-3)  # the raw scores were not already whitened
    # the same float64 operations on the same values (the JSON round trip of a float is exact)
    torch.testing.assert_close(s, (raw - raw.mean()) / (raw.std() + 1e-8), rtol=0, atol=0)


def test_reference_normalisation_makes_reference_outputs_average_zero(rm_dir, tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    for f in rm_dir.iterdir():  # a private copy: fit_reference rewrites rlhfkit.json
        (folder / f.name).write_bytes(f.read_bytes())
    reference = write_jsonl(tmp_path / "ref.jsonl", score_rows(17, seed=2))
    other = write_jsonl(tmp_path / "other.jsonl", score_rows(9, seed=3))
    assert score(folder, other, tmp_path / "x.jsonl", "--normalize", "reference") == 2  # no statistics yet
    assert not (tmp_path / "x.jsonl").exists()

    assert score(folder, reference, tmp_path / "ref_scored.jsonl", "--normalize", "reference",
                 "--fit_reference", str(reference)) == 0
    ref = read_jsonl(tmp_path / "ref_scored.jsonl")
    s = torch.tensor([r["score"] for r in ref], dtype=torch.float64)
    raw = torch.tensor([r["raw_score"] for r in ref], dtype=torch.float64)
    # float64 throughout (the running moments vs torch's mean and std of the same 17 values: 1e-12)
    assert s.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert s.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-12)
    stats = json.loads((folder / "rlhfkit.json").read_text())["normalization"]
    assert stats["count"] == 17
    assert stats["mean"] == pytest.approx(raw.mean().item(), rel=1e-12)
    assert stats["std"] == pytest.approx(raw.std(unbiased=True).item(), rel=1e-12)
    assert RewardModel.from_pretrained(folder).normalization["mean"] == stats["mean"]

    # Later runs reuse the stored statistics: other rows are shifted and scaled by the same numbers.
    assert score(folder, other, tmp_path / "o.jsonl", "--normalize", "reference") == 0
    for r in read_jsonl(tmp_path / "o.jsonl"):  # the same two correctly rounded float64 operations: exact
        assert r["score"] == (r["raw_score"] - stats["mean"]) / stats["std"]


def test_clip_bounds_scores_and_leaves_the_rest(rm_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", score_rows(30, seed=4))
    out = tmp_path / "c.jsonl"
    assert score(rm_dir, data, out, "--normalize", "whiten", "--clip", "0.5") == 0
    scored = read_jsonl(out)
    raw = torch.tensor([r["raw_score"] for r in scored], dtype=torch.float64)
    whitened = ((raw - raw.mean()) / (raw.std() + 1e-8)).tolist()  # whiten_scores' float64 operations
    n_clipped = 0
    for r, w in zip(scored, whitened):
        assert -0.5 <= r["score"] <= 0.5
        if abs(w) > 0.5:
            n_clipped += 1
            assert r["score"] == (0.5 if w > 0 else -0.5)
        else:
            assert r["score"] == w
    assert 0 < n_clipped < len(scored)  # both branches were exercised


def test_overlong_rows_are_dropped_with_a_null_score_or_fail_naming_the_row(rm_dir, tmp_path, capsys):
    rows = score_rows(6, seed=5)
    rows[2]["response"] = " ".join(["w3"] * 40)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "d.jsonl"
    assert score(rm_dir, data, out, "--max_length", "20", "--overlong", "drop") == 0
    scored = read_jsonl(out)
    assert scored[2]["score"] is None and all(r["score"] is not None for i, r in enumerate(scored) if i != 2)
    assert "1 dropped" in capsys.readouterr().out
    out2 = tmp_path / "f.jsonl"
    assert score(rm_dir, data, out2, "--max_length", "20", "--overlong", "fail") == 2
    err = capsys.readouterr().err
    assert "rows.jsonl" in err and "row 3" in err and not out2.exists()


def test_bad_input_exits_2_and_writes_nothing(rm_dir, tmp_path, capsys):
    rows = score_rows(5, seed=6)
    del rows[3]["response"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "o.jsonl"
    assert score(rm_dir, data, out) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 4" in err and "'response'" in err
    good = write_jsonl(tmp_path / "good.jsonl", score_rows(5, seed=6))
    for flags, needle in ((["--normalize", "zscore"], "normalize"), (["--clip", "-1"], "clip"),
                          (["--batch_size", "0"], "batch_size")):
        assert score(rm_dir, good, out, *flags) == 2
        assert needle in capsys.readouterr().err
    ranker_dir = tmp_path / "pairrm"
    PairRanker.from_backbone(rm_dir.parent / "sft", tokenizer=make_tokenizer()).save_pretrained(ranker_dir)
    assert score(ranker_dir, good, out) == 2
    assert "PairRM" in capsys.readouterr().err
    assert not out.exists()
