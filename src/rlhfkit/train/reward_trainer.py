"""``rlhfkit rm train``: train a reward model (or a PairRM / seq2seq ranker) on preference or pointwise data.

`RewardTrainer` holds the run (the command's `run` and the Python API build the same class; the API passes model,
tokenizer, data and callbacks as objects, each given once); its construction runs steps 1-4 (writing nothing),
`RewardTrainer.step` is one optimizer step (5-6), `RewardTrainer.train` the loop and step 7:

1. load and validate the data (every error before any training; the over-long report is printed), split off the
   held-out set, tokenise;
2. tokenizer and model (LoRA, frozen layers, gradient checkpointing);
3. the batch plan: a seeded, length-grouped order of global batches; each process takes its shard
   (``batch[rank::num_processes]``) and splits it into micro-batches;
4. optimizer and learning-rate schedule (`train.engine.optim`: AdamW, decay on matrices only);
5. one optimizer step: micro-batches with gradient accumulation, gradient clipping, the named statistics
   (`train.engine.stats.NamedSums`, one all-reduce) into the logging window, metrics every ``logging_steps``,
   held-out evaluation every ``eval_steps``;
6. checkpoints every ``save_steps`` (`train.checkpoint`: weights, `RewardTrainer.state_dict`, each process's RNG);
   ``--resume`` continues exactly;
7. the final model, saved with ``save_pretrained`` into the output folder (built under a temporary name, then
   published file by file, ``config.json`` and ``rlhfkit.json`` last), LoRA merged.

Processes come from `train.engine.processes` (accelerate; the model is wrapped by ``accelerator.prepare``, DDP; with
``--fsdp`` sharded by FSDP2 instead, `train.engine.sharding`).
Gradient accumulation is exact: the loss of a global batch is the mean over its examples (for multi_objective,
over its observed aspect targets), so each micro-batch's mean loss is weighted by ``n_micro / n_global`` and by
the number of processes (data-parallel gradients are averaged over processes); 1 process and N processes give the
same update up to float rounding. An incomplete last global batch of an epoch is skipped.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhfkit.config import save_config
from rlhfkit.core.losses import (
    mse_regression,
    multi_objective_regression,
    pairwise_logexp,
    pairwise_logsigmoid,
    pointwise_bce,
    pointwise_ce2,
    reward_centering,
    token_level_pairwise,
)
from rlhfkit.data.pointwise import load_pointwise
from rlhfkit.data.preference import load_preferences
from rlhfkit.data.tokenize import (
    LengthGroupedBatchSampler,
    PromptGroupedBatchSampler,
    collate_points,
    prompt_key,
    tokenize_pointwise,
)
from rlhfkit.errors import RlhfkitError, data_error
from rlhfkit.train.checkpoint import (check_format, check_resume_settings, read_training_checkpoint,
                                      require_latest_checkpoint, save_training_checkpoint, take_saved_settings)
from rlhfkit.train.engine.optim import ModuleGroup, build_optimizer, build_scheduler, trainable_parameters
from rlhfkit.train.engine.processes import Processes
from rlhfkit.train.engine.sharding import full_copy, gathered, gradient_sync, load_optimizer_state, optimizer_state
from rlhfkit.train.engine.stats import NamedSums
from rlhfkit.train.inputs import Callback, check_callbacks, given_once
from rlhfkit.train.output import check_fresh_output, prepare_fresh_output
from rlhfkit.train.rm_config import RANKER_KINDS, RMTrainConfig
from rlhfkit.train.rm_eval import (
    collate_pair_items,
    forward_pairs,
    pad_id_of,
    pair_length,
    pairwise_correct,
    pairwise_metrics,
    scoring_batches,
    to_device,
    tokenize_pairs,
    with_source,
)
from rlhfkit.utils import (MetricsLogger, atomic_write_json, progress, resolve_bf16, rng_state, set_rng_state,
                           set_seed, warn_if_slow_bf16)

CONFIG = RMTrainConfig
ENCODER_MODEL_TYPES = {"bert", "roberta", "deberta", "deberta-v2", "electra", "distilbert", "xlm-roberta",
                       "modernbert", "albert", "mpnet"}
RESUMABLE_CHANGES = {"resume", "overwrite", "save_steps", "keep_checkpoints"}
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "rlhfkit.json", "checkpoints", "tensorboard", "eval_results.json")


# ----------------------------------------------------------------------------------------------------------
# Objectives: how a kind of data becomes a micro-batch loss plus summed statistics
# ----------------------------------------------------------------------------------------------------------
@dataclass
class StepOut:
    loss: torch.Tensor  # mean over the micro-batch (the loss's own normaliser)
    sums: dict[str, torch.Tensor]  # per statistic name: its float64 sum over the micro-batch's examples
    diff: torch.Tensor | None = None  # pairwise: r_c - r_r per pair


class PairwiseObjective:
    """Preference pairs; reward models (chosen rows then rejected rows) or rankers (both orders, BCE).

    ``kind``: the resolved model kind (default ``cfg.model_kind``; `rm train` passes what 'auto' resolved to)."""

    def __init__(self, cfg: RMTrainConfig, pad_id: int, kind: str | None = None):
        self.loss_name = "ranker" if (kind or cfg.model_kind) in RANKER_KINDS else cfg.loss
        self.center = cfg.center_rewards_coef
        self.share_prompts = cfg.share_prompts
        self.packing = cfg.packing != "off"
        self.pad_id = pad_id
        self.names = ("accuracy", "margin") + (() if self.loss_name == "ranker" else ("chosen_mean", "rejected_mean"))
        self.trunk_cache = None  # a `models.trunk.TrunkCache` the reward model can use (`RewardTrainer`)

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        return collate_pair_items(items, self.pad_id)

    def weight(self, items: Sequence[Any]) -> float:
        return float(len(items))

    def step(self, model: Any, batch: dict[str, Any]) -> StepOut:
        diff, chosen, rejected, out = forward_pairs(model, batch, self.share_prompts, self.packing, self.trunk_cache)
        if self.loss_name == "ranker":  # out = logits of (c, r) rows then (r, c) rows
            half = out.shape[0] // 2
            labels = torch.cat([torch.ones(half), torch.zeros(half)]).to(out.device)
            loss = pointwise_bce(out, labels)
        elif self.loss_name == "token_level":
            half, mask = chosen.shape[0], batch["attention_mask"]
            loss = token_level_pairwise(out.token_scores[:half], mask[:half], out.token_scores[half:], mask[half:],
                                        batch["first_diff"])
        elif self.loss_name == "logexp":
            loss = pairwise_logexp(chosen, rejected)
        else:  # logsigmoid, or margin with the data's margins
            loss = pairwise_logsigmoid(chosen, rejected, batch["margin"] if self.loss_name == "margin" else None)
        if self.center > 0:
            loss = loss + reward_centering(chosen, rejected, self.center)
        d = diff.detach().double()
        sums = {"accuracy": pairwise_correct(d).sum(), "margin": d.sum()}
        if chosen is not None:
            sums.update(chosen_mean=chosen.detach().double().sum(), rejected_mean=rejected.detach().double().sum())
        return StepOut(loss, sums, d)


class PointwiseObjective:
    """One response per example: bce/ce2 (0/1 label), mse (score), multi_objective (aspect scores)."""

    def __init__(self, cfg: RMTrainConfig, pad_id: int, kind: str | None = None):
        self.loss_name = cfg.loss
        self.share_prompts = cfg.share_prompts
        self.packing = cfg.packing != "off"
        self.pad_id = pad_id
        self.names = (("accuracy",) if cfg.loss in ("bce", "ce2") else ()) + ("score_mean",)

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        return collate_points(items, self.pad_id)

    def weight(self, items: Sequence[Any]) -> float:
        if self.loss_name == "multi_objective":  # the loss is a mean over observed (example, aspect) targets
            return float(sum(sum(p.scores_mask) for p in items))
        return float(len(items))

    def step(self, model: Any, batch: dict[str, Any]) -> StepOut:
        out = model(batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                    share_prompts=self.share_prompts, packing=self.packing)
        sums = {}
        if self.loss_name in ("bce", "ce2"):
            labels = batch["labels"]
            loss = pointwise_bce(out.scores, labels) if self.loss_name == "bce" else pointwise_ce2(out.aspect_scores,
                                                                                                    labels)
            # ce2: score = z_good - z_bad (aspect weights [-1, 1]); right when its sign matches the label
            sums["accuracy"] = pairwise_correct(out.scores.detach().double() * (2 * labels.double() - 1)).sum()
        elif self.loss_name == "mse":
            loss = mse_regression(out.scores, batch["scores"])
        else:
            pred = out.aspect_scores if out.aspect_scores is not None else out.scores[:, None]
            loss = multi_objective_regression(pred, batch["scores"], batch["scores_mask"])
        sums["score_mean"] = out.scores.detach().double().sum()
        return StepOut(loss, sums)


# ----------------------------------------------------------------------------------------------------------
# Step 1: data
# ----------------------------------------------------------------------------------------------------------
def _check_targets(examples: Sequence[Any], cfg: RMTrainConfig, source: str) -> None:
    """The loss's required column is present on every row (the loaders check types and values)."""
    need = {"margin": "margin", "bce": "label", "ce2": "label", "mse": "score", "multi_objective": "scores"}
    field = need.get(cfg.loss)
    if field is None or cfg.model_kind in RANKER_KINDS:
        return
    for i, ex in enumerate(examples, start=1):
        if getattr(ex, field) is None:
            what = {"margin": "a numeric 'margin'", "label": "a 0/1 'label'", "score": "a numeric 'score'",
                    "scores": f"aspect scores {cfg.aspects}"}[field]
            raise data_error(source, ex.row or i, field, f"loss={cfg.loss} needs {what} on every row")


def data_sources(cfg: RMTrainConfig, data: Any = None, eval_data: Any = None) -> tuple[Any, Any]:
    """The training and held-out data: the config's paths, or in-memory rows (a list of dicts or a
    ``datasets.Dataset``, the Python API's `RewardTrainer`) given instead; each at most once."""
    given_once("data", cfg.data, data, "set RMTrainConfig.data (CLI --data) or pass RewardTrainer(data=...), a path, "
               "a list of dicts or a datasets.Dataset", "RMTrainConfig", "RewardTrainer")
    given_once("eval_data", cfg.eval_data, eval_data, None, "RMTrainConfig", "RewardTrainer")
    return (data if data is not None else cfg.data), (eval_data if eval_data is not None else (cfg.eval_data or None))


def source_label(source: Any, name: str) -> Any:
    """What errors call a data source: its path, or the argument name of in-memory rows."""
    return source if isinstance(source, (str, os.PathLike)) else name


def load_examples(cfg: RMTrainConfig, data: Any = None, eval_data: Any = None) -> tuple[list, list, Any]:
    """Validated training and held-out examples (held-out: --eval_data, else a seeded --eval_fraction split);
    ``data`` / ``eval_data``: in-memory rows instead of the config's paths (`data_sources`)."""
    train_source, eval_source = data_sources(cfg, data, eval_data)
    if cfg.pairwise:
        def load(source: Any, name: str) -> list:
            examples = load_preferences(source, skip_invalid=cfg.skip_invalid, name=name)
            if examples.skipped:
                print(f"skipped {len(examples.skipped)} invalid row(s) of {source_label(source, name)}: "
                      + "; ".join(examples.skipped[:5]) + (" ..." if len(examples.skipped) > 5 else ""))
            return examples
    else:
        def load(source: Any, name: str) -> list:
            return load_pointwise(source, aspects=cfg.aspects if cfg.loss == "multi_objective" else None, name=name)
    label = source_label(train_source, "data")
    train = list(load(train_source, "data"))
    _check_targets(train, cfg, label)
    if eval_source is not None:
        eval_label = source_label(eval_source, "eval_data")
        held_out = list(load(eval_source, "eval_data"))
        _check_targets(held_out, cfg, eval_label)
        return train, held_out, eval_label
    if cfg.eval_fraction == 0:
        return train, [], None
    n_eval = max(1, round(len(train) * cfg.eval_fraction))
    if n_eval >= len(train):
        raise RlhfkitError(f"{label}: {len(train)} rows are too few to hold out eval_fraction="
                           f"{cfg.eval_fraction}; add rows, pass --eval_data, or set --eval_fraction 0")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    eval_idx = set(perm[:n_eval])
    return ([ex for i, ex in enumerate(train) if i not in eval_idx],
            [ex for i, ex in enumerate(train) if i in eval_idx], label)


def tokenize_examples(cfg: RMTrainConfig, tokenizer: Any, examples: Sequence[Any], source: str,
                      kind: str | None = None) -> tuple[list, Any]:
    """Tokenised items for the (resolved) model ``kind`` (default ``cfg.model_kind``); errors name ``source``."""
    kind = kind or cfg.model_kind
    if cfg.pairwise:
        items, report = tokenize_pairs(kind if kind in RANKER_KINDS else None, tokenizer, examples, cfg.max_length,
                                       cfg.overlong, source)
        if cfg.loss == "token_level":
            for p in items:
                if p.chosen_ids == p.rejected_ids:
                    raise data_error(source, p.row, "rejected", "tokenises to the same ids as 'chosen' (after "
                                                                "truncation); loss=token_level needs a difference")
        return items, report
    try:
        return tokenize_pointwise(tokenizer, examples, cfg.max_length, cfg.overlong)
    except RlhfkitError as e:
        raise with_source(e, source) from None


# ----------------------------------------------------------------------------------------------------------
# Step 2: model
# ----------------------------------------------------------------------------------------------------------
def resolve_kind(cfg: RMTrainConfig) -> str:
    """decoder / encoder / pairrm / seq2seq; 'auto' looks at the model's config (an encoder-decoder config: seq2seq;
    encoders: BERT-like model types; else decoder) and then holds the settings to the detected kind's rules
    (`RMTrainConfig.check_model_kind`)."""
    if cfg.model_kind != "auto":
        return cfg.model_kind
    from transformers import AutoConfig

    from rlhfkit.models.loading import hf_folder

    config = AutoConfig.from_pretrained(hf_folder(cfg.model), trust_remote_code=cfg.trust_remote_code)
    archs = config.architectures or []
    encoder = config.model_type in ENCODER_MODEL_TYPES or any(a.endswith("ForMaskedLM") for a in archs)
    kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "encoder" if encoder else "decoder"
    cfg.check_model_kind(kind)
    return kind


def build_model(cfg: RMTrainConfig, kind: str, tokenizer: Any) -> torch.nn.Module:
    """A new reward model / ranker with a seeded head, LoRA, frozen layers and gradient checkpointing applied."""
    from rlhfkit.models.adapters import apply_lora, freeze_lower_layers
    from rlhfkit.models.pairrm import PairRanker
    from rlhfkit.models.reward import RewardModel, unwrap_peft
    from rlhfkit.models.seq2seq import Seq2SeqRanker

    set_seed(cfg.seed)
    common = dict(tokenizer=tokenizer, trust_remote_code=cfg.trust_remote_code)
    rm = None  # the RewardModel holding the transformer (none for the seq2seq kind: `model.model` is it)
    if kind == "pairrm":
        model = PairRanker.from_backbone(cfg.model, max_length=cfg.max_length, **common)
        rm = model.rm
    elif kind == "seq2seq":
        model = Seq2SeqRanker.from_backbone(cfg.model, max_length=cfg.max_length, **common)
    else:
        aspects: dict[str, Any] = {}
        if cfg.loss == "ce2":  # two logits; the scalar score is z_good - z_bad
            aspects = dict(num_aspects=2, aspect_names=["bad", "good"], aspect_weights=[-1.0, 1.0])
        elif cfg.loss == "multi_objective":
            aspects = dict(num_aspects=len(cfg.aspects), aspect_names=cfg.aspects, aspect_weights=cfg.aspect_weights)
        aggregation = cfg.aggregation if kind == "decoder" else cfg.pooling
        model = rm = RewardModel.from_backbone(cfg.model, kind=kind, aggregation=aggregation, **aspects, **common)
    if cfg.lora_r > 0 and kind == "seq2seq":  # a peft model around the transformers model (its LM head not adapted)
        model.model = apply_lora(model.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    elif cfg.lora_r > 0:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.freeze_layers == -1:  # the head only (decoder: `score`, encoder: `head`); also final norms and adapters
        for name, p in model.named_parameters():
            if not {"score", "head"} & set(name.split(".")):
                p.requires_grad_(False)
    elif cfg.freeze_layers > 0:
        freeze_lower_layers(model, cfg.freeze_layers)
    if cfg.packing == "on" and rm is not None and rm.packing_problem() is not None:
        raise RlhfkitError(f"--packing on: {cfg.model} cannot be packed padding-free: {rm.packing_problem()}; use "
                           f"--packing auto or off")
    if cfg.gradient_checkpointing:
        hf = unwrap_peft(rm.model if rm is not None else model.model)
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ----------------------------------------------------------------------------------------------------------
# Output folder, checkpoints, final save
# ----------------------------------------------------------------------------------------------------------
def check_output(cfg: RMTrainConfig) -> Path | None:
    """The checkpoint to resume from (``--resume``: checked against the config), or None for a fresh run, whose
    folder `train.output.check_fresh_output` checks (the run owns the folder: the model is published into it)."""
    out = Path(cfg.output)
    if cfg.resume:
        ckpt = require_latest_checkpoint(out)
        check_format(ckpt)
        check_resume_settings(cfg, ckpt, RESUMABLE_CHANGES)
        return ckpt
    check_fresh_output(out, RUN_ENTRIES, cfg.overwrite, owns_folder=True)
    return None


def check_resume_length(state: dict, total_steps: int, train_examples: int, data: str) -> None:
    """Refuse to resume when the run's length or batch order would differ from the checkpoint's: the learning-rate
    schedule (its warm-up and decay) is spread over ``total_steps`` and the batch order is drawn over the training
    examples, so another count (the data file changed) would not continue the checkpoint's run. Checkpoints
    written before these counts were saved are not checked."""
    steps, examples = state.get("total_steps", total_steps), state.get("train_examples", train_examples)
    if (steps, examples) != (total_steps, train_examples):
        raise RlhfkitError(f"--resume: {data} now gives {train_examples} training examples and {total_steps} "
                           f"optimizer steps, the checkpoint's run had {examples} examples and {steps} steps; the "
                           f"learning-rate schedule and the batch order depend on both, so resume with the same "
                           f"training data (or start a new run)")


def publish_model(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    """save_pretrained into a temporary folder inside `out`, then move the files in (config/metadata last)."""
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".model.tmp-"))
    try:
        model.save_pretrained(tmp, tokenizer)
        last = {"config.json": 1, "rlhfkit.json": 2}
        for f in sorted(tmp.iterdir(), key=lambda p: last.get(p.name, 0)):
            target = out / f.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Statistics and evaluation
# ----------------------------------------------------------------------------------------------------------
def micro_batch_sums(out: StepOut, weight: float, count: int) -> NamedSums:
    """A micro-batch's named statistics: ``loss`` as a mean weighted by ``weight`` (examples, or observed targets),
    each of the objective's sums (`StepOut.sums`) as a mean over its ``count`` examples."""
    sums = NamedSums()
    sums.add("loss", out.loss.item() * weight, weight)
    for name, total in out.sums.items():
        sums.add(name, total, count)
    return sums


@torch.no_grad()
def evaluate(model: Any, objective: Any, items: Sequence[Any], procs: Processes, micro_batch_size: int,
             bf16: bool) -> tuple[dict[str, float], list[float]]:
    """Held-out metrics over all processes (each scores a shard); also the per-pair diffs (pairwise)."""
    device = procs.device
    batches = scoring_batches(items, micro_batch_size)  # longest first, a prompt's pairs together
    sums = NamedSums()
    diffs: list[float] = []
    model.eval()
    for indices in batches[procs.rank::procs.world_size]:
        chunk = [items[i] for i in indices]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = objective.step(model, to_device(objective.collate(chunk), device))
        sums.update(micro_batch_sums(out, objective.weight(chunk), len(chunk)))
        if out.diff is not None:
            diffs += out.diff.tolist()
    model.train()
    metrics = sums.reduce(procs).values("eval")
    if procs.distributed:
        diffs = [d for part in procs.gather_object(diffs) for d in part]
    return metrics, diffs


def backward_global_batch(model: Any, objective: Any, micro_batches: Sequence[Sequence[Any]], total_weight: float,
                          accelerator: Any, bf16: bool) -> NamedSums:
    """Accumulate into ``.grad`` this process's share of the gradient of the global batch's mean loss.

    Each micro-batch's mean loss is weighted by ``w_micro / w_global`` (w = examples, or observed targets), times
    the number of processes because data-parallel gradients are averaged over processes; gradients are
    all-reduced only after the last micro-batch. Returns this process's statistics (`micro_batch_sums`, plus
    ``tokens``: the sum of the attention masks).
    """
    device, n_proc = accelerator.device, accelerator.num_processes
    sums = NamedSums()
    for k, items in enumerate(micro_batches):
        batch = to_device(objective.collate(items), device)
        w = objective.weight(items)
        last = k == len(micro_batches) - 1
        with accelerator.no_sync(model) if not last else nullcontext(), gradient_sync([model], last):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = objective.step(model, batch)
            accelerator.backward(out.loss * (w * n_proc / total_weight))
        sums.update(micro_batch_sums(out, w, len(items)))
        sums.add("tokens", batch["attention_mask"].sum())
    return sums


def model_source(cfg: RMTrainConfig, model: Any, tokenizer: Any) -> tuple[RMTrainConfig, Any]:
    """The backbone, given once: the config's path, or `RewardTrainer`'s ``model`` argument, a path (which then
    fills the config) or a transformers model object with its ``tokenizer`` (returned second: the caller saves it
    into a temporary folder and builds from there as from a path; None for a path)."""
    given_once("model", cfg.model, model, "set RMTrainConfig.model (CLI --model) or pass RewardTrainer(model=...), "
               "a path or a model object with its tokenizer", "RMTrainConfig", "RewardTrainer")
    if model is None or isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise RlhfkitError("tokenizer goes with a model object; a model path brings its own tokenizer")
        return (cfg if model is None else replace(cfg, model=str(model))), None
    if not hasattr(model, "save_pretrained"):
        raise RlhfkitError(f"model must be a path or a transformers model, got {type(model).__name__}")
    if tokenizer is None:
        raise RlhfkitError("a model object needs its tokenizer: pass RewardTrainer(model=model, tokenizer=tokenizer)")
    if cfg.resume:
        raise RlhfkitError("resume needs the model as a path (a model object is saved to a new temporary folder by "
                           "each run); pass RMTrainConfig.model")
    return cfg, model


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
class RewardTrainer:
    """The models, optimizer and state of an ``rm train`` run; `train` runs it, `step` runs one optimizer step.

    The Python API (``from rlhfkit import RewardTrainer``; docs/api.md) and the command's layer (`run`) both build
    this class. ``config``: an `RMTrainConfig` (every knob of ``rlhfkit rm train``); its ``model``, ``data`` and
    ``eval_data`` may be left out of it and given here instead, each exactly once (`train.inputs.given_once`):

    * ``model``: a path, or a transformers model object (the backbone, e.g. an ``AutoModelForCausalLM``) with its
      ``tokenizer``: its weights are saved into a temporary folder during construction, from which the reward
      model is built as from a path (the object itself is not modified; the run's ``config.yaml`` names that
      folder, and ``resume`` needs a path);
    * ``data`` / ``eval_data``: a path, a list of dicts or a ``datasets.Dataset`` (each row validated like a file's
      row; errors name ``data, row N, field '...'`` and nothing is written);
    * ``callbacks``: each called as ``callback(step, metrics)`` with every logged metrics row (``rm/*``,
      ``eval/*``, ...); one that raises stops the run with an `RlhfkitError` naming it;
    * ``trunk_cache``: a `models.trunk.TrunkCache` of states after the lowest blocks of a decoder that the reward
      model's backbone shares bit for bit and keeps frozen (e.g. the SFT model's states captured while it sampled
      the responses, as the quickstart does): the rows it holds skip those blocks, the same loss and gradients to
      float rounding. Used by a decoder reward model on pairs in one process; otherwise (or if
      `TrunkCache.usable_for` refuses the backbone) the run says why and computes every row.

    Construction runs steps 1-4 (and, with ``--resume``, restores the latest checkpoint) and writes nothing, so a
    bad input fails before the output folder is touched.
    """

    def __init__(self, config: RMTrainConfig, procs: Processes | None = None, *, model: Any = None,
                 tokenizer: Any = None, data: Any = None, eval_data: Any = None,
                 callbacks: Sequence[Callback] = (), trunk_cache: Any = None) -> None:
        if not isinstance(config, RMTrainConfig):
            raise RlhfkitError(f"config must be an RMTrainConfig, got {type(config).__name__}")
        # every input given once, before the processes and the output folder
        cfg, model_object = model_source(config, model, tokenizer)
        self.train_source = source_label(data_sources(cfg, data, eval_data)[0], "data")  # what errors call it
        self.callbacks = check_callbacks(callbacks)
        self.trunk_cache = trunk_cache
        if model_object is None:
            self._build(cfg, procs, data, eval_data)
            return
        with tempfile.TemporaryDirectory(prefix="rlhfkit-model-") as folder:
            model_object.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            self._build(replace(cfg, model=folder), procs, data, eval_data)

    def _build(self, cfg: RMTrainConfig, procs: Processes | None, data: Any, eval_data: Any) -> None:
        """Steps 1-4 from the resolved config (``cfg.model`` a path)."""
        from rlhfkit.models.loading import load_tokenizer

        train_source = self.train_source
        self.cfg = cfg
        self.procs = procs = procs or Processes.start("rm train")
        take_saved_settings(cfg)  # --resume: the checkpoint's resolved precision
        cfg.bf16 = resolve_bf16(cfg.bf16, procs.device)  # unset: the device's default (config.yaml records it)
        if procs.is_main:
            warn_if_slow_bf16(cfg.bf16, procs.device, "rm train --bf16")
        n_proc = procs.world_size
        if cfg.batch_size % (cfg.micro_batch_size * n_proc):
            raise RlhfkitError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size × processes = "
                               f"{cfg.micro_batch_size} × {n_proc}")
        self.output = Path(cfg.output)
        self.resume_from = check_output(cfg)
        kind = resolve_kind(cfg)  # 'auto' -> decoder / encoder / seq2seq, checked against the settings first

        # 1. Data: load and validate everything, split, tokenise (errors name file, row and field).
        train_ex, eval_ex, eval_source = load_examples(cfg, data, eval_data)
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.train_items, report = tokenize_examples(cfg, self.tokenizer, train_ex, train_source, kind)
        self.eval_items, eval_report = tokenize_examples(cfg, self.tokenizer, eval_ex, eval_source, kind) if eval_ex \
            else ([], None)
        if procs.is_main:
            accumulation = cfg.batch_size // (cfg.micro_batch_size * n_proc)
            print(f"processes: {n_proc}; {cfg.batch_size} examples per optimizer step = {n_proc} process(es) × "
                  f"{accumulation} micro-batch(es) × {cfg.micro_batch_size}")
            print(f"train: {report.describe()}")
            if eval_report is not None:
                print(f"eval:  {eval_report.describe()}")
        self.steps_per_epoch = len(self.train_items) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise RlhfkitError(f"{train_source}: {len(self.train_items)} training examples, fewer than batch_size="
                               f"{cfg.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.epochs

        # 2. Tokenizer and model (seeded head; LoRA; frozen layers).
        model = build_model(cfg, kind, self.tokenizer)
        self.objective = (PairwiseObjective if cfg.pairwise else PointwiseObjective)(cfg, pad_id_of(model), kind)
        model.train()
        model = procs.shard(model, cfg.fsdp, reduce="mean")  # --fsdp: FSDP2 (gradients averaged, as DDP's)

        # 3. Batch plan: a seeded (length-grouped) order of global batches; process `rank` takes its shard.
        if cfg.group_by_prompt:  # K-wise: a prompt's pairs in one batch, each distinct sequence run once
            self.sampler = PromptGroupedBatchSampler([prompt_key(it) for it in self.train_items], cfg.batch_size,
                                                     cfg.seed, drop_last=True)
        else:
            self.sampler = LengthGroupedBatchSampler([pair_length(it) for it in self.train_items],
                                                     cfg.batch_size, cfg.seed, drop_last=True,
                                                     group_size_multiplier=50 if cfg.group_by_length else 1)

        # 4. Optimizer (decay on matrices only) and learning-rate schedule.
        self.trainable = [p for _, p in trainable_parameters(model)]
        self.optimizer = build_optimizer([ModuleGroup("model", model, cfg.learning_rate)], cfg.weight_decay)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = build_scheduler(cfg.lr_scheduler, self.optimizer, warmup, self.total_steps)

        # the run's position and its logging window (global sums since the last logged step)
        self.step_count, self.epoch, self.next_batch = 0, 0, 0
        self.window = NamedSums()
        self.window_tokens, self.t_window = 0.0, time.perf_counter()
        if self.resume_from is not None:
            _, state, rank_state = read_training_checkpoint(procs, self.resume_from, "rm train", {"model": model},
                                                            same_processes=False, optimizers={"model": self.optimizer})
            self.load_state_dict(state)
            set_rng_state(rank_state)
        self.unwrapped = model
        self.model = procs.wrap(model)
        if self.trunk_cache is not None:  # states of the frozen lower blocks computed elsewhere (the sampler),
            from rlhfkit.models.reward import RewardModel  # checked where the model now lives

            why = ("it applies to decoder reward models trained on pairs in one process" if not (
                cfg.pairwise and kind == "decoder" and isinstance(model, RewardModel) and n_proc == 1 and not cfg.fsdp)
                   else self.trunk_cache.usable_for(model._backbone(), autocast_dtype=torch.bfloat16 if cfg.bf16
                                                    else None))
            if why is None:
                self.objective.trunk_cache = self.trunk_cache
            elif procs.is_main:
                print(f"trunk_cache not used: {why}")
        self.eval_metrics: dict[str, float] = {}
        self.last_eval_diffs: list[float] = []
        self.logger: MetricsLogger | None = None

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights and the RNG that a resumed run needs: the run's position (optimizer steps
        done; the epoch and the next global batch of it), its logging window, the optimizer and schedule, and the
        counts a resume is checked against."""
        return {"step": self.step_count, "epoch": self.epoch, "next_batch": self.next_batch,
                "window": self.window.state_dict(), "total_steps": self.total_steps,
                "train_examples": len(self.train_items), "optimizer": optimizer_state(self.optimizer),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resume_length(state, self.total_steps, len(self.train_items), self.train_source)
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count, self.epoch, self.next_batch = int(state["step"]), int(state["epoch"]), int(state["next_batch"])
        self.window = NamedSums.from_state_dict(state["window"])

    # -- one optimizer step ----------------------------------------------------------------------------------
    def step(self, epoch: int, b: int, indices: Sequence[int]) -> dict[str, float]:
        """The optimizer step on global batch ``b`` of ``epoch`` (the training items ``indices``); returns its
        metrics row (empty when none is due)."""
        cfg, procs, objective = self.cfg, self.procs, self.objective
        # 5a. this process's shard of the global batch, in micro-batches: K-wise batches shard contiguously (a
        # prompt's pairs stay on one process), others interleave
        global_items = [self.train_items[i] for i in indices]
        rank, n_proc = procs.rank, procs.world_size
        shard = (global_items[rank * len(global_items) // n_proc:(rank + 1) * len(global_items) // n_proc]
                 if cfg.group_by_prompt else global_items[rank::n_proc])
        micro = [shard[i: i + cfg.micro_batch_size] for i in range(0, len(shard), cfg.micro_batch_size)]
        # 5b. forward and backward, accumulated over the micro-batches (exact: see the module docstring)
        sums = backward_global_batch(self.model, objective, micro, objective.weight(global_items), procs.accelerator,
                                     cfg.bf16)
        # 5c. gradient clipping, optimizer and schedule step
        grad_norm = procs.clip_grad_norm_(self.trainable, cfg.max_grad_norm or float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        step = self.step_count
        # 5d. statistics: one all-reduce by name, added to the logging window
        sums = sums.reduce(procs)
        self.window_tokens += sums.pop("tokens")
        self.window.update(sums)
        self.window.add("grad_norm", float(grad_norm), 1)
        # 5e. the window's metrics every logging_steps; held-out metrics every eval_steps
        row: dict[str, float] = {}
        if step % cfg.logging_steps == 0 or step == self.total_steps:
            row.update(self.window_metrics(lr, step))
        if self.eval_items and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == self.total_steps):
            with gathered(self.unwrapped):  # --fsdp: uneven shards, no collective per forward
                self.eval_metrics, self.last_eval_diffs = evaluate(self.unwrapped, objective, self.eval_items, procs,
                                                                   cfg.micro_batch_size, cfg.bf16)
            row.update(self.eval_metrics)
        # 6. checkpoint (position = the next batch of this epoch)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < self.total_steps:
            self.epoch, self.next_batch = epoch, b + 1
            save_training_checkpoint(procs, self.output, step, cfg.keep_checkpoints, command="rm train",
                                     models={"model": self.unwrapped}, optimizers={"model": self.optimizer},
                                     state=self.state_dict(), rank_state=rng_state(), config=cfg)
        return row

    def window_metrics(self, lr: float, step: int) -> dict[str, float]:
        """The logging window's metrics (``rm/*``, ``train/*``, throughput), then a new window."""
        elapsed = time.perf_counter() - self.t_window
        steps = self.window.weight("grad_norm")
        row = {k: v for k, v in self.window.values("rm").items() if k != "rm/grad_norm"}
        row.update({"train/lr": lr, "train/grad_norm": self.window.value("grad_norm"),
                    "train/epoch": step / self.steps_per_epoch,
                    "throughput/tokens_per_s": self.window_tokens / elapsed, "time/step": elapsed / steps})
        self.window = NamedSums()
        self.window_tokens, self.t_window = 0.0, time.perf_counter()
        return row

    # -- the run ---------------------------------------------------------------------------------------------
    def open_output(self) -> None:
        """The run folder, written only now that every check passed: config.yaml and the metrics log."""
        cfg, procs = self.cfg, self.procs
        if procs.is_main:
            if not cfg.resume:
                prepare_fresh_output(self.output, RUN_ENTRIES, cfg.overwrite, owns_folder=True)
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "config.yaml")
        procs.barrier()
        self.logger = MetricsLogger(self.output / "metrics.jsonl", self.output / "tensorboard", enabled=procs.is_main,
                                    resume_step=self.step_count if self.resume_from is not None else None,
                                    callbacks=self.callbacks)

    def train(self) -> dict[str, float]:
        """Run (or continue) the training; returns the last held-out metrics (empty without)."""
        cfg, procs = self.cfg, self.procs
        self.open_output()
        bar = progress(total=self.total_steps, initial=self.step_count, desc="rm train", enabled=procs.is_main)
        start_epoch, start_batch = self.epoch, self.next_batch
        for epoch in range(start_epoch, cfg.epochs):
            batches = self.sampler.batches(epoch)
            for b in range(start_batch if epoch == start_epoch else 0, len(batches)):
                row = self.step(epoch, b, batches[b])
                bar.update(1)
                if "rm/loss" in row:
                    bar.set_postfix(loss=f"{row['rm/loss']:.4f}", **({"acc": f"{row['rm/accuracy']:.3f}"}
                                                                     if "rm/accuracy" in row else {}))
                if row:
                    self.logger.log(self.step_count, row)
        bar.close()
        self.logger.close()
        cache = getattr(self.objective, "trunk_cache", None)
        if cache is not None and procs.is_main:
            print(f"trunk_cache: {cache.hits} of {cache.hits + cache.misses} rows ran only the blocks above "
                  f"{cache.layers}")
        # 7. Final model (LoRA merged), published atomically; final held-out metrics as JSON.
        final = full_copy(self.unwrapped, procs)  # --fsdp: the full weights on process 0 (collective)
        if procs.is_main:
            publish_model(final, self.tokenizer, self.output)
            if self.eval_metrics:
                summary = dict(self.eval_metrics)
                if self.last_eval_diffs:
                    summary.update({f"eval/{k}": v
                                    for k, v in pairwise_metrics(torch.tensor(self.last_eval_diffs)).items()})
                atomic_write_json(self.output / "eval_results.json", {"step": self.total_steps, **summary})
                print("final held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in self.eval_metrics.items()))
        procs.barrier()
        return self.eval_metrics


def run(cfg: RMTrainConfig) -> dict[str, float]:
    """The ``rlhfkit rm train`` command (see the module docstring for the steps): `RewardTrainer` on the config;
    returns the last held-out metrics (empty without)."""
    return RewardTrainer(cfg).train()
