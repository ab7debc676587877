"""A seq2seq preference model in the SteamSHP style: an encoder-decoder LM (T5) reads both responses and answers
"A" or "B".

Source: SteamSHP (Ethayarajh et al. 2022, the Stanford Human Preferences dataset card and the SteamSHP model
card): a FLAN-T5 model fine-tuned to emit ``A`` or ``B`` after the input::

    POST: {prompt}

     RESPONSE A: {response A}

     RESPONSE B: {response B}

     Which response is better? RESPONSE

(:data:`INPUT_FORMAT`; each part is tokenised on its own without special tokens, the tokenizer's own end ids, T5's
``</s>``, are appended, and the ids are concatenated: :func:`rlhfkit.models.pairrm.build_input`, with its equal
length cap and the markers never cut). The decoder runs ONE step from ``decoder_start_token_id``; with ``z`` its
logits over the vocabulary (B, V) and ``a``/``b`` the ids of the single tokens ``"A"``/``"B"``::

    logit(A, B) = z[a] - z[b]                       (B,)
    P(A better than B) = σ(z[a] - z[b]) = softmax(z[a], z[b])[0]

(the softmax over just the two answer tokens, as SteamSHP reads its score). Training and evaluation are those of
the PairRM ranker (`rlhfkit.models.pairrm`): ``core.losses.pointwise_bce`` on both orders of each pair, and the
symmetric logit ``(logit(A, B) - logit(B, A)) / 2`` so that position bias cancels.

Saved as a standard Hugging Face seq2seq folder (``AutoModelForSeq2SeqLM.from_pretrained`` loads it and gives the
same logits) plus the tokenizer and ``rlhfkit.json`` (``"kind": "seq2seq"``, the input format, the answer token
ids, ``max_length``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import has_tokenizer_files, hf_folder, load_tokenizer
from rlhfkit.models.pairrm import Ranker, build_input
from rlhfkit.models.reward import FORMAT_VERSION, METADATA_FILE, _read_metadata, disable_dropout, reward_pad_token_id

MARKERS = ("POST: ", "\n\n RESPONSE A: ", "\n\n RESPONSE B: ", "\n\n Which response is better? RESPONSE")
INPUT_FORMAT = f"{MARKERS[0]}{{prompt}}{MARKERS[1]}{{a}}{MARKERS[2]}{{b}}{MARKERS[3]}"
CHOICES = ("A", "B")


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """The ids of the answer tokens ``"A"`` and ``"B"``; RlhfkitError unless each is one token, and distinct."""
    ids = []
    for choice in CHOICES:
        encoded = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise RlhfkitError(f"the tokenizer encodes the answer {choice!r} as {len(encoded)} tokens {encoded}; a "
                               f"seq2seq preference model reads one logit per answer, so 'A' and 'B' must each be a "
                               f"single token (they are for T5's tokenizer)")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise RlhfkitError(f"the tokenizer encodes 'A' and 'B' as the same token {ids[0]} (not in its vocabulary?); "
                           f"a seq2seq preference model reads one logit per answer, so they must be two distinct "
                           f"single tokens (they are for T5's tokenizer)")
    return ids[0], ids[1]


def end_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer appends to a text with its special tokens (T5: ``[</s>]``; none for most BPEs)."""
    plain = tokenizer("A", add_special_tokens=False)["input_ids"]
    full = tokenizer("A")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    return full[start + len(plain):] if start is not None else []


class Seq2SeqRanker(Ranker):
    """SteamSHP-style ranker: ``forward(input_ids, attention_mask) -> logits (B,)`` = ``z[A] - z[B]`` at the first
    decoder step (module docstring). ``model`` is the ``*ForConditionalGeneration`` module (a peft ``PeftModel``
    around it after LoRA)."""

    kind, label = "seq2seq", "seq2seq (SteamSHP-style)"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int | None = None,
                 pad_token_id: int | None = None) -> None:
        super().__init__()
        config = model.config
        if not getattr(config, "is_encoder_decoder", False):
            raise RlhfkitError(f"a Seq2SeqRanker needs an encoder-decoder model (T5-like), got {config.model_type!r}")
        if config.decoder_start_token_id is None:
            raise RlhfkitError(f"the {config.model_type} config has no decoder_start_token_id; the ranker reads the "
                               f"first decoder step")
        if tokenizer is None:
            raise RlhfkitError("a Seq2SeqRanker needs its tokenizer (the ids of the answers 'A' and 'B')")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.a_id, self.b_id = answer_token_ids(tokenizer)
        self._pad_id = int(pad_token_id) if pad_token_id is not None else reward_pad_token_id(tokenizer)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @staticmethod
    def input_builder(tokenizer: Any) -> Callable[..., list[int]]:
        """``build(prompt, a, b, max_length=None)``: SteamSHP's format, the tokenizer's end ids appended."""
        return functools.partial(build_input, tokenizer, markers=MARKERS, end_ids=end_ids(tokenizer))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B,) ``z[A] - z[B]`` of the first decoder step; ``P(A better) = sigmoid(logit)``."""
        start = torch.full((input_ids.shape[0], 1), self.model.config.decoder_start_token_id, dtype=torch.long,
                           device=input_ids.device)
        z = self.model(input_ids=input_ids, attention_mask=attention_mask.long(), decoder_input_ids=start).logits[:, 0]
        return z[:, self.a_id] - z[:, self.b_id]

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, tokenizer: Any = None, max_length: int | None = None,
                      trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> "Seq2SeqRanker":
        """A ranker from an encoder-decoder LM folder (dropout off); its LM head reads the answers, no new weights."""
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        folder = hf_folder(path)
        if tokenizer is None:
            tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        config = disable_dropout(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True,
                                                          trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise RlhfkitError(f"cannot load an encoder-decoder (seq2seq) LM from {str(path)!r}: {e}") from e
        try:
            return cls(model, tokenizer, max_length)
        except RlhfkitError as e:
            raise RlhfkitError(f"{path}: {e}") from None

    def metadata(self) -> dict:
        """The ``rlhfkit.json`` content."""
        return {"format_version": FORMAT_VERSION, "kind": self.kind, "backbone_kind": self.kind,
                "input_format": INPUT_FORMAT, "answers": {"A": self.a_id, "B": self.b_id},
                "max_length": self.max_length, "pad_token_id": self.pad_id, "normalization": None}

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None) -> None:
        """A standard HF seq2seq folder (safetensors; LoRA merged into a copy first), the tokenizer (padding with
        ``pad_id``) and ``rlhfkit.json``. Files are written in place (`rm train` publishes them atomically)."""
        from rlhfkit.models.adapters import merge_lora_for_save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        merge_lora_for_save(self.model).save_pretrained(directory, safe_serialization=True)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer.pad_token_id != self.pad_id:
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.pad_id)
        tokenizer.save_pretrained(directory)
        (directory / METADATA_FILE).write_text(json.dumps(self.metadata(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        trust_remote_code: bool = False) -> "Seq2SeqRanker":
        """Restore a ranker saved by :meth:`save_pretrained` (dropout off, eval mode)."""
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        folder = Path(directory)
        meta = _read_metadata(folder) if folder.is_dir() else None
        if meta is None or meta.get("kind") != cls.kind:
            raise RlhfkitError(f"{str(directory)!r} is not a seq2seq ranker folder (its {METADATA_FILE} must say "
                               f"kind 'seq2seq')")
        if not has_tokenizer_files(folder):
            raise RlhfkitError(f"{folder}: no tokenizer files; a seq2seq ranker needs its tokenizer")
        config = disable_dropout(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
        model, info = AutoModelForSeq2SeqLM.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True,
                                                            trust_remote_code=trust_remote_code,
                                                            output_loading_info=True)
        if info["missing_keys"]:
            raise RlhfkitError(f"{folder}: incomplete seq2seq weights (missing {sorted(info['missing_keys'])[:5]})")
        ranker = cls(model.eval(), load_tokenizer(folder, trust_remote_code=trust_remote_code), meta.get("max_length"),
                     meta.get("pad_token_id"))
        if meta.get("answers") != {"A": ranker.a_id, "B": ranker.b_id}:
            raise RlhfkitError(f"{folder}: the tokenizer's answer ids {ranker.a_id}, {ranker.b_id} differ from those "
                               f"{METADATA_FILE} was trained with ({meta.get('answers')})")
        return ranker
