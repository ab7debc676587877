"""engine.processes.close_process_group: the group is gone afterwards; with ``synchronize`` a barrier runs first
(every process of a command that succeeded), never after an error."""

from __future__ import annotations

import torch.distributed as dist

from rlhfkit.train.engine.processes import close_process_group


def _one_process_group() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_close_destroys_the_group_with_a_barrier_only_when_asked(monkeypatch):
    barriers: list[int] = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k))[1])
    for synchronize, expected in ((True, [1]), (False, [])):
        barriers.clear()
        _one_process_group()
        close_process_group(synchronize=synchronize)
        assert not dist.is_initialized() and barriers == expected
    close_process_group(synchronize=True)  # no group: nothing to do
    assert barriers == []
