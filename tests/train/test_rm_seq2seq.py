"""`rlhfkit rm train --model_kind seq2seq` (and `auto` on an encoder-decoder config), `rm eval` and `score` with a
SteamSHP-style ranker on a tiny T5: learning, the symmetric score in the metrics, LoRA, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from rm_helpers import make_tokenizer as make_word_tokenizer, one_thread, preference_rows, write_jsonl  # noqa: F401
from seq2seq_helpers import make_t5_folder, make_tokenizer, t5_forward_factor
from tolerances import EPS32, assert_within, linear_terms
from transformers import AutoModelForSeq2SeqLM

from rlhfkit.cli import main
from rlhfkit.data.preference import parse_preferences
from rlhfkit.models.seq2seq import Seq2SeqRanker
from rlhfkit.train.rm_eval import evaluate_reward_model, load_scoring_model
from rlhfkit.utils import read_jsonl


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return make_t5_folder(tmp_path_factory.mktemp("t5") / "t5")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return (write_jsonl(root / "train.jsonl", preference_rows(192, seed=0)),
            write_jsonl(root / "held.jsonl", preference_rows(48, seed=1)))


def train(model, data, out, *flags: str) -> int:
    return main(["rm", "train", "--model", str(model), "--data", str(data), "--output", str(out), *flags])


@pytest.fixture(scope="module")
def trained(t5, data, tmp_path_factory):
    """`rm train` with model_kind auto on the T5 folder (resolved to seq2seq) on the GOOD/BAD rule: 144 steps (the
    tiny T5, without absolute positions, first sits near ln 2 while its relative-position biases learn which
    segment a word is in, then learns the rule; 120 steps sufficed on AVX-512 kernels, AVX2 ones ended the fifth
    window at a loss of 0.207: the sixth epoch leaves both below 0.2)."""
    out = tmp_path_factory.mktemp("run") / "rm"
    assert train(t5, data[0], out, "--eval_data", str(data[1]), "--batch_size", "8", "--micro_batch_size", "4",
                 "--learning_rate", "3e-3", "--lr_scheduler", "constant", "--epochs", "6", "--logging_steps", "24",
                 "--max_length", "64") == 0
    return out


def test_rm_train_learns_the_rule_and_saves_a_plain_seq2seq_folder(t5, data, trained):
    meta = json.loads((trained / "rlhfkit.json").read_text())
    assert meta["kind"] == "seq2seq" and meta["max_length"] == 64  # 'auto' resolved from is_encoder_decoder
    rows = read_jsonl(trained / "metrics.jsonl")
    assert {"rm/loss", "rm/accuracy", "rm/margin"} <= set(rows[0]) and "rm/chosen_mean" not in rows[0]
    assert len(rows) == 6 and rows[-1]["rm/loss"] < 0.2 < 0.6 < rows[0]["rm/loss"]  # ln 2 = 0.693: no preference
    summary = json.loads((trained / "eval_results.json").read_text())
    assert summary["eval/n"] == 48 and summary["eval/accuracy"] >= 0.95 and summary["eval/margin"] > 1.0
    held = parse_preferences(preference_rows(48, seed=1))
    untrained = Seq2SeqRanker.from_backbone(t5, max_length=64)
    before = evaluate_reward_model(untrained, untrained.tokenizer, held, batch_size=8)["accuracy"]
    model, tok = load_scoring_model(trained)
    after = evaluate_reward_model(model, tok, held, batch_size=8)["accuracy"]
    assert before < 0.8 and after == summary["eval/accuracy"]
    assert isinstance(model, Seq2SeqRanker) and model.max_length == 64
    hf, info = AutoModelForSeq2SeqLM.from_pretrained(trained, output_loading_info=True)  # plain transformers
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys"))


def test_rm_eval_cli_scores_the_symmetric_logit(trained, data, tmp_path, capsys):
    """rm eval's margin is the mean over pairs of d = (logit(c, r) - logit(r, c)) / 2, as for PairRM."""
    out = tmp_path / "res.json"
    assert main(["rm", "eval", "--model", str(trained), "--data", str(data[1]), "--output", str(out),
                 "--batch_size", "5"]) == 0
    assert "accuracy" in capsys.readouterr().out
    res = json.loads(out.read_text())
    summary = json.loads((trained / "eval_results.json").read_text())
    assert res["n"] == 48 and res["accuracy"] == summary["eval/accuracy"] and "chosen_mean" not in res
    model, _ = load_scoring_model(trained)
    held = parse_preferences(preference_rows(48, seed=1))
    with linear_terms(model.model.lm_head) as terms:
        d = model.symmetric_logits([e.prompt for e in held], [e.chosen for e in held], [e.rejected for e in held])
    scale = max(float(t[..., model.a_id].max() + t[..., model.b_id].max()) for t in terms)
    assert_within(res["margin"], float(d.double().mean()), t5_forward_factor() * EPS32 * scale, "margin")
    assert res["accuracy"] == float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def test_score_refuses_a_seq2seq_ranker(trained, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "w3", "response": "w4 good"}])
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(trained), "--data", str(rows), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "seq2seq (SteamSHP-style) ranker" in err and "reference" in err and not out.exists()


def test_lora_trains_and_is_merged_into_a_plain_folder(t5, data, tmp_path):
    out = tmp_path / "lora"
    assert train(t5, data[0], out, "--model_kind", "seq2seq", "--lora_r", "4", "--batch_size", "16",
                 "--micro_batch_size", "16", "--learning_rate", "3e-3", "--eval_fraction", "0",
                 "--logging_steps", "1") == 0
    losses = [r["rm/loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 12 and losses[-1] < losses[0]
    hf, info = AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys"))
    base = AutoModelForSeq2SeqLM.from_pretrained(t5)
    merged, original = dict(hf.named_parameters()), dict(base.named_parameters())
    assert not any("lora" in n for n in merged)
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert not torch.equal(merged[q], original[q])  # the adapter was merged into the base weight
    embed = "shared.weight"  # not a LoRA target: unchanged
    assert torch.equal(merged[embed], original[embed])


@pytest.mark.parametrize("flags, needle", [
    (["--model_kind", "seq2seq", "--loss", "logexp"], "leave loss at its default"),
    (["--model_kind", "seq2seq", "--center_rewards_coef", "0.1"], "a seq2seq ranker outputs the probability"),
    (["--model_kind", "seq2seq", "--aggregation", "sum"], "reads its first decoder step"),
    (["--model_kind", "seq2seq", "--pooling", "mean"], "--pooling mean applies to encoder"),
    (["--model_kind", "seq2seq", "--freeze_layers", "1"], "--freeze_layers does not apply to model_kind=seq2seq"),
    (["--model_kind", "seq2seq", "--packing", "on"], "--packing on needs a decoder"),
    (["--model_kind", "seq2seq", "--group_by_prompt", "true"], "--group_by_prompt does not apply"),
    (["--freeze_layers", "1"], "--freeze_layers does not apply to model_kind=auto resolved to 'seq2seq'"),
])
def test_settings_a_seq2seq_ranker_cannot_use_exit_2_and_write_nothing(t5, data, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    assert train(t5, data[0], out, *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_answers_that_are_not_single_tokens_and_a_decoder_backbone_are_errors(t5, data, tmp_path, capsys):
    """A T5 whose tokenizer lacks 'A' and 'B' (both map to <unk>), and --model_kind seq2seq on a causal LM."""
    from rm_helpers import make_sft_folder

    bad = tmp_path / "t5-words"
    AutoModelForSeq2SeqLM.from_pretrained(t5).save_pretrained(bad)
    make_word_tokenizer().save_pretrained(bad)
    out = tmp_path / "out"
    assert train(bad, data[0], out, "--model_kind", "seq2seq") == 2
    assert "'A' and 'B' as the same token" in capsys.readouterr().err and not out.exists()
    sft = make_sft_folder(tmp_path / "sft")
    assert train(sft, data[0], out, "--model_kind", "seq2seq") == 2
    assert "cannot load an encoder-decoder (seq2seq) LM" in capsys.readouterr().err and not out.exists()
    assert make_tokenizer()("A")["input_ids"] == [56, 1]  # the helpers' tokenizer: one token, then </s>
