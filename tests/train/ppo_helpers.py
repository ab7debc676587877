"""Shared fixtures of the PPO tests: a tiny Llama SFT folder with a word-level tokenizer, prompt files and rule
rewards (importable as ``ppo_helpers:function``; tests/train is on sys.path under pytest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = 0, 1, 2
VOCAB = 32
WORDS = [f"w{i}" for i in range(3, VOCAB)]
TARGET_WORD = "w7"
TARGET_ID = 7


def make_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """The policy's word-level tokenizer (other ``words``: another vocabulary with the same special tokens)."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{w: i for i, w in enumerate(words, start=3)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_policy_folder(path: Path, seed: int = 0, vocab: int = VOCAB, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny random Llama (float32) + tokenizer saved as an HF folder: the 'SFT model' of the tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_prompts(path: Path, n: int = 16, seed: int = 0) -> Path:
    """``n`` prompts of 2-5 random words (never the target word), one JSON object per line."""
    g = torch.Generator().manual_seed(seed)
    words = [w for w in WORDS if w != TARGET_WORD]
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, 6, (1,), generator=g))
        idx = torch.randint(0, len(words), (length,), generator=g).tolist()
        rows.append({"prompt": " ".join(words[i] for i in idx)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- rule rewards -------------------------------------------------------------------------------------
def count_target(prompts: list[str], responses: list[str]) -> list[float]:
    """How many times the target word appears in the response."""
    return [float(r.split().count(TARGET_WORD)) for r in responses]


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan")] * len(responses)


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r.split())) / 4.0 for r in responses]


# ---- configs and fixtures -----------------------------------------------------------------------------
REWARD = "ppo_helpers:count_target"
TIMING_PREFIXES = ("time/", "throughput/")


def make_config(tmp: Path, **overrides):
    """A small PPOConfig on a tiny policy (built once per tmp folder) and 16 prompts; three extra stop ids make
    responses of different lengths (so that micro-batches trim differently). ``old_logprobs=recompute`` unless
    overridden: the tests hold the first minibatch's ratio to 1 exactly, and many inject rollouts whose
    ``rollout_logprobs`` are placeholders (the default ``auto`` and ``rollout`` have their own tests in
    test_ppo_trunk.py)."""
    from rlhfkit.train.ppo_config import PPOConfig

    policy = tmp / "sft"
    if not policy.exists():
        make_policy_folder(policy)
    prompts = tmp / "prompts.jsonl"
    if not prompts.exists():
        make_prompts(prompts)
    kw = dict(policy=str(policy), reward_model=[REWARD], prompts=str(prompts), output=str(tmp / "run"),
              iterations=2, max_new_tokens=6, temperature=1.0, stop_token_ids=[3, 4, 5], rollout_batch_size=8,
              ppo_epochs=2, num_minibatches=2, micro_batch_size=2, learning_rate=1e-3, critic_init="policy",
              sample_table_every=1, sample_table_rows=4, old_logprobs="recompute")
    kw.update(overrides)
    return PPOConfig(**kw)


def without_timing(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock fields (the only ones allowed to differ between equal runs)."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in rows]


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# the statistics that a micro-batch split must not change (the update invariance tests)
SPLIT_INVARIANT_STATS = ("loss/policy", "loss/value", "loss/total", "policy/approx_kl", "policy/clipfrac",
                         "policy/entropy", "val/clipfrac", "policy/grad_norm", "val/grad_norm")


def assert_same_update(weights: tuple[dict, ...], stats: dict, expected_weights: tuple[dict, ...],
                       expected_stats: dict, keys: tuple[str, ...] = SPLIT_INVARIANT_STATS) -> None:
    """Float64 updates of the same batch split differently are equal to 1e-12: every weight of each model's
    ``trainable`` dict, and the statistics ``keys``."""
    for got, want in zip(weights, expected_weights, strict=True):
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-12)
    for key in keys:
        assert stats[key] == pytest.approx(expected_stats[key], rel=1e-12, abs=1e-14), key


def randomize_value_head(critic, seed: int = 0) -> None:
    """Give a critic started from the policy (value head 0: every value exactly 0) a random head, as a reward
    model's, so that tests of values and of the critic's gradients see non-trivial numbers."""
    from rlhfkit.models.reward import init_head_

    torch.manual_seed(seed)
    init_head_(critic.model.score)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest, and timing-independently, on one thread (the CI machine's cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
