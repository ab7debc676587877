"""Advantage estimators over right-padded responses: GAE (with a critic) and the critic-free ones.

GAE and discounted returns; the critic-free group estimators GRPO / Dr. GRPO, RLOO and ReMax (outcome-level) and
REINFORCE++ (token-level reward-to-go). Advantage whitening is :func:`rlhfkit.core.masks.masked_whiten`; it is
not repeated here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhfkit.core.masks import masked_whiten


def _prefix_mask(response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("response_mask must be right-padded (each row's real tokens form a prefix)")
    return mask


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and the value targets (returns).

    Equation: ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = δ_t + γ λ A_{t+1}``, with ``V`` and ``A`` beyond the
    last response token taken as 0 (the episode ends there); ``returns_t = A_t + V_t``. Computed by a reverse
    loop over T, vectorised over B. Both outputs are 0 on padding.
    Shapes: ``rewards``, ``values``, ``response_mask`` (B, T) -> ``(advantages (B, T), returns (B, T))``.
    Raises ValueError when the mask is not a right-padded prefix.
    Source: Schulman et al. 2016, "High-dimensional continuous control using generalized advantage
    estimation", eqs. 11-16 (eq. 16 for the λ-weighted sum of δ).
    """
    mask = _prefix_mask(response_mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(mask, values, zero)
    rewards = torch.where(mask, rewards.to(values.dtype), zero)
    T = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    columns = [next_value] * T
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(mask[:, t], delta + gamma * gae_lambda * next_advantage, zero)
        columns[t] = advantage
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(columns, dim=1)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted reward-to-go of each response token.

    Equation: ``G_t = r_t + γ G_{t+1}``, with ``G`` beyond the last response token 0; 0 on padding.
    Shapes: ``rewards``, ``response_mask`` (B, T) -> (B, T). Raises ValueError for a non-prefix mask.
    Source: Sutton & Barto 2018, eq. 3.9 (the return); equals GAE with λ = 1 plus the values
    (Schulman et al. 2016, eq. 18).
    """
    mask = _prefix_mask(response_mask)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(mask, rewards, zero)
    T = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    columns = [running] * T
    for t in reversed(range(T)):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, zero)
        columns[t] = running
    return torch.stack(columns, dim=1)


# --------------------------------------------------------------------------- critic-free estimators
#
# Group layout, one rule for every group estimator: ``scores`` (N,) holds N = num_prompts × k sequence-level
# rewards ordered prompt-major, i.e. rows ``p·k … p·k + k - 1`` are the k responses to prompt p. A score is the
# reward of the whole response (the reward model's score; with the KL in the reward, the caller passes the row
# sum of the shaped rewards, as Ahmadian et al. 2024 do). Outcome-level estimators give every response token the
# advantage of its sequence: (N, T) outputs, 0 on padding.


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``scores`` (N,) -> (N / k, k), row p holding the k responses to prompt p; ValueError for a bad layout."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"samples_per_prompt k must be an integer >= 1, got {k!r}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if scores.numel() == 0 or scores.numel() % k:
        raise ValueError(f"{scores.numel()} scores are not a whole number of groups of samples_per_prompt k = {k} "
                         "(N = num_prompts × k, ordered prompt-major)")
    return scores.reshape(-1, k)


def outcome_to_tokens(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Give every response token of a row the row's sequence-level value.

    Equation: ``out[b, t] = m_bt · a_b``. Shapes: ``per_sequence`` (N,), ``response_mask`` (N, T) -> (N, T),
    0 on padding. Raises ValueError when the row counts differ.
    Source: outcome supervision, every token of a response gets its advantage (Shao et al. 2024, DeepSeekMath
    §4.1.2: "Â_{i,t} = r̃_i" for all t).
    """
    mask = response_mask.bool()
    if mask.dim() != 2 or mask.shape[0] != per_sequence.shape[0]:
        raise ValueError(f"response_mask {tuple(mask.shape)} does not have one row per score "
                         f"({per_sequence.shape[0]})")
    return torch.where(mask, per_sequence.unsqueeze(1), torch.zeros((), dtype=per_sequence.dtype,
                                                                    device=per_sequence.device))


def group_centered_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each score minus the mean score of its prompt's group.

    Equation: ``s̃_i = s_i - (1/k) Σ_{j ∈ g(i)} s_j``; for k = 1 every ``s̃_i`` is 0.
    Shapes: ``scores`` (N,) prompt-major, N = num_prompts × k -> (N,).
    Source: the group-mean baseline of GRPO (Shao et al. 2024, DeepSeekMath §4.1.2) without the std (Liu et al.
    2025, "Understanding R1-Zero-like training", Dr. GRPO), also the first step of REINFORCE++-baseline
    (Hu et al. 2025, arXiv:2501.03262, as OpenRLHF's ``reinforce_baseline`` documents it).
    """
    g = _groups(scores, k)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def grpo_advantages(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    k: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative outcome advantages of GRPO, or of Dr. GRPO with ``scale_by_std=False``.

    Equation: ``A_i = (s_i - mean_g) / (std_g + eps)`` with the mean and unbiased (Bessel) std of the k scores of
    the prompt's group; ``scale_by_std=False`` (Dr. GRPO): ``A_i = s_i - mean_g``. Every response token of row i
    gets ``A_i``. Definitions at the edges: the std of a single sample (k = 1) is 0, so every advantage is 0
    (``s_i - mean_g = 0``); a group of equal scores has std 0 and advantages exactly 0 (eps keeps the division
    finite).
    Shapes: ``scores`` (N,) prompt-major, N = num_prompts × k; ``response_mask`` (N, T) -> (N, T), 0 on padding.
    Raises ValueError for a layout that is not whole groups, or ``eps < 0``.
    Source: Shao et al. 2024, "DeepSeekMath", §4.1.2 (outcome supervision, ``r̃_i = (r_i - mean(r)) / std(r)``);
    Liu et al. 2025, "Understanding R1-Zero-like training: a critical perspective" (Dr. GRPO drops the std).
    """
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    centered = group_centered_scores(scores, k)
    if scale_by_std:
        g = _groups(scores, k)
        std = g.std(dim=1, unbiased=True) if k > 1 else torch.zeros_like(g[:, 0])
        centered = (centered.reshape(-1, k) / (std.unsqueeze(1) + eps)).reshape(-1)
    return outcome_to_tokens(centered, response_mask)


def rloo_advantages(scores: torch.Tensor, response_mask: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (RLOO) outcome advantages.

    Equation: ``A_i = s_i - (1/(k-1)) Σ_{j ∈ g(i), j ≠ i} s_j`` (the baseline of each sample is the mean of the
    other k - 1 samples of its prompt; equal to ``k/(k-1) · (s_i - mean_g)``). Every response token of row i gets
    ``A_i``. Needs k >= 2.
    Shapes: ``scores`` (N,) prompt-major, N = num_prompts × k; ``response_mask`` (N, T) -> (N, T), 0 on padding.
    Raises ValueError for k = 1 (no other sample to form a baseline) or a layout that is not whole groups.
    Source: Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!" (ICLR 2019 workshop);
    Ahmadian et al. 2024, "Back to basics: revisiting REINFORCE style optimization for learning from human
    feedback in LLMs" (ACL 2024).
    """
    if k == 1:
        raise ValueError("rloo needs samples_per_prompt k >= 2: the leave-one-out baseline of a single sample is "
                         "undefined")
    g = _groups(scores, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return outcome_to_tokens((g - baseline).reshape(-1), response_mask)


def remax_advantages(
    scores: torch.Tensor, greedy_scores: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """ReMax outcome advantages: the reward minus the reward of the greedy response to the same prompt.

    Equation: ``A_i = s_i - s^greedy_{p(i)}`` with ``p(i)`` the prompt of row i (k = N / num_prompts sampled
    responses per prompt, prompt-major); every response token of row i gets ``A_i``.
    Shapes: ``scores`` (N,), ``greedy_scores`` (num_prompts,), ``response_mask`` (N, T) -> (N, T), 0 on padding.
    Raises ValueError when N is not a multiple of the number of greedy scores.
    Source: Li et al. 2024, "ReMax: a simple, effective, and efficient reinforcement learning method for aligning
    large language models" (ICML), Algorithm 1 (baseline ``r(x, ȳ)`` with ``ȳ`` the greedy response).
    """
    if greedy_scores.dim() != 1 or greedy_scores.numel() == 0 or scores.numel() % greedy_scores.numel():
        raise ValueError(f"greedy_scores {tuple(greedy_scores.shape)} must hold one score per prompt of the "
                         f"{scores.numel()} (prompt-major) scores")
    g = _groups(scores, scores.numel() // greedy_scores.numel())
    return outcome_to_tokens((g - greedy_scores.to(g.dtype).unsqueeze(1)).reshape(-1), response_mask)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    whiten: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = masked_whiten,
) -> torch.Tensor:
    """REINFORCE++ advantages: the per-token reward-to-go of the KL-shaped rewards, whitened over the batch.

    Equation: ``G_t = r_t + γ G_{t+1}`` (:func:`discounted_returns`) with ``r_t = -β KL_t + [t = last] s``
    (:func:`rlhfkit.core.rewards.shape_rewards`), then ``A = whiten(G)`` over every response token of the batch,
    by default :func:`rlhfkit.core.masks.masked_whiten` (``(G - μ) / sqrt(var + 1e-8)``, unbiased var). A trainer
    with several processes passes a ``whiten`` with the statistics of the global batch. REINFORCE++-baseline:
    pass the rewards shaped from :func:`group_centered_scores` instead of the raw scores (group mean subtracted
    first, then reward-to-go, then the global whitening).
    Shapes: ``rewards``, ``response_mask`` (B, T) right-padded -> (B, T), 0 on padding. Raises ValueError for a
    non-prefix mask (and ``masked_whiten``'s for fewer than 2 tokens).
    Source: Hu et al. 2025, "REINFORCE++: an efficient RLHF algorithm with robustness to both prompt and reward
    models" (arXiv:2501.03262): token-level KL penalty in the reward, return from t, global advantage
    normalisation; its -baseline variant subtracts the group mean of the outcome reward first.
    """
    mask = _prefix_mask(response_mask)
    return whiten(discounted_returns(rewards, mask, gamma), mask)
