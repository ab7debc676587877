"""Reward models: a transformer backbone plus a linear head, saved in standard Hugging Face layouts.

Kinds
-----
* ``decoder`` (GPT / Llama / Qwen style): wraps ``AutoModelForSequenceClassification`` (its ``base_model`` gives
  the hidden states, its bias-free ``score`` Linear is the head), so the saved folder is a standard HF folder.
  Aggregation of the per-token head outputs into the sequence score:

  - ``last``: the output at the last position where ``attention_mask`` is True (works with pad == EOS, and with
    left or right padding, because it never looks at pad ids);
  - ``mean`` / ``sum``: masked mean / sum over the ``response_mask`` tokens.
* ``encoder`` (BERT / DeBERTa style): ``AutoModel`` backbone plus a bias-free Linear head saved beside it in
  ``reward_head.safetensors``. Pooling: ``cls`` (the first real token) or ``mean`` (over ``attention_mask``).
  Because the head is linear, pooling the head outputs equals the head of the pooled hidden state.

Heads are initialised ``N(0, 1/(H+1))`` (std ``1/sqrt(H+1)``, H the hidden size), the rule of OpenAI's
lm-human-preferences reward head (Ziegler et al. 2019). A new VALUE head (the PPO critic started from a language
model, :func:`load_critic`) starts at zero instead, so that every value is exactly 0 at the first forward: the
rule of the same code base for its value head (``lm_human_preferences/language/model.py``: ``fc_layer(...,
scale=0 if head_name == 'value' else None)``).

Multi-aspect: ``num_aspects = K`` head outputs; ``aspect_weights`` (K,) combine them into the scalar reward,
``score = Σ_k w_k · aspect_score_k`` (default weights: 1 for K = 1, 1/K each otherwise).

Dropout is disabled: every float ``*dropout*`` / ``*pdrop`` entry of the model config is set to 0 at construction
and at loading, so that training-mode and eval-mode scores agree and chosen/rejected see the same network.

Padding and the HF loader: rlhfkit reads the score at the last ``attention_mask`` position; HF's
``*ForSequenceClassification`` reads it at the rightmost token whose id differs from ``config.pad_token_id``. With
pad == EOS and sequences that end with EOS, HF would skip the EOS. The saved ``config.pad_token_id`` is therefore
:func:`reward_pad_token_id` (distinct from EOS), the saved tokenizer pads with that id, and rlhfkit's reward-model
collate must pad with it as well; then on a right-padded batch HF and rlhfkit read the same token.

Conventions (``RewardModel.convention``, ``rlhfkit.json`` key ``convention``): how a model's inputs are rendered
(:func:`rlhfkit.data.tokenize.encode_for_rm`) and which token its score is read at.

* ``"rlhfkit"`` (folders written by rlhfkit): prompt and response tokenised apart, EOS appended to a complete
  response, score at the last ``attention_mask`` position (above).
* ``"hf"`` (a folder without ``rlhfkit.json``: a reward model from another trainer, e.g. TRL's
  ``RewardTrainer``): the text as TRL 1.9 renders it (one string, EOS text appended), score at the last
  ``attention_mask`` position whose id is not ``config.pad_token_id``, i.e. exactly what
  ``AutoModelForSequenceClassification`` gives on that text. TRL pads with EOS when the tokenizer has no pad
  token and stores that as ``config.pad_token_id``; HF then reads the token BEFORE the appended EOS, and so does
  rlhfkit for such a folder. Decoder models with ``last`` aggregation only.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig

from rlhfkit.core.masks import masked_mean, masked_sum
from rlhfkit.data.tokenize import CONVENTIONS
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import forward_hidden, has_tokenizer_files, hf_folder, load_tokenizer, same_vocabulary
from rlhfkit.models.packing import VARLEN_ATTENTION, packed_hidden, shared_prompt_layout, varlen_layout, varlen_problem
from rlhfkit.models.trunk import Trunk, run_blocks

METADATA_FILE = "rlhfkit.json"
HEAD_FILE = "reward_head.safetensors"
FORMAT_VERSION = 1
AGGREGATIONS = {"decoder": ("last", "mean", "sum"), "encoder": ("cls", "mean")}
HEAD_INITS = ("normal", "zero")


@dataclass
class RewardOutput:
    """Reward-model outputs. ``aspect_*`` are None when ``num_aspects == 1``.

    scores (B,); token_scores (B, L) (head outputs combined over aspects, 0 at padding);
    aspect_scores (B, K); aspect_token_scores (B, L, K).
    """

    scores: torch.Tensor
    token_scores: torch.Tensor
    aspect_scores: torch.Tensor | None = None
    aspect_token_scores: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def reward_pad_token_id(tokenizer: Any) -> int:
    """The pad id a reward model is saved with and batches for it are padded with: never the EOS id.

    The first of (pad, unk, bos) that differs from EOS; failing all, id 0 (or 1 if EOS is 0). For SmolLM2 (pad ==
    EOS == ``<|im_end|>`` 2) this is the unk token ``<|endoftext|>`` (id 0).
    """
    eos = tokenizer.eos_token_id
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id):
        if candidate is not None and candidate != eos:
            return int(candidate)
    return 0 if eos != 0 else 1


def _config_pad_token_id(config: PretrainedConfig) -> int:
    """Like :func:`reward_pad_token_id` from a config alone (no tokenizer available)."""
    eos = config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    for candidate in (config.pad_token_id, getattr(config, "unk_token_id", None), config.bos_token_id):
        if candidate is not None and candidate not in eos_ids:
            return int(candidate)
    return 0 if 0 not in eos_ids else 1


def disable_dropout(config: PretrainedConfig) -> PretrainedConfig:
    """Set every float dropout probability of the config (``*dropout*``, ``*pdrop``) to 0, in place."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)
    return config


def init_head_(head: nn.Linear, init: str = "normal") -> None:
    """Initialise a head in place, bias 0: ``normal`` (a reward head): weights ~ N(0, std²) with std =
    1/sqrt(H + 1); ``zero`` (a value head): weights 0. Both rules are lm-human-preferences' (module docstring)."""
    if init not in HEAD_INITS:
        raise RlhfkitError(f"unknown head initialisation {init!r}; expected one of {HEAD_INITS}")
    with torch.no_grad():
        if init == "zero":
            head.weight.zero_()
        else:
            head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()


def unwrap_peft(module: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft ``PeftModel`` (LoRA layers stay injected); else itself."""
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost True of each row of a (B, L) mask (0 for an all-False row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, 0).argmax(dim=-1)


def first_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the leftmost True of each row of a (B, L) mask (0 for an all-False row)."""
    return mask.bool().int().argmax(dim=-1)


def _read_metadata(folder: Path) -> dict | None:
    path = folder / METADATA_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RlhfkitError(f"{path}: not valid JSON ({e})") from e
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise RlhfkitError(
            f"{path}: format_version {meta.get('format_version')} is newer than this rlhfkit understands "
            f"({FORMAT_VERSION}); upgrade rlhfkit"
        )
    return meta


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """A backbone plus a linear head giving one score per sequence (see the module docstring).

    Build a new one with :meth:`from_backbone`, restore one with :meth:`from_pretrained`.
    ``model`` is the transformers module (``*ForSequenceClassification`` for the decoder kind, ``AutoModel`` for
    the encoder kind; a peft ``PeftModel`` around it after :func:`rlhfkit.models.adapters.apply_lora`).
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        aggregation: str,
        aspect_names: Sequence[str],
        aspect_weights: Sequence[float] | torch.Tensor,
        head: nn.Linear | None = None,
        normalization: dict | None = None,
        convention: str = "rlhfkit",
    ) -> None:
        super().__init__()
        if convention not in CONVENTIONS:
            raise RlhfkitError(f"unknown reward-model convention {convention!r}; expected one of {CONVENTIONS}")
        if convention == "hf" and (kind, aggregation) != ("decoder", "last"):
            raise RlhfkitError(f"the 'hf' convention reads the last non-pad token: it needs a decoder with 'last' "
                               f"aggregation, not {kind}/{aggregation}")
        if kind not in AGGREGATIONS:
            raise RlhfkitError(f"unknown reward model kind {kind!r}; expected one of {sorted(AGGREGATIONS)}")
        if aggregation not in AGGREGATIONS[kind]:
            raise RlhfkitError(
                f"aggregation {aggregation!r} is not available for the {kind} kind; expected one of "
                f"{AGGREGATIONS[kind]}"
            )
        if (kind == "encoder") != (head is not None):
            raise ValueError("the encoder kind takes a separate head; the decoder kind uses the model's `score`")
        weights = torch.as_tensor(aspect_weights, dtype=torch.float32).reshape(-1)
        if len(aspect_names) != weights.numel() or len(set(aspect_names)) != len(aspect_names):
            raise RlhfkitError(
                f"need one distinct aspect name per aspect weight; got names {list(aspect_names)} and "
                f"{weights.numel()} weights"
            )
        self.model = model
        self.head = head
        self.kind = kind
        self.aggregation = aggregation
        self.aspect_names = list(aspect_names)
        self.register_buffer("aspect_weights", weights, persistent=False)
        self.normalization = normalization
        self.convention = convention
        self.eval()

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        path: str | os.PathLike,
        kind: str = "decoder",
        aggregation: str | None = None,
        num_aspects: int = 1,
        aspect_names: Sequence[str] | None = None,
        aspect_weights: Sequence[float] | None = None,
        tokenizer: Any = None,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        head_init: str = "normal",
    ) -> "RewardModel":
        """A new reward model from a language model (HF folder, ``.gguf``, or folder with one ``.gguf``).

        The head is freshly initialised: ``head_init="normal"`` (std 1/sqrt(H+1), a reward head) or ``"zero"``
        (a value head, see :func:`load_critic`); ``aggregation`` defaults to ``last`` (decoder) or ``cls``
        (encoder). The pad id comes from ``tokenizer`` (loaded from ``path`` when not given and present).
        """
        if kind not in AGGREGATIONS:
            raise RlhfkitError(f"unknown reward model kind {kind!r}; expected one of {sorted(AGGREGATIONS)}")
        aggregation = aggregation or AGGREGATIONS[kind][0]
        if aggregation not in AGGREGATIONS[kind]:
            raise RlhfkitError(f"aggregation {aggregation!r} is not available for the {kind} kind; expected one "
                               f"of {AGGREGATIONS[kind]}")
        folder = hf_folder(path)
        names = list(aspect_names) if aspect_names is not None else (
            ["score"] if num_aspects == 1 else [f"aspect_{k}" for k in range(num_aspects)])
        if len(names) != num_aspects or num_aspects < 1:
            raise RlhfkitError(f"num_aspects={num_aspects} but {len(names)} aspect names were given: {names}")
        weights = list(aspect_weights) if aspect_weights is not None else [1.0 / num_aspects] * num_aspects
        config = disable_dropout(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
        if tokenizer is None and has_tokenizer_files(folder):
            tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
        config.pad_token_id = reward_pad_token_id(tokenizer) if tokenizer is not None else _config_pad_token_id(config)
        common = dict(config=config, dtype=dtype, attn_implementation=attn_implementation,
                      trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True)
        if kind == "decoder":
            config.num_labels = num_aspects
            config.id2label = dict(enumerate(names))
            config.label2id = {n: i for i, n in enumerate(names)}
            model, info = _from_pretrained(AutoModelForSequenceClassification, folder, common)
            score = getattr(model, "score", None)
            if not isinstance(score, nn.Linear) or score.bias is not None:
                raise RlhfkitError(
                    f"{type(model).__name__} has no bias-free `score` head; the decoder kind supports "
                    f"GPT/Llama/Qwen-style models (for BERT-style models use kind='encoder')"
                )
            expected_missing = {"score.weight"}
            head = None
        else:
            model, info = _from_pretrained(AutoModel, folder, common)
            if getattr(model, "pooler", None) is not None:
                model.pooler = None  # unused: pooling is done on the head outputs
            hidden = config.get_text_config().hidden_size
            head = nn.Linear(hidden, num_aspects, bias=False, dtype=dtype)
            expected_missing = set()
        unexpected_missing = {k for k in info["missing_keys"] if k not in expected_missing and "pooler" not in k}
        if unexpected_missing:
            raise RlhfkitError(
                f"{folder}: the backbone weights do not match a {kind} reward model (missing "
                f"{sorted(unexpected_missing)[:5]}...); is this the right kind of model?"
            )
        init_head_(head if head is not None else model.score, head_init)
        return cls(model, kind, aggregation, names, weights, head=head)

    # -- forward -----------------------------------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        hf = unwrap_peft(self.model)
        return hf if self.kind == "encoder" else hf.base_model

    def _head(self) -> nn.Module:
        return self.head if self.kind == "encoder" else unwrap_peft(self.model).score

    @property
    def num_aspects(self) -> int:
        return len(self.aspect_names)

    @property
    def config(self) -> PretrainedConfig:
        return unwrap_peft(self.model).config

    @property
    def packs_prompts(self) -> bool:
        """Whether ``forward(..., share_prompts=True)`` can pack: a decoder whose attention takes a custom 4-D bool
        mask as-is (SDPA; eager attention would add it as a float bias)."""
        return self.kind == "decoder" and getattr(self.config, "_attn_implementation", None) in ("sdpa",
                                                                                                 VARLEN_ATTENTION)

    def packing_problem(self) -> str | None:
        """Why ``forward(..., packing=True)`` cannot pack rows padding-free (`models.packing.varlen_problem`: a
        decoder with SDPA attention and no sliding window, ...); None if it can."""
        if self.kind != "decoder":
            return f"the {self.kind} kind is bidirectional; padding-free packing needs a decoder (causal) model"
        return varlen_problem(self._backbone())

    @property
    def pad_token_id(self) -> int | None:
        """The id batches for this model are padded with (``config.pad_token_id``); see the module docstring."""
        return self.config.pad_token_id

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None,
        share_prompts: bool = False, trunk: Trunk | None = None, packing: bool = False,
    ) -> RewardOutput:
        """Scores of a batch: ``input_ids``, ``attention_mask`` (B, L); ``response_mask`` (B, L) for mean/sum.

        ``packing``: run all rows as one padding-free packed sequence with per-segment attention
        (`rlhfkit.models.packing.varlen_layout`; any padding side); with ``share_prompts`` too, rows that share
        their prompt run it once. Used where :meth:`packing_problem` is None, else ignored.
        ``share_prompts`` alone: run the prompt of right-padded rows that share it once, in a padded packed batch with
        a dense block-causal mask (`rlhfkit.models.packing.shared_prompt_layout`; the prompt is what precedes
        ``response_mask``); used by a decoder with SDPA attention when a response mask is given, else ignored.
        Both give the same outputs up to float rounding.
        ``trunk``: the backbone's hidden states after its first ``trunk.layers`` blocks for this batch
        (`rlhfkit.models.trunk`); only the blocks above run (a decoder whose backbone `models.trunk.supports_split`),
        packed with ``packing`` (the trunk's real tokens), else padded (no dense ``share_prompts`` packing).
        """
        attention_mask = attention_mask.bool()
        layout = None
        if packing and self.packing_problem() is None:
            layout = varlen_layout(input_ids, attention_mask, response_mask, share_prompts)
        elif trunk is None and share_prompts and response_mask is not None and self.packs_prompts:
            layout = shared_prompt_layout(input_ids, attention_mask, response_mask, self.pad_token_id or 0)
        backbone = self._backbone()
        if layout is not None:
            # back to (B, L, K)
            per_token = layout.unpack(self._head()(packed_hidden(backbone, layout, trunk)))
        elif trunk is not None:
            hidden = run_blocks(backbone, attention_mask, trunk.layers, hidden=trunk.hidden)
            per_token = self._head()(hidden)
        else:
            hidden = forward_hidden(backbone, input_ids, attention_mask)  # (B, L, H)
            per_token = self._head()(hidden)  # (B, L, K), computed in the model's dtype (as HF does)
        per_token = per_token.to(torch.promote_types(per_token.dtype, torch.float32))  # bf16 -> fp32 outputs
        per_token = torch.where(attention_mask[..., None], per_token, 0.0)
        if self.aggregation in ("last", "cls"):
            readable = attention_mask
            if self.convention == "hf" and self.pad_token_id is not None:  # HF's "last non-pad token"
                readable = attention_mask & (input_ids != self.pad_token_id)
            idx = last_true_index(readable) if self.aggregation == "last" else first_true_index(attention_mask)
            aspect_scores = per_token[torch.arange(per_token.shape[0], device=idx.device), idx]  # (B, K)
        else:
            mask = attention_mask if self.kind == "encoder" else response_mask
            if mask is None:
                raise RlhfkitError(f"aggregation {self.aggregation!r} needs a response_mask")
            reduce = masked_sum if self.aggregation == "sum" else masked_mean
            aspect_scores = reduce(per_token, mask.bool()[..., None], dim=1)  # (B, K)
        weights = self.aspect_weights.to(per_token.device, per_token.dtype)
        single = self.num_aspects == 1
        return RewardOutput(
            scores=aspect_scores @ weights,
            token_scores=per_token @ weights,
            aspect_scores=None if single else aspect_scores,
            aspect_token_scores=None if single else per_token,
        )

    # -- normalisation -----------------------------------------------------------------------------------
    def set_normalization(self, mean: float | None, std: float | None) -> None:
        """Store score statistics (saved in the metadata); ``None`` for both clears them."""
        if mean is None and std is None:
            self.normalization = None
            return
        if mean is None or std is None or not math.isfinite(mean) or not (math.isfinite(std) and std > 0):
            raise RlhfkitError(f"normalisation needs a finite mean and a finite std > 0; got mean={mean}, std={std}")
        self.normalization = {"mean": float(mean), "std": float(std)}

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores - mean) / std`` with the stored statistics."""
        if self.normalization is None:
            raise RlhfkitError("this reward model has no normalisation statistics; call set_normalization first")
        return (scores - self.normalization["mean"]) / self.normalization["std"]

    # -- saving and loading ------------------------------------------------------------------------------
    def metadata(self, kind_label: str | None = None) -> dict:
        """The ``rlhfkit.json`` content."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": kind_label or self.kind,
            "backbone_kind": self.kind,
            "aggregation": self.aggregation if self.kind == "decoder" else None,
            "pooling": self.aggregation if self.kind == "encoder" else None,
            "aspects": {"names": self.aspect_names, "weights": self.aspect_weights.tolist()},
            "normalization": self.normalization,
            "pad_token_id": self.pad_token_id,
            "convention": self.convention,
        }

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any = None, _kind_label: str | None = None,
                        _extra: dict | None = None) -> None:
        """Write a standard HF folder (safetensors) + ``rlhfkit.json`` (+ the tokenizer, padding with
        ``pad_token_id``). LoRA adapters are merged into a copy first. Files are written in place: wrap the
        call in ``rlhfkit.utils.atomic_dir`` for an all-or-nothing write."""
        from rlhfkit.models.adapters import has_lora, merge_lora_for_save  # adapters imports this module

        if has_lora(self):
            merge_lora_for_save(self).save_pretrained(directory, tokenizer, _kind_label, _extra)
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        if self.head is not None:
            save_file({"weight": self.head.weight.detach().contiguous()}, str(directory / HEAD_FILE))
        if tokenizer is not None:
            tokenizer = copy.deepcopy(tokenizer)
            if self.pad_token_id is not None and tokenizer.pad_token_id != self.pad_token_id:
                tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.pad_token_id)
            tokenizer.save_pretrained(directory)
        meta = {**self.metadata(_kind_label), **(_extra or {})}
        (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
        trust_remote_code: bool = False, _allow_kind: str | None = None,
    ) -> "RewardModel":
        """Restore a reward model saved by :meth:`save_pretrained`, or a plain HF
        ``*ForSequenceClassification`` folder (taken as decoder / last, one aspect per label, ``"hf"`` convention:
        see the module docstring)."""
        folder = Path(directory)
        if not (folder / "config.json").is_file():
            raise RlhfkitError(f"{str(directory)!r} is not a reward model folder (no config.json)")
        meta = _read_metadata(folder)
        config = disable_dropout(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
        if meta is None:
            archs = config.architectures or []
            if not any(a.endswith("ForSequenceClassification") for a in archs):
                raise RlhfkitError(
                    f"{folder} is not a reward model folder (no {METADATA_FILE}, architecture {archs}); to start a "
                    f"reward model from a language model use RewardModel.from_backbone"
                )
            k = config.num_labels
            names = [str(config.id2label.get(i, f"aspect_{i}")) for i in range(k)] if k > 1 else ["score"]
            meta = {"kind": "decoder", "backbone_kind": "decoder", "aggregation": "last",
                    "aspects": {"names": names, "weights": [1.0 / k] * k}, "normalization": None,
                    "convention": "hf"}
        if meta["kind"] not in ("decoder", "encoder", _allow_kind):
            raise RlhfkitError(f"{folder} holds a {meta['kind']!r} model, not a reward model; load it with the "
                               f"matching class (e.g. rlhfkit.models.pairrm.PairRanker for 'pairrm')")
        kind = meta.get("backbone_kind", meta["kind"])
        common = dict(config=config, dtype=dtype, attn_implementation=attn_implementation,
                      trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True)
        names = meta["aspects"]["names"]
        if kind == "decoder":
            model, info = _from_pretrained(AutoModelForSequenceClassification, folder, common)
            head, aggregation = None, meta["aggregation"]
        else:
            model, info = _from_pretrained(AutoModel, folder, common)
            if getattr(model, "pooler", None) is not None:
                model.pooler = None
            head_path = folder / HEAD_FILE
            if not head_path.is_file():
                raise RlhfkitError(f"{folder}: missing {HEAD_FILE} (the encoder reward head)")
            weight = load_file(str(head_path))["weight"]
            head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
            with torch.no_grad():
                head.weight.copy_(weight)
            aggregation = meta["pooling"]
        missing = {k for k in info["missing_keys"] if "pooler" not in k}
        if missing:
            raise RlhfkitError(f"{folder}: incomplete reward model weights (missing {sorted(missing)[:5]})")
        out_features = head.out_features if head is not None else model.score.out_features
        if out_features != len(names):
            raise RlhfkitError(f"{folder}: the head has {out_features} outputs but {METADATA_FILE} names "
                               f"{len(names)} aspects")
        return cls(model, kind, aggregation, names, meta["aspects"]["weights"], head=head,
                   normalization=meta.get("normalization"), convention=meta.get("convention", "rlhfkit"))


def _from_pretrained(auto_cls: Any, folder: Path, kwargs: dict) -> tuple[nn.Module, dict]:
    try:
        model, info = auto_cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise RlhfkitError(f"cannot load a model from {str(folder)!r} (safetensors only): {e}") from e
    return model.eval(), info


def is_reward_model_folder(path: str | os.PathLike) -> bool:
    """True for a folder saved by :meth:`RewardModel.save_pretrained` or a plain HF sequence-classifier."""
    folder = Path(path)
    if (folder / METADATA_FILE).is_file():
        return True
    if not (folder / "config.json").is_file():
        return False
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def critic_problem(path: str | os.PathLike, tokenizer: Any = None, trust_remote_code: bool = False) -> str | None:
    """Why the reward-model folder ``path`` cannot be the PPO critic of a policy with ``tokenizer``; None if it can.

    The critic reads the policy's token ids, so the folder must hold a decoder (causal) model whose tokenizer has
    the policy's vocabulary (:func:`rlhfkit.models.loading.same_vocabulary`, the rule of the reward scorer's id
    path). A folder without tokenizer files cannot show that, and is refused too. ``tokenizer=None`` checks the
    kind only.
    """
    folder = Path(path)
    meta = _read_metadata(folder)
    if meta is not None and meta["kind"] in ("pairrm", "seq2seq"):
        return f"it holds a {meta['kind']} ranker, which compares two responses and has no per-token scores"
    kind = meta.get("backbone_kind", meta["kind"]) if meta is not None else "decoder"
    if kind != "decoder":
        return f"it holds an {kind} model; the critic needs a decoder (causal) model"
    if tokenizer is None:
        return None
    if not has_tokenizer_files(folder):
        return "it holds no tokenizer files, so nothing shows that it reads the policy's token ids"
    own = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    if not same_vocabulary(own, tokenizer):
        return (f"its tokenizer ({len(own)} tokens) differs from the policy's ({len(tokenizer)} tokens) in its "
                f"vocabulary or its BOS/EOS/UNK ids, and the critic reads the policy's token ids")
    return None


def load_critic(
    path: str | os.PathLike, tokenizer: Any = None, dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa", trust_remote_code: bool = False,
) -> RewardModel:
    """The PPO critic: a decoder reward model whose per-token ``token_scores`` are the values (B, L).

    From a reward-model folder (its trained head), which must pass :func:`critic_problem` for the policy's
    ``tokenizer`` (RlhfkitError naming the folder and the reason otherwise; without ``tokenizer`` only its kind is
    checked); or else from a language model (HF folder / GGUF) plus a new value head initialised to zero, so
    that every value is exactly 0 at the start (lm-human-preferences' value head; the module docstring).
    """
    kw = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    if is_reward_model_folder(path):
        problem = critic_problem(path, tokenizer, trust_remote_code=trust_remote_code)
        if problem is not None:
            raise RlhfkitError(f"the reward model {str(path)!r} cannot be the critic: {problem}; start the critic "
                               f"from the policy instead (critic_init=policy)")
        critic = RewardModel.from_pretrained(path, **kw)
        # the critic reads per-token values only; the RM's sequence aggregation (mean/sum need a response mask
        # the critic's callers do not pass) plays no part
        critic.aggregation = "last"
        return critic
    return RewardModel.from_backbone(path, kind="decoder", aggregation="last", tokenizer=tokenizer,
                                     head_init="zero", **kw)
