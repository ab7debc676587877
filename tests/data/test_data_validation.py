"""One bad input per validation rule: the error names the file, the 1-based row and the field."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from rlhfkit.data import load_pointwise, load_preferences, load_prompts, parse_preferences, read_rows
from rlhfkit.errors import RlhfkitError

GOOD = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
USER = {"role": "user", "content": "Hi"}
ANSWER_A = {"role": "assistant", "content": "A"}
ANSWER_B = {"role": "assistant", "content": "B"}


def jsonl(tmp_path: Path, rows: list, name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # json.dumps writes NaN/Infinity
    return path


def expect(call, path: Path, row: int | None, field: str | None, problem: str) -> str:
    with pytest.raises(RlhfkitError) as info:
        call()
    message = str(info.value)
    assert message.startswith(str(path)), message
    if row is not None:
        assert f", row {row}" in message, message
    if field is not None:
        assert f"field {field!r}" in message, message
    assert re.search(problem, message), message
    return message


# ---- sources -------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    expect(lambda: read_rows(path), path, None, None, "file not found")


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("x")
    expect(lambda: read_rows(path), path, None, None,
           r"unknown file type; supported: \.json, \.jsonl, \.jsonl\.gz, \.json\.gz, \.parquet, \.csv")


def test_malformed_json_line_names_row_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n')  # blank lines are not rows: row 2 is on line 3
    expect(lambda: read_rows(path), path, 2, None, "malformed JSON on line 3")


def test_row_that_is_not_an_object(tmp_path):
    path = jsonl(tmp_path, [{"a": 1}, [1, 2]])
    expect(lambda: read_rows(path), path, 2, None, "expected an object .* got list")


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.json", "  \n"), ("e.csv", ""), ("e.json", "[]"),
                                          ("e.jsonl.gz", None)])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        with gzip.open(path, "wt") as f:
            f.write("\n")
    else:
        path.write_text(content)
    expect(lambda: read_rows(path), path, None, None, "empty|no rows")


def test_folder_not_written_by_save_to_disk(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    expect(lambda: read_rows(tmp_path), tmp_path, None, None, "a folder must be written by datasets' save_to_disk")


def test_json_top_level_object_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"a": 1,\n "b": }')  # neither one JSON document nor JSON lines
    expect(lambda: read_rows(path), path, 1, None, "malformed JSON on line 1")
    path.write_text('{"data": [{"a": 1}]}')
    expect(lambda: read_rows(path), path, None, None, "expected a top-level JSON array")


# ---- preferences ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,field,problem", [
    ({"prompt": "Q", "chosen": "good"}, "rejected", r"missing field \(the row has: chosen, prompt\)"),
    ({"prompt": "Q", "chosen": 3, "rejected": "bad"}, "chosen", "expected text, got an int"),
    ({"prompt": "   \n", "chosen": "good", "rejected": "bad"}, "prompt", "empty or whitespace-only text"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "identical to 'chosen'"),
    ({"prompt": "Q", "chosen": ["x"], "rejected": "bad"}, "chosen", "every row must use the same format"),
    ({"chosen": "good", "rejected": "bad"}, "prompt", "missing field"),
])
def test_explicit_row_errors(tmp_path, bad, field, problem):
    path = jsonl(tmp_path, [GOOD, GOOD, bad])
    expect(lambda: load_preferences(path), path, 3, field, problem)


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), "1.0", True])
def test_bad_margin(tmp_path, margin):
    path = jsonl(tmp_path, [dict(GOOD, margin=1.0), dict(GOOD, margin=margin)])
    expect(lambda: load_preferences(path), path, 2, "margin", "must be a finite number|expected a number")


def test_margin_on_some_rows_only(tmp_path):
    path = jsonl(tmp_path, [GOOD, dict(GOOD, margin=1.0)])
    expect(lambda: load_preferences(path), path, 2, "margin", "on every row or on none")
    path = jsonl(tmp_path, [dict(GOOD, margin=1.0), GOOD])
    expect(lambda: load_preferences(path), path, 2, "margin", "missing field")


def test_unknown_format_lists_keys_and_formats(tmp_path):
    path = jsonl(tmp_path, [{"question": "Q", "answer": "A"}])
    message = expect(lambda: load_preferences(path), path, 1, None, r"found keys \[answer, question\]")
    assert "explicit (prompt, chosen, rejected" in message and "implicit prompt" in message
    assert "conversational" in message


def test_implicit_without_turn_boundary(tmp_path):
    path = jsonl(tmp_path, [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
                            {"chosen": "just a good text", "rejected": "just a bad text"}])
    expect(lambda: load_preferences(path), path, 2, "chosen", "no common '.*Assistant:' turn")


def test_implicit_empty_remainder_and_skip_invalid(tmp_path):
    ok = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    empty = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: "}
    path = jsonl(tmp_path, [ok, empty, ok, dict(ok, chosen=ok["rejected"])])
    expect(lambda: load_preferences(path), path, 2, "rejected",
           r"empty response after the prompt .*\(and 1 more invalid row\(s\): 4; pass skip_invalid=True")
    got = load_preferences(path, skip_invalid=True)
    assert [e.row for e in got] == [1, 3]
    assert len(got.skipped) == 2 and "row 4, field 'rejected': identical to 'chosen'" in got.skipped[1]


def test_implicit_row_with_prompt_is_a_format_change(tmp_path):
    ok = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path = jsonl(tmp_path, [ok, dict(ok, prompt="x")])
    expect(lambda: load_preferences(path), path, 2, "prompt", "row 1 has no 'prompt'")


@pytest.mark.parametrize("chosen,field,problem", [
    ([{"content": "Hi"}, ANSWER_A], "chosen", "message 1 has no 'role'"),
    ([USER, {"role": "assistant"}], "chosen", "message 2 has no 'content'"),
    ([USER, {"role": "assistant", "content": " "}], "chosen", "message 2: 'content' is empty"),
    ([USER, {"role": "assistant", "content": 5}], "chosen", "message 2: 'content' must be text"),
    ([USER, "hello"], "chosen", "message 2 is not an object"),
    ([USER], "chosen", "no response: nothing follows the prompt messages"),
    ([USER, ANSWER_B], "rejected", "identical to 'chosen'"),
    ([USER, {"role": "user", "content": "more"}, ANSWER_A], "chosen", r"must be assistant message\(s\)"),
    ([{"role": "user", "content": "Other"}, ANSWER_A], "chosen", "share no leading messages"),
    ("text", "chosen", "expected a list of messages"),
])
def test_conversational_row_errors(tmp_path, chosen, field, problem):
    good = {"chosen": [USER, ANSWER_A], "rejected": [USER, ANSWER_B]}
    path = jsonl(tmp_path, [good, {"chosen": chosen, "rejected": [USER, ANSWER_B]}])
    expect(lambda: load_preferences(path), path, 2, field, problem)


def test_conversational_identical_responses(tmp_path):
    path = jsonl(tmp_path, [{"prompt": [USER], "chosen": [ANSWER_A], "rejected": [ANSWER_A]}])
    expect(lambda: load_preferences(path), path, 1, "rejected", "identical to 'chosen'")


def test_in_memory_rows_name_the_source():
    with pytest.raises(RlhfkitError, match=r"^my rows, row 1, field 'chosen': empty or whitespace-only text$"):
        parse_preferences([{"prompt": "Q", "chosen": "", "rejected": "b"}], source="my rows")


# ---- pointwise -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,field,problem", [
    ({"prompt": "p", "response": "r", "label": 2}, "label", "expected 0/1 or true/false"),
    ({"prompt": "p", "response": "r", "label": "yes"}, "label", "expected 0/1 or true/false"),
    ({"prompt": "p", "label": 1}, "response", "missing field"),
    ({"prompt": "p", "response": "", "label": 1}, "response", "empty"),
    ({"prompt": "p", "response": "r", "label": 1, "score": 0.5}, "score", "give exactly one target"),
    ({"prompt": "p", "response": "r", "score": 0.5}, None, "this row's target is 'score' but row 1's is 'label'"),
    ({"prompt": "p", "response": [USER], "label": 1}, "response", "must be assistant messages"),
])
def test_pointwise_row_errors(tmp_path, bad, field, problem):
    path = jsonl(tmp_path, [{"prompt": "p", "response": "r", "label": 0}, bad])
    expect(lambda: load_pointwise(path), path, 2, field, problem)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_pointwise_non_finite_score(tmp_path, value):
    rows = [{"prompt": "p", "response": "r", "score": 1.0}, {"prompt": "p", "response": "r", "score": value}]
    path = jsonl(tmp_path, rows)
    expect(lambda: load_pointwise(path), path, 2, "score", "must be a finite number")


def test_pointwise_non_finite_aspect(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "p", "response": "r", "scores": {"helpful": float("nan")}}])
    expect(lambda: load_pointwise(path), path, 1, "scores.helpful", "must be a finite number")
    path = jsonl(tmp_path, [{"prompt": "p", "response": "r", "helpful": 1.0, "honest": float("inf")}])
    expect(lambda: load_pointwise(path, aspects=["helpful", "honest"]), path, 1, "honest", "must be a finite number")


def test_pointwise_row_without_any_aspect(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "p", "response": "r", "a": 1.0}, {"prompt": "p", "response": "r", "b": 1.0}])
    expect(lambda: load_pointwise(path, aspects=["a"]), path, 2, None, r"no aspect score: at least one of \['a'\]")


def test_pointwise_without_target(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "p", "response": "r", "rating": 3}])
    expect(lambda: load_pointwise(path), path, 1, None, r"no target: found keys \[prompt, rating, response\]")


# ---- prompts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,field,problem", [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": 7}, "prompt", "expected text or a list of messages"),
    ({"prompt": [USER, ANSWER_A]}, "prompt", "must not end with an assistant message"),
    ({"prompt": [{"role": "user"}]}, "prompt", "message 1 has no 'content'"),
    ({"text": "x"}, "prompt", "missing field"),
])
def test_prompt_row_errors(tmp_path, bad, field, problem):
    path = jsonl(tmp_path, [{"prompt": "ok"}, bad])
    expect(lambda: load_prompts(path), path, 2, field, problem)


def test_messages_with_only_assistant_turns(tmp_path):
    path = jsonl(tmp_path, [{"messages": [USER]}, {"messages": [ANSWER_A]}])
    expect(lambda: load_prompts(path), path, 2, "messages", "only assistant messages")


def test_prompts_unknown_format(tmp_path):
    path = jsonl(tmp_path, [{"question": "x"}])
    expect(lambda: load_prompts(path), path, 1, None, r"found keys \[question\]; expected 'prompt'")
