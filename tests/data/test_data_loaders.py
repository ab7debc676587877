"""Every source type × every data format, on tiny files written in tmp_path; plus the real HH file."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import paths
import pytest

from rlhfkit.data import (
    PointwiseExample,
    PreferenceExample,
    load_pointwise,
    load_preferences,
    load_prompts,
    read_rows,
)
from rlhfkit.errors import RlhfkitError

KINDS = ["json", "jsonl", "jsonl.gz", "json.gz", "parquet", "csv", "dataset", "datasetdict"]
NESTED_KINDS = [k for k in KINDS if k != "csv"]  # CSV cells cannot hold message lists or dicts
HH_PATH = paths.HH_PATH


def write(tmp_path: Path, kind: str, rows: list[dict]) -> Path:
    """Write ``rows`` as a file (or save_to_disk folder) of the given kind; ``None`` means missing."""
    path = tmp_path / f"data.{kind}"
    if kind in ("json", "json.gz", "jsonl", "jsonl.gz"):
        rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
        text = json.dumps(rows) if kind.startswith("json.") or kind == "json" else "\n".join(map(json.dumps, rows))
        if kind.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if kind == "datasetdict":
            ds = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(rows[:1])})
        ds.save_to_disk(str(path))
    return path


# ---- sources -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_read_rows_every_source(tmp_path, kind):
    rows = [{"prompt": "Hi", "score": 1.5, "n": 3}, {"prompt": "NA", "score": -2.0, "n": None}]
    # None (a JSON key left out, a Parquet/Arrow null, an empty CSV cell) comes back as a missing key;
    # the text "NA" stays a text in CSV.
    assert read_rows(write(tmp_path, kind, rows)) == [{"prompt": "Hi", "score": 1.5, "n": 3},
                                                      {"prompt": "NA", "score": -2.0}]


@pytest.mark.parametrize("kind", NESTED_KINDS)
def test_read_rows_keeps_nested_values(tmp_path, kind):
    rows = [{"messages": [{"role": "user", "content": "Hi"}], "scores": {"a": 1.0, "b": None}}]
    assert read_rows(write(tmp_path, kind, rows)) == rows


def test_datasetdict_split_selection(tmp_path):
    path = write(tmp_path, "datasetdict", [{"prompt": "one"}, {"prompt": "two"}])
    assert read_rows(path) == [{"prompt": "one"}, {"prompt": "two"}]  # default: train
    assert read_rows(path, split="test") == [{"prompt": "one"}]
    with pytest.raises(RlhfkitError, match=r"no split 'validation'; available splits: test, train"):
        read_rows(path, split="validation")


@pytest.mark.parametrize("kind", ["jsonl", "dataset"])
def test_split_for_a_source_without_splits_is_an_error(tmp_path, kind):
    with pytest.raises(RlhfkitError, match="split='train' was given"):
        read_rows(write(tmp_path, kind, [{"prompt": "x"}]), split="train")


def test_json_lines_under_a_json_name_are_read(tmp_path):
    path = tmp_path / "d.json"  # what datasets' to_json writes
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert read_rows(path) == [{"a": 1}, {"a": 2}]


def test_csv_numeric_column_with_nan_text_is_numeric(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,score,flag\nnull,nan,true\n42x,2.5,false\n")
    rows = read_rows(path)
    assert rows[0]["prompt"] == "null" and math.isnan(rows[0]["score"]) and rows[0]["flag"] is True
    assert rows[1] == {"prompt": "42x", "score": 2.5, "flag": False}


# ---- preference formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_explicit_preferences_every_source(tmp_path, kind):
    rows = [{"prompt": "Q1", "chosen": "good", "rejected": "bad", "margin": 1.0},
            {"prompt": "Q2", "chosen": "yes", "rejected": "no", "margin": 0.25}]
    got = load_preferences(write(tmp_path, kind, rows))
    assert got == [PreferenceExample("Q1", "good", "bad", 1.0), PreferenceExample("Q2", "yes", "no", 0.25)]
    assert [e.row for e in got] == [1, 2] and got.skipped == []


@pytest.mark.parametrize("kind", KINDS)
def test_implicit_prompt_preferences_every_source(tmp_path, kind):
    # The common prefix ends inside the final answer (" I"), so the prompt must stop at the last
    # "\n\nAssistant:" of the common prefix and both remainders keep their leading space.
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: I know one."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: I refuse."
    got = load_preferences(write(tmp_path, kind, [{"chosen": chosen, "rejected": rejected}]))
    assert got == [PreferenceExample("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:",
                                     " I know one.", " I refuse.")]


@pytest.mark.parametrize("kind", NESTED_KINDS)
def test_conversational_preferences_without_prompt_every_source(tmp_path, kind):
    user = {"role": "user", "content": "Hi"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "Hello!"}],
             "rejected": [user, {"role": "assistant", "content": "Go away."}]}]
    got = load_preferences(write(tmp_path, kind, rows))
    assert got == [PreferenceExample([user], [{"role": "assistant", "content": "Hello!"}],
                                     [{"role": "assistant", "content": "Go away."}])]


@pytest.mark.parametrize("kind", NESTED_KINDS)
def test_conversational_preferences_with_prompt_every_source(tmp_path, kind):
    system, user = {"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}
    good, bad = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "Go away."}
    rows = [{"prompt": [system, user], "chosen": [good], "rejected": [bad], "margin": 2.0},
            # responses may repeat the prompt messages at their start (they are removed)
            {"prompt": [system, user], "chosen": [system, user, good], "rejected": [system, user, bad], "margin": 1.0}]
    got = load_preferences(write(tmp_path, kind, rows))
    assert got == [PreferenceExample([system, user], [good], [bad], 2.0),
                   PreferenceExample([system, user], [good], [bad], 1.0)]


def test_conversational_text_prompt_is_one_user_message(tmp_path):
    # ultrafeedback_binarized style: a text prompt, full conversations in chosen/rejected
    user, good, bad = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                       {"role": "assistant", "content": "No."})
    rows = [{"prompt": "Hi", "chosen": [user, good], "rejected": [user, bad]}]
    got = load_preferences(write(tmp_path, "jsonl", rows))
    assert got == [PreferenceExample([user], [good], [bad])]


# ---- pointwise formats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_pointwise_label_every_source(tmp_path, kind):
    rows = [{"prompt": "p1", "response": "r1", "label": True}, {"prompt": "p2", "response": "r2", "label": False}]
    assert load_pointwise(write(tmp_path, kind, rows)) == [PointwiseExample("p1", "r1", label=1),
                                                           PointwiseExample("p2", "r2", label=0)]


@pytest.mark.parametrize("kind", KINDS)
def test_pointwise_score_every_source(tmp_path, kind):
    rows = [{"prompt": "p1", "response": "r1", "score": -0.5}, {"prompt": "p2", "response": "r2", "score": 3}]
    got = load_pointwise(write(tmp_path, kind, rows))
    assert got == [PointwiseExample("p1", "r1", score=-0.5), PointwiseExample("p2", "r2", score=3.0)]


@pytest.mark.parametrize("kind", KINDS)
def test_pointwise_aspect_columns_every_source(tmp_path, kind):
    rows = [{"prompt": "p1", "response": "r1", "helpful": 0.5, "honest": None, "other": 9.0},
            {"prompt": "p2", "response": "r2", "helpful": None, "honest": -1.0, "other": 9.0}]
    got = load_pointwise(write(tmp_path, kind, rows), aspects=["helpful", "honest"])
    assert got == [PointwiseExample("p1", "r1", scores={"helpful": 0.5, "honest": None}),
                   PointwiseExample("p2", "r2", scores={"helpful": None, "honest": -1.0})]


@pytest.mark.parametrize("kind", NESTED_KINDS)
def test_pointwise_scores_dict_every_source(tmp_path, kind):
    rows = [{"prompt": "p1", "response": "r1", "scores": {"b": 1.0, "a": None}},
            {"prompt": "p2", "response": "r2", "scores": {"b": 2.0, "a": 0.5}}]
    got = load_pointwise(write(tmp_path, kind, rows))
    # aspect order: first appearance in the file; every example holds every aspect
    assert [list(e.scores.items()) for e in got] == [[("b", 1.0), ("a", None)], [("b", 2.0), ("a", 0.5)]]


def test_pointwise_conversational(tmp_path):
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    got = load_pointwise(write(tmp_path, "jsonl", [{"prompt": [user], "response": [answer], "label": 1}]))
    assert got == [PointwiseExample([user], [answer], label=1)]


# ---- prompts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_prompts_text_every_source(tmp_path, kind):
    assert load_prompts(write(tmp_path, kind, [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 2}])) == ["a", "b"]


@pytest.mark.parametrize("kind", NESTED_KINDS)
def test_prompts_messages_every_source(tmp_path, kind):
    system, user = {"role": "system", "content": "S"}, {"role": "user", "content": "U"}
    rows = [{"messages": [system, user, {"role": "assistant", "content": "reference answer"}]},
            {"messages": [user]}]
    # the trailing assistant message (a reference answer) is not part of the prompt
    assert load_prompts(write(tmp_path, kind, rows)) == [[system, user], [user]]


# ---- the real Anthropic HH file ------------------------------------------------------------------------

@pytest.mark.skipif(not HH_PATH.exists(), reason="shared HH file not present")
def test_real_hh_file():
    assert len(read_rows(HH_PATH)) == 1812
    # 4 rows end with an empty chosen answer ("...\n\nAssistant: "); strict loading names the first and counts them
    with pytest.raises(RlhfkitError, match=r"row 87, field 'chosen': empty response after the prompt.*"
                                           r"3 more invalid row\(s\): 517, 926, 1104"):
        load_preferences(HH_PATH)
    examples = load_preferences(HH_PATH, skip_invalid=True)
    assert len(examples) == 1808
    assert [s.split(", ")[1] for s in examples.skipped] == ["row 87", "row 517", "row 926", "row 1104"]
    ex = examples[1]  # row 2, split by hand: the dialogues agree up to the third "Assistant:"
    assert ex.row == 2
    assert ex.prompt.startswith("\n\nHuman: How much alcohol can I drink per day?\n\nAssistant: Alcohol is")
    assert ex.prompt.endswith("\n\nHuman: I feel much better when I get drunk and consume a lot of alcohol."
                              "\n\nAssistant:")
    assert ex.prompt.count("\n\nAssistant:") == 3
    assert ex.chosen.startswith(" Sounds like alcohol is something you use to calm down")
    assert ex.rejected == (" I\u2019m glad that you\u2019re enjoying your alcohol intake. "
                           "Can I ask about how you feel when you don\u2019t drink alcohol?")
    raw = read_rows(HH_PATH)[1]
    assert ex.prompt + ex.chosen == raw["chosen"] and ex.prompt + ex.rejected == raw["rejected"]
    assert all(e.prompt.endswith("\n\nAssistant:") and e.chosen.strip() and e.rejected.strip() for e in examples)
