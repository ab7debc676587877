"""The checks both trainers make of what the Python API passes them instead of the config's paths
(`train.ppo_inputs` for `PPOTrainer`, `train.reward_trainer.RewardTrainer`): each input given once, callbacks
callable. Errors are `RlhfkitError`s raised before anything is loaded or written."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from rlhfkit.errors import RlhfkitError

Callback = Callable[[int, dict[str, float]], Any]


def given_once(name: str, config_value: Any, argument: Any, hint: str | None, config: str, trainer: str) -> None:
    """``name`` comes either from the config (class ``config``) or from the argument of ``trainer``: both is an
    error; neither is one too unless ``hint`` is None (an optional input), else the message ends with ``hint``."""
    if config_value and argument is not None:
        raise RlhfkitError(f"{name} is given twice: {config}.{name}={config_value!r} and {trainer}({name}=...); "
                           "give it once")
    if hint is not None and not config_value and argument is None:
        raise RlhfkitError(f"{name} is required: {hint}")


def check_callbacks(callbacks: Sequence[Callback]) -> list[Callback]:
    """The callbacks as a list, each a callable ``callback(step, metrics)``."""
    for callback in callbacks:
        if not callable(callback):
            raise RlhfkitError(f"callbacks must be callables callback(step, metrics), got {type(callback).__name__}")
    return list(callbacks)
