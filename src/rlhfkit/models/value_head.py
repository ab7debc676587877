"""The value head of ``critic=shared``: a scalar Linear on the policy's own trunk (no separate critic model).

``ValueHead`` is ``Linear(H, 1)`` (weight and bias) applied to the policy's final hidden state (after its last
norm: what the LM head reads) at the response-predicting positions, so value ``t`` = ``w · h_{P-1+t} + b``, the
value of the state before response token ``t`` (`rollout.forward.policy_value_forward`). It starts at zero
(weight and bias): every value is exactly 0 at the first forward, and the value loss sends no gradient into the
policy's trunk until the head has moved away from 0 (the gradient of ``v`` with respect to the hidden state is
``w``). That is the rule of lm-human-preferences for its value head (``scale=0`` for ``head_name == 'value'``,
the rule `models.reward.init_head_` ``"zero"`` implements); TRL's classic ``AutoModelForCausalLMWithValueHead``
draws it at random instead.

Saved as ``value_head.safetensors`` (tensors ``weight`` (1, H) and ``bias`` (1,), float32 or the policy's dtype)
beside the policy folder; `load_value_head` reads it back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.models.reward import init_head_

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """``Linear(hidden_size, 1)`` giving one value per hidden state: (..., H) -> (..., 1)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, bias=True, dtype=dtype, device=device)
        init_head_(self.summary, "zero")

    @property
    def hidden_size(self) -> int:
        return self.summary.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden)

    @classmethod
    def for_model(cls, lm: nn.Module) -> "ValueHead":
        """A zero head for a causal LM (or a peft model around one): its LM head's input size, dtype and device."""
        base = lm.get_base_model() if callable(getattr(lm, "get_base_model", None)) else lm
        head = base.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise RlhfkitError(f"critic=shared: {type(base).__name__} has no output layer to read hidden states at")
        weight = head.weight
        return cls(weight.shape[1], dtype=weight.dtype, device=weight.device)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``weight`` (1, H) and ``bias`` (1,) to a safetensors file."""
        save_file({"weight": self.summary.weight.detach().cpu().contiguous(),
                   "bias": self.summary.bias.detach().cpu().contiguous()}, str(path))


def load_value_head(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ValueHead:
    """The `ValueHead` saved at ``path`` (`ValueHead.save`)."""
    path = Path(path)
    if not path.is_file():
        raise RlhfkitError(f"{path}: no value head file")
    tensors = load_file(str(path))
    if set(tensors) != {"weight", "bias"} or tensors["weight"].dim() != 2 or tensors["weight"].shape[0] != 1:
        raise RlhfkitError(f"{path}: not a value head (expected weight (1, H) and bias (1,), got "
                           f"{ {k: tuple(v.shape) for k, v in tensors.items()} })")
    head = ValueHead(tensors["weight"].shape[1], dtype=dtype)
    with torch.no_grad():
        head.summary.weight.copy_(tensors["weight"])
        head.summary.bias.copy_(tensors["bias"])
    return head
