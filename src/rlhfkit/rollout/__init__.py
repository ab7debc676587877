"""Rollouts: batched sampling from the policy with a KV cache (see ``sampling``)."""

from rlhfkit.rollout.sampling import (
    GenerationConfig,
    GenerationConfigError,
    Rollout,
    filter_logits,
    generate_greedy,
    sample,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "GenerationConfig",
    "GenerationConfigError",
    "Rollout",
    "filter_logits",
    "generate_greedy",
    "sample",
    "top_k_filter",
    "top_p_filter",
]
