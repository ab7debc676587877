"""Reward-model training throughput and peak memory: rlhfkit vs TRL 1.9.0 RewardTrainer, same pairs, one run.

Workload (the anchor's): SmolLM2-135M architecture, random init, one scalar output; ``iters × batch`` random
preference pairs of 128-511 tokens per side (ids uniform in [100, V-100), seed 0); ``batch`` pairs per optimizer
step, one epoch; float32, and bfloat16 autocast as a second row.

- TRL: ``anchor_trl.py rm CFGDIR --iters N --batch B [--bf16] [--tiny]`` in its own process; tokens/s =
  (chosen + rejected tokens) / wall time of ``trainer.train()``.
- rlhfkit: the ``rlhfkit rm train`` code path, ``rlhfkit.train.reward_trainer.run``, in its own process, on the
  same token ids (the anchor's draws reproduced by ``_common.anchor_pairs``; they are injected in place of the
  tokenisation step, the one change to the run); the backbone is a random-init model saved to a temp folder
  beforehand (outside the measured process); length-grouped batches, SDPA attention, padding-free packing of
  each micro-batch (``--packing auto``, the trainer's default: one packed row, attention per sequence; ``off`` =
  padded micro-batches), no LM head, bf16 autocast on the bf16 row; tokens/s = the same token count / wall time of the training loop (the sum of the
  per-step ``time/step`` metrics; model construction and the final save excluded).
- Peak memory: peak RSS of each process (``os.wait4``).

    python benchmarks/bench_rm.py                     # full size (~10 min on 2 cores); writes results/rm-DATE.json
    python benchmarks/bench_rm.py --tiny              # smoke run in seconds (anchor's --tiny shape, fewer pairs)
    python benchmarks/bench_rm.py --which ours --precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FULL = {"iters": 8, "batch": 8}
TINY = {"iters": 2, "batch": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the anchor's tiny shape (2 layers, hidden 64), fewer pairs")
    p.add_argument("--which", choices=("both", "trl", "ours"), default="both")
    p.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both")
    p.add_argument("--iters", type=int, default=None, help=f"optimizer steps (default {FULL['iters']}, tiny "
                                                           f"{TINY['iters']})")
    p.add_argument("--batch", type=int, default=None, help=f"pairs per step (default {FULL['batch']}, tiny "
                                                           f"{TINY['batch']})")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="rlhfkit's micro-batch: the optimizer step still holds --batch pairs (gradient accumulation, "
                        "exact: tests/train/test_rm_train.py); 0 = one micro-batch of --batch (TRL's setting)")
    p.add_argument("--packing", choices=("auto", "off"), default="auto",
                   help="rlhfkit's --packing: 'auto' (the default) packs each micro-batch padding-free into one "
                        "sequence with attention per pair side; 'off' pads it")
    p.add_argument("--anchor", default=C.DEFAULT_ANCHOR, help="the team's TRL anchor script")
    p.add_argument("--config-dir", default=C.DEFAULT_CONFIG_DIR, help="SmolLM2-135M config + tokenizer folder")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per side")
    p.add_argument("--child", choices=("prep", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    defaults = TINY if a.tiny else FULL
    a.iters = a.iters or defaults["iters"]
    a.batch = a.batch or defaults["batch"]
    return a


# ----------------------------------------------------------------------------------------------------------
# Children (each in its own process)
# ----------------------------------------------------------------------------------------------------------
def child_prep(a: argparse.Namespace) -> None:
    """The random-init backbone folder and a placeholder data file (one row per pair) for rlhfkit's run."""
    work = Path(a.workdir)
    C.save_random_causal_lm(a.config_dir, work / "model", a.tiny)
    n = a.iters * a.batch
    with open(work / "pairs.jsonl", "w") as f:
        for i in range(n):  # the text is replaced by the anchor's token ids (see child_ours)
            f.write(json.dumps({"prompt": f"pair {i + 1}", "chosen": "yes", "rejected": "no"}) + "\n")


def child_ours(a: argparse.Namespace) -> None:
    """rlhfkit's `rm train` run on the anchor's pairs; prints the result line."""
    import rlhfkit.train.reward_trainer as rt
    from rlhfkit.data.tokenize import TokenizedPair, TokenizeReport
    from rlhfkit.train.rm_config import RMTrainConfig

    tuned = C.as_the_cli_runs()
    work = Path(a.workdir)
    vocab = C.load_bench_config(a.config_dir, a.tiny).vocab_size
    n = a.iters * a.batch
    chosen, rejected = C.anchor_pairs(vocab, n)
    items = [TokenizedPair(c, r, 0, 0, None, i + 1) for i, (c, r) in enumerate(zip(chosen, rejected))]
    tokens = sum(map(len, chosen)) + sum(map(len, rejected))

    def pretokenized(cfg, tokenizer, examples, source, kind=None):  # replaces step 1's tokenisation only
        if len(examples) != n:
            raise RuntimeError(f"expected {n} placeholder rows, got {len(examples)}")
        return items, TokenizeReport(n, 0, 0, cfg.max_length, cfg.overlong)

    rt.tokenize_examples = pretokenized
    cfg = RMTrainConfig(model=str(work / "model"), data=str(work / "pairs.jsonl"),
                        output=str(work / ("out-bf16" if a.bf16 else "out-fp32")), eval_fraction=0.0,
                        batch_size=a.batch, micro_batch_size=a.micro_batch or a.batch, bf16=a.bf16, epochs=1, max_length=1024,
                        logging_steps=1, group_by_length=True, gradient_checkpointing=False, seed=0,
                        overwrite=True, packing=a.packing)
    start = time.perf_counter()
    rt.run(cfg)
    run_s = time.perf_counter() - start
    rows = [json.loads(line) for line in open(Path(cfg.output) / "metrics.jsonl")]
    step_times = [r["time/step"] for r in rows if "time/step" in r]
    if len(step_times) != a.iters:
        raise RuntimeError(f"expected {a.iters} per-step metric rows, got {len(step_times)}")
    train_s = sum(step_times)
    import torch

    cuda_peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
    C.emit({"pairs": n, "tokens": tokens, "train_s": round(train_s, 3), "run_s": round(run_s, 3),
            "tokens_per_s": round(tokens / train_s, 2), "step_s": [round(t, 3) for t in step_times],
            "final_loss": rows[-1].get("rm/loss"), "cuda_peak_gb": cuda_peak, "allocator_tuned": tuned})


# ----------------------------------------------------------------------------------------------------------
# Parent: TRL then rlhfkit per precision, table, JSON
# ----------------------------------------------------------------------------------------------------------
def run_trl(a: argparse.Namespace, bf16: bool) -> dict:
    cmd = [C.python(), a.anchor, "rm", a.config_dir, "--iters", str(a.iters), "--batch", str(a.batch)]
    cmd += ["--bf16"] * bf16 + ["--tiny"] * a.tiny
    m = C.run_measured(cmd, a.timeout)
    C.require_ok(m, "TRL anchor (rm)")
    r = C.last_json(m.stdout)
    return {"tokens_per_s": float(r["tokens_per_s"]), "train_s": r["total_s"], "tokens": r["tokens"],
            "pairs": r["pairs"], "peak_rss_gb": round(m.peak_rss_gb, 3), "process_wall_s": round(m.wall_s, 1),
            "command": " ".join(cmd), "raw": r}


def run_ours(a: argparse.Namespace, bf16: bool, workdir: str) -> dict:
    cmd = [C.python(), __file__, "--child", "ours", "--workdir", workdir, "--config-dir", a.config_dir,
           "--iters", str(a.iters), "--batch", str(a.batch), "--micro-batch", str(a.micro_batch),
           "--packing", a.packing] + ["--bf16"] * bf16 + ["--tiny"] * a.tiny
    m = C.run_measured(cmd, a.timeout)
    C.require_ok(m, "rlhfkit reward trainer")
    r = C.last_json(m.stdout, C.RESULT_PREFIX)
    return {**r, "peak_rss_gb": round(m.peak_rss_gb, 3), "process_wall_s": round(m.wall_s, 1)}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.child == "prep":
        return child_prep(a)
    if a.child == "ours":
        return child_ours(a)
    machine = C.machine_info()  # before the runs: a quiet peak
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    settings = {"model": "SmolLM2-135M architecture, random init" + (" (tiny: 2 layers, hidden 64)" if a.tiny
                                                                      else ""),
                "num_labels": 1, "pairs": a.iters * a.batch, "batch_pairs": a.batch, "steps": a.iters,
                "tokens_per_side": "128-511, ids uniform in [100, V-100), seed 0", "precisions": precisions,
                "rlhfkit_micro_batch_pairs": a.micro_batch or a.batch, "rlhfkit_packing": a.packing,
                "anchor": a.anchor, "tiny": a.tiny}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-rm-") as work:
        if a.which in ("both", "ours"):
            prep = C.run_measured([C.python(), __file__, "--child", "prep", "--workdir", work, "--config-dir",
                                   a.config_dir, "--iters", str(a.iters), "--batch", str(a.batch)]
                                  + ["--tiny"] * a.tiny, a.timeout)
            C.require_ok(prep, "model preparation")
        for prec in precisions:
            bf16 = prec == "bf16"
            row: dict = {}
            if a.which in ("both", "trl"):
                print(f"[{prec}] TRL RewardTrainer ...", flush=True)
                row["trl"] = run_trl(a, bf16)
            if a.which in ("both", "ours"):
                print(f"[{prec}] rlhfkit reward trainer ...", flush=True)
                row["ours"] = run_ours(a, bf16, work)
            if "trl" in row and "ours" in row:
                if row["trl"]["tokens"] != row["ours"]["tokens"]:
                    raise SystemExit(f"token counts differ: TRL {row['trl']['tokens']} vs rlhfkit "
                                     f"{row['ours']['tokens']}; the pairs are not the same")
                row["ratio"] = {"tokens_per_s": C.ratio(row["ours"]["tokens_per_s"], row["trl"]["tokens_per_s"]),
                                "peak_rss": C.ratio(row["ours"]["peak_rss_gb"], row["trl"]["peak_rss_gb"])}
                gpu = row["ours"].get("cuda_peak_gb"), row["trl"]["raw"].get("peak_mem_gb")
                if None not in gpu:  # on a GPU the device's memory is the one that counts (max_memory_allocated)
                    row["ratio"]["cuda_peak"] = C.ratio(*gpu)
                    print(f"[{prec}] GPU peak memory allocated: rlhfkit {gpu[0]} GiB, TRL {gpu[1]} GiB, ratio "
                          f"{C.fmt(row['ratio']['cuda_peak'])}", flush=True)
            rows[prec] = row
    table = []
    for prec, row in rows.items():
        t, o, r = row.get("trl", {}), row.get("ours", {}), row.get("ratio", {})
        table.append([prec, t.get("tokens_per_s"), o.get("tokens_per_s"), r.get("tokens_per_s"),
                      t.get("peak_rss_gb"), o.get("peak_rss_gb"), r.get("peak_rss")])
    print(C.format_table(["precision", "TRL tok/s", "rlhfkit tok/s", "ratio tok/s (goal >= 3)", "TRL peak GiB",
                          "rlhfkit peak GiB", "ratio mem (goal <= 0.33)"], table))
    payload = {"benchmark": "reward-model training", "machine": machine, "settings": settings,
               "results": rows, "goal": {"tokens_per_s_ratio_min": 3.0, "peak_rss_ratio_max": 1 / 3}}
    payload["machine"]["loadavg_at_end"] = C.loadavg()
    path = C.write_results("rm-tiny" if a.tiny else "rm", payload, a.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
