"""``rlhfkit score``: batched reward-model scores for prompt/response rows, written as JSONL.

Steps: 1 read and validate the rows (and the ``--fit_reference`` rows) — every error before anything is written;
2 load the reward model; 3 tokenise (over-long policy; a dropped row is written with ``score: null``) and score the
rows; 4 with ``--fit_reference``, score the reference rows and store their mean and (unbiased) std in the model
folder's ``rlhfkit.json`` (atomically), accumulated with ``core.rewards.RunningMoments``; 5 normalise:
``none``, ``whiten`` (``core.rewards.whiten_scores`` over all scored rows of the file) or ``reference``
(``RewardModel.normalize`` with the stored statistics: reference outputs then average exactly 0), then clip
(``core.rewards.clip_scores``); 6 write the output atomically: each input row with its fields, plus ``score`` and,
when normalised or clipped, ``raw_score`` (the model's own output).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhfkit.core.rewards import RunningMoments, clip_scores, whiten_scores
from rlhfkit.data.pointwise import PointwiseExample
from rlhfkit.data.prompts import check_prompt, require
from rlhfkit.data.sources import read_rows
from rlhfkit.data.tokenize import collate_points, tokenize_pointwise
from rlhfkit.errors import RlhfkitError, data_error
from rlhfkit.models.pairrm import Ranker
from rlhfkit.models.reward import METADATA_FILE, RewardModel
from rlhfkit.train.rm_config import ScoreConfig
from rlhfkit.train.rm_eval import load_scoring_model, pad_id_of, to_device, with_source
from rlhfkit.utils import atomic_write_json, atomic_write_text, resolve_bf16, warn_if_slow_bf16

CONFIG = ScoreConfig


def load_scoring_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[PointwiseExample]]:
    """The raw rows and one validated example per row (``prompt``: text or messages; ``response``: text or
    assistant messages); errors name file, row and field."""
    rows = read_rows(path)
    examples = []
    for i, row in enumerate(rows, start=1):
        prompt = check_prompt(require(row, "prompt", path, i), path, i, "prompt")
        response = check_prompt(require(row, "response", path, i), path, i, "response")
        if isinstance(response, list) and any(m["role"] != "assistant" for m in response):
            raise data_error(path, i, "response", "response messages must all have role 'assistant'")
        examples.append(PointwiseExample(prompt, response, row=i))
    return rows, examples


@torch.no_grad()
def score_examples(model: RewardModel, tokenizer: Any, examples: Sequence[PointwiseExample], batch_size: int,
                   max_length: int, overlong: str, bf16: bool = False, source: Any = None
                   ) -> tuple[list[float | None], Any]:
    """Raw scores in the order of ``examples`` (None for a row dropped as over-long), and the tokenise report."""
    try:
        points, report = tokenize_pointwise(tokenizer, examples, max_length, overlong, convention=model.convention)
    except RlhfkitError as e:
        raise with_source(e, source) from None
    scores: list[float | None] = [None] * len(examples)
    row_to_index = {ex.row: i for i, ex in enumerate(examples)}
    device = next(model.parameters()).device
    order = sorted(range(len(points)), key=lambda i: -len(points[i].input_ids))  # similar lengths per batch
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = [points[i] for i in order[start: start + batch_size]]
        # collate_points insists on a target; scoring rows have none, so give a placeholder it then ignores.
        batch = to_device(collate_points([replace(p, score=0.0) for p in chunk], pad_id_of(model)), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        for point, value in zip(chunk, out.scores.float().cpu().tolist()):
            if not math.isfinite(value):
                raise RlhfkitError(f"{source}, row {point.row}: the reward model gave a non-finite score ({value})")
            scores[row_to_index[point.row]] = value
    return scores, report


def fit_reference(model: RewardModel, model_dir: Path, scores: Sequence[float | None], source: str) -> dict:
    """Store the mean and unbiased std of the reference scores in ``model_dir/rlhfkit.json`` (atomic rewrite)."""
    kept = [s for s in scores if s is not None]
    if len(kept) < 2:
        raise RlhfkitError(f"{source}: --fit_reference needs at least 2 scored rows, got {len(kept)}")
    moments = RunningMoments()
    moments.update(torch.tensor(kept, dtype=torch.float64))
    if not moments.std > 0:
        raise RlhfkitError(f"{source}: every reference row has the same score; the std is 0, so scores cannot be "
                           f"normalised by it")
    model.set_normalization(moments.mean, moments.std)
    meta_path = model_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else model.metadata()
    meta["normalization"] = {**model.normalization, "count": moments.count, "fitted_on": str(source)}
    atomic_write_json(meta_path, meta)
    return meta["normalization"]


def normalize_scores(raw: Sequence[float | None], mode: str, clip: float | None,
                     model: RewardModel) -> list[float | None]:
    """Apply the normalisation mode to the scored rows (None stays None), then the clip."""
    kept = [i for i, s in enumerate(raw) if s is not None]
    values = torch.tensor([raw[i] for i in kept], dtype=torch.float64)
    if mode == "whiten":
        if values.numel() < 2:
            raise RlhfkitError(f"--normalize whiten needs at least 2 scored rows, got {values.numel()}")
        values = whiten_scores(values)
    elif mode == "reference":
        values = model.normalize(values)
    values = clip_scores(values, clip)
    out: list[float | None] = [None] * len(raw)
    for i, v in zip(kept, values.tolist()):
        out[i] = v
    return out


def run(cfg: ScoreConfig) -> list[dict[str, Any]]:
    """Score ``cfg.data`` (see the module docstring); returns the output rows."""
    # 1. Rows (and reference rows), validated before anything is loaded or written.
    rows, examples = load_scoring_rows(cfg.data)
    reference = load_scoring_rows(cfg.fit_reference)[1] if cfg.fit_reference else None
    # 2. Model.
    model, tokenizer = load_scoring_model(cfg.model, cfg.trust_remote_code)
    if isinstance(model, Ranker):
        raise RlhfkitError(f"{cfg.model} is a {model.label} ranker: it compares two responses and gives no score to "
                           f"one; use a reward model (as a PPO reward, a ranker scores each response against the "
                           f"prompt's 'reference' response: docs/reward_modeling.md)")
    if cfg.normalize == "reference" and reference is None and model.normalization is None:
        raise RlhfkitError(f"{cfg.model}: --normalize reference needs reference statistics; run once with "
                           f"--fit_reference FILE (reference outputs, e.g. the SFT model's responses)")
    cfg.bf16 = resolve_bf16(cfg.bf16, next(model.parameters()).device)
    warn_if_slow_bf16(cfg.bf16, next(model.parameters()).device, "score --bf16")
    common = dict(batch_size=cfg.batch_size, max_length=cfg.max_length, overlong=cfg.overlong, bf16=cfg.bf16)
    # 3. Scores of the rows, then of the reference rows (so that a bad row stops the run before anything is written).
    raw, report = score_examples(model, tokenizer, examples, source=cfg.data, **common)
    print(report.describe())
    # 4. Reference statistics, stored in the model folder.
    if reference is not None:
        ref_scores, ref_report = score_examples(model, tokenizer, reference, source=cfg.fit_reference, **common)
        stats = fit_reference(model, Path(cfg.model), ref_scores, cfg.fit_reference)
        print(f"reference ({ref_report.describe()}): mean {stats['mean']:.6g}, std {stats['std']:.6g} "
              f"stored in {Path(cfg.model) / METADATA_FILE}")
    # 5. Normalisation and clipping.
    final = normalize_scores(raw, cfg.normalize, cfg.clip, model)
    # 6. Output.
    with_raw = cfg.normalize != "none" or cfg.clip is not None
    out_rows = []
    for row, score, raw_score in zip(rows, final, raw):
        out = {**row, "score": score}
        if with_raw:
            out["raw_score"] = raw_score
        out_rows.append(out)
    atomic_write_text(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
    kept = [s for s in final if s is not None]
    if kept:
        print(f"wrote {len(out_rows)} rows to {cfg.output}: score mean {sum(kept) / len(kept):.4f}, "
              f"min {min(kept):.4f}, max {max(kept):.4f}")
    return out_rows
