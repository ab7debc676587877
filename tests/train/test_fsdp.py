"""FSDP2 (``--fsdp``) on the CPU with gloo, 2 processes: the same training as DDP and as one process, sharded
checkpoints that resume exactly, layer freezing and LoRA, and the per-process memory of the training state.

Why FSDP2 and DDP give the SAME weights, bit for bit, on 2 processes (when no gradient is clipped): each process
runs the same micro-batches through the same kernels on the same weights (FSDP2's all-gather reassembles them
exactly; the sampler packs the weights of FSDP2's wrapped linears as it packs plain ones, `rollout.prepack`: on
an AMD EPYC MKL's packed and plain products round differently, which made the runs part until 2026-12-04), accumulates its micro-batch gradients locally in the same order (`engine.sharding.gradient_sync` is
DDP's ``no_sync``), and the cross-process reduction of 2 terms is one float addition, which commutes: DDP's
all-reduce and FSDP2's reduce-scatter give the same ``a + b`` (then the same exact division by 2, or none for
``ppo``'s sum). AdamW and SGD are elementwise, so a shard updates exactly as its slice of the full tensor. Only the
gradient-norm clip differs: the global norm is summed shard by shard (`engine.sharding.grad_norm`), another order
of the same squares, so runs that clip are compared to rounding instead. FSDP2 against ONE process follows from
that and from the one-process vs DDP tests (test_rm_multiproc, test_ppo_distributed); the first ``rm train`` step
is also checked here against one process with those tests' derived tolerances.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rm_helpers import (first_step_tolerances, make_sft_folder, one_thread,  # noqa: F401 (one_thread: autouse)
                        preference_rows, read_weights, write_jsonl)
from safetensors.torch import load_file
from tolerances import EPS32, assert_within

from rlhfkit.cli import main
from rlhfkit.utils import read_jsonl

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "fsdp_script.py"
TIMING_KEYS = ("throughput/tokens_per_s", "time/step")


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith(("time/", "throughput/"))}
            for r in read_jsonl(out / "metrics.jsonl")]


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _norm_tolerance(n: int, norm: float) -> float:
    """How far two float32 evaluations of a gradient norm over ``n`` parameters may differ: Σ g² of n non-negative
    squares in two orders (FSDP2 sums shard by shard), each within log2(n) levels of pairwise rounding (u each, so
    log2(n)·eps for the two; no cancellation: the terms are all ≥ 0), plus the squaring and the root."""
    return (math.ceil(math.log2(n)) + 2) * EPS32 * norm


def _crash_after(output: Path, step: int, final: tuple[str, ...]) -> None:
    """Make ``output`` look like a run killed right after checkpoint ``step``: later checkpoints and the final
    model gone, ``latest`` naming ``step``."""
    root = output / "checkpoints"
    for folder in root.glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (root / "latest").write_text(f"step-{step:08d}\n")
    for name in final:
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow
def test_rm_train_under_fsdp_equals_ddp_and_one_process_and_resumes_exactly(tmp_path, capsys):
    sft = make_sft_folder(tmp_path / "sft")
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(100, seed=4))
    flags = ["rm", "train", "--model", str(sft), "--data", str(data), "--batch_size", "16", "--micro_batch_size", "4",
             "--learning_rate", "1e-3", "--eval_fraction", "0.2", "--eval_steps", "2", "--logging_steps", "1",
             "--save_steps", "3", "--max_grad_norm", "0"]
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    assert main([*flags, "--output", str(one)]) == 0
    _torchrun("-m", "rlhfkit.cli", *flags, "--output", str(ddp))
    _torchrun("-m", "rlhfkit.cli", *flags, "--fsdp", "--output", str(fsdp))
    # the checkpoint is sharded: DCP files of both processes, no full weights
    ckpt = fsdp / "checkpoints" / "step-00000003"
    assert json.loads((ckpt / "checkpoint.json").read_text())["sharded"] is True
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()
    # FSDP2 = DDP bit for bit: the published (full, process 0) model and every metric of every step
    final = read_weights(fsdp)
    _assert_equal(final, read_weights(ddp))
    # every metric but the logged norm, which FSDP2 sums shard by shard (`_norm_tolerance`)
    n = sum(v.numel() for v in final.values())
    for a, b in zip(_rows(fsdp), _rows(ddp), strict=True):
        norm_a, norm_b = a.pop("train/grad_norm"), b.pop("train/grad_norm")
        assert a == b
        assert_within(norm_a, norm_b, _norm_tolerance(n, norm_b), "train/grad_norm")
    # and the first step (from the initial model) = one process's, to the rounding of test_rm_multiproc
    tolerance = first_step_tolerances([*flags[2:], "--output", "-"])
    first_one, first_fsdp = _rows(one)[0], _rows(fsdp)[0]
    assert first_one.keys() == tolerance.keys() == first_fsdp.keys()
    for k in first_one:
        assert_within(first_fsdp[k], first_one[k], tolerance[k], k)
    # killed after the step-3 checkpoint: the resumed run ends with the same weights and metrics, exactly (DCP
    # restores every shard of the weights and AdamW's moments bit for bit, the RNG and the data position too)
    rows = _rows(fsdp)
    _crash_after(fsdp, 3, ("model.safetensors",))
    _torchrun("-m", "rlhfkit.cli", *flags, "--fsdp", "--resume", "--output", str(fsdp))
    _assert_equal(read_weights(fsdp), final)
    assert _rows(fsdp) == rows
    # a sharded checkpoint resumed without --fsdp: a clear error naming the setting
    _crash_after(fsdp, 3, ("model.safetensors",))
    assert main([*flags, "--resume", "--output", str(fsdp)]) != 0
    assert "fsdp" in capsys.readouterr().err


@pytest.mark.slow
def test_a_lora_ppo_step_under_fsdp_equals_the_data_parallel_step(tmp_path):
    """One PPO step (fixed rollout, SGD) of a LoRA policy (frozen base weights and trainable adapters in every
    block's FSDP unit; the reference = the same sharded policy with its adapters off) and a critic, both sharded,
    equals the plain-module step whose gradients `sum_grads` all-reduces, bit for bit (module docstring); the
    data-parallel step equals one process's to rounding (test_ppo_distributed). ``freeze_layers`` (frozen and
    trainable parameters side by side in the units) is covered by the next test."""
    from ppo_helpers import make_config

    make_config(tmp_path)  # sft/ and prompts.jsonl, before the processes start
    for mode in ("dp", "fsdp"):
        _torchrun(str(SCRIPT), "ppo-step", str(tmp_path), str(tmp_path / mode), mode + "-lora")
    for name in ("policy", "critic"):
        _assert_equal(load_file(str(tmp_path / "fsdp" / f"{name}.safetensors")),
                      load_file(str(tmp_path / "dp" / f"{name}.safetensors")))
    dp, fsdp = (json.loads((tmp_path / m / "stats.json").read_text()) for m in ("dp", "fsdp"))
    assert dp["update"]["loss/value"] > 0 and dp["update"]["policy/grad_norm"] > 0
    # the gradient norms, summed shard by shard, in the update's history and in the iteration's stats (their mean
    # over the minibatches): to rounding; every other number bit for bit (on an AMD EPYC Zen 3 the two norms
    # differed in the last bit)
    for section in ("update", "rollout"):
        for key, name in (("policy/grad_norm", "policy"), ("val/grad_norm", "critic")):
            n = sum(v.numel() for v in load_file(str(tmp_path / "dp" / f"{name}.safetensors")).values())
            got, want = fsdp[section].pop(key), dp[section].pop(key)
            assert_within(got, want, _norm_tolerance(n, want), f"{section} {key}")
    assert fsdp == dp
    assert all("lora_" in k for k in load_file(str(tmp_path / "dp" / "policy.safetensors")))


@pytest.mark.slow
def test_ppo_under_fsdp_samples_checkpoints_and_resumes_as_data_parallel(tmp_path):
    """Two iterations of ``rlhfkit ppo`` (sampling on the gathered policy, the no-grad passes, the update, a sharded
    checkpoint after each iteration, the full final policy and critic) equal the data-parallel run bit for bit
    (``max_grad_norm: null``: no clip, module docstring), and a run killed after iteration 1 and resumed ends the
    same."""
    from ppo_helpers import make_config

    make_config(tmp_path)
    config = tmp_path / "ppo.yaml"
    # reuse_rollout_states does not apply under --fsdp (the sampler's states are then not kept): off in both runs,
    # so that they run the same passes
    config.write_text("max_grad_norm: null\nreuse_rollout_states: false\n")
    flags = ["ppo", "--config", str(config), "--policy", str(tmp_path / "sft"), "--reward_model",
             "ppo_helpers:count_target", "--prompts", str(tmp_path / "prompts.jsonl"), "--iterations", "2",
             "--max_new_tokens", "6", "--stop_token_ids", "3", "4", "5", "--rollout_batch_size", "8",
             "--ppo_epochs", "2", "--num_minibatches", "2", "--micro_batch_size", "2", "--critic_init", "policy",
             "--save_every", "1", "--freeze_layers", "1"]
    dp, fsdp = tmp_path / "dp", tmp_path / "fsdp"
    _torchrun("-m", "rlhfkit.cli", *flags, "--output", str(dp))
    _torchrun("-m", "rlhfkit.cli", *flags, "--fsdp", "--output", str(fsdp))
    assert (fsdp / "checkpoints" / "step-00000002" / "sharded").is_dir()
    # the resume first: FSDP against itself, checked on every CPU
    final, rows = {m: read_weights(fsdp / m) for m in ("policy", "critic")}, _rows(fsdp)
    _crash_after(fsdp, 1, ("policy", "critic"))
    _torchrun("-m", "rlhfkit.cli", *flags, "--fsdp", "--resume", "--output", str(fsdp))
    for model in ("policy", "critic"):
        _assert_equal(read_weights(fsdp / model), final[model])
    assert _rows(fsdp) == rows
    # then FSDP against data parallel
    for model in ("policy", "critic"):
        _assert_equal(final[model], read_weights(dp / model))
    # every metric but the logged gradient norms (means over the minibatches of norms summed shard by shard: a
    # mean keeps `_norm_tolerance`'s relative bound; N = all parameters of the model, an upper bound)
    for a, b in zip(rows, _rows(dp), strict=True):
        for key, model in (("policy/grad_norm", "policy"), ("val/grad_norm", "critic")):
            n = sum(v.numel() for v in read_weights(dp / model).values())
            norm_a, norm_b = a.pop(key), b.pop(key)
            assert_within(norm_a, norm_b, _norm_tolerance(n, norm_b), key)
        assert a == b
    assert (fsdp / "samples.jsonl").read_text() == (dp / "samples.jsonl").read_text()


def _ceil_shard_bytes(numels: list[int], rank: int, world: int, bytes_per: int = 4) -> int:
    """Bytes of rank ``rank``'s dim-0 shards (FSDP2's torch.chunk split: ⌈rows/W⌉ rows per rank, the last ranks
    fewer) of parameters with these (rows, numel / rows) shapes."""
    total = 0
    for rows, per_row in numels:
        chunk = math.ceil(rows / world)
        mine = max(0, min(chunk, rows - rank * chunk))
        total += mine * per_row * bytes_per
    return total


@pytest.mark.slow
def test_fsdp_halves_the_per_process_training_state(tmp_path):
    """Parameters + gradients + AdamW's two moments, counted as local tensor bytes per process after one step (a
    Llama of hidden 64, 4 layers, vocabulary 1000, 2 processes): DDP holds 4 full float32 copies (16 bytes per
    parameter), FSDP2 each process's dim-0 shard of each, exactly the ceil-division of `_ceil_shard_bytes`."""
    for mode in ("ddp", "fsdp"):
        _torchrun(str(SCRIPT), "memory", str(tmp_path), mode)
    ddp = [json.loads((tmp_path / f"ddp-rank{r}.json").read_text()) for r in range(2)]
    fsdp = [json.loads((tmp_path / f"fsdp-rank{r}.json").read_text()) for r in range(2)]
    n = sum(ddp[0]["numels"])
    for r in range(2):
        assert ddp[r]["params"] == ddp[r]["grads"] == 4 * n and ddp[r]["optimizer"] == 8 * n
        expected = _ceil_shard_bytes(fsdp[r]["shapes"], r, 2)
        assert fsdp[r]["params"] == fsdp[r]["grads"] == expected and fsdp[r]["optimizer"] == 2 * expected
        total_ddp = ddp[r]["params"] + ddp[r]["grads"] + ddp[r]["optimizer"]
        total_fsdp = fsdp[r]["params"] + fsdp[r]["grads"] + fsdp[r]["optimizer"]
        print(f"rank {r}: DDP {total_ddp} bytes, FSDP2 {total_fsdp} bytes, ratio {total_fsdp / total_ddp:.4f}")
        assert total_fsdp == 4 * expected
        # about half: rank 0 holds at most half a row more than half of each tensor (odd row counts)
        odd_rows = sum(per_row * 4 * 4 for rows, per_row in fsdp[r]["shapes"] if rows % 2)
        assert abs(total_fsdp - total_ddp / 2) <= odd_rows / 2
    assert fsdp[0]["params"] + fsdp[1]["params"] == 4 * n  # the shards partition the parameters
