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
- Both: the median wall time between consecutive iteration logs (the anchor's definition, the warm-up excluded),
  the mean time split over the same iterations, and the peak RSS of each process (``os.wait4``).

    python benchmarks/bench_ppo.py                 # full size (~20 min on 2 cores); writes results/ppo-DATE.json
    python benchmarks/bench_ppo.py --tiny          # smoke run (anchor's tiny shape, short prompts/responses)
    python benchmarks/bench_ppo.py --which trl --precision fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FULL = {"iters": 3, "batch": 16, "resp": 64, "prompt": 64}
TINY = {"iters": 1, "batch": 4, "resp": 8, "prompt": 8}
WORD_SEED = 1234


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the anchor's tiny shape (2 layers, hidden 64), short run")
    p.add_argument("--which", choices=("both", "trl", "ours"), default="both")
    p.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both")
    for key in FULL:
        p.add_argument(f"--{key}", type=int, default=None, help=f"default {FULL[key]} (tiny {TINY[key]})")
    p.add_argument("--trl-plain", action="store_true", help="run the anchor without the timing wrapper (no split)")
    p.add_argument("--anchor", default=C.DEFAULT_ANCHOR, help="the team's TRL anchor script")
    p.add_argument("--config-dir", default=C.DEFAULT_CONFIG_DIR, help="SmolLM2-135M config + tokenizer folder")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per side")
    p.add_argument("--child", choices=("prep", "ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for key, value in (TINY if a.tiny else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.batch % 4:
        raise SystemExit("--batch must be a multiple of 4 (4 micro-batches per minibatch, as in the anchor)")
    return a


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
    """Policy folder, reward-model folder (critic init) and ``batch × (iters + 1)`` prompts of ``prompt`` tokens."""
    import torch
    from transformers import AutoTokenizer

    from rlhfkit.models.reward import RewardModel

    work = Path(a.workdir)
    policy = C.save_random_causal_lm(a.config_dir, work / "policy", a.tiny)
    tokenizer = AutoTokenizer.from_pretrained(a.config_dir)
    torch.manual_seed(1)
    rm = RewardModel.from_backbone(policy, kind="decoder", aggregation="last", tokenizer=tokenizer)
    rm.save_pretrained(work / "rm", tokenizer)
    words = single_token_words(tokenizer)
    g = torch.Generator().manual_seed(WORD_SEED)
    with open(work / "prompts.jsonl", "w") as f:
        for _ in range(a.batch * (a.iters + 1)):
            picks = torch.randint(0, len(words), (a.prompt,), generator=g).tolist()
            f.write(json.dumps({"prompt": "".join(" " + words[i] for i in picks)}) + "\n")


def child_ours(a: argparse.Namespace) -> None:
    """rlhfkit's PPO trainer for iters + 1 iterations; prints the result line."""
    from rlhfkit.train.ppo_config import PPOConfig
    from rlhfkit.train.ppo_trainer import PPOTrainer

    work = Path(a.workdir)
    cfg = PPOConfig(policy=str(work / "policy"), reward_model=[str(work / "rm")], prompts=str(work / "prompts.jsonl"),
                    output=str(work / ("out-bf16" if a.bf16 else "out-fp32")), critic_init="reward",
                    max_prompt_length=a.prompt, overlong="fail", max_new_tokens=a.resp, temperature=0.7,
                    rollout_batch_size=a.batch, iterations=a.iters + 1, ppo_epochs=4, num_minibatches=1,
                    micro_batch_size=a.batch // 4, learning_rate=3e-6, kl_coef=0.05, vf_coef=0.1,
                    bf16=a.bf16, sample_table_every=0, seed=0, overwrite=True)
    trainer = PPOTrainer(cfg)
    lengths = sorted({len(ids) for ids in trainer.prompt_ids})
    if lengths != [a.prompt]:
        raise RuntimeError(f"prompts tokenise to {lengths} tokens, expected exactly {a.prompt}")
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
                "iterations": len(stats)})
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


def grouped_split(side: str, split: dict[str, float]) -> dict[str, float]:
    return {group: round(sum(split.get(k, 0.0) for k in keys), 3) for group, keys in GROUPS[side].items()}


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
                    "iter_s": split["iter_s"], "wrapper_median_iter_s": split["median_iter_s"]})
    return out


def run_ours(a: argparse.Namespace, bf16: bool, workdir: str) -> dict:
    cmd = [C.python(), __file__, "--child", "ours", "--workdir", workdir, "--config-dir", a.config_dir]
    cmd += shape_args(a) + ["--bf16"] * bf16 + ["--tiny"] * a.tiny
    m = C.run_measured(cmd, a.timeout)
    C.require_ok(m, "rlhfkit PPO trainer")
    r = C.last_json(m.stdout, C.RESULT_PREFIX)
    return {**r, "split_grouped_s": grouped_split("ours", r["split_mean_s"]), "peak_rss_gb": round(m.peak_rss_gb, 3),
            "process_wall_s": round(m.wall_s, 1)}


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    if a.child:
        return {"prep": child_prep, "ours": child_ours, "trl": child_trl}[a.child](a)
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    settings = {"model": "SmolLM2-135M architecture, random init" + (" (tiny: 2 layers, hidden 64)" if a.tiny
                                                                      else ""),
                "prompts_per_iteration": a.batch, "prompt_tokens": a.prompt, "response_tokens": a.resp,
                "ppo_epochs": 4, "num_minibatches": 1, "micro_batch_size": a.batch // 4,
                "gradient_accumulation": 4, "critic": "separate", "fine_tuning": "full", "temperature": 0.7,
                "iterations": a.iters + 1, "warmup_iterations_excluded": 1, "precisions": precisions,
                "anchor": a.anchor, "tiny": a.tiny}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-ppo-") as work:
        if a.which in ("both", "ours"):
            prep = C.run_measured([C.python(), __file__, "--child", "prep", "--workdir", work, "--config-dir",
                                   a.config_dir] + shape_args(a) + ["--tiny"] * a.tiny, a.timeout)
            C.require_ok(prep, "model preparation")
        for prec in precisions:
            bf16 = prec == "bf16"
            row: dict = {}
            if a.which in ("both", "trl"):
                print(f"[{prec}] TRL PPOTrainer ...", flush=True)
                row["trl"] = run_trl(a, bf16)
            if a.which in ("both", "ours"):
                print(f"[{prec}] rlhfkit PPO trainer ...", flush=True)
                row["ours"] = run_ours(a, bf16, work)
            if "trl" in row and "ours" in row:
                row["ratio"] = {"median_iter_s": C.ratio(row["ours"]["median_iter_s"], row["trl"]["median_iter_s"]),
                                "speedup": C.ratio(row["trl"]["median_iter_s"], row["ours"]["median_iter_s"]),
                                "peak_rss": C.ratio(row["ours"]["peak_rss_gb"], row["trl"]["peak_rss_gb"])}
            rows[prec] = row
    table, split_rows = [], []
    for prec, row in rows.items():
        t, o, r = row.get("trl", {}), row.get("ours", {}), row.get("ratio", {})
        table.append([prec, t.get("median_iter_s"), o.get("median_iter_s"), r.get("speedup"),
                      t.get("peak_rss_gb"), o.get("peak_rss_gb"), r.get("peak_rss"), o.get("response_length_mean")])
        for side, name in (("trl", "TRL"), ("ours", "rlhfkit")):
            if "split_grouped_s" in row.get(side, {}):
                split_rows.append([prec, name, *row[side]["split_grouped_s"].values()])
    print(C.format_table(["precision", "TRL s/iter", "rlhfkit s/iter", "speedup (TRL/ours)", "TRL peak GiB",
                          "rlhfkit peak GiB", "ratio mem", "rlhfkit mean resp len"], table))
    if split_rows:
        print("mean seconds per steady iteration (details: split_mean_s in the JSON)")
        print(C.format_table(["precision", "side", *GROUPS["ours"]], split_rows))
    payload = {"benchmark": "PPO iteration", "machine": C.machine_info(), "settings": settings, "results": rows}
    payload["machine"]["loadavg_at_end"] = C.loadavg()
    path = C.write_results("ppo-tiny" if a.tiny else "ppo", payload, a.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
