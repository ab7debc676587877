"""Models: loading (HF folders, GGUF with a conversion cache), reward models, the PPO critic, the PairRM and
seq2seq (SteamSHP-style) rankers, and LoRA / layer freezing (``rlhfkit.models.adapters``, imported on demand
because peft is slow to import)."""

from rlhfkit.models.loading import (
    causal_lm_logits,
    ensure_pad_token,
    forward_hidden,
    hf_folder,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    smollm2_gguf_path,
)
from rlhfkit.models.pairrm import PairRanker, build_input
from rlhfkit.models.reward import RewardModel, RewardOutput, load_critic, reward_pad_token_id
from rlhfkit.models.seq2seq import Seq2SeqRanker

__all__ = [
    "PairRanker",
    "RewardModel",
    "RewardOutput",
    "Seq2SeqRanker",
    "build_input",
    "causal_lm_logits",
    "ensure_pad_token",
    "forward_hidden",
    "hf_folder",
    "load_causal_lm",
    "load_critic",
    "load_tokenizer",
    "resolve_model_path",
    "reward_pad_token_id",
    "smollm2_gguf_path",
]
