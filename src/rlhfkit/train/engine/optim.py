"""The one optimizer and learning-rate schedule of every trainer (``rm train`` and ``ppo``).

- `build_optimizer(groups, weight_decay)`: AdamW over the trainable parameters of named modules, one learning
  rate per module. Weight decay applies to weights of two or more dimensions only (matrices, embeddings); biases,
  norm weights and other vectors are never decayed (they get a param group of their own with ``weight_decay``
  0). With ``weight_decay`` 0 the split is moot and each module is one param group. Every param group carries the
  module's ``name``; a module's learning rate is read by the identity of its parameters (`module_lr`), never by
  list position. The fused AdamW kernel is used whenever every parameter is a floating tensor on the CPU or a
  CUDA device (on CPU ~3x faster than the per-tensor loop; the same update up to float rounding).
- `build_scheduler(name, optimizer, warmup_steps, total_steps)`: ``transformers.get_scheduler`` with rlhfkit's
  schedule names (`SCHEDULERS`: ``constant`` is a constant rate after a linear warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from rlhfkit.errors import RlhfkitError

# rlhfkit's --lr_scheduler names -> transformers.get_scheduler names
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass(frozen=True)
class ModuleGroup:
    """The trainable parameters of ``module``, optimised at learning rate ``lr`` under the name ``name``."""

    name: str
    module: nn.Module
    lr: float


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter of ``module`` that requires a gradient, in module order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def decay_split(params: Sequence[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decayed, not decayed)``: the parameters of two or more dimensions, and the others (biases, norms)."""
    return [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]


def param_groups(groups: Sequence[ModuleGroup], weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer's param groups: per module one group (``weight_decay`` 0) or two (the decayed weights at
    ``weight_decay``, then the vectors at 0; an empty one is left out), each holding ``name`` and ``lr``."""
    out: list[dict[str, Any]] = []
    for group in groups:
        params = [p for _, p in trainable_parameters(group.module)]
        if not params:
            raise RlhfkitError(f"{group.name} ({type(group.module).__name__}) has no trainable parameter")
        parts = [(params, 0.0)] if weight_decay == 0 else list(zip(decay_split(params), (weight_decay, 0.0)))
        out += [{"params": ps, "lr": group.lr, "weight_decay": wd, "name": group.name} for ps, wd in parts if ps]
    return out


def build_optimizer(groups: Sequence[ModuleGroup], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `param_groups` (see the module docstring); fused where every parameter allows it."""
    pgs = param_groups(groups, weight_decay)
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for g in pgs for p in g["params"])
    return torch.optim.AdamW(pgs, lr=groups[0].lr, fused=fused or None)


def module_lr(scheduler: Any, module: nn.Module) -> float:
    """The current learning rate of ``module``: that of the first of the scheduler's param groups that holds one of
    its parameters (found by identity, so any optimizer's groups, in any order, are read right)."""
    mine = {id(p) for p in module.parameters()}
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        if any(id(p) in mine for p in group["params"]):
            return float(lr)
    raise KeyError(f"the scheduler's optimizer does not hold the parameters of {type(module).__name__}")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """``transformers.get_scheduler`` of the rlhfkit schedule ``name`` (`SCHEDULERS`): linear warm-up from 0 over
    ``warmup_steps``, then constant, linear decay to 0 or a cosine over the remaining ``total_steps``."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULERS[name], optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
