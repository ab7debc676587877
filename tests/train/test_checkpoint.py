"""Checkpoints are published atomically; a failed write keeps the previous one as `latest`."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.train.checkpoint import (checkpoint_step, find_latest_checkpoint, load_state, require_latest_checkpoint,
                                      save_checkpoint, save_state)


class _Evil:
    """Stands for any class a malicious checkpoint could ask pickle to construct."""


def _writer(value):
    def write(folder):
        save_state(folder / "state.pt", {"w": torch.tensor([value]), "step": int(value)})
    return write


def test_save_find_and_prune(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _writer(step), keep_last=2)
    latest = find_latest_checkpoint(tmp_path)
    assert checkpoint_step(latest) == 3
    assert load_state(latest / "state.pt")["step"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000003"]


def test_kill_during_write_keeps_previous(tmp_path):
    save_checkpoint(tmp_path, 1, _writer(1))

    def dying_writer(folder):
        save_state(folder / "state.pt", {"partial": torch.zeros(1)})
        raise KeyboardInterrupt  # the process is interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, dying_writer)
    latest = require_latest_checkpoint(tmp_path)
    assert checkpoint_step(latest) == 1 and load_state(latest / "state.pt")["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]


def test_latest_pointer_missing_falls_back_to_scan(tmp_path):
    save_checkpoint(tmp_path, 4, _writer(4))
    (tmp_path / "checkpoints" / "latest").unlink()
    assert checkpoint_step(find_latest_checkpoint(tmp_path)) == 4


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(RlhfkitError, match="no checkpoint"):
        require_latest_checkpoint(tmp_path)
    with pytest.raises(RlhfkitError, match="incomplete"):
        load_state(tmp_path / "nope.pt")


def test_load_state_refuses_arbitrary_objects(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")  # an arbitrary (non-allowlisted) class
    with pytest.raises(Exception, match="Weights only load failed"):
        load_state(tmp_path / "evil.pt")
