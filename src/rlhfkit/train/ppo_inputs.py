"""The inputs of a PPO run — policy, tokenizer, prompts, reward sources — from the config's paths or from Python
objects (the arguments of `PPOTrainer`, the Python API).

Each of policy and prompts is given exactly once: as the config's path (``PPOConfig.policy`` / ``--policy``) or as
the trainer's argument (a path, which then fills the config, or an object: a transformers causal LM with its
tokenizer; in-memory prompt rows). The reward sources are the config's ``reward_model`` specs (weighted by
``reward_weights``) followed by ``reward_fn``, a Python callable ``fn(prompts, responses) -> list[float]`` weighted
by ``reward_fn_weight``; at least one source is needed. Errors are `RlhfkitError`s raised before anything is
loaded or written.

A policy object is used as it is (moved to the run's device and trained in place; the reference is a copy of it).
A separate critic starts from the policy's weights (``critic_init`` policy or auto without a reward-model folder):
it is built from the object's weights saved once into a temporary folder, before LoRA or freezing touch the
object; ``rollout_engine=vllm`` needs a policy path (the engine loads its own copy from the folder).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from rlhfkit.data.prompts import Prompt, load_prompts
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.train.inputs import given_once
from rlhfkit.train.ppo_config import PPOConfig

RewardFn = Callable[[list[str], list[str]], Any]


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


@dataclass
class PPOInputs:
    """What a run reads, resolved: ``cfg`` (the config, with paths given as arguments filled in), the objects
    given instead of paths (None: load from the config's path) and the reward sources with their weights."""

    cfg: PPOConfig
    policy: torch.nn.Module | None = None
    tokenizer: Any = None
    prompts: Any = None
    rewards: list[Any] = field(default_factory=list)
    reward_weights: list[float] | None = None
    _folder: tempfile.TemporaryDirectory | None = None

    @property
    def prompt_source(self) -> Any:
        """What prompt errors name: the file, or ``prompts`` (in-memory rows)."""
        return self.cfg.prompts if self.prompts is None else "prompts"

    def load_tokenizer(self) -> Any:
        return self.tokenizer if self.tokenizer is not None else load_tokenizer(self.cfg.policy)

    def load_prompts(self) -> list[Prompt]:
        return load_prompts(self.prompts if self.prompts is not None else self.cfg.prompts)

    def load_policy(self, needs_folder: bool) -> torch.nn.Module:
        """The policy: the object, or the model at ``cfg.policy``. ``needs_folder``: keep the object's weights in a
        temporary folder as they are now, for `policy_path` (a critic that starts from the policy)."""
        if self.policy is None:
            return load_causal_lm(self.cfg.policy)
        if needs_folder and self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="rlhfkit-policy-")
            self.policy.save_pretrained(self._folder.name)
            self.tokenizer.save_pretrained(self._folder.name)
        return self.policy

    def policy_path(self) -> str:
        """A folder holding the policy's initial weights: ``cfg.policy``, or the object's temporary copy."""
        if self.policy is None:
            return self.cfg.policy
        if self._folder is None:
            raise RuntimeError("load_policy(needs_folder=True) must come first")
        return self._folder.name

    def close(self) -> None:
        """Remove the temporary copy of a policy object (what was built from it is in memory)."""
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def resolve_inputs(cfg: PPOConfig, policy: Any = None, tokenizer: Any = None, prompts: Any = None,
                   reward_fn: RewardFn | None = None, reward_fn_weight: float = 1.0) -> PPOInputs:
    """Check and resolve the run's inputs (see the module docstring)."""
    given_once("policy", cfg.policy, policy,
               "set PPOConfig.policy (CLI --policy) or pass PPOTrainer(policy=...), a path or a causal-LM object",
               "PPOConfig", "PPOTrainer")
    given_once("prompts", cfg.prompts, prompts,
               "set PPOConfig.prompts (CLI --prompts) or pass PPOTrainer(prompts=...), a path, a list of texts or "
               "dicts, or a datasets.Dataset", "PPOConfig", "PPOTrainer")
    inputs = PPOInputs(cfg)
    if _is_path(policy):
        cfg = replace(cfg, policy=str(policy))
    elif policy is not None:
        if not isinstance(policy, torch.nn.Module) or not hasattr(policy, "save_pretrained"):
            raise RlhfkitError(f"policy must be a path or a transformers causal-LM model, got {type(policy).__name__}")
        if tokenizer is None:
            raise RlhfkitError("a policy object needs its tokenizer: pass PPOTrainer(policy=model, "
                               "tokenizer=tokenizer)")
        if cfg.rollout_engine == "vllm":
            raise RlhfkitError("rollout_engine=vllm loads the policy from a folder: pass the policy as a path "
                               "(or save the model with save_pretrained first), or use rollout_engine=hf")
        inputs.policy = policy
    inputs.tokenizer = tokenizer
    if _is_path(prompts):
        cfg = replace(cfg, prompts=str(prompts))
    else:
        inputs.prompts = prompts
    inputs.cfg = cfg
    inputs.rewards, inputs.reward_weights = reward_sources(cfg.reward_model, cfg.reward_weights, reward_fn,
                                                           reward_fn_weight)
    return inputs


def reward_sources(specs: Sequence[str], weights: Sequence[float] | None, reward_fn: RewardFn | None,
                   reward_fn_weight: float) -> tuple[list[Any], list[float] | None]:
    """The reward specs and weights for `rlhfkit.rollout.scoring.load_reward`: ``specs`` (weights default 1 each),
    then ``reward_fn`` with ``reward_fn_weight``; a lone function of weight 1 is its own source (no weights)."""
    if reward_fn is not None and not callable(reward_fn):
        raise RlhfkitError(f"reward_fn must be a callable fn(prompts, responses) -> list[float], got "
                           f"{type(reward_fn).__name__}")
    if not math.isfinite(reward_fn_weight):
        raise RlhfkitError(f"reward_fn_weight must be a finite number, got {reward_fn_weight}")
    if not specs and reward_fn is None:
        raise RlhfkitError("give at least one reward source: PPOConfig.reward_model (CLI --reward_model) or "
                           "PPOTrainer(reward_fn=...)")
    if reward_fn is None:
        return list(specs), None if weights is None else list(weights)
    if not specs and reward_fn_weight == 1.0:
        return [reward_fn], None
    return list(specs) + [reward_fn], [*(weights if weights is not None else [1.0] * len(specs)), reward_fn_weight]
