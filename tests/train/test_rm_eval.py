"""`rlhfkit rm eval`: accuracy (ties ½), margin, calibration bins and ECE against hand-computed values; the Python
entry point with a fake reward model of known scores; the CLI end to end (reward model and PairRM folders)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rm_helpers import (BAD, EOS, GOOD, PAD, make_sft_folder, make_tokenizer, one_thread,  # noqa: F401 (autouse)
                        preference_rows, write_jsonl)
from tolerances import (EPS32, assert_close_f32, assert_within, forward_factor, gradient_factor, gradient_terms,
                        linear_terms, sum_tolerance)

from rlhfkit.cli import main
from rlhfkit.data.preference import parse_preferences
from rlhfkit.models.pairrm import PairRanker
from rlhfkit.models.reward import RewardModel, RewardOutput
from rlhfkit.train.rm_eval import calibration_bins, evaluate_reward_model, load_scoring_model, pairwise_metrics

# Six pairs with d = r_c - r_r:            2     -1     0 (tie)  0.5    3     -0.2
DIFFS = [2.0, -1.0, 0.0, 0.5, 3.0, -0.2]


def float32_mean_tolerance(values: list[float], stages: float = 0.5) -> float:
    """How far a float32 mean of ``values`` may be from the float64 hand value: each value rounded once to float32
    (u = eps/2; or ``stages`` eps when computed) and a float32 sum of at most 8 (log2 8 = 3 levels)."""
    return sum_tolerance(values, stages + 3) / len(values)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def expected_five_bins() -> tuple[list[tuple[int, float | None, float | None]], float]:
    """By hand, 5 bins of width 0.1 over [0.5, 1]; confidence c = σ(|d|), bin = floor((c - 0.5) · 10):
    σ(2) = .8808 -> bin 3 (right), σ(1) = .7311 -> bin 2 (wrong), σ(0) = .5 -> bin 0 (tie: ½),
    σ(.5) = .6225 -> bin 1 (right), σ(3) = .9526 -> bin 4 (right), σ(.2) = .5498 -> bin 0 (wrong).
    Bin 0 holds the tie and the -0.2 pair: accuracy (½ + 0) / 2, confidence (.5 + σ(.2)) / 2.
    ECE = Σ_b n_b / 6 · |acc_b - conf_b|."""
    bins = [(2, 0.25, (0.5 + sigmoid(0.2)) / 2), (1, 1.0, sigmoid(0.5)), (1, 0.0, sigmoid(1.0)),
            (1, 1.0, sigmoid(2.0)), (1, 1.0, sigmoid(3.0))]
    ece = sum(n / 6 * abs(acc - conf) for n, acc, conf in bins)
    return bins, ece


def test_calibration_bins_and_ece_match_the_hand_computation():
    bins, ece = calibration_bins(torch.tensor(DIFFS, dtype=torch.float64), num_bins=5)
    want, want_ece = expected_five_bins()
    assert [(b["n"], b["accuracy"]) for b in bins] == [(n, acc) for n, acc, _ in want]
    for b, (_, _, conf) in zip(bins, want):
        assert b["confidence"] == pytest.approx(conf, rel=1e-12)
    assert [b["lo"] for b in bins] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert [b["hi"] for b in bins] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])
    assert ece == pytest.approx(want_ece, rel=1e-12)
    # The number itself, so that a mistake shared by the code and expected_five_bins cannot hide:
    # 2/6·|.25 - .524917| + (1 - .622459)/6 + .731059/6 + (1 - .880797)/6 + (1 - .952574)/6
    # = .091639 + .062923 + .121843 + .019867 + .007904 = .304177
    assert ece == pytest.approx(0.304177, abs=1e-6)


def test_pairwise_metrics_count_ties_as_half_and_leave_empty_bins_empty():
    m = pairwise_metrics(torch.tensor(DIFFS), num_bins=10)
    assert m["n"] == 6 and m["ties"] == 1
    assert m["accuracy"] == pytest.approx(3.5 / 6, rel=1e-12)  # 1 + 0 + ½ + 1 + 1 + 0
    assert_within(m["margin"], 4.3 / 6, float32_mean_tolerance(DIFFS), "margin")
    assert sum(b["n"] for b in m["bins"]) == 6
    empty = [b for b in m["bins"] if b["n"] == 0]
    assert empty and all(b["accuracy"] is None and b["confidence"] is None for b in empty)
    # A perfectly confident, always-right model is perfectly calibrated; a confidently wrong one has ECE ~ 1.
    assert pairwise_metrics(torch.tensor([50.0, 60.0]))["ece"] == pytest.approx(0.0, abs=1e-12)
    assert pairwise_metrics(torch.tensor([-50.0, -60.0]))["ece"] == pytest.approx(1.0, abs=1e-12)


class FakeRM(torch.nn.Module):
    """Score = sum over response tokens of a fixed value per token: good +1, bad -1, w3 +0.5, w10 +0.2, else 0."""

    pad_token_id = PAD
    convention = "rlhfkit"  # rendered like rlhfkit's own models (prompt and response apart, EOS appended)

    def __init__(self, tokenizer):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        vocab = tokenizer.get_vocab()
        self.values = torch.zeros(len(vocab))
        for word, v in ((GOOD, 1.0), (BAD, -1.0), ("w3", 0.5), ("w10", 0.2)):
            self.values[vocab[word]] = v

    def forward(self, input_ids, attention_mask, response_mask=None, share_prompts=False, packing=False):
        token_scores = torch.where(response_mask, self.values[input_ids], 0.0)
        return RewardOutput(scores=token_scores.sum(dim=1) + 0 * self.dummy, token_scores=token_scores)


def test_evaluate_reward_model_on_known_scores_gives_the_hand_computed_metrics():
    tokenizer = make_tokenizer()
    # Pairs built to have d = 2, -1, 0, 0.5, 3, -0.2 (prompts of different lengths, so batches are reordered).
    pairs = [("w5", GOOD, BAD), ("w5 w6 w7", BAD, "w4"), ("w8", "w4", "w5"), ("w9 w9 w9 w9 w9", "w3", "w6"),
             ("w4 w4", f"{GOOD} {GOOD} w3 w3", "w7"), ("w6", "w8", "w10")]
    examples = parse_preferences([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])
    m = evaluate_reward_model(FakeRM(tokenizer), tokenizer, examples, batch_size=4, num_bins=5)
    want, want_ece = expected_five_bins()
    assert m["n"] == 6 and m["ties"] == 1 and m["n_dropped"] == 0
    assert m["accuracy"] == pytest.approx(3.5 / 6, rel=1e-12)
    assert_within(m["margin"], 4.3 / 6, float32_mean_tolerance(DIFFS), "margin")
    # ECE = Σ|acc - conf| / 6: each confidence σ(|d|) in float32 (2 eps of it) and moved by 1/4 of its d's rounding
    confidences = [sigmoid(abs(d)) for d in DIFFS]
    assert_within(m["ece"], want_ece, float32_mean_tolerance(confidences, 2) + 0.25 * float32_mean_tolerance(DIFFS), "ece")
    assert [b["n"] for b in m["bins"]] == [n for n, _, _ in want]
    chosen, rejected = [1, -1, 0, 0.5, 3, 0], [-1, 0, 0, 0, 0, 0.2]
    assert_within(m["chosen_mean"], sum(chosen) / 6, float32_mean_tolerance(chosen), "chosen_mean")
    assert_within(m["rejected_mean"], sum(rejected) / 6, float32_mean_tolerance(rejected), "rejected_mean")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmeval")
    sft = make_sft_folder(root / "sft")
    tok = make_tokenizer()
    torch.manual_seed(0)
    RewardModel.from_backbone(sft).save_pretrained(root / "rm", tokenizer=tok)
    PairRanker.from_backbone(sft, tokenizer=tok, max_length=64).save_pretrained(root / "pairrm")
    data = write_jsonl(root / "pairs.jsonl", preference_rows(30, seed=5))
    return root, data


@pytest.mark.parametrize("kind", ["rm", "pairrm"])
def test_rm_eval_cli_writes_the_metrics_json_and_prints_a_table(folders, tmp_path, capsys, kind):
    root, data = folders
    out = tmp_path / "res.json"
    assert main(["rm", "eval", "--model", str(root / kind), "--data", str(data), "--output", str(out),
                 "--num_bins", "4", "--batch_size", "7"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ECE" in printed and "[0.875,1.000]" in printed
    res = json.loads(out.read_text())
    assert {"accuracy", "margin", "ece", "bins", "n"} <= set(res) and res["n"] == 30 and len(res["bins"]) == 4
    model, tok = load_scoring_model(root / kind)
    with linear_terms((model.rm if kind == "pairrm" else model)._head()) as terms:
        direct = evaluate_reward_model(model, tok, parse_preferences(preference_rows(30, seed=5)), num_bins=4)
        # batches of 7 vs 16: a difference of two outputs moves by float32 rounding through the 2 decoder layers
        # (relative to the head's terms) of each; the margin is their mean, the ECE moves by at most 1/4 of it
        # (σ' <= 1/4); the accuracy counts signs, exactly
        diff = 2 * forward_factor(2) * EPS32 * max(float(t.max()) for t in terms)
        tolerance = {"accuracy": 0.0, "margin": diff, "ece": 0.25 * diff}
        for key in ("accuracy", "margin", "ece"):
            assert_within(res[key], direct[key], tolerance[key], key)
        if kind == "pairrm":  # the symmetric ranker is exactly antisymmetric in the two orders, up to rounding
            ranker = model
            ex = parse_preferences(preference_rows(1, seed=6))[0]
            p_ab = ranker.prob_a_better(ex.prompt, ex.chosen, ex.rejected)
            p_ba = ranker.prob_a_better(ex.prompt, ex.rejected, ex.chosen)  # the same rows in the other order
            # σ' <= 1/4 of the logits' rounding (halved in (l_ab - l_ba) / 2), and each σ: 2 eps of its value
            assert_within(p_ab + p_ba, 1.0, 0.25 * diff / 2 + sum_tolerance([p_ab, p_ba], 2), "p_ab + p_ba")


def test_rm_eval_bad_input_exits_2_and_writes_nothing(folders, tmp_path, capsys):
    root, data = folders
    out = tmp_path / "res.json"
    assert main(["rm", "eval", "--model", str(tmp_path / "nope"), "--data", str(data), "--output", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    rows = preference_rows(5, seed=1)
    rows[3]["chosen"] = 7
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["rm", "eval", "--model", str(root / "rm"), "--data", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 4" in err and "'chosen'" in err
    assert main(["rm", "eval", "--model", str(root / "rm"), "--data", str(data), "--num_bins", "0"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("share_prompts", [False, True])
@pytest.mark.parametrize("aggregation, aspects", [("last", None), ("mean", None), ("last", ["a", "b"])])
def test_forward_pairs_runs_each_distinct_sequence_once_with_the_same_outputs_and_gradients(
        tmp_path, aggregation, aspects, share_prompts):
    """K responses of a prompt, all pairs: 3 responses → 3 pairs → 6 rows, 3 distinct. The deduplicated forward
    gives the outputs and the gradient of the plain forward over all 6 rows (to float rounding), and runs the
    backbone on 3 rows only, trimmed to their own longest length; with shared prompts, on one packed row:
    the prompt once, then the 3 responses."""
    from rlhfkit.data.tokenize import TokenizedPair, collate_pairs
    from rlhfkit.train.rm_eval import forward_pairs

    torch.manual_seed(0)
    sft = make_sft_folder(tmp_path / "sft")
    model = RewardModel.from_backbone(str(sft), aggregation=aggregation, num_aspects=len(aspects or [0]),
                                      aspect_names=aspects).train()
    prompt, a, b, c = [5, 6, 7], [8, 9, 10, 11, EOS], [12, 13], [14, 15, 16]  # c ends without EOS
    pair = lambda x, y: TokenizedPair(prompt + x, prompt + y, 3, 3, None, 0)  # noqa: E731
    items = [pair(a, b), pair(a, c), pair(c, b)]
    batch = collate_pairs(items, PAD)
    seen, runs = [], []

    def record(module, args, kwargs):
        seen.append(tuple((args[0] if args else kwargs["input_ids"]).shape))

    handle = model.model.get_input_embeddings().register_forward_pre_hook(record, with_kwargs=True)

    def run(dedup: bool):
        model.zero_grad(set_to_none=True)
        if dedup:
            diff, chosen, rejected, out = forward_pairs(model, batch, share_prompts)
        else:
            out = model(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
            chosen, rejected = out.scores[:3], out.scores[3:]
            diff = chosen - rejected
        (diff.square().sum() + out.token_scores.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return diff.detach(), out, grads

    with linear_terms(model._head()) as terms:
        grad_terms = gradient_terms(model, lambda: runs.append(run(False)))
    (plain_diff, plain_out, plain_grads), = runs
    dedup_diff, dedup_out, dedup_grads = run(True)
    handle.remove()
    # float32 through the 2 decoder layers in other shapes: outputs relative to the head's terms (a difference of
    # two outputs: twice), gradients relative to theirs (forward and backward)
    scale, factor = terms[0].max(), forward_factor(2)
    # rows a, c, b once each; the longest distinct row has 3 + 5 tokens; packed: 3 + 5 + 3 + 2 tokens in one row
    assert seen == [(6, 8), (1, 13) if share_prompts else (3, 8)]
    assert_close_f32(dedup_diff, plain_diff, 2 * scale, factor, "diff")
    assert_close_f32(dedup_out.token_scores, plain_out.token_scores, scale, factor, "token_scores")
    if aspects:
        assert_close_f32(dedup_out.aspect_token_scores, plain_out.aspect_token_scores, scale, factor, "aspects")
    assert plain_grads.keys() == dedup_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        assert_close_f32(dedup_grads[name], g, grad_terms[name], gradient_factor(2), name)
    assert abs(plain_diff[0]) > 1e-3  # distinct responses score differently: the comparison has teeth


def kwise_items(vocab: int, seed: int = 0) -> list:
    """Three prompts with 3, 2 and 3 responses, every pair of each (3 + 1 + 3 = 7 pairs of 8 distinct responses);
    prompt lengths 5, 2, 7, response lengths (3, 6, 2), (4, 1), (5, 5, 3); rows 1..7 in that order."""
    import itertools

    from rlhfkit.data.tokenize import TokenizedPair

    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    items = []
    for plen, lengths in [(5, (3, 6, 2)), (2, (4, 1)), (7, (5, 5, 3))]:
        prompt, responses = toks(plen), [toks(n) for n in lengths]
        for a, b in itertools.combinations(range(len(responses)), 2):
            items.append(TokenizedPair(prompt + responses[a], prompt + responses[b], plen, plen, None,
                                       len(items) + 1))
    return items


def test_scoring_batches_keep_a_prompts_pairs_together_longest_first_by_hand():
    """By hand (`kwise_items`): pair widths (the longer row) are 11, 8, 11 | 6 | 12, 12, 12; groups by their
    longest pair: the third prompt (12), the first (11), the second (6); inside a group longest first, ties in
    order. Batches of 4: [4, 5, 6], then the first group does not fit beside it: [0, 2, 1] and the second joins
    it (3 + 1 = 4). Batches of 2: a group of 3 splits: [4, 5], [6]; [0, 2], [1] and [1, 3]."""
    from rlhfkit.train.rm_eval import scoring_batches

    items = kwise_items(100)
    assert scoring_batches(items, 4) == [[4, 5, 6], [0, 2, 1, 3]]
    assert scoring_batches(items, 2) == [[4, 5], [6], [0, 2], [1, 3]]
    assert scoring_batches(items, 100) == [[4, 5, 6, 0, 2, 1, 3]]
    assert scoring_batches(items[3:4], 1) == [[0]]


def test_evaluation_scores_equal_the_per_pair_padded_scores_and_run_each_response_once(tmp_path):
    """`score_pair_items` (grouped by prompt, packed) gives, in float64, the scores of scoring every pair alone
    on the padded path, to 1e-10; and the backbone embeds each of the 8 distinct responses once: 3 rows in the
    first batch, 5 in the second (`kwise_items`, batches of 4)."""
    from rlhfkit.train.rm_eval import collate_pair_items, forward_pairs, score_pair_items

    torch.manual_seed(0)
    model = RewardModel.from_backbone(str(make_sft_folder(tmp_path / "sft")), aggregation="last").double()
    items = kwise_items(model.config.vocab_size)
    diff, chosen, rejected = score_pair_items(model, items, batch_size=4)
    with torch.no_grad():
        plain = [forward_pairs(model, collate_pair_items([it], PAD), share_prompts=False, packing=False)
                 for it in items]
    want = torch.stack([torch.cat([c, r]) for _, c, r, _ in plain])
    # float64 values equal to 1e-10, each returned rounded to float32: at most one float32 unit apart
    torch.testing.assert_close(torch.stack([chosen, rejected], dim=1), want.float(), rtol=EPS32, atol=1e-10)
    torch.testing.assert_close(diff, torch.cat([d for d, _, _, _ in plain]).float(), rtol=EPS32, atol=1e-10)
    assert float(want.std()) > 1e-3  # the responses score differently: the comparison has teeth

    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    score_pair_items(model, items, batch_size=4)
    handle.remove()
    assert seen == [3, 5]
