"""``rlhfkit rm train``: train a reward model (or a PairRM ranker) on preference or pointwise data.

The run reads as numbered steps (see :func:`run`):

1. load and validate the data (every error before any training; the over-long report is printed), split off the
   held-out set, tokenise;
2. tokenizer and model (LoRA, frozen layers, gradient checkpointing);
3. the batch plan: a seeded, length-grouped order of global batches; each process takes its shard
   (``batch[rank::num_processes]``) and splits it into micro-batches;
4. optimizer (AdamW) and learning-rate schedule (``transformers.get_scheduler``);
5. the loop: epochs × optimizer steps × micro-batches with gradient accumulation, gradient clipping, metrics,
   held-out evaluation every ``eval_steps``;
6. checkpoints every ``save_steps`` (``train/checkpoint.py``); ``--resume`` continues exactly;
7. the final model, saved with ``save_pretrained`` into the output folder (built under a temporary name, then
   published file by file, ``config.json`` and ``rlhfkit.json`` last), LoRA merged.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from rlhfkit.config import changed_settings, config_to_dict, save_config
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
from rlhfkit.train.checkpoint import load_state, require_latest_checkpoint, save_checkpoint, save_state
from rlhfkit.train.rm_config import RMTrainConfig
from rlhfkit.train.rm_eval import (
    collate_pair_items,
    forward_pairs,
    pad_id_of,
    pair_length,
    pairwise_correct,
    pairwise_metrics,
    to_device,
    tokenize_pairs,
    with_source,
)
from rlhfkit.utils import (MetricsLogger, atomic_write_json, progress, rng_state, set_rng_state, set_seed,
                           warn_if_slow_bf16)

CONFIG = RMTrainConfig
ENCODER_MODEL_TYPES = {"bert", "roberta", "deberta", "deberta-v2", "electra", "distilbert", "xlm-roberta",
                       "modernbert", "albert", "mpnet"}
RESUMABLE_CHANGES = {"resume", "overwrite", "save_steps", "keep_checkpoints"}
RUN_FILES = ("config.yaml", "metrics.jsonl", "rlhfkit.json", "checkpoints")


# ----------------------------------------------------------------------------------------------------------
# Objectives: how a kind of data becomes a micro-batch loss plus summed statistics
# ----------------------------------------------------------------------------------------------------------
@dataclass
class StepOut:
    loss: torch.Tensor  # mean over the micro-batch (the loss's own normaliser)
    sums: torch.Tensor  # (len(names),) float64 sums over the micro-batch's examples
    diff: torch.Tensor | None = None  # pairwise: r_c - r_r per pair


class PairwiseObjective:
    """Preference pairs; reward models (chosen rows then rejected rows) or PairRM (both orders, BCE)."""

    def __init__(self, cfg: RMTrainConfig, pad_id: int):
        self.loss_name = "pairrm" if cfg.model_kind == "pairrm" else cfg.loss
        self.center = cfg.center_rewards_coef
        self.share_prompts = cfg.share_prompts
        self.packing = cfg.packing != "off"
        self.pad_id = pad_id
        self.names = ("accuracy", "margin") + (() if self.loss_name == "pairrm" else ("chosen_mean", "rejected_mean"))

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        return collate_pair_items(items, self.pad_id)

    def weight(self, items: Sequence[Any]) -> float:
        return float(len(items))

    def step(self, model: Any, batch: dict[str, Any]) -> StepOut:
        diff, chosen, rejected, out = forward_pairs(model, batch, self.share_prompts, self.packing)
        if self.loss_name == "pairrm":  # out = logits of (c, r) rows then (r, c) rows
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
        sums = [pairwise_correct(d).sum(), d.sum()]
        if chosen is not None:
            sums += [chosen.detach().double().sum(), rejected.detach().double().sum()]
        return StepOut(loss, torch.stack(sums), d)


class PointwiseObjective:
    """One response per example: bce/ce2 (0/1 label), mse (score), multi_objective (aspect scores)."""

    def __init__(self, cfg: RMTrainConfig, pad_id: int):
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
        sums = []
        if self.loss_name in ("bce", "ce2"):
            labels = batch["labels"]
            loss = pointwise_bce(out.scores, labels) if self.loss_name == "bce" else pointwise_ce2(out.aspect_scores,
                                                                                                    labels)
            # ce2: score = z_good - z_bad (aspect weights [-1, 1]); right when its sign matches the label
            sums.append(pairwise_correct(out.scores.detach().double() * (2 * labels.double() - 1)).sum())
        elif self.loss_name == "mse":
            loss = mse_regression(out.scores, batch["scores"])
        else:
            pred = out.aspect_scores if out.aspect_scores is not None else out.scores[:, None]
            loss = multi_objective_regression(pred, batch["scores"], batch["scores_mask"])
        sums.append(out.scores.detach().double().sum())
        return StepOut(loss, torch.stack(sums))


# ----------------------------------------------------------------------------------------------------------
# Step 1: data
# ----------------------------------------------------------------------------------------------------------
def _check_targets(examples: Sequence[Any], cfg: RMTrainConfig, source: str) -> None:
    """The loss's required column is present on every row (the loaders check types and values)."""
    need = {"margin": "margin", "bce": "label", "ce2": "label", "mse": "score", "multi_objective": "scores"}
    field = need.get(cfg.loss)
    if field is None or cfg.model_kind == "pairrm":
        return
    for i, ex in enumerate(examples, start=1):
        if getattr(ex, field) is None:
            what = {"margin": "a numeric 'margin'", "label": "a 0/1 'label'", "score": "a numeric 'score'",
                    "scores": f"aspect scores {cfg.aspects}"}[field]
            raise data_error(source, ex.row or i, field, f"loss={cfg.loss} needs {what} on every row")


def data_sources(cfg: RMTrainConfig, data: Any = None, eval_data: Any = None) -> tuple[Any, Any]:
    """The training and held-out data: the config's paths, or in-memory rows (a list of dicts or a
    ``datasets.Dataset``, the Python API's `RewardTrainer`) given instead; each at most once."""
    for name, given in (("data", data), ("eval_data", eval_data)):
        if given is not None and getattr(cfg, name) is not None:
            raise RlhfkitError(f"{name} is given twice, as RMTrainConfig.{name}={getattr(cfg, name)!r} and as an "
                               f"argument; give it once")
    train = data if data is not None else cfg.data
    if train is None:
        raise RlhfkitError("data is required (RMTrainConfig.data, --data, or RewardTrainer(data=...))")
    return train, eval_data if eval_data is not None else (cfg.eval_data or None)


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


def tokenize_examples(cfg: RMTrainConfig, tokenizer: Any, examples: Sequence[Any], source: str) -> tuple[list, Any]:
    if cfg.pairwise:
        items, report = tokenize_pairs(cfg.model_kind == "pairrm", tokenizer, examples, cfg.max_length, cfg.overlong,
                                       source)
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
    """decoder / encoder / pairrm; 'auto' looks at the model's config (encoders: BERT-like model types) and then
    holds the settings to the detected kind's rules (`RMTrainConfig.check_model_kind`)."""
    if cfg.model_kind != "auto":
        return cfg.model_kind
    from transformers import AutoConfig

    from rlhfkit.models.loading import hf_folder

    config = AutoConfig.from_pretrained(hf_folder(cfg.model), trust_remote_code=cfg.trust_remote_code)
    archs = config.architectures or []
    encoder = config.model_type in ENCODER_MODEL_TYPES or any(a.endswith("ForMaskedLM") for a in archs)
    kind = "encoder" if encoder else "decoder"
    cfg.check_model_kind(kind)
    return kind


def build_model(cfg: RMTrainConfig, kind: str, tokenizer: Any) -> torch.nn.Module:
    """A new reward model / ranker with a seeded head, LoRA, frozen layers and gradient checkpointing applied."""
    from rlhfkit.models.adapters import apply_lora, freeze_lower_layers
    from rlhfkit.models.pairrm import PairRanker
    from rlhfkit.models.reward import RewardModel, unwrap_peft

    set_seed(cfg.seed)
    common = dict(tokenizer=tokenizer, trust_remote_code=cfg.trust_remote_code)
    if kind == "pairrm":
        model = PairRanker.from_backbone(cfg.model, max_length=cfg.max_length, **common)
        rm = model.rm
    else:
        aspects: dict[str, Any] = {}
        if cfg.loss == "ce2":  # two logits; the scalar score is z_good - z_bad
            aspects = dict(num_aspects=2, aspect_names=["bad", "good"], aspect_weights=[-1.0, 1.0])
        elif cfg.loss == "multi_objective":
            aspects = dict(num_aspects=len(cfg.aspects), aspect_names=cfg.aspects, aspect_weights=cfg.aspect_weights)
        aggregation = cfg.aggregation if kind == "decoder" else cfg.pooling
        model = rm = RewardModel.from_backbone(cfg.model, kind=kind, aggregation=aggregation, **aspects, **common)
    if cfg.lora_r > 0:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.freeze_layers == -1:  # the head only (decoder: `score`, encoder: `head`); also final norms and adapters
        for name, p in model.named_parameters():
            if not {"score", "head"} & set(name.split(".")):
                p.requires_grad_(False)
    elif cfg.freeze_layers > 0:
        freeze_lower_layers(model, cfg.freeze_layers)
    if cfg.packing == "on" and rm.packing_problem() is not None:
        raise RlhfkitError(f"--packing on: {cfg.model} cannot be packed padding-free: {rm.packing_problem()}; use "
                           f"--packing auto or off")
    if cfg.gradient_checkpointing:
        hf = unwrap_peft(rm.model)
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ----------------------------------------------------------------------------------------------------------
# Output folder, checkpoints, final save
# ----------------------------------------------------------------------------------------------------------
def check_output(cfg: RMTrainConfig) -> Path | None:
    """Refuse to mix runs: an existing non-empty folder needs --resume (same config) or --overwrite."""
    out = Path(cfg.output)
    if cfg.resume:
        ckpt = require_latest_checkpoint(out)
        saved_path = out / "config.yaml"
        if saved_path.is_file():
            saved = yaml.safe_load(saved_path.read_text()) or {}
            changed = changed_settings(cfg, saved, RESUMABLE_CHANGES)
            if changed:
                raise RlhfkitError(f"--resume: the configuration differs from the run in {out} in {changed}; resume "
                                   f"with the same settings (only {sorted(RESUMABLE_CHANGES)} may change)")
        return ckpt
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not cfg.overwrite:
            raise RlhfkitError(f"output folder {out} already exists and is not empty; pass --resume to continue its "
                               f"run, --overwrite to replace it, or choose another folder")
        if not out.is_dir() or not any((out / name).exists() for name in RUN_FILES):
            raise RlhfkitError(f"--overwrite: {out} does not look like an rlhfkit run folder (none of {RUN_FILES}); "
                               f"refusing to delete it")
    return None


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def write_checkpoint(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict) -> None:
    """Trainable weights (safetensors) + optimizer, scheduler, trainer state and RNG (torch.save, plain data)."""
    from safetensors.torch import save_file

    save_file({n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model)},
              str(folder / "trainable.safetensors"))
    save_state(folder / "optimizer.pt", optimizer.state_dict())
    save_state(folder / "scheduler.pt", scheduler.state_dict())
    save_state(folder / "trainer_state.pt", {**state, "rng": rng_state()})


def read_checkpoint(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict:
    from safetensors.torch import load_file

    weights_path = folder / "trainable.safetensors"
    if not weights_path.is_file():
        raise RlhfkitError(f"{folder}: trainable.safetensors missing (incomplete checkpoint)")
    weights = load_file(str(weights_path))
    params = dict(trainable_parameters(model))
    if set(weights) != set(params):
        raise RlhfkitError(f"{folder}: the checkpoint's weights do not match this model configuration")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(load_state(folder / "optimizer.pt"))
    scheduler.load_state_dict(load_state(folder / "scheduler.pt"))
    state = load_state(folder / "trainer_state.pt")
    set_rng_state(state.pop("rng"))
    return state


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
# Evaluation and metrics
# ----------------------------------------------------------------------------------------------------------
def window_metrics(prefix: str, names: Sequence[str], totals: Sequence[float]) -> dict[str, float]:
    """totals = [loss·weight, weight, count, *sums] -> {prefix/loss, prefix/<name> = sum/count}."""
    loss_sum, weight, count, *sums = totals
    out = {f"{prefix}/loss": loss_sum / weight}
    out.update({f"{prefix}/{n}": s / count for n, s in zip(names, sums)})
    return out


@torch.no_grad()
def evaluate(model: Any, objective: Any, items: Sequence[Any], accelerator: Any, micro_batch_size: int,
             bf16: bool) -> tuple[dict[str, float], list[float]]:
    """Held-out metrics over all processes (each scores a shard); also the per-pair diffs (pairwise)."""
    device = accelerator.device
    order = sorted(range(len(items)), key=lambda i: -pair_length_or_len(items[i]))
    shard = order[accelerator.process_index::accelerator.num_processes]
    totals = torch.zeros(3 + len(objective.names), dtype=torch.float64, device=device)
    diffs: list[float] = []
    model.eval()
    for start in range(0, len(shard), micro_batch_size):
        chunk = [items[i] for i in shard[start: start + micro_batch_size]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = objective.step(model, to_device(objective.collate(chunk), device))
        w = objective.weight(chunk)
        totals += torch.cat([torch.tensor([out.loss.item() * w, w, len(chunk)], dtype=torch.float64, device=device),
                             out.sums.to(device)])
        if out.diff is not None:
            diffs += out.diff.tolist()
    model.train()
    totals = accelerator.reduce(totals, "sum")
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        diffs = gather_object(diffs)
    return window_metrics("eval", objective.names, totals.tolist()), diffs


def pair_length_or_len(item: Any) -> int:
    return len(item.input_ids) if hasattr(item, "input_ids") else pair_length(item)


def backward_global_batch(model: Any, objective: Any, micro_batches: Sequence[Sequence[Any]], total_weight: float,
                          accelerator: Any, bf16: bool) -> torch.Tensor:
    """Accumulate into ``.grad`` this process's share of the gradient of the global batch's mean loss.

    Each micro-batch's mean loss is weighted by ``w_micro / w_global`` (w = examples, or observed targets), times
    the number of processes because data-parallel gradients are averaged over processes; gradients are
    all-reduced only after the last micro-batch. Returns this process's totals ``[loss·w, w, count, *sums,
    tokens]`` (float64).
    """
    device, n_proc = accelerator.device, accelerator.num_processes
    totals = torch.zeros(4 + len(objective.names), dtype=torch.float64, device=device)
    for k, items in enumerate(micro_batches):
        batch = to_device(objective.collate(items), device)
        w = objective.weight(items)
        with accelerator.no_sync(model) if k < len(micro_batches) - 1 else nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = objective.step(model, batch)
            accelerator.backward(out.loss * (w * n_proc / total_weight))
        totals += torch.cat([torch.tensor([out.loss.item() * w, w, len(items)], dtype=torch.float64, device=device),
                             out.sums.to(device), batch["attention_mask"].sum().double().reshape(1)])
    return totals


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def make_accelerator() -> Any:
    """The run's ``accelerate.Accelerator``, with accelerate's own mixed precision off: the trainer applies bf16
    autocast itself (``--bf16``), and ``prepare`` would otherwise wrap the model's forward in whatever autocast the
    process's accelerate state holds. That state is shared by every Accelerator of a process, so one created
    before (e.g. by a transformers or TRL Trainer with bf16, TRL's default) would silently make this run bf16;
    that is refused with an error instead. Without a GPU, ``cpu=True`` lets ``torchrun --nproc_per_node N`` /
    ``accelerate launch --multi_gpu`` run N gloo processes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
                           mixed_precision="no")
    except ValueError as e:
        if "already been initialized" not in str(e):
            raise
        raise RlhfkitError(
            f"rm train: this process already holds an accelerate state with mixed_precision="
            f"{AcceleratorState().mixed_precision!r} (created by another Accelerator, e.g. a transformers or TRL "
            f"Trainer); rlhfkit sets the precision with --bf16 and would otherwise train under that autocast; run "
            f"it in a fresh process") from None


def run(cfg: RMTrainConfig, data: Any = None, eval_data: Any = None,
        callbacks: Sequence[Any] = ()) -> dict[str, float]:
    """Train (see the module docstring for the steps); returns the last held-out metrics (empty without).

    The Python API (`rlhfkit.api.RewardTrainer`) may pass ``data`` / ``eval_data`` as in-memory rows instead of the
    config's paths (validated like file rows, errors naming ``data, row N, field ...``) and ``callbacks``, each
    called as ``callback(step, metrics)`` with every logged row (`rlhfkit.utils.MetricsLogger`)."""
    from transformers import get_scheduler

    from rlhfkit.models.loading import load_tokenizer

    if cfg.model is None:
        raise RlhfkitError("model is required (RMTrainConfig.model, --model, or RewardTrainer(model=...))")
    # given once each, before the accelerator and the output folder; what errors call the training data
    train_source = source_label(data_sources(cfg, data, eval_data)[0], "data")
    accelerator = make_accelerator()
    if accelerator.is_main_process:
        warn_if_slow_bf16(cfg.bf16, accelerator.device, "rm train --bf16")
    is_main, n_proc, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (cfg.micro_batch_size * n_proc):
        raise RlhfkitError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size × processes = "
                           f"{cfg.micro_batch_size} × {n_proc}")
    out_dir = Path(cfg.output)
    resume_from = check_output(cfg)
    kind = resolve_kind(cfg)  # 'auto' -> decoder / encoder, checked against the settings before any work

    # 1. Data: load and validate everything, split, tokenise (errors name file, row and field).
    train_ex, eval_ex, eval_source = load_examples(cfg, data, eval_data)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_items, report = tokenize_examples(cfg, tokenizer, train_ex, train_source)
    eval_items, eval_report = tokenize_examples(cfg, tokenizer, eval_ex, eval_source) if eval_ex else ([], None)
    if is_main:
        accumulation = cfg.batch_size // (cfg.micro_batch_size * n_proc)
        print(f"processes: {n_proc}; {cfg.batch_size} examples per optimizer step = {n_proc} process(es) × "
              f"{accumulation} micro-batch(es) × {cfg.micro_batch_size}")
        print(f"train: {report.describe()}")
        if eval_report is not None:
            print(f"eval:  {eval_report.describe()}")
    steps_per_epoch = len(train_items) // cfg.batch_size
    if steps_per_epoch == 0:
        raise RlhfkitError(f"{train_source}: {len(train_items)} training examples, fewer than batch_size="
                           f"{cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs

    # 2. Tokenizer and model (seeded head; LoRA; frozen layers).
    model = build_model(cfg, kind, tokenizer)
    objective = (PairwiseObjective if cfg.pairwise else PointwiseObjective)(cfg, pad_id_of(model))
    model.train()

    # 3. Batch plan: a seeded (length-grouped) order of global batches; process `rank` takes batch[rank::n_proc].
    if cfg.group_by_prompt:  # K-wise: a prompt's pairs in one batch, each distinct sequence run once
        sampler = PromptGroupedBatchSampler([prompt_key(it) for it in train_items], cfg.batch_size, cfg.seed,
                                            drop_last=True)
    else:
        sampler = LengthGroupedBatchSampler([pair_length_or_len(it) for it in train_items], cfg.batch_size,
                                            cfg.seed, drop_last=True,
                                            group_size_multiplier=50 if cfg.group_by_length else 1)

    # 4. Optimizer (decay on matrices only) and learning-rate schedule.
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(
        [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.learning_rate)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler("constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
                              optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    n_stats = 3 + len(objective.names)
    state = {"step": 0, "epoch": 0, "next_batch": 0, "window": [0.0] * n_stats, "window_grad_norm": 0.0,
             "window_steps": 0, "total_steps": total_steps, "train_examples": len(train_items)}
    if resume_from is not None:
        state = read_checkpoint(resume_from, model, optimizer, scheduler)
        check_resume_length(state, total_steps, len(train_items), train_source)
    model = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for _, p in params]

    # The run folder is written only now, after every check passed.
    if is_main:
        if cfg.overwrite and not cfg.resume and out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    accelerator.wait_for_everyone()
    logger = MetricsLogger(out_dir / "metrics.jsonl", out_dir / "tensorboard", enabled=is_main,
                           resume_step=state["step"] if resume_from is not None else None, callbacks=callbacks)
    bar = progress(total=total_steps, initial=state["step"], desc="rm train", enabled=is_main)

    # 5. Loop: epochs × optimizer steps × micro-batches.
    eval_metrics: dict[str, float] = {}
    last_eval_diffs: list[float] = []
    window_tokens, t_window = 0.0, time.perf_counter()
    start_epoch, start_batch = state["epoch"], state["next_batch"]
    for epoch in range(start_epoch, cfg.epochs):
        batches = sampler.batches(epoch)
        for b in range(start_batch if epoch == start_epoch else 0, len(batches)):
            global_items = [train_items[i] for i in batches[b]]
            # K-wise batches shard contiguously (a prompt's pairs stay on one process); others interleave
            shard = (global_items[rank * len(global_items) // n_proc:(rank + 1) * len(global_items) // n_proc]
                     if cfg.group_by_prompt else global_items[rank::n_proc])
            micro = [shard[i: i + cfg.micro_batch_size] for i in range(0, len(shard), cfg.micro_batch_size)]
            totals = backward_global_batch(model, objective, micro, objective.weight(global_items), accelerator,
                                           cfg.bf16)
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals = accelerator.reduce(totals, "sum").tolist()
            state["step"] += 1
            step = state["step"]
            state["window"] = [a + t for a, t in zip(state["window"], totals[:n_stats])]
            state["window_grad_norm"] += float(grad_norm)
            state["window_steps"] += 1
            window_tokens += totals[n_stats]
            bar.update(1)
            row: dict[str, float] = {}
            if step % cfg.logging_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - t_window
                row.update(window_metrics("rm", objective.names, state["window"]))
                row.update({"train/lr": lr, "train/grad_norm": state["window_grad_norm"] / state["window_steps"],
                            "train/epoch": step / steps_per_epoch,
                            "throughput/tokens_per_s": window_tokens / elapsed,
                            "time/step": elapsed / state["window_steps"]})
                bar.set_postfix(loss=f"{row['rm/loss']:.4f}", **({"acc": f"{row['rm/accuracy']:.3f}"}
                                                                 if "rm/accuracy" in row else {}))
                state.update(window=[0.0] * n_stats, window_grad_norm=0.0, window_steps=0)
                window_tokens, t_window = 0.0, time.perf_counter()
            if eval_items and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
                eval_metrics, last_eval_diffs = evaluate(unwrapped, objective, eval_items, accelerator,
                                                         cfg.micro_batch_size, cfg.bf16)
                row.update(eval_metrics)
            if row:
                logger.log(step, row)
            # 6. Checkpoint (position = the next batch of this epoch).
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                state.update(epoch=epoch, next_batch=b + 1)
                if is_main:
                    save_checkpoint(out_dir, step, lambda f: write_checkpoint(f, unwrapped, optimizer, scheduler,
                                                                              state), cfg.keep_checkpoints)
                accelerator.wait_for_everyone()
    bar.close()
    logger.close()

    # 7. Final model (LoRA merged), published atomically; final held-out metrics as JSON.
    if is_main:
        publish_model(unwrapped, tokenizer, out_dir)
        if eval_metrics:
            summary = dict(eval_metrics)
            if last_eval_diffs:
                summary.update({f"eval/{k}": v for k, v in pairwise_metrics(torch.tensor(last_eval_diffs)).items()})
            atomic_write_json(out_dir / "eval_results.json", {"step": total_steps, **summary})
            print("final held-out: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    accelerator.wait_for_everyone()
    return eval_metrics
