"""Batched sampling from a causal LM with a KV cache.

PPO samples responses to left-padded prompts, then scores them with separate forward passes. This module owns
the sampling loop so that positions, stopping and the rollout log-probs are under our control:

1. one forward pass over the prompt (``position_ids = cumsum(prompt_mask) - 1``, clamped at 0, so a left-padded
   row sees exactly the positions it would see alone; a prompt that several rows share is run once and its cache
   copied to those rows, :func:`distinct_prompts`; the leading tokens that all prompts share, such as a chat
   template's system prompt, are run once, :func:`shared_prefix_length`), filling a KV cache whose keys and values are written in
   place into buffers preallocated for ``P + max_new_tokens`` positions (:class:`PreallocatedLayer`; the
   ``transformers.DynamicCache`` instead copies the whole cache at every step, ``torch.cat``);
2. per step: logits of the last position → ``/ temperature`` → top-k → top-p → one categorical draw per row
   by inversion (:func:`sample_categorical`) with the caller's ``torch.Generator`` (greedy = argmax); record
   the log-prob (:func:`draw_tokens`, a few rows at a time: the same bits, faster on a CPU); append the token,
   extend the attention mask, continue each row's position by one, feed the token with the cache;
3. a row finishes at its first stop token (kept as its last response token) or when its decoded response first
   contains a stop string (kept up to the token that completes it); afterwards it emits padding. The loop ends
   when every row has finished or ``max_new_tokens`` is reached.

Finished rows leave the batch: once enough of the rows still in the forward batch have finished (see
:func:`_should_compact`), the cache, attention mask and positions keep only the unfinished rows, so later
steps compute nothing for them. On a CPU, a decode step's float32 matrix products use weights packed once for
the forward batch's row count (:mod:`rlhfkit.rollout.prepack`, oneDNN's or MKL's packed GEMM: the same products
to float32 rounding, without copying every weight into the kernel's layout at every step;
``prepack_weights=False`` turns it off). Every
row's tokens and log-probs are unchanged by this (a row's computation never reads another row; only float
rounding of the different matrix shapes can differ), and the random stream is too: every step draws one
uniform for *every* row of the batch, finished or not, exactly as the full batch does, and each unfinished row
uses its own.


With a :class:`HiddenCapture`, the sampler also keeps what its forwards computed anyway: the hidden states after
the model's first ``layers`` blocks at every token it fed (the prompts, every response token but the last), plus
one more forward of each row's last token and an end token after it, so that the states of ``[prompt; response;
end]`` are all there (:class:`HiddenCapture`). A reward model whose lowest blocks are those blocks (the SFT model's,
frozen) can then skip them (`models.trunk.TrunkCache`). The decode states differ from one forward over the whole
row by float rounding only. While capturing, a finished row leaves the forward batch one step later than it
would otherwise (its last token must still be fed: the step after the one that drew it).

``rollout_logprobs`` are ``log_softmax(logits / temperature)`` of the sampled token over the *full* tempered
distribution, before top-k/top-p filtering: every later forward pass (old, current and reference policy)
computes log-probs from the full tempered distribution, so the PPO ratio and the KL penalty compare like with
like; the filtered distribution exists only inside this sampler. They are computed in float32 even when the
model runs in bf16. With greedy decoding (temperature 0) they are taken at temperature 1.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

from rlhfkit.core.logprobs import logprobs_from_logits
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.decode_attention import decode_attention
from rlhfkit.models.packing import MIN_PREFIX_SAVING, shared_prefix
from rlhfkit.rollout.prepack import PrepackedLinears

__all__ = [
    "GenerationConfig",
    "GenerationConfigError",
    "HiddenCapture",
    "PreallocatedLayer",
    "Rollout",
    "check_sampling_call",
    "distinct_prompts",
    "draw_tokens",
    "filter_logits",
    "generate_greedy",
    "invert_cdf",
    "make_cache",
    "sample",
    "sample_categorical",
    "shared_prefix_length",
    "top_k_filter",
    "top_p_filter",
]


class GenerationConfigError(RlhfkitError, ValueError):
    """An invalid sampling setting (a user error, and a ``ValueError``)."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to sample responses.

    Attributes:
        max_new_tokens: the most response tokens per row (>= 1).
        temperature: > 0 divides the logits before sampling; 0 means greedy decoding (argmax).
        top_k: keep the k most likely tokens (ties at the k-th value are kept too); 0 or None turns it off.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p
            (at least one token); 1.0 turns it off. Must be in (0, 1].
        stop_token_ids: a row stops at the first of these tokens, which is kept as its last response token.
            The caller adds the tokenizer's EOS id; nothing is added here.
        stop_strings: a row stops when its decoded response first contains one of these strings; needs a
            tokenizer in ``sample``.
        pad_token_id: the id written after a row's last response token; None takes the tokenizer's pad id.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def bad(field: str, problem: str) -> GenerationConfigError:
            return GenerationConfigError(f"GenerationConfig.{field}: {problem}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise bad("max_new_tokens", f"must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= float(t) < float("inf")):
            raise bad("temperature", f"must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise bad("top_k", f"must be an integer >= 0 (0 or None = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < float(p) <= 1.0):
            raise bad("top_p", f"must be in (0, 1] (1.0 = off), got {p!r}")
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        object.__setattr__(self, "stop_strings", _as_tuple(self.stop_strings, "stop_strings"))
        for tok in self.stop_token_ids:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise bad("stop_token_ids", f"must hold token ids (integers >= 0), got {tok!r}")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise bad("stop_strings", f"must hold non-empty strings, got {s!r}")
        if self.pad_token_id is not None and (isinstance(self.pad_token_id, bool)
                                              or not isinstance(self.pad_token_id, int) or self.pad_token_id < 0):
            raise bad("pad_token_id", f"must be a token id (integer >= 0) or None, got {self.pad_token_id!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0)."""
        return float(self.temperature) == 0.0


def _as_tuple(value: Any, field: str) -> tuple:
    if isinstance(value, (str, bytes)):
        raise GenerationConfigError(f"GenerationConfig.{field}: must be a tuple, got the single value {value!r}")
    try:
        return tuple(value)
    except TypeError:
        raise GenerationConfigError(f"GenerationConfig.{field}: must be a tuple, got {value!r}") from None


class Rollout(NamedTuple):
    """Sampled responses. B rows, P prompt tokens (left-padded), T <= max_new_tokens response tokens.

    Attributes:
        query_ids: (B,P) long, the prompts as given.
        query_mask: (B,P) bool, True on real prompt tokens.
        response_ids: (B,T) long, right-padded with pad_token_id.
        response_mask: (B,T) bool, True up to and including the stop token (or the token completing a stop
            string); False on padding.
        rollout_logprobs: (B,T) float32, log π(token) under the full tempered distribution; 0 on padding.
        stopped: (B,) bool, False where max_new_tokens was reached without a stop.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    stopped: torch.Tensor


@dataclass
class HiddenCapture:
    """Ask :func:`sample` for the hidden states after the first ``layers`` blocks of the model's decoder.

    ``end_id``: the token fed after each row's last response token (a reward model's EOS, which `data.tokenize.
    encode_for_rm` appends to a complete response). After the call, ``hidden`` is (B, P + T + 1, H) on the model's
    device, in the rollout's layout: column ``j < P`` the prompt token ``query_ids[:, j]`` (zeros on padding),
    column ``P + t`` the response token ``response_ids[:, t]`` (zeros after ``response_mask``), column ``P + T``
    the ``end_id`` fed right after the row's last response token, for rows that did not stop (zeros for rows that
    stopped: their states end with their stop token; a consumer that appends ``end_id`` after a stop id other
    than ``end_id`` finds no state for it). Computed as the decoder computes them under the sampler's settings
    (autocast included), in the decoder's residual-stream dtype.
    """

    layers: int
    end_id: int
    hidden: torch.Tensor | None = None

    def layer(self, model: torch.nn.Module) -> torch.nn.Module:
        """The block whose output is the state after ``layers`` blocks (a decoder with ``.layers``)."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        blocks = getattr(decoder, "layers", None)
        if blocks is None or not 1 <= self.layers <= len(blocks):
            raise ValueError(f"HiddenCapture(layers={self.layers}) needs a decoder with at least that many blocks "
                             f"in .layers; {type(model).__name__} has {None if blocks is None else len(blocks)}")
        return blocks[self.layers - 1]

    def row_states(self, rollout: Rollout, b: int) -> torch.Tensor:
        """(L, H): the states of row ``b``'s real tokens ``[prompt; response; end_id unless it stopped]``, in order."""
        if self.hidden is None:
            raise ValueError("nothing was captured yet")
        width, steps = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
        n = int(rollout.response_mask[b].sum())
        parts = [self.hidden[b, :width][rollout.query_mask[b].to(self.hidden.device)],
                 self.hidden[b, width:width + n]]
        if not bool(rollout.stopped[b]):
            parts.append(self.hidden[b, width + steps:width + steps + 1])
        return torch.cat(parts)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf.

    ``out[..., v] = logits[..., v] if logits[..., v] >= kth_largest(logits[..., :]) else -inf`` (ties with the
    k-th value are kept). ``k`` of 0/None or >= V returns the logits unchanged. Shapes: (..., V) -> (..., V).
    """
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", §3.1).

    With the tokens of a row sorted by decreasing probability ``π = softmax(logits)``, keep token j iff the
    probability of the tokens ranked before it, ``Σ_{i<j} π_i``, is < p: the smallest set whose mass reaches p.
    The most likely token is always kept. Others are set to -inf. ``p >= 1`` returns the logits unchanged.
    Shapes: (..., V) -> (..., V).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.to(torch.promote_types(sorted_logits.dtype, torch.float32)), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """The sampling distribution's logits: ``top_p_filter(top_k_filter(logits / temperature, top_k), top_p)``.

    The nucleus is taken over the distribution renormalised after top-k, as in the usual processor order.
    ``temperature`` must be > 0; at 1 the logits are not divided (``x / 1 == x`` exactly: the same numbers without
    a vocabulary-sized copy). Shapes: (..., V) -> (..., V).
    """
    return top_p_filter(top_k_filter(logits if temperature == 1.0 else logits / temperature, top_k), top_p)


def invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The categorical draw of each row of ``probs`` (B, V) (rows need not be normalised) for uniforms ``u`` (B,).

    With the row's cumulative sums ``C_v = Σ_{i<=v} p_i`` (float64), return the first v with
    ``C_v > u · C_{V-1}``. For ``u ~ U[0, 1)`` this draws v with probability ``p_v / Σ p`` (exact up to float64
    rounding of C), and a token with ``p_v = 0`` is never drawn (C does not rise at it). Shapes: (B, V), (B,) ->
    (B,) long, on ``probs``' device.
    """
    cdf = probs.to(dtype=torch.float64).cumsum(dim=-1)
    target = u.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=cdf.shape[-1] - 1)


def _uniforms(generator: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    """``n`` float64 uniforms in [0, 1) from ``generator`` (drawn on the generator's device), moved to ``device``."""
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).to(device)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator, rows: torch.Tensor | None = None,
                       num_rows: int | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` (R, V): :func:`invert_cdf` with one float64 uniform per row from ``generator``
    (drawn on the generator's device). ``torch.multinomial`` instead draws V exponentials per row, single-threaded
    under a generator: 17% of a CPU sampling step on a 49k vocabulary.

    With ``rows`` (R,) long and ``num_rows`` N: ``probs`` holds the rows ``rows`` of an N-row batch; N uniforms are
    drawn (one per batch row, the generator advancing as for the whole batch) and row i of ``probs`` uses uniform
    ``rows[i]``, so that a batch whose finished rows were dropped draws what the full batch draws.
    Shapes: (R, V) -> (R,) long."""
    n = probs.shape[0] if num_rows is None else int(num_rows)
    u = _uniforms(generator, n, probs.device)
    return invert_cdf(probs, u if rows is None else u[rows])


# Rows of a sampling step's vocabulary work (tempering, filters, softmax, CDF, log-probs) done at a time. Every
# one of those operations is row-wise, so the result is bit-identical to one pass over all rows; small chunks keep
# each (rows, V) temporary small: at 192 rows × 49,152 tokens a float32 temporary is 38 MB and the CDF's float64
# one 75 MB, above glibc's 32 MB mmap threshold, so every step paid fresh page faults for each of them. Measured
# on a 2-core Xeon with AMX, 1 thread, 192 rows: 189 ms per step in one pass, 80 ms in chunks of 8 rows (92 ms
# in chunks of 16, 107 ms of 64).
DRAW_CHUNK_ROWS = 8


def draw_tokens(logits: torch.Tensor, config: GenerationConfig, temperature: float,
                generator: torch.Generator | None, rows: torch.Tensor, num_rows: int,
                chunk_rows: int = DRAW_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step's tokens and their log-probs for the rows ``rows`` (R,) of an ``num_rows``-row batch,
    from their float32 ``logits`` (R, V): greedy (argmax) or one categorical draw from
    ``softmax(filter_logits(logits, temperature, top_k, top_p))`` per row (:func:`invert_cdf`, with the uniform of
    its batch row: ``num_rows`` uniforms per step from ``generator``, as :func:`sample_categorical` draws them);
    the log-prob of the drawn token under the full tempered distribution (`core.logprobs.logprobs_from_logits`,
    before top-k/top-p). ``chunk_rows`` rows at a time (:data:`DRAW_CHUNK_ROWS`): the same bits as one pass.
    Shapes: (R, V) -> (R,) long, (R,) float32."""
    u = None if config.greedy else _uniforms(generator, num_rows, logits.device)[rows]
    drawn, drawn_logprobs = [], []
    for start in range(0, logits.shape[0], chunk_rows):
        x = logits[start:start + chunk_rows]
        if u is None:
            d = x.argmax(dim=-1)
        else:
            probs = torch.softmax(filter_logits(x, temperature, config.top_k, config.top_p), dim=-1)
            d = invert_cdf(probs, u[start:start + chunk_rows])
        drawn.append(d)
        drawn_logprobs.append(logprobs_from_logits(x[:, None, :], d[:, None], temperature,
                                                   chunk_rows=x.shape[0]).squeeze(1))
    return torch.cat(drawn), torch.cat(drawn_logprobs)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache: ``"cache"`` where the forward names it so
    (transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns on the old name), else
    ``"past_key_values"`` (earlier releases). A peft wrapper is looked through to the model it wraps."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class PreallocatedLayer(DynamicLayer):
    """One decoder layer's KV cache written in place into buffers preallocated for ``capacity`` positions.

    A ``DynamicLayer`` (transformers' default) grows its keys and values by ``torch.cat`` at every step, copying
    the whole cache each time (O(L) per step, O(L²) per response). Here the first ``update`` allocates
    (B, H, capacity, D) buffers and every update writes its new positions into them; ``keys``/``values`` are views
    of the filled part, so the attention reads exactly the tensors a ``DynamicLayer`` would hold. If more than
    ``capacity`` positions arrive the buffers grow (doubling), so a wrong capacity costs a copy, never a result.
    ``batch_select_indices`` (rows leaving the batch) copies the kept rows' filled part into smaller buffers.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.length = 0
        self._key_buffer = self._value_buffer = None
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.is_initialized = True

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """New (B, H, capacity, D) buffers whose first positions hold ``keys``/``values`` (B, H, length, D)."""
        def buffer(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty((x.shape[0], x.shape[1], capacity, x.shape[3]))
            out[:, :, :x.shape[2]] = x
            return out

        self._key_buffer, self._value_buffer = buffer(keys), buffer(values)
        self.capacity = capacity

    def _views(self) -> None:
        self.keys = self._key_buffer[:, :, :self.length]
        self.values = self._value_buffer[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[2]:
            self._allocate(self.keys, self.values, max(end, self.capacity, 2 * self.length))
        self._key_buffer[:, :, self.length:end] = key_states
        self._value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._key_buffer is None:
            return
        self._allocate(self.keys[indices], self.values[indices], self.capacity)
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._key_buffer is not None:
            rows = torch.arange(self._key_buffer.shape[0], device=self._key_buffer.device)
            self.batch_select_indices(rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self._key_buffer is not None and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def reset(self) -> None:
        self.length = 0
        self._key_buffer = self._value_buffer = None
        super().reset()


def make_cache(model: torch.nn.Module, capacity: int) -> DynamicCache:
    """The KV cache :func:`sample` fills: a ``DynamicCache`` laid out for ``model``'s config (sliding-window
    layers where the config has them), whose full-attention layers are :class:`PreallocatedLayer` of
    ``capacity`` positions. A model without a transformers config gets layers created on first use."""
    config_obj = getattr(model, "config", None)
    cache = DynamicCache(config=config_obj if isinstance(config_obj, PreTrainedConfig) else None)
    if cache.layers:
        cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
                        for layer in cache.layers]
    else:
        cache.layer_class_to_replicate = lambda: PreallocatedLayer(capacity)
    return cache


def _should_compact(finished_in_batch: int, batch_rows: int, steps_left: int) -> bool:
    """Whether the finished rows should leave the forward batch now: dropping them copies the cache of the kept
    rows once (about the cost of one step's cache traffic), and saves their share of every later step, so it is
    done once at least an eighth of the batch (and at least one row) has finished and a step is still to come."""
    return steps_left > 0 and finished_in_batch > 0 and finished_in_batch * 8 >= batch_rows


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows that repeat a prompt: ``(first, inverse)`` with ``first`` (U,) the first row of each distinct prompt
    and ``inverse`` (B,) the index into ``first`` of every row's prompt (``prompt[b] == prompt[first[inverse[b]]]``,
    real tokens and padding alike), or None when all B prompts differ. Shapes: (B, P), (B, P) -> (U,), (B,)."""
    key = torch.where(prompt_mask.bool(), prompt_ids, torch.full_like(prompt_ids, -1))
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)
    if unique.shape[0] == key.shape[0]:
        return None
    batch = key.shape[0]
    order = torch.arange(batch, device=key.device)
    first = torch.full((unique.shape[0],), batch, dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return first, inverse


def shared_prefix_length(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """How many leading real tokens every row's prompt has in common, at most the shortest prompt's length minus
    one (every row keeps a token of its own, whose logits give its first response token): `models.packing.
    shared_prefix` over each row's real tokens. Shapes: (B, P) and (B, P), any padding -> int; 0 for fewer than
    two rows."""
    if prompt_ids.shape[0] < 2:
        return 0
    ids, mask = prompt_ids.cpu(), prompt_mask.bool().cpu()
    rows = [ids[r][mask[r]].tolist() for r in range(ids.shape[0])]
    return shared_prefix(rows, [len(row) - 1 for row in rows])


def _prefill(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor, cache: DynamicCache, cache_kwargs: dict, share_prefix: bool = True,
             captured: list | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forwards over the prompts that fill ``cache``; returns the (B, V) float32 logits of each row's next
    token, the (B, C) attention mask of the C cached positions, to which the decode steps append, and with
    ``captured`` (the list a :class:`HiddenCapture` hook appends each forward's block output to) the (B, P, H)
    captured states of the prompt tokens in the prompts' own left-padded columns (zeros on padding), else None.

    Shared work is done once; a row's keys, values and logits depend on its own tokens and positions only, so
    neither changes anything but the float rounding of the smaller matrix shapes:

    - a prompt that several rows share (several responses per prompt) is run once, then the cache and the
      logits are expanded to all rows (`distinct_prompts`);
    - with ``share_prefix``, the leading tokens that all distinct prompts share (a chat template's system
      prompt and role header; `shared_prefix_length`) are run once as a one-row forward, its cache copied to
      every row, and then only each row's remaining tokens, left-padded behind the prefix: the cache holds
      ``[prefix | padding | rest of the prompt]`` per row, the padding masked and every real token at its own
      position, so each token attends to exactly the tokens before it, as in one pass over the padded prompt.
      Done when it saves at least `MIN_PREFIX_SAVING` row-tokens, and only where every cache layer is a full-
      attention `PreallocatedLayer` (a sliding window counts cached columns, which the padding would shift).
    """
    shared = distinct_prompts(input_ids, attention_mask)
    if shared is not None:
        first = shared[0]
        input_ids, attention_mask, position_ids = input_ids[first], attention_mask[first], position_ids[first]
    rows, width = input_ids.shape
    prompt_mask = attention_mask.bool()
    prefix = shared_prefix_length(input_ids, attention_mask) if share_prefix else 0
    full_attention = bool(cache.layers) and all(type(layer) is PreallocatedLayer for layer in cache.layers)
    head_states = None
    if prefix * (rows - 1) >= MIN_PREFIX_SAVING and full_attention:
        lengths = attention_mask.sum(-1)
        start = width - lengths  # (U,) each row's first real column
        first_row = int(start[0])
        head = input_ids[:1, first_row:first_row + prefix]
        ones = torch.ones_like(head)
        model(input_ids=head, attention_mask=ones, position_ids=torch.arange(prefix, device=head.device)[None],
              use_cache=True, logits_to_keep=1, **cache_kwargs)
        if captured is not None:
            head_states = captured.pop()  # (1, prefix, H)
        cache.batch_select_indices(torch.zeros(rows, dtype=torch.long, device=input_ids.device))
        rest = int(lengths.max()) - prefix  # the longest row's tokens after the prefix
        columns = torch.arange(width - rest, width, device=input_ids.device)
        rest_mask = (columns[None] >= (start + prefix)[:, None]).long()  # (U, rest): real tokens after the prefix
        input_ids = input_ids[:, width - rest:]
        position_ids = (prefix + rest_mask.cumsum(-1) - 1).clamp(min=0)
        attention_mask = torch.cat([ones.expand(rows, prefix), rest_mask], dim=-1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1, **cache_kwargs)
    logits = out.logits[:, -1, :].float()
    states = None
    if captured is not None:  # back to the prompts' own columns: [padding | prefix | rest]
        last = captured.pop()  # (U, w, H), the last w columns of the prompts
        states = last.new_zeros(rows, width, last.shape[-1])
        states[:, width - last.shape[1]:] = last
        if head_states is not None:  # the prefix columns of each row, from the one-row forward
            columns = start[:, None] + torch.arange(prefix, device=start.device)  # (U, prefix)
            states.scatter_(1, columns[..., None].expand(-1, -1, last.shape[-1]),
                            head_states.expand(rows, -1, -1).to(states.dtype))
        states = states * prompt_mask[..., None]
    if shared is None:
        return logits, attention_mask, states
    inverse = shared[1]
    cache.batch_select_indices(inverse)
    return logits[inverse], attention_mask[inverse], None if states is None else states[inverse]


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _check_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be (B,P); got {tuple(prompt_ids.shape)} and "
                         f"{tuple(prompt_mask.shape)}")
    mask = prompt_mask.bool()
    if prompt_ids.shape[1] == 0 or not bool(mask[:, -1].all()):
        raise ValueError("every prompt must end with a real token (prompts are left-padded, none may be empty)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("prompt_mask must be left-padded: padding only before the first real token of a row")
    return mask


def check_sampling_call(config: GenerationConfig, generator: torch.Generator | None, tokenizer: Any) -> int:
    """The checks every sampling engine (:func:`sample`, `rollout.vllm_engine.VLLMEngine.sample`) makes of its
    arguments; returns the pad id: ``config.pad_token_id``, else the tokenizer's. Stop strings need a tokenizer,
    and sampling (temperature > 0) a generator."""
    pad_id = config.pad_token_id
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise GenerationConfigError("GenerationConfig.pad_token_id is not set and no tokenizer with a pad "
                                        "token was given; set pad_token_id")
    if config.stop_strings and tokenizer is None:
        raise GenerationConfigError("GenerationConfig.stop_strings needs a tokenizer: pass tokenizer=... to sample")
    if not config.greedy and generator is None:
        raise ValueError("sampling with temperature > 0 needs a torch.Generator so that samples are reproducible")
    return pad_id


def _stop_string_hits(tokenizer: Any, tokens: torch.Tensor, rows: list[int], n: int,
                      stop_strings: Sequence[str]) -> list[int]:
    """Rows among ``rows`` whose decoded first ``n`` response tokens contain a stop string.

    Called after every step, so the first step at which a row's text contains a stop string is the step whose
    token completes the string's first occurrence.
    """
    texts = tokenizer.batch_decode(tokens[rows, :n].tolist(), skip_special_tokens=False)
    return [row for row, text in zip(rows, texts) if any(s in text for s in stop_strings)]


def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
    autocast_dtype: torch.dtype | None = None,
    prepack_weights: bool | str = True,
    share_prefix: bool = True,
    capture: HiddenCapture | None = None,
    grouped_attention: bool = True,
) -> Rollout:
    """Sample up to ``config.max_new_tokens`` response tokens for each left-padded prompt.

    Args:
        model: a causal LM whose forward takes ``input_ids, attention_mask, position_ids, use_cache,
            logits_to_keep`` and the KV cache as ``cache`` (transformers >= 5.24) or ``past_key_values`` (older
            releases; see :func:`cache_keyword`), updates that cache in place and returns ``.logits`` (any HF
            causal LM).
            It is put in eval mode for the call and its previous mode restored afterwards.
        prompt_ids: (B,P) long, left-padded.
        prompt_mask: (B,P) bool (or 0/1), True on real tokens; every row ends with a real token.
        config: the sampling settings.
        generator: the random source of the draws; the same seed gives the same samples. Required
            unless decoding is greedy. If it lives on another device than the model, the draws are made there.
        tokenizer: needed only for ``config.stop_strings`` (and for ``pad_token_id`` when the config has none).
        autocast_dtype: if given (e.g. ``torch.bfloat16``), forward passes run under ``torch.autocast`` on the
            model's device type; log-probs are still computed in float32.
        prepack_weights: on a CPU, run the decode steps' float32 linears with weights packed once per
            forward-batch size (:mod:`rlhfkit.rollout.prepack`; the same products to float32 rounding, faster at
            few rows): True with the CPU's default backend (`prepack.default_backend`), ``"onednn"`` or
            ``"mkl"`` with that one; False runs every product plainly. Ignored where it does not apply (GPU,
            autocast, a torch build without the backend).
        share_prefix: run the leading tokens that all prompts share (a chat template's system prompt) once and
            copy their cache to every row (:func:`_prefill`; the same keys, values and logits to float
            rounding); False runs every prompt whole.
        capture: fill ``capture.hidden`` with the states after the decoder's first ``capture.layers`` blocks
            (:class:`HiddenCapture`; module docstring). The same computation as the call without it: finished
            rows then leave the forward batch one step later, whose other shapes round differently (in float32
            that can change a draw where two tokens are nearly tied; in float64 the tests see the same tokens).
        grouped_attention: a model running SDPA attends its one-token decode steps on the CPU by two batched
            products per layer (:mod:`rlhfkit.models.decode_attention`; the same attention to float rounding,
            faster than the fused kernel at that shape); False keeps the model's SDPA throughout.

    Returns:
        a :class:`Rollout`; all tensors on the model's device.
    """
    pad_id = check_sampling_call(config, generator, tokenizer)
    device = _model_device(model)
    prompt_mask = _check_prompts(prompt_ids, prompt_mask).to(device)
    prompt_ids = prompt_ids.to(device)
    batch, max_new = prompt_ids.shape[0], config.max_new_tokens
    temperature = 1.0 if config.greedy else float(config.temperature)
    stop_ids = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)

    tokens = torch.full((batch, max_new), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
    alive = torch.ones((batch, max_new), dtype=torch.bool, device=device)  # response_mask, filled per step
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)

    width = prompt_ids.shape[1]
    captured: list | None = None
    hook = None
    if capture is not None:
        captured = []
        capture_layer = capture.layer(model)  # checked before anything is attached
        states = None  # (B, P + max_new + 1, H) once the prefill gives H
    cache = make_cache(model, width + max_new + (1 if capture is not None else 0))
    cache_kwargs = {cache_keyword(model): cache}  # the cache object is updated in place by every forward
    rows = torch.arange(batch, device=device)  # the rows in the forward batch (finished rows leave it)
    attention_mask = prompt_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    next_position = attention_mask.sum(-1, keepdim=True)  # (B,1): each row continues after its last position
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    packer = (PrepackedLinears(model, backend=None if prepack_weights is True else prepack_weights)
              if prepack_weights and autocast_dtype is None else None)
    packer = packer if packer is not None and packer.modules else None  # nothing to pack: the plain loop

    was_training = model.training
    model.eval()
    steps = 0
    try:
        if captured is not None:
            hook = capture_layer.register_forward_hook(lambda module, args, output: captured.append(
                output[0] if isinstance(output, tuple) else output))
        with torch.inference_mode(), autocast, packer or contextlib.nullcontext(), \
                decode_attention(model, grouped_attention):
            for step in range(max_new):
                if step == 0:  # the prompts, each distinct prompt once
                    logits, attention_mask, prompt_states = _prefill(model, prompt_ids, attention_mask, position_ids,
                                                                     cache, cache_kwargs, share_prefix, captured)
                    if captured is not None:
                        states = prompt_states.new_zeros(batch, width + max_new + 1, prompt_states.shape[-1])
                        states[:, :width] = prompt_states
                        cached = attention_mask.shape[1]  # the prompts' columns of the cache
                else:
                    if packer is not None:  # weights packed for this many rows (again after rows left)
                        packer.prepare(rows.shape[0], max_new - step)
                    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, logits_to_keep=1, **cache_kwargs)
                    logits = out.logits[:, -1, :].float()  # (rows,V), float32 whatever the model's dtype
                    if captured is not None:  # the state of the token fed: response token step - 1
                        states[rows, width + step - 1] = captured.pop()[:, -1]
                # one uniform for every row of the batch, as if no row had left it; the log-probs over the full
                # tempered distribution, before top-k/top-p (see the module docstring)
                drawn, drawn_logprobs = draw_tokens(logits, config, temperature, generator, rows, batch)
                new = torch.full((batch,), pad_id, dtype=torch.long, device=device).index_copy_(0, rows, drawn)
                new_logprobs = torch.zeros(batch, dtype=torch.float32, device=device).index_copy_(
                    0, rows, drawn_logprobs)

                # capturing: the rows whose last token this step's forward fed (or an earlier one)
                fed_last = finished.clone() if capture is not None else None
                alive[:, step] = ~finished
                tokens[:, step] = torch.where(finished, torch.full_like(new, pad_id), new)
                logprobs[:, step] = torch.where(finished, torch.zeros_like(new_logprobs), new_logprobs)
                steps = step + 1

                hit = ~finished & torch.isin(new, stop_ids)
                if config.stop_strings:
                    open_rows = (~finished & ~hit).nonzero().flatten().tolist()
                    if open_rows:
                        for row in _stop_string_hits(tokenizer, tokens, open_rows, steps, config.stop_strings):
                            hit[row] = True
                stopped |= hit
                finished |= hit
                if bool(finished.all()):
                    break

                # capturing: a finished row leaves once its last token has been fed (its state captured)
                done = (finished if fed_last is None else fed_last)[rows]
                if _should_compact(int(done.sum()), rows.shape[0], max_new - steps):
                    keep = (~done).nonzero().flatten()
                    cache.batch_select_indices(keep)
                    rows, attention_mask, next_position = rows[keep], attention_mask[keep], next_position[keep]
                input_ids = tokens[rows, step:step + 1]
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
                position_ids = next_position + step
            if captured is not None:  # every row's last token (never fed yet) and the end token after it
                last = tokens[rows, steps - 1:steps]
                input_ids = torch.cat([last, torch.full_like(last, capture.end_id)], dim=-1)
                fed = attention_mask[:, :cached + steps - 1]  # the prompts and response tokens 0 .. steps - 2
                attention_mask = torch.cat([fed, torch.ones_like(input_ids)], dim=-1)
                position_ids = next_position + steps - 1 + torch.arange(2, device=device)
                model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      logits_to_keep=1, **cache_kwargs)
                final = captured.pop()  # (rows, 2, H)
                states[rows, width + steps - 1] = final[:, 0]
                states[rows, width + steps] = final[:, 1]
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    if capture is not None:  # outside inference mode: tensors autograd may later use as inputs
        capture.hidden = states[:, :width + steps + 1].clone()
        capture.hidden[:, width:width + steps] *= alive[:, :steps, None]
        capture.hidden[:, width + steps] *= ~stopped[:, None]

    return Rollout(
        query_ids=prompt_ids,
        query_mask=prompt_mask,
        response_ids=tokens[:, :steps].clone(),
        response_mask=alive[:, :steps].clone(),
        rollout_logprobs=logprobs[:, :steps].clone(),
        stopped=stopped,
    )


def generate_greedy(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    config: GenerationConfig,
    tokenizer: Any = None,
    autocast_dtype: torch.dtype | None = None,
) -> Rollout:
    """Greedy decoding (for evaluation): :func:`sample` with temperature 0; top-k/top-p are irrelevant.

    ``config``'s other fields (max_new_tokens, stops, pad_token_id) apply; its log-probs are at temperature 1.
    """
    greedy_config = GenerationConfig(
        max_new_tokens=config.max_new_tokens, temperature=0.0, top_k=None, top_p=1.0,
        stop_token_ids=config.stop_token_ids, stop_strings=config.stop_strings, pad_token_id=config.pad_token_id,
    )
    return sample(model, prompt_ids, prompt_mask, greedy_config, generator=None, tokenizer=tokenizer,
                  autocast_dtype=autocast_dtype)
