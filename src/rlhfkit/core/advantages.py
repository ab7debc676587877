"""Generalised advantage estimation and discounted returns over right-padded responses.

Advantage whitening is :func:`rlhfkit.core.masks.masked_whiten`; it is not repeated here.
"""

from __future__ import annotations

import torch


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
