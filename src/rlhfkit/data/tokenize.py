"""Validated examples → token ids → padded batches, and a length-grouped batch sampler.

Token ids are built as ``prompt_ids + response_ids``, the two parts tokenised separately, so that the
prompt/response boundary is exact:

- the prompt text (:func:`render_prompt`) is tokenised with the tokenizer's special tokens (its BOS, if it
  adds one), except when the text already starts with the BOS text (a chat template wrote it), so that BOS is
  never doubled;
- the response text (:func:`render_response`) is tokenised without special tokens, and the EOS id is appended
  when ``append_eos`` is set and the response does not already end with it.

:func:`encode_for_rm` is THE rendering rule of reward-model inputs, used by RM training, ``rlhfkit score``,
``rlhfkit rm eval`` and PPO scoring alike: ``(prompt, response, ended)`` -> ``(prompt ids, response ids)`` under
the model's :data:`CONVENTIONS` entry (``"rlhfkit"``: the rule above, EOS appended when the response ended;
``"hf"``, reward models rlhfkit did not write: TRL ``RewardTrainer``'s rendering, see :func:`encode_for_rm`).

Over-long examples follow a policy (:data:`OVERLONG_POLICIES`): ``"truncate_prompt_left"`` removes prompt
tokens from the left (keeping a leading BOS token) until the sequence fits, and drops the example if even an
empty prompt does not fit; ``"drop"`` drops it; ``"fail"`` raises. Every tokenize function returns a
:class:`TokenizeReport` with the counts, so that nothing is dropped or cut silently.

Collation derives attention masks from sequence lengths, never from ``ids != pad_id``: for SmolLM2 the pad
token is the EOS token, and an EOS ending a response is a real token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

from rlhfkit.data.pointwise import PointwiseExample
from rlhfkit.data.preference import PreferenceExample, Response
from rlhfkit.data.prompts import Prompt
from rlhfkit.errors import RlhfkitError, data_error

OVERLONG_POLICIES = ("truncate_prompt_left", "drop", "fail")
CONVENTIONS = ("rlhfkit", "hf")
_PLACEHOLDER_PROMPT = [{"role": "user", "content": "Hello"}]


# ---- rendering ------------------------------------------------------------------------------------------

def _chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        raise RlhfkitError(f"conversational data needs a tokenizer with a chat template: {e}") from e


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """A text prompt unchanged; messages through the chat template with the generation prompt appended."""
    if isinstance(prompt, str):
        return prompt
    return _chat(tokenizer, prompt, add_generation_prompt=True)


def render_response(tokenizer: Any, response: Response, prompt: Prompt | None = None) -> str:
    """A text response unchanged; assistant messages as the chat template writes them after the prompt.

    The template's text for the response is derived as ``template(prompt + response)`` minus
    ``template(prompt, add_generation_prompt=True)``, cut right after the first EOS text that follows the
    last message's content (SmolLM2: ``"Hi!<|im_end|>"``; the ``"\\n"`` between turns is dropped), or with
    trailing whitespace stripped when the template writes no EOS there. ``prompt`` (a text prompt counts as
    one user message; default: a placeholder user message) is the context the template sees. If the
    difference does not start where expected or lacks the contents, the contents joined by newlines are
    used instead.
    """
    if isinstance(response, str):
        return response
    contents = [m["content"] for m in response]
    context = _PLACEHOLDER_PROMPT if prompt is None else (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    head = _chat(tokenizer, context, add_generation_prompt=True)
    full = _chat(tokenizer, context + list(response), add_generation_prompt=False)
    if full.startswith(head):
        tail, pos = full[len(head):], 0
        for content in contents:
            found = tail.find(content, pos)
            if found < 0:
                break
            pos = found + len(content)
        else:
            eos = tokenizer.eos_token
            cut = tail.find(eos, pos) if eos else -1
            return tail[: cut + len(eos)] if cut >= 0 else tail.rstrip()
    return "\n".join(contents)


def render(tokenizer: Any, prompt: Prompt, response: Response | None = None) -> str:
    """The prompt text, followed by the response text if given (for display and scoring by text)."""
    text = render_prompt(tokenizer, prompt)
    return text if response is None else text + render_response(tokenizer, response, prompt)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt (BOS added as the tokenizer dictates, never twice)."""
    text = render_prompt(tokenizer, prompt)
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def end_with_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    """``ids`` with ``eos_id`` appended unless it is already the last id: how a complete (ended) response ends."""
    if eos_id is None:
        raise RlhfkitError("the tokenizer has no EOS token, so none can be appended; set append_eos=False")
    return list(ids) if ids and ids[-1] == eos_id else [*ids, eos_id]


def encode_response(tokenizer: Any, response: Response, prompt: Prompt | None = None,
                    append_eos: bool = True) -> list[int]:
    """Token ids of the rendered response, no special tokens added, EOS appended unless already last."""
    ids = list(tokenizer(render_response(tokenizer, response, prompt), add_special_tokens=False)["input_ids"])
    return end_with_eos(ids, tokenizer.eos_token_id) if append_eos else ids


def encode_for_rm(tokenizer: Any, prompt: Prompt, response: Response, ended: bool = True,
                  convention: str = "rlhfkit") -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` that a reward model of ``convention`` reads for one row: THE rendering rule
    of RM training, ``rlhfkit score``, ``rlhfkit rm eval`` and PPO scoring. ``ended``: the response is complete
    (training data always is; in PPO, a response that stopped at EOS, a stop id or a stop string).

    * ``"rlhfkit"`` (folders written by ``rlhfkit rm train``): :func:`encode_prompt` then :func:`encode_response`,
      tokenised apart (exact boundary), the EOS id appended when ``ended``.
    * ``"hf"`` (a reward model rlhfkit did not write, read the way plain transformers reads it): the text of TRL
      1.9 ``RewardTrainer._prepare_dataset``, tokenised as ONE string. A text response: ``render_prompt(prompt) +
      response`` (concatenated as they are, no separator), plus the EOS text when ``ended`` and the text does not
      already end with it; tokenised with the tokenizer's special tokens, except when the text starts with the
      BOS text (so BOS is never doubled; TRL would double it). Assistant messages: the chat template of the whole
      conversation (``add_generation_prompt=False``, no EOS added beyond the template's), no special tokens
      added, as ``apply_chat_template(tokenize=True)`` does. The prompt ids are the longest common prefix of the
      joint ids and the prompt's own ids, the rest is the response: their concatenation is exactly the joint
      tokenisation. The score of such a model is read at the last token whose id is not ``config.pad_token_id``
      (:class:`rlhfkit.models.reward.RewardModel`), as ``*ForSequenceClassification`` reads it.
    """
    if convention == "rlhfkit":
        return encode_prompt(tokenizer, prompt), encode_response(tokenizer, response, prompt, append_eos=ended)
    if convention != "hf":
        raise RlhfkitError(f"unknown reward-model convention {convention!r}; expected one of {CONVENTIONS}")
    if isinstance(response, list):
        context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text, special = _chat(tokenizer, context + list(response), add_generation_prompt=False), False
    else:
        text, eos = render_prompt(tokenizer, prompt) + response, tokenizer.eos_token
        if ended and eos and not text.endswith(eos):
            text += eos
        bos = tokenizer.bos_token
        special = not (bos and text.startswith(bos))
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    split = first_difference(encode_prompt(tokenizer, prompt), ids)
    return ids[:split], ids[split:]


# ---- tokenising with an over-long policy ---------------------------------------------------------------

@dataclass(frozen=True)
class TokenizedPair:
    """A tokenised preference pair: ``*_ids`` = prompt ids + response ids; ``row`` is the source row."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_prompt_len: int
    rejected_prompt_len: int
    margin: Optional[float]
    row: int


@dataclass(frozen=True)
class TokenizedPoint:
    """A tokenised pointwise example. ``scores``/``scores_mask`` follow the example's aspect order (0.0 and
    False where an aspect is missing)."""

    input_ids: list[int]
    prompt_len: int
    label: Optional[int]
    score: Optional[float]
    scores: Optional[tuple[float, ...]]
    scores_mask: Optional[tuple[bool, ...]]
    row: int


@dataclass(frozen=True)
class TokenizeReport:
    """What tokenising did: ``n_in`` examples in, ``n_truncated`` had their prompt cut, ``n_dropped`` dropped."""

    n_in: int
    n_truncated: int
    n_dropped: int
    max_length: Optional[int] = None
    overlong: Optional[str] = None
    dropped_rows: tuple[int, ...] = ()

    @property
    def n_out(self) -> int:
        return self.n_in - self.n_dropped

    def describe(self) -> str:
        """One line for the log, e.g. ``tokenized 10 examples (max_length=512, overlong='drop'): 9 kept, ...``."""
        line = (f"tokenized {self.n_in} examples (max_length={self.max_length}, overlong={self.overlong!r}): "
                f"{self.n_out} kept, {self.n_truncated} with the prompt truncated on the left, "
                f"{self.n_dropped} dropped as too long")
        if self.dropped_rows:
            rows = ", ".join(map(str, self.dropped_rows[:10])) + (", ..." if len(self.dropped_rows) > 10 else "")
            line += f" (row{'s' if len(self.dropped_rows) > 1 else ''} {rows})"
        return line


def _check_policy(max_length: int, overlong: str) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise RlhfkitError(f"unknown overlong policy {overlong!r}; choose one of {', '.join(OVERLONG_POLICIES)}")
    if max_length < 1:
        raise RlhfkitError(f"max_length must be at least 1, got {max_length}")


def fit_prompt(tokenizer: Any, prompt_ids: list[int], response_len: int, max_length: int, overlong: str,
               row: int, source: Any = None) -> list[int] | None:
    """The prompt ids to use so that ``len(prompt) + response_len <= max_length``, or None to drop.

    ``truncate_prompt_left`` keeps a leading BOS token and the END of the prompt; ``fail`` raises naming the row
    (and the file ``source``, when given).
    """
    if len(prompt_ids) + response_len <= max_length:
        return prompt_ids
    if overlong == "fail":
        raise data_error(source, row, None, f"too long: {len(prompt_ids)} prompt + {response_len} response tokens "
                                            f"> max_length {max_length}; raise max_length or choose "
                                            "overlong='truncate_prompt_left' or 'drop'")
    if overlong == "drop":
        return None
    bos = tokenizer.bos_token_id
    head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
    budget = max_length - response_len - len(head)  # prompt tokens that fit after the head
    if budget < 0:
        return None
    return head + prompt_ids[len(prompt_ids) - budget:] if budget > 0 else head


def tokenize_preferences(tokenizer: Any, examples: Sequence[PreferenceExample], max_length: int,
                         overlong: str = "truncate_prompt_left", append_eos: bool = True, convention: str = "rlhfkit"
                         ) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenise pairs (:func:`encode_for_rm`); both sides share the (possibly truncated) prompt and fit in
    ``max_length``. Under the ``"hf"`` convention the shared prompt is the common beginning of both sides' ids."""
    _check_policy(max_length, overlong)
    pairs, n_truncated, dropped = [], 0, []
    for index, ex in enumerate(examples):
        row = ex.row if ex.row is not None else index + 1
        chosen_prompt, chosen = encode_for_rm(tokenizer, ex.prompt, ex.chosen, append_eos, convention)
        rejected_prompt, rejected = encode_for_rm(tokenizer, ex.prompt, ex.rejected, append_eos, convention)
        shared = first_difference(chosen_prompt, rejected_prompt)  # both sides' prompt ids, except under "hf"
        prompt_ids = chosen_prompt[:shared]
        chosen, rejected = chosen_prompt[shared:] + chosen, rejected_prompt[shared:] + rejected
        fitted = fit_prompt(tokenizer, prompt_ids, max(len(chosen), len(rejected)), max_length, overlong, row)
        if fitted is None:
            dropped.append(row)
            continue
        n_truncated += len(fitted) < len(prompt_ids)
        p = len(fitted)
        pairs.append(TokenizedPair(fitted + chosen, fitted + rejected, p, p, ex.margin, row))
    return pairs, TokenizeReport(len(examples), n_truncated, len(dropped), max_length, overlong, tuple(dropped))


def tokenize_pointwise(tokenizer: Any, examples: Sequence[PointwiseExample], max_length: int,
                       overlong: str = "truncate_prompt_left", append_eos: bool = True, convention: str = "rlhfkit"
                       ) -> tuple[list[TokenizedPoint], TokenizeReport]:
    """Tokenise pointwise examples (:func:`encode_for_rm`; prompt + response in ``max_length``)."""
    _check_policy(max_length, overlong)
    points, n_truncated, dropped = [], 0, []
    for index, ex in enumerate(examples):
        row = ex.row if ex.row is not None else index + 1
        prompt_ids, response = encode_for_rm(tokenizer, ex.prompt, ex.response, append_eos, convention)
        fitted = fit_prompt(tokenizer, prompt_ids, len(response), max_length, overlong, row)
        if fitted is None:
            dropped.append(row)
            continue
        n_truncated += len(fitted) < len(prompt_ids)
        scores = mask = None
        if ex.scores is not None:
            scores = tuple(0.0 if v is None else float(v) for v in ex.scores.values())
            mask = tuple(v is not None for v in ex.scores.values())
        points.append(TokenizedPoint(fitted + response, len(fitted), ex.label, ex.score, scores, mask, row))
    return points, TokenizeReport(len(examples), n_truncated, len(dropped), max_length, overlong, tuple(dropped))


def tokenize_prompts(tokenizer: Any, prompts: Sequence[Prompt], max_prompt_length: int,
                     overlong: str = "truncate_prompt_left", source: Any = None
                     ) -> tuple[list[list[int]], TokenizeReport]:
    """Tokenise PPO prompts to at most ``max_prompt_length`` ids each; errors name the file ``source``."""
    _check_policy(max_prompt_length, overlong)
    out, n_truncated, dropped = [], 0, []
    for index, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt)
        fitted = fit_prompt(tokenizer, ids, 0, max_prompt_length, overlong, index + 1, source)
        if fitted is None:
            dropped.append(index + 1)
            continue
        n_truncated += len(fitted) < len(ids)
        out.append(fitted)
    return out, TokenizeReport(len(prompts), n_truncated, len(dropped), max_prompt_length, overlong, tuple(dropped))


# ---- padding and collation ------------------------------------------------------------------------------

def _lengths(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty batch")
    return torch.tensor([len(s) for s in seqs], dtype=torch.long)


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, L), mask (B, L) bool)``, sequences at the left, ``pad_id`` after; mask True on real tokens."""
    lengths = _lengths(seqs)
    width = int(lengths.max())
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return ids, mask


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (B, P), mask (B, P) bool)``, ``pad_id`` first, sequences flush right (prompts for generation)."""
    lengths = _lengths(seqs)
    width = int(lengths.max())
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    return ids, mask


def _response_mask(attention_mask: torch.Tensor, prompt_lens: Sequence[int]) -> torch.Tensor:
    positions = torch.arange(attention_mask.shape[1])[None, :]
    return attention_mask & (positions >= torch.tensor(list(prompt_lens), dtype=torch.long)[:, None])


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The first position where ``a`` and ``b`` differ (``min(len)`` if one is a prefix of the other)."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def collate_pairs(batch: Sequence[TokenizedPair], pad_id: int) -> dict[str, Any]:
    """Stack B pairs: ``input_ids``/``attention_mask``/``response_mask`` (2B, L), chosen rows first then the
    rejected rows, right-padded; ``margin`` (B,) float32 or None; ``first_diff`` (B,) long."""
    seqs = [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch]
    input_ids, attention_mask = right_pad(seqs, pad_id)
    prompt_lens = [p.chosen_prompt_len for p in batch] + [p.rejected_prompt_len for p in batch]
    margins = [p.margin for p in batch]
    if all(m is None for m in margins):
        margin = None
    elif any(m is None for m in margins):
        raise ValueError("a batch mixes pairs with and without a margin")
    else:
        margin = torch.tensor(margins, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": _response_mask(attention_mask, prompt_lens),
        "margin": margin,
        "first_diff": torch.tensor([first_difference(p.chosen_ids, p.rejected_ids) for p in batch],
                                   dtype=torch.long),
    }


def collate_points(batch: Sequence[TokenizedPoint], pad_id: int) -> dict[str, Any]:
    """Stack B points: ``input_ids``/``attention_mask``/``response_mask`` (B, L) right-padded, plus the target:
    ``labels`` (B,) long, ``scores`` (B,) float32, or ``scores`` (B, K) float32 with ``scores_mask`` (B, K) bool."""
    input_ids, attention_mask = right_pad([p.input_ids for p in batch], pad_id)
    out: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": _response_mask(attention_mask, [p.prompt_len for p in batch]),
    }
    first = batch[0]
    if first.label is not None:
        out["labels"] = torch.tensor([p.label for p in batch], dtype=torch.long)
    elif first.score is not None:
        out["scores"] = torch.tensor([p.score for p in batch], dtype=torch.float32)
    else:
        out["scores"] = torch.tensor([p.scores for p in batch], dtype=torch.float32)
        out["scores_mask"] = torch.tensor([p.scores_mask for p in batch], dtype=torch.bool)
    return out


# ---- batch sampler --------------------------------------------------------------------------------------

class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices with similar lengths, deterministic per ``(seed, epoch)``.

    Per epoch: shuffle all indices with ``torch.Generator().manual_seed(seed + epoch)``; cut the order into
    mega-batches of ``batch_size * group_size_multiplier``; sort each by length (longest first; ties keep the
    shuffled order); cut into batches; with ``drop_last`` drop the one short batch (always the last of the
    last mega-batch); shuffle the batch order with the same generator. Each index appears exactly once per
    epoch (or at most once with ``drop_last``). There is no hidden state: resuming after ``k`` batches of an
    epoch is ``set_epoch(epoch, skip_batches=k)``.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, drop_last: bool = False,
                 group_size_multiplier: int = 50) -> None:
        if batch_size < 1 or group_size_multiplier < 1:
            raise ValueError("batch_size and group_size_multiplier must be at least 1")
        if len(lengths) == 0:
            raise ValueError("no lengths: the dataset is empty")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.group_size_multiplier = group_size_multiplier
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch that ``__iter__`` yields, leaving out its first ``skip_batches`` batches."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, in order (a pure function of seed, epoch and the settings)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.group_size_multiplier
        batches = []
        for start in range(0, len(order), mega):
            group = sorted(order[start: start + mega], key=lambda i: -self.lengths[i])
            batches.extend(group[j: j + self.batch_size] for j in range(0, len(group), self.batch_size))
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[k] for k in shuffled]

    def _num_batches(self) -> int:
        n, b = len(self.lengths), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip_batches:]

    def __len__(self) -> int:
        return max(0, self._num_batches() - self.skip_batches)


class PromptGroupedBatchSampler(LengthGroupedBatchSampler):
    """Batches that keep the examples of one prompt together, deterministic per ``(seed, epoch)``.

    ``keys[i]`` identifies example ``i``'s prompt (its prompt token ids). Per epoch: shuffle the groups (first
    appearance order, permuted with ``torch.Generator().manual_seed(seed + epoch)``) and, with the same
    generator, the examples inside each group; concatenate; cut into batches of ``batch_size`` (with
    ``drop_last`` the one short batch at the end is dropped). A prompt's comparisons thus land in one or two
    consecutive batches, as InstructGPT trains on all C(K, 2) comparisons of a prompt as one batch element
    (Ouyang et al. 2022, §3.5): the model sees each response once per batch instead of once per pair, and
    :func:`rlhfkit.train.rm_eval.forward_pairs` runs each distinct sequence of a micro-batch only once.
    """

    def __init__(self, keys: Sequence[Any], batch_size: int, seed: int, drop_last: bool = False) -> None:
        super().__init__([0] * len(keys), batch_size, seed, drop_last, group_size_multiplier=1)
        groups: dict[Any, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        self.groups = list(groups.values())

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = []
        for g in torch.randperm(len(self.groups), generator=generator).tolist():
            group = self.groups[g]
            order.extend(group[k] for k in torch.randperm(len(group), generator=generator).tolist())
        batches = [order[j: j + self.batch_size] for j in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches


def prompt_key(item: TokenizedPair) -> tuple[int, ...]:
    """The prompt's token ids of a tokenised pair (the key of :class:`PromptGroupedBatchSampler`)."""
    return tuple(item.chosen_ids[:item.chosen_prompt_len])

