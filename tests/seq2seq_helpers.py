"""Shared helpers of the seq2seq (SteamSHP-style) ranker tests: a word-level tokenizer that knows the SteamSHP
template words and the single-token answers "A"/"B" and appends an end id as T5's does, and a tiny random T5
(importable from any test folder: ``pythonpath = ["tests"]``)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

PAD, EOS, UNK = 0, 1, 2
WORDS = [f"w{i}" for i in range(3, 46)] + ["good", "bad"]  # the words of tests/train/rm_helpers.py's data
TEMPLATE = ["POST:", "RESPONSE", "A:", "B:", "Which", "response", "is", "better?"]  # SteamSHP's marker words
ANSWERS = ["A", "B"]
VOCAB = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK,
         **{w: i for i, w in enumerate(WORDS + TEMPLATE + ANSWERS, start=3)}}
ENC_LAYERS, DEC_LAYERS = 2, 2


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace words -> ids of :data:`VOCAB`; with special tokens a text is followed by ``</s>`` (as T5's)."""
    tok = Tokenizer(WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_t5_folder(path: Path, seed: int = 0) -> Path:
    """A tiny random T5 (float32, dropout 0.1 in its config: rlhfkit must turn it off) + tokenizer, as an HF folder."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=ENC_LAYERS,
                      num_decoder_layers=DEC_LAYERS, num_heads=4, relative_attention_num_buckets=32,
                      dropout_rate=0.1, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    T5ForConditionalGeneration(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def t5_forward_factor() -> int:
    """Rounding stages between two float32 forwards of the tiny T5 (`tolerances.forward_factor`'s rule): two
    sublayers per encoder block, three per decoder block (self-attention, cross-attention, MLP), one for the
    embedding, final norms and LM head; two evaluations: × 2."""
    return 2 * (2 * ENC_LAYERS + 3 * DEC_LAYERS + 1)
