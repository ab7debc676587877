"""Bad input, for every command: a matrix of malformed inputs, each run through the CLI entry point.

Every case must give exit status 2 and one ``rlhfkit: error: ...`` message that names the file, the 1-based row and
the field where there is one (asserted as exact substrings), no traceback, and write nothing: every file under the
case's working folder and the shared model folders is byte-for-byte the same afterwards (an output that did not
exist still does not exist; an existing folder is unchanged).

``docs/errors.md`` documents the matrix: its table lists exactly the ids of ``CASES`` (a test below checks it).
Tiny model folders are built once for the module; most cases fail in validation, before a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "train"))       # rm_helpers: the tiny "SFT" Llama and its word-level tokenizer
sys.path.insert(0, str(TESTS / "quickstart"))  # test_report.make_run: a complete synthetic quickstart run folder

from rm_helpers import make_sft_folder, make_tokenizer, one_thread, pointwise_rows, preference_rows  # noqa: E402,F401
from test_report import make_run  # noqa: E402

from rlhfkit.cli import main  # noqa: E402
from rlhfkit.models.reward import RewardModel  # noqa: E402

REPO = TESTS.parent
DOC = REPO / "docs" / "errors.md"
COMMANDS = ("rm train", "rm eval", "score", "ppo", "quickstart", "report")

# Rule rewards for the ppo cases, written as a module beside the model folders (importable as `bad_rewards:...`).
BAD_REWARDS = '''
def raises(prompts, responses):
    raise ValueError("the judge is offline")

def one_too_few(prompts, responses):
    return [0.0] * (len(responses) - 1)

def nan_second(prompts, responses):
    return [0.0, float("nan")] + [0.0] * (len(responses) - 2)

def text_first(prompts, responses):
    return ["high"] + [0.0] * (len(responses) - 1)

def fine(prompts, responses):
    return [float(len(r)) for r in responses]
'''
BROKEN_MODULE = 'raise ImportError("bad_rewards_broken needs the package judgekit")\n'


# ----------------------------------------------------------------------------------------------------------
# Fixtures: models once per module, a fresh working folder per case
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Models:
    root: Path
    sft: Path          # a tiny causal LM (HF folder with tokenizer): rm train's --model, ppo's --policy
    rm: Path           # a reward model saved by rlhfkit (decoder, last token)
    not_a_model: Path  # a folder holding a README only
    ranker: Path       # a seq2seq (SteamSHP-style) ranker on a tiny T5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("bad_inputs_models")
    sft = make_sft_folder(root / "sft")
    torch.manual_seed(0)
    RewardModel.from_backbone(sft).save_pretrained(root / "rm", tokenizer=make_tokenizer())
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "README.md").write_text("notes, not a model\n")
    (root / "bad_rewards.py").write_text(BAD_REWARDS)
    (root / "bad_rewards_broken.py").write_text(BROKEN_MODULE)
    from seq2seq_helpers import make_t5_folder

    from rlhfkit.models.seq2seq import Seq2SeqRanker

    Seq2SeqRanker.from_backbone(make_t5_folder(root / "t5"), max_length=64).save_pretrained(root / "ranker")
    return Models(root, sft, root / "rm", root / "not_a_model", root / "ranker")


def edited(rows: list[dict], edit: dict[int, dict] | None, drop: dict[int, str] | None) -> list[dict]:
    """``rows`` with ``edit[row]`` merged into and ``drop[row]`` removed from the 1-based rows."""
    for row, changes in (edit or {}).items():
        rows[row - 1].update(changes)
    for row, key in (drop or {}).items():
        del rows[row - 1][key]
    return rows


class Work:
    """A case's working folder (also the current directory) with helpers to write inputs and build argvs."""

    def __init__(self, tmp: Path, models: Models):
        self.tmp, self.m = tmp, models
        self.out = tmp / "out"

    # -- inputs --------------------------------------------------------------------------------------------
    def text(self, name: str, content: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        return path

    def jsonl(self, name: str, rows: list) -> Path:
        return self.text(name, "".join(json.dumps(r) + "\n" for r in rows))

    def prefs(self, name: str = "prefs.jsonl", n: int = 8, edit: dict[int, dict] | None = None,
              drop: dict[int, str] | None = None, margin: bool = False) -> Path:
        """Valid preference rows, with ``edit[row]`` merged into and ``drop[row]`` removed from the 1-based rows."""
        return self.jsonl(name, edited(preference_rows(n, seed=1, margin=margin), edit, drop))

    def points(self, kind: str, row: int, key: str, value, name: str = "points.jsonl") -> Path:
        rows = pointwise_rows(8, kind, seed=2)
        rows[row - 1][key] = value
        return self.jsonl(name, rows)

    def responses(self, name: str = "rows.jsonl", edit: dict[int, dict] | None = None,
                  drop: dict[int, str] | None = None) -> Path:
        """Valid prompt/response rows for `rlhfkit score`, edited as in `prefs`."""
        rows = [{"prompt": f"w{3 + i} w{4 + i}", "response": f"w{10 + i} good"} for i in range(6)]
        return self.jsonl(name, edited(rows, edit, drop))

    def prompts(self, name: str = "prompts.jsonl", rows: list | None = None) -> Path:
        return self.jsonl(name, rows if rows is not None else [{"prompt": f"w{3 + i} w{5 + i}"} for i in range(4)])

    # -- argvs -----------------------------------------------------------------------------------------------
    def rm_train(self, data: Path | str | None = None, *flags: str, model: Path | str | None = None) -> list[str]:
        return ["rm", "train", "--model", str(model or self.m.sft), "--data", str(data or self.prefs()),
                "--output", str(self.out), "--eval_fraction", "0", "--batch_size", "4", "--micro_batch_size", "2",
                "--max_length", "64", *flags]

    def rm_eval(self, data: Path | str | None = None, *flags: str, model: Path | str | None = None) -> list[str]:
        return ["rm", "eval", "--model", str(model or self.m.rm), "--data", str(data or self.prefs()),
                "--output", str(self.tmp / "eval.json"), *flags]

    def score(self, data: Path | str | None = None, *flags: str, model: Path | str | None = None) -> list[str]:
        return ["score", "--model", str(model or self.m.rm), "--data", str(data or self.responses()),
                "--output", str(self.tmp / "scores.jsonl"), *flags]

    def ppo(self, *flags: str, prompts: Path | str | None = None, reward: str = "bad_rewards:fine",
            policy: Path | str | None = None) -> list[str]:
        return ["ppo", "--policy", str(policy or self.m.sft), "--reward_model", reward,
                "--prompts", str(prompts or self.prompts()), "--output", str(self.out), "--iterations", "1",
                "--rollout_batch_size", "4", "--num_minibatches", "1", "--ppo_epochs", "1",
                "--micro_batch_size", "2", "--max_new_tokens", "4", *flags]

    def ppo_run_folder(self) -> Path:
        """``out/`` holding the files of a previous PPO run."""
        self.text("out/metrics.jsonl", '{"step": 1, "objective/kl": 0.1}\n')
        self.text("out/samples.jsonl", "")
        self.text("out/config.yaml", "seed: 0\n")
        return self.out

    def quickstart(self, *flags: str) -> list[str]:
        return ["quickstart", "--scale", "tiny", "--model", str(self.m.sft), "--output", str(self.out), *flags]


# ----------------------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    command: str
    bad_input: str
    build: Callable[[Work], tuple[list[str], tuple[str, ...]]]  # -> (argv, substrings the message must hold)
    own_process: bool = False  # run as `python -m rlhfkit.cli ...` to prove the end-to-end output (marked slow)


CASES: list[Case] = []


def case(id: str, command: str, bad_input: str, own_process: bool = False):
    def register(build):
        CASES.append(Case(id, command, bad_input, build, own_process))
        return build
    return register


GOOD = json.dumps(preference_rows(1, seed=1)[0])

# -- rm train: data files --------------------------------------------------------------------------------------
@case("rm-train-malformed-json-line", "rm train", "a JSONL line that is not JSON")
def _(w):
    data = w.text("prefs.jsonl", f"{GOOD}\n{GOOD}\n" + '{"prompt": "w3", "chosen": \n')
    return w.rm_train(data), ("prefs.jsonl, row 3: malformed JSON on line 3",)


@case("rm-train-row-not-an-object", "rm train", "a row that is a JSON list, not an object")
def _(w):
    return w.rm_train(w.text("prefs.jsonl", f"{GOOD}\n[1, 2]\n")), ("prefs.jsonl, row 2: expected an object",)


@case("rm-train-missing-chosen", "rm train", "a row without 'chosen'")
def _(w):
    return w.rm_train(w.prefs(drop={4: "chosen"})), ("prefs.jsonl, row 4, field 'chosen': missing field",)


@case("rm-train-missing-prompt", "rm train", "a row without 'prompt' (explicit format)")
def _(w):
    return w.rm_train(w.prefs(drop={2: "prompt"})), ("prefs.jsonl, row 2, field 'prompt': missing field",)


@case("rm-train-number-as-text", "rm train", "a number where a text is expected")
def _(w):
    return w.rm_train(w.prefs(edit={3: {"rejected": 5}})), ("prefs.jsonl, row 3, field 'rejected': expected text, "
                                                             "got an int",)


@case("rm-train-list-of-non-messages", "rm train", "a prompt that is a list of numbers, not messages")
def _(w):
    return w.rm_train(w.prefs(edit={2: {"prompt": [1, 2]}})), ("prefs.jsonl, row 2, field 'prompt': message 1 is "
                                                                "not an object",)


@case("rm-train-message-without-content", "rm train", "a chat message without 'content'")
def _(w):
    return (w.rm_train(w.prefs(edit={5: {"prompt": [{"role": "user"}]}})),
            ("prefs.jsonl, row 5, field 'prompt': message 1 has no 'content'",))


@case("rm-train-empty-chosen", "rm train", "an empty (whitespace-only) chosen text")
def _(w):
    return w.rm_train(w.prefs(edit={6: {"chosen": "  "}})), ("prefs.jsonl, row 6, field 'chosen': empty or "
                                                              "whitespace-only text",)


@case("rm-train-chosen-equals-rejected", "rm train", "chosen identical to rejected")
def _(w):
    return (w.rm_train(w.prefs(edit={2: {"chosen": "w3 good", "rejected": "w3 good"}})),
            ("prefs.jsonl, row 2, field 'rejected': identical to 'chosen'",))


@case("rm-train-hh-without-assistant-turn", "rm train", "Anthropic-HH rows without a common Assistant turn")
def _(w):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
            {"chosen": "hello there", "rejected": "goodbye"}]
    return w.rm_train(w.jsonl("hh.jsonl", rows)), ("hh.jsonl, row 2, field 'chosen': no common",)


@case("rm-train-nan-margin", "rm train", "a NaN margin (loss=margin)")
def _(w):
    data = w.prefs(margin=True, edit={3: {"margin": float("nan")}})
    return w.rm_train(data, "--loss", "margin"), ("prefs.jsonl, row 3, field 'margin': must be a finite number, "
                                                  "got nan",)


@case("rm-train-text-margin", "rm train", "a margin that is a text")
def _(w):
    data = w.prefs(margin=True, edit={2: {"margin": "high"}})
    return w.rm_train(data, "--loss", "margin"), ("prefs.jsonl, row 2, field 'margin': expected a number, "
                                                  "got text 'high'",)


@case("rm-train-margin-loss-without-margin", "rm train", "loss=margin on data without a margin column")
def _(w):
    return w.rm_train(w.prefs(), "--loss", "margin"), ("prefs.jsonl, row 1, field 'margin': loss=margin needs",)


@case("rm-train-inf-label", "rm train", "an infinite pointwise label (loss=bce)")
def _(w):
    return (w.rm_train(w.points("label", 4, "label", float("inf")), "--loss", "bce"),
            ("points.jsonl, row 4, field 'label': expected 0/1 or true/false, got a float inf",))


@case("rm-train-text-label", "rm train", "a pointwise label that is a text")
def _(w):
    return (w.rm_train(w.points("label", 2, "label", "yes"), "--loss", "bce"),
            ("points.jsonl, row 2, field 'label': expected 0/1 or true/false, got text 'yes'",))


@case("rm-train-nan-score", "rm train", "a NaN pointwise score (loss=mse)")
def _(w):
    return (w.rm_train(w.points("score", 5, "score", float("nan")), "--loss", "mse"),
            ("points.jsonl, row 5, field 'score': must be a finite number, got nan",))


@case("rm-train-inf-aspect-csv", "rm train", "an infinite aspect score in a CSV column (loss=multi_objective)")
def _(w):
    data = w.text("aspects.csv", "prompt,response,helpful,harmful\nw3 w4,w5 good,1.0,0.0\nw6,w7 bad,0.0,\n"
                                 "w8 w9,w10 good,inf,0.0\nw11,w12 bad,0.0,1.0\n")
    return (w.rm_train(data, "--loss", "multi_objective", "--aspects", "helpful", "harmful"),
            ("aspects.csv, row 3, field 'helpful': must be a finite number, got inf",))


@case("rm-train-overlong-fail", "rm train", "an over-long row with --overlong fail")
def _(w):
    data = w.prefs(edit={3: {"prompt": " ".join(["w3"] * 80)}})
    return (w.rm_train(data, "--overlong", "fail"),
            ("prefs.jsonl, row 3: too long", "> max_length 64"))


@case("rm-train-empty-file", "rm train", "an empty data file")
def _(w):
    return w.rm_train(w.text("prefs.jsonl", "\n  \n")), ("prefs.jsonl: the file is empty",)


@case("rm-train-unknown-extension", "rm train", "a data file with an unknown extension")
def _(w):
    return w.rm_train(w.text("prefs.txt", GOOD + "\n")), ("prefs.txt: unknown file type; supported:",)


@case("rm-train-missing-file", "rm train", "a data file that does not exist")
def _(w):
    return w.rm_train(w.tmp / "nowhere.jsonl"), ("nowhere.jsonl: file not found",)


@case("rm-train-bad-eval-data", "rm train", "a bad row in --eval_data")
def _(w):
    bad = w.prefs("held_out.jsonl", edit={2: {"chosen": ""}})
    return (w.rm_train(w.prefs(), "--eval_data", str(bad)),
            ("held_out.jsonl, row 2, field 'chosen': empty or whitespace-only text",))


# -- rm train: models, configs, output folder ---------------------------------------------------------------------
@case("rm-train-model-missing", "rm train", "a --model path that does not exist")
def _(w):
    return w.rm_train(model=w.tmp / "no_model"), ("model path", "no_model' does not exist")


@case("rm-train-model-not-a-model", "rm train", "a --model folder that holds no model")
def _(w):
    return w.rm_train(model=w.m.not_a_model), ("not_a_model' has no config.json and no .gguf file",)


@case("rm-train-seq2seq-answers-not-tokens", "rm train", "--model_kind seq2seq on a T5 whose tokenizer has no "
      "'A'/'B' tokens")
def _(w):
    folder = w.tmp / "t5-words"
    shutil.copytree(w.m.root / "t5", folder)
    make_tokenizer().save_pretrained(folder)  # the word-level tokenizer: 'A' and 'B' are both <unk>
    return (w.rm_train(None, "--model_kind", "seq2seq", model=folder),
            ("t5-words: the tokenizer encodes 'A' and 'B' as the same token 2",))


@case("rm-train-seq2seq-freeze-layers", "rm train", "--freeze_layers with --model_kind seq2seq")
def _(w):
    return (w.rm_train(None, "--model_kind", "seq2seq", "--freeze_layers", "1"),
            ("--freeze_layers does not apply to model_kind=seq2seq",))


@case("rm-train-yaml-unknown-key", "rm train", "a YAML config with an unknown key")
def _(w):
    config = w.text("rm.yaml", f"model: {w.m.sft}\ndata: {w.prefs()}\noutput: {w.out}\nlearnign_rate: 0.1\n")
    return ["rm", "train", "--config", str(config)], ("rm.yaml: unknown config key(s) ['learnign_rate']",)


@case("rm-train-yaml-wrong-type", "rm train", "a YAML config value of the wrong type (a list for an integer)")
def _(w):
    config = w.text("rm.yaml", f"model: {w.m.sft}\ndata: {w.prefs()}\noutput: {w.out}\nepochs: [1, 2]\n")
    return ["rm", "train", "--config", str(config)], ("rm.yaml, field 'epochs': expected an integer, got a list",)


@case("rm-train-flag-wrong-type", "rm train", "a flag value of the wrong type")
def _(w):
    return w.rm_train(None, "--epochs", "two"), ("--epochs: invalid int value: 'two'",)


@case("rm-train-out-of-range", "rm train", "an out-of-range value")
def _(w):
    return w.rm_train(None, "--learning_rate", "-1"), ("invalid learning_rate=-1.0; must be > 0",)


@case("rm-train-unknown-choice", "rm train", "a value outside the choices")
def _(w):
    return w.rm_train(None, "--loss", "hinge"), ("invalid loss='hinge'; choose one of",)


@case("rm-train-resume-nothing", "rm train", "--resume with no checkpoint to resume")
def _(w):
    return w.rm_train(None, "--resume"), ("--resume: no checkpoint found under", "checkpoints")


@case("rm-train-output-exists", "rm train", "an --output folder that holds a run, without --overwrite")
def _(w):
    w.text("out/metrics.jsonl", '{"step": 1}\n')
    return w.rm_train(), ("output folder", "already holds a run (metrics.jsonl); pass --resume to continue it, "
                                           "--overwrite to replace it, or choose another --output")


@case("rm-train-overwrite-not-a-run", "rm train", "--overwrite of a folder that is not an rlhfkit run")
def _(w):
    w.text("out/thesis.tex", "my thesis\n")
    return w.rm_train(None, "--overwrite"), ("holds files of no rlhfkit run (thesis.tex)", "choose another --output")


# -- rm eval -----------------------------------------------------------------------------------------------------
@case("rm-eval-causal-lm", "rm eval", "a causal LM folder where a reward model is expected")
def _(w):
    return w.rm_eval(model=w.m.sft), ("is not a reward model folder", "LlamaForCausalLM")


@case("rm-eval-model-missing", "rm eval", "a --model folder that does not exist")
def _(w):
    return w.rm_eval(model=w.tmp / "no_rm"), ("reward model folder", "no_rm' not found")


@case("rm-eval-not-a-model", "rm eval", "a --model folder that holds no model")
def _(w):
    return w.rm_eval(model=w.m.not_a_model), ("not_a_model' is not a reward model folder (no config.json)",)


@case("rm-eval-missing-rejected", "rm eval", "a row without 'rejected'")
def _(w):
    return w.rm_eval(w.prefs(drop={7: "rejected"})), ("prefs.jsonl, row 7, field 'rejected': missing field",)


@case("rm-eval-overlong-fail", "rm eval", "an over-long row with --overlong fail")
def _(w):
    data = w.prefs(edit={2: {"chosen": " ".join(["w4"] * 40) + " good"}})
    return w.rm_eval(data, "--max_length", "16", "--overlong", "fail"), ("prefs.jsonl, row 2: too long",)


@case("rm-eval-json-not-an-array", "rm eval", "a .json file holding an object, not an array of rows")
def _(w):
    return w.rm_eval(w.text("prefs.json", GOOD)), ("prefs.json: expected a top-level JSON array",)


@case("rm-eval-corrupt-metadata", "rm eval", "a reward-model folder whose rlhfkit.json is not JSON")
def _(w):
    import shutil

    rm = w.tmp / "rm_copy"
    shutil.copytree(w.m.rm, rm)
    (rm / "rlhfkit.json").write_text("{not json")
    return w.rm_eval(model=rm), ("rlhfkit.json: not valid JSON",)


# -- score -------------------------------------------------------------------------------------------------------
@case("score-missing-response", "score", "a row without 'response'")
def _(w):
    return w.score(w.responses(drop={4: "response"})), ("rows.jsonl, row 4, field 'response': missing field",)


@case("score-number-as-prompt", "score", "a number where the prompt text is expected")
def _(w):
    return w.score(w.responses(edit={2: {"prompt": 3.5}})), ("rows.jsonl, row 2, field 'prompt': expected text or a "
                                                              "list of messages, got a float",)


@case("score-user-message-as-response", "score", "response messages that are not assistant messages")
def _(w):
    data = w.responses(edit={3: {"response": [{"role": "user", "content": "w3"}]}})
    return w.score(data), ("rows.jsonl, row 3, field 'response': response messages must all have role 'assistant'",)


@case("score-empty-csv-cell", "score", "an empty CSV cell for the response")
def _(w):
    data = w.text("rows.csv", "prompt,response\nw3 w4,w5 good\nw6 w7,\nw8,w9 bad\n")
    return w.score(data), ("rows.csv, row 2, field 'response': missing field",)


@case("score-corrupt-parquet", "score", "a .parquet file that is not Parquet")
def _(w):
    return w.score(w.text("rows.parquet", "PAR1 not really")), ("rows.parquet: cannot read the Parquet file",)


@case("score-overlong-fail", "score", "an over-long row with --overlong fail")
def _(w):
    data = w.responses(edit={5: {"response": " ".join(["w9"] * 40)}})
    return w.score(data, "--max_length", "16", "--overlong", "fail"), ("rows.jsonl, row 5: too long",)


@case("score-ranker", "score", "a ranker folder (seq2seq), which compares two responses")
def _(w):
    return w.score(model=w.m.ranker), ("is a seq2seq (SteamSHP-style) ranker: it compares two responses",)


@case("score-causal-lm", "score", "a causal LM folder where a reward model is expected")
def _(w):
    return w.score(model=w.m.sft), ("is not a reward model folder", "LlamaForCausalLM")


@case("score-bad-reference-row", "score", "a bad row in the --fit_reference file")
def _(w):
    ref = w.responses("reference.jsonl", edit={2: {"response": "   "}})
    return (w.score(None, "--fit_reference", str(ref)),
            ("reference.jsonl, row 2, field 'response': empty or whitespace-only text",))


@case("score-reference-too-few-rows", "score", "a --fit_reference file with a single row")
def _(w):
    ref = w.jsonl("reference.jsonl", [{"prompt": "w3", "response": "w4"}])
    return (w.score(None, "--fit_reference", str(ref)),
            ("reference.jsonl: --fit_reference needs at least 2 scored rows",))


@case("score-reference-normalisation-without-statistics", "score", "--normalize reference on a model without "
      "reference statistics")
def _(w):
    return w.score(None, "--normalize", "reference"), ("--normalize reference needs reference statistics",)


@case("score-bad-clip", "score", "an out-of-range --clip")
def _(w):
    return w.score(None, "--clip", "0"), ("invalid clip=0.0; must be > 0",)


# -- ppo: prompts ----------------------------------------------------------------------------------------------
@case("ppo-prompts-no-rows", "ppo", "a prompt file with no rows (an empty JSON array)")
def _(w):
    return w.ppo(prompts=w.text("prompts.json", "[]")), ("prompts.json: the file holds no rows",)


@case("ppo-prompts-blank-file", "ppo", "a prompt file with blank lines only")
def _(w):
    return w.ppo(prompts=w.text("prompts.jsonl", "\n\n")), ("prompts.jsonl: the file is empty",)


@case("ppo-prompt-empty-text", "ppo", "an empty prompt text")
def _(w):
    prompts = w.prompts(rows=[{"prompt": "w3 w4"}, {"prompt": ""}])
    return w.ppo(prompts=prompts), ("prompts.jsonl, row 2, field 'prompt': empty or whitespace-only text",)


@case("ppo-prompt-ends-with-assistant", "ppo", "a conversational prompt ending with an assistant message")
def _(w):
    rows = [{"prompt": [{"role": "user", "content": "w3"}]},
            {"prompt": [{"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4"}]}]
    return w.ppo(prompts=w.prompts(rows=rows)), ("prompts.jsonl, row 2, field 'prompt': a prompt must not end with "
                                                 "an assistant message",)


@case("ppo-prompts-unknown-format", "ppo", "prompt rows without 'prompt' or 'messages'")
def _(w):
    return w.ppo(prompts=w.prompts(rows=[{"text": "w3"}])), ("prompts.jsonl, row 1: unknown prompt format",)


@case("ppo-prompt-overlong-fail", "ppo", "an over-long prompt with --overlong fail")
def _(w):
    prompts = w.prompts(rows=[{"prompt": "w3 w4"}, {"prompt": " ".join(["w5"] * 30)}])
    return (w.ppo("--max_prompt_length", "8", "--overlong", "fail", prompts=prompts),
            ("prompts.jsonl, row 2: too long",))


# -- ppo: reward sources ---------------------------------------------------------------------------------------
@case("ppo-reward-raises", "ppo", "a reward function that raises", own_process=True)
def _(w):
    return (w.ppo(reward="bad_rewards:raises"),
            ("reward function 'bad_rewards:raises' raised ValueError: the judge is offline",))


@case("ppo-reward-wrong-count", "ppo", "a reward function that returns one score too few")
def _(w):
    return (w.ppo(reward="bad_rewards:one_too_few"),
            ("reward function 'bad_rewards:one_too_few' returned 3 scores for 4 responses",))


@case("ppo-reward-nan", "ppo", "a reward function that returns NaN")
def _(w):
    return (w.ppo(reward="bad_rewards:nan_second"),
            ("reward function 'bad_rewards:nan_second' returned a non-finite score (nan) for row 1",))


@case("ppo-reward-text", "ppo", "a reward function that returns a text")
def _(w):
    return (w.ppo(reward="bad_rewards:text_first"),
            ("reward function 'bad_rewards:text_first' returned 'high' for row 0",))


@case("ppo-reward-missing-function", "ppo", "a reward spec 'module:missing'")
def _(w):
    return w.ppo(reward="bad_rewards:missing"), ("reward function 'bad_rewards:missing': module 'bad_rewards' has no "
                                                 "attribute 'missing'",)


@case("ppo-reward-missing-module", "ppo", "a reward spec whose module does not exist")
def _(w):
    return w.ppo(reward="no_such_rewards:fn"), ("cannot import module 'no_such_rewards'",)


@case("ppo-reward-module-fails-to-import", "ppo", "a reward module that raises when imported")
def _(w):
    return (w.ppo(reward="bad_rewards_broken:fn"),
            ("reward function 'bad_rewards_broken:fn': importing module 'bad_rewards_broken' raised ImportError: "
             "bad_rewards_broken needs the package judgekit",))


@case("ppo-monitor-reward-raises", "ppo", "a --monitor_rewards function that raises")
def _(w):
    return (w.ppo("--monitor_rewards", "bad_rewards:raises"),
            ("reward function 'bad_rewards:raises' raised ValueError: the judge is offline",))


@case("ppo-reward-causal-lm", "ppo", "a causal LM folder as --reward_model")
def _(w):
    return w.ppo(reward=str(w.m.sft)), ("is not a reward model folder", "LlamaForCausalLM")


@case("ppo-ranker-reference-missing", "ppo", "a ranker --reward_model with prompts that have no 'reference'")
def _(w):
    return w.ppo(reward=str(w.m.ranker)), ("prompts.jsonl, row 1, field 'reference': missing field",)


@case("ppo-ranker-reference-empty", "ppo", "a ranker --reward_model with an empty 'reference'")
def _(w):
    rows = [{"prompt": f"w{3 + i} w{5 + i}", "reference": "w9 w10" if i != 2 else " "} for i in range(4)]
    return (w.ppo(reward=str(w.m.ranker), prompts=w.prompts(rows=rows)),
            ("prompts.jsonl, row 3, field 'reference': empty or whitespace-only text",))


@case("ppo-reward-weights-count", "ppo", "two --reward_weights for one reward source")
def _(w):
    return w.ppo("--reward_weights", "1", "2"), ("reward_weights: 2 weights for 1 reward sources",)


# -- ppo: models, configs, output folder -----------------------------------------------------------------------
@case("ppo-policy-missing", "ppo", "a --policy path that does not exist")
def _(w):
    return w.ppo(policy=w.tmp / "no_policy"), ("no_policy' does not exist",)


@case("ppo-policy-not-a-model", "ppo", "a --policy folder that holds no model")
def _(w):
    return w.ppo(policy=w.m.not_a_model), ("not_a_model' has no config.json and no .gguf file",)


@case("ppo-yaml-not-a-mapping", "ppo", "a YAML config that is a list, not a mapping")
def _(w):
    return ["ppo", "--config", str(w.text("ppo.yaml", "- policy\n- prompts\n"))], (
        "ppo.yaml: a config file must be a mapping of keys to values, got list",)


@case("ppo-yaml-invalid", "ppo", "a YAML config that does not parse")
def _(w):
    return ["ppo", "--config", str(w.text("ppo.yaml", "policy: [unclosed\n"))], ("ppo.yaml: not valid YAML",)


@case("ppo-yaml-wrong-type", "ppo", "a YAML config value of the wrong type (a mapping for a number)")
def _(w):
    config = w.text("ppo.yaml", f"policy: {w.m.sft}\nreward_model: [bad_rewards:fine]\nprompts: {w.prompts()}\n"
                                f"output: {w.out}\nkl_coef: {{value: 0.1}}\n")
    return ["ppo", "--config", str(config)], ("ppo.yaml, field 'kl_coef': expected a number, got a dict",)


@case("ppo-yaml-mapping-for-list", "ppo", "a YAML config mapping where a list is expected")
def _(w):
    config = w.text("ppo.yaml", f"policy: {w.m.sft}\nreward_model: [bad_rewards:fine]\nprompts: {w.prompts()}\n"
                                f"output: {w.out}\nstop_token_ids: {{eos: 3}}\n")
    return ["ppo", "--config", str(config)], ("ppo.yaml, field 'stop_token_ids': expected a list of integers, got a "
                                              "dict",)


@case("ppo-out-of-range", "ppo", "an out-of-range value")
def _(w):
    return w.ppo("--clip_range", "0"), ("invalid clip_range=0.0; must be > 0",)


@case("ppo-resume-nothing", "ppo", "--resume with no checkpoint to resume")
def _(w):
    return w.ppo("--resume"), ("--resume: no checkpoint found under",)


@case("ppo-output-exists", "ppo", "an --output folder that holds a run, without --overwrite")
def _(w):
    w.ppo_run_folder()
    return w.ppo(), ("output folder", "already holds a run (metrics.jsonl, samples.jsonl); pass --resume to continue "
                                      "it, --overwrite to replace it, or choose another --output")


@case("ppo-overwrite-then-reward-raises", "ppo", "--overwrite of a previous run with a reward function that raises")
def _(w):
    w.ppo_run_folder()
    return (w.ppo("--overwrite", reward="bad_rewards:raises"),
            ("reward function 'bad_rewards:raises' raised ValueError",))


# -- quickstart --------------------------------------------------------------------------------------------------
@case("quickstart-bad-scale", "quickstart", "a --scale that is not a preset")
def _(w):
    return ["quickstart", "--scale", "huge", "--output", str(w.out)], ("invalid scale='huge'; choose one of",)


@case("quickstart-bad-temperature", "quickstart", "a label temperature of 0")
def _(w):
    return ["quickstart", "--label_temperature", "0", "--output", str(w.out)], (
        "invalid label_temperature=0.0; must be > 0",)


@case("quickstart-seed-not-an-integer", "quickstart", "a --seed that is not an integer")
def _(w):
    return ["quickstart", "--seed", "abc", "--output", str(w.out)], ("--seed: invalid int value: 'abc'",)


@case("quickstart-model-missing", "quickstart", "a --model path that does not exist")
def _(w):
    return ["quickstart", "--model", str(w.tmp / "no_model"), "--output", str(w.out)], ("no_model' does not exist",)


@case("quickstart-output-not-a-run", "quickstart", "an --output folder with other files (it would be replaced)")
def _(w):
    w.text("out/thesis.tex", "my thesis\n")
    return w.quickstart(), ("does not look like a quickstart run folder", "refusing to replace it")


@case("quickstart-output-is-a-file", "quickstart", "an --output path that is a file")
def _(w):
    w.text("out", "a file\n")
    return w.quickstart(), ("is a file, not a run folder",)


@case("quickstart-yaml-unknown-key", "quickstart", "a YAML config with an unknown key")
def _(w):
    return ["quickstart", "--config", str(w.text("qs.yaml", "scale: tiny\nsed: 3\n"))], (
        "qs.yaml: unknown config key(s) ['sed']",)


# -- report ------------------------------------------------------------------------------------------------------
@case("report-not-a-run", "report", "a folder that is not a quickstart run")
def _(w):
    w.text("notes/readme.txt", "hello\n")
    return ["report", str(w.tmp / "notes")], ("incomplete run folder", "missing metrics/ppo.jsonl")


@case("report-missing-folder", "report", "a run folder that does not exist")
def _(w):
    return ["report", str(w.tmp / "nowhere")], ("run folder", "nowhere does not exist")


@case("report-a-file", "report", "a file instead of a run folder")
def _(w):
    return ["report", str(w.text("summary.md", "# hi\n"))], ("summary.md is not a folder",)


@case("report-missing-field", "report", "a metrics row without 'gold/mean'")
def _(w):
    run = make_run(w.tmp)
    _edit_jsonl(run / "metrics/ppo.jsonl", 2, lambda r: r.pop("gold/mean"))
    return ["report", str(run)], ("ppo.jsonl, row 2, field 'gold/mean': missing",)


@case("report-nan-gold", "report", "a NaN gold score in the evaluation rows")
def _(w):
    run = make_run(w.tmp)
    _edit_jsonl(run / "eval/after.jsonl", 3, lambda r: r.update(gold=float("nan")))
    return ["report", str(run)], ("after.jsonl, row 3, field 'gold': must be a finite number, got nan",)


@case("report-text-kl", "report", "a KL that is a text in the metrics rows")
def _(w):
    run = make_run(w.tmp)
    _edit_jsonl(run / "metrics/ppo.jsonl", 4, lambda r: r.update({"objective/kl": "low"}))
    return ["report", str(run)], ("ppo.jsonl, row 4, field 'objective/kl': expected a number, got 'low'",)


@case("report-malformed-summary", "report", "a summary.json that is not JSON")
def _(w):
    run = make_run(w.tmp)
    (run / "summary.json").write_text("{")
    return ["report", str(run)], ("summary.json: malformed JSON",)


@case("report-no-folder-argument", "report", "no run folder argument", own_process=True)
def _(w):
    return ["report"], ("rlhfkit report: the following arguments are required: run_dir",)


def _edit_jsonl(path: Path, row: int, change: Callable[[dict], object]) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows[row - 1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots (relative path -> SHA-256 of its bytes), folders included as entries."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, root.parent)
            out[rel + "/"] = ""
            for name in filenames:
                out[os.path.join(rel, name)] = hashlib.sha256(Path(dirpath, name).read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], cwd: Path, models: Models, capsys, in_subprocess: bool) -> tuple[int, str, str]:
    if not in_subprocess:
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(models.root)])}
    proc = subprocess.run([sys.executable, "-m", "rlhfkit.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("bad", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.own_process else [])
                                 for c in CASES])
def test_bad_input_names_file_row_and_field_without_traceback_and_writes_nothing(bad, models, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(models.root))
    for name in ("bad_rewards", "bad_rewards_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    argv, needles = bad.build(Work(tmp_path, models))
    assert argv[0] == bad.command.split()[0]
    before = snapshot(tmp_path, models.sft, models.rm)
    code, out, err = run_cli(argv, tmp_path, models, capsys, bad.own_process)
    assert code == 2, f"exit status {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err, err
    assert err.count("rlhfkit: error: ") == 1, err  # (a progress bar may come before it)
    message = err[err.index("rlhfkit: error: "):]
    for needle in needles:
        assert needle in message, f"{needle!r} not in the message:\n{message}"
    assert snapshot(tmp_path, models.sft, models.rm) == before, "the failed command wrote or changed files"


# ----------------------------------------------------------------------------------------------------------
# The matrix, its documentation, and its reach
# ----------------------------------------------------------------------------------------------------------
def documented_cases() -> dict[str, tuple[str, str]]:
    """``{case id: (command, bad input)}`` from the tables of docs/errors.md (first column: the id in backticks; the
    bad input without its code marks)."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z0-9-]+)` \| `rlhfkit ([a-z ]+)` \| (.+?) \| (.+) \|$", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice in {DOC.name}"
            rows[m.group(1)] = (m.group(2), m.group(3).replace("`", ""))
    return rows


def test_the_docs_table_lists_exactly_the_cases_with_their_commands_and_inputs():
    documented = documented_cases()
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    assert sorted(documented) == sorted(ids), (
        f"{DOC.name} and CASES differ: missing from the docs {sorted(set(ids) - set(documented))}, "
        f"not a case {sorted(set(documented) - set(ids))}")
    for c in CASES:
        assert documented[c.id] == (c.command, c.bad_input), f"{c.id}: the docs row differs from the case"


def test_the_matrix_covers_every_command_with_at_least_40_cases():
    assert len(CASES) >= 40
    assert {c.command for c in CASES} == set(COMMANDS)
    assert any(c.own_process for c in CASES)
