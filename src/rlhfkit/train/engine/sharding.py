"""FSDP2 sharding of the trained models (``--fsdp``): the one place that knows about it.

torch's ``torch.distributed.fsdp.fully_shard`` is applied directly (not through accelerate's FSDP plugin): ``ppo``
keeps plain modules and never calls ``accelerator.prepare``, the two trainers reduce gradients differently (``rm
train`` averages over processes like DDP, ``ppo`` sums: its losses are already divided by the global token count),
and the sampler and the held-out evaluation need the parameters gathered once for many forwards; all three are
one call each on the FSDP2 module, while the plugin would need the Accelerator built around the config and the
optimizer prepared with the model.

- `shard(model, procs, reduce)`: ``fully_shard`` per decoder layer (the classes named by the transformers models'
  ``_no_split_modules``) and per other module with parameters of its own (`shard_groups`: embeddings, norms,
  heads; no root unit above them, because rlhfkit's forwards call a causal LM's decoder and head apart). Every
  parameter (frozen or trainable: FSDP2 allows both in one unit) is split along dim 0 over the processes (rank r
  holds rows ``r·⌈n/W⌉ …``, torch.chunk's split; the last ranks may hold fewer or none). ``reduce="mean"`` (rm
  train): the reduce-scatter averages the gradients (DDP's convention); ``"sum"`` (ppo). The frozen reference and
  reward models stay replicated (plain modules, inference only). A parameter-free copy of the model (meta device)
  is kept for `full_copy`.
- `is_sharded(module)`, `is_sharded_param(p)`: what `Processes.sum_grads` skips (FSDP2 already reduce-scattered).
- `gathered(*modules)`: a context in which the sharded modules hold their full parameters (one all-gather per unit
  on entry, none in the forwards inside, resharded on exit): the sampler's many small forwards, whose number
  differs between processes (each stops when its own rows have stopped), the evaluation's uneven shards and
  ppo's no-grad passes (in inference mode, where FSDP2 cannot all-gather) run inside it. Memory: the full
  parameters, for the duration of the context.
- `gradient_sync(modules, enabled)`: DDP's ``no_sync`` for the gradient accumulation over micro-batches.
- `clip_grad_norm_(params, max_norm)`: the global norm over sharded (DTensor) and replicated gradients together.
- `full_copy(model, procs)` (collective): on process 0 a plain module with the full weights (for the final
  ``save_pretrained``), None elsewhere.
- `save_sharded(folder, models, optimizers)` / `load_sharded(...)` (collective): the trainable weights and the
  optimizer states by parameter name through ``torch.distributed.checkpoint`` (DCP), each process writing its
  shards into ``folder``; DCP reshards on load, so the process count may change where the trainer's math allows.
"""

from __future__ import annotations

import copy
import math
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from rlhfkit.errors import RlhfkitError

DCP_FOLDER = "sharded"  # the DCP folder inside a checkpoint folder
OPTIMIZER_IN_DCP = "in sharded/"  # what trainer_state.json holds in place of a sharded optimizer's state
_SKELETONS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _fsdp() -> Any:
    from torch.distributed import fsdp

    return fsdp


def is_sharded(module: nn.Module | None) -> bool:
    """Whether ``module`` holds FSDP2 units (`shard` was applied to it)."""
    fsdp_module = _fsdp().FSDPModule
    return module is not None and any(isinstance(m, fsdp_module) for m in module.modules())


def _units(module: nn.Module) -> list[nn.Module]:
    fsdp_module = _fsdp().FSDPModule
    return [m for m in module.modules() if isinstance(m, fsdp_module)]


def is_sharded_param(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def layer_classes(model: nn.Module) -> set[str]:
    """The class names of the blocks that become FSDP units: the ``_no_split_modules`` of every transformers model
    inside ``model`` (e.g. ``LlamaDecoderLayer``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def shard_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The FSDP units of ``model``: each decoder layer (`layer_classes`), then every other module that holds
    parameters of its own (embeddings, final norms, LM and score heads), modules that share a parameter (tied
    embeddings) in one unit. No unit is nested in another but the layers' own, so rlhfkit's forwards that call the
    decoder and the head apart (hidden states sliced before the head) run each unit's all-gather."""
    classes = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes and m is not model]
    inside = {id(p) for layer in layers for p in layer.parameters()}
    leaves = [m for m in model.modules() if any(id(p) not in inside for p in m.parameters(recurse=False))]
    groups: list[list[nn.Module]] = []
    owner: dict[int, list[nn.Module]] = {}
    for leaf in leaves:
        shared = [owner[id(p)] for p in leaf.parameters(recurse=False) if id(p) in owner]
        group = shared[0] if shared else []
        if not shared:
            groups.append(group)
        group.append(leaf)
        for p in leaf.parameters(recurse=False):
            owner[id(p)] = group
    return [[layer] for layer in layers] + groups


def shard(model: nn.Module, procs: Any, reduce: str) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all processes (units: `shard_groups`; see the module docstring);
    returns it. Build the optimizer after this call (the parameters become new DTensor parameters)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RlhfkitError("--fsdp needs a process group: launch with torchrun or accelerate launch")
    from torch.distributed.device_mesh import init_device_mesh

    fsdp = _fsdp()
    # a parameter-free twin of the model for `full_copy` (buffers and flags; its tensors live on the meta device)
    _SKELETONS[model] = copy.deepcopy(model).to("meta")
    mesh = init_device_mesh(procs.device.type, (procs.world_size,))
    for group in shard_groups(model):
        fsdp.fully_shard(group if len(group) > 1 else group[0], mesh=mesh)
    gloo = torch.distributed.get_backend() == "gloo"
    for m in _units(model):
        m.set_reshard_after_forward(True, recurse=False)  # every unit is a root of its own: free after forward
        if reduce == "sum":
            m.set_gradient_divide_factor(1.0)
        if gloo:  # gloo has neither AVG nor PREMUL_SUM: a SUM reduce-scatter, then the division
            m.set_force_sum_reduction_for_comms(True)
    return model


@contextmanager
def gathered(*modules: nn.Module | None) -> Iterator[None]:
    """Full parameters in every sharded module of ``modules`` for the body (no collective in its forwards); plain
    modules pass through. Collective: every process enters and leaves it together."""
    units = [m for module in modules if module is not None for m in _units(module)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


@contextmanager
def gradient_sync(modules: Sequence[nn.Module | None], enabled: bool) -> Iterator[None]:
    """The body's backward reduce-scatters the gradients of the sharded ``modules`` only when ``enabled``; else they
    accumulate unsharded on each process (DDP's ``no_sync``) and the next synced backward reduce-scatters the sum, so
    a process's micro-batch gradients are added in the same order as under DDP. Plain modules: nothing."""
    sharded = [u for m in modules if m is not None for u in _units(m)]
    for m in sharded:
        m.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True)


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of the gradients of ``params`` over all processes (sharded gradients: their full norm;
    replicated ones count once); a 0-dim float32 tensor (0 without gradients)."""
    sharded = [p.grad for p in params if p.grad is not None and is_sharded_param(p)]
    plain = [p.grad for p in params if p.grad is not None and not is_sharded_param(p)]
    squares = []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        squares.append(norm.full_tensor() if is_sharded_param(norm) else norm)
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain))
    if not squares:
        return torch.zeros(())
    return torch.stack([s.float() for s in squares]).norm()


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the global norm: scale every gradient by ``min(1, max_norm / (norm
    + 1e-6))``; returns the norm before clipping. Without a sharded parameter it is torch's own call."""
    params = list(params)
    if not any(is_sharded_param(p) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = grad_norm(params)
    if math.isfinite(max_norm):
        for group in ([p for p in params if is_sharded_param(p)], [p for p in params if not is_sharded_param(p)]):
            grads = [p.grad for p in group if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm


def full_copy(model: nn.Module, procs: Any) -> nn.Module | None:
    """Collective: process 0 gets a plain (unsharded) module equal to the sharded ``model`` (its weights gathered
    with ``full_state_dict``, its buffers copied, ``requires_grad`` flags kept); the others get None. A plain
    ``model`` is returned as it is."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not procs.is_main:
        return None
    plain = copy.deepcopy(_SKELETONS[model]).to_empty(device="cpu")
    plain.load_state_dict(full, strict=False)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, buf in plain.named_buffers():  # non-persistent ones too (e.g. rotary inv_freq)
            buf.copy_(buffers[name].detach().cpu())
    params = dict(plain.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise RuntimeError(f"full_copy: parameters without a gathered value: {missing[:3]}")
    return plain


# ----------------------------------------------------------------------------------------------------------
# DCP checkpoints
# ----------------------------------------------------------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer | None) -> Any:
    """What a trainer's ``state_dict()`` stores for ``optimizer``: its ``state_dict()``, or `OPTIMIZER_IN_DCP` when it
    holds sharded parameters (their states are saved by `save_sharded`)."""
    if optimizer is None:
        return None
    if any(is_sharded_param(p) for g in optimizer.param_groups for p in g["params"]):
        return OPTIMIZER_IN_DCP
    return optimizer.state_dict()


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any) -> None:
    """The counterpart of `optimizer_state` (`OPTIMIZER_IN_DCP`: left to `load_sharded`)."""
    if saved == OPTIMIZER_IN_DCP:
        if optimizer_state(optimizer) != OPTIMIZER_IN_DCP:
            raise RlhfkitError("--resume: the checkpoint is sharded (--fsdp); resume it with --fsdp")
        return
    if optimizer_state(optimizer) == OPTIMIZER_IN_DCP:
        raise RlhfkitError("--resume: the checkpoint is not sharded; resume it without --fsdp")
    optimizer.load_state_dict(saved)


def _bundle(models: dict[str, nn.Module]) -> nn.Module:
    """The models under one root (parameter names ``<name>.<parameter>``), without copying them."""
    return nn.ModuleDict(models)


def _state(models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> tuple[nn.Module, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    bundle = _bundle(models)
    options = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(bundle, options=options),
             "optim": {name: get_optimizer_state_dict(bundle, opt, options=options)
                       for name, opt in optimizers.items()}}
    return bundle, state


def save_sharded(folder: Path, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Collective: the trainable weights of ``models`` and the states of ``optimizers``, by parameter name, as a DCP
    checkpoint in ``folder`` (every process writes its shards; process 0 the metadata)."""
    import torch.distributed.checkpoint as dcp

    _, state = _state(models, optimizers)
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Collective: load what `save_sharded` wrote into ``models`` and ``optimizers`` (resharded to this run's
    processes by DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    if not Path(folder).is_dir():
        raise RlhfkitError(f"{folder}: checkpoint folder missing (the checkpoint is not sharded or incomplete); "
                           f"resume a checkpoint of a --fsdp run with --fsdp")
    bundle, state = _state(models, optimizers)
    dcp.load(state, checkpoint_id=str(folder))
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_model_state_dict(bundle, state["model"], options=options)
    for name, opt in optimizers.items():
        set_optimizer_state_dict(bundle, opt, state["optim"][name], options=options)
