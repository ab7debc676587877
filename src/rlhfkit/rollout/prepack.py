"""Prepacked weights for the sampler's decode steps on a CPU: the same matrix products, without repacking.

A decode step multiplies one row per unfinished response by every weight matrix of the model: (M, K) @ (K, N)
with M a few dozen rows and the weights fixed for the whole rollout. A GEMM library copies the weight operand
into its internal blocked layout on *every* plain call; at small M that copy costs as much as the multiply (the
weight is read once per call either way). Both GEMM libraries of torch's CPU build can make that copy once:

- ``onednn`` (oneDNN, torch's ``mkldnn``): ``torch.ops.mkldnn._reorder_linear_weight`` packs a weight for a batch
  size, ``torch.ops.mkldnn._linear_pointwise`` multiplies by it (what inductor's freezing pass uses for bf16
  linears). oneDNN picks its kernels by instruction set, whatever the CPU's vendor.
- ``mkl`` (MKL's packed GEMM, ``cblas_sgemm_pack`` / ``cblas_sgemm_compute``): ``torch.ops.mkl.
  _mkl_reorder_linear_weight`` / ``torch.ops.mkl._mkl_linear`` (inductor's float32 path).

Both compute the products of ``F.linear`` to float32 rounding (another blocking of the same sums: MKL's were
bit-equal at nearly all shapes measured, oneDNN's differ in the last bits); ``tests/rollout/test_prepack.py``
bounds the difference. :func:`default_backend` picks per CPU, from the measurements below.

A packed weight serves one row count M only (a call with another M runs the plain product), so the sampler tells
:class:`PrepackedLinears` the forward batch's rows before each decode step (:meth:`PrepackedLinears.prepare`): a
linear packs its weight at its first call with that many rows, and again after finished rows left the batch if
that saves enough (`REPACK_ROW_STEPS`; until then the fewer rows are padded up to the packed count).
Packing is worth it from a few rows (`MIN_PREPACK_ROWS`: below that the plain product is a matrix-vector-like
one at about memory speed) up to a few hundred (at larger M the copy is a small part of the product) and when
enough steps remain to pay for it (about half a millisecond per SmolLM2 matrix, 0.1-0.2 s for the model, about
one decode step); weights packed for the batch's row count serve it to the last step.

Measured, float32, 2 threads, torch 2.13.0+cpu; products timed as a decode step runs them (every weight read
once from memory: tens of distinct weights in a row, SmolLM2-135M's 540 MB do not fit in any cache):

- 2-core Intel Xeon with AMX (2026-12-03), MKL packed ÷ plain ``F.linear``: 1.38x at M = 16, 1.31x at 64, 1.44x at
  192, 1.24x at 256, 1.16x at 384, 1.12x at 512, 0.96x at 1024 (576 × 1536 and 1536 × 576 weights); the sampler at
  32 prompts × 128 new tokens 1.2-1.4x. oneDNN not measured there yet: MKL stays that CPU's default.
- 2-core AMD EPYC Zen 4 (family 25 model 17, 2026-12-04), GFLOP/s of plain / MKL packed / oneDNN packed: 576 × 1536
  weight at M = 8: 34 / 32 / 88; M = 32: 78 / 75 / 168; M = 128: 116 / 111 / 204; M = 441: 150 / 142 / 208; the tied
  LM head (49,152 × 576) at M = 32: 69 / 78 / 183. MKL's packing gains nothing on this CPU; oneDNN's is 2.1-2.7x at
  8-32 rows, so oneDNN is the default wherever the CPU is not an Intel one.

Used only where it applies (:func:`prepack_available`): a CPU build of torch with the backend's ops, float32
weights held as plain tensors on the CPU (not FSDP's DTensors, not quantised), ``torch.nn.Linear`` modules whose
``forward`` is the class's own (nn.Linear itself, or a subclass that keeps its forward, as FSDP2's wrapped
``FSDPLinear`` gathered for sampling) and that nothing else has replaced (accelerate's hooks), no autocast and no
autograd at the call. Any other call of a patched linear runs the plain ``F.linear``, as does a call whose weight
is no longer a plain tensor.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BACKENDS", "FUSED_SIBLINGS", "MAX_PREPACK_ROWS", "MIN_PREPACK_ROWS", "MIN_PREPACK_STEPS", "PrepackedLinears",
           "REPACK_ROW_STEPS", "available_backends", "default_backend", "prepack_available"]

BACKENDS = ("onednn", "mkl")

# sibling linears that a transformer block calls on the same input tensor (attention's q/k/v projections, a gated
# MLP's gate and up projections): with oneDNN they run as ONE product by their weights stacked (`_Group`)
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MAX_PREPACK_ROWS = 512  # above this many rows the per-call weight copy is a small part of the product
MIN_PREPACK_STEPS = 4  # fewer decode steps left than this: packing (~one step's time) would not pay for itself
# Fewer rows than this: the plain product, a matrix-vector-like one that already reads each weight at about memory
# speed. Measured on a 2-core Xeon with AMX (2026-12-08), the whole SmolLM2-135M's products of one decode step,
# plain / MKL packed / oneDNN packed: 1 row 31-35 / 36-41 / 57-59 ms, 2 rows 36-39 / 35 / 50-56, 3 rows 38-42 /
# 43 / 49-58, 4 rows 59-68 / 43 / 54-55 (plain jumps at 4 rows). oneDNN, the AMD CPUs' default, was measured
# there from 8 rows up only, so it keeps packing at any row count until measured.
MIN_PREPACK_ROWS = {"mkl": 4, "onednn": 1}
# When rows leave the batch, weights packed for R rows serve r < R rows padded up to R (each output row reads
# only its own input row) unless (R - r) × steps left reaches this: a repack (0.1-0.2 s for SmolLM2-135M) against
# the padded rows' work (about 1-1.6 ms per row and decode step for that model on the 2-core CPUs measured: Xeon
# with AMX, AMD EPYC Zen 4), so it pays from ~100-150 row-steps on.
REPACK_ROW_STEPS = 128


def _mkl_ops() -> bool:
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


def _onednn_ops() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def available_backends() -> list[str]:
    """The packing backends this torch build has, in `BACKENDS` order."""
    return [b for b, ok in (("onednn", _onednn_ops()), ("mkl", _mkl_ops())) if ok]


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def default_backend() -> str | None:
    """The backend :class:`PrepackedLinears` uses unless told: MKL on an Intel CPU (measured faster than the plain
    product there; oneDNN not yet measured there), oneDNN elsewhere (on an AMD EPYC MKL's packing gains nothing and
    oneDNN's 2-2.7x at a few dozen rows: module docstring); None where this build has neither."""
    have = available_backends()
    if not have:
        return None
    if _cpu_vendor() == "GenuineIntel" and "mkl" in have:
        return "mkl"
    return have[0]


def _pack(backend: str, weight: torch.Tensor, rows: int) -> torch.Tensor:
    if backend == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def _packed_linear(backend: str, x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    if backend == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


def _eligible(module: nn.Module) -> bool:
    # a Linear whose product is nn.Linear's own: the class itself or a subclass that keeps its forward (FSDP2's
    # FSDPLinear, gathered for sampling); subclasses with a forward of their own (quantised layers) are not
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward \
            or "forward" in module.__dict__:
        return False
    weight, bias = module.weight, module.bias
    return (type(weight.data) is torch.Tensor and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")))


def prepack_available(model: nn.Module, autocast_dtype: torch.dtype | None = None,
                      backend: str | None = None) -> bool:
    """Whether :class:`PrepackedLinears` (with ``backend``; None: :func:`default_backend`) would pack any of
    ``model``'s linears: the backend's ops in this torch build, no autocast requested, and at least one eligible
    ``nn.Linear`` (float32, plain CPU tensor)."""
    return autocast_dtype is None and bool(PrepackedLinears(model, backend=backend).modules)


class _Group:
    """Sibling linears (`FUSED_SIBLINGS`) packed as one stacked weight: the first member called with an input runs
    the product for all of them and keeps the others' slices for their calls with that same tensor."""

    def __init__(self, modules: list[nn.Linear]):
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self.x: torch.Tensor | None = None  # the input of the kept slices
        self.version: int | None = None  # its version counter (None: an inference tensor has none)
        self.outs: dict[int, torch.Tensor] = {}  # id(member) -> its slice of the stacked product

    def clear(self) -> None:
        self.x, self.version, self.outs = None, None, {}


def _groups(model: nn.Module, eligible: list[nn.Linear]) -> dict[int, _Group]:
    """id(member) -> its `_Group`, for every parent module whose `FUSED_SIBLINGS` are all eligible linears of one
    input width with biases alike."""
    ids = {id(m) for m in eligible}
    groups: dict[int, _Group] = {}
    for parent in model.modules():
        for names in FUSED_SIBLINGS:
            members = [parent._modules.get(name) for name in names]
            if all(m is not None and id(m) in ids for m in members) and len({m.in_features for m in members}) == 1 \
                    and len({m.bias is None for m in members}) == 1:
                group = _Group(members)
                groups.update((id(m), group) for m in members)
    return groups


class PrepackedLinears:
    """While entered, every eligible ``nn.Linear`` of ``model`` runs its product with a weight packed once per
    row count: :meth:`prepare` sets the row count of the coming forwards (None: pack nothing); a call with exactly
    that many rows (the leading dimensions of its input multiplied) uses the weight packed for them, or for more
    rows with its input padded up to those (`REPACK_ROW_STEPS`), any other call the plain ``F.linear``. Exiting restores the modules' own ``forward`` and frees the packed copies. ``max_rows``,
    ``min_steps`` and ``min_rows`` (None: the backend's `MIN_PREPACK_ROWS`) bound where :meth:`prepare` packs.

    ``backend``: ``"onednn"`` or ``"mkl"`` (module docstring), None for :func:`default_backend`; a backend this
    torch build lacks packs nothing (``modules`` is then empty), an unknown name is a ValueError.

    ``fuse_siblings`` (oneDNN only): the `FUSED_SIBLINGS` of a block (q/k/v, gate/up) run as ONE product by their
    stacked weights, packed once: the first member called computes all of them, and each other member called
    next with the very same input tensor (unchanged) gets its slice (contiguous) instead of a product of its own.
    Each output element is the same dot product over the same inputs (measured bit-equal to the separate packed
    products on a 2-core AMD EPYC Zen 3; the tests bound it against the plain product to float32 rounding); on
    that CPU at 8 / 32 rows the stacked q/k/v product ran 1.43x / 1.15x and gate+up 1.13x / 1.06x the separate
    packed ones. ``units`` counts what is packed per row count (a group once).

    The weights must not change while it is entered (a packed copy would go stale): the sampler enters it for
    one call, in ``torch.inference_mode``. ``packs`` counts the packings done (for tests and benchmarks).
    """

    def __init__(self, model: nn.Module, max_rows: int = MAX_PREPACK_ROWS, min_steps: int = MIN_PREPACK_STEPS,
                 backend: str | None = None, fuse_siblings: bool = True, min_rows: int | None = None):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"prepack backend must be one of {', '.join(BACKENDS)} (or None for the CPU's "
                             f"default), got {backend!r}")
        self.backend = default_backend() if backend is None else backend
        usable = self.backend is not None and self.backend in available_backends()
        self.modules = [m for m in model.modules() if _eligible(m)] if usable else []
        self.groups = _groups(model, self.modules) if fuse_siblings and self.backend == "onednn" else {}
        self.units = len(self.modules) - len(self.groups) + len({id(g) for g in self.groups.values()})
        self.max_rows, self.min_steps = max_rows, min_steps
        self.min_rows = MIN_PREPACK_ROWS.get(self.backend, 1) if min_rows is None else min_rows
        self.rows: int | None = None  # the row count the weights are packed for (None: run plainly)
        self.live: int | None = None  # the rows of the coming calls: rows, or fewer padded up to rows
        self.packs = 0
        self.padded_calls = 0
        # id(module or group) -> (rows, packed weight, the group's stacked bias)
        self._packed: dict[int, tuple[int, torch.Tensor, torch.Tensor | None]] = {}

    def prepare(self, rows: int, steps_left: int) -> None:
        """The next forwards have ``rows`` rows and ``steps_left`` decode steps (this one included) remain. Weights
        already packed for that many rows are kept (however few steps remain: the packing is what costs); weights
        packed for R > rows rows are kept too, the calls' rows padded up to R, while (R - rows) × steps_left <
        `REPACK_ROW_STEPS` and rows ≥ ``min_rows``; else the weights are packed for ``rows`` if ``min_rows`` ≤
        rows ≤ ``max_rows`` and steps_left ≥ ``min_steps``, or the calls run plainly (and the packs are freed)."""
        if rows == self.live:
            return
        if self.rows is not None and self.min_rows <= rows < self.rows and \
                (self.rows - rows) * steps_left < REPACK_ROW_STEPS:
            self.live = rows  # fewer rows than packed for, not enough saved to repack: pad them up
            return
        target = rows if self.min_rows <= rows <= self.max_rows and steps_left >= self.min_steps else None
        self.live = target
        if target != self.rows:
            self.rows = target
            self._packed.clear()

    def _product(self, x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` (live rows, ..., K) times a weight packed for `rows` rows: x itself when it has that many, else
        padded with zero rows up to them and the product's first rows taken (each output row is its own input row's
        dot products: the padding changes no other row)."""
        rows, live = self.rows, self.live
        if live == rows:
            return _packed_linear(self.backend, x, packed, weight, bias, rows)
        self.padded_calls += 1
        flat = x.reshape(live, x.shape[-1])
        padded = flat.new_zeros((rows, flat.shape[1]))
        padded[:live] = flat
        out = _packed_linear(self.backend, padded, packed, weight, bias, rows)[:live]
        return out.view(*x.shape[:-1], out.shape[-1])

    def _forward(self, module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        key, backend = id(module), self.backend

        def forward(x: torch.Tensor) -> torch.Tensor:
            # read at every call: FSDP2 swaps a wrapped module's parameters between shards and full tensors
            weight, bias, rows = module.weight, module.bias, self.rows
            if (rows is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() != self.live *
                    module.in_features or torch.is_autocast_enabled("cpu") or type(weight.data) is not torch.Tensor
                    or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
                return F.linear(x, weight, bias)
            group = self.groups.get(key)
            if group is not None:
                return self._group_call(group, module, x, rows)
            entry = self._packed.get(key)
            if entry is None or entry[0] != rows:
                entry = (rows, _pack(backend, weight.detach(), rows), None)
                self._packed[key] = entry
                self.packs += 1
            return self._product(x, entry[1], weight, bias)

        return forward

    def _group_call(self, group: _Group, module: nn.Linear, x: torch.Tensor, rows: int) -> torch.Tensor:
        """``module(x)`` for a member of ``group``: its kept slice when the group's last product had this very
        input (unchanged since), else the stacked product for every member (the others' slices kept)."""
        version = None if x.is_inference() else x._version
        if group.x is x and group.version == version and id(module) in group.outs:
            out = group.outs.pop(id(module))
            if not group.outs:
                group.clear()
            return out
        weights = [m.weight for m in group.modules]
        if any(type(w.data) is not torch.Tensor for w in weights):
            return F.linear(x, module.weight, module.bias)
        entry = self._packed.get(id(group))
        if entry is None or entry[0] != rows:
            stacked = torch.cat([w.detach() for w in weights])
            bias = torch.cat([m.bias.detach() for m in group.modules]) if module.bias is not None else None
            entry = (rows, _pack(self.backend, stacked, rows), bias)
            self._packed[id(group)] = entry
            self.packs += 1
        parts = [p.contiguous() for p in self._product(x, entry[1], None, entry[2]).split(group.sizes, dim=-1)]
        group.x, group.version = x, version
        group.outs = {id(m): p for m, p in zip(group.modules, parts) if m is not module}
        return parts[group.modules.index(module)]

    def __enter__(self) -> "PrepackedLinears":
        for module in self.modules:
            module.forward = self._forward(module)
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self._packed.clear()
        for group in set(self.groups.values()):
            group.clear()
        self.rows = self.live = None
