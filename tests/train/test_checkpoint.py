"""Checkpoints are published atomically; a failed write keeps the previous one as `latest`; the state format
(JSON + safetensors) gives back exactly what it was given."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.train.checkpoint import (checkpoint_step, find_latest_checkpoint, load_state, require_latest_checkpoint,
                                      save_checkpoint, save_state)


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


def test_load_state_refuses_a_pickle_with_a_clear_error(tmp_path):
    """The state files are JSON + safetensors: a pickle (torch.save, the format before) is never unpickled."""
    torch.save({"x": torch.zeros(1)}, tmp_path / "old.pt")
    with pytest.raises(RlhfkitError, match=r"old\.pt: not a state file of this rlhfkit version.*older format"):
        load_state(tmp_path / "old.pt")


def _trained_adamw():
    """An AdamW (two param groups, one without decay) after two steps on a LambdaLR warm-up: its state holds
    int-keyed dicts, 0-dim and (2, 3) tensors, tuples (betas) and a schedule's plain values."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.1, "name": "model"},
                             {"params": [model.bias], "weight_decay": 0.0, "name": "model"}], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()
    return model, opt, scheduler


def _same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def test_state_round_trip_is_exact(tmp_path):
    from rlhfkit.utils import rng_state

    _, opt, scheduler = _trained_adamw()
    generator = torch.Generator().manual_seed(3)
    state = {"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
             "generator": generator.get_state(), "none": None, "flag": True, "nested": [(1, 2.5), {"x": "y"}],
             "float": 0.1 + 0.2, "inf": float("inf")}
    save_state(tmp_path / "state.json", state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    loaded = load_state(tmp_path / "state.json")
    _same(loaded, state)
    # the loaded states continue the optimizer exactly: the next step equals the original's
    model_b, opt_b, scheduler_b = _trained_adamw()
    opt_b.load_state_dict(loaded["optimizer"])
    scheduler_b.load_state_dict(loaded["scheduler"])
    _same(opt_b.state_dict(), opt.state_dict())
    assert scheduler_b.get_last_lr() == scheduler.get_last_lr()


def test_a_state_without_tensors_is_one_json_file_and_other_objects_are_refused(tmp_path):
    save_state(tmp_path / "small.json", {"step": 3, "sampler": {"epoch": 1, "position": 8}})
    assert [p.name for p in tmp_path.iterdir()] == ["small.json"]
    assert load_state(tmp_path / "small.json") == {"step": 3, "sampler": {"epoch": 1, "position": 8}}
    with pytest.raises(TypeError, match="cannot store a object"):
        save_state(tmp_path / "bad.json", {"x": object()})


def test_a_kill_mid_checkpoint_leaves_the_previous_one_readable(tmp_path):
    """Atomic write/read round trip: checkpoint 1 (state, tensors, weights), then checkpoint 2 dies after writing
    its weights and part of its state; `latest` is still 1, no partial folder is left, and 1 reads back exactly."""
    from rlhfkit.train.checkpoint import load_weights, save_weights

    model, opt, _ = _trained_adamw()

    def write(folder):
        save_weights(folder / "model.safetensors", model)
        save_state(folder / "trainer_state.json", {"step": 1, "optimizer": opt.state_dict()})

    save_checkpoint(tmp_path, 1, write)

    def dying(folder):
        save_weights(folder / "model.safetensors", torch.nn.Linear(3, 2))
        save_state(folder / "trainer_state.json", {"step": 2})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, dying)
    latest = require_latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    restored = torch.nn.Linear(3, 2)
    load_weights(latest / "model.safetensors", restored, "model")
    assert torch.equal(restored.weight, model.weight) and torch.equal(restored.bias, model.bias)
    state = load_state(latest / "trainer_state.json")
    assert state["step"] == 1
    _same(state["optimizer"], opt.state_dict())


def test_check_format_names_an_older_checkpoint(tmp_path):
    from rlhfkit.train.checkpoint import FORMAT_VERSION, check_format, write_info

    old = tmp_path / "step-00000002"
    old.mkdir()
    torch.save({"step": 2}, old / "optimizer.pt")
    with pytest.raises(RlhfkitError, match="older rlhfkit format .*torch .pt.*version that wrote it"):
        check_format(old)
    (old / "optimizer.pt").unlink()
    with pytest.raises(RlhfkitError, match="checkpoint.json: checkpoint file missing"):
        check_format(old)
    write_info(old, command="ppo", step=2)
    assert check_format(old) == {"format": FORMAT_VERSION, "command": "ppo", "step": 2}
