"""rlhfkit: reinforcement learning from human feedback for language models.

Reward modeling (``rlhfkit rm train``), scoring (``rlhfkit score``) and PPO (``rlhfkit ppo``), from the command line
or from Python (docs/api.md)::

    from rlhfkit import PPOConfig, PPOTrainer, RewardTrainer, RMTrainConfig

    RewardTrainer(RMTrainConfig(output="runs/rm"), model="smollm2", data=rows).train()
    PPOTrainer(PPOConfig(output="runs/ppo"), policy="smollm2", prompts=["Hi"], reward_fn=my_reward).train()

* `RewardTrainer` (the class ``rlhfkit rm train`` runs), `RMTrainConfig`: train a reward model; data as a path, a
  list of dicts or a ``datasets.Dataset``; ``train()`` returns the final held-out metrics.
* `PPOTrainer`, `PPOConfig`: PPO (and its critic-free relatives); the policy as a path or a transformers model,
  prompts in memory, a Python reward function ``fn(prompts, responses) -> list[float]``, callbacks on each logged
  step; ``train()`` returns the iterations' results.
* `RlhfkitError`: every user error (bad data, bad config, missing files), with a message naming what is wrong.

The trainers are imported on first use, so ``import rlhfkit`` stays light.
"""

from __future__ import annotations

from rlhfkit.errors import RlhfkitError

TYPE_CHECKING = False  # (the typing module is not imported: `import rlhfkit` stays light)
if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from typing import Any

    from rlhfkit.train.ppo_config import PPOConfig
    from rlhfkit.train.ppo_trainer import PPOTrainer
    from rlhfkit.train.reward_trainer import RewardTrainer
    from rlhfkit.train.rm_config import RMTrainConfig

__version__ = "0.1.0"
_LAZY = {"RewardTrainer": "rlhfkit.train.reward_trainer", "RMTrainConfig": "rlhfkit.train.rm_config",
         "PPOTrainer": "rlhfkit.train.ppo_trainer", "PPOConfig": "rlhfkit.train.ppo_config"}
__all__ = ["PPOConfig", "PPOTrainer", "RMTrainConfig", "RewardTrainer", "RlhfkitError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlhfkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
