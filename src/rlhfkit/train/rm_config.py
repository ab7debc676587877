"""Configurations of the reward-model commands: ``rlhfkit rm train``, ``rlhfkit rm eval`` and ``rlhfkit score``.

Each field's ``help`` text is the user documentation of that flag / YAML key (``rlhfkit rm train --help``).
Values are validated in ``__post_init__``; an invalid value raises `RlhfkitError` (exit status 2, nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rlhfkit.config import check_choice, check_range
from rlhfkit.errors import RlhfkitError

PAIRWISE_LOSSES: tuple[str, ...] = ("logsigmoid", "logexp", "margin", "token_level")
POINTWISE_LOSSES: tuple[str, ...] = ("bce", "ce2", "mse")
LOSSES: tuple[str, ...] = PAIRWISE_LOSSES + POINTWISE_LOSSES + ("multi_objective",)
MODEL_KINDS: tuple[str, ...] = ("auto", "decoder", "encoder", "pairrm", "seq2seq")
RANKER_KINDS: tuple[str, ...] = ("pairrm", "seq2seq")  # one input holds both responses; BCE on both orders
AGGREGATIONS: tuple[str, ...] = ("last", "mean", "sum")
POOLINGS: tuple[str, ...] = ("cls", "mean")
OVERLONG: tuple[str, ...] = ("truncate_prompt_left", "drop", "fail")
LR_SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant")
NORMALIZE: tuple[str, ...] = ("none", "whiten", "reference")
PACKING: tuple[str, ...] = ("auto", "on", "off")

_OVERLONG_HELP = (
    "What to do with an example longer than max_length tokens: 'truncate_prompt_left' drops the oldest prompt "
    "tokens (the response is never cut; an example whose response alone is too long is dropped), 'drop' skips "
    "the example, 'fail' stops with an error naming the row. A report of affected rows is printed."
)

_SKIP_HELP = ("Preference data: skip rows that fail validation (each is reported with file, row and field) instead "
              "of stopping at the first one. Off by default: bad rows are errors.")


def _check_lengths(max_length: int, batch_size: int) -> None:
    check_range("max_length", max_length, 8)
    check_range("batch_size", batch_size, 1)


@dataclass
class RMTrainConfig:
    """Train a reward model on preference (or pointwise) data."""

    model: Optional[str] = field(default=None, metadata={
        "help": "Base model: a Hugging Face folder, a .gguf file, or a folder holding one .gguf file (usually the "
                "SFT model). Python API: or RewardTrainer(model=...), a path or a model object; given once.",
        "required": True})
    data: Optional[str] = field(default=None, metadata={
        "help": "Training data file (.jsonl, .jsonl.gz, .json, .parquet, .csv or a datasets folder). Pairwise "
                "losses read preference rows (prompt/chosen/rejected, Anthropic HH chosen/rejected, or messages); "
                "bce/ce2 read pointwise rows with a 0/1 'label'; mse reads a float 'score'; multi_objective reads "
                "one float per aspect (see --aspects). Python API: or RewardTrainer(data=...), a path, a list of "
                "dicts or a datasets.Dataset; given once.", "required": True})
    output: Optional[str] = field(default=None, metadata={
        "help": "Output folder: the final reward model (loadable with AutoModelForSequenceClassification for "
                "decoder/last), config.yaml, metrics.jsonl, tensorboard/ and checkpoints/.", "required": True})
    eval_data: Optional[str] = field(default=None, metadata={
        "help": "Held-out data in the same format as --data. When not given, --eval_fraction of --data is held "
                "out (a seeded random split)."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Fraction of --data held out for evaluation when --eval_data is not given (0 = no evaluation)."})
    loss: str = field(default="logsigmoid", metadata={
        "help": "Training loss. Pairwise (preference data): 'logsigmoid' = -log σ(r_c - r_r) (Bradley-Terry); "
                "'logexp' = log(1 + exp(r_r - r_c)); 'margin' = -log σ(r_c - r_r - m) with the data's 'margin' "
                "column (Llama-2); 'token_level' compares per-token scores after the first differing token "
                "(DeepSpeed-Chat). Pointwise: 'bce' (0/1 label, one logit), 'ce2' (0/1 label, two logits), 'mse' "
                "(float score). 'multi_objective': regression on several aspects (--aspects)."})
    model_kind: str = field(default="auto", metadata={
        "help": "Reward-model architecture: 'decoder' (causal LM backbone), 'encoder' (bidirectional "
                "backbone), 'pairrm' (one input holds the prompt and both responses; trained with BCE on both "
                "orders), 'seq2seq' (SteamSHP style: an encoder-decoder LM such as T5 reads the prompt and both "
                "responses and scores the answer 'A' against 'B' at its first decoder step; BCE on both orders), "
                "'auto' = decoder, encoder or (an encoder-decoder config) seq2seq from the model's config."})
    aggregation: str = field(default="last", metadata={
        "help": "Decoder models: how per-token scores become one score: 'last' real token (the standard, "
                "loadable by AutoModelForSequenceClassification), 'mean' or 'sum' over response tokens."})
    pooling: str = field(default="cls", metadata={"help": "Encoder models: 'cls' (first token) or 'mean' pooling."})
    aspects: Optional[list[str]] = field(default=None, metadata={
        "help": "multi_objective: the names of the score columns to regress (e.g. helpfulness correctness). "
                "Rows may leave an aspect null; it is then masked out of the loss."})
    aspect_weights: Optional[list[float]] = field(default=None, metadata={
        "help": "multi_objective: weights that combine the aspect scores into the one scalar score (default: "
                "equal weights summing to 1)."})
    center_rewards_coef: float = field(default=0.0, metadata={
        "help": "Pairwise losses: weight of the auxiliary loss coef·mean((r_c + r_r)²) that keeps scores centred "
                "on 0 (Eisenstein et al. 2023). 0 = off."})
    skip_invalid: bool = field(default=False, metadata={"help": _SKIP_HELP})
    max_length: int = field(default=1024, metadata={"help": "Longest tokenised prompt+response, in tokens."})
    overlong: str = field(default="truncate_prompt_left", metadata={"help": _OVERLONG_HELP})
    epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of AdamW."})
    lr_scheduler: str = field(default="linear", metadata={
        "help": "Learning-rate schedule after warm-up: 'linear' decay to 0, 'cosine' decay to 0, or 'constant'."})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "Fraction of the optimizer steps spent warming up linearly from 0 (ignored when warmup_steps > 0)."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up optimizer steps (overrides warmup_ratio)."})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW decoupled weight decay, applied to matrices only (not to biases and norm weights)."})
    batch_size: int = field(default=32, metadata={
        "help": "Global batch: examples (pairs for pairwise losses) per optimizer step, over all processes. "
                "A final incomplete batch of an epoch is skipped."})
    micro_batch_size: int = field(default=8, metadata={
        "help": "Examples per forward pass per process. Gradient accumulation steps = batch_size / "
                "(micro_batch_size × number of processes), which must be a whole number."})
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "Run forward passes under torch.autocast(bfloat16) (CPU or GPU); weights and optimizer stay float32; "
                "unset = auto: on for a CUDA GPU with fast bf16, off on a CPU (float32; bf16 is ~400x slower on AVX2-only CPUs); --bf16 or --bf16 false chooses. "
                "This flag alone sets the precision: accelerate's mixed precision stays off, and a process whose "
                "accelerate state already has one (e.g. after a TRL Trainer) is refused."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this (0 = off)."})
    eval_steps: int = field(default=0, metadata={
        "help": "Evaluate on the held-out data every this many optimizer steps (0 = only at the end)."})
    save_steps: int = field(default=0, metadata={
        "help": "Write a checkpoint (weights, optimizer, scheduler, RNG, data position) every this many optimizer "
                "steps (0 = never); --resume continues from the newest one."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Keep only the newest N checkpoints (0 = keep all)."})
    logging_steps: int = field(default=10, metadata={
        "help": "Write metrics (averaged over the last logging_steps optimizer steps) every this many steps."})
    seed: int = field(default=42, metadata={"help": "Seed of the head initialisation, data split and data order."})
    resume: bool = field(default=False, metadata={
        "help": "Continue from the newest checkpoint in --output; the run ends exactly as an uninterrupted one."})
    overwrite: bool = field(default=False, metadata={
        "help": "Allow training into an --output folder that already holds files (without --resume)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0 = train the full model). The head is always "
                                                     "trained in full; LoRA is merged before the final save."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: Optional[list[str]] = field(default=None, metadata={
        "help": "Module names LoRA adapts (default: peft's 'all-linear', every linear layer but the head, which "
                "is always trained in full: for GPT/Llama/Qwen/BERT-style models, all linear layers of the "
                "attention and MLP blocks)."})
    freeze_layers: int = field(default=0, metadata={
        "help": "Freeze the embeddings and the lowest N transformer layers (-1 = all layers: train the head only)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass (less memory, ~30% slower)."})
    fsdp: bool = field(default=False, metadata={
        "help": "Shard the model, its gradients and optimizer state over the processes with torch FSDP2 "
                "(fully_shard per transformer layer and per other module with weights; several processes); checkpoints "
                "become sharded (torch.distributed.checkpoint) and resume onto another process count. Off: DDP."})
    group_by_length: bool = field(default=True, metadata={
        "help": "Build batches of similar lengths (less padding, faster); the order is still seeded random."})
    group_by_prompt: bool = field(default=False, metadata={
        "help": "Pairwise data with several responses per prompt (all pairs of K responses labelled): keep a "
                "prompt's pairs in the same batch and run each distinct sequence of a micro-batch once "
                "(InstructGPT's K-wise batching; an epoch then costs ~K forward passes per prompt instead of "
                "K(K-1)). Takes precedence over group_by_length."})
    packing: str = field(default="auto", metadata={
        "help": "Padding-free packing: run each micro-batch as ONE sequence of its rows' real tokens, with position "
                "ids restarting at 0 per row and attention restricted to each row (SDPA per row), so no padding "
                "is computed and attention costs Σ n_i² rather than (Σ n_i)²; with --share_prompts, rows that "
                "share a prompt run it once. Same scores and gradients up to float rounding. 'auto': on for "
                "decoder reward models with SDPA attention and no sliding window, off elsewhere (encoder, "
                "PairRM, seq2seq); 'on': the same, but refuse a model it cannot apply to; 'off': padded batches."})
    share_prompts: bool = field(default=True, metadata={
        "help": "Decoder reward models with SDPA attention: the rows of a micro-batch that share their prompt run "
                "it once (inside the packed sequence with --packing; else packed into one padded sequence with a "
                "block-causal mask), and, packed, the leading tokens that every row has in common (a chat "
                "template's system prompt) run once per micro-batch; same scores and gradients up to float "
                "rounding. Pairs always share their prompt; K-wise batches K times."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder."})

    def __post_init__(self) -> None:
        # model and data may come from Python objects instead (RewardTrainer checks that each is given once)
        if not self.output:
            raise RlhfkitError("output is required")
        check_choice("loss", self.loss, LOSSES)
        check_choice("model_kind", self.model_kind, MODEL_KINDS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("overlong", self.overlong, OVERLONG)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_choice("packing", self.packing, PACKING)
        _check_lengths(self.max_length, self.batch_size)
        check_range("eval_fraction", self.eval_fraction, 0.0, 1.0)
        if self.eval_fraction >= 1.0:
            raise RlhfkitError(f"invalid eval_fraction={self.eval_fraction}; must be < 1")
        check_range("center_rewards_coef", self.center_rewards_coef, 0.0)
        check_range("epochs", self.epochs, 1)
        check_range("learning_rate", self.learning_rate, 0.0, lo_open=True)
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("micro_batch_size", self.micro_batch_size, 1)
        if self.batch_size % self.micro_batch_size:
            raise RlhfkitError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size="
                               f"{self.micro_batch_size} (gradient accumulation takes whole micro-batches)")
        check_range("max_grad_norm", self.max_grad_norm, 0.0)
        for name in ("eval_steps", "save_steps", "keep_checkpoints"):
            check_range(name, getattr(self, name), 0)
        check_range("logging_steps", self.logging_steps, 1)
        check_range("lora_r", self.lora_r, 0)
        check_range("lora_alpha", self.lora_alpha, 0.0, lo_open=True)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        check_range("freeze_layers", self.freeze_layers, -1)
        if self.loss == "multi_objective":
            if not self.aspects:
                raise RlhfkitError("loss=multi_objective needs --aspects (the names of the score columns)")
        elif self.aspects or self.aspect_weights:
            raise RlhfkitError("--aspects/--aspect_weights are only used with loss=multi_objective")
        if self.aspect_weights is not None and len(self.aspect_weights) != len(self.aspects or []):
            raise RlhfkitError(f"--aspect_weights has {len(self.aspect_weights)} values for "
                               f"{len(self.aspects or [])} aspects")
        if self.skip_invalid and self.loss not in PAIRWISE_LOSSES:
            raise RlhfkitError("--skip_invalid applies to preference data (pairwise losses) only")
        if self.center_rewards_coef > 0 and self.loss not in PAIRWISE_LOSSES:
            raise RlhfkitError("center_rewards_coef applies to pairwise losses only")
        if self.group_by_prompt and self.loss not in PAIRWISE_LOSSES:
            raise RlhfkitError("--group_by_prompt applies to preference data (pairwise losses) only")
        if self.model_kind != "auto":
            self.check_model_kind(self.model_kind)

    def check_model_kind(self, kind: str) -> None:
        """Reject settings that the reward-model kind (decoder, encoder, pairrm or seq2seq) cannot use.

        Called here for an explicit --model_kind, and by `rm train` once 'auto' is resolved from the model's config
        (before anything is written), so that an auto-detected encoder is held to the same rules.
        """
        which = (f"model_kind={kind}" if kind == self.model_kind
                 else f"model_kind=auto resolved to {kind!r} for {self.model}")
        if kind in RANKER_KINDS:
            ranker = {"pairrm": "PairRM", "seq2seq": "a seq2seq ranker"}[kind]
            if self.loss != "logsigmoid":
                raise RlhfkitError(f"{which}: a ranker is trained with its own BCE on both orders of each pair; "
                                   f"leave loss at its default 'logsigmoid' (preference data)")
            if self.center_rewards_coef > 0:
                raise RlhfkitError(f"center_rewards_coef does not apply to {which}: {ranker} outputs the "
                                   f"probability that one response beats the other, not per-response rewards to "
                                   f"centre; leave center_rewards_coef at 0")
            if self.group_by_prompt:
                raise RlhfkitError(f"--group_by_prompt does not apply to {which}: each ranker input holds the prompt "
                                   f"and both responses, so no sequence is shared between pairs")
        if kind == "seq2seq" and self.freeze_layers != 0:
            raise RlhfkitError(f"--freeze_layers does not apply to {which}: an encoder-decoder has two stacks of "
                               f"blocks and no separate head (its LM head reads the answers); train it in full or "
                               f"with --lora_r")
        if self.loss == "token_level" and kind != "decoder":
            raise RlhfkitError(f"loss=token_level needs the causal per-token scores of a decoder model, but {which} "
                               f"(a bidirectional backbone: each token's output sees the whole sequence); use a "
                               f"decoder backbone or a sequence-level loss such as logsigmoid")
        if self.aggregation != "last" and kind != "decoder":
            raise RlhfkitError(f"--aggregation {self.aggregation} applies to decoder reward models, but {which}"
                               + {"pairrm": " (PairRM reads the last token)",
                                  "seq2seq": " (a seq2seq ranker reads its first decoder step)"}.get(
                                   kind, "; encoders pool with --pooling cls|mean"))
        if self.packing == "on" and kind != "decoder":
            raise RlhfkitError(f"--packing on needs a decoder reward model (causal attention within each packed "
                               f"row), but {which}; use --packing auto (packs decoders only) or off")
        if self.pooling != "cls" and kind != "encoder":
            raise RlhfkitError(f"--pooling {self.pooling} applies to encoder reward models, but {which}"
                               + ("" if kind in RANKER_KINDS else "; decoders aggregate with --aggregation last|mean|sum"))

    @property
    def pairwise(self) -> bool:
        """True when the loss reads preference pairs (PairRM included)."""
        return self.loss in PAIRWISE_LOSSES


@dataclass
class RMEvalConfig:
    """Evaluate a reward model on preference data: pairwise accuracy, mean margin and calibration."""

    model: str = field(metadata={"help": "Reward-model folder written by `rlhfkit rm train`."})
    data: str = field(metadata={"help": "Preference data (prompt/chosen/rejected, Anthropic HH or messages)."})
    output: Optional[str] = field(default=None, metadata={
        "help": "Write the metrics as JSON here (accuracy, margin, ece, bins, n, ...); the table is always printed."})
    skip_invalid: bool = field(default=False, metadata={"help": _SKIP_HELP})
    batch_size: int = field(default=16, metadata={"help": "Pairs per forward pass."})
    max_length: int = field(default=1024, metadata={"help": "Longest tokenised prompt+response, in tokens."})
    overlong: str = field(default="truncate_prompt_left", metadata={"help": _OVERLONG_HELP})
    num_bins: int = field(default=10, metadata={
        "help": "Equal-width confidence bins over [0.5, 1] for the calibration table and ECE; confidence = "
                "max(p, 1-p) with p = σ(r_chosen - r_rejected)."})
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "Score under torch.autocast(bfloat16); unset = auto: on for a CUDA GPU with fast bf16, off on a CPU (float32; bf16 is ~400x slower on AVX2-only CPUs); --bf16 or --bf16 false chooses."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder."})

    def __post_init__(self) -> None:
        _check_lengths(self.max_length, self.batch_size)
        check_choice("overlong", self.overlong, OVERLONG)
        check_range("num_bins", self.num_bins, 1)


@dataclass
class ScoreConfig:
    """Score prompt/response rows with a reward model; write JSONL with a 'score' per row."""

    model: str = field(metadata={"help": "Reward-model folder written by `rlhfkit rm train`."})
    data: str = field(metadata={"help": "Rows with 'prompt' and 'response' (text or chat messages)."})
    output: str = field(metadata={
        "help": "Output JSONL: every input row with its fields plus 'score' (and 'raw_score' when normalised)."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass."})
    max_length: int = field(default=1024, metadata={"help": "Longest tokenised prompt+response, in tokens."})
    overlong: str = field(default="truncate_prompt_left", metadata={
        "help": _OVERLONG_HELP.replace("'drop' skips the example", "'drop' writes the row with score null")})
    normalize: str = field(default="none", metadata={
        "help": "'none': raw scores; 'whiten': (s - mean)/std over all scored rows of this file; 'reference': "
                "(s - mean_ref)/std_ref with the reference statistics stored in the model folder "
                "(see --fit_reference)."})
    clip: Optional[float] = field(default=None, metadata={
        "help": "Clip the (normalised) scores to [-clip, clip]; not set = no clipping."})
    fit_reference: Optional[str] = field(default=None, metadata={
        "help": "Score this file of reference prompt/response rows first and store its score mean/std in the "
                "model folder's rlhfkit.json (so that reference outputs average 0 under normalize=reference)."})
    bf16: Optional[bool] = field(default=None, metadata={
        "help": "Score under torch.autocast(bfloat16); unset = auto: on for a CUDA GPU with fast bf16, off on a CPU (float32; bf16 is ~400x slower on AVX2-only CPUs); --bf16 or --bf16 false chooses."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model folder."})

    def __post_init__(self) -> None:
        _check_lengths(self.max_length, self.batch_size)
        check_choice("overlong", self.overlong, OVERLONG)
        check_choice("normalize", self.normalize, NORMALIZE)
        check_range("clip", self.clip, 0.0, lo_open=True, allow_none=True)
