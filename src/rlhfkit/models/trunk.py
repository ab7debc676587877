"""A decoder's blocks run in two parts: the lower blocks (the "trunk") once, the upper blocks from its output.

With the embeddings and the lowest k blocks of a model frozen, the hidden states after block k depend on the
tokens only. PPO needs them several times per rollout (old log-probs, reference log-probs, every epoch), so the
trainer computes them once (`train.ppo_trunk`) and runs only blocks k..N afterwards. :func:`run_blocks` is that
split: ``run_blocks(d, mask, 0, k, input_ids=ids)`` then ``run_blocks(d, mask, k, hidden=...)`` computes
exactly what ``d(input_ids, attention_mask, position_ids)`` computes, op for op (tests compare them bit for bit).

How a decoder runs its blocks is architecture-specific (mask creation, rotary embeddings, the final norm, input
scaling). :data:`SUPPORTED` lists the transformers classes whose ``forward`` (transformers 5.24) is known to be:

1. ``hidden = embed_tokens(input_ids)`` (no scaling; Gemma's ``* sqrt(H)`` would be one);
2. one causal mask per attention kind, from ``(config, hidden, attention_mask, position_ids)``:
   ``full_attention`` (`create_causal_mask`) and ``sliding_attention`` (`create_sliding_window_causal_mask`),
   block i using the kind :func:`mask_kinds` gives (Llama: full; Mistral: sliding when ``config.sliding_window``
   is set; Qwen2 / Qwen3: ``config.layer_types[i]``);
3. ``position_embeddings = rotary_emb(hidden, position_ids)``;
4. ``hidden = layer(hidden, attention_mask=mask_i, position_embeddings=..., position_ids=...)`` for each block;
5. ``hidden = norm(hidden)``.

Only the exact classes qualify (a subclass may change ``forward``); every other decoder gets
:func:`supports_split` False, and its callers take the plain path.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.mistral.modeling_mistral import MistralModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

from rlhfkit.core.masks import position_ids_from_mask

__all__ = ["SUPPORTED", "BatchTrunks", "Trunk", "TrunkCache", "embedding_and_blocks", "mask_kinds", "named_parameters", "run_blocks", "shared_depth",
           "supports_split"]

SUPPORTED = (LlamaModel, MistralModel, Qwen2Model, Qwen3Model)
_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
_MASK_ARGUMENTS = {"config", "inputs_embeds", "attention_mask", "position_ids"}
# configuration entries that the embeddings, blocks, masks and rotary tables do not read (a reward model's
# labels and pad id, names, saving and output switches)
_IGNORED_CONFIG = {"architectures", "id2label", "label2id", "num_labels", "problem_type", "pad_token_id",
                   "bos_token_id", "eos_token_id", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
                   "use_cache", "tie_word_embeddings", "return_dict", "output_hidden_states", "output_attentions",
                   "finetuning_task", "tokenizer_class", "_commit_hash", "chunk_size_feed_forward"}
# `models.packing.VARLEN_ATTENTION`, which a packed forward switches an SDPA model to: plain SDPA on every call
# without a segment plan (named here, not imported: `models.packing` imports this module)
_SDPA_ALIASES = {"rlhfkit_varlen": "sdpa"}


def _cache_keyword(fn: Callable) -> str | None:
    """The name under which ``fn`` (a mask function) takes the KV cache (transformers 5.24 renamed
    ``past_key_values`` to ``cache``), or None when ``fn`` does not take the arguments `run_blocks` passes (then
    nothing is split: another transformers release may build masks otherwise)."""
    params = inspect.signature(fn).parameters
    cache = next((name for name in ("cache", "past_key_values") if name in params), None)
    required = {name for name, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    ok = cache is not None and _MASK_ARGUMENTS <= set(params) and required <= _MASK_ARGUMENTS | {cache}
    return cache if ok else None


_CACHE_KEYWORDS = {kind: _cache_keyword(fn) for kind, fn in _MASKS.items()}


class Trunk(NamedTuple):
    """Hidden states (B, L, H) of a batch after its decoder's embeddings and first ``layers`` blocks."""

    hidden: torch.Tensor
    layers: int


class BatchTrunks(NamedTuple):
    """Frozen trunks of one batch of ``[query; response]`` rows, offered to another model that may share those
    blocks (PPO offers its rollout's trunks to the reward models, `rollout.scoring.RMReward`).

    ``query_ids``/``query_mask`` (B, P) left-padded, ``response_ids``/``response_mask`` (B, T) right-padded (bool
    masks; positions from the concatenated mask, `core.masks.position_ids_from_mask`); ``trunks``: pairs
    ``(decoder, Trunk)``, the hidden states (B, P + T, H) of that decoder's embeddings and first ``layers`` blocks
    on this batch, computed without autocast.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    trunks: tuple[tuple[nn.Module, Trunk], ...]


def supports_split(decoder: nn.Module | None) -> bool:
    """Whether :func:`run_blocks` reproduces ``decoder``'s forward: its exact class is in :data:`SUPPORTED` and the
    installed transformers' mask functions take the arguments it passes."""
    return (decoder is not None and type(decoder) in SUPPORTED
            and all(_CACHE_KEYWORDS[kind] is not None for kind in set(mask_kinds(decoder))))


def num_blocks(decoder: nn.Module) -> int:
    """The blocks the decoder's forward runs (``layers[:config.num_hidden_layers]``)."""
    return min(len(decoder.layers), decoder.config.num_hidden_layers)


def mask_kinds(decoder: nn.Module) -> list[str]:
    """The attention-mask kind (``full_attention`` / ``sliding_attention``) of each block, as its forward picks it."""
    n, config = num_blocks(decoder), decoder.config
    if isinstance(decoder, (Qwen2Model, Qwen3Model)):
        return list(config.layer_types[:n])
    if isinstance(decoder, MistralModel) and config.sliding_window is not None:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def embedding_and_blocks(decoder: nn.Module, stop: int) -> list[nn.Module]:
    """The modules that make the hidden states after block ``stop``: the input embeddings and blocks 0..stop-1."""
    return [decoder.embed_tokens, *decoder.layers[:stop]]


def run_blocks(decoder: nn.Module, attention_mask: torch.Tensor, start: int, stop: int | None = None,
               input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, **attention_kwargs: Any) -> torch.Tensor:
    """Blocks ``start .. stop-1`` of a supported decoder; (B, L, H).

    ``start == 0`` embeds ``input_ids`` (B, L); otherwise ``hidden`` (B, L, H) holds the hidden states after block
    ``start`` (from an earlier call). ``stop=None`` runs the remaining blocks and the final norm: the decoder's
    ``last_hidden_state``. ``attention_mask`` (B, L) is the padding mask; positions come from it
    (`core.masks.position_ids_from_mask`, as `models.loading.forward_hidden` passes them), or are given as
    ``position_ids`` (B, L) (a packed row, `models.packing.packed_hidden`); ``attention_kwargs`` reach every
    block's attention function (the segment plan of a packed row).
    """
    if not supports_split(decoder):
        raise ValueError(f"{type(decoder).__name__} is not a decoder whose blocks can be run in parts")
    n = num_blocks(decoder)
    final = stop is None
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"blocks {start}..{stop} of a decoder with {n} blocks")
    if start == 0:
        if input_ids is None:
            raise ValueError("start = 0 needs input_ids")
        hidden = decoder.embed_tokens(input_ids)
    elif hidden is None or hidden.shape[:2] != attention_mask.shape:
        raise ValueError(f"start = {start} needs hidden states of shape (B, L, H) for the mask "
                         f"{tuple(attention_mask.shape)}")
    elif hidden.dtype != decoder.embed_tokens.weight.dtype:
        # the masks and rotary tables take the dtype of the residual stream, which is the embeddings' (autocast
        # too: a block adds its bf16 outputs to the float32 stream)
        raise ValueError(f"hidden states in {hidden.dtype}, the embeddings in {decoder.embed_tokens.weight.dtype}")
    if stop > start:
        mask = attention_mask.long()
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        kinds = mask_kinds(decoder)[start:stop]
        masks = {kind: _MASKS[kind](config=decoder.config, inputs_embeds=hidden, attention_mask=mask,
                                    position_ids=position_ids, **{_CACHE_KEYWORDS[kind]: None})
                 for kind in set(kinds)}
        position_embeddings = decoder.rotary_emb(hidden, position_ids)
        for layer, kind in zip(decoder.layers[start:stop], kinds):
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=position_embeddings,
                           position_ids=position_ids, use_cache=False, **attention_kwargs)
    return decoder.norm(hidden) if final else hidden


# ----------------------------------------------------------------------------------------------------------
# Decoders that share their lowest blocks
# ----------------------------------------------------------------------------------------------------------
def named_parameters(modules: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``modules`` (e.g. :func:`embedding_and_blocks`), named ``"<module index>.<name>"``."""
    return [(f"{i}.{name}", p) for i, m in enumerate(modules) for name, p in m.named_parameters()]


def _config_view(decoder: nn.Module) -> dict[str, Any]:
    config = decoder.config
    view = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG}
    implementation = getattr(config, "_attn_implementation", None)
    view["_attn_implementation"] = _SDPA_ALIASES.get(implementation, implementation)
    return view


def _same_tensors(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(na == nb and ta.dtype == tb.dtype and ta.device == tb.device and
                                    torch.equal(ta, tb) for (na, ta), (nb, tb) in zip(a, b))


def _same_setup(a: nn.Module, b: nn.Module) -> bool:
    """The same architecture, block configuration and rotary tables (buffers included)."""
    if type(a) is not type(b) or _config_view(a) != _config_view(b):
        return False
    rotary = (list(a.rotary_emb.named_buffers()), list(b.rotary_emb.named_buffers()))
    return _same_tensors(*rotary) and getattr(a.rotary_emb, "attention_scaling", None) == getattr(
        b.rotary_emb, "attention_scaling", None)


def shared_depth(a: nn.Module, b: nn.Module, limit: int | None = None) -> int:
    """How many of the lowest ``limit`` blocks (None: all the blocks both have) two supported decoders share bit
    for bit (their embeddings too; 0 if those differ): the hidden states after that many blocks are then the same
    function of the tokens. "The same" = the same class, the same configuration apart from :data:`_IGNORED_CONFIG`
    (an SDPA model that a packed forward switched to `models.packing.VARLEN_ATTENTION` counts as SDPA), equal
    rotary tables, and ``torch.equal`` parameters of the same dtype and device."""
    if limit is None:
        limit = min(num_blocks(a), num_blocks(b))
    if a is b:
        return limit
    if limit == 0 or not _same_setup(a, b) or mask_kinds(a)[:limit] != mask_kinds(b)[:limit]:
        return 0
    if not _same_tensors(named_parameters([a.embed_tokens]), named_parameters([b.embed_tokens])):
        return 0
    depth = 0
    while depth < limit and _same_tensors(named_parameters([a.layers[depth]]), named_parameters([b.layers[depth]])):
        depth += 1
    return depth


def _dropout(decoder: nn.Module, layers: int) -> bool:
    """Whether the embeddings or lowest ``layers`` blocks of ``decoder`` apply dropout in training mode (a dropout
    module with p > 0, or the attention dropout of the config)."""
    modules = [m for part in embedding_and_blocks(decoder, layers) for m in part.modules()]
    return (any(isinstance(m, nn.Dropout) and m.p > 0 for m in modules)
            or float(getattr(decoder.config, "attention_dropout", 0.0) or 0.0) > 0)


class TrunkCache:
    """Hidden states after the embeddings and first ``layers`` blocks of ``decoder``, per token sequence.

    Filled with what another computation already produced for those exact tokens (the sampler's decode steps,
    `rollout.sampling.HiddenCapture`, while it sampled the responses a reward model is then trained on), so that a
    model whose lowest ``layers`` blocks are ``decoder``'s, bit for bit and frozen (:meth:`usable_for`), runs
    only its blocks above. :meth:`trunk` serves a padded batch: every row it holds from the cache, every other
    row computed with ``decoder`` (:func:`run_blocks`), so a miss (a text that re-tokenises differently, a
    truncated row) costs its forward and nothing else. Stored states differ from a forward over the whole row by
    the float rounding of the computation that made them.
    """

    def __init__(self, decoder: nn.Module, layers: int, autocast_dtype: torch.dtype | None = None) -> None:
        if not supports_split(decoder):
            raise ValueError(f"{type(decoder).__name__} is not a decoder whose blocks can be run in parts")
        if not 1 <= layers <= num_blocks(decoder):
            raise ValueError(f"layers={layers} for a decoder with {num_blocks(decoder)} blocks")
        self.decoder, self.layers = decoder, layers
        self.autocast_dtype = autocast_dtype  # the autocast the states were (and misses are) computed under
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.hits = self.misses = 0

    def add(self, token_ids: list[int], hidden: torch.Tensor) -> None:
        """The states (L, H) of the sequence ``token_ids`` (L ids)."""
        if hidden.dim() != 2 or hidden.shape[0] != len(token_ids):
            raise ValueError(f"states {tuple(hidden.shape)} for {len(token_ids)} tokens")
        self.states[tuple(token_ids)] = hidden.detach()

    def __len__(self) -> int:
        return len(self.states)

    def usable_for(self, backbone: nn.Module, training: bool = True, autocast_dtype: torch.dtype | None = None
                   ) -> str | None:
        """Why ``backbone``, run under ``autocast_dtype`` (None: none), cannot take this cache's states (None if it
        can): its embeddings and lowest ``layers`` blocks must equal ``decoder``'s bit for bit (`shared_depth`: the
        same device too), the autocast must be the one the states were computed under, and, for ``training``, those
        blocks must be frozen (no parameter requires grad) and apply no dropout (the cached states have none)."""
        if not supports_split(backbone):
            return f"{type(backbone).__name__} cannot run its blocks in parts"
        if autocast_dtype != self.autocast_dtype:
            return f"it runs under autocast {autocast_dtype}, the states were computed under {self.autocast_dtype}"
        if training and _dropout(backbone, self.layers):
            return f"its lowest {self.layers} blocks apply dropout in training"
        if training and any(p.requires_grad for _, p in named_parameters(embedding_and_blocks(backbone,
                                                                                             self.layers))):
            return f"its embeddings or lowest {self.layers} blocks are trained (freeze at least {self.layers} layers)"
        if shared_depth(self.decoder, backbone, self.layers) < self.layers:
            return f"its lowest {self.layers} blocks are not the cached decoder's"
        return None

    @torch.no_grad()
    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Trunk:
        """The `Trunk` (B, L, H) of a padded batch (any padding side; zeros on padding)."""
        mask = attention_mask.bool()
        ids_cpu, mask_cpu = input_ids.cpu(), mask.cpu()
        found = [self.states.get(tuple(ids_cpu[r][mask_cpu[r]].tolist())) for r in range(input_ids.shape[0])]
        missing = [r for r, h in enumerate(found) if h is None]
        self.hits += len(found) - len(missing)
        self.misses += len(missing)
        weight = self.decoder.embed_tokens.weight
        hidden = torch.zeros(*input_ids.shape, weight.shape[1], dtype=weight.dtype, device=input_ids.device)
        if missing:  # on the decoder's device, under the autocast the cached states had
            rows = torch.tensor(missing, device=input_ids.device)
            autocast = (torch.autocast(weight.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                        is not None else contextlib.nullcontext())
            with autocast:
                computed = run_blocks(self.decoder, mask[rows].to(weight.device), 0, self.layers,
                                      input_ids=input_ids[rows].to(weight.device))
            hidden[rows] = computed.to(hidden.device) * mask[rows][..., None]
        for r, h in enumerate(found):
            if h is not None:
                hidden[r][mask[r]] = h.to(hidden.device, hidden.dtype)
        return Trunk(hidden, self.layers)
