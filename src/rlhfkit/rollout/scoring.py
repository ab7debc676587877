"""Reward sources for PPO: score whole responses, one number per row.

A reward source is a callable

    source(prompts, responses, query_ids, query_mask, response_ids, response_mask, stopped) -> scores (B,)

``prompts``/``responses`` are the texts of the B rows, decoded by the caller with the POLICY tokenizer (keep
special tokens when decoding prompts, so chat-template markers survive); the ids are the policy's: queries (B, P)
left-padded, responses (B, T) right-padded, with boolean masks (True = real token); ``stopped`` (B,) bool is True
where the response ended (EOS, an extra stop id or a stop string; ``Rollout.stopped``) and False where it hit
``max_new_tokens``. Function rewards see only the texts (``fn(prompts, responses)``).

A source whose attribute ``needs_references`` is True (a ranker) also takes ``references``: the reference response
text (B,) of each row's prompt (the PPO prompts file's ``reference`` field), as a keyword. A source whose
``reads_trunks`` is True (a reward model) also takes ``trunks``: frozen trunks of the batch
(`models.trunk.BatchTrunks`) that it may run its upper blocks from. Callers pass both through
:func:`call_source`, which gives each only to such sources, so every other source keeps the seven arguments.

Every source returns ``scores`` as a float32 tensor of shape (B,) **on the CPU** (so that sources on different
devices combine; the caller moves the scores to the policy device), and raises :class:`RlhfkitError` naming the
source when a score is not finite.

Sources:

* :class:`RMReward` — a frozen reward model (an rlhfkit reward-model folder, or any
  ``AutoModelForSequenceClassification`` folder). An rlhfkit model whose tokenizer has the policy's vocabulary
  reads the policy's ids directly; otherwise the texts are rendered with its own tokenizer by the rendering rule
  of RM training (:func:`rlhfkit.data.tokenize.encode_for_rm`, under the model's convention).
* :class:`RankerReward` — a frozen pairwise ranker (PairRM or seq2seq/SteamSHP-style folder): the score of a
  response is the ranker's symmetric logit of (response vs the prompt's reference response).
* :class:`FunctionReward` — a Python function ``fn(prompts, responses) -> list[float]``, named
  ``"package.module:function"`` (rule-based rewards, gold judges) or given as the callable itself (the Python API).
* :class:`CombinedReward` — a weighted sum of sources.

:func:`load_reward` builds a source from command-line specs.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from rlhfkit.data.tokenize import encode_for_rm, end_with_eos, fit_prompt, right_pad
from rlhfkit.errors import RlhfkitError, function_name, user_exception
from rlhfkit.models.loading import load_tokenizer, same_vocabulary
from rlhfkit.models.rankers import load_ranker, ranker_kind
from rlhfkit.models.reward import RewardModel, reward_pad_token_id
from rlhfkit.models.trunk import BatchTrunks, Trunk, embedding_and_blocks, named_parameters, shared_depth

__all__ = ["CombinedReward", "FunctionReward", "RMReward", "RankerReward", "RewardSource", "call_source",
           "check_scores", "load_reward", "needs_references", "reads_trunks"]


class RewardSource(Protocol):
    """What the PPO trainer calls; ``name`` appears in error messages and metric names."""

    name: str

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        stopped: torch.Tensor,
    ) -> torch.Tensor: ...


def needs_references(source: Any) -> bool:
    """True for a source that scores responses against reference responses (its ``needs_references``)."""
    return bool(getattr(source, "needs_references", False))


def reads_trunks(source: Any) -> bool:
    """True for a source that can score from another model's frozen trunk (its ``reads_trunks``)."""
    return bool(getattr(source, "reads_trunks", False))


def call_source(source: RewardSource, *args: Any, references: Sequence[str] | None = None,
                trunks: BatchTrunks | None = None) -> torch.Tensor:
    """``source(*args)``, plus ``references=`` for a source that needs them and ``trunks=`` for one that reads
    them (module docstring)."""
    extra: dict[str, Any] = {}
    if needs_references(source):
        extra["references"] = references
    if trunks is not None and reads_trunks(source):
        extra["trunks"] = trunks
    return source(*args, **extra)


def check_scores(values: Any, batch_size: int, name: str) -> torch.Tensor:
    """``values`` (one number per row) as a float32 CPU tensor (B,); RlhfkitError naming ``name`` and the first
    offending row (0-based index in the batch) for a wrong count, a non-number or a non-finite value."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.shape[0] != batch_size:
            raise RlhfkitError(f"{name} returned a tensor of shape {tuple(values.shape)}; expected ({batch_size},), "
                               f"one score per response")
        floats = values.detach().to("cpu", torch.float64).tolist()
    else:
        try:
            floats = list(values)
        except TypeError:
            raise RlhfkitError(f"{name} returned {type(values).__name__}; expected a list of {batch_size} numbers")
        if len(floats) != batch_size:
            raise RlhfkitError(f"{name} returned {len(floats)} scores for {batch_size} responses; expected one per "
                               f"response")
    out = []
    for row, value in enumerate(floats):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RlhfkitError(f"{name} returned {value!r} for row {row} (0-based); expected a number") from None
        if not math.isfinite(number):
            raise RlhfkitError(f"{name} returned a non-finite score ({number}) for row {row} (0-based)")
        out.append(number)
    return torch.tensor(out, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- reward model
def _real(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


class RMReward:
    """Scores from a frozen reward model (eval mode, no gradients, micro-batches of ``batch_size`` rows).

    Input construction, per row, as ONE right-padded sequence ``prompt tokens + response tokens`` (no padding in
    the middle), padded with the reward model's pad id, the score read as the model's convention says (the last
    real token; the last non-pad token for a folder rlhfkit did not write). A response that ENDED (``stopped``:
    EOS, an extra stop id or a stop string) is rendered as RM training renders a complete response, ended by the
    RM's EOS; one that hit ``max_new_tokens`` is scored as it is, without an EOS (as TRL's PPO trainer and
    Huang et al. 2024 do; ``--missing_stop_penalty`` is the way to penalise it, since the RM never saw an
    unfinished response in training):

    * id path (an rlhfkit-convention RM whose tokenizer has the policy's vocabulary, see
      :func:`rlhfkit.models.loading.same_vocabulary`): the query's real ids followed by the response's real ids,
      exactly as sampled, plus the EOS id when the response ended and its last id is not EOS already
      (:func:`rlhfkit.data.tokenize.end_with_eos`);
    * text path (otherwise, or ``force_text=True``): the texts through
      :func:`rlhfkit.data.tokenize.encode_for_rm` with ``ended = stopped``, the rule of RM training,
      ``rlhfkit score`` and ``rlhfkit rm eval``.

    ``max_length``: when set, longer rows lose prompt tokens from the left (a leading BOS is kept); a response
    alone longer than that keeps its last ``max_length`` tokens. ``normalize=True`` applies the model's stored
    statistics ``(score - mean) / std`` (``rlhfkit.json``, written by ``rlhfkit score --fit_reference``); a model
    without them is an :class:`RlhfkitError` here, at construction.

    ``packing=True``: each micro-batch runs as one padding-free packed sequence (``RewardModel.forward(packing=True,
    share_prompts=True)``: the prompt of rows that share it once) where the model allows it, else padded; the
    same scores up to float rounding.

    ``trunks`` (a call's keyword, `models.trunk.BatchTrunks`; PPO offers its frozen trunks): on the id path, a
    decoder whose embeddings and lowest blocks are bit-identical to those of an offered trunk's decoder
    (`models.trunk.shared_depth` over all the trunk's blocks: a reward model trained with those blocks frozen, and a
    critic initialised from it) runs only its blocks above the deepest such trunk, for every row whose input is
    exactly the trunk row's real tokens (no EOS appended, nothing truncated; the other rows take the plain path).
    The hidden states are the same function of the same tokens at the same positions, so the scores are those of
    the plain path up to the float rounding of another batch shape.
    """

    reads_trunks = True

    def __init__(
        self,
        path: str | os.PathLike,
        policy_tokenizer: Any,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        normalize: bool = False,
        max_length: int | None = None,
        force_text: bool = False,
        packing: bool = False,
    ) -> None:
        if batch_size < 1:
            raise RlhfkitError(f"reward batch_size must be at least 1, got {batch_size}")
        self.name = f"reward model {str(path)!r}"
        self.packing = packing
        self._sharing: dict[tuple, bool] = {}
        self.device = torch.device(device)
        self.model = RewardModel.from_pretrained(path, dtype=dtype).to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(path)
        self.policy_tokenizer = policy_tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        pad = self.model.pad_token_id
        self.pad_id = int(pad) if pad is not None else reward_pad_token_id(self.tokenizer)
        self.convention = self.model.convention
        self.use_ids = (not force_text and self.convention == "rlhfkit"
                        and same_vocabulary(self.tokenizer, policy_tokenizer))
        if normalize and self.model.normalization is None:
            raise RlhfkitError(
                f"{self.name} has no stored normalisation statistics, which score normalisation 'reference' "
                f"applies; fit them once on reference outputs (e.g. the SFT policy's responses) with `rlhfkit score "
                f"--model {path} --fit_reference REFERENCE.jsonl --data REFERENCE.jsonl --output SCORES.jsonl`, or "
                f"choose another score normalisation")
        self.normalize = normalize

    # -- building the inputs ------------------------------------------------------------------------------
    def _fit(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        if self.max_length is None or len(prompt) + len(response) <= self.max_length:
            return prompt, response
        fitted = fit_prompt(self.tokenizer, prompt, len(response), self.max_length, "truncate_prompt_left", row=0)
        return (fitted, response) if fitted is not None else ([], response[-self.max_length:])

    def rows(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        stopped: torch.Tensor,
    ) -> list[tuple[list[int], list[int]]]:
        """The (prompt ids, response ids) the reward model reads for each row (see the class docstring)."""
        query_ids, query_mask = query_ids.cpu(), query_mask.cpu()
        response_ids, response_mask = response_ids.cpu(), response_mask.cpu()
        ended = [bool(e) for e in stopped.reshape(-1).tolist()]
        if len(ended) != query_ids.shape[0]:
            raise ValueError(f"stopped has {len(ended)} rows for a batch of {query_ids.shape[0]}")
        out = []
        for b in range(query_ids.shape[0]):
            if self.use_ids:
                response = _real(response_ids[b], response_mask[b])
                if ended[b]:
                    response = end_with_eos(response, self.tokenizer.eos_token_id)
                row = (_real(query_ids[b], query_mask[b]), response)
            else:
                row = encode_for_rm(self.tokenizer, prompts[b], responses[b], ended[b], self.convention)
            out.append(self._fit(*row))
        return out

    # -- reading another model's trunk ---------------------------------------------------------------------
    def _signature(self, decoder: torch.nn.Module, layers: int) -> tuple:
        own = self.model._backbone()
        params = named_parameters(embedding_and_blocks(decoder, layers) + embedding_and_blocks(own, layers))
        return (id(decoder), layers, *((id(p), p.data_ptr(), p._version, p.dtype, p.device) for _, p in params))

    def _shares(self, decoder: torch.nn.Module, layers: int) -> bool:
        """Whether this model's embeddings and lowest ``layers`` blocks equal ``decoder``'s bit for bit (cached
        until a parameter of either changes)."""
        from rlhfkit.rollout.forward import trunk_decoder

        own = trunk_decoder(self.model)
        if own is None or layers > len(own.layers):
            return False
        key = self._signature(decoder, layers)
        if key not in self._sharing:
            if len(self._sharing) >= 8:
                self._sharing.clear()
            self._sharing[key] = shared_depth(own, decoder, layers) == layers
        return self._sharing[key]

    def shareable_depth(self, decoder: torch.nn.Module | None) -> int:
        """How many of its lowest blocks this model could run from a trunk of ``decoder`` (`models.trunk.
        shared_depth`: embeddings and blocks bit-identical); 0 where it takes no trunk (text path, no decoder)."""
        from rlhfkit.rollout.forward import trunk_decoder

        own = trunk_decoder(self.model)
        if own is None or decoder is None or not self.use_ids:
            return 0
        return shared_depth(own, decoder)

    def shared_trunk(self, trunks: BatchTrunks | None) -> Trunk | None:
        """The deepest offered trunk this model can run from (class docstring), or None."""
        if trunks is None or not self.use_ids:
            return None
        dtype = self.model._backbone().get_input_embeddings().weight.dtype
        best = None
        for decoder, trunk in trunks.trunks:
            usable = (decoder is not None and trunk.hidden.device == self.device and trunk.hidden.dtype == dtype
                      and (best is None or trunk.layers > best.layers))
            if usable and self._shares(decoder, trunk.layers):
                best = trunk
        return best

    # -- scoring ------------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, resp_mask: torch.Tensor,
                 trunk: Trunk | None = None) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(ids.to(self.device), mask.to(self.device), resp_mask.to(self.device), trunk=trunk,
                             packing=self.packing, share_prompts=self.packing)
        return out.scores.float().cpu()

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        stopped: torch.Tensor,
        trunks: BatchTrunks | None = None,
    ) -> torch.Tensor:
        B = query_ids.shape[0]
        if len(prompts) != B or len(responses) != B:
            raise ValueError(f"{len(prompts)} prompts and {len(responses)} responses for a batch of {B}")
        rows = self.rows(prompts, responses, query_ids, query_mask, response_ids, response_mask, stopped)
        result = torch.zeros(B)
        trunk = self.shared_trunk(trunks)
        from_trunk: list[int] = []
        if trunk is not None:
            if trunks.query_ids.shape[0] != B:
                raise ValueError(f"trunks of {trunks.query_ids.shape[0]} rows for a batch of {B}")
            q = [_real(trunks.query_ids[b], trunks.query_mask[b]) for b in range(B)]
            r = [_real(trunks.response_ids[b], trunks.response_mask[b]) for b in range(B)]
            from_trunk = [b for b in range(B) if rows[b] == (q[b], r[b])]
            ids = torch.cat([trunks.query_ids, trunks.response_ids], dim=1)
            mask = torch.cat([trunks.query_mask.bool(), trunks.response_mask.bool()], dim=1)
            resp_mask = torch.cat([torch.zeros_like(trunks.query_mask, dtype=torch.bool),
                                   trunks.response_mask.bool()], dim=1)
            for start in range(0, len(from_trunk), self.batch_size):
                chunk = from_trunk[start:start + self.batch_size]
                idx = torch.tensor(chunk, dtype=torch.long, device=trunk.hidden.device)
                result[chunk] = self._forward(ids[idx], mask[idx], resp_mask[idx],
                                              Trunk(trunk.hidden[idx], trunk.layers))
        plain = [b for b in range(B) if b not in set(from_trunk)]
        for start in range(0, len(plain), self.batch_size):
            chunk = plain[start:start + self.batch_size]
            ids, mask = right_pad([rows[b][0] + rows[b][1] for b in chunk], self.pad_id)
            positions = torch.arange(ids.shape[1])[None, :]
            prompt_lens = torch.tensor([len(rows[b][0]) for b in chunk])[:, None]
            result[chunk] = self._forward(ids, mask, mask & (positions >= prompt_lens))
        if self.normalize:
            result = self.model.normalize(result)
        # check_scores builds a fresh tensor outside inference mode: the caller may modify it in place
        return check_scores(result, B, self.name)


# ---------------------------------------------------------------------------------------------- ranker
class RankerReward:
    """Scores from a frozen pairwise ranker (a PairRM or seq2seq folder) against a reference response per prompt.

    A ranker compares two responses and gives no score to one alone, so each response is compared with the
    REFERENCE response of its prompt (``references``, the prompts file's ``reference`` field)::

        score = (logit(response, reference) - logit(reference, response)) / 2

    the ranker's symmetric logit (`rlhfkit.models.pairrm.Ranker.symmetric_logits`): the log-odds that the response
    beats the reference, averaged over both orders so that position bias cancels; 0 = as good as the reference.
    The ranker reads texts: the prompt is the query decoded with the policy tokenizer WITHOUT special tokens
    (chat-template markers dropped), the response text as given; inputs are built with the ranker's own
    tokenizer and the ``max_length`` it was trained with (its equal length cap). ``stopped`` plays no part
    (``--missing_stop_penalty`` handles unfinished responses). No stored normalisation statistics exist for a
    ranker: ``normalize=True`` is an :class:`RlhfkitError`.
    """

    needs_references = True

    def __init__(self, path: str | os.PathLike, policy_tokenizer: Any, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16, normalize: bool = False) -> None:
        if batch_size < 1:
            raise RlhfkitError(f"reward batch_size must be at least 1, got {batch_size}")
        self.name = f"ranker {str(path)!r}"
        if normalize:
            raise RlhfkitError(f"{self.name} has no normalisation statistics for score normalisation 'reference': its "
                               f"score is already relative to the prompt's reference response (0 = as good as it); "
                               f"choose another score normalisation")
        self.device = torch.device(device)
        self.model = load_ranker(path, dtype=dtype).to(self.device).eval().requires_grad_(False)
        self.policy_tokenizer = policy_tokenizer
        self.batch_size = batch_size

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        stopped: torch.Tensor,
        references: Sequence[str] | None = None,
    ) -> torch.Tensor:
        B = query_ids.shape[0]
        if references is None:
            raise RlhfkitError(f"{self.name} scores each response against its prompt's reference response; give the "
                               f"prompts file a 'reference' field (the reference response text) on every row")
        if len(responses) != B or len(references) != B:
            raise ValueError(f"{len(responses)} responses and {len(references)} references for a batch of {B}")
        rows = [query_ids[b][query_mask[b].bool()].tolist() for b in range(B)]
        texts = self.policy_tokenizer.batch_decode(rows, skip_special_tokens=True)
        scores = [self.model.symmetric_logits(texts[i:i + self.batch_size], list(responses[i:i + self.batch_size]),
                                              list(references[i:i + self.batch_size]))
                  for i in range(0, B, self.batch_size)]
        return check_scores(torch.cat(scores) if scores else torch.zeros(0), B, self.name)


# ---------------------------------------------------------------------------------------------- functions
def import_function(spec: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:function"`` (RlhfkitError with a hint when it cannot be found)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RlhfkitError(f"reward function {spec!r} must be written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise RlhfkitError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({e}); make it importable (install "
            f"it, or run from the folder that holds it / add that folder to PYTHONPATH)"
        ) from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: show its own error
        raise RlhfkitError(f"reward function {spec!r}: importing module {module_name!r} raised "
                           f"{user_exception(e)}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise RlhfkitError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RlhfkitError(f"reward function {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


class FunctionReward:
    """Scores from a Python function ``fn(prompts: list[str], responses: list[str]) -> list[float]`` (one finite
    number per response; a list, tuple, numpy array or 1-D tensor), named ``"package.module:function"`` or given
    as the callable itself (named by its ``__qualname__`` in errors)."""

    def __init__(self, spec: str | Callable[[list[str], list[str]], Any]) -> None:
        if callable(spec):
            self.fn = spec
            self.name = f"reward function {function_name(spec)!r}"
        else:
            self.fn = import_function(spec)
            self.name = f"reward function {spec!r}"

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        response_ids: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        stopped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        try:
            values = self.fn(list(prompts), list(responses))
        except Exception as e:  # noqa: BLE001 - the user's function failed: show its own error, not a traceback
            raise RlhfkitError(f"{self.name} raised {user_exception(e)}") from e
        return check_scores(values, len(responses), self.name)


# ---------------------------------------------------------------------------------------------- combination
class CombinedReward:
    """``scores = Σ_i weights[i] · sources[i](...)``, each source's scores checked on their own first."""

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float]) -> None:
        if not sources:
            raise RlhfkitError("at least one reward source is needed")
        if len(weights) != len(sources):
            raise RlhfkitError(f"{len(weights)} reward weights for {len(sources)} reward sources; give one weight "
                               f"per source")
        if not all(math.isfinite(float(w)) for w in weights):
            raise RlhfkitError(f"reward weights must be finite numbers, got {list(weights)}")
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        self.name = " + ".join(f"{w:g} * {s.name}" for s, w in zip(self.sources, self.weights))
        self.needs_references = any(needs_references(s) for s in self.sources)
        self.reads_trunks = any(reads_trunks(s) for s in self.sources)

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        stopped: torch.Tensor,
        references: Sequence[str] | None = None,
        trunks: BatchTrunks | None = None,
    ) -> torch.Tensor:
        total = torch.zeros(len(responses), dtype=torch.float32)
        for source, weight in zip(self.sources, self.weights):
            scores = check_scores(call_source(source, prompts, responses, query_ids, query_mask, response_ids,
                                              response_mask, stopped, references=references, trunks=trunks),
                                  len(responses), source.name)
            total = total + weight * scores
        return check_scores(total, len(responses), self.name)


def load_reward(
    specs: Sequence[str | Callable[..., Any]],
    weights: Sequence[float] | None,
    policy_tokenizer: Any,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    normalize: bool = False,
    packing: bool = False,
) -> RewardSource:
    """A reward source from specs: ``"module:function"`` (a spec with ':' that is not an existing path), a ranker
    folder (PairRM or seq2seq: a :class:`RankerReward`, scoring against reference responses), a reward-model
    folder, or a Python callable ``fn(prompts, responses)`` (`FunctionReward`). One spec without weights gives that
    source itself; otherwise a :class:`CombinedReward`
    (weights default to 1 each); ``packing``: reward models pack their micro-batches (:class:`RMReward`).
    ``normalize=True``: every source is a reward model that applies its stored
    statistics before the combination (:class:`RMReward`); a function, or a model never fitted, is an
    :class:`RlhfkitError`."""
    specs = list(specs)
    if not specs:
        raise RlhfkitError("no reward given: pass a reward-model folder or a 'module:function'")
    if weights is not None and len(weights) != len(specs):
        raise RlhfkitError(f"{len(weights)} reward weights for {len(specs)} rewards ({specs}); give one weight "
                           f"per reward")
    sources: list[RewardSource] = []
    for spec in specs:
        if callable(spec) or ":" in spec and not Path(spec).expanduser().exists():
            if normalize:
                raise RlhfkitError(
                    f"reward function {function_name(spec) if callable(spec) else spec!r} has no stored normalisation statistics: score normalisation "
                    f"'reference' applies the statistics that `rlhfkit score --fit_reference` stores in a reward-model "
                    f"folder, and a function has none; use reward-model folders only, or another score normalisation")
            sources.append(FunctionReward(spec))
            continue
        path = Path(spec).expanduser()
        if not path.exists():
            raise RlhfkitError(f"reward model folder {spec!r} does not exist (for a reward function write "
                               f"'package.module:function')")
        options = {} if ranker_kind(path) is not None else {"packing": packing}
        source_cls = RankerReward if ranker_kind(path) is not None else RMReward
        sources.append(source_cls(path, policy_tokenizer, device=device, dtype=dtype, batch_size=batch_size,
                                  normalize=normalize, **options))
    if len(sources) == 1 and weights is None:
        return sources[0]
    return CombinedReward(sources, list(weights) if weights is not None else [1.0] * len(sources))
