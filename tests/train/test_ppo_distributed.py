"""Data parallel: two processes (CPU, gloo) on a global batch compute the same update as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ppo_helpers import REWARD, make_config, without_timing
from safetensors.torch import load_file
from tolerances import EPS32, assert_within, gradient_factor, gradient_terms

from rlhfkit.utils import read_jsonl

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ppo_dp_script.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(num_processes: int, args: list[str], module: bool = False) -> subprocess.CompletedProcess:
    if num_processes == 1 and not module:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        # --multi_gpu = torchrun processes; without a GPU (or with ACCELERATE_USE_CPU) they join a gloo group
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port())]
        cmd += (["-m", "rlhfkit.cli", *args] if module else [str(SCRIPT), *args])
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_two_processes_give_the_same_update_as_one(tmp_path, monkeypatch):
    import math

    import ppo_dp_script

    from rlhfkit.train.ppo_trainer import PPOTrainer

    make_config(tmp_path)  # builds sft/ and prompts.jsonl once, before the processes start
    terms = {}
    real_update = PPOTrainer.update

    def update_recording_terms(self, exp):  # the one-process update, with its gradients' Σ|terms|
        history = []
        terms["critic"] = gradient_terms(self.critic, lambda: terms.__setitem__("policy", gradient_terms(
            self.policy, lambda: history.append(real_update(self, exp)))))
        return history[0]

    monkeypatch.setattr(PPOTrainer, "update", update_recording_terms)
    ppo_dp_script.main(tmp_path, tmp_path / "one")  # one process: this one
    _launch(2, [str(tmp_path), str(tmp_path / "two")])
    one_stats = json.loads((tmp_path / "one" / "stats.json").read_text())
    two_stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert (one_stats["world_size"], two_stats["world_size"]) == (1, 2)
    # one SGD step of lr 0.5: the new weights differ by 0.5 × the gradients' rounding (the 2 decoder layers,
    # forward and backward, plus for the policy the log-softmax over the vocabulary and for 2 processes the
    # all-reduce's one sum) and by the rounding of w - lr·g in each run (1 eps of the weight)
    for name, extra in (("policy", 2 * (math.ceil(math.log2(32)) + 3) + 1), ("critic", 1)):
        one = load_file(str(tmp_path / "one" / f"{name}.safetensors"))
        two = load_file(str(tmp_path / "two" / f"{name}.safetensors"))
        assert one.keys() == two.keys() == terms[name].keys()
        for k in one:
            grad = 0.5 * (gradient_factor(2) + extra) * EPS32 * terms[name][k]
            assert_within(two[k], one[k], grad + EPS32 * torch.maximum(one[k].abs(), two[k].abs()), k)
    # the update moved the policy by far more than the tolerance, so the comparison above has teeth (the script
    # perturbs the SFT weights by 0.05 * N(0, 1) before the update; the update adds to that)
    sft = load_file(str(tmp_path / "sft" / "model.safetensors"))
    policy = load_file(str(tmp_path / "one" / "policy.safetensors"))
    assert sft.keys() == policy.keys()
    assert max((policy[k] - sft[k]).abs().max().item() for k in sft) > 0.1
    # the update's only minibatch sees the policy that computed the old log-probs over the same micro-batches: the
    # ratios are exactly 1 in both runs (test_ppo_update proves it), and the token count is a count
    for key in ("policy/approx_kl", "policy/clipfrac", "policy/ratio_mean", "policy/ratio_var", "val/clipfrac",
                "num_tokens"):
        assert two_stats["update"][key] == one_stats["update"][key], key
    # means over the tokens of float32 quantities whose per-token terms stay inside ppo_update (not derived here;
    # the weights above are the derived check of the same update): 84 eps relative
    for key in ("loss/policy", "loss/value", "loss/total", "policy/entropy", "policy/grad_norm", "val/grad_norm"):
        assert two_stats["update"][key] == pytest.approx(one_stats["update"][key], rel=1e-5, abs=1e-7), key
    # rollout statistics are over the global batch (each process holds 4 of the 8 rows), the KL controller is fed
    # the global k1 mean (kl_estimator=mse: objective/kl and objective/kl_penalty differ)
    one_rollout, two_rollout = one_stats["rollout"], two_stats["rollout"]
    assert one_rollout["objective/kl"] != pytest.approx(one_rollout["objective/kl_penalty"], rel=1e-3)
    for key in ("objective/kl", "objective/kl_penalty", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "objective/scores_used", "response/length_mean", "val/explained_variance"):
        assert two_rollout[key] == pytest.approx(one_rollout[key], rel=1e-5, abs=1e-7), key
    assert two_stats["kl_coef"] == pytest.approx(one_stats["kl_coef"], rel=1e-12)
    assert one_stats["kl_coef"] != 0.2  # the controller moved


@pytest.mark.slow
def test_two_process_training_run_and_resume_through_the_cli(tmp_path):
    cfg = make_config(tmp_path)
    args = ["ppo", "--policy", cfg.policy, "--reward_model", REWARD, "--prompts", cfg.prompts, "--output",
            str(tmp_path / "run"), "--rollout_batch_size", "8", "--max_new_tokens", "5", "--temperature", "1.0",
            "--num_minibatches", "2", "--micro_batch_size", "2", "--critic_init", "policy", "--learning_rate", "1e-3",
            "--score_norm", "whiten", "--save_every", "1"]
    _launch(2, [*args, "--iterations", "2"], module=True)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "rng-rank1.pt").is_file()
    _launch(2, [*args, "--iterations", "3", "--resume"], module=True)
    resumed = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert without_timing(resumed[:2]) == without_timing(rows)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert (tmp_path / "run" / "policy" / "config.json").is_file()
