"""Everything a PPO run must restore to continue exactly: the prompt sampler's position, the random streams,
weights, optimizers, schedulers, the KL controller and the running score statistics; plus the final save.

Checkpoint folder (``OUTPUT/checkpoints/step-NNNNNNNN/``, published atomically by `train.checkpoint`):

- ``policy.safetensors`` / ``critic.safetensors``: the trainable parameters (all of them, or the LoRA adapters;
  ``critic=shared``: the critic file holds the value head; a critic-free ``advantage_estimator``: no critic file,
  the critic optimizer and schedule None); the frozen rest is the initial model, loaded again
  from ``--policy``;
- ``optimizers.pt``, ``schedulers.pt``: torch state dicts (loaded with ``weights_only=True``; ``critic=shared``:
  the one optimizer and schedule under ``policy``, ``critic`` None);
- ``trainer_state.json``: iteration, KL controller, running score moments, prompt-sampler position, process count;
- ``rng-rank{r}.pt``: each process's global RNG states and its sampling / shuffling generators;
- ``config.yaml``: the run's configuration (``--resume`` refuses a different one, except `RESUMABLE_CHANGES`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.config import changed_settings, config_to_dict
from rlhfkit.errors import RlhfkitError
from rlhfkit.train.checkpoint import load_state, save_checkpoint, save_state
from rlhfkit.train.ppo_config import LENGTH_FREE_SCHEDULERS, RESUMABLE_CHANGES, PPOConfig, run_length
from rlhfkit.utils import atomic_dir, atomic_write_text, read_jsonl, rng_state, set_rng_state

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
# Trainable weights
# ----------------------------------------------------------------------------------------------------------
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (contiguous CPU copies)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, path: Path, what: str) -> None:
    """Copy the tensors of ``path`` into the trainable parameters of ``model`` (names and shapes must match)."""
    if not path.is_file():
        raise RlhfkitError(f"{path}: checkpoint file missing (the checkpoint folder is incomplete)")
    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise RlhfkitError(f"{path}: the saved {what} weights do not match the model (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}); resume with the same --policy / LoRA settings")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise RlhfkitError(f"{path}: {what} parameter {name} has shape {tuple(saved[name].shape)}, the "
                                   f"model {tuple(param.shape)}")
            param.copy_(saved[name].to(param.device, param.dtype))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def rank_rng_state(sampling: torch.Generator, shuffle: torch.Generator) -> dict[str, Any]:
    return {"global": rng_state(), "sampling": sampling.get_state(), "shuffle": shuffle.get_state()}


def write_checkpoint(trainer: Any, step: int) -> Path | None:
    """Save the full training state after iteration ``step`` (collective: every process must call it)."""
    dist = trainer.dist
    rng_states = dist.gather_object(rank_rng_state(trainer.sampling_generator, trainer.shuffle_generator))
    path = None
    if dist.is_main:
        def write(folder: Path) -> None:
            save_file(trainable_state(trainer.policy), str(folder / "policy.safetensors"))
            if trainer.critic is not None:  # a critic-free estimator: no critic file
                save_file(trainable_state(trainer.critic), str(folder / "critic.safetensors"))
            save_state(folder / "optimizers.pt", {"policy": trainer.policy_optimizer.state_dict(),
                                                  "critic": _state_or_none(trainer.critic_optimizer)})
            save_state(folder / "schedulers.pt", {"policy": trainer.policy_scheduler.state_dict(),
                                                  "critic": _state_or_none(trainer.critic_scheduler)})
            for rank, state in enumerate(rng_states):
                save_state(folder / f"rng-rank{rank}.pt", state)
            state = {
                "step": step,
                "kl_controller": trainer.kl_controller.state_dict(),
                "running_scores": trainer.running_scores.state_dict(),
                "prompt_sampler": trainer.sampler.state_dict(),
                "num_processes": dist.world_size,
            }
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(trainer.cfg), sort_keys=False))

        path = save_checkpoint(trainer.output, step, write, keep_last=trainer.cfg.keep_checkpoints)
    dist.barrier()
    return path


def _state_or_none(obj: Any) -> dict | None:
    """The state dict of an optimizer or scheduler; None for none (``critic=shared`` has no critic optimizer)."""
    return None if obj is None else obj.state_dict()


def _load_into(obj: Any, state: dict | None, path: Path) -> None:
    if (obj is None) != (state is None):
        raise RlhfkitError(f"{path}: the checkpoint's critic optimizer / schedule does not match this run's --critic "
                           "/ --advantage_estimator")
    if obj is not None:
        obj.load_state_dict(state)


def check_resume_config(cfg: PPOConfig, ckpt: Path) -> None:
    """Refuse to resume with settings that would change the computation (only `RESUMABLE_CHANGES` may differ,
    and the run's length only under a schedule that does not depend on it, `LENGTH_FREE_SCHEDULERS`)."""
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise RlhfkitError(f"{path}: checkpoint file missing (the checkpoint folder is incomplete)")
    saved = yaml.safe_load(path.read_text()) or {}
    now = config_to_dict(cfg)
    changed = changed_settings(cfg, saved, RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed[:6])
        raise RlhfkitError(f"--resume: the configuration differs from the checkpoint's ({detail}); resume with "
                           f"the same settings (only {', '.join(RESUMABLE_CHANGES)} may change)")
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


def read_checkpoint(trainer: Any, ckpt: Path) -> int:
    """Restore the state saved by `write_checkpoint` into ``trainer``; returns the checkpoint's iteration."""
    dist = trainer.dist
    state_path = ckpt / "trainer_state.json"
    if not state_path.is_file():
        raise RlhfkitError(f"{state_path}: checkpoint file missing (the checkpoint folder is incomplete)")
    state = json.loads(state_path.read_text())
    if int(state["num_processes"]) != dist.world_size:
        raise RlhfkitError(f"--resume: the checkpoint was written by {state['num_processes']} processes, this run has "
                           f"{dist.world_size}; resume with the same number of processes")
    load_trainable_state(trainer.policy, ckpt / "policy.safetensors", "policy")
    if trainer.critic is not None:
        load_trainable_state(trainer.critic, ckpt / "critic.safetensors", "critic")
    optimizers = load_state(ckpt / "optimizers.pt")
    trainer.policy_optimizer.load_state_dict(optimizers["policy"])
    _load_into(trainer.critic_optimizer, optimizers["critic"], ckpt / "optimizers.pt")
    schedulers = load_state(ckpt / "schedulers.pt")
    trainer.policy_scheduler.load_state_dict(schedulers["policy"])
    _load_into(trainer.critic_scheduler, schedulers["critic"], ckpt / "schedulers.pt")
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    trainer.running_scores.load_state_dict(state["running_scores"])
    trainer.sampler.load_state_dict(state["prompt_sampler"])
    rng = load_state(ckpt / f"rng-rank{dist.rank}.pt")
    set_rng_state(rng["global"])
    trainer.sampling_generator.set_state(rng["sampling"])
    trainer.shuffle_generator.set_state(rng["shuffle"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------------
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "value_head.safetensors")
RUN_DIRS = ("checkpoints", "tensorboard", "policy", "critic")


def check_fresh_output(output: Path, overwrite: bool) -> list[str]:
    """Refuse to mix a new run into a previous one; returns the previous run's files (``overwrite`` replaces them)."""
    existing = [name for name in RUN_FILES + RUN_DIRS if (output / name).exists()]
    if existing and not overwrite:
        raise RlhfkitError(f"{output} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                           f"--overwrite to replace it, or choose another --output")
    return existing


def prepare_fresh_output(output: Path, overwrite: bool) -> None:
    """`check_fresh_output`, then remove the previous run's files."""
    for name in check_fresh_output(output, overwrite):
        target = output / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the rows of a JSONL file written after iteration ``last_step`` (resume)."""
    if path.is_file():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def save_final(trainer: Any) -> None:
    """Write ``OUTPUT/policy`` (plain HF causal LM, LoRA merged) and ``OUTPUT/critic`` (``critic=shared``:
    ``OUTPUT/value_head.safetensors``, `models.value_head`; a critic-free estimator: nothing), each atomically."""
    from rlhfkit.models.adapters import has_lora, merge_lora_for_save
    from rlhfkit.models.value_head import VALUE_HEAD_FILE

    if not trainer.dist.is_main:
        trainer.dist.barrier()
        return
    policy = merge_lora_for_save(trainer.policy) if has_lora(trainer.policy) else trainer.policy
    with atomic_dir(trainer.output / "policy") as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        trainer.tokenizer.save_pretrained(tmp)
    if trainer.critic is None:
        pass  # a critic-free estimator: the policy is the whole result
    elif trainer.shared_critic:
        final = trainer.output / VALUE_HEAD_FILE
        tmp_file = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        trainer.critic.save(tmp_file)
        os.replace(tmp_file, final)
    else:
        with atomic_dir(trainer.output / "critic") as tmp:
            trainer.critic.save_pretrained(tmp, trainer.tokenizer)
    trainer.dist.barrier()
