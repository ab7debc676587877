"""``--score_norm reference``: each reward model applies its stored (mean, std) before the combination, the
missing-stop penalty and clipping; a source without statistics is an error before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ppo_helpers import REWARD, make_config, make_tokenizer, one_thread  # noqa: F401  (autouse fixture)
from tolerances import assert_close_f32

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.reward import RewardModel
from rlhfkit.rollout.scoring import RMReward
from rlhfkit.train.ppo_config import PPOConfig
from rlhfkit.train.ppo_trainer import PPOTrainer


def _reward_folder(tmp_path: Path, name: str, seed: int, normalization: tuple[float, float] | None) -> str:
    make_config(tmp_path)  # builds sft/ once
    torch.manual_seed(seed)
    rm = RewardModel.from_backbone(tmp_path / "sft")
    if normalization is not None:
        rm.set_normalization(*normalization)  # as `rlhfkit score --fit_reference` stores it
    rm.save_pretrained(tmp_path / name, make_tokenizer())
    return str(tmp_path / name)


def test_reference_statistics_apply_per_model_before_combination_penalty_and_clip(tmp_path):
    rm_a = _reward_folder(tmp_path, "rm_a", seed=1, normalization=(0.5, 2.0))
    rm_b = _reward_folder(tmp_path, "rm_b", seed=2, normalization=(-0.25, 0.5))
    cfg = make_config(tmp_path, reward_model=[rm_a, rm_b], reward_weights=[1.0, 2.0], score_norm="reference",
                      missing_stop_penalty=1.0, missing_stop_mode="subtract", score_clip=3.0, critic_init="policy")
    trainer = PPOTrainer(cfg)
    rollout, _ = trainer.rollout()
    stopped = rollout.stopped.clone()
    stopped[0], stopped[1] = True, False  # both branches of the penalty
    rollout = rollout._replace(stopped=stopped)
    scores, prompts, responses = trainer.raw_scores(rollout)
    batch = (prompts, responses, rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
             rollout.stopped)
    # the models' own (unnormalised) outputs: the very forwards of the trainer's sources (same folders, rows,
    # batches of 16 and packing), so the same float32 numbers; only the normalisation and the sum below are float64
    packing = [source.packing for source in trainer.reward.sources]
    raw_a = RMReward(rm_a, trainer.tokenizer, packing=packing[0])(*batch).double()
    raw_b = RMReward(rm_b, trainer.tokenizer, packing=packing[1])(*batch).double()
    # each model normalised with its own statistics, then the weighted sum: 1·(a − 0.5)/2 + 2·(b + 0.25)/0.5
    terms = torch.stack([(raw_a - 0.5) / 2.0, 2.0 * (raw_b + 0.25) / 0.5])
    combined = terms.sum(0)
    # float32: a − 0.5 and b + 0.25 round by u = eps/2 (÷2, ÷0.5, ×2 are exact), their sum by u: eps·Σ|terms|
    assert_close_f32(scores, combined, terms.abs().sum(0), 1, "combination")
    # then the penalty (in normalised units: subtract 1 where the response did not stop), then the clip to ±3
    penalty = 1.0 * (~stopped).double()
    expected = (combined - penalty).clamp(-3.0, 3.0)
    processed = trainer.process_scores(scores, stopped)
    # the combination's rounding, plus u of s − 1 where subtracted (s − 0 and the clip are exact)
    scale = terms.abs().sum(0) + 0.5 * (scores.double() - penalty).abs() * (penalty != 0)
    assert_close_f32(processed, expected, scale, 1, "penalty and clip")
    assert float((combined - expected).abs().max()) > 0.5  # the penalty (and possibly the clip) changed rows
    # and a learning step trains on them: objective/scores_used is their mean (learn processes the same scores
    # with the same float32 operations and takes the same float64 mean: exactly)
    stats, _ = trainer.learn(rollout, scores)
    assert stats["objective/scores_used"] == float(processed.double().mean())


@pytest.mark.parametrize("sources", ["unfitted", "function", "fitted_and_function"])
def test_a_source_without_statistics_is_an_error_before_anything_is_written(tmp_path, sources):
    fitted = _reward_folder(tmp_path, "fitted", seed=1, normalization=(0.0, 1.0))
    unfitted = _reward_folder(tmp_path, "unfitted", seed=1, normalization=None)
    specs, named = {"unfitted": ([unfitted], repr(unfitted)), "function": ([REWARD], repr(REWARD)),
                    "fitted_and_function": ([fitted, REWARD], repr(REWARD))}[sources]
    cfg = make_config(tmp_path, reward_model=specs, score_norm="reference", critic_init="policy")
    with pytest.raises(RlhfkitError, match="no stored normalisation statistics") as err:
        PPOTrainer(cfg).train()
    message = str(err.value)
    assert named in message and "rlhfkit score" in message and "--fit_reference" in message
    assert not Path(cfg.output).exists()


def test_score_norm_reference_is_a_valid_choice_and_needs_no_batch_of_two():
    required = dict(policy="p", reward_model=["rm"], prompts="x.jsonl", output="out")
    assert PPOConfig(**required, score_norm="reference", rollout_batch_size=1).score_norm == "reference"
    with pytest.raises(RlhfkitError, match="rollout_batch_size × samples_per_prompt >= 2"):
        PPOConfig(**required, score_norm="running", rollout_batch_size=1)
    with pytest.raises(RlhfkitError, match="score_norm"):
        PPOConfig(**required, score_norm="references")
