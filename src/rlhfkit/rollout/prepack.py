"""Prepacked weights for the sampler's decode steps on a CPU: the same matrix products, without repacking.

A decode step multiplies one row per unfinished response by every weight matrix of the model: (M, K) @ (K, N)
with M a few dozen rows and the weights fixed for the whole rollout. MKL's ``sgemm`` copies the weight operand
into its internal blocked layout on *every* call; at small M that copy costs as much as the multiply (the weight
is read once per call either way). MKL's packed-GEMM interface (``cblas_sgemm_pack`` / ``cblas_sgemm_compute``,
which torch exposes as ``torch.ops.mkl._mkl_reorder_linear_weight`` / ``torch.ops.mkl._mkl_linear`` and
inductor's freezing pass uses for float32 linears) makes that copy once. The arithmetic is the same products by
the same kernels: the outputs were bit-equal to ``F.linear`` at nearly all shapes measured, and may differ in
the last bit elsewhere (the packed path may block the reduction differently), which is float32 rounding of
the same quantity; ``tests/rollout/test_prepack.py`` bounds it.

A packed weight serves one row count M only (``_mkl_linear`` falls back to the plain product for any other M),
so the sampler tells :class:`PrepackedLinears` the forward batch's rows before each decode step
(:meth:`PrepackedLinears.prepare`): a linear packs its weight at its first call with that many rows, and again
after finished rows left the batch. Packing is worth it up to a few hundred rows (at larger M the copy is a small
part of the product) and when enough steps remain to pay for it (about one millisecond per SmolLM2 matrix, ~0.2 s
for the model, about one decode step).

Measured (2-core Intel Xeon with AMX, torch 2.13.0+cpu, 2 threads, float32, 2026-12-03). In a decode step every
weight is read once from memory (SmolLM2-135M's 540 MB do not fit in any cache), so the products were timed as
the step runs them: 30 layers of distinct gate and down weights (576 × 1536, 1536 × 576) in a row; plain time ÷
packed time: 1.38x at M = 16, 1.31x at 64, 1.44x at 192, 1.24x at 256, 1.16x at 384, 1.12x at 512, 0.96x at 1024.
(Timed on one weight that stays in the cache, the gain above 64 rows looks smaller, about 1.0-1.3x, which is why
an earlier limit was 96 rows.) The sampler at 32 prompts × 128 new tokens: 1.2-1.4x.

Used only where it applies (:func:`prepack_available`): a CPU build of torch with MKL, float32 weights held as
plain tensors on the CPU (not FSDP's DTensors, not quantised), ``torch.nn.Linear`` modules whose
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

__all__ = ["MAX_PREPACK_ROWS", "MIN_PREPACK_STEPS", "PrepackedLinears", "prepack_available"]

MAX_PREPACK_ROWS = 512  # above this many rows the per-call weight copy is a small part of the product
MIN_PREPACK_STEPS = 4  # fewer decode steps left than this: packing (~one step's time) would not pay for itself


def _mkl_ops() -> bool:
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


def _eligible(module: nn.Module) -> bool:
    # a Linear whose product is nn.Linear's own: the class itself or a subclass that keeps its forward (FSDP2's
    # FSDPLinear, gathered for sampling); subclasses with a forward of their own (quantised layers) are not
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward \
            or "forward" in module.__dict__:
        return False
    weight, bias = module.weight, module.bias
    return (type(weight.data) is torch.Tensor and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")))


def prepack_available(model: nn.Module, autocast_dtype: torch.dtype | None = None) -> bool:
    """Whether :class:`PrepackedLinears` would pack any of ``model``'s linears: MKL's packed GEMM in this torch
    build, no autocast requested, and at least one eligible ``nn.Linear`` (float32, plain CPU tensor)."""
    return autocast_dtype is None and bool(PrepackedLinears(model).modules)


class PrepackedLinears:
    """While entered, every eligible ``nn.Linear`` of ``model`` runs its product with a weight packed once per
    row count: :meth:`prepare` sets the row count M of the coming forwards (None: pack nothing); a call with
    exactly M rows (the leading dimensions of its input multiplied) uses the packed weight, any other call the
    plain ``F.linear``. Exiting restores the modules' own ``forward`` and frees the packed copies.

    The weights must not change while it is entered (a packed copy would go stale): the sampler enters it for
    one call, in ``torch.inference_mode``. ``packs`` counts the packings done (for tests and benchmarks).
    """

    def __init__(self, model: nn.Module, max_rows: int = MAX_PREPACK_ROWS, min_steps: int = MIN_PREPACK_STEPS):
        self.modules = [m for m in model.modules() if _eligible(m)] if _mkl_ops() else []
        self.max_rows, self.min_steps = max_rows, min_steps
        self.rows: int | None = None
        self.packs = 0
        self._packed: dict[int, tuple[int, torch.Tensor]] = {}  # id(module) -> (rows, packed weight)

    def prepare(self, rows: int, steps_left: int) -> None:
        """The next forwards have ``rows`` rows and ``steps_left`` decode steps (this one included) remain: pack
        for them if rows ≤ ``max_rows`` and steps_left ≥ ``min_steps``, else run plainly (and free the packs)."""
        target = rows if rows <= self.max_rows and steps_left >= self.min_steps else None
        if target != self.rows:
            self.rows = target
            self._packed.clear()

    def _forward(self, module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        key = id(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            # read at every call: FSDP2 swaps a wrapped module's parameters between shards and full tensors
            weight, bias, rows = module.weight, module.bias, self.rows
            if (rows is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() != rows *
                    module.in_features or torch.is_autocast_enabled("cpu") or type(weight.data) is not torch.Tensor
                    or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
                return F.linear(x, weight, bias)
            entry = self._packed.get(key)
            if entry is None or entry[0] != rows:
                entry = (rows, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows))
                self._packed[key] = entry
                self.packs += 1
            return torch.ops.mkl._mkl_linear(x, entry[1], weight, bias, rows)

        return forward

    def __enter__(self) -> "PrepackedLinears":
        for module in self.modules:
            module.forward = self._forward(module)
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self._packed.clear()
        self.rows = None
