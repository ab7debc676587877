"""PPO with a ranker reward: each response is scored against the reference response of ITS prompt (the prompts
file's 'reference' field); a missing or empty reference is an error naming file, row and field."""

from __future__ import annotations

import json

import pytest
import torch
from ppo_helpers import make_config, one_thread  # noqa: F401 (autouse)
from seq2seq_helpers import make_t5_folder

from rlhfkit.cli import main
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.rankers import load_ranker
from rlhfkit.models.seq2seq import Seq2SeqRanker
from rlhfkit.train.ppo_trainer import PPOTrainer


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranker")
    Seq2SeqRanker.from_backbone(make_t5_folder(root / "t5"), max_length=64).save_pretrained(root / "seq2seq")
    return root / "seq2seq"


def with_references(path, references):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row, ref in zip(rows, references):
        if ref is not None:
            row["reference"] = ref
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_each_row_is_scored_against_its_own_prompts_reference(ranker_dir, tmp_path):
    cfg = make_config(tmp_path, reward_model=[str(ranker_dir)], samples_per_prompt=2, advantage_estimator="grpo", critic_init="auto",
                      rollout_batch_size=4, num_minibatches=2)
    references = [f"w{10 + i} w{30 + i}" for i in range(16)]  # a different reference per prompt
    rows = with_references(tmp_path / "prompts.jsonl", references)
    trainer = PPOTrainer(cfg)
    assert trainer.references == references
    rollout, indices = trainer.rollout()
    assert len(indices) == 8 and indices[0] == indices[1]  # 2 responses per prompt, prompt-major
    scores, _, responses = trainer.raw_scores(rollout, indices)
    ranker = load_ranker(ranker_dir)
    expected = ranker.symmetric_logits([rows[i]["prompt"] for i in indices], responses,
                                       [references[i] for i in indices])
    torch.testing.assert_close(scores.cpu(), expected, rtol=0, atol=0)
    greedy, _ = trainer.greedy_scores(rollout, indices)  # remax's baseline: one row per prompt, its reference
    assert greedy.shape == (4,) and torch.isfinite(greedy).all()
    result = trainer.iteration(1)  # the whole iteration (its own rollout) scores against references too
    assert torch.isfinite(torch.tensor(result.stats["objective/scores"]))


@pytest.mark.parametrize("references, needle", [
    ([None] * 16, "prompts.jsonl, row 1, field 'reference': missing field"),
    (["w3"] * 2 + ["  "] + ["w3"] * 13, "prompts.jsonl, row 3, field 'reference': empty or whitespace-only text"),
])
def test_a_missing_or_empty_reference_is_an_error_and_nothing_is_written(ranker_dir, tmp_path, capsys, references,
                                                                         needle):
    cfg = make_config(tmp_path, reward_model=[str(ranker_dir)])
    with_references(tmp_path / "prompts.jsonl", references)
    with pytest.raises(RlhfkitError, match=needle.replace("?", r"\?")):
        PPOTrainer(cfg)
    assert main(["ppo", "--policy", cfg.policy, "--reward_model", str(ranker_dir), "--prompts", cfg.prompts,
                 "--output", cfg.output, "--critic_init", "policy"]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_score_norm_reference_is_refused_for_a_ranker(ranker_dir, tmp_path):
    cfg = make_config(tmp_path, reward_model=[str(ranker_dir)], score_norm="reference")
    with_references(tmp_path / "prompts.jsonl", ["w3"] * 16)
    with pytest.raises(RlhfkitError, match="already relative to the prompt's reference"):
        PPOTrainer(cfg)
