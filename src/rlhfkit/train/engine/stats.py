"""Statistics summed by name over micro-batches, steps and processes.

A `NamedSums` holds, per statistic name, a float64 ``total`` and, for a mean, a float64 ``weight``: ``add(name,
total)`` makes a plain sum, ``add(name, total, weight)`` a weighted mean ``Σ total / Σ weight`` (e.g. a
token-weighted mean: ``total = mean · tokens``, ``weight = tokens``; a loss over examples: ``total = loss · w``,
``weight = w``). `NamedSums.reduce` sums every total and weight over the processes in ONE all-reduce of a float64
vector ordered by name, after a check that every process holds the same names (and the same kind, sum or mean,
for each): a mismatch raises `RlhfkitError` on every process, naming the names that differ, instead of adding
one statistic to another. No statistic is ever addressed by its position in a list.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from rlhfkit.errors import RlhfkitError

Number = float | int | torch.Tensor


def _f64(x: Number) -> torch.Tensor:
    return x.detach().to(torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


class NamedSums:
    """Named float64 totals (sums) and weights (means); see the module docstring. Insertion order is kept."""

    def __init__(self) -> None:
        self._totals: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}

    def add(self, name: str, total: Number, weight: Number | None = None) -> None:
        """Add ``total`` (and ``weight``: the statistic is a mean ``Σ total / Σ weight``) to ``name``."""
        if name in self._totals and (name in self._weights) != (weight is not None):
            raise ValueError(f"statistic {name!r} was added both with and without a weight")
        t = _f64(total)
        self._totals[name] = self._totals[name] + t if name in self._totals else t
        if weight is not None:
            w = _f64(weight)
            self._weights[name] = self._weights[name] + w if name in self._weights else w

    def update(self, other: "NamedSums") -> None:
        """Add every statistic of ``other`` (e.g. one step's global sums into a logging window)."""
        for name in other._totals:
            self.add(name, other._totals[name], other._weights.get(name))

    def names(self) -> list[str]:
        return list(self._totals)

    def __contains__(self, name: str) -> bool:
        return name in self._totals

    def __bool__(self) -> bool:
        return bool(self._totals)

    def total(self, name: str) -> float:
        return float(self._totals[name])

    def weight(self, name: str) -> float:
        """The summed weight of the mean ``name``."""
        return float(self._weights[name])

    def value(self, name: str) -> float:
        """The statistic: its sum, or for a mean ``Σ total / Σ weight``."""
        total = float(self._totals[name])
        return total / float(self._weights[name]) if name in self._weights else total

    def pop(self, name: str) -> float:
        """`value` of ``name``, which is then removed."""
        value = self.value(name)
        del self._totals[name]
        self._weights.pop(name, None)
        return value

    def values(self, prefix: str = "") -> dict[str, float]:
        """Every statistic by name (``prefix/name`` with a prefix), in insertion order."""
        return {(f"{prefix}/{n}" if prefix else n): self.value(n) for n in self._totals}

    def _layout(self) -> tuple[list[str], list[str]]:
        return sorted(self._totals), sorted(self._weights)

    def reduce(self, procs: Any) -> "NamedSums":
        """The sums over all processes (a new `NamedSums`; itself with one process): one all-reduce of the float64
        vector [totals by name, weights by name], after the names are checked equal on every process."""
        if not procs.distributed:
            return self
        totals, weights = self._layout()
        key = "\n".join(totals) + "\0" + "\n".join(weights)
        fingerprint = torch.tensor([len(totals), len(weights), zlib.crc32(key.encode())], dtype=torch.long,
                                   device=procs.device)
        every = procs.gather(fingerprint[None]).tolist()
        if any(row != every[0] for row in every):
            layouts = procs.gather_object((totals, weights))
            raise RlhfkitError("statistics differ between processes: " + "; ".join(
                f"process {r}: sums {sorted(set(t) - set(w))}, means {w}" for r, (t, w) in enumerate(layouts)))
        device = procs.device
        vector = torch.stack([self._totals[n].to(device) for n in totals]
                             + [self._weights[n].to(device) for n in weights])
        vector = procs.sum(vector)
        out = NamedSums()
        index = {n: i for i, n in enumerate(totals)}
        windex = {n: len(totals) + i for i, n in enumerate(weights)}
        for name in self._totals:  # this process's insertion order
            out.add(name, vector[index[name]], vector[windex[name]] if name in windex else None)
        return out

    def state_dict(self) -> dict[str, dict[str, float]]:
        """Plain floats (JSON-able): ``{"totals": {...}, "weights": {...}}``."""
        return {"totals": {n: float(t) for n, t in self._totals.items()},
                "weights": {n: float(w) for n, w in self._weights.items()}}

    @classmethod
    def from_state_dict(cls, state: dict[str, dict[str, float]]) -> "NamedSums":
        out = cls()
        for name, total in state["totals"].items():
            out.add(name, total, state["weights"].get(name))
        return out
