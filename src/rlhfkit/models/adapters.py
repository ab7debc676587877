"""Parameter-efficient training: LoRA (via peft) and freezing of lower layers.

These work on a :class:`~rlhfkit.models.reward.RewardModel`, a :class:`~rlhfkit.models.pairrm.PairRanker`
(both changed in place and returned) or a plain transformers model such as the policy (a peft ``PeftModel``
around it is returned).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator, Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.reward import RewardModel, unwrap_peft

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer except the output layer


def _host(model: nn.Module) -> RewardModel | None:
    """The RewardModel whose ``.model`` holds the transformer (a PairRanker's ``rm``), or None."""
    if isinstance(model, RewardModel):
        return model
    rm = getattr(model, "rm", None)
    return rm if isinstance(rm, RewardModel) else None


def has_lora(model: nn.Module) -> bool:
    """True if LoRA adapters (a peft model) are attached."""
    host = _host(model)
    return isinstance(host.model if host is not None else model, PeftModel)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
) -> nn.Module:
    """Attach LoRA adapters (rank ``r``, scale ``alpha / r``) and freeze everything else except the reward head.

    ``target_modules=None`` (or ``"all-linear"``, also as the one-element list a command line gives) adapts
    every linear layer except the output layer, peft's ``all-linear``: for a causal LM all linear layers of the
    attention and MLP blocks (``q/k/v/o_proj``, ``gate/up/down_proj`` for Llama) but not ``lm_head``; for a
    reward model every linear layer but its head. The head stays fully trainable: the decoder kind's ``score``
    layer is a peft ``modules_to_save`` entry (never LoRA-wrapped), the encoder kind's head lives outside the peft
    model. Returns the reward model / ranker itself, or a ``PeftModel`` for a plain transformers model.
    """
    if has_lora(model):
        raise RlhfkitError("LoRA adapters are already attached to this model")
    if r < 1:
        raise RlhfkitError(f"LoRA rank r must be >= 1, got {r}")
    host = _host(model)
    decoder_rm = host is not None and host.kind == "decoder"
    targets = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
    if targets is None or targets == [ALL_LINEAR]:
        targets = ALL_LINEAR  # peft reads the shorthand only as a string
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=["score"] if decoder_rm else None,
        exclude_modules=["score"] if decoder_rm else None,
    )
    try:
        if host is None:
            return _get_peft_model(model, config)
        host.model = _get_peft_model(host.model, config)
    except ValueError as e:
        raise RlhfkitError(f"cannot attach LoRA adapters (target_modules={target_modules!r}): {e}") from e
    if host.head is not None:
        host.head.requires_grad_(True)
    return model


def _get_peft_model(model: nn.Module, config: LoraConfig) -> nn.Module:
    """``peft.get_peft_model`` without the FutureWarning that peft <= 0.21 triggers on transformers >= 5.24 by
    reading the deprecated ``is_gradient_checkpointing`` (peft's own code, nothing a user can change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


@contextlib.contextmanager
def adapters_disabled(model: PeftModel) -> Iterator[None]:
    """peft's ``model.disable_adapter()`` (the base model's forward: the reference policy of a LoRA policy), with
    every parameter's ``requires_grad`` as it was before. On exit peft marks every adapter weight of the active
    adapter trainable again, also those that `freeze_lower_layers` froze; they would then get gradients, count in
    the clipped gradient norm and be written to checkpoints without being in the optimizer."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def merge_lora_for_save(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A copy of the model (or the model itself with ``inplace=True``) with LoRA weights merged into the base
    weights and peft removed, ready for ``save_pretrained`` as a plain HF folder. Models without LoRA are returned
    as they are (copied unless ``inplace``)."""
    target = model if inplace else copy.deepcopy(model)
    host = _host(target)
    if host is not None:
        if isinstance(host.model, PeftModel):
            host.model = host.model.merge_and_unload()
        return target
    return target.merge_and_unload() if isinstance(target, PeftModel) else target


def _transformer(model: nn.Module) -> nn.Module:
    """The bare transformer (``LlamaModel``, ``BertModel``, ...) inside any supported wrapper."""
    host = _host(model)
    hf = unwrap_peft(host.model if host is not None else model)
    return getattr(hf, "base_model", hf)


def _layer_list(base: nn.Module) -> nn.ModuleList:
    for path in ("layers", "encoder.layer", "h", "decoder.layers", "transformer.h", "layer"):
        obj: object = base
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise RlhfkitError(f"cannot find the list of transformer blocks in {type(base).__name__}")


def freeze_lower_layers(model: nn.Module, n: int) -> nn.Module:
    """Freeze the embeddings and the first ``n`` transformer blocks (``requires_grad = False``); in place.

    Blocks are found generically (``layers``, ``encoder.layer``, ``h``, ``decoder.layers``). Note: with tied
    input/output embeddings (a causal LM's ``lm_head``) the output layer is frozen too, being the same tensor.
    """
    base = _transformer(model)
    layers = _layer_list(base)
    if not 0 <= n <= len(layers):
        raise RlhfkitError(f"cannot freeze {n} layers: the model has {len(layers)} transformer blocks")
    frozen: list[nn.Module] = [base.get_input_embeddings(), *layers[:n]]
    for name in ("embeddings", "wpe", "embed_positions"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            frozen.append(module)
    for module in frozen:
        module.requires_grad_(False)
    return model
