"""The processes of a run and the collectives the trainers use, on accelerate.

`Processes.start(command)` builds the run's ``accelerate.Accelerator`` (the process group: one process, or the
processes of ``accelerate launch --multi_gpu --num_processes N`` / ``torchrun --nproc_per_node N``; on a machine
without a GPU, or with ``ACCELERATE_USE_CPU``, they join a CPU/gloo group) and wraps it. The collectives are
accelerate's (``accelerate.utils.gather`` / ``reduce`` / ``gather_object``); with one process each is the
identity, so the single-process path runs no collective.

Accelerate's own mixed precision stays off: the trainers apply bf16 autocast themselves (``--bf16``), and
``Accelerator.prepare`` would otherwise wrap a model's forward in whatever autocast the process's accelerate state
holds. That state is shared by every Accelerator of a process, so one created before with another precision (e.g.
by a transformers or TRL Trainer with bf16, TRL's default) would silently change this run; that is refused with an
`RlhfkitError` instead.

The model stays the trainer's to wrap: ``rm train`` lets ``accelerator.prepare`` wrap it for DDP (`Processes.wrap`);
``ppo`` keeps plain modules and sums gradients itself (`Processes.sum_grads`, one flat all-reduce per optimizer
step). With ``--fsdp`` both shard their trained models first (`Processes.shard`, `engine.sharding`: FSDP2
``fully_shard``): `wrap` then leaves the model as it is and `sum_grads` skips its (DTensor) parameters, whose
gradients FSDP2 already reduce-scattered; `clip_grad_norm_` clips by the global norm over shards.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from rlhfkit.errors import RlhfkitError


def _use_cpu() -> bool:
    from accelerate.utils import parse_flag_from_env

    accelerator_available = torch.cuda.is_available() or torch.backends.mps.is_available()
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not accelerator_available


def make_accelerator(command: str) -> Any:
    """The run's ``accelerate.Accelerator`` (mixed precision off; see the module docstring); ``command`` names the
    command in the error about a process whose accelerate state already holds another precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(cpu=_use_cpu(), mixed_precision="no")
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        raise RlhfkitError(
            f"{command}: this process already holds an accelerate state with mixed_precision="
            f"{AcceleratorState().mixed_precision!r} (created by another Accelerator, e.g. a transformers or TRL "
            f"Trainer); rlhfkit sets the precision with --bf16 and would otherwise train under that autocast; run "
            f"it in a fresh process") from None


def close_process_group(synchronize: bool = False) -> None:
    """Destroy this process's default process group, if one was started (the CLI calls this when a command ends,
    whatever its outcome). A gloo group left to the interpreter's exit can abort the process while its worker
    threads are torn down ("terminate called without an active exception", seen once in a 2-process ``rm train``
    test under load); torch asks for ``destroy_process_group`` before exit. ``synchronize`` (a command that
    succeeded on every process): a barrier first, so that no process tears its group down while another still
    talks to it (the same abort was seen on a 2-process ``ppo --fsdp`` run under load whose outputs were complete);
    never after an error, which may have stopped one process only."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


class Processes:
    """The run's process group: rank, size, device, and gather / sum / max / barrier across processes."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.rank: int = accelerator.process_index
        self.world_size: int = accelerator.num_processes
        self.device: torch.device = accelerator.device
        self.is_main: bool = accelerator.is_main_process

    @classmethod
    def start(cls, command: str) -> "Processes":
        return cls(make_accelerator(command))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``x`` along dim 0, in rank order (all shapes must be equal)."""
        if not self.distributed:
            return x
        from accelerate.utils import gather

        is_bool = x.dtype == torch.bool
        out = gather(x.to(torch.uint8) if is_bool else x.contiguous())  # gloo has no bool collectives
        return out.bool() if is_bool else out

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a gathered (global) tensor."""
        n = x.shape[0] // self.world_size
        return x[self.rank * n:(self.rank + 1) * n]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (a new tensor)."""
        if not self.distributed:
            return x.clone()
        from accelerate.utils import reduce

        return reduce(x, "sum")

    def _max(self, values: Sequence[int]) -> list[int]:
        from accelerate.utils import reduce

        t = torch.tensor(list(values), dtype=torch.long, device=self.device)
        return [int(v) for v in reduce(t, "max").tolist()]

    def max_int(self, n: int) -> int:
        return self._max([n])[0] if self.distributed else int(n)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (one all-reduce)."""
        return self._max([0 if flag else 1])[0] == 0 if self.distributed else bool(flag)

    def gather_object(self, obj: Any) -> list[Any]:
        """Every process's picklable ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def shard(self, model: nn.Module, enabled: bool, reduce: str) -> nn.Module:
        """``model`` sharded with FSDP2 when ``enabled`` and several processes run (`engine.sharding.shard`;
        ``reduce``: ``mean`` or ``sum`` of the gradients over processes), else ``model`` itself."""
        if not enabled or not self.distributed:
            return model
        from rlhfkit.train.engine.sharding import shard

        return shard(model, self, reduce)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``accelerator.prepare(model)`` (DDP with several processes); a sharded model as it is."""
        from rlhfkit.train.engine.sharding import is_sharded

        return model if is_sharded(model) else self.accelerator.prepare(model)

    @staticmethod
    def clip_grad_norm_(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the gradients of ``params`` to the global L2 norm ``max_norm`` (sharded or not); the norm before."""
        from rlhfkit.train.engine.sharding import clip_grad_norm_

        return clip_grad_norm_(params, max_norm)

    def sum_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Replace every gradient by its sum over processes (one flat all-reduce; missing grads count as 0).
        Sharded (FSDP2, DTensor) parameters are skipped: their gradients are already reduce-scattered."""
        from rlhfkit.train.engine.sharding import is_sharded_param

        params = [p for p in params if not is_sharded_param(p)]
        if not self.distributed or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n
