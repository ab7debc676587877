"""Reward sources for PPO: score whole responses, one number per row.

A reward source is a callable

    source(prompts, responses, query_ids, query_mask, response_ids, response_mask) -> scores (B,)

``prompts``/``responses`` are the texts of the B rows, decoded by the caller with the POLICY tokenizer (keep
special tokens when decoding prompts, so chat-template markers survive); the ids are the policy's: queries (B, P)
left-padded, responses (B, T) right-padded, with boolean masks (True = real token).

Every source returns ``scores`` as a float32 tensor of shape (B,) **on the CPU** (so that sources on different
devices combine; the caller moves the scores to the policy device), and raises :class:`RlhfkitError` naming the
source when a score is not finite.

Sources:

* :class:`RMReward` — a frozen reward model (an rlhfkit reward-model folder, or any
  ``AutoModelForSequenceClassification`` folder). When its tokenizer has the policy's vocabulary it reads the
  policy's ids directly; otherwise it re-tokenises the texts with its own tokenizer.
* :class:`FunctionReward` — a Python function ``fn(prompts, responses) -> list[float]``, named
  ``"package.module:function"`` (rule-based rewards, gold judges).
* :class:`CombinedReward` — a weighted sum of sources.

:func:`load_reward` builds a source from command-line specs.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import traceback
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from rlhfkit.data.tokenize import encode_prompt, fit_prompt, right_pad
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.reward import RewardModel, reward_pad_token_id

__all__ = ["CombinedReward", "FunctionReward", "RMReward", "RewardSource", "check_scores", "load_reward"]

logger = logging.getLogger(__name__)


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
    ) -> torch.Tensor: ...


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
def same_vocabulary(a: Any, b: Any) -> bool:
    """True when two tokenizers map the same strings to the same ids and agree on BOS, EOS and UNK (the pad
    token may differ: a saved reward model pads with its own id)."""
    same_specials = all(getattr(a, k) == getattr(b, k) for k in ("bos_token_id", "eos_token_id", "unk_token_id"))
    return same_specials and a.get_vocab() == b.get_vocab()


def _real(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


class RMReward:
    """Scores from a frozen reward model (eval mode, no gradients, micro-batches of ``batch_size`` rows).

    Input construction, per row, as ONE right-padded sequence ``prompt tokens + response tokens`` (no padding in
    the middle), padded with the reward model's pad id, the score read at the last real token:

    * id path (the RM tokenizer has the policy's vocabulary, see :func:`same_vocabulary`): the query's real ids
      followed by the response's real ids, exactly as sampled;
    * text path (otherwise, or ``force_text=True``): the prompt text encoded like reward-model training data
      (:func:`rlhfkit.data.tokenize.encode_prompt`: the tokenizer's BOS, never twice) followed by the response text
      without special tokens; if the response stopped at the policy's EOS, the RM's EOS ends the row (added
      unless the text already produced it), as in reward-model training (``append_eos``).

    ``max_length``: when set, longer rows lose prompt tokens from the left (a leading BOS is kept); a response
    alone longer than that keeps its last ``max_length`` tokens. ``normalize=True`` applies the model's stored
    statistics ``(score - mean) / std`` (``rlhfkit.json``); a model without them is used unnormalised, with a
    warning.
    """

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
    ) -> None:
        if batch_size < 1:
            raise RlhfkitError(f"reward batch_size must be at least 1, got {batch_size}")
        self.name = f"reward model {str(path)!r}"
        self.device = torch.device(device)
        self.model = RewardModel.from_pretrained(path, dtype=dtype).to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(path)
        self.policy_tokenizer = policy_tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        pad = self.model.pad_token_id
        self.pad_id = int(pad) if pad is not None else reward_pad_token_id(self.tokenizer)
        self.use_ids = not force_text and same_vocabulary(self.tokenizer, policy_tokenizer)
        self.normalize = normalize and self.model.normalization is not None
        if normalize and not self.normalize:
            logger.warning("%s has no stored normalisation statistics; its scores are used unnormalised", self.name)

    # -- building the inputs ------------------------------------------------------------------------------
    def _fit(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        if self.max_length is None or len(prompt) + len(response) <= self.max_length:
            return prompt, response
        fitted = fit_prompt(self.tokenizer, prompt, len(response), self.max_length, "truncate_prompt_left", row=0)
        return (fitted, response) if fitted is not None else ([], response[-self.max_length:])

    def _text_row(self, prompt: str, response: str, stopped: bool) -> tuple[list[int], list[int]]:
        prompt_ids = encode_prompt(self.tokenizer, prompt)
        response_ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if stopped and eos is not None and (not response_ids or response_ids[-1] != eos):
            response_ids.append(eos)
        return prompt_ids, response_ids

    def rows(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> list[tuple[list[int], list[int]]]:
        """The (prompt ids, response ids) the reward model reads for each row (see the class docstring)."""
        query_ids, query_mask = query_ids.cpu(), query_mask.cpu()
        response_ids, response_mask = response_ids.cpu(), response_mask.cpu()
        policy_eos = self.policy_tokenizer.eos_token_id
        out = []
        for b in range(query_ids.shape[0]):
            response = _real(response_ids[b], response_mask[b])
            if self.use_ids:
                row = (_real(query_ids[b], query_mask[b]), response)
            else:
                row = self._text_row(prompts[b], responses[b], bool(response) and response[-1] == policy_eos)
            out.append(self._fit(*row))
        return out

    # -- scoring ------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        B = query_ids.shape[0]
        if len(prompts) != B or len(responses) != B:
            raise ValueError(f"{len(prompts)} prompts and {len(responses)} responses for a batch of {B}")
        rows = self.rows(prompts, responses, query_ids, query_mask, response_ids, response_mask)
        scores = []
        for start in range(0, B, self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids, mask = right_pad([p + r for p, r in chunk], self.pad_id)
            positions = torch.arange(ids.shape[1])[None, :]
            prompt_lens = torch.tensor([len(p) for p, _ in chunk])[:, None]
            resp_mask = mask & (positions >= prompt_lens)
            with torch.inference_mode():
                out = self.model(ids.to(self.device), mask.to(self.device), resp_mask.to(self.device))
            scores.append(out.scores.float().cpu())
        result = torch.cat(scores) if scores else torch.zeros(0)
        if self.normalize:
            result = self.model.normalize(result)
        # check_scores builds a fresh tensor outside inference mode: the caller may modify it in place
        return check_scores(result, B, self.name)


# ---------------------------------------------------------------------------------------------- functions
def user_exception(error: BaseException) -> str:
    """``"ValueError: text (at file.py:12, in fn)"``: a user function's exception and the line that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


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
    number per response; a list, tuple, numpy array or 1-D tensor), named ``"package.module:function"``."""

    def __init__(self, spec: str) -> None:
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

    def __call__(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> torch.Tensor:
        total = torch.zeros(len(responses), dtype=torch.float32)
        for source, weight in zip(self.sources, self.weights):
            scores = check_scores(source(prompts, responses, query_ids, query_mask, response_ids, response_mask),
                                  len(responses), source.name)
            total = total + weight * scores
        return check_scores(total, len(responses), self.name)


def load_reward(
    specs: Sequence[str],
    weights: Sequence[float] | None,
    policy_tokenizer: Any,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    normalize: bool = False,
) -> RewardSource:
    """A reward source from specs: ``"module:function"`` (a spec with ':' that is not an existing path) or a
    reward-model folder. One spec without weights gives that source itself; otherwise a :class:`CombinedReward`
    (weights default to 1 each)."""
    specs = list(specs)
    if not specs:
        raise RlhfkitError("no reward given: pass a reward-model folder or a 'module:function'")
    if weights is not None and len(weights) != len(specs):
        raise RlhfkitError(f"{len(weights)} reward weights for {len(specs)} rewards ({specs}); give one weight "
                           f"per reward")
    sources: list[RewardSource] = []
    for spec in specs:
        if ":" in spec and not Path(spec).expanduser().exists():
            sources.append(FunctionReward(spec))
            continue
        path = Path(spec).expanduser()
        if not path.exists():
            raise RlhfkitError(f"reward model folder {spec!r} does not exist (for a reward function write "
                               f"'package.module:function')")
        sources.append(RMReward(path, policy_tokenizer, device=device, dtype=dtype, batch_size=batch_size,
                                normalize=normalize))
    if len(sources) == 1 and weights is None:
        return sources[0]
    return CombinedReward(sources, list(weights) if weights is not None else [1.0] * len(sources))
