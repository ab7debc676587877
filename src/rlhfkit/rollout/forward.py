"""Teacher-forced forward passes over ``[query; response]`` for PPO: policy log-probs and critic values.

Inputs everywhere: ``query_ids``/``query_mask`` (B, P), prompts LEFT-padded; ``response_ids``/``response_mask``
(B, T), responses RIGHT-padded. The model sees the concatenation (B, L = P + T) with
``attention_mask = cat(query_mask, response_mask)`` and ``position_ids = max(cumsum(attention_mask) - 1, 0)``
(:func:`rlhfkit.models.loading.forward_hidden`), so the padding of a row changes nothing on its real tokens.

Alignment: the hidden state at sequence position ``i`` predicts the token at ``i + 1``. Response token ``t``
sits at position ``P + t``, so it is predicted by position ``P - 1 + t``; the T positions ``P - 1 … P + T - 2``
are the only ones whose logits PPO needs (the last query token predicts the first response token). The policy
forward runs the decoder, slices those T hidden states and only then applies the LM head, so the (B, T, V)
logits are the only vocabulary-sized tensor (the full (B, L, V) one is never built). Models whose causal-LM
forward transforms the head's output (logit soft-capping or scaling) and DistributedDataParallel-wrapped models
are instead called whole with ``logits_to_keep`` set to those T positions (same result, same saving).
The critic's value of the state before response token ``t`` is read at the same position ``P - 1 + t``.

Values at padded response positions: ``logprobs``, ``entropy`` and ``values`` are 0 there; ``logits`` hold
whatever the model computed (do not read them).

:func:`trim_batch` removes all-padding columns (left of the queries, right of the responses) before a
micro-batch's forward pass; :meth:`TrimmedBatch.restore` pads a (B, T') result back to (B, T).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from torch import nn

from rlhfkit.core.logprobs import head_logprobs_and_entropy, logprobs_and_entropy, upcast
from rlhfkit.core.masks import position_ids_from_mask
from rlhfkit.models.loading import forward_hidden
from rlhfkit.models.packing import packed_hidden, varlen_layout, varlen_problem
from rlhfkit.models.reward import RewardModel, unwrap_peft
from rlhfkit.models.trunk import Trunk, run_blocks, supports_split

__all__ = ["PolicyForward", "TrimmedBatch", "critic_forward", "packing_problem", "policy_forward",
           "policy_value_forward", "response_positions", "trim_batch", "trunk_decoder", "trunk_forward"]

# Config attributes of transformers models whose causal-LM forward transforms the LM head's output
# (Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling). Applying the LM head by hand would
# skip the transform, so for these models the full model is called with ``logits_to_keep`` instead.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


class PolicyForward(NamedTuple):
    """Outputs of :func:`policy_forward`.

    Attributes:
        logprobs: (B, T) float32 (float64 for a float64 model), log π(response token | prefix) at the given
            temperature; 0 on padding.
        entropy: (B, T) float32 (float64 for a float64 model) entropy of the tempered distribution, 0 on padding;
            None unless requested.
        logits: (B, T, V) raw (untempered) next-token logits in the model's dtype; None unless requested.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    logits: torch.Tensor | None


def _check_inputs(
    query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> None:
    if query_ids.dim() != 2 or response_ids.dim() != 2:
        raise ValueError(f"query_ids {tuple(query_ids.shape)} and response_ids {tuple(response_ids.shape)} must be 2-D")
    if query_ids.shape != query_mask.shape or response_ids.shape != response_mask.shape:
        raise ValueError(
            f"ids and masks differ in shape: query {tuple(query_ids.shape)} vs {tuple(query_mask.shape)}, "
            f"response {tuple(response_ids.shape)} vs {tuple(response_mask.shape)}"
        )
    if query_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"batch sizes differ: queries {query_ids.shape[0]}, responses {response_ids.shape[0]}")
    if query_ids.shape[1] < 1:
        raise ValueError("the query must have at least one column (its last token predicts the first response token)")


def _sequence(
    query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the concatenated (B, P + T) sequence (mask as bool)."""
    _check_inputs(query_ids, query_mask, response_ids, response_mask)
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask.bool(), response_mask.bool()], dim=1)
    return input_ids, attention_mask


def response_positions(P: int, T: int) -> slice:
    """The sequence positions ``P - 1 … P + T - 2`` whose outputs predict (or value the state before) the T
    response tokens of a (B, P + T) sequence."""
    return slice(P - 1, P + T - 1)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DistributedDataParallel and/or peft wrappers, else the model itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _find_decoder(lm: nn.Module) -> nn.Module | None:
    """The module that returns the last hidden states of a causal LM, or None if it cannot be found."""
    get_decoder = getattr(lm, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is lm:
        for name in ("model", "base_model", "transformer"):
            candidate = getattr(lm, name, None)
            if isinstance(candidate, nn.Module) and candidate is not lm:
                decoder = candidate
                break
    return None if decoder is None or decoder is lm else decoder


def _has_logit_transform(lm: nn.Module) -> bool:
    config = getattr(lm, "config", None)
    if config is None:
        return False
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            return True
    return False


def trunk_decoder(model: nn.Module) -> nn.Module | None:
    """The decoder of ``model`` whose blocks `models.trunk.run_blocks` can run in parts, or None.

    A plain transformers causal LM (no peft or DistributedDataParallel wrapper, no logit transform, a findable
    decoder and head) or a decoder `RewardModel` without LoRA, whose decoder `models.trunk.supports_split`. For
    every other model (peft: LoRA layers or a disabled adapter change what the blocks compute) ``policy_forward``
    and ``critic_forward`` take only the plain path.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # --fsdp: blocks run outside the root's forward would miss its all-gather
        return None
    if isinstance(model, RewardModel):
        plain = model.kind == "decoder" and unwrap_peft(model.model) is model.model
        decoder = model._backbone() if plain else None
    elif isinstance(model, nn.parallel.DistributedDataParallel) or _unwrap(model) is not model:
        decoder = None
    elif _has_logit_transform(model) or not hasattr(model, "get_output_embeddings"):
        decoder = None
    else:
        decoder = _find_decoder(model)
    return decoder if supports_split(decoder) else None


def _split_decoder(model: nn.Module) -> nn.Module:
    decoder = trunk_decoder(model)
    if decoder is None:
        raise ValueError(f"{type(model).__name__} cannot run from a trunk (see trunk_decoder)")
    return decoder


def trunk_forward(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    layers: int,
    base: Trunk | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> Trunk:
    """The hidden states (B, P + T, H) of ``[query; response]`` after the first ``layers`` blocks of ``model``'s
    decoder (`trunk_decoder`), from its embeddings or from ``base`` (the same batch after fewer blocks)."""
    input_ids, attention_mask = _sequence(query_ids, query_mask, response_ids, response_mask)
    decoder = _split_decoder(model)
    start = base.layers if base is not None else 0
    with _autocast(input_ids.device, autocast_dtype):
        hidden = run_blocks(decoder, attention_mask, start, layers, input_ids=input_ids,
                            hidden=base.hidden if base is not None else None)
    return Trunk(hidden, layers)


def _check_trunk(trunk: Trunk, input_ids: torch.Tensor) -> None:
    if trunk.hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"trunk hidden states {tuple(trunk.hidden.shape)} do not match the sequence "
                         f"{tuple(input_ids.shape)}")


def _head_path(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, lm_head)`` when the LM head can be applied by hand to the decoder's hidden states (no logit
    transform, no DistributedDataParallel wrapper, both findable); None: call the model whole."""
    lm = _unwrap(model)
    decoder = _find_decoder(lm)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    # a DistributedDataParallel wrapper must see the forward call (it prepares the gradient all-reduce there)
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel)
    if decoder is None or head is None or wrapped or _has_logit_transform(lm):
        return None
    return decoder, head


def _response_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, T: int,
                     trunk: Trunk | None = None, head_inputs: list[torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, nn.Module | None]:
    """``(hidden (B, T, H), lm_head)`` at the response-predicting positions when the LM head can be applied by
    hand (`_head_path`; with a ``trunk`` only the decoder's blocks above it run), else ``(logits (B, T, V), None)``
    from the model's own head, at exactly those positions (``head_inputs`` then gets that head's input, read by a
    pre-hook for the call)."""
    P = input_ids.shape[1] - T
    positions = response_positions(P, T)
    if trunk is not None:
        _check_trunk(trunk, input_ids)
        decoder = _split_decoder(model)
        hidden = run_blocks(decoder, attention_mask, trunk.layers, hidden=trunk.hidden)
        return hidden[:, positions], model.get_output_embeddings()
    path = _head_path(model)
    if path is not None:
        decoder, head = path
        hidden = forward_hidden(decoder, input_ids, attention_mask)
        return hidden[:, positions], head
    # Fallback (models with a logit transform, DDP-wrapped models, models without a findable decoder/head): the
    # model applies its own head (and transform) at exactly these positions through ``logits_to_keep``.
    keep = torch.arange(positions.start, positions.stop, device=input_ids.device)
    handle = None if head_inputs is None else _unwrap(model).get_output_embeddings().register_forward_pre_hook(
        lambda module, args: head_inputs.append(args[0]))
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=keep,
        )
    finally:
        if handle is not None:
            handle.remove()
    return out.logits, None


def fusable_head(head: nn.Module | None, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of an LM head that `core.logprobs.head_logprobs_and_entropy` can apply to ``hidden``
    in place of calling it, else None: exactly a ``torch.nn.Linear`` (not a LoRA layer, not FSDP2's
    ``FSDPLinear``, whose all-gather runs in its hooks), without hooks, plain float32/float64 weights of
    ``hidden``'s dtype, and no autocast on ``hidden``'s device (under autocast the head computes in another
    dtype)."""
    from torch.nn.modules import module as module_hooks

    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return None
    weight, bias = head.weight, head.bias
    tensors = (weight,) if bias is None else (weight, bias)
    if any(type(t) is not nn.Parameter and type(t) is not torch.Tensor for t in tensors):  # e.g. a DTensor
        return None
    if hidden.dtype not in (torch.float32, torch.float64) or any(t.dtype != hidden.dtype for t in tensors):
        return None
    if torch.is_autocast_enabled(hidden.device.type):
        return None
    return weight, bias


def _packing_decoder(model: nn.Module, trunk: Trunk | None) -> tuple[nn.Module | None, str | None]:
    """``(decoder, None)`` when `policy_forward` can pack ``model``'s batches, else ``(None, why)`` (see
    :func:`packing_problem`)."""
    if trunk is not None:
        decoder = trunk_decoder(model)
        if decoder is None:
            return None, f"{type(model).__name__} cannot run from a trunk"
    else:
        path = _head_path(model)
        if path is None:
            return None, (f"{type(model).__name__}'s LM head cannot be applied by hand (a logit transform, a "
                          "DistributedDataParallel wrapper, or no findable decoder and head)")
        decoder = path[0]
    problem = varlen_problem(decoder)
    return (None, problem) if problem is not None else (decoder, None)


def packing_problem(model: nn.Module, trunk: Trunk | None = None) -> str | None:
    """Why `policy_forward` cannot pack ``model``'s batches padding-free (``packing=True`` then takes the padded
    path); None if it can: the LM head applied by hand (`_head_path`; with a ``trunk``, a `trunk_decoder`) and a
    decoder that `models.packing.varlen_problem` accepts."""
    return _packing_decoder(model, trunk)[1]


def _packed_response_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            response_mask: torch.Tensor, trunk: Trunk | None = None
                            ) -> tuple[torch.Tensor, nn.Module] | None:
    """``(hidden (N, H), lm_head)`` of the N real response tokens' predicting positions only (row-major order of
    ``response_mask`` (B, T)), from ONE padding-free packed forward of the batch (`models.packing.varlen_layout`;
    rows that share their prompt run it once); None when :func:`packing_problem` says no or the batch has no
    response token."""
    mask = response_mask.bool()
    decoder, _ = _packing_decoder(model, trunk)
    if decoder is None or not bool(mask.any()):
        return None
    B, T = response_mask.shape
    P = input_ids.shape[1] - T
    if trunk is not None:
        _check_trunk(trunk, input_ids)
    head = _unwrap(model).get_output_embeddings()
    sequence_response = torch.cat([torch.zeros_like(attention_mask[:, :P]), mask], dim=1)
    layout = varlen_layout(input_ids, attention_mask, sequence_response, share_prompts=True)
    hidden = packed_hidden(decoder, layout, trunk)  # (1, sum of real tokens, H)
    return hidden[0, layout.gather_index[:, response_positions(P, T)][mask]], head


def _head_logprobs(hidden: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor | None] | None,
                   logits: torch.Tensor | None, tokens: torch.Tensor, temperature: float, with_entropy: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropy of ``tokens`` (...,): from the hidden states (..., H) and the weight and bias of a
    `fusable_head` (``params``) by `core.logprobs.head_logprobs_and_entropy` (the same bits as the head then
    `core.logprobs.logprobs_and_entropy`, one vocabulary-sized buffer instead of two), else from the
    ``logits`` (..., V) by `core.logprobs.logprobs_and_entropy`, on (N, 1, V) rows (the fused call's blocks;
    the block size changes no bit)."""
    lead = tokens.shape
    if params is not None:
        logprobs, entropy = head_logprobs_and_entropy(hidden.reshape(-1, hidden.shape[-1]), *params,
                                                      tokens.reshape(-1), temperature, with_entropy=with_entropy)
    else:
        logprobs, entropy = logprobs_and_entropy(logits.reshape(-1, 1, logits.shape[-1]), tokens.reshape(-1, 1),
                                                 temperature, with_entropy=with_entropy)
    return logprobs.reshape(lead), entropy.reshape(lead) if entropy is not None else None


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) zeros with ``values`` (N, ...) at the N True positions of ``mask`` (B, T), row-major; keeps the
    gradient."""
    out = values.new_zeros((*mask.shape, *values.shape[1:]))
    return out.index_put((mask,), values)


def policy_forward(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_logits: bool = False,
    autocast_dtype: torch.dtype | None = None,
    trunk: Trunk | None = None,
    packing: bool = False,
    fused_head: bool = True,
    head_inputs: list[torch.Tensor] | None = None,
) -> PolicyForward:
    """Log-probs (and optionally entropy, logits) of the response tokens under a causal LM.

    ``model`` is any transformers causal LM, optionally wrapped by peft (call it inside
    `models.adapters.adapters_disabled(model)` for the reference policy). Gradients flow iff the caller has grad
    enabled.
    ``temperature`` must be the sampling temperature (see :mod:`rlhfkit.core.logprobs`). ``autocast_dtype``
    (e.g. ``torch.bfloat16``) runs the model under ``torch.autocast`` on its device type; log-probs and entropy
    are always computed in float32. ``trunk`` (`trunk_forward` of this batch): run only the decoder's blocks above
    it (a model `trunk_decoder` accepts); the same numbers as the plain forward when the trunk came from the
    same model's frozen lower blocks on the same batch. ``packing``: run the batch as one padding-free packed
    sequence of its real tokens (`models.packing.varlen_layout`, the prompt of rows that share it once) and apply
    the LM head to the real response tokens only; the same numbers up to float rounding (the padded path where
    :func:`packing_problem` says no). ``fused_head`` (default): where the LM head is a `fusable_head` and the
    logits are not asked for, `core.logprobs.head_logprobs_and_entropy` applies it (the same bits; one
    vocabulary-sized buffer, reused between calls on the CPU, instead of the logits and their gradient);
    False: the head's own call, then `core.logprobs.logprobs_and_entropy`. ``head_inputs``: a list that gets the
    hidden states the LM head is applied to ((B, T, H), or (N, H) packed; `policy_value_forward` reads them): handed
    over where the head is applied by hand (so it stays fusable), read by a pre-hook where the model calls its own
    head.
    Shapes: query (B, P) left-padded, response (B, T) right-padded -> :class:`PolicyForward` of (B, T) tensors.
    """
    input_ids, attention_mask = _sequence(query_ids, query_mask, response_ids, response_mask)
    T = response_ids.shape[1]
    mask = response_mask.bool()
    with _autocast(input_ids.device, autocast_dtype):
        packed = _packed_response_hidden(model, input_ids, attention_mask, mask, trunk) if packing else None
        hidden, head = packed if packed is not None else _response_hidden(model, input_ids, attention_mask, T,
                                                                          trunk, head_inputs)
        if head_inputs is not None and head is not None:
            head_inputs.append(hidden)
        params = fusable_head(head, hidden) if fused_head and head is not None and not with_logits else None
        logits = None if params is not None else head(hidden) if head is not None else hidden
    # one pass for both (`core.logprobs`); the log-probs are the same bits with or without the entropy, so the
    # rollout-time and update-time passes agree exactly
    tokens = response_ids[mask] if packed is not None else response_ids
    logprobs, entropy = _head_logprobs(hidden, params, logits, tokens, temperature, with_entropy)
    if packed is not None:
        return PolicyForward(logprobs=_scatter(mask, logprobs),
                             entropy=_scatter(mask, entropy) if entropy is not None else None,
                             logits=_scatter(mask, logits) if with_logits else None)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logprobs = torch.where(mask, logprobs, zero)
    if entropy is not None:
        entropy = torch.where(mask, entropy, zero)
    return PolicyForward(logprobs=logprobs, entropy=entropy, logits=logits if with_logits else None)


def policy_value_forward(
    model: nn.Module,
    value_head: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    trunk: Trunk | None = None,
    **kwargs: Any,
) -> tuple[PolicyForward, torch.Tensor]:
    """`policy_forward` and the values (B, T) of ``value_head`` on the policy's own trunk, from ONE forward
    (``critic=shared``, `models.value_head`).

    The head reads exactly what the LM head reads: the final hidden states (B, T, H) at the response-predicting
    positions ``P - 1 … P + T - 2`` (captured on their way into the LM head, whichever path `policy_forward`
    takes: decoder + head, trunk, packed (only the real response positions), or the whole model with
    ``logits_to_keep``), so value ``t`` is
    ``value_head(h_{P-1+t})``, the state before response token ``t``: the position `critic_forward` reads.
    Values are float32 (float64 for a float64 model), 0 on padding; gradients flow into the head and the trunk
    iff grad is enabled. ``kwargs`` go to `policy_forward` (temperature, with_entropy, with_logits, packing).
    """
    captured: list[torch.Tensor] = []  # the LM head's input, whichever path policy_forward takes
    out = policy_forward(model, query_ids, query_mask, response_ids, response_mask, autocast_dtype=autocast_dtype,
                         trunk=trunk, head_inputs=captured, **kwargs)
    B, T = response_ids.shape
    mask = response_mask.bool()
    n = int(mask.sum())
    # the head's input: (B, T, H), or (N, H) on the N real response tokens of a packed forward
    packed = len(captured) == 1 and captured[0].dim() == 2 and captured[0].shape[0] == n
    if len(captured) != 1 or not (packed or captured[0].shape[:2] == (B, T)):
        raise ValueError(f"critic=shared: the LM head of {type(model).__name__} ran {len(captured)} times "
                         f"(shapes {[tuple(c.shape) for c in captured]}), not once on the ({B}, {T}) response "
                         "positions; the value head cannot read the policy's hidden states")
    with _autocast(query_ids.device, autocast_dtype):
        values = upcast(value_head(captured[0])).squeeze(-1)
    if packed:
        return out, _scatter(mask, values)
    return out, torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _token_values(output: Any) -> torch.Tensor:
    """Per-token values (B, L) from a critic's output: ``.token_scores`` (RewardModel), ``.values`` or a tensor."""
    for name in ("token_scores", "values"):
        values = getattr(output, name, None)
        if isinstance(values, torch.Tensor):
            return values
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(f"the critic returned {type(output).__name__}; expected .token_scores, .values or a tensor")


def critic_forward(
    critic: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    trunk: Trunk | None = None,
    packing: bool = False,
) -> torch.Tensor:
    """Values (B, T) float32 (float64 for a float64 critic) of the states before each response token; 0 on padding.

    ``critic(input_ids, attention_mask)`` must return per-token scores (B, L), e.g.
    :class:`rlhfkit.models.reward.RewardModel` (``.token_scores``); value ``t`` is read at sequence position
    ``P - 1 + t`` (the last query token values the state before the first response token). ``trunk``: as in
    `policy_forward`, passed on as ``critic(..., trunk=trunk)`` (a `RewardModel` that `trunk_decoder` accepts).
    ``packing``: a decoder `RewardModel` runs the batch padding-free packed (``RewardModel.forward(packing=True)``,
    the prompt of rows that share it once); other critics ignore it. Same values up to float rounding.
    """
    input_ids, attention_mask = _sequence(query_ids, query_mask, response_ids, response_mask)
    P, T = query_ids.shape[1], response_ids.shape[1]
    extra: dict[str, Any] = {}
    if trunk is not None:
        _check_trunk(trunk, input_ids)
        _split_decoder(critic)
        extra = {"trunk": trunk}
    if packing and isinstance(critic, RewardModel):
        response = torch.cat([torch.zeros_like(attention_mask[:, :P]), response_mask.bool()], dim=1)
        extra.update(packing=True, share_prompts=True, response_mask=response)
    with _autocast(input_ids.device, autocast_dtype):
        token_values = _token_values(critic(input_ids, attention_mask, **extra))
    if token_values.shape[:2] != input_ids.shape:
        raise ValueError(
            f"critic values {tuple(token_values.shape)} do not match the sequence {tuple(input_ids.shape)}")
    values = upcast(token_values[:, response_positions(P, T)])
    if values.dim() == 3:  # (B, T, 1) heads
        values = values.squeeze(-1)
    return torch.where(response_mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


class TrimmedBatch(NamedTuple):
    """A micro-batch without all-padding columns (see :func:`trim_batch`).

    ``query_start``: the first kept query column; ``response_end``: one past the last kept response column;
    ``response_length``: T of the untrimmed batch.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    query_start: int
    response_end: int
    response_length: int

    def restore(self, x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """Pad a (B, T', ...) result of the trimmed batch back to (B, T, ...) with ``value`` on the right."""
        if x.shape[1] != self.response_end:
            raise ValueError(f"expected {self.response_end} response columns, got {x.shape[1]}")
        missing = self.response_length - self.response_end
        if missing == 0:
            return x
        pad = x.new_full((x.shape[0], missing, *x.shape[2:]), value)
        return torch.cat([x, pad], dim=1)


def trim_batch(
    query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> TrimmedBatch:
    """Drop the leading query columns that are padding in every row and the trailing response columns that are
    padding in every row. At least one query column is kept (the last one predicts the first response token);
    responses may trim to zero columns. Pure indexing: the kept tensors are views of the inputs.
    """
    _check_inputs(query_ids, query_mask, response_ids, response_mask)
    P, T = query_ids.shape[1], response_ids.shape[1]
    q_used = query_mask.bool().any(dim=0)
    query_start = int(q_used.nonzero()[0]) if bool(q_used.any()) else P - 1
    r_used = response_mask.bool().any(dim=0)
    response_end = int(r_used.nonzero()[-1]) + 1 if bool(r_used.any()) else 0
    return TrimmedBatch(
        query_ids=query_ids[:, query_start:],
        query_mask=query_mask[:, query_start:],
        response_ids=response_ids[:, :response_end],
        response_mask=response_mask[:, :response_end],
        query_start=query_start,
        response_end=response_end,
        response_length=T,
    )
