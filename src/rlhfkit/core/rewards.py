"""Reward-model score post-processing and the KL-shaped per-token reward of RLHF-PPO."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from rlhfkit.core.kl import kl_penalty

MISSING_STOP_MODES: tuple[str, ...] = ("replace", "subtract")


def whiten_scores(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise a batch of scores to zero mean and unit standard deviation.

    Equation: ``(s - mean(s)) / (std(s) + eps)`` with the unbiased (Bessel-corrected, ddof=1) std.
    Shapes: ``scores`` (B,) -> (B,). Raises ValueError when B < 2.
    Source: per-batch reward normalisation (Ziegler et al. 2019 normalise RM outputs; Huang et al. 2024,
    "The N+ implementation details of RLHF with PPO", reward whitening).
    """
    if scores.numel() < 2:
        raise ValueError("whiten_scores needs at least 2 scores (unbiased std)")
    return (scores - scores.mean()) / (scores.std(unbiased=True) + eps)


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clip scores to ``[-clip, clip]``; ``clip=None`` leaves them unchanged.

    Equation: ``min(max(s, -c), c)``. Shapes: any -> same. Raises ValueError when ``clip <= 0``.
    Source: reward clipping (Mnih et al. 2015 clip Atari rewards to [-1, 1]); the score clip option of TRL's PPO.
    """
    if clip is None:
        return scores
    if not clip > 0:
        raise ValueError(f"score clip must be > 0, got {clip}")
    return scores.clamp(-clip, clip)


class RunningMoments:
    """Running mean and (unbiased) variance of every score seen so far.

    Batches are merged with the parallel formula of Chan, Golub & LeVeque (1979): for the running
    ``(n_a, μ_a, M2_a)`` and a batch ``(n_b, μ_b, M2_b)`` (``M2`` = sum of squared deviations from the mean),
    ``δ = μ_b - μ_a``, ``n = n_a + n_b``, ``μ = μ_a + δ n_b / n``, ``M2 = M2_a + M2_b + δ² n_a n_b / n``.
    ``var = M2 / (n - 1)`` (unbiased), ``std = sqrt(var)``; both nan while ``count < 2``. Accumulates in Python
    floats (float64), so the state is JSON-serialisable.
    """

    def __init__(self) -> None:
        self.count: int = 0
        self.mean: float = 0.0
        self.m2: float = 0.0

    @property
    def var(self) -> float:
        """Unbiased variance of all scores seen (nan while count < 2)."""
        return self.m2 / (self.count - 1) if self.count >= 2 else math.nan

    @property
    def std(self) -> float:
        """Unbiased standard deviation of all scores seen (nan while count < 2)."""
        return math.sqrt(self.var)

    def update(self, batch: torch.Tensor) -> tuple[float, float]:
        """Merge a batch of scores (any shape, at least one element); return its own (mean, unbiased std).

        The batch std is nan for a single-element batch.
        """
        values = batch.detach().double().flatten()
        n_b = values.numel()
        if n_b == 0:
            raise ValueError("RunningMoments.update got an empty batch")
        mean_b = values.mean().item()
        m2_b = (values - mean_b).square().sum().item()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n
        std_b = math.sqrt(m2_b / (n_b - 1)) if n_b >= 2 else math.nan
        return mean_b, std_b

    def normalize(self, scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``(s - mean) / (std + eps)`` with the running statistics; ValueError while count < 2."""
        if self.count < 2:
            raise ValueError("RunningMoments.normalize needs at least 2 scores seen")
        return (scores - self.mean) / (self.std + eps)

    def state_dict(self) -> dict[str, float | int]:
        """Plain numbers: ``{"count": int, "mean": float, "m2": float}``."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore the state written by :meth:`state_dict`."""
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def missing_stop_penalty(
    scores: torch.Tensor, stopped: torch.Tensor, penalty: float | None, mode: str
) -> torch.Tensor:
    """Penalise responses that did not end with a stop token (truncated at the length limit).

    Equation: where ``stopped`` is False, ``mode="replace"``: ``s := penalty``; ``mode="subtract"``:
    ``s := s - penalty``. ``penalty=None`` returns the scores unchanged.
    Shapes: ``scores`` (B,), ``stopped`` (B,) bool -> (B,).
    Source: Huang et al. 2024, "The N+ implementation details of RLHF with PPO" (missing EOS penalty);
    the "replace" form follows OpenAI's lm-human-preferences (Ziegler et al. 2019).
    """
    if mode not in MISSING_STOP_MODES:
        raise ValueError(f"unknown missing-stop mode {mode!r}; valid: {', '.join(MISSING_STOP_MODES)}")
    if penalty is None:
        return scores
    not_stopped = ~stopped.bool()
    if mode == "replace":
        return torch.where(not_stopped, torch.full_like(scores, penalty), scores)
    return scores - penalty * not_stopped.to(scores.dtype)


def last_response_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row of ``response_mask`` (B, T) -> (B,); ValueError for an empty row."""
    T = response_mask.shape[1]
    positions = torch.arange(T, device=response_mask.device).expand_as(response_mask)
    last = torch.where(response_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    if bool((last < 0).any()):
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"rows {rows} have no response token")
    return last


class ShapedRewards(NamedTuple):
    """Per-token rewards (B, T), the per-token KL estimate (B, T) and the KL part of the reward (B, T)."""

    rewards: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "kl",
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> ShapedRewards:
    """The KL-shaped per-token reward of RLHF-PPO.

    Equation: ``kl_t = KL estimate`` (:func:`rlhfkit.core.kl.kl_penalty`) on response tokens, 0 on padding;
    ``non_score_reward_t = -kl_coef · kl_t``; ``rewards_t = non_score_reward_t + [t = last_b] · scores_b``
    where ``last_b`` is the last response token of row b (found from the mask).
    Shapes: ``scores`` (B,), ``logprobs``, ``ref_logprobs``, ``response_mask`` (B, T), optional logits
    (B, T, V) -> ``ShapedRewards`` of three (B, T) tensors. Raises ValueError for a row with no response token.
    Source: Ziegler et al. 2019 §2.2, ``R(x, y) = r(x, y) - β log(π(y|x) / ρ(y|x))``; Ouyang et al. 2022
    (InstructGPT) eq. 2; Stiennon et al. 2020 eq. 1.
    """
    mask = response_mask.bool()
    last = last_response_index(mask)
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator, logits, ref_logits, temperature)
    kl = torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    non_score_reward = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    at_last = positions == last.unsqueeze(1)
    rewards = torch.where(at_last, non_score_reward + scores.unsqueeze(1).to(kl.dtype), non_score_reward)
    return ShapedRewards(rewards=rewards, kl=kl, non_score_reward=non_score_reward)
