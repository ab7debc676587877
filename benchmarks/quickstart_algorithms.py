"""PPO vs its critic-free relatives on the quickstart task, side by side: ``rlhfkit quickstart --algorithm NAME``.

The first algorithm runs the whole quickstart (labels, reward model, RL step, held-out evaluation); each other one
runs in its own process with ``--from_run`` that first run's folder, so all of them train against the very same
labels and reward model, with the same ``--seed`` and ``--scale``, one after the other on this machine; every
algorithm samples the same responses per iteration (``quickstart.pipeline.algorithm_settings``). Reported per
algorithm: gold win rate of the trained over the SFT policy on the held-out prompts, gold means before/after, mean
KL to the SFT policy, the RL step's wall time (``time_ppo_s``) and the evaluation's, and the process's peak
resident memory (``ru_maxrss``; the RL step holds the most models, so this is its peak). Writes
``results/quickstart-algorithms-SCALE-DATE.json`` and prints the table as Markdown. Wall times mean something on a
quiet machine only (``loadavg`` is recorded).

    python benchmarks/quickstart_algorithms.py --scale default        # ~7 + 4 x 6 min on 2 cores
    python benchmarks/quickstart_algorithms.py --scale tiny --algorithms ppo rloo   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_ALGORITHMS = ("ppo", "rloo", "grpo", "reinforce_pp")
HEADER = ("algorithm", "gold win rate", "gold before", "gold after", "KL", "RL step s", "eval s", "peak RSS GiB")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="default", choices=("default", "fast", "tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--algorithms", nargs="+", default=list(DEFAULT_ALGORITHMS))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per algorithm")
    a = p.parse_args(argv)
    machine = C.machine_info(gemm_sizes=None)
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as work:
        first = Path(work) / a.algorithms[0]
        for algorithm in a.algorithms:
            out = Path(work) / algorithm
            reuse = ["--from_run", str(first)] if out != first else []
            m = C.run_measured([C.python(), "-m", "rlhfkit.cli", "quickstart", "--scale", a.scale, "--seed",
                                str(a.seed), "--algorithm", algorithm, "--precision", "fp32", "--output", str(out),
                                *reuse], timeout=a.timeout)
            C.require_ok(m, f"quickstart --algorithm {algorithm}")
            s = json.loads((out / "summary.json").read_text())
            runs[algorithm] = {"summary": s, "wall_s": round(m.wall_s, 1), "peak_rss_gib": round(m.peak_rss_gb, 3),
                               "loadavg_after": C.loadavg()}
            rows.append((algorithm, s["win_rate"], s["gold_before_mean"], s["gold_after_mean"], s["mean_kl"],
                         s["time_ppo_s"], s["time_eval_s"], m.peak_rss_gb))
            print(json.dumps({"algorithm": algorithm, **runs[algorithm]["summary"]}), flush=True)
    table = C.format_table(HEADER, rows)
    payload = {"scale": a.scale, "seed": a.seed, "machine": machine, "runs": runs, "table": table}
    path = C.write_results(f"quickstart-algorithms-{a.scale}", payload, a.out)
    print(table)
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    main()
