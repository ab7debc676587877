"""The Python API's reward-model trainer: `RewardTrainer`, a thin layer over `rlhfkit.train.reward_trainer.run`
(what ``rlhfkit rm train`` runs), taking Python objects where the config names paths.

The PPO side of the API is `rlhfkit.train.ppo_trainer.PPOTrainer` itself (its keyword arguments ``policy``,
``tokenizer``, ``prompts``, ``reward_fn``, ``reward_fn_weight``, ``callbacks``). Both are exported by the package:
``from rlhfkit import RewardTrainer, RMTrainConfig, PPOTrainer, PPOConfig``; docs/api.md documents them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from typing import Any, Callable, Sequence

from rlhfkit.errors import RlhfkitError
from rlhfkit.train.rm_config import RMTrainConfig

Callback = Callable[[int, dict[str, float]], Any]


class RewardTrainer:
    """Train a reward model from Python: ``RewardTrainer(config, model=..., data=rows).train()``.

    ``config``: an `RMTrainConfig` (every knob of ``rlhfkit rm train``); ``model`` and ``data`` may be left out of
    it and given here instead, each exactly once:

    * ``model``: a path (as ``--model``), or a transformers model object (the backbone, e.g. an
      ``AutoModelForCausalLM``) with its ``tokenizer``: its weights are saved once into a temporary folder, from
      which the reward model is built as from a path (the object itself is not modified; the run's
      ``config.yaml`` names that temporary folder, and ``resume`` needs a path);
    * ``data`` / ``eval_data``: a path, a list of dicts or a ``datasets.Dataset`` (each row validated like a file's
      row; errors name ``data, row N, field '...'`` and nothing is written);
    * ``callbacks``: each called as ``callback(step, metrics)`` with every logged metrics row (``rm/*``,
      ``eval/*``, ...); one that raises stops the run with an `RlhfkitError` naming it.

    `train` runs it and returns the final held-out metrics (``eval/*``; empty without held-out data); the output
    folder is the command's (the model, ``config.yaml``, ``metrics.jsonl``, ...).
    """

    def __init__(self, config: RMTrainConfig, model: Any = None, tokenizer: Any = None, data: Any = None,
                 eval_data: Any = None, callbacks: Sequence[Callback] = ()) -> None:
        from rlhfkit.train.reward_trainer import data_sources

        if not isinstance(config, RMTrainConfig):
            raise RlhfkitError(f"config must be an RMTrainConfig, got {type(config).__name__}")
        if config.model is not None and model is not None:
            raise RlhfkitError(f"model is given twice: RMTrainConfig.model={config.model!r} and "
                               f"RewardTrainer(model=...); give it once")
        if config.model is None and model is None:
            raise RlhfkitError("model is required: set RMTrainConfig.model (CLI --model) or pass "
                               "RewardTrainer(model=...), a path or a model object with its tokenizer")
        self.model: Any = None
        if isinstance(model, (str, os.PathLike)):
            config = replace(config, model=str(model))
        elif model is not None:
            if not hasattr(model, "save_pretrained"):
                raise RlhfkitError(f"model must be a path or a transformers model, got {type(model).__name__}")
            if tokenizer is None:
                raise RlhfkitError("a model object needs its tokenizer: pass RewardTrainer(model=model, "
                                   "tokenizer=tokenizer)")
            if config.resume:
                raise RlhfkitError("resume needs the model as a path (a model object is saved to a new temporary "
                                   "folder by each run); pass RMTrainConfig.model")
            self.model = model
        if tokenizer is not None and self.model is None:
            raise RlhfkitError("tokenizer goes with a model object; a model path brings its own tokenizer")
        data_sources(config, data, eval_data)  # each given once
        for callback in callbacks:
            if not callable(callback):
                raise RlhfkitError(f"callbacks must be callables callback(step, metrics), got "
                                   f"{type(callback).__name__}")
        self.config, self.tokenizer = config, tokenizer
        self.data, self.eval_data, self.callbacks = data, eval_data, list(callbacks)

    def train(self) -> dict[str, float]:
        """Run ``rlhfkit rm train`` on the inputs; returns the final held-out metrics (empty without)."""
        from rlhfkit.train.reward_trainer import run

        if self.model is None:
            return run(self.config, self.data, self.eval_data, self.callbacks)
        with tempfile.TemporaryDirectory(prefix="rlhfkit-model-") as folder:
            self.model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            return run(replace(self.config, model=folder), self.data, self.eval_data, self.callbacks)
