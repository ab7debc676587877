"""``rlhfkit ppo``: PPO fine-tuning of a policy against frozen reward source(s).

One iteration (`PPOTrainer.iteration`), as numbered steps (each a call into ``rollout/``, ``core/`` or
``train/ppo_update.py``):

1. rollout: sample ``samples_per_prompt`` = k responses to each prompt of this process's share of the next
   ``rollout_batch_size`` prompts (prompt-major: rows p·k … p·k + k - 1 answer prompt p, whole groups per process);
2. score: reward sources on prompt + response text (with ``score_norm=reference`` each reward model applies its
   stored statistics first); missing-stop penalty; batch normalisation; clipping;
3. forward passes without gradients over the first epoch's micro-batches: old log-probs (policy; or the
   sampler's with ``old_logprobs=rollout``), reference log-probs (the initial policy, or the same weights with
   LoRA adapters off), old values (critic; with ``critic=shared`` from the policy's own pass), the frozen lower
   blocks once for all of them and the update (`ppo_trunk`); per-token rewards by `core.rewards.shape_rewards`;
4. advantages (and returns) by ``advantage_estimator`` (`ppo_advantages.estimate_advantages`: GAE with the critic,
   or a critic-free estimator of `core.advantages`);
5. update: ppo_epochs × minibatches × micro-batches (`ppo_update.ppo_update`), then the LR schedules step (in
   the first ``critic_warmup_iterations`` the critic alone trains and only its schedule steps, `trains_policy`);
6. statistics (namespaced metrics, see ``docs/``) to ``metrics.jsonl`` + TensorBoard, a sample table every
   ``sample_table_every`` iterations, and the KL controller update;
7. a checkpoint every ``save_every`` iterations and after the last one (none with ``save_every=0``; weights,
   `PPOTrainer.state_dict` and each process's `PPOTrainer.rank_state_dict`, `train.checkpoint`); at the end
   ``OUTPUT/policy`` (a plain Hugging Face causal LM, LoRA merged) and ``OUTPUT/critic`` (``critic=shared``:
   ``OUTPUT/value_head.safetensors``).

A critic-free ``advantage_estimator`` (grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, remax; remax also
samples and scores one greedy response per prompt in step 1, `greedy_scores`, its baseline): no critic is
built or loaded (``self.critic`` None), trained, checkpointed or saved (no ``OUTPUT/critic``), and no value loss.
``kl_in=loss``: the rewards carry no KL; the update adds ``kl_coef`` × the k3 KL against the reference log-probs.

``critic=shared``: the critic is a `models.value_head.ValueHead` on the policy's last hidden state instead of a
model of its own; `ppo_update` then runs one forward per micro-batch for log-probs and values, and one optimizer
(two param groups: policy at ``learning_rate``, head at ``critic_learning_rate``) with one gradient clip.

Run several processes with ``accelerate launch --multi_gpu --num_processes N -m rlhfkit.cli ppo ...`` (on a
CPU-only machine too: accelerate then starts N torchrun processes joined by gloo; ``--cpu`` would ask for MPI) or
``torchrun --nproc_per_node N -m rlhfkit.cli ppo ...``: each process samples its share, statistics and token
counts are global, gradients are summed (see `ppo_update`). ``--fsdp``: the policy and a separate critic are
sharded by FSDP2 (`train.engine.sharding`; the reference and reward models stay replicated), the sampler runs on
the gathered weights, checkpoints are sharded (DCP).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhfkit.config import save_config
from rlhfkit.core.kl_control import make_kl_controller
from rlhfkit.core.rewards import (RunningMoments, ShapedRewards, clip_scores, missing_stop_penalty, shape_rewards,
                                  whiten_scores)
from rlhfkit.data.prompts import load_references
from rlhfkit.data.tokenize import left_pad, tokenize_prompts
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.adapters import adapters_disabled, apply_lora, freeze_lower_layers
from rlhfkit.models.loading import ensure_pad_token, hf_folder
from rlhfkit.models.reward import critic_problem, is_reward_model_folder, load_critic
from rlhfkit.models.value_head import ValueHead
from rlhfkit.models.trunk import BatchTrunks, Trunk, num_blocks
from rlhfkit.rollout.forward import packing_problem, trunk_decoder
from rlhfkit.rollout.sampling import GenerationConfig, HiddenCapture, Rollout, sample
from rlhfkit.rollout.scoring import call_source, load_reward, needs_references
from rlhfkit.train import ppo_state
from rlhfkit.train.checkpoint import (check_format, checkpoint_step, read_training_checkpoint,
                                      require_latest_checkpoint, save_training_checkpoint, take_saved_settings)
from rlhfkit.train.engine.optim import ModuleGroup, build_optimizer, build_scheduler, module_lr
from rlhfkit.train.engine.processes import Processes
from rlhfkit.train.engine.sharding import gathered, is_sharded, load_optimizer_state, optimizer_state
from rlhfkit.train.inputs import check_callbacks
from rlhfkit.train.output import check_fresh_output, prepare_fresh_output
from rlhfkit.train.ppo_advantages import estimate_advantages
from rlhfkit.train.ppo_config import PPOConfig, resolve_old_logprobs
from rlhfkit.train.ppo_inputs import RewardFn, resolve_inputs
from rlhfkit.train.ppo_trunk import TrunkSharing, TrunkStates, compute_trunks
from rlhfkit.train.ppo_update import (UpdateBatch, UpdateSettings, draw_plan, mean_stats, micro_batches,
                                      pad_columns, ppo_update, rollout_forward, rollout_stats)
from rlhfkit.utils import (MetricsLogger, progress, resolve_bf16, rng_state, set_rng_state, set_seed,
                           warn_if_slow_bf16)

CONFIG = PPOConfig
logger = logging.getLogger(__name__)


@dataclass
class Experience:
    """A rollout after steps 2-4: the update batch and plan, and what the statistics need."""

    batch: UpdateBatch
    plan: list[list[list[int]]]
    ref_logprobs: torch.Tensor
    rollout_logprobs: torch.Tensor
    stopped: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    shaped: ShapedRewards
    kl_coef: float
    time_forward: float


@dataclass
class RolloutBatch:
    """A rollout as the no-grad passes and the update read it: ``rows``, this process's rows on the device in the
    update's layout (prompts left-padded, responses right-padded to the global longest, boolean masks); the
    minibatch plan of every epoch, the first epoch's micro-batches (``groups``) and the frozen trunks computed over
    them (`ppo_trunk.compute_trunks`; None: none planned) in ``time_trunks`` seconds."""

    rows: Rollout
    plan: list[list[list[int]]]
    groups: list[list[int]]
    trunks: TrunkStates | None
    time_trunks: float

    def shared_trunks(self, policy: torch.nn.Module, critic: torch.nn.Module | None) -> BatchTrunks | None:
        """The trunks offered to the reward sources (`models.trunk.BatchTrunks`; a reward model that shares the
        lower blocks of the policy or the critic bit for bit runs only its blocks above them), or None."""
        if self.trunks is None:
            return None
        offered = tuple((trunk_decoder(model), trunk) for model, trunk in
                        ((critic, self.trunks.critic), (policy, self.trunks.policy)) if trunk is not None)
        r = self.rows
        return BatchTrunks(r.query_ids, r.query_mask, r.response_ids, r.response_mask, offered)


@dataclass
class IterationResult:
    """What one iteration produced: the metrics row, the per-minibatch update stats and sample rows."""

    stats: dict[str, float]
    minibatch_stats: list[dict[str, float]]
    samples: list[dict[str, Any]]


def decode_rows(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, skip_special_tokens: bool) -> list[str]:
    """The text of each row's real tokens."""
    rows = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    return tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)


class PPOTrainer:
    """Holds the models, optimizers and state of a PPO run; `train` runs it, `iteration` runs one step of it.

    Construction loads and validates everything and writes nothing, so a bad input fails before the output
    folder is touched.

    The Python API (``from rlhfkit import PPOTrainer``; docs/api.md) passes what the config's paths would name as
    objects instead (`rlhfkit.train.ppo_inputs`, each given once): ``policy`` (a path or a transformers causal LM,
    trained in place) with its ``tokenizer``, ``prompts`` (a path, a list of texts or dicts, or a
    ``datasets.Dataset``, validated like a file), ``reward_fn`` (a callable ``fn(prompts, responses) ->
    list[float]``, weighted by ``reward_fn_weight`` beside the config's ``reward_model`` sources), and
    ``callbacks``, each called as ``callback(step, metrics)`` with every logged metrics row (a callback that
    raises stops the run with an `RlhfkitError` naming it; `rlhfkit.utils.MetricsLogger`).
    """

    def __init__(self, config: PPOConfig, dist: Processes | None = None, *, policy: Any = None, tokenizer: Any = None,
                 prompts: Any = None, reward_fn: RewardFn | None = None, reward_fn_weight: float = 1.0,
                 callbacks: Sequence[Callable[[int, dict[str, float]], Any]] = ()) -> None:
        # 1. inputs, each given once (the config's path or a Python object); the processes
        self.inputs = resolve_inputs(config, policy, tokenizer, prompts, reward_fn, reward_fn_weight)
        self.cfg = cfg = self.inputs.cfg
        self.callbacks = check_callbacks(callbacks)
        self.dist = dist or Processes.start("ppo")
        self.output, self.device = Path(cfg.output), self.dist.device
        take_saved_settings(cfg)  # --resume: what the checkpoint resolved (precision, old log-probs)
        cfg.bf16 = resolve_bf16(cfg.bf16, self.device)  # unset: the device's default (config.yaml records it)
        cfg.old_logprobs = resolve_old_logprobs(cfg)  # auto: the sampler's where they equal the training forward's
        self.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        if self.dist.is_main:
            warn_if_slow_bf16(cfg.bf16, self.device, "ppo --bf16")
        self.num_iterations = cfg.num_iterations
        # 2. the rollout batch's shape on this process (whole prompts, minibatches)
        self.local_prompts, self.local_batch_size = self._local_batch_shape()
        set_seed(cfg.seed)  # LoRA weights (a new value head starts at zero: no random draw)
        # 3. tokenizer and prompts (the rows left after tokenising)
        self.tokenizer = ensure_pad_token(self.inputs.load_tokenizer())
        kept_rows = self._load_prompts()
        # 4. models: policy and reference, critic; the frozen lower blocks run once per rollout (`ppo_trunk`)
        self._build_policy_and_reference()
        self.critic = self._build_critic()
        self.trunks = TrunkSharing(cfg.reuse_frozen_trunk, cfg.freeze_layers, cfg.critic_freeze_layers)
        self._rollout_states: tuple[Rollout, Trunk] | None = None  # the last rollout and its sampler states
        # 5. reward sources, monitors, the prompts' reference responses (for ranker sources)
        self._load_rewards(kept_rows)
        # 6. sampling and update settings; the rollout engine
        self.generation = self._generation_config()
        self.update_settings = self._update_settings()
        self.engine = self._rollout_engine()
        # 7. --fsdp: the trained models sharded; optimizers and schedules, the KL controller, running score moments,
        # prompt order and random streams
        self._shard_models()
        self._build_optimizers()
        self._init_run_state()
        self.logger: MetricsLogger | None = None
        self.inputs.close()

    # -- construction helpers ----------------------------------------------------------------------------
    def _local_batch_shape(self) -> tuple[int, int]:
        """(prompts, responses) of this process per rollout: ``rollout_batch_size`` counts prompts and each process
        takes whole prompts (whole groups of k responses); its responses split into ``num_minibatches``."""
        cfg, world, k = self.cfg, self.dist.world_size, self.cfg.samples_per_prompt
        if cfg.rollout_batch_size % world:
            raise RlhfkitError(f"rollout_batch_size ({cfg.rollout_batch_size} prompts) must be a multiple of the number "
                               f"of processes ({world}): each process holds the k={k} responses of whole prompts")
        local_prompts = cfg.rollout_batch_size // world
        local_batch_size = local_prompts * k  # rows (responses) of this process
        if local_batch_size % cfg.num_minibatches:
            raise RlhfkitError(f"each process holds {local_prompts} prompts × samples_per_prompt {k} = "
                               f"{local_batch_size} responses, not divisible by num_minibatches "
                               f"({cfg.num_minibatches}); change rollout_batch_size or num_minibatches")
        return local_prompts, local_batch_size

    def _load_prompts(self) -> list[int]:
        """``prompt_ids`` and ``prompts``: the validated prompts that survive tokenising (``overlong``); returns the
        kept rows (1-based), by which the references are matched."""
        prompts = self.inputs.load_prompts()
        source = self.inputs.prompt_source
        self.prompt_ids, report = tokenize_prompts(self.tokenizer, prompts, self.cfg.max_prompt_length,
                                                   self.cfg.overlong, source=source)
        dropped = set(report.dropped_rows)
        kept = [row for row in range(1, len(prompts) + 1) if row not in dropped]
        self.prompts = [prompts[row - 1] for row in kept]
        if not self.prompt_ids:
            raise RlhfkitError(f"{source}: no prompt is left after tokenising ({report.describe()})")
        return kept

    def _build_policy_and_reference(self) -> None:
        """The policy (LoRA adapters, frozen lower blocks) and the reference: a frozen copy, or with LoRA the same
        weights with the adapters off (`models.adapters.adapters_disabled`, ``reference_context``)."""
        cfg = self.cfg
        separate_critic = not cfg.critic_free and cfg.critic != "shared"
        self.policy = self.inputs.load_policy(needs_folder=separate_critic).to(self.device)
        self.reference_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        if cfg.lora_r > 0:
            self.policy = apply_lora(self.policy, r=cfg.lora_r, alpha=cfg.lora_alpha,
                                     target_modules=cfg.lora_target_modules)
            self.reference = self.policy  # the same weights with the adapters disabled
            self.reference_context = functools.partial(adapters_disabled, self.policy)  # (frozen flags kept)
        else:
            self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        if cfg.freeze_layers:
            freeze_lower_layers(self.policy, cfg.freeze_layers)
        self.policy.eval()

    def _build_critic(self) -> torch.nn.Module | None:
        """The critic: None for a critic-free estimator; ``critic=shared`` a zero value head on the policy's trunk
        (no random draw); else a model of its own from `_critic_source` (its lower blocks frozen)."""
        cfg = self.cfg
        self.shared_critic = cfg.critic == "shared" and not cfg.critic_free
        if cfg.critic_free:
            return None
        if self.shared_critic:
            return ValueHead.for_model(self.policy).eval()
        critic = load_critic(self._critic_source(), tokenizer=self.tokenizer).to(self.device).eval()
        critic.requires_grad_(True)
        if cfg.critic_freeze_layers:
            freeze_lower_layers(critic, cfg.critic_freeze_layers)
        return critic

    def _load_rewards(self, kept_rows: list[int]) -> None:
        """``reward`` (the weighted sources; with ``score_norm=reference`` each reward model applies its stored
        statistics before the combination, an error for a source without them), ``monitors`` and, when a ranker
        source compares each response with its prompt's reference response, ``references`` (else None)."""
        cfg = self.cfg
        packing = cfg.packing != "off"
        self.reward = load_reward(self.inputs.rewards, self.inputs.reward_weights, self.tokenizer, device=self.device,
                                  normalize=cfg.score_norm == "reference", packing=packing)
        self.monitors = {monitor_name(spec): load_reward([spec], None, self.tokenizer, device=self.device,
                                                         packing=packing)
                         for spec in cfg.monitor_rewards}
        self.references: list[str] | None = None
        if any(needs_references(s) for s in (self.reward, *self.monitors.values())):
            references = load_references(self.inputs.prompts if self.inputs.prompts is not None else cfg.prompts)
            self.references = [references[row - 1] for row in kept_rows]

    def _generation_config(self) -> GenerationConfig:
        """Sampling settings; the stop tokens are EOS then ``stop_token_ids``."""
        cfg, eos = self.cfg, self.tokenizer.eos_token_id
        stops = ([eos] if eos is not None else []) + [t for t in cfg.stop_token_ids if t != eos]
        return GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
            top_p=cfg.top_p, stop_token_ids=tuple(stops), stop_strings=tuple(cfg.stop_strings),
            pad_token_id=self.tokenizer.pad_token_id)

    def _update_settings(self) -> UpdateSettings:
        """The update's settings (`ppo_update`); ``--packing on`` refuses a policy that cannot be packed."""
        cfg = self.cfg
        problem = packing_problem(self.policy) if cfg.packing == "on" else None
        if problem is not None:
            raise RlhfkitError(f"--packing on: the policy {cfg.policy} cannot be packed padding-free: {problem}; use "
                               f"--packing auto or off")
        return UpdateSettings(
            clip_range=cfg.clip_range, clip_range_value=cfg.clip_range_value, vf_coef=cfg.vf_coef,
            entropy_coef=cfg.entropy_coef, temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size,
            max_grad_norm=cfg.max_grad_norm, target_kl=cfg.target_kl, autocast_dtype=self.autocast_dtype,
            clip_range_low=cfg.clip_range_low, clip_range_high=cfg.clip_range_high,
            dual_clip=cfg.dual_clip or None, loss_aggregation=cfg.loss_aggregation, max_length=cfg.max_new_tokens,
            packing=cfg.packing != "off")

    def _shard_models(self) -> None:
        """``--fsdp``: the policy and a separate critic sharded by FSDP2 (gradients summed, as `sum_grads` sums;
        the reference and reward models stay replicated); without it nothing changes."""
        cfg = self.cfg
        self.policy = self.dist.shard(self.policy, cfg.fsdp, reduce="sum")
        if self.critic is not None and not self.shared_critic:
            self.critic = self.dist.shard(self.critic, cfg.fsdp, reduce="sum")

    def _build_optimizers(self) -> None:
        """Optimizers and schedules of policy and critic (``critic=shared`` or no critic: one optimizer and
        schedule, the value head its second param group; ``critic_optimizer`` / ``critic_scheduler`` None)."""
        cfg = self.cfg
        self.critic_optimizer: torch.optim.Optimizer | None = None
        self.critic_scheduler: Any = None
        policy_group = ModuleGroup("policy", self.policy, cfg.learning_rate)
        critic_group = ModuleGroup("critic", self.critic, cfg.value_learning_rate) if self.critic is not None else None
        if critic_group is None or self.shared_critic:
            self.policy_optimizer = build_optimizer([policy_group] + ([critic_group] if critic_group else []),
                                                    cfg.weight_decay)
        else:
            self.policy_optimizer = build_optimizer([policy_group], cfg.weight_decay)
            self.critic_optimizer = build_optimizer([critic_group], cfg.weight_decay)
            self.critic_scheduler = self._scheduler(self.critic_optimizer, self.num_iterations)
        # the policy's schedule (warm-up included) runs over the iterations after the critic warm-up
        self.policy_scheduler = self._scheduler(self.policy_optimizer,
                                                self.num_iterations - cfg.critic_warmup_iterations)

    def _init_run_state(self) -> None:
        """The state a checkpoint restores besides weights and optimizers: the KL controller, the running score
        moments, the prompt sampler, this process's sampling and shuffling generators."""
        cfg, rank = self.cfg, self.dist.rank
        try:
            self.kl_controller = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        except ValueError as e:
            raise RlhfkitError(str(e)) from None
        self.running_scores = RunningMoments()
        self.sampler = ppo_state.PromptSampler(len(self.prompt_ids), cfg.seed)
        self.sampling_generator = ppo_state.make_generator(ppo_state.stream_seed(cfg.seed, "sampling", rank))
        self.shuffle_generator = ppo_state.make_generator(ppo_state.stream_seed(cfg.seed, "shuffle", rank))
    def _critic_source(self) -> str:
        """The folder the critic starts from: the first reward model (``reward``; ``auto`` when it is a model
        folder that can read the policy's token ids, see `models.reward.critic_problem`) or the policy. ``auto``
        falls back to the policy with a warning; ``reward`` leaves the refusal to `load_critic` (an error)."""
        first, init = (self.cfg.reward_model or [None])[0], self.cfg.critic_init
        if init == "policy" or (init == "auto" and (first is None or not is_reward_model_folder(first))):
            return self.inputs.policy_path()
        if first is None or not is_reward_model_folder(first):
            raise RlhfkitError(f"critic_init=reward needs a reward-model folder as the first reward_model, got "
                               f"{first!r}; use critic_init=policy")
        if init == "auto":
            problem = critic_problem(first, self.tokenizer)
            if problem is not None:
                if self.dist.is_main:
                    logger.warning("critic_init=auto: the critic starts from the policy (new value head), not from "
                                   "the reward model %r: %s", first, problem)
                return self.inputs.policy_path()
        return first

    def _rollout_engine(self) -> Any:
        """The vLLM engine of ``rollout_engine=vllm`` (one process only: each process would need its own engine
        and its own share of the device), or None for the built-in sampler."""
        if self.cfg.rollout_engine != "vllm":
            return None
        if self.dist.world_size > 1:
            raise RlhfkitError(f"rollout_engine=vllm runs in one process; this run has {self.dist.world_size} "
                               "(use rollout_engine=hf with several processes)")
        from rlhfkit.rollout.vllm_engine import VLLMEngine

        cfg = self.cfg
        return VLLMEngine(hf_folder(cfg.policy), max_model_len=cfg.max_prompt_length + cfg.max_new_tokens,
                          max_num_seqs=self.local_batch_size, seed=cfg.seed,
                          dtype="bfloat16" if cfg.bf16 else "float32", device=self.device, tokenizer=self.tokenizer)

    def _scheduler(self, optimizer: torch.optim.Optimizer, iterations: int) -> Any:
        return build_scheduler(self.cfg.lr_scheduler, optimizer, self.cfg.warmup_iterations, iterations)

    def trains_policy(self, step: int) -> bool:
        """Whether iteration ``step`` (1-based) updates the policy: not in the first ``critic_warmup_iterations``,
        which train the critic alone."""
        return step > self.cfg.critic_warmup_iterations

    # -- step 1: rollout -------------------------------------------------------------------------------
    def rollout(self) -> tuple[Rollout, list[int]]:
        """Sample ``samples_per_prompt`` responses to each prompt of this process's share of the next global prompt
        batch, prompt-major; returns the rollout and each row's prompt index (with ``rollout_engine=vllm`` the
        engine first gets the policy's current weights: after the last update, or those of a resumed run)."""
        indices = self.sampler.next_batch(self.cfg.rollout_batch_size)
        rank, n, k = self.dist.rank, self.local_prompts, self.cfg.samples_per_prompt
        local = [i for i in indices[rank * n:(rank + 1) * n] for _ in range(k)]
        query_ids, query_mask = left_pad([self.prompt_ids[i] for i in local], self.tokenizer.pad_token_id)
        self._rollout_states = None
        if self.engine is not None:
            self.engine.sync_weights(self.policy)
            return self.engine.sample(query_ids, query_mask, self.generation, self.sampling_generator), local
        capture = self._state_capture()
        with gathered(self.policy):  # --fsdp: the full weights once, for the sampler's many forwards
            rollout = sample(self.policy, query_ids.to(self.device), query_mask.to(self.device), self.generation,
                             generator=self.sampling_generator, tokenizer=self.tokenizer,
                             autocast_dtype=self.autocast_dtype, capture=capture)
        if capture is not None:  # [prompt; response] columns; the end token's column is not the update's
            width = rollout.query_ids.shape[1] + rollout.response_ids.shape[1]
            self._rollout_states = (rollout, Trunk(capture.hidden[:, :width], capture.layers))
        return rollout, local

    def _state_capture(self) -> HiddenCapture | None:
        """``reuse_rollout_states``: what the sampler keeps for this iteration's trunks (`ppo_trunk`), or None: no
        trunk starts from the policy's tokens, the policy is sharded, the sampler's decoder is not the one the
        trunk runs (a wrapper), or the stage is under half the decoder's blocks (capturing keeps each finished row
        in the sampler's batch one step longer and adds a last two-token forward; below half a forward per row the
        saving may not pay for that)."""
        if not self.cfg.reuse_rollout_states or is_sharded(self.policy):
            return None
        depth = self.trunks.plan(self.policy, self.reference, self.critic).base_depth
        decoder = trunk_decoder(self.policy)
        get_decoder = getattr(self.policy, "get_decoder", None)
        if not depth or decoder is None or get_decoder is None or get_decoder() is not decoder or \
                2 * depth < num_blocks(decoder):
            return None
        return HiddenCapture(depth, end_id=self.tokenizer.pad_token_id)

    def _base_states(self, rollout: Rollout, query_ids: torch.Tensor, query_mask: torch.Tensor,
                     response_width: int, depth: int) -> Trunk | None:
        """The sampler's states of ``rollout`` (`rollout`'s capture) in the update's layout (responses padded to
        ``response_width``), if it was this trainer's last rollout, sampled from these very prompts, and the
        plan still starts with ``depth`` blocks, as many as they hold; else None (the trunk then runs them)."""
        states, self._rollout_states = self._rollout_states, None
        if states is None or states[0] is not rollout or not torch.equal(rollout.query_ids, query_ids) or \
                not torch.equal(rollout.query_mask.bool(), query_mask.bool()) or states[1].layers != depth:
            return None
        P = query_ids.shape[1]
        return Trunk(pad_columns(states[1].hidden, P + response_width, 0.0), states[1].layers)

    def greedy_scores(self, rollout: Rollout, indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``remax``: the raw scores and stop flags (B / k,) of one greedy (temperature 0) response to each prompt
        of the rollout (its rows p·k, prompt-major, ``indices`` their prompt indices), sampled by the same engine,
        scored by the same sources."""
        k = self.cfg.samples_per_prompt
        query_ids, query_mask = rollout.query_ids[::k], rollout.query_mask[::k]
        greedy = replace(self.generation, temperature=0.0)
        if self.engine is not None:
            out = self.engine.sample(query_ids, query_mask, greedy, None)
        else:
            with gathered(self.policy):
                out = sample(self.policy, query_ids.to(self.device), query_mask.to(self.device), greedy,
                             tokenizer=self.tokenizer, autocast_dtype=self.autocast_dtype)
        return self.raw_scores(out, indices[::k] if indices is not None else None)[0], out.stopped

    # -- step 2: score ---------------------------------------------------------------------------------
    def row_references(self, indices: list[int] | None) -> list[str] | None:
        """The reference response of each row's prompt (``indices``: the rows' prompt indices) when a reward
        source compares with references; else None."""
        if self.references is None:
            return None
        if indices is None:
            raise ValueError("a ranker reward source needs the rows' prompt indices to find their references")
        return [self.references[i] for i in indices]

    def raw_scores(self, rollout: Rollout, indices: list[int] | None = None, trunks: BatchTrunks | None = None
                   ) -> tuple[torch.Tensor, list[str], list[str]]:
        """The reward sources' scores (B,) of the rows, with the prompt and response texts they read
        (``indices``: each row's prompt index, needed by a ranker source for the prompt's reference response;
        ``trunks``: `RolloutBatch.shared_trunks`, which a reward model sharing those frozen blocks reads)."""
        prompts = decode_rows(self.tokenizer, rollout.query_ids, rollout.query_mask, skip_special_tokens=False)
        responses = decode_rows(self.tokenizer, rollout.response_ids, rollout.response_mask, skip_special_tokens=True)
        scores = call_source(self.reward, prompts, responses, rollout.query_ids, rollout.query_mask,
                             rollout.response_ids, rollout.response_mask, rollout.stopped,
                             references=self.row_references(indices), trunks=trunks)
        return scores.to(self.device, torch.float32), prompts, responses

    def monitor_stats(self, rollout: Rollout, prompts: list[str], responses: list[str],
                      indices: list[int] | None = None, trunks: BatchTrunks | None = None) -> dict[str, float]:
        """Mean score of each monitor reward over the global rollout batch (logged, never trained on);
        ``trunks`` as for `raw_scores`."""
        out = {}
        for name, source in self.monitors.items():
            scores = call_source(source, prompts, responses, rollout.query_ids, rollout.query_mask,
                                 rollout.response_ids, rollout.response_mask, rollout.stopped,
                                 references=self.row_references(indices), trunks=trunks).to(self.device,
                                                                                              torch.float32)
            out[f"monitor/{name}"] = float(self.dist.gather(scores).mean())
        return out

    def process_scores(self, raw_scores: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        """Missing-stop penalty, normalisation (global batch statistics) and clipping. With ``score_norm=reference``
        the reward sources already normalised their scores (before the combination and this penalty)."""
        cfg = self.cfg
        scores = missing_stop_penalty(raw_scores, stopped, cfg.missing_stop_penalty, cfg.missing_stop_mode)
        if cfg.score_norm == "whiten":
            scores = self.dist.local(whiten_scores(self.dist.gather(scores)))
        elif cfg.score_norm == "running":
            self.running_scores.update(self.dist.gather(scores))
            scores = self.running_scores.normalize(scores).to(torch.float32)
        scores = clip_scores(scores, cfg.score_clip)
        if not self.dist.all_true(bool(torch.isfinite(scores).all())):
            raise RlhfkitError("non-finite reward score after normalisation; the iteration was stopped before the "
                               "update (check the reward sources and score_norm)")
        return scores

    # -- step 3's trunks (before step 2) ------------------------------------------------------------------
    def rollout_batch(self, rollout: Rollout) -> RolloutBatch:
        """The rollout's rows on the device in the update's layout, the minibatch plan and the frozen trunks over
        the first epoch's micro-batches (`ppo_trunk`). Computed before the scores: a reward model that shares
        frozen blocks with the critic or the policy reads them (`RolloutBatch.shared_trunks`)."""
        cfg, dist = self.cfg, self.dist
        start = time.perf_counter()
        # responses padded to the global longest, so that statistics can gather (B, T) tensors
        T = dist.max_int(rollout.response_ids.shape[1])
        response_ids = pad_columns(rollout.response_ids, T, self.tokenizer.pad_token_id).to(self.device)
        response_mask = pad_columns(rollout.response_mask.bool(), T, False).to(self.device)
        rollout_logprobs = pad_columns(rollout.rollout_logprobs, T, 0.0).to(self.device)
        # prompts left-padded (as `sample` returns them; an injected rollout may pad them on either side)
        query_ids, query_mask = left_pad([rollout.query_ids[b][rollout.query_mask[b].bool()].tolist()
                                          for b in range(rollout.query_ids.shape[0])], self.tokenizer.pad_token_id)
        query_ids, query_mask = query_ids.to(self.device), query_mask.to(self.device)
        plan = draw_plan(query_ids.shape[0], cfg.ppo_epochs, cfg.num_minibatches, self.shuffle_generator)
        groups = [m for rows in plan[0] for m in micro_batches(rows, cfg.micro_batch_size)]
        with gathered(self.policy, self.critic):  # --fsdp: gathered outside the passes' inference mode
            # planned on the gathered models: under --fsdp their parameters are shards (DTensors) outside, which
            # the plan cannot compare with the reference's
            trunk_plan = self.trunks.plan(self.policy, self.reference, self.critic)
            # the sampler's states (reuse_rollout_states)
            base = self._base_states(rollout, query_ids, query_mask, T, trunk_plan.base_depth)
            trunks = compute_trunks(trunk_plan, self.policy, self.critic, query_ids, query_mask, response_ids,
                                    response_mask, groups, self.autocast_dtype, base=base)
        rows = Rollout(query_ids, query_mask, response_ids, response_mask, rollout_logprobs,
                       rollout.stopped.to(self.device))
        return RolloutBatch(rows, plan, groups, trunks, time.perf_counter() - start)

    def scoring_trunks(self, batch: RolloutBatch) -> BatchTrunks | None:
        """The frozen trunks offered to the reward sources (`RolloutBatch.shared_trunks`): none under autocast (the
        trunks' bf16 products are not what a float32 reward model computes) or with sharded models (``--fsdp``:
        their parameters are shards outside the gathered passes)."""
        if self.autocast_dtype is not None or is_sharded(self.policy) or is_sharded(self.critic):
            return None
        return batch.shared_trunks(self.policy, self.critic)

    # -- steps 2-4 -------------------------------------------------------------------------------------
    def prepare(self, rollout: Rollout, raw_scores: torch.Tensor,
                greedy: tuple[torch.Tensor, torch.Tensor] | None = None,
                batch: RolloutBatch | None = None) -> Experience:
        """Steps 2 (score processing), 3 (no-grad forward passes, shaped rewards) and 4 (advantages) on a rollout
        and its raw scores (``remax``: ``greedy`` = the raw scores and stop flags of its prompts' greedy responses,
        processed like the samples':
        missing-stop penalty, ``score_norm`` none or reference, clipping); ``batch``: the rollout's
        `rollout_batch` when the scores were computed with its trunks (else made here). Public so that a test can
        inject a fixed rollout."""
        cfg, dist = self.cfg, self.dist
        b = batch if batch is not None else self.rollout_batch(rollout)
        r = b.rows
        query_ids, query_mask, response_ids, response_mask = r.query_ids, r.query_mask, r.response_ids, r.response_mask
        rollout_logprobs, stopped = r.rollout_logprobs, r.stopped
        raw_scores = raw_scores.to(self.device, torch.float32)

        # 2. scores: penalty, normalisation, clipping
        scores = self.process_scores(raw_scores, stopped)
        greedy_scores = None
        if greedy is not None:
            greedy_scores = self.process_scores(greedy[0].to(self.device, torch.float32), greedy[1].to(self.device))

        # 3. no-grad forward passes over the first epoch's micro-batches (from the frozen trunks), then the
        # KL-shaped rewards
        start = time.perf_counter()
        recompute = cfg.old_logprobs == "recompute"
        with gathered(self.policy, self.critic):  # --fsdp: gathered outside the passes' inference mode
            fwd = rollout_forward(self.policy, self.reference, self.reference_context, self.critic, query_ids,
                                  query_mask, response_ids, response_mask, b.groups, cfg.temperature,
                                  self.autocast_dtype, with_logits=cfg.kl_estimator == "full", trunks=b.trunks,
                                  policy_pass=recompute, packing=self.update_settings.packing)
        old_logprobs = fwd.old_logprobs if recompute else torch.where(
            response_mask, rollout_logprobs.to(fwd.ref_logprobs.dtype), 0.0)
        kl_coef = self.kl_controller.value
        reward_kl_coef = kl_coef if cfg.kl_in == "reward" else 0.0  # kl_in=loss: the KL acts in the update

        def shape(s: torch.Tensor) -> ShapedRewards:
            return shape_rewards(s, old_logprobs, fwd.ref_logprobs, response_mask, reward_kl_coef,
                                 cfg.kl_estimator, fwd.logits, fwd.ref_logits, cfg.temperature)

        shaped = shape(scores)

        # 4. advantages (and returns with the critic)
        advantages, returns = estimate_advantages(cfg, shaped.rewards, scores, lambda s: shape(s).rewards,
                                                  fwd.old_values, response_mask, dist, greedy_scores)
        batch = UpdateBatch(query_ids, query_mask, response_ids, response_mask, old_logprobs, fwd.old_values,
                            advantages, returns, trunks=fwd.trunks,
                            ref_logprobs=fwd.ref_logprobs if cfg.kl_in == "loss" else None)
        return Experience(batch, b.plan, fwd.ref_logprobs, rollout_logprobs, stopped, raw_scores, scores, shaped,
                          kl_coef, b.time_trunks + time.perf_counter() - start)

    # -- step 5 ----------------------------------------------------------------------------------------
    def update(self, exp: Experience, train_policy: bool = True) -> list[dict[str, float]]:
        """The PPO update on a prepared batch (``kl_in=loss``: with the rollout's ``kl_coef`` on the KL loss), then
        one step of the learning-rate schedules. ``train_policy`` False (a critic warm-up iteration,
        `trains_policy`): the critic alone trains (`ppo_update`) and only its schedule steps."""
        settings = replace(self.update_settings, train_policy=train_policy)
        if self.cfg.kl_in == "loss":
            settings = replace(settings, kl_loss_coef=exp.kl_coef)
        history = ppo_update(self.policy, self.critic, self.policy_optimizer, self.critic_optimizer, exp.batch,
                             exp.plan, settings, self.dist)
        if train_policy:
            self.policy_scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()
        return history

    # -- step 6 ----------------------------------------------------------------------------------------
    def statistics(self, exp: Experience, history: list[dict[str, float]], lrs: dict[str, float]) -> dict[str, float]:
        """The rollout statistics over all processes, the update's per-minibatch means and the learning rates the
        update used (``lrs``), then the KL controller update, fed ``objective/kl`` (the k1 estimate of the sequence
        KL, whatever ``kl_estimator`` shapes the rewards)."""
        b = exp.batch
        stats = rollout_stats(self.dist, raw_scores=exp.raw_scores, scores=exp.scores, shaped=exp.shaped,
                              kl_coef=exp.kl_coef, old_logprobs=b.old_logprobs, ref_logprobs=exp.ref_logprobs,
                              rollout_logprobs=exp.rollout_logprobs, old_values=b.old_values, returns=b.returns,
                              response_mask=b.response_mask, stopped=exp.stopped)
        self.kl_controller.update(stats["objective/kl"], self.cfg.episodes_per_iteration)
        stats.update(mean_stats(history))
        stats.update(lrs)
        return stats

    def learning_rates(self, train_policy: bool = True) -> dict[str, float]:
        """The learning rates the coming update applies: ``train/lr`` the policy's (0 in a critic warm-up
        iteration, ``train_policy`` False), ``train/critic_lr`` the critic's (none without a critic)."""
        lrs = {"train/lr": module_lr(self.policy_scheduler, self.policy) if train_policy else 0.0}
        if self.critic is not None:  # critic=shared: the value head's param group
            lrs["train/critic_lr"] = module_lr(self.critic_scheduler or self.policy_scheduler, self.critic)
        return lrs

    def learn(self, rollout: Rollout, raw_scores: torch.Tensor, greedy: tuple[torch.Tensor, torch.Tensor] | None = None,
              train_policy: bool = True) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Steps 2-6 of `iteration` on a given rollout and its raw scores (how a test injects a fixed rollout);
        returns (stats, per-minibatch stats). ``greedy``: `prepare`'s (``remax``); ``train_policy``: `update`'s."""
        exp = self.prepare(rollout, raw_scores, greedy)
        lrs = self.learning_rates(train_policy)
        history = self.update(exp, train_policy)
        return self.statistics(exp, history, lrs), history

    # -- one iteration ---------------------------------------------------------------------------------
    def iteration(self, step: int) -> IterationResult:
        """Iteration ``step`` (1-based), steps 1-6 of the module docstring."""
        cfg = self.cfg
        start = time.perf_counter()
        # 1. rollout; remax: the greedy baseline responses too (sampled before the update, by the same policy)
        rollout, indices = self.rollout()
        greedy = self.greedy_scores(rollout, indices) if cfg.advantage_estimator == "remax" else None
        t_rollout = time.perf_counter() - start
        # 2. the reward sources' raw scores (and the monitors'), after step 3's frozen trunks: a reward model that
        # shares those blocks runs only its blocks above them
        batch = self.rollout_batch(rollout)
        t0 = time.perf_counter()
        trunks = self.scoring_trunks(batch)
        raw_scores, prompts, responses = self.raw_scores(rollout, indices, trunks)
        t_score = time.perf_counter() - t0
        # 2-4. score processing, the no-grad forward passes and shaped rewards, advantages
        exp = self.prepare(rollout, raw_scores, greedy, batch)
        # 5. the update (the critic alone in a critic warm-up iteration), then the learning-rate schedules' step
        train_policy = self.trains_policy(step)
        lrs = self.learning_rates(train_policy)
        t0 = time.perf_counter()
        history = self.update(exp, train_policy)
        t_update = time.perf_counter() - t0
        # 6. statistics and the KL controller update; a sample table every sample_table_every iterations
        stats = self.statistics(exp, history, lrs)
        stats.update(self.monitor_stats(rollout, prompts, responses, indices, trunks))
        elapsed = time.perf_counter() - start
        episodes = cfg.episodes_per_iteration
        tokens = stats["response/length_mean"] * episodes
        stats.update({"train/episodes": float(step * episodes), "time/rollout": t_rollout, "time/score": t_score,
                      "time/forward": exp.time_forward, "time/update": t_update, "time/iteration": elapsed,
                      "throughput/tokens_per_s": tokens / elapsed, "throughput/episodes_per_s": episodes / elapsed})
        samples = []
        if cfg.sample_table_every and step % cfg.sample_table_every == 0:
            samples = [{"step": step, "prompt": p, "response": r, "score": float(s), "stopped": bool(st)}
                       for p, r, s, st in zip(prompts, responses, raw_scores.tolist(), rollout.stopped.tolist())
                       ][:cfg.sample_table_rows]
        return IterationResult(stats, history, samples)

    # -- state -----------------------------------------------------------------------------------------------
    def trained_models(self) -> dict[str, torch.nn.Module]:
        """The models whose trainable weights a checkpoint holds: the policy and the critic (none without one)."""
        return {"policy": self.policy, **({"critic": self.critic} if self.critic is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights and the random streams that a resumed run needs: optimizers and schedules
        (``critic`` None with ``critic=shared`` or without a critic), the KL controller, the running score moments,
        the prompt sampler's position and the process count."""
        def state(obj: Any) -> dict | None:
            return None if obj is None else obj.state_dict()

        return {"kl_controller": self.kl_controller.state_dict(), "running_scores": self.running_scores.state_dict(),
                "prompt_sampler": self.sampler.state_dict(), "num_processes": self.dist.world_size,
                "optimizers": {"policy": optimizer_state(self.policy_optimizer),
                               "critic": optimizer_state(self.critic_optimizer)},
                "schedulers": {"policy": self.policy_scheduler.state_dict(), "critic": state(self.critic_scheduler)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def load(obj: Any, saved: dict | None, what: str) -> None:
            if (obj is None) != (saved is None):
                raise RlhfkitError(f"--resume: the checkpoint's critic {what} does not match this run's --critic / "
                                   f"--advantage_estimator")
            if isinstance(obj, torch.optim.Optimizer):
                load_optimizer_state(obj, saved)
            elif obj is not None:
                obj.load_state_dict(saved)

        load_optimizer_state(self.policy_optimizer, state["optimizers"]["policy"])
        load(self.critic_optimizer, state["optimizers"]["critic"], "optimizer")
        self.policy_scheduler.load_state_dict(state["schedulers"]["policy"])
        load(self.critic_scheduler, state["schedulers"]["critic"], "schedule")
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.running_scores.load_state_dict(state["running_scores"])
        self.sampler.load_state_dict(state["prompt_sampler"])

    def rank_state_dict(self) -> dict[str, Any]:
        """This process's random streams: the global RNG states and the sampling / shuffling generators."""
        return {"global": rng_state(), "sampling": self.sampling_generator.get_state(),
                "shuffle": self.shuffle_generator.get_state()}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state["global"])
        self.sampling_generator.set_state(state["sampling"])
        self.shuffle_generator.set_state(state["shuffle"])

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint iteration ``step`` (collective; `train.checkpoint.checkpoint_writer`'s layout)."""
        save_training_checkpoint(self.dist, self.output, step, self.cfg.keep_checkpoints, command="ppo",
                                 models=self.trained_models(), optimizers=self.optimizers(),
                                 state={"step": step, **self.state_dict()}, rank_state=self.rank_state_dict(),
                                 config=self.cfg)

    def optimizers(self) -> dict[str, torch.optim.Optimizer | None]:
        return {"policy": self.policy_optimizer, "critic": self.critic_optimizer}

    # -- the run -----------------------------------------------------------------------------------------
    def open_output(self) -> int:
        """Prepare ``OUTPUT`` for a fresh run or restore the latest checkpoint; returns the first iteration."""
        cfg, dist = self.cfg, self.dist
        last = 0
        if cfg.resume:
            ckpt = require_latest_checkpoint(self.output)
            check_format(ckpt)
            ppo_state.check_resume_config(cfg, ckpt)
            _, state, rank_state = read_training_checkpoint(dist, ckpt, "ppo", self.trained_models(),
                                                            optimizers=self.optimizers())
            self.load_state_dict(state)
            self.load_rank_state_dict(rank_state)
            last = int(state["step"])
            if last != checkpoint_step(ckpt):
                raise RlhfkitError(f"{ckpt}: its trainer_state.json names iteration {last}")
        elif dist.is_main:
            prepare_fresh_output(self.output, ppo_state.RUN_ENTRIES, cfg.overwrite)
        dist.barrier()
        if dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output / "config.yaml")
            if cfg.resume:
                ppo_state.truncate_jsonl(self.output / "samples.jsonl", last)
            else:
                (self.output / "samples.jsonl").write_text("")
        self.logger = MetricsLogger(self.output / "metrics.jsonl", self.output / "tensorboard",
                                    enabled=dist.is_main, resume_step=last if cfg.resume else None,
                                    callbacks=self.callbacks)
        return last + 1

    def log(self, step: int, result: IterationResult) -> None:
        cfg = self.cfg
        if step % cfg.log_every == 0 or step == self.num_iterations:
            self.logger.log(step, result.stats)
        if result.samples and self.dist.is_main:
            with open(self.output / "samples.jsonl", "a") as f:
                for row in result.samples:
                    f.write(json.dumps(row) + "\n")
            table = "| prompt | response | score |\n|---|---|---|\n" + "\n".join(
                f"| {_cell(r['prompt'])} | {_cell(r['response'])} | {r['score']:.4g} |" for r in result.samples)
            self.logger.log_text("samples", table, step)

    def train(self) -> list[IterationResult]:
        """Run (or continue) the whole training; returns the results of the iterations run now.

        A fresh run checks its output folder, then runs iteration 1 before it writes anything: a reward source
        that fails on the first rollout leaves the folder (and a previous run that --overwrite would replace) as
        it was."""
        cfg, pending = self.cfg, None
        if not cfg.resume:
            check_fresh_output(self.output, ppo_state.RUN_ENTRIES, cfg.overwrite)  # read-only: every process checks
            pending = self.iteration(1)
        first = self.open_output()
        results = []
        bar = progress(total=self.num_iterations, initial=first - 1, desc="ppo", enabled=self.dist.is_main)
        try:
            for step in range(first, self.num_iterations + 1):
                result = self.iteration(step) if pending is None else pending
                pending = None
                self.log(step, result)
                results.append(result)
                bar.update(1)
                bar.set_postfix(score=f"{result.stats['objective/scores']:.3g}",
                                kl=f"{result.stats['objective/kl']:.3g}")
                # 7. checkpoint
                every = cfg.save_every
                if every and (step % every == 0 or step == self.num_iterations):
                    self.save_checkpoint(step)
            ppo_state.save_final(self.dist, self.output, self.tokenizer, self.policy, self.critic)
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        return results


def monitor_name(spec: str) -> str:
    """The metric name of a monitor reward: the function's name of ``module:function``, else the folder's name."""
    if ":" in spec and not Path(spec).expanduser().exists():
        return spec.rsplit(":", 1)[1]
    return Path(spec).expanduser().resolve().name


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run(cfg: PPOConfig) -> None:
    """The ``rlhfkit ppo`` command."""
    PPOTrainer(cfg).train()
