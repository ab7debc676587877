"""``rlhfkit rm eval``: pairwise accuracy, mean margin and calibration of a reward model on preference data.

Definitions (``r_c``, ``r_r`` the scores of the chosen and the rejected response of a pair, ``d = r_c - r_r``):

- **accuracy** = mean over pairs of ``1`` if ``d > 0``, ``½`` if ``d = 0`` (a tie counts as half right: the model
  has no preference, which is right half the time by symmetry), ``0`` if ``d < 0``;
- **margin** = mean of ``d``;
- **calibration**: the model's predicted probability that chosen is preferred is ``p = σ(d)`` (Bradley-Terry);
  its confidence in its own prediction is ``c = max(p, 1 - p) = σ(|d|)`` in ``[0.5, 1]``. The interval
  ``[0.5, 1]`` is cut into ``num_bins`` equal-width bins (the last one closed); per bin ``n_b`` pairs,
  ``acc_b`` their accuracy (as above) and ``conf_b`` their mean confidence; the expected calibration error is
  ``ECE = Σ_b n_b / N · |acc_b - conf_b|`` (Guo et al. 2017, "On calibration of modern neural networks", eq. 3).

For a ranker (PairRM, or the seq2seq SteamSHP-style kind), ``d`` is the symmetric logit
``(logit(c, r) - logit(r, c)) / 2``, so ``p = σ(d)`` is the ranker's own symmetric P(chosen better), and the same
definitions apply.

:func:`evaluate_reward_model` is the Python entry point (used by the trainer's held-out evaluation and by the
quickstart); :func:`pairwise_metrics` is the pure metric computation on scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhfkit.data.preference import PreferenceExample, load_preferences
from rlhfkit.data.tokenize import TokenizedPair, TokenizeReport, collate_pairs, prompt_key, tokenize_preferences
from rlhfkit.errors import RlhfkitError, data_error
from rlhfkit.models.pairrm import Ranker, pad_right
from rlhfkit.models.rankers import RANKERS, load_ranker, ranker_kind
from rlhfkit.models.reward import RewardModel
from rlhfkit.train.rm_config import RMEvalConfig

CONFIG = RMEvalConfig


# ----------------------------------------------------------------------------------------------------------
# Pure metrics
# ----------------------------------------------------------------------------------------------------------
def pairwise_correct(diff: torch.Tensor) -> torch.Tensor:
    """Per-pair correctness of ``d = r_c - r_r``: 1 if d > 0, ½ if d = 0 (tie), 0 if d < 0. (B,) -> (B,) float."""
    return (diff > 0).to(torch.float64) + 0.5 * (diff == 0).to(torch.float64)


def calibration_bins(diff: torch.Tensor, num_bins: int) -> tuple[list[dict[str, Any]], float]:
    """Confidence bins and ECE of pairwise predictions (definitions in the module docstring).

    ``diff`` (N,) -> ``(bins, ece)``; each bin is ``{"lo", "hi", "n", "accuracy", "confidence"}`` (accuracy and
    confidence None for an empty bin). Computed in float64.
    """
    d = diff.detach().to(torch.float64).flatten()
    n_total = d.numel()
    if n_total == 0:
        raise ValueError("calibration_bins needs at least one pair")
    confidence = torch.sigmoid(d.abs())  # max(σ(d), 1 - σ(d)) = σ(|d|) in [0.5, 1)
    correct = pairwise_correct(d)
    index = ((confidence - 0.5) * 2 * num_bins).floor().long().clamp(0, num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        members = index == b
        n = int(members.sum())
        acc = float(correct[members].mean()) if n else None
        conf = float(confidence[members].mean()) if n else None
        if n:
            ece += n / n_total * abs(acc - conf)
        bins.append({"lo": 0.5 + 0.5 * b / num_bins, "hi": 0.5 + 0.5 * (b + 1) / num_bins, "n": n,
                     "accuracy": acc, "confidence": conf})
    return bins, ece


def pairwise_metrics(diff: torch.Tensor, num_bins: int = 10, chosen: torch.Tensor | None = None,
                     rejected: torch.Tensor | None = None) -> dict[str, Any]:
    """Accuracy (ties ½), mean margin, ECE and bins of pairwise score differences ``diff = r_c - r_r`` (N,).

    With ``chosen``/``rejected`` scores (N,) also their means. Returns plain Python numbers.
    """
    d = diff.detach().to(torch.float64).flatten()
    bins, ece = calibration_bins(d, num_bins)
    out: dict[str, Any] = {
        "n": d.numel(),
        "accuracy": float(pairwise_correct(d).mean()),
        "margin": float(d.mean()),
        "ties": int((d == 0).sum()),
        "ece": ece,
        "bins": bins,
    }
    if chosen is not None and rejected is not None:
        out["chosen_mean"] = float(chosen.detach().double().mean())
        out["rejected_mean"] = float(rejected.detach().double().mean())
    return out


# ----------------------------------------------------------------------------------------------------------
# Tokenising and scoring pairs (reward models and PairRM rankers)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankerPair:
    """A ranker input in both orders: (prompt, chosen, rejected) and (prompt, rejected, chosen)."""

    ab_ids: list[int]
    ba_ids: list[int]
    row: int


def tokenize_ranker_pairs(build: Callable[..., list[int]], examples: Sequence[PreferenceExample], max_length: int,
                          overlong: str) -> tuple[list[RankerPair], TokenizeReport]:
    """Ranker inputs (``build`` = a ranker kind's ``input_builder(tokenizer)``) with the over-long policy: truncate
    (the ranker's symmetric cap), drop, or fail."""
    items, n_truncated, dropped = [], 0, []
    for index, ex in enumerate(examples):
        row = ex.row if ex.row is not None else index + 1
        ab = build(ex.prompt, ex.chosen, ex.rejected)
        if len(ab) > max_length:
            if overlong == "fail":
                raise data_error(None, row, None, f"too long: the ranker input has {len(ab)} tokens > max_length "
                                                  f"{max_length}; raise max_length or choose another overlong policy")
            if overlong == "drop":
                dropped.append(row)
                continue
            n_truncated += 1
            ab = build(ex.prompt, ex.chosen, ex.rejected, max_length)
        ba = build(ex.prompt, ex.rejected, ex.chosen, max_length)  # the cap is symmetric in A, B
        items.append(RankerPair(ab, ba, row))
    return items, TokenizeReport(len(examples), n_truncated, len(dropped), max_length, overlong, tuple(dropped))


def with_source(error: RlhfkitError, source: Any) -> RlhfkitError:
    """Prefix a data error raised without a file name (tokenisation) with the file."""
    return RlhfkitError(f"{source}, {error}") if source is not None else error


def tokenize_pairs(ranker: str | None, tokenizer: Any, examples: Sequence[PreferenceExample], max_length: int,
                   overlong: str, source: Any = None, convention: str = "rlhfkit") -> tuple[list, TokenizeReport]:
    """``TokenizedPair``s for a reward model (``ranker`` None or False; rendered under its ``convention``),
    ``RankerPair``s for a ranker of kind ``ranker`` ('pairrm' or 'seq2seq'); errors name ``source``."""
    try:
        if ranker:
            return tokenize_ranker_pairs(RANKERS[ranker].input_builder(tokenizer), examples, max_length, overlong)
        return tokenize_preferences(tokenizer, examples, max_length, overlong, convention=convention)
    except RlhfkitError as e:
        raise with_source(e, source) from None


def pad_id_of(model: Any) -> int:
    """The id batches for this model are padded with (never EOS; see ``reward_pad_token_id``)."""
    if isinstance(model, Ranker):
        return model.pad_id
    return model.pad_token_id if model.pad_token_id is not None else 0


def pair_length(item: Any) -> int:
    """Padded width an item needs (for length grouping): a pair's longer row, a ranker input, a pointwise row."""
    if isinstance(item, RankerPair):
        return len(item.ab_ids)
    if isinstance(item, TokenizedPair):
        return max(len(item.chosen_ids), len(item.rejected_ids))
    return len(item.input_ids)


def scoring_batches(items: Sequence[Any], batch_size: int) -> list[list[int]]:
    """The batches (lists of indices into ``items``, at most ``batch_size`` each) in which held-out items are
    scored: longest first, and the pairs of one prompt together.

    Reward-model pairs (`TokenizedPair`) group by prompt (`data.tokenize.prompt_key`): K responses of a prompt,
    all C(K, 2) pairs labelled, then land in one batch, where `forward_pairs` runs each distinct response once
    and the prompt once, instead of each response K - 1 times in length-sorted batches (for K = 3, half the rows).
    Groups are ordered by their longest pair (ties keep first appearance), the pairs inside a group by length; a
    group is not split unless it alone holds more than ``batch_size`` pairs (then it fills consecutive batches).
    Rankers and pointwise items are each their own group: plain length order. Scores do not depend on the
    batching beyond float rounding, so this is the order of every held-out evaluation (`evaluate_reward_model`,
    `rm train`'s eval steps)."""
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(prompt_key(item) if isinstance(item, TokenizedPair) else ("item", i), []).append(i)
    length = [pair_length(item) for item in items]
    ordered = sorted(groups.values(), key=lambda g: -max(length[i] for i in g))
    batches: list[list[int]] = []
    current: list[int] = []
    for group in ordered:
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        for i in sorted(group, key=lambda i: -length[i]):
            if len(current) == batch_size:
                batches.append(current)
                current = []
            current.append(i)
    if current:
        batches.append(current)
    return batches


def collate_pair_items(items: Sequence[Any], pad_id: int) -> dict[str, Any]:
    """Batch of 2B rows: chosen-then-rejected (reward model) or (c, r)-then-(r, c) orders (ranker)."""
    if isinstance(items[0], RankerPair):
        input_ids, attention_mask = pad_right([p.ab_ids for p in items] + [p.ba_ids for p in items], pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": None,
                "margin": None, "first_diff": None}
    return collate_pairs(items, pad_id)


def forward_pairs(model: Any, batch: dict[str, Any], share_prompts: bool = True, packing: bool = False,
                  trunk_cache: Any = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Any]:
    """``(diff (B,), chosen (B,) | None, rejected (B,) | None, raw output)`` for one collated pair batch.

    ``share_prompts``: a decoder reward model runs each prompt of the batch once (`rlhfkit.models.packing`):
    a pair's chosen and rejected rows share their prompt, and so do all K responses of a prompt in K-wise batches.
    ``packing``: a decoder reward model runs the batch as one padding-free packed sequence
    (`RewardModel.forward`); a ranker ignores both.
    ``trunk_cache``: a `models.trunk.TrunkCache` that the reward model's backbone can use (the caller checked
    `TrunkCache.usable_for`): its lowest blocks are not run for the rows the cache holds.
    """
    if isinstance(getattr(model, "module", None), Ranker) or isinstance(model, Ranker):
        logits = model(batch["input_ids"], batch["attention_mask"])
        half = logits.shape[0] // 2
        return (logits[:half] - logits[half:]) / 2, None, None, logits
    out = _forward_distinct(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], share_prompts,
                            packing, trunk_cache)
    half = out.scores.shape[0] // 2
    chosen, rejected = out.scores[:half], out.scores[half:]
    return chosen - rejected, chosen, rejected, out


def _forward_distinct(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, share_prompts: bool = False, packing: bool = False,
                      trunk_cache: Any = None) -> Any:
    """The reward model on a (N, L) batch, each distinct row run once when rows repeat.

    Pairs that share a response (K responses of a prompt, all pairs labelled) repeat rows; the model then runs
    on the distinct rows only (trimmed to their own longest length) and every output is gathered back to the
    N rows, so the result (and, through the gather, the gradient) equals that of the full batch. Rows compare
    on ids and both masks (with pad == EOS, equal ids can still differ in their masks). Batches without
    repeats take the plain path unchanged.
    """
    rows = torch.cat([input_ids, attention_mask.long(), response_mask.long()], dim=1)
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    def run(ids: torch.Tensor, att: torch.Tensor, resp: torch.Tensor) -> Any:
        trunk = {"trunk": trunk_cache.trunk(ids, att)} if trunk_cache is not None else {}
        return model(ids, att, resp, share_prompts=share_prompts, packing=packing, **trunk)

    if distinct.shape[0] == rows.shape[0]:
        return run(input_ids, attention_mask, response_mask)
    ids, att, resp = distinct.split(input_ids.shape[1], dim=1)  # the distinct rows are the model's inputs
    length = int(att.sum(dim=1).max())  # right-padded rows
    out = run(ids[:, :length], att[:, :length].to(attention_mask.dtype), resp[:, :length].to(response_mask.dtype))
    pad = input_ids.shape[1] - length

    def back(t: torch.Tensor | None, per_token: bool) -> torch.Tensor | None:
        if t is None:
            return None
        t = t[inverse]
        if per_token and pad:  # token outputs are 0 at padding (RewardOutput)
            t = torch.nn.functional.pad(t, (0, 0, 0, pad) if t.dim() == 3 else (0, pad))
        return t

    return type(out)(back(out.scores, False), back(out.token_scores, True), back(out.aspect_scores, False),
                     back(out.aspect_token_scores, True))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def score_pair_items(model: Any, items: Sequence[Any], batch_size: int, bf16: bool = False, trunk_cache: Any = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(diff, chosen, rejected)`` float32 CPU tensors (N,) in the order of ``items``, scored in
    `scoring_batches`; a decoder reward model runs each batch packed (`RewardModel.forward`, ``packing``: no
    padding computed; its distinct rows once, each prompt once; other models ignore it). ``trunk_cache``: a
    `models.trunk.TrunkCache` the model's backbone shares (`TrunkCache.usable_for`, checked by the caller)."""
    device = next(model.parameters()).device
    diff = torch.empty(len(items))
    chosen = torch.empty(len(items))
    rejected = torch.empty(len(items))
    has_scores = True
    was_training = model.training
    model.eval()
    try:
        for idx in scoring_batches(items, batch_size):
            batch = to_device(collate_pair_items([items[i] for i in idx], pad_id_of(model)), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                d, c, r, _ = forward_pairs(model, batch, packing=True, trunk_cache=trunk_cache)
            diff[idx] = d.float().cpu()
            if c is None:
                has_scores = False
            else:
                chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    finally:
        model.train(was_training)
    return diff, (chosen if has_scores else None), (rejected if has_scores else None)


def evaluate_reward_model(model: Any, tokenizer: Any, examples: Sequence[PreferenceExample], batch_size: int = 16,
                          max_length: int = 1024, overlong: str = "truncate_prompt_left", num_bins: int = 10,
                          bf16: bool = False, source: Any = None, trunk_cache: Any = None) -> dict[str, Any]:
    """Pairwise metrics of a ``RewardModel`` or a ranker on preference examples (module docstring).

    ``trunk_cache``: a `models.trunk.TrunkCache` (e.g. the states the sampler captured for these responses); used
    when the reward model's lowest blocks are its decoder's bit for bit (`TrunkCache.usable_for`), else ignored.

    Returns ``{"n", "accuracy", "margin", "ties", "ece", "bins", "chosen_mean", "rejected_mean" (reward models),
    "n_dropped", "n_truncated"}``. Raises RlhfkitError when no pair is left after the over-long policy.
    """
    ranker = model.kind if isinstance(model, Ranker) else None
    items, report = tokenize_pairs(ranker, tokenizer, examples, max_length, overlong, source,
                                   convention="rlhfkit" if ranker else model.convention)
    if not items:
        raise RlhfkitError(f"{source or 'data'}: no pair left to evaluate ({report.describe()})")
    if trunk_cache is not None and (ranker or trunk_cache.usable_for(
            model._backbone(), training=False, autocast_dtype=torch.bfloat16 if bf16 else None)):
        trunk_cache = None
    diff, chosen, rejected = score_pair_items(model, items, batch_size, bf16, trunk_cache)
    metrics = pairwise_metrics(diff, num_bins, chosen, rejected)
    metrics.update(n_dropped=report.n_dropped, n_truncated=report.n_truncated)
    return metrics


def load_scoring_model(path: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a folder written by ``rlhfkit rm train``: a ``RewardModel`` or a ranker
    (``PairRanker``, ``Seq2SeqRanker``, by the kind its ``rlhfkit.json`` says)."""
    from rlhfkit.models.loading import load_tokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise RlhfkitError(f"reward model folder {path!r} not found")
    if ranker_kind(folder) is not None:
        model = load_ranker(folder, trust_remote_code=trust_remote_code)
        tokenizer = model.tokenizer or load_tokenizer(folder, trust_remote_code=trust_remote_code)
    else:
        model = RewardModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def format_table(metrics: dict[str, Any]) -> str:
    """A short text table of the metrics and the confidence bins."""
    lines = [f"pairs {metrics['n']}   accuracy {metrics['accuracy']:.4f}   margin {metrics['margin']:+.4f}   "
             f"ECE {metrics['ece']:.4f}   ties {metrics['ties']}",
             f"{'confidence':>15} {'n':>6} {'accuracy':>9} {'mean conf':>9}"]
    for b in metrics["bins"]:
        acc = "-" if b["accuracy"] is None else f"{b['accuracy']:.4f}"
        conf = "-" if b["confidence"] is None else f"{b['confidence']:.4f}"
        lines.append(f"  [{b['lo']:.3f},{b['hi']:.3f}{']' if b['hi'] >= 1 else ')'} {b['n']:>6} {acc:>9} {conf:>9}")
    return "\n".join(lines)


def run(cfg: RMEvalConfig) -> dict[str, Any]:
    """Load data (validated first), then the model; evaluate; print the table; write JSON if asked."""
    from rlhfkit.utils import atomic_write_json, resolve_bf16, warn_if_slow_bf16

    examples = load_preferences(cfg.data, skip_invalid=cfg.skip_invalid)
    if examples.skipped:
        print(f"skipped {len(examples.skipped)} invalid row(s): " + "; ".join(examples.skipped[:5]))
    model, tokenizer = load_scoring_model(cfg.model, cfg.trust_remote_code)
    cfg.bf16 = resolve_bf16(cfg.bf16, next(model.parameters()).device)
    warn_if_slow_bf16(cfg.bf16, next(model.parameters()).device, "rm eval --bf16")
    metrics = evaluate_reward_model(model, tokenizer, examples, cfg.batch_size, cfg.max_length, cfg.overlong,
                                    cfg.num_bins, cfg.bf16, source=cfg.data)
    if not math.isfinite(metrics["margin"]):
        raise RlhfkitError(f"{cfg.model}: the reward model produced non-finite scores")
    metrics = {"model": str(cfg.model), "data": str(cfg.data), "n_skipped_invalid": len(examples.skipped), **metrics}
    print(format_table(metrics))
    if cfg.output:
        atomic_write_json(cfg.output, metrics)
    return metrics
