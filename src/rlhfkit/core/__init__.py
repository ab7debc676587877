"""Pure tensor math of RLHF: every equation of the method lives here, once (imports torch only).

Modules: ``masks`` (masked reductions, stop-token truncation), ``logprobs`` (log-probs and entropy from
logits), ``kl`` (per-token KL estimators), ``rewards`` (score post-processing, KL-shaped rewards),
``advantages`` (GAE), ``losses`` (reward-model and PPO losses), ``kl_control`` (KL coefficient controllers).
"""

from rlhfkit.core.advantages import discounted_returns, gae
from rlhfkit.core.kl import KL_ESTIMATORS, full_kl_from_logits, kl_penalty
from rlhfkit.core.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller
from rlhfkit.core.logprobs import entropy_from_logits, logprobs_from_logits
from rlhfkit.core.losses import (
    PolicyStats,
    ValueStats,
    entropy_bonus,
    explained_variance,
    mse_regression,
    multi_objective_regression,
    pairwise_logexp,
    pairwise_logsigmoid,
    pointwise_bce,
    pointwise_ce2,
    ppo_policy_loss,
    ppo_total_loss,
    ppo_value_loss,
    reward_centering,
    token_level_pairwise,
)
from rlhfkit.core.masks import (
    first_difference_index,
    first_stop_index,
    lengths_to_mask,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    truncate_after_stop,
)
from rlhfkit.core.rewards import (
    MISSING_STOP_MODES,
    RunningMoments,
    ShapedRewards,
    clip_scores,
    last_response_index,
    missing_stop_penalty,
    shape_rewards,
    whiten_scores,
)

__all__ = [
    "KL_ESTIMATORS",
    "MISSING_STOP_MODES",
    "AdaptiveKLController",
    "FixedKLController",
    "PolicyStats",
    "RunningMoments",
    "ShapedRewards",
    "ValueStats",
    "clip_scores",
    "discounted_returns",
    "entropy_bonus",
    "entropy_from_logits",
    "explained_variance",
    "first_difference_index",
    "first_stop_index",
    "full_kl_from_logits",
    "gae",
    "kl_penalty",
    "last_response_index",
    "lengths_to_mask",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "missing_stop_penalty",
    "mse_regression",
    "multi_objective_regression",
    "pairwise_logexp",
    "pairwise_logsigmoid",
    "pointwise_bce",
    "pointwise_ce2",
    "position_ids_from_mask",
    "ppo_policy_loss",
    "ppo_total_loss",
    "ppo_value_loss",
    "reward_centering",
    "shape_rewards",
    "token_level_pairwise",
    "truncate_after_stop",
    "whiten_scores",
]
