"""rlhfkit: reinforcement learning from human feedback for language models.

Reward modeling (``rlhfkit rm train``), scoring (``rlhfkit score``) and PPO (``rlhfkit ppo``).
"""

from rlhfkit.errors import RlhfkitError

__version__ = "0.1.0"
__all__ = ["RlhfkitError", "__version__"]
