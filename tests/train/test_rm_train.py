"""End-to-end tests of `rlhfkit rm train` on a tiny Llama: learning, every loss, exact accumulation, resume, saving,
and bad input (exit status 2, a message naming file/row/field, no output folder)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from rm_helpers import (WORDS, GOOD, PAD, VOCAB, accumulate, first_step, first_step_tolerances,  # noqa: F401
                        make_sft_folder,
                        make_tokenizer, one_thread, pointwise_rows, preference_rows, read_weights,  # (one_thread:
                        totals_tolerances, write_jsonl)  # autouse)
from tolerances import (EPS32, assert_close_f32, assert_within, forward_factor, gradient_factor, gradient_terms,
                        linear_terms)
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

from rlhfkit.cli import main
from rlhfkit.config import parse_config
from rlhfkit.data.pointwise import parse_pointwise
from rlhfkit.data.preference import parse_preferences
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.reward import RewardModel
from rlhfkit.train import checkpoint, reward_trainer
from rlhfkit.train.checkpoint import find_latest_checkpoint
from rlhfkit.train.rm_config import RMTrainConfig
from rlhfkit.train.rm_eval import evaluate_reward_model, load_scoring_model, pad_id_of
from rlhfkit.utils import read_jsonl

TIMING_KEYS = ("throughput/tokens_per_s", "time/step")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return make_sft_folder(tmp_path_factory.mktemp("sft") / "sft")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", preference_rows(240, seed=0))


def train(sft, data, out, *flags: str) -> int:
    return main(["rm", "train", "--model", str(sft), "--data", str(data), "--output", str(out), *flags])


def metrics(out, drop_timing: bool = True) -> list[dict]:
    rows = read_jsonl(out / "metrics.jsonl")
    return [{k: v for k, v in r.items() if not (drop_timing and k in TIMING_KEYS)} for r in rows]


def test_learns_a_held_out_preference_rule(sft, pairs, tmp_path):
    """Chosen responses hold the word 'good', rejected ones 'bad': held-out accuracy must go from chance to >= 95%."""
    out = tmp_path / "rm"
    assert train(sft, pairs, out, "--batch_size", "16", "--micro_batch_size", "8", "--learning_rate", "3e-3",
                 "--eval_fraction", "0.2", "--eval_steps", "1", "--logging_steps", "1") == 0
    rows = metrics(out)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert len(evals) == 12  # 192 training pairs / 16 per step, evaluated after each step
    assert evals[-1]["eval/accuracy"] >= 0.95
    assert evals[-1]["eval/margin"] > 1.0
    assert {"rm/loss", "rm/accuracy", "rm/margin", "rm/chosen_mean", "rm/rejected_mean", "train/lr",
            "train/grad_norm"} <= set(rows[0])
    assert set(TIMING_KEYS) <= set(read_jsonl(out / "metrics.jsonl")[0])
    assert any(p.name.startswith("events.") for p in (out / "tensorboard").iterdir())
    summary = json.loads((out / "eval_results.json").read_text())
    assert summary["eval/n"] == 48 and summary["eval/accuracy"] == evals[-1]["eval/accuracy"]
    # The untrained model (a random head and backbone) is far from the rule; the saved trained model reproduces it.
    _, held_out, _ = reward_trainer.load_examples(RMTrainConfig(model=str(sft), data=str(pairs), output=str(out),
                                                                eval_fraction=0.2))
    assert len(held_out) == 48
    untrained = RewardModel.from_backbone(sft)
    rm, tok = load_scoring_model(out)
    before = evaluate_reward_model(untrained, tok, held_out, batch_size=8)["accuracy"]
    after = evaluate_reward_model(rm, tok, held_out, batch_size=8)["accuracy"]
    assert before < 0.8 and after == summary["eval/accuracy"] >= 0.95
    # Plain transformers loads the folder and scores as rlhfkit does.
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([tok(f"w3 w4 {GOOD} w5")["input_ids"] + [tok.eos_token_id]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad(), linear_terms(rm._head()) as terms:
        ours = rm(ids, mask).scores
        # HF's own forward (its masks and kernels): float32 through the 2 decoder layers, relative to the head's terms
        assert_close_f32(hf(input_ids=ids).logits[:, 0], ours, terms[0].max(), forward_factor(2), "hf")


def test_group_by_prompt_learns_from_all_pairs_of_k_responses(sft, tmp_path):
    """K = 4 responses per prompt with 0-3 GOOD words, every pair with a difference labelled (InstructGPT's K-wise
    comparisons): trained with the prompt's pairs batched together, the model ranks held-out pairs by the rule."""
    import itertools
    import random

    rng = random.Random(5)
    rows = []
    for _ in range(40):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        responses = []
        for goodness in range(4):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))] + [GOOD] * goodness
            rng.shuffle(words)
            responses.append((goodness, " ".join(words)))
        for (ga, a), (gb, b) in itertools.combinations(responses, 2):
            rows.append({"prompt": prompt, "chosen": a if ga > gb else b, "rejected": b if ga > gb else a})
    data = write_jsonl(tmp_path / "kwise.jsonl", rows[:192])  # 32 prompts × 6 pairs; 8 held-out prompts
    held = write_jsonl(tmp_path / "held.jsonl", rows[192:])
    out = tmp_path / "rm"
    assert train(sft, data, out, "--group_by_prompt", "true", "--eval_data", str(held), "--batch_size", "12",
                 "--micro_batch_size", "6", "--learning_rate", "3e-3", "--epochs", "3", "--logging_steps", "16") == 0
    final = json.loads((out / "eval_results.json").read_text())
    assert final["eval/n"] == 48 and final["eval/accuracy"] >= 0.95


@pytest.mark.parametrize("loss, rows, extra", [
    ("logsigmoid", "pairs", ["--center_rewards_coef", "0.01"]),
    ("logexp", "pairs", []),
    ("margin", "margin", []),
    ("token_level", "pairs", []),
    ("bce", "label", []),
    ("ce2", "label", []),
    ("mse", "score", []),
    ("multi_objective", "aspects", ["--aspects", "helpful", "harmful", "--aspect_weights", "1.0", "-1.0"]),
    ("logsigmoid", "pairrm", ["--model_kind", "pairrm"]),
])
def test_every_loss_trains_and_lowers_its_loss_on_a_repeated_batch(sft, tmp_path, loss, rows, extra):
    """One global batch of 8 repeated for 6 epochs (6 steps): the training loss must fall."""
    if rows in ("pairs", "margin", "pairrm"):
        data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8, seed=1, margin=rows == "margin"))
    else:
        data = write_jsonl(tmp_path / "d.jsonl", pointwise_rows(8, rows, seed=1))
    out = tmp_path / "out"
    assert train(sft, data, out, "--loss", loss, "--batch_size", "8", "--micro_batch_size", "4", "--epochs", "6",
                 "--learning_rate", "3e-3", "--eval_fraction", "0", "--logging_steps", "1", *extra) == 0
    losses = [r["rm/loss"] for r in metrics(out)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    meta = json.loads((out / "rlhfkit.json").read_text())
    assert meta["kind"] == ("pairrm" if rows == "pairrm" else "decoder")
    if loss == "multi_objective":
        assert meta["aspects"] == {"names": ["helpful", "harmful"], "weights": [1.0, -1.0]}
    if loss == "ce2":
        assert meta["aspects"]["names"] == ["bad", "good"]


ACCUMULATION_CASES = [("logsigmoid", "pairs"), ("token_level", "pairs"), ("multi_objective", "aspects"),
                      ("bce", "label"), ("logsigmoid", "pairrm")]


@pytest.mark.parametrize("loss, kind", ACCUMULATION_CASES)
def test_micro_batches_accumulate_to_the_gradient_of_the_whole_batch(sft, loss, kind):
    """One forward of 8 vs micro-batches of 1+2+5 (different padding): the same gradient, to float rounding.

    multi_objective normalises by the observed (row, aspect) targets of the whole batch, which differ between micro
    batches (every third row lacks one aspect); weighting micro-batches by their row count would fail here.
    """
    extra = ["--aspects", "helpful", "harmful"] if kind == "aspects" else []
    if kind == "pairrm":
        extra = ["--model_kind", "pairrm"]
    cfg = parse_config(RMTrainConfig, ["--model", str(sft), "--data", "-", "--output", "-", "--loss", loss, *extra])
    if cfg.pairwise:
        examples = parse_preferences(preference_rows(8, seed=2))
    else:
        examples = parse_pointwise(pointwise_rows(8, kind, seed=2), aspects=cfg.aspects)
    tokenizer = make_tokenizer()
    items, _ = reward_trainer.tokenize_examples(cfg, tokenizer, examples, "-")
    model = reward_trainer.build_model(cfg, "pairrm" if kind == "pairrm" else "decoder", tokenizer).train()
    objective = (reward_trainer.PairwiseObjective if cfg.pairwise else reward_trainer.PointwiseObjective)(
        cfg, pad_id_of(model))
    runs = []
    terms = gradient_terms(model, lambda: runs.append(accumulate(model, objective, items, [8])))
    (whole, totals_whole), (split, totals_split) = runs[0], accumulate(model, objective, items, [1, 2, 5])
    assert whole.keys() == split.keys() and len(whole) > 0
    for name in whole:  # rounding only (a weighting error is ~10%+): the 2 decoder layers, forward and backward
        assert_close_f32(split[name], whole[name], terms[name], gradient_factor(2), name)
    assert_within(totals_split, totals_whole, totals_tolerances(model, objective, items), "totals")
    # A micro-batch weighted only by its row count would differ (guard that the case above is not trivial).
    if kind == "aspects":
        assert objective.weight(items[:1]) / objective.weight(items) != 1 / 8


def test_micro_batch_size_does_not_change_a_cli_run(sft, tmp_path):
    """End to end: batch 8 in one forward vs micro-batches of 2 give the same first step (its loss, accuracy,
    margin and grad_norm, which exposes any scale error that Adam itself would hide) to float32 rounding. Later
    steps start from weights that Adam made differ by up to ±lr wherever a gradient was of rounding size, so
    they are compared in what rounding cannot change (the gradients themselves: the accumulation test above)."""
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(16, seed=2))
    outs = []
    for micro in ("8", "2"):
        out = tmp_path / f"m{micro}"
        flags = ["--batch_size", "8", "--micro_batch_size", micro, "--learning_rate", "1e-3", "--eval_fraction", "0",
                 "--logging_steps", "1", "--max_grad_norm", "0.5"]
        assert train(sft, data, out, *flags) == 0
        outs.append(out)
    rows_a, rows_b = metrics(outs[0]), metrics(outs[1])
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2]
    tolerance = first_step_tolerances(["--model", str(sft), "--data", str(data), "--output", "-", *flags])
    assert rows_a[0].keys() == rows_b[0].keys() == tolerance.keys()
    for k in rows_a[0]:
        assert_within(rows_b[0][k], rows_a[0][k], tolerance[k], k)
    assert rows_a[1].keys() == rows_b[1].keys() and rows_a[1]["train/lr"] == rows_b[1]["train/lr"]


@pytest.mark.parametrize("flags", [[], ["--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]])
def test_resume_ends_exactly_like_an_uninterrupted_run(sft, pairs, tmp_path, monkeypatch, flags):
    common = ["--batch_size", "16", "--micro_batch_size", "8", "--learning_rate", "2e-3", "--epochs", "2",
              "--eval_fraction", "0.2", "--eval_steps", "5", "--save_steps", "4", "--logging_steps", "3",
              "--lr_scheduler", "cosine", "--warmup_ratio", "0.1", "--weight_decay", "0.01", *flags]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train(sft, pairs, full, *common) == 0

    real_save = checkpoint.save_checkpoint  # what `save_training_checkpoint` publishes each checkpoint with

    def save_then_die(output, step, write, keep_last):
        path = real_save(output, step, write, keep_last)
        if step == 16:  # in the second epoch, after a log (15) and an eval (15) window started
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    assert train(sft, pairs, cut, *common) == 130
    assert not (cut / "model.safetensors").exists()
    assert max(r["step"] for r in read_jsonl(cut / "metrics.jsonl")) == 15  # the last row before the crash
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert train(sft, pairs, cut, *common, "--resume") == 0

    assert metrics(cut) == metrics(full)
    a, b = read_weights(full), read_weights(cut)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["latest", "step-00000016", "step-00000020"]


def test_lora_freeze_and_checkpointing_train_and_save_a_merged_model(sft, pairs, tmp_path):
    out = tmp_path / "lora"
    assert train(sft, pairs, out, "--lora_r", "4", "--freeze_layers", "1", "--batch_size", "16", "--micro_batch_size",
                 "16", "--learning_rate", "3e-3", "--eval_fraction", "0.2", "--aggregation", "mean",
                 "--gradient_checkpointing", "--bf16") == 0
    rm = RewardModel.from_pretrained(out)  # LoRA merged: a plain HF folder
    assert rm.aggregation == "mean" and not any("lora" in k for k in read_weights(out))
    base = read_weights(sft)
    merged = read_weights(out)
    # layer 0 was frozen (its LoRA adapters too): its weights are the SFT model's, bit for bit
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[f"model.safetensors:{key}"], base[f"model.safetensors:{key}"])
    key1 = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(merged[f"model.safetensors:{key1}"], base[f"model.safetensors:{key1}"])


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random BERT encoder (no LM head) with the word-level tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert") / "bert"
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_encoder_backbone_is_detected_and_trained(bert, tmp_path, pairs):
    """model_kind=auto picks the encoder kind for a BERT folder; mean pooling; the head is saved beside it."""
    out = tmp_path / "out"
    assert train(bert, pairs, out, "--pooling", "mean", "--batch_size", "16", "--micro_batch_size", "16",
                 "--learning_rate", "3e-3", "--eval_fraction", "0.2") == 0
    meta = json.loads((out / "rlhfkit.json").read_text())
    assert meta["kind"] == "encoder" and meta["pooling"] == "mean" and (out / "reward_head.safetensors").is_file()
    assert json.loads((out / "eval_results.json").read_text())["eval/accuracy"] >= 0.9


def test_freeze_all_layers_trains_only_the_head(sft, pairs, tmp_path):
    out = tmp_path / "head"
    assert train(sft, pairs, out, "--freeze_layers", "-1", "--batch_size", "16", "--micro_batch_size", "16",
                 "--eval_fraction", "0", "--learning_rate", "1e-2") == 0
    base, trained = read_weights(sft), read_weights(out)
    changed = [k for k in trained if k.replace("score.weight", "") == k and not torch.equal(trained[k], base[k])]
    assert changed == [] and "model.safetensors:score.weight" in trained


# ----------------------------------------------------------------------------------------------------------
# Bad input: exit status 2, an actionable message, nothing written
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--loss", "hinge"], "invalid loss='hinge'"),
    (["--batch_size", "10", "--micro_batch_size", "4"], "multiple of micro_batch_size"),
    (["--lr_scheduler", "step"], "lr_scheduler"),
    (["--eval_fraction", "1.5"], "eval_fraction"),
    (["--aspects", "a"], "only used with loss=multi_objective"),
    (["--model_kind", "pairrm", "--loss", "logexp"], "pairrm"),
    (["--model_kind", "pairrm", "--center_rewards_coef", "0.1"], "PairRM outputs the probability"),
    (["--overlong", "cut"], "overlong"),
    (["--loss", "bce", "--group_by_prompt", "true"], "group_by_prompt"),
])
def test_bad_config_values_exit_2_and_write_nothing(sft, pairs, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    assert train(sft, pairs, out, *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--loss", "token_level"], "loss=token_level needs the causal per-token scores of a decoder model, but "
                                "model_kind=auto resolved to 'encoder'"),
    (["--aggregation", "sum"], "--aggregation sum applies to decoder reward models, but model_kind=auto "
                               "resolved to 'encoder'"),
])
def test_settings_an_auto_detected_encoder_cannot_use_exit_2_and_write_nothing(bert, pairs, tmp_path, capsys, flags,
                                                                              needle):
    out = tmp_path / "out"
    out.mkdir()  # an existing empty folder stays empty
    assert train(bert, pairs, out, "--batch_size", "8", "--micro_batch_size", "8", *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def _bad(tmp_path, rows):
    return write_jsonl(tmp_path / "bad.jsonl", rows)


@pytest.mark.parametrize("case", ["missing_field", "margin_missing", "label_missing", "too_long", "eval_bad"])
def test_bad_data_exits_2_naming_file_row_and_field(sft, tmp_path, capsys, case):
    good = preference_rows(40, seed=3)
    flags: list[str] = []
    if case == "missing_field":
        rows = [dict(r) for r in good]
        del rows[6]["rejected"]
        data, needle = _bad(tmp_path, rows), ["bad.jsonl", "row 7", "'rejected'"]
    elif case == "margin_missing":
        data, needle = _bad(tmp_path, good), ["bad.jsonl", "row 1", "'margin'", "loss=margin"]
        flags = ["--loss", "margin"]
    elif case == "label_missing":
        data, needle = _bad(tmp_path, pointwise_rows(10, "score")), ["bad.jsonl", "row 1", "'label'"]
        flags = ["--loss", "bce"]
    elif case == "too_long":
        rows = [dict(r) for r in good]
        rows[4]["prompt"] = " ".join(["w3"] * 50)
        data, needle = _bad(tmp_path, rows), ["bad.jsonl", "row 5", "max_length 32"]
        flags = ["--max_length", "32", "--overlong", "fail", "--eval_fraction", "0"]
    else:
        data = write_jsonl(tmp_path / "train.jsonl", good)
        rows = [dict(r) for r in good[:5]]
        rows[2]["chosen"] = "   "
        eval_path = write_jsonl(tmp_path / "held.jsonl", rows)
        flags, needle = ["--eval_data", str(eval_path)], ["held.jsonl", "row 3", "'chosen'"]
    out = tmp_path / "out"
    assert train(sft, data, out, "--batch_size", "8", *flags) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needle), err
    assert "Traceback" not in err
    assert not out.exists()


def test_skip_invalid_trains_on_the_valid_rows_and_reports_the_others(sft, tmp_path, capsys):
    rows = preference_rows(40, seed=3)
    rows[6]["chosen"] = rows[6]["rejected"]
    data = _bad(tmp_path, rows)
    out = tmp_path / "out"
    assert train(sft, data, out, "--batch_size", "8", "--eval_fraction", "0", "--skip_invalid") == 0
    printed = capsys.readouterr().out
    assert "skipped 1 invalid row(s)" in printed and "row 7" in printed
    assert "tokenized 39 examples" in printed


def test_refuses_to_train_into_a_used_folder_without_resume_or_overwrite(sft, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train(sft, pairs, out, "--batch_size", "16") == 2
    assert "holds files of no rlhfkit run (notes.txt)" in capsys.readouterr().err
    assert train(sft, pairs, out, "--batch_size", "16", "--overwrite") == 2  # not an rlhfkit run folder
    assert "holds files of no rlhfkit run (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert train(sft, pairs, tmp_path / "fresh", "--batch_size", "16", "--resume") == 2  # nothing to resume
    assert not (tmp_path / "fresh").exists()


def test_resume_refuses_a_changed_configuration(sft, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    assert train(sft, pairs, out, "--batch_size", "16", "--save_steps", "5", "--eval_fraction", "0") == 0
    assert train(sft, pairs, out, "--batch_size", "16", "--save_steps", "5", "--eval_fraction", "0",
                 "--learning_rate", "1e-3", "--resume") == 2
    assert "learning_rate" in capsys.readouterr().err


def test_an_unset_bf16_resumes_at_the_checkpoints_precision(sft, pairs, tmp_path, capsys):
    # through the trainer itself: an unset --bf16 takes the checkpoint's resolved value before the device's
    # default would resolve it (a run started with --bf16 continues in bf16 without repeating it); an explicit
    # other value is a changed setting
    out, common = tmp_path / "out", ["--batch_size", "16", "--save_steps", "5", "--eval_fraction", "0"]
    assert train(sft, pairs, out, *common) == 0
    ckpt = find_latest_checkpoint(out)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert saved["bf16"] is False  # the CPU's default, recorded (the resumed steps then run under bf16 autocast)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({**saved, "bf16": True}, sort_keys=False))
    assert train(sft, pairs, out, *common, "--resume") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["bf16"] is True
    capsys.readouterr()
    assert train(sft, pairs, out, *common, "--bf16", "false", "--resume") == 2
    assert "bf16: True -> False" in capsys.readouterr().err


def test_resume_refuses_another_run_length(sft, tmp_path, capsys):
    """The linear schedule is spread over epochs × steps per epoch: resuming with more epochs, or with a data file
    that now gives more optimizer steps, would not continue the checkpoint's schedule (nor its batch order)."""
    data, out = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(64, seed=3)), tmp_path / "out"
    common = ["--batch_size", "16", "--save_steps", "2", "--eval_fraction", "0", "--lr_scheduler", "linear"]
    assert train(sft, data, out, *common) == 0  # 64 pairs / 16 = 4 steps; checkpoint at step 2
    capsys.readouterr()
    assert train(sft, data, out, *common, "--epochs", "2", "--resume") == 2
    assert "epochs" in capsys.readouterr().err
    write_jsonl(data, preference_rows(96, seed=3))  # the same path, now 96 pairs = 6 steps
    metrics_before = (out / "metrics.jsonl").read_text()
    assert train(sft, data, out, *common, "--resume") == 2
    err = capsys.readouterr().err
    assert "96 training examples and 6 optimizer steps" in err and "64 examples and 4 steps" in err
    assert (out / "metrics.jsonl").read_text() == metrics_before  # nothing was written
    write_jsonl(data, preference_rows(64, seed=3))  # the original data: the resume goes through
    assert train(sft, data, out, *common, "--resume") == 0


def test_share_prompts_flag_reaches_the_model_and_gives_the_same_training(sft, tmp_path, monkeypatch):
    """`--share_prompts` (default on) packs every micro-batch's shared prompts; `false` packs none; both train.
    The packed forward is the same function: the gradient and totals of a global batch agree to float32 rounding,
    compared before training amplifies it (Adam's first steps move a weight by ±lr whatever the size of its
    gradient, so a gradient of rounding size can flip a whole step: weights after 2 epochs differ by up to lr)."""
    import rlhfkit.models.reward as reward_module

    calls = []
    real = reward_module.shared_prompt_layout

    def counting(*args, **kwargs):
        layout = real(*args, **kwargs)
        calls.append(layout is not None)
        return layout

    monkeypatch.setattr(reward_module, "shared_prompt_layout", counting)
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8, seed=1))
    common = ["--batch_size", "4", "--micro_batch_size", "2", "--epochs", "2", "--learning_rate", "3e-3",
              "--eval_fraction", "0", "--packing", "off"]  # the dense-mask path (--packing shares prompts itself)
    assert train(sft, data, tmp_path / "on", *common) == 0
    on, calls_on = read_weights(tmp_path / "on"), list(calls)
    calls.clear()
    assert train(sft, data, tmp_path / "off", "--share_prompts", "false", *common) == 0
    assert len(calls_on) == 8 and all(calls_on)  # 2 epochs × 2 steps × 2 micro-batches, each one packed
    assert calls == []
    off = read_weights(tmp_path / "off")
    assert on.keys() == off.keys()
    start = read_weights(sft)
    assert any(not torch.equal(on[n], start[n]) for n in on.keys() & start.keys())  # training moved the weights
    # The training signal with and without packing: the runs' micro-batches of 2 pairs, from the same initial model.
    cfg = parse_config(RMTrainConfig, ["--model", str(sft), "--data", "-", "--output", "-", "--packing", "off"])
    items, _ = reward_trainer.tokenize_examples(cfg, make_tokenizer(), parse_preferences(preference_rows(8, seed=1)),
                                                "-")
    model = reward_trainer.build_model(cfg, "decoder", make_tokenizer()).train()
    packed, plain = (reward_trainer.PairwiseObjective(replace(cfg, share_prompts=share), pad_id_of(model))
                     for share in (True, False))
    calls.clear()
    grads_on, totals_on = accumulate(model, packed, items, [2, 2, 2, 2])
    assert calls == [True] * 4
    runs = []
    terms = gradient_terms(model, lambda: runs.append(accumulate(model, plain, items, [2, 2, 2, 2])))  # unpacked
    (grads_off, totals_off), = runs
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    for name in grads_on:  # the 2 decoder layers, forward and backward
        assert_close_f32(grads_on[name], grads_off[name], terms[name], gradient_factor(2), name)
    assert_within(totals_on, totals_off, totals_tolerances(model, plain, items), "totals")


def test_packing_flag_reaches_the_model_and_a_run_ends_with_the_same_weights(sft, tmp_path, monkeypatch):
    """`--packing` (default auto) runs every micro-batch padding-free through `varlen_layout`; `off` never does.
    A one-step run with and without it: the same first-step metrics, and the same weights to float32 rounding.
    Adam's first step moves a weight by ``lr · g / (|g| + ε)`` (bias-corrected moments m̂ = g, v̂ = g²; no
    clipping, no weight decay here), so a rounding error e of the gradient g moves that weight by at most
    ``lr · e ε / (|g| − e + ε)²`` (the derivative ε / (|x| + ε)² of x / (|x| + ε) between g ± e), and by at
    most 2 lr where |g| <= e; e is the float32 bound of the 2 decoder layers' gradients (forward and backward)."""
    import rlhfkit.models.reward as reward_module

    calls = []
    real = reward_module.varlen_layout

    def counting(*args, **kwargs):
        layout = real(*args, **kwargs)
        calls.append(layout.segments is not None)
        return layout

    monkeypatch.setattr(reward_module, "varlen_layout", counting)
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8, seed=4))
    lr = 1e-3
    common = ["--batch_size", "8", "--micro_batch_size", "4", "--learning_rate", str(lr), "--eval_fraction", "0",
              "--logging_steps", "1", "--max_grad_norm", "0", "--lr_scheduler", "constant"]
    assert train(sft, data, tmp_path / "on", *common) == 0
    assert calls == [True, True]  # 1 step × 2 micro-batches, each packed
    calls.clear()
    assert train(sft, data, tmp_path / "off", *common, "--packing", "off") == 0
    assert calls == []
    (row_on,), (row_off,) = metrics(tmp_path / "on"), metrics(tmp_path / "off")
    flags = ["--model", str(sft), "--data", str(data), "--output", "-", *common, "--packing", "off"]
    tolerance, grads, terms = first_step(flags)
    assert row_on.keys() == row_off.keys() == tolerance.keys()
    for k in row_on:
        assert_within(row_on[k], row_off[k], tolerance[k], k)
    on, off, start = read_weights(tmp_path / "on"), read_weights(tmp_path / "off"), read_weights(sft)
    eps_adam = 1e-8  # torch.optim.AdamW's default, the trainer's
    assert set(on) == set(off) == {"model.safetensors:" + n.removeprefix("model.") for n in grads}  # all trained
    for name, g in grads.items():
        key = "model.safetensors:" + name.removeprefix("model.")
        e = gradient_factor(2) * EPS32 * terms[name]
        gap = (g.double().abs() - e).clamp(min=0)
        bound = lr * torch.minimum(torch.full_like(gap, 2.0), e * eps_adam / (gap + eps_adam) ** 2)
        # plus the float32 rounding of Adam's update (a few ops, relative to lr) and of each run's new weight
        bound += 4 * EPS32 * lr + 2 * EPS32 * off[key].double().abs()
        assert_within(on[key], off[key], bound, name)
        if key in start:
            assert not torch.equal(off[key], start[key]), name  # the step moved it


@pytest.mark.parametrize("flags", [["--loss", "token_level"], ["--aggregation", "sum", "--center_rewards_coef", "0.1"],
                                   ["--loss", "multi_objective", "--aspects", "helpful", "harmful"],
                                   ["--lora_r", "2", "--freeze_layers", "1"], ["--gradient_checkpointing"],
                                   ["--share_prompts", "false"]])
def test_packing_gives_the_gradient_of_the_padded_batch(sft, flags):
    """Every loss kind and model option through the packed path: the gradient and totals of a global batch (micro
    batches of 3 + 5) with --packing equal those of padded micro-batches to float32 rounding."""
    cfg = parse_config(RMTrainConfig, ["--model", str(sft), "--data", "-", "--output", "-", *flags])
    if cfg.pairwise:
        examples = parse_preferences(preference_rows(8, seed=5))
    else:
        examples = parse_pointwise(pointwise_rows(8, "aspects", seed=5), aspects=cfg.aspects)
    tokenizer = make_tokenizer()
    items, _ = reward_trainer.tokenize_examples(cfg, tokenizer, examples, "-")
    model = reward_trainer.build_model(cfg, "decoder", tokenizer).train()
    objective_cls = reward_trainer.PairwiseObjective if cfg.pairwise else reward_trainer.PointwiseObjective
    packed, plain = (objective_cls(replace(cfg, packing=p), pad_id_of(model)) for p in ("on", "off"))
    assert packed.packing and not plain.packing
    runs = []
    terms = gradient_terms(model, lambda: runs.append(accumulate(model, plain, items, [3, 5])))
    (g_plain, totals_plain), = runs
    g_packed, totals_packed = accumulate(model, packed, items, [3, 5])
    assert g_plain.keys() == g_packed.keys() and len(g_plain) > 0
    for name in g_plain:
        assert_close_f32(g_packed[name], g_plain[name], terms[name], gradient_factor(2), name)
    assert_within(totals_packed, totals_plain, totals_tolerances(model, plain, items), "totals")


def test_packing_on_refuses_what_it_cannot_pack(sft, bert, pairs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    for model, flags, needle in [(bert, [], "--packing on needs a decoder reward model"),
                                 (sft, ["--model_kind", "pairrm"], "--packing on needs a decoder reward model"),
                                 (sft, ["--packing", "sometimes"], "invalid packing='sometimes'")]:
        assert train(model, pairs, out, "--packing", "on", *flags) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        assert not out.exists()
    monkeypatch.setattr(RewardModel, "packing_problem", lambda self: "its attention implementation is 'eager'")
    assert train(sft, pairs, out, "--packing", "on") == 2
    err = capsys.readouterr().err
    assert "--packing on" in err and "'eager'" in err and not out.exists()
    assert train(sft, pairs, out, "--batch_size", "16", "--micro_batch_size", "16", "--eval_fraction", "0") == 0  # auto


def test_an_accelerate_state_with_mixed_precision_is_refused_not_inherited(sft, pairs, tmp_path):
    """Every Accelerator of a process shares one state: after a bf16 Trainer (TRL's RewardTrainer defaults to bf16)
    a plain ``Accelerator()`` would be bf16 too, and ``prepare`` would wrap the model in bf16 autocast. rm train
    refuses that state (naming it) instead of silently training in bf16, and writes nothing."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    out = tmp_path / "out"
    AcceleratorState._reset_state(True)  # earlier runs of this process left a state without mixed precision
    Accelerator(cpu=True, mixed_precision="bf16")
    try:
        with pytest.raises(RlhfkitError, match="mixed_precision='bf16'.*fresh process"):
            reward_trainer.run(parse_config(RMTrainConfig, ["--model", str(sft), "--data", str(pairs),
                                                            "--output", str(out)]))
    finally:
        AcceleratorState._reset_state(True)
    assert not out.exists()
    assert train(sft, pairs, out, "--epochs", "1") == 0  # a clean state trains
