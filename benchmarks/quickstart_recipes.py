"""RL-step recipes on the quickstart task, several seeds each: the spread of the gold win rate behind one number.

One quickstart run (``--from_run DIR``, or a fresh ``rlhfkit quickstart --scale SCALE`` in a temporary folder)
fixes the labels, the reward model and the SFT policy's held-out answers (``eval/before.jsonl``). Each recipe is
the run's own `PPOConfig` (``quickstart.pipeline.rl_step_config``) with some of its fields replaced, and each
(recipe, RL seed) pair trains the RL step in its own process and evaluates the trained policy as the quickstart
does (same held-out prompts, same sampling seed, against the run's SFT answers). Only the RL step's seed varies
(``PPOConfig.seed``: its prompt order and sampling); the labels and reward model do not, so the spread shown is
the RL step's own. Reported per row: gold win rate, gold after, proxy (reward-model) score after, mean KL to the
SFT policy, the RL step's wall time and the gold score of every iteration's rollouts; per recipe: the mean and
the sample standard deviation over its seeds. Writes ``results/quickstart-recipes-SCALE-DATE.json`` and prints
the tables as Markdown. Wall times mean something on a quiet machine only (``loadavg`` is recorded).

    python benchmarks/quickstart_recipes.py --from_run runs/quickstart --seeds 0 1 2 \\
        --recipe preset --recipe lr8e-5:learning_rate=8e-5          # ~4.5 min per row on 2 cores
    python benchmarks/quickstart_recipes.py --scale tiny --seeds 0 1 --recipe preset --recipe kl:kl_coef=0.1

A recipe is ``NAME`` or ``NAME:field=value,field=value`` (``preset`` alone: no change); a value is read as JSON
where it parses (numbers, booleans, lists) and as a string otherwise; the fields and their checks are
`PPOConfig`'s own (``rlhfkit ppo --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# fields a recipe may not replace: they name the run's files, or are set by --seeds
FIXED_FIELDS = ("policy", "reward_model", "prompts", "output", "seed", "resume", "overwrite")
RUN_HEADER = ("recipe", "seed", "gold win rate", "gold after", "proxy after", "KL", "RL step s")
MEAN_HEADER = ("recipe", "seeds", "win rate mean", "win rate sd", "gold after mean", "KL mean", "KL sd",
               "RL step s mean")


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value,...`` → (name, overrides); values as JSON where they parse, else strings.
    Unknown or fixed `PPOConfig` fields are refused here, before anything runs."""
    from rlhfkit.train.ppo_config import PPOConfig

    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"--recipe {text!r}: no name before ':'")
    known = {f.name for f in dataclasses.fields(PPOConfig)}
    over: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--recipe {text!r}: {item!r} is not field=value")
        if key not in known:
            raise SystemExit(f"--recipe {text!r}: PPOConfig has no field {key!r}")
        if key in FIXED_FIELDS:
            raise SystemExit(f"--recipe {text!r}: {key!r} is fixed by the run (seeds: --seeds)")
        try:
            over[key] = json.loads(value)
        except ValueError:
            over[key] = value
    return name, over


def recipe_config(run_dir: Path, out: Path, over: dict[str, Any], seed: int):
    """The run's quickstart settings, and its RL step's `PPOConfig` with ``over`` and ``seed`` (writing to
    ``out``); `PPOConfig`'s own checks run on the result."""
    import yaml

    from rlhfkit.models.loading import hf_folder, smollm2_gguf_path
    from rlhfkit.quickstart import pipeline as P

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    names = {f.name for f in dataclasses.fields(P.QuickstartConfig)}
    cfg = P.QuickstartConfig(**{k: v for k, v in saved.items() if k in names and k not in ("output", "from_run")})
    sft = str(hf_folder(cfg.model or smollm2_gguf_path()))
    base = P.rl_step_config(cfg, sft, str(run_dir / "models/reward_model"), str(run_dir / "data/ppo_prompts.jsonl"),
                            str(out), P.use_bf16(cfg.precision))
    return cfg, sft, dataclasses.replace(base, overwrite=True, seed=seed, **over)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (recipe, seed): the RL step, then the quickstart's held-out evaluation of the trained policy."""
    import time

    import torch

    from rlhfkit.models.loading import ensure_pad_token, load_causal_lm, load_tokenizer
    from rlhfkit.quickstart import pipeline as P
    from rlhfkit.quickstart.gold import load_builtin_prompts
    from rlhfkit.quickstart.report import eval_headline
    from rlhfkit.rollout.scoring import RMReward
    from rlhfkit.train import ppo_trainer
    from rlhfkit.utils import read_jsonl, set_seed

    run_dir, out = Path(spec["run"]), Path(spec["out"])
    cfg, sft, ppo_cfg = recipe_config(run_dir, out, spec["over"], spec["seed"])
    set_seed(spec["seed"])
    t0 = time.perf_counter()
    ppo_trainer.run(ppo_cfg)
    t_rl = time.perf_counter() - t0
    device = P.default_device()
    autocast = torch.bfloat16 if ppo_cfg.bf16 else None
    tokenizer = ensure_pad_token(load_tokenizer(sft))
    heldout = load_builtin_prompts()[1][:P.PRESETS[cfg.scale].heldout_prompts]
    policy0 = load_causal_lm(sft).eval().to(device)
    policy1 = load_causal_lm(str(out / "policy")).eval().to(device)
    proxy = RMReward(str(run_dir / "models/reward_model"), tokenizer, device=device)
    after = P.evaluate_heldout(policy1, tokenizer, heldout, proxy, cfg, reference=policy0, autocast_dtype=autocast)
    metrics = read_jsonl(out / "metrics.jsonl")
    return {**eval_headline(read_jsonl(run_dir / "eval/before.jsonl"), after), "time_rl_s": round(t_rl, 1),
            "gold_by_iteration": [r.get("monitor/gold_reward") for r in metrics],
            "kl_by_iteration": [r.get("objective/kl") for r in metrics]}


def summarise(rows: list[dict[str, Any]]) -> list[tuple]:
    """Per recipe, in first-seen order: seeds, mean and sample sd (None for one seed) of the win rate and KL,
    mean gold after and RL-step time."""
    def sd(xs: list[float]) -> float | None:
        return statistics.stdev(xs) if len(xs) > 1 else None

    out = []
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == name]
        win, kl = [r["win_rate"] for r in mine], [r["mean_kl"] for r in mine]
        out.append((name, len(mine), statistics.fmean(win), sd(win),
                    statistics.fmean(r["gold_after_mean"] for r in mine), statistics.fmean(kl), sd(kl),
                    statistics.fmean(r["time_rl_s"] for r in mine)))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from_run", default=None, help="a finished quickstart run folder (default: run one first)")
    p.add_argument("--scale", default="default", choices=("default", "fast", "tiny"),
                   help="the quickstart run made without --from_run")
    p.add_argument("--recipe", action="append", default=None, help="NAME[:field=value,...]; repeat (default preset)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL-step seeds of every recipe")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        C.emit(worker(json.loads(a.worker)))
        return {}
    recipes = [parse_recipe(r) for r in (a.recipe or ["preset"])]
    if len({n for n, _ in recipes}) != len(recipes):
        raise SystemExit("--recipe: two recipes have the same name")
    machine = C.machine_info(gemm_sizes=None)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(a.from_run) if a.from_run else Path(work) / "quickstart"
        if a.from_run is None:
            m = C.run_measured([C.python(), "-m", "rlhfkit.cli", "quickstart", "--scale", a.scale, "--precision",
                                "fp32", "--output", str(run_dir)], timeout=a.timeout)
            C.require_ok(m, "quickstart")
        from rlhfkit.quickstart.pipeline import FROM_RUN_FILES

        missing = [rel for rel in (*FROM_RUN_FILES, "eval/before.jsonl") if not (run_dir / rel).exists()]
        if missing:
            raise SystemExit(f"--from_run {run_dir}: not a finished quickstart run folder ({', '.join(missing)} "
                             f"missing)")
        run_summary = json.loads((run_dir / "summary.json").read_text())
        for name, over in recipes:
            recipe_config(run_dir, Path(work) / "check", over, a.seeds[0])  # PPOConfig's checks, before any run
        for name, over in recipes:
            for seed in a.seeds:
                spec = {"run": str(run_dir.resolve()), "out": str(Path(work) / f"{name}-{seed}"), "over": over,
                        "seed": seed}
                m = C.run_measured([C.python(), __file__, "--worker", json.dumps(spec)], timeout=a.timeout)
                C.require_ok(m, f"recipe {name} seed {seed}")
                row = {"recipe": name, "over": over, "seed": seed, **C.last_json(m.stdout, C.RESULT_PREFIX),
                       "peak_rss_gib": round(m.peak_rss_gb, 3), "loadavg_after": C.loadavg()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    runs_table = C.format_table(RUN_HEADER, [(r["recipe"], r["seed"], r["win_rate"], r["gold_after_mean"],
                                              r["proxy_after_mean"], r["mean_kl"], r["time_rl_s"]) for r in rows])
    means_table = C.format_table(MEAN_HEADER, summarise(rows))
    payload = {"from_run": a.from_run, "commit": C.src_commit(None), "scale": run_summary.get("scale"),
               "run_summary": run_summary, "seeds": a.seeds, "machine": machine, "rows": rows,
               "runs_table": runs_table, "means_table": means_table}
    path = C.write_results(f"quickstart-recipes-{payload['scale']}", payload, a.out)
    print(runs_table + "\n\n" + means_table)
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    main()
