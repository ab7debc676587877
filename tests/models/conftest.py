"""Tiny models for the rlhfkit.models tests: a 2-layer Llama with SmolLM2's real tokenizer, and a tiny BERT.

Dropout probabilities are deliberately non-zero in the configs so that the tests can check rlhfkit turns them off.
"""

from __future__ import annotations

from pathlib import Path

import paths
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

TOKENIZER_DIR = paths.TOKENIZER_DIR


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer: pad == EOS == `<|im_end|>` (2), unk `<|endoftext|>` (0), bos `<|im_start|>` (1)."""
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def llama_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
        pad_token_id=2, eos_token_id=2, bos_token_id=1,
    )


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory, llama_config, tokenizer) -> Path:
    """A tiny causal LM saved with save_pretrained (plus the tokenizer): stands in for an SFT model folder."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config)
    folder = tmp_path_factory.mktemp("sft")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT encoder (vocab 128, no tokenizer), with dropout 0.1 in its config."""
    torch.manual_seed(1)
    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1, pad_token_id=0)
    folder = tmp_path_factory.mktemp("bert")
    BertModel(config).save_pretrained(folder)
    return folder


def random_batch(lengths: list[int], vocab: int, pad_id: int, seed: int = 0, low: int = 3,
                 left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (avoiding ids < `low`, i.e. special tokens), padded right (or left) with `pad_id`."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), L), dtype=torch.bool)
    for i, n in enumerate(lengths):
        row = torch.randint(low, vocab, (n,), generator=g)
        sl = slice(L - n, L) if left else slice(0, n)
        ids[i, sl] = row
        mask[i, sl] = True
    return ids, mask


def right_to_left(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows, moved to the right end (left padding)."""
    out_ids = torch.full_like(ids, pad_id)
    out_mask = torch.zeros_like(mask)
    L = ids.shape[1]
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        out_ids[i, L - n:] = ids[i, :n]
        out_mask[i, L - n:] = True
    return out_ids, out_mask


@pytest.fixture(scope="session")
def make_batch():
    """:func:`random_batch` as a fixture (test modules cannot import conftest reliably)."""
    return random_batch


@pytest.fixture(scope="session")
def to_left():
    """:func:`right_to_left` as a fixture."""
    return right_to_left
