"""Run under ``torchrun --nproc_per_node 2``: each process adds its own statistics to a `NamedSums` and reduces
them; process r writes what it got (or the error it raised) to ``OUT/rank{r}.json``. Usage: ``named_stats_script.py
OUT CASE`` with CASE ``match`` (the same names, added in another order on each process), ``names`` (another name
on process 1) or ``kind`` (a sum on process 0, a mean on process 1 under the same name)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.train.engine.processes import Processes
from rlhfkit.train.engine.stats import NamedSums


def main(out: Path, case: str) -> None:
    procs = Processes.start("test")
    sums = NamedSums()
    if procs.rank == 0:
        sums.add("tokens", 3)
        sums.add("policy/approx_kl", torch.tensor(0.5) * 4, 4)  # a mean of 0.5 over 4 tokens
        sums.add("policy/approx_kl", 0.25 * 2, 2)  # a second micro-batch: 0.25 over 2 tokens
        sums.add("a" if case != "kind" else "b", 1.0)
    else:
        sums.add("policy/approx_kl", 1.0 * 2, 2)  # 1.0 over 2 tokens; added first here
        sums.add("tokens", torch.tensor(5.0, dtype=torch.float64))
        if case == "kind":
            sums.add("b", 1.0, 1.0)
        else:
            sums.add("a" if case == "match" else "c", 2.0)
    try:
        result = {"values": sums.reduce(procs).values(), "world_size": procs.world_size}
    except RlhfkitError as e:
        result = {"error": str(e)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{procs.rank}.json").write_text(json.dumps(result))
    procs.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
