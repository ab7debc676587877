"""train.output: the one output-folder check of both trainers (a previous run needs --resume or --overwrite; a
folder a run owns is never written into when it holds someone else's files), and what --overwrite removes."""

from __future__ import annotations

import pytest

from rlhfkit.errors import RlhfkitError
from rlhfkit.train.output import check_fresh_output, prepare_fresh_output
from rlhfkit.train.ppo_state import RUN_ENTRIES as PPO_ENTRIES
from rlhfkit.train.reward_trainer import RUN_ENTRIES as RM_ENTRIES


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("owns_folder", [False, True])
def test_a_missing_or_empty_folder_is_fresh(tmp_path, owns_folder):
    assert check_fresh_output(tmp_path / "new", PPO_ENTRIES, overwrite=False, owns_folder=owns_folder) == []
    (tmp_path / "empty").mkdir()
    assert check_fresh_output(tmp_path / "empty", PPO_ENTRIES, overwrite=False, owns_folder=owns_folder) == []
    prepare_fresh_output(tmp_path / "new", PPO_ENTRIES, overwrite=False, owns_folder=owns_folder)
    assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("entries,owns_folder", [(PPO_ENTRIES, False), (RM_ENTRIES, True)])
def test_a_previous_run_needs_resume_or_overwrite_with_one_message(tmp_path, entries, owns_folder):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RlhfkitError) as e:
        check_fresh_output(out, entries, overwrite=False, owns_folder=owns_folder)
    # the same text for both trainers: the folder, the run's entries found (in the trainer's order), the ways out
    assert str(e.value) == (f"output folder {out} already holds a run (metrics.jsonl, checkpoints); pass --resume "
                            f"to continue it, --overwrite to replace it, or choose another --output")
    assert _files(out) == ["checkpoints", "metrics.jsonl"]  # read-only


def test_overwrite_of_a_ppo_run_removes_its_entries_and_leaves_other_files(tmp_path):
    out = tmp_path / "out"
    (out / "policy").mkdir(parents=True)
    (out / "policy" / "model.safetensors").write_text("x")
    (out / "samples.jsonl").write_text("")
    (out / "notes.txt").write_text("mine")
    assert check_fresh_output(out, PPO_ENTRIES, overwrite=True) == ["samples.jsonl", "policy"]
    prepare_fresh_output(out, PPO_ENTRIES, overwrite=True)
    assert _files(out) == ["notes.txt"]
    # another PPO output with only foreign files is fresh (PPO writes under its own entry names)
    assert check_fresh_output(out, PPO_ENTRIES, overwrite=False) == []


def test_a_folder_the_run_owns_is_replaced_whole_and_a_foreign_one_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.yaml", "model.safetensors", "tokenizer.json"):  # a reward-model run: the model at the top
        (out / name).write_text("x")
    assert check_fresh_output(out, RM_ENTRIES, overwrite=True, owns_folder=True) == [
        "config.yaml", "model.safetensors", "tokenizer.json"]
    prepare_fresh_output(out, RM_ENTRIES, overwrite=True, owns_folder=True)
    assert _files(out) == []
    (out / "thesis.tex").write_text("my thesis")
    for overwrite in (False, True):
        with pytest.raises(RlhfkitError) as e:
            prepare_fresh_output(out, RM_ENTRIES, overwrite=overwrite, owns_folder=True)
        assert str(e.value).startswith(f"output folder {out} holds files of no rlhfkit run (thesis.tex); ")
        assert str(e.value).endswith("choose another --output")
    assert _files(out) == ["thesis.tex"]


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(RlhfkitError, match="is a file; choose another --output"):
        check_fresh_output(tmp_path / "out", PPO_ENTRIES, overwrite=True)
