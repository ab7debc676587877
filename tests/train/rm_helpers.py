"""Shared helpers of the reward-model tests: a tiny Llama "SFT model" folder with a word-level tokenizer, and
preference / pointwise data files whose preference rule is learnable (tests/train is on sys.path under pytest)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = 0, 1, 2
WORDS = [f"w{i}" for i in range(3, 46)]
GOOD, BAD = "good", "bad"  # the learnable rule: chosen responses contain GOOD, rejected ones BAD
MARKERS = ["<prompt>", "<response", "A>", "B>", "<verdict>"]  # the words of the PairRM input format
VOCAB = 3 + len(WORDS) + 2 + len(MARKERS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; several threads on a shared, busy CPU slow them down many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = WORDS + [GOOD, BAD] + MARKERS
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{w: i for i, w in enumerate(words, start=3)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_sft_folder(path: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A tiny random Llama (float32) + tokenizer saved as an HF folder: the 'SFT model' of the tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _with(rng: random.Random, text: str, word: str) -> str:
    parts = text.split()
    parts.insert(rng.randint(0, len(parts)), word)
    return " ".join(parts)


def preference_rows(n: int, seed: int = 0, margin: bool = False) -> list[dict]:
    """Pairs whose chosen response holds the word GOOD and whose rejected response holds BAD (else random)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = {"prompt": _words(rng, 2, 6), "chosen": _with(rng, _words(rng, 1, 5), GOOD),
               "rejected": _with(rng, _words(rng, 1, 5), BAD)}
        if margin:
            row["margin"] = float(rng.choice([0.0, 0.5, 1.0]))
        rows.append(row)
    return rows


def pointwise_rows(n: int, kind: str, seed: int = 0) -> list[dict]:
    """Rows whose response holds GOOD (label 1 / score 1 / aspects (1, 0)) or BAD (label 0 / score -1 / (0, 1))."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        row = {"prompt": _words(rng, 2, 6), "response": _with(rng, _words(rng, 1, 5), GOOD if good else BAD)}
        if kind == "label":
            row["label"] = int(good)
        elif kind == "score":
            row["score"] = 1.0 if good else -1.0
        else:
            row["helpful"], row["harmful"] = (1.0, 0.0) if good else (0.0, 1.0)
            if i % 3 == 0:
                row["harmful"] = None  # a missing aspect is masked out
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model's safetensors file(s) in an HF folder."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out
