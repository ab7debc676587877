"""One PPO iteration on the real SmolLM2-135M (GGUF; pad token == EOS; tied embeddings): the first minibatch is
exact under bf16 autocast at a real model's size, and the final policy is a plain HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ppo_helpers import one_thread  # noqa: F401  (autouse: robust timing on shared cores)
from transformers import AutoModelForCausalLM

from rlhfkit.models.loading import smollm2_gguf_path
from rlhfkit.train.ppo_config import PPOConfig
from rlhfkit.train.ppo_trainer import PPOTrainer

PROMPTS = ["Tell me a joke.", "What is the capital of France?", "Write a haiku about rain.", "Name a fruit."]


@pytest.mark.slow
def test_one_iteration_on_smollm2_is_exact_at_the_first_minibatch(tmp_path):
    try:
        policy = smollm2_gguf_path()
    except Exception as e:  # noqa: BLE001 - the wheel is an optional extra
        pytest.skip(f"SmolLM2 not installed: {e}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in PROMPTS))
    cfg = PPOConfig(policy=str(policy), reward_model=["ppo_helpers:length_reward"], prompts=str(prompts),
                    output=str(tmp_path / "run"), iterations=1, max_new_tokens=8, rollout_batch_size=4,
                    micro_batch_size=1, ppo_epochs=1, num_minibatches=2, critic_init="policy", bf16=True,
                    learning_rate=1e-5)
    trainer = PPOTrainer(cfg)
    assert trainer.tokenizer.pad_token_id == trainer.tokenizer.eos_token_id  # SmolLM2 pads with EOS
    results = trainer.train()
    first, second = results[0].minibatch_stats
    assert first["policy/approx_kl"] == 0.0 and first["policy/ratio_mean"] == 1.0
    assert second["policy/approx_kl"] > 0.0
    model = AutoModelForCausalLM.from_pretrained(Path(cfg.output) / "policy")
    assert model.config.tie_word_embeddings and model.num_parameters() > 100_000_000
