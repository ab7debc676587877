"""Everything a PPO run must restore to continue exactly: the prompt sampler's position, the random streams,
weights, optimizers, schedulers, the KL controller and the running score statistics; plus the final save.

Checkpoint folder (``OUTPUT/checkpoints/step-NNNNNNNN/``, the layout of
`train.checkpoint.save_training_checkpoint`, published atomically; with ``--fsdp`` the trainable weights and the
optimizer states are in its ``sharded/`` DCP folder instead of the safetensors files):

- ``policy.safetensors`` / ``critic.safetensors``: the trainable parameters (all of them, or the LoRA adapters;
  ``critic=shared``: the critic file holds the value head; a critic-free ``advantage_estimator``: no critic file,
  the critic optimizer and schedule None); the frozen rest is the initial model, loaded again
  from ``--policy``;
- ``trainer_state.json`` (+ ``trainer_state.safetensors``, its tensors): `PPOTrainer.state_dict`: iteration, KL
  controller, running score moments, prompt-sampler position, optimizers and schedules (``critic=shared``: the one
  optimizer and schedule under ``policy``, ``critic`` None);
- ``rng-rank{r}.json`` (+ ``.safetensors``): each process's global RNG states and its sampling / shuffling
  generators (`PPOTrainer.rank_state_dict`);
- ``config.yaml``: the run's configuration (``--resume`` refuses a different one, except `RESUMABLE_CHANGES`);
- ``checkpoint.json``: the format version, the command, the iteration and the process count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.config import config_to_dict
from rlhfkit.errors import RlhfkitError
from rlhfkit.train.checkpoint import check_resume_settings
from rlhfkit.train.ppo_config import LENGTH_FREE_SCHEDULERS, RESUMABLE_CHANGES, PPOConfig, run_length
from rlhfkit.utils import atomic_dir, atomic_write_text, read_jsonl

# Offsets that separate the random streams derived from the one --seed.
_SAMPLING_STREAM = 1_000_003
_SHUFFLE_STREAM = 2_000_029
_PROMPT_STREAM = 3_000_017


def stream_seed(seed: int, stream: str, rank: int = 0) -> int:
    """Seed of a named random stream ("sampling", "shuffle", "prompts") of process ``rank``."""
    base = {"sampling": _SAMPLING_STREAM, "shuffle": _SHUFFLE_STREAM, "prompts": _PROMPT_STREAM}[stream]
    return (seed * 7_919 + base * (rank + 1)) % (2**63 - 1)


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class PromptSampler:
    """An endless, reproducible stream of prompt indices: epoch ``e`` visits a permutation of the ``n`` prompts
    drawn from a generator seeded with (seed, e); the state is just ``(epoch, position)``."""

    def __init__(self, num_prompts: int, seed: int) -> None:
        if num_prompts < 1:
            raise RlhfkitError("no prompts to train on")
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _permutation(self, epoch: int) -> list[int]:
        g = make_generator(stream_seed(self.seed, "prompts") + epoch)
        return torch.randperm(self.num_prompts, generator=g).tolist()

    def next_batch(self, size: int) -> list[int]:
        """The next ``size`` indices (crossing into the next epoch's permutation when one runs out)."""
        out: list[int] = []
        while len(out) < size:
            perm = self._permutation(self.epoch)
            take = min(size - len(out), self.num_prompts - self.position)
            out.extend(perm[self.position:self.position + take])
            self.position += take
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["num_prompts"]) != self.num_prompts:
            raise RlhfkitError(f"--resume: the checkpoint was trained on {state['num_prompts']} prompts, the prompt "
                               f"file now gives {self.num_prompts}; resume with the same prompts")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def check_resume_config(cfg: PPOConfig, ckpt: Path) -> None:
    """Refuse to resume with settings that would change the computation (only `RESUMABLE_CHANGES` may differ,
    `train.checkpoint.check_resume_settings`, and the run's length only under a schedule that does not depend on
    it, `LENGTH_FREE_SCHEDULERS`)."""
    saved = check_resume_settings(cfg, ckpt, RESUMABLE_CHANGES)
    now = config_to_dict(cfg)
    before = run_length(saved.get("iterations"), saved.get("total_episodes"), cfg.episodes_per_iteration)
    if cfg.lr_scheduler not in LENGTH_FREE_SCHEDULERS and before != cfg.num_iterations:
        raise RlhfkitError(
            f"--resume: the run's length changed from {before} iterations ({_length_setting(saved)}) to "
            f"{cfg.num_iterations} ({_length_setting(now)}), but lr_scheduler={cfg.lr_scheduler!r} spreads the "
            f"learning rate over the run's length, so the remaining iterations would not follow the checkpoint's "
            f"schedule; resume with {_length_setting(saved)}, or start a run with lr_scheduler='constant' (the only "
            f"schedule whose length may change on resume)")


def _length_setting(config: dict) -> str:
    """How a saved config sets its length, e.g. ``iterations=10`` (for messages)."""
    if config.get("total_episodes") is not None:
        return f"total_episodes={config['total_episodes']}"
    iterations = config.get("iterations")
    return f"iterations={iterations}" if iterations is not None else "the default iterations"


# ----------------------------------------------------------------------------------------------------------
# Output folder (`train.output`)
# ----------------------------------------------------------------------------------------------------------
RUN_ENTRIES = ("metrics.jsonl", "samples.jsonl", "value_head.safetensors", "checkpoints", "tensorboard", "policy",
               "critic")  # what a PPO run writes under --output (besides config.yaml)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the rows of a JSONL file written after iteration ``last_step`` (resume)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def save_final(procs: Any, output: Path, tokenizer: Any, policy: nn.Module, critic: nn.Module | None) -> None:
    """Write ``OUTPUT/policy`` (plain HF causal LM, LoRA merged) and ``OUTPUT/critic`` (a `ValueHead`, ``critic=
    shared``: ``OUTPUT/value_head.safetensors``, `models.value_head`; None, a critic-free estimator: nothing), each
    atomically (collective: process 0 writes)."""
    from rlhfkit.models.adapters import has_lora, merge_lora_for_save
    from rlhfkit.models.value_head import VALUE_HEAD_FILE, ValueHead
    from rlhfkit.train.engine.sharding import full_copy

    policy, critic = full_copy(policy, procs), full_copy(critic, procs) if critic is not None else None  # --fsdp
    if procs.is_main:
        merged = merge_lora_for_save(policy) if has_lora(policy) else policy
        with atomic_dir(output / "policy") as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        if isinstance(critic, ValueHead):
            final = output / VALUE_HEAD_FILE
            tmp_file = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            critic.save(tmp_file)
            os.replace(tmp_file, final)
        elif critic is not None:
            with atomic_dir(output / "critic") as tmp:
                critic.save_pretrained(tmp, tokenizer)
    procs.barrier()
