"""Step 4 of a PPO iteration: advantages (and, for ``gae``, returns) by the configured ``advantage_estimator``.

A dispatch onto `core.advantages`; no equation is written here. Layout: this process's rows are whole groups of
``samples_per_prompt`` = k responses, prompt-major (rows p·k … p·k + k - 1 answer prompt p; the trainer samples
them so), so the group estimators need no collective; whitening (``gae`` with ``whiten_advantages``,
``reinforce_pp*`` always) uses the statistics of the global batch (`ppo_update.global_whiten`).
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhfkit.core.advantages import (gae, group_centered_scores, grpo_advantages, reinforce_pp_advantages,
                                     remax_advantages, rloo_advantages)
from rlhfkit.core.masks import masked_sum
from rlhfkit.errors import RlhfkitError
from rlhfkit.train.ppo_config import PPOConfig
from rlhfkit.train.engine.processes import Processes
from rlhfkit.train.ppo_update import global_whiten


def estimate_advantages(
    cfg: PPOConfig,
    rewards: torch.Tensor,
    scores: torch.Tensor,
    shape: Callable[[torch.Tensor], torch.Tensor],
    old_values: torch.Tensor | None,
    response_mask: torch.Tensor,
    dist: Processes,
    greedy_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages (B, T), returns (B, T) or None)`` of this process's rows.

    ``rewards``: the per-token shaped rewards (`core.rewards.shape_rewards`: the score on the last token, minus
    ``kl_coef``·KL on every token with ``kl_in=reward``, no KL with ``kl_in=loss``); ``scores`` (B,) the processed
    scores that entered them; ``shape(scores)`` gives the shaped rewards of other scores (the same KL terms);
    ``old_values`` the critic's values (``gae`` only); ``greedy_scores`` (B / k,) the processed scores of the
    greedy responses to this process's prompts (``remax`` only).

    - ``gae``: `core.advantages.gae` on the rewards (scaled by their global std first with ``whiten_rewards``),
      the advantages globally whitened with ``whiten_advantages``; returns for the value loss.
    - ``grpo`` / ``dr_grpo`` / ``rloo``: the outcome score of a response is the row sum of its shaped rewards
      (its score, plus its KL penalty with ``kl_in=reward``, as Ahmadian et al. 2024 do), then
      `core.advantages.grpo_advantages` (``scale_by_std`` for grpo only) or `rloo_advantages`; no returns.
    - ``reinforce_pp``: `core.advantages.reinforce_pp_advantages` (per-token reward-to-go with ``gamma``,
      globally whitened); ``reinforce_pp_baseline``: the same on the rewards shaped from
      `core.advantages.group_centered_scores` of the scores.
    - ``remax``: `core.advantages.remax_advantages` of the outcome scores (as above) against the greedy
      responses' scores (their score alone: no KL term, which would need forward passes of the greedy responses).
    """
    est, k, mask = cfg.advantage_estimator, cfg.samples_per_prompt, response_mask.bool()

    def whiten(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return global_whiten(x, m, dist)

    try:
        if est == "gae":
            if cfg.whiten_rewards:
                rewards = global_whiten(rewards, mask, dist, shift_mean=False)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
            return (whiten(advantages, mask) if cfg.whiten_advantages else advantages), returns
        if est == "reinforce_pp":
            return reinforce_pp_advantages(rewards, mask, cfg.gamma, whiten), None
        if est == "reinforce_pp_baseline":
            return reinforce_pp_advantages(shape(group_centered_scores(scores, k)), mask, cfg.gamma, whiten), None
        outcome = masked_sum(rewards, mask, dim=1)
        if est in ("grpo", "dr_grpo"):
            return grpo_advantages(outcome, mask, k, scale_by_std=est == "grpo"), None
        if est == "rloo":
            return rloo_advantages(outcome, mask, k), None
        if est == "remax":
            if greedy_scores is None:
                raise RlhfkitError("advantage_estimator='remax' needs the greedy responses' scores")
            return remax_advantages(outcome, greedy_scores.to(outcome.dtype), mask), None
    except ValueError as e:
        raise RlhfkitError(f"advantage_estimator={est!r}: {e}") from None
    raise RlhfkitError(f"unknown advantage_estimator {est!r}")
