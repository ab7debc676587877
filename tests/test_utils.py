"""Atomic writes, metric logging with resume truncation, RNG state round trips."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from rlhfkit.utils import (MetricsLogger, atomic_dir, atomic_write_json, read_jsonl, rng_state, set_rng_state,
                           to_jsonable)


def test_atomic_dir_replaces_whole_folder(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind


def test_atomic_dir_failure_leaves_old_folder(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_json_helpers(tmp_path):
    obj = {"t": torch.tensor(2.5), "v": torch.tensor([1.0, 2.0]), "n": np.float32(0.5), "bad": float("nan")}
    assert to_jsonable(obj) == {"t": 2.5, "v": [1.0, 2.0], "n": 0.5, "bad": None}
    atomic_write_json(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text())["bad"] is None


def test_metrics_logger_resume_truncates_later_rows(tmp_path):
    log = MetricsLogger(tmp_path / "m.jsonl", tmp_path / "tb")
    for s in range(1, 6):
        log.log(s, {"loss/policy": s * 0.1, "flag": True})
    log.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2, 3, 4, 5]
    log = MetricsLogger(tmp_path / "m.jsonl", tmp_path / "tb", resume_step=3)
    log.log(4, {"loss/policy": 9.0})
    log.close()
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss/policy"] == 9.0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "m.jsonl", tmp_path / "tb", enabled=False)
    log.log(1, {"a": 1.0})
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "tb").exists()


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    state = rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.save(state, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_atomic_write_gives_usual_permissions(tmp_path):
    import os
    import stat

    from rlhfkit.utils import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask


# ---------------------------------------------------------------------------------------------- bf16 capability

XEON_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
XEON_AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
ZEN2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_cpu_flags_read_x86_and_arm_spellings():
    from rlhfkit.utils import cpu_flags

    assert cpu_flags(ZEN2) == {"fpu", "sse2", "avx2", "fma"}
    assert "bf16" in cpu_flags(ARM_BF16) and "processor" not in cpu_flags(ARM_BF16)
    assert cpu_flags("") == set()


@pytest.mark.parametrize("cpuinfo, speed", [(XEON_AMX, "fast"), (ARM_BF16, "native"), (XEON_AVX512, "slow"),
                                            (ZEN2, "slow")])
def test_bf16_speed_of_each_cpu_kind(cpuinfo, speed):
    from rlhfkit.utils import bf16_speed, cpu_flags

    assert bf16_speed("cpu", cpu_flags(cpuinfo)) == speed
    assert bf16_speed("meta", cpu_flags(cpuinfo)) == "unknown"


def test_bf16_warning_only_where_bf16_is_emulated(caplog):
    import logging

    from rlhfkit.utils import cpu_flags, warn_if_slow_bf16

    with caplog.at_level(logging.WARNING, logger="rlhfkit"):
        assert warn_if_slow_bf16(True, "cpu", "ppo --bf16", flags=cpu_flags(ZEN2))
        assert not warn_if_slow_bf16(False, "cpu", "ppo --bf16", flags=cpu_flags(ZEN2))
        assert not warn_if_slow_bf16(True, "cpu", "ppo --bf16", flags=cpu_flags(XEON_AMX))
        assert not warn_if_slow_bf16(True, "cpu", "ppo --bf16", flags=cpu_flags(ARM_BF16))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert warned[0].startswith("ppo --bf16: bf16 autocast on a CPU without bf16 instructions") and "float32" in warned[0]


def test_bf16_default_is_on_only_for_a_gpu_with_fast_bf16(monkeypatch):
    import torch

    from rlhfkit.config import parse_config
    from rlhfkit.train.ppo_config import PPOConfig
    from rlhfkit.train.rm_config import RMEvalConfig, RMTrainConfig, ScoreConfig
    from rlhfkit.utils import auto_bf16, resolve_bf16

    assert auto_bf16("cpu") is False  # every CPU kind, AMX included: float32 by default
    assert auto_bf16("meta") is False  # a device whose bf16 speed is unknown
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_bf16("cuda") is True and resolve_bf16(None, "cuda") is True
    assert resolve_bf16(False, "cuda") is False  # --bf16 false wins over the default
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_bf16("cuda") is False
    assert resolve_bf16(None, "cpu") is False and resolve_bf16(True, "cpu") is True
    # every command that takes --bf16: unset (None) by default, --bf16 / --bf16 false / --bf16 true as given
    for cls, required in [(PPOConfig, ["--policy", "p", "--prompts", "q", "--reward_model", "r", "--output", "o"]),
                          (RMTrainConfig, ["--model", "m", "--data", "d", "--output", "o"]),
                          (RMEvalConfig, ["--model", "m", "--data", "d"]),
                          (ScoreConfig, ["--model", "m", "--data", "d", "--output", "o"])]:
        assert parse_config(cls, required).bf16 is None, cls.__name__
        assert parse_config(cls, required + ["--bf16"]).bf16 is True, cls.__name__
        assert parse_config(cls, required + ["--bf16", "false"]).bf16 is False, cls.__name__


# a 48 MiB tensor made after a 64 MiB one was freed: its minor page faults, and whether reuse_freed_memory changed
# the allocator (a fresh interpreter: the allocator's state is per process). Smaller than the freed block, so that
# it fits there however the heap lies around it (torch asks for 64-byte aligned blocks, a little more than their
# size: a block of the same size may not fit in the freed one); above glibc's largest default mmap threshold
# (32 MiB), so that untuned it is always a fresh mapping
_SECOND_ALLOCATION = """
import resource, sys, torch
from rlhfkit.utils import reuse_freed_memory
changed = reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(16 << 20); x.fill_(1.0); del x
before = faults()
y = torch.empty(12 << 20); y.fill_(2.0)
print(changed, faults() - before, float(y.sum()))
"""


def _second_allocation(env_value: str | None) -> tuple[bool, int, float]:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RLHFKIT_MALLOC"}
    if env_value is not None:
        env["RLHFKIT_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _SECOND_ALLOCATION], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1]), float(out[2])


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="reuse_freed_memory tunes glibc's allocator only")
def test_reuse_freed_memory_serves_a_freed_large_block_again_without_page_faults():
    from pathlib import Path

    changed, faults, total = _second_allocation(None)
    assert changed and total == 2.0 * (12 << 20)  # the values are what was written
    pages = (48 << 20) // 4096
    assert faults < pages // 16  # reused: no new pages (a few for the interpreter's own work)
    off, faults_off, total_off = _second_allocation("default")
    assert not off and total_off == total
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):  # 4 KiB pages: the fresh block faults each one
        assert faults_off >= pages // 2


def test_the_command_line_tunes_the_allocator_once_at_start(monkeypatch, capsys):
    import rlhfkit.utils
    from rlhfkit.cli import main

    calls = []
    monkeypatch.setattr(rlhfkit.utils, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert main([]) == 2 and calls == [1]
    capsys.readouterr()
