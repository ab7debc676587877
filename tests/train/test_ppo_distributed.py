"""Data parallel: two processes (CPU, gloo) on a global batch compute the same update as one process."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ppo_helpers import REWARD, make_config, without_timing
from safetensors.torch import load_file
from tolerances import (EPS32, assert_within, forward_factor, gradient_factor, gradient_terms, linear_terms,
                        logprob_tolerance)

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


def _kl_statistics_tolerances(exp, tol: torch.Tensor) -> dict[str, float]:
    """How far the rollout's KL statistics (kl_estimator=mse) may move between two runs whose float32 log-ratios
    d = old − ref differ by at most ``tol`` per token (the policy's plus the reference's log-prob rounding).
    First order, per token: each elementwise operation on inputs that differ adds eps of its result (u per run):
    d, ½d², −β·KL_t and, at the last token, + score; each row's float32 sum log2 T levels of its terms; the
    float64 mean of the 8 rows' float32 sums is exact."""
    m, shaped, beta = exp.batch.response_mask.bool(), exp.shaped, exp.kl_coef
    d = torch.where(m, exp.batch.old_logprobs - exp.ref_logprobs, 0.0).double()
    kl, nsr, rewards = shaped.kl.double(), shaped.non_score_reward.double(), shaped.rewards.double()
    last = m & (m.cumsum(1) == m.sum(1, keepdim=True))
    err_d = torch.where(m, tol, 0.0).double() + EPS32 * d.abs()
    err_kl = d.abs() * err_d + EPS32 * kl
    err_nsr = beta * err_kl + EPS32 * nsr.abs()
    err_rewards = err_nsr + EPS32 * rewards.abs() * last
    levels = math.ceil(math.log2(m.shape[1]))
    return {key: float((err.sum(1) + levels * EPS32 * values.abs().sum(1)).mean())
            for key, err, values in (("objective/kl", err_d, d), ("objective/kl_penalty", err_kl, kl),
                                     ("objective/non_score_reward", err_nsr, nsr),
                                     ("objective/rlhf_reward", err_rewards, rewards))}


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_two_processes_give_the_same_update_as_one(tmp_path, monkeypatch, critic):
    """critic=shared: the value head (random weights) on the policy: the policy's gradient holds the value loss's
    too, and the head's is summed over processes like a critic's."""
    import ppo_dp_script

    from rlhfkit.rollout.forward import policy_forward
    from rlhfkit.train.ppo_trainer import PPOTrainer

    make_config(tmp_path)  # builds sft/ and prompts.jsonl once, before the processes start
    terms = {}
    real_update = PPOTrainer.update

    def update_recording_terms(self, exp, train_policy=True):  # the one-process update, with its gradients' Σ|terms|
        history = []
        terms["critic"] = gradient_terms(self.critic, lambda: terms.__setitem__("policy", gradient_terms(
            self.policy, lambda: history.append(real_update(self, exp, train_policy)))))
        return history[0]

    real_prepare = PPOTrainer.prepare

    def prepare_recording_terms(self, rollout, raw_scores, greedy=None):  # the one-process log-probs' rounding (heads' terms)
        exp = real_prepare(self, rollout, raw_scores, greedy)
        b, tol = exp.batch, 0.0
        for model, context, logprobs in ((self.policy, contextlib.nullcontext, b.old_logprobs),
                                         (self.reference, self.reference_context, exp.ref_logprobs)):
            with torch.no_grad(), context(), linear_terms(model.lm_head) as head:
                policy_forward(model, b.query_ids, b.query_mask, b.response_ids, b.response_mask,
                               temperature=self.cfg.temperature)
            tol = tol + logprob_tolerance(head[0], logprobs, self.cfg.temperature, forward_factor(2))
        terms["rollout"] = _kl_statistics_tolerances(exp, tol)
        return exp

    monkeypatch.setattr(PPOTrainer, "update", update_recording_terms)
    monkeypatch.setattr(PPOTrainer, "prepare", prepare_recording_terms)
    ppo_dp_script.main(tmp_path, tmp_path / "one", critic)  # one process: this one
    _launch(2, [str(tmp_path), str(tmp_path / "two"), critic])
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
    # the KL statistics: from the log-probs of other micro-batch shapes (_kl_statistics_tolerances)
    for key, tolerance in terms["rollout"].items():
        assert_within(two_rollout[key], one_rollout[key], tolerance, key)
    # the same numbers in the same order through the same operations: the scores (the penalty, then whitened over
    # the gathered batch), the lengths, and (separate critic) the explained variance of values that are exactly 0
    # (the new value head is zero; the shared one is random: its values round by micro-batch shape)
    exact = ("objective/scores", "objective/scores_used", "response/length_mean") + \
        (("val/explained_variance",) if critic == "separate" else ())
    for key in exact:
        assert two_rollout[key] == one_rollout[key], key
    # the controller's error is clipped in both runs (k1 ≈ -0.40 against the target 0.5): the same float64 step
    assert two_stats["kl_coef"] == one_stats["kl_coef"]
    assert one_stats["kl_coef"] != 0.2  # the controller moved


@pytest.mark.slow
def test_two_processes_give_the_same_critic_free_update_as_one(tmp_path, monkeypatch):
    """rloo over 4 groups of 2 (each process holds 2 whole groups), the KL in the loss, seq_mean_token_mean,
    asymmetric and dual clip on (the only minibatch has ratio 1, so they do not bind: the micro-batch test in
    test_ppo_critic_free covers them), no critic: the same tolerance rule as above for the policy's weights."""
    import ppo_dp_script

    from rlhfkit.train.ppo_trainer import PPOTrainer

    make_config(tmp_path)
    terms = {}
    real_update = PPOTrainer.update

    def update_recording_terms(self, exp, train_policy=True):
        assert self.critic is None
        history = []
        terms["policy"] = gradient_terms(self.policy, lambda: history.append(real_update(self, exp, train_policy)))
        return history[0]

    monkeypatch.setattr(PPOTrainer, "update", update_recording_terms)
    ppo_dp_script.main(tmp_path, tmp_path / "one", "none")
    _launch(2, [str(tmp_path), str(tmp_path / "two"), "none"])
    one_stats = json.loads((tmp_path / "one" / "stats.json").read_text())
    two_stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert (one_stats["world_size"], two_stats["world_size"]) == (1, 2)
    assert not (tmp_path / "one" / "critic.safetensors").exists()
    one = load_file(str(tmp_path / "one" / "policy.safetensors"))
    two = load_file(str(tmp_path / "two" / "policy.safetensors"))
    sft = load_file(str(tmp_path / "sft" / "model.safetensors"))
    assert one.keys() == two.keys() == terms["policy"].keys()
    for k in one:
        grad = 0.5 * (gradient_factor(2) + 2 * (math.ceil(math.log2(32)) + 3) + 1) * EPS32 * terms["policy"][k]
        assert_within(two[k], one[k], grad + EPS32 * torch.maximum(one[k].abs(), two[k].abs()), k)
    assert max((one[k] - sft[k]).abs().max().item() for k in sft) > 0.1
    upd_one, upd_two = one_stats["update"], two_stats["update"]
    for key in ("policy/approx_kl", "policy/clipfrac", "policy/ratio_mean", "num_tokens"):
        assert upd_two[key] == upd_one[key], key
    assert upd_one["loss/kl"] > 0  # the KL acts in the loss (a perturbed policy)
    for key in ("loss/policy", "loss/kl", "loss/total", "policy/entropy", "policy/grad_norm"):
        assert upd_two[key] == pytest.approx(upd_one[key], rel=1e-5, abs=1e-7), key
    assert not [k for k in upd_one if k.startswith("val/")] and "val/mean" not in one_stats["rollout"]
    for key in ("objective/scores", "objective/scores_used", "response/length_mean"):
        assert two_stats["rollout"][key] == one_stats["rollout"][key], key


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
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "rng-rank1.json").is_file()
    _launch(2, [*args, "--iterations", "3", "--resume"], module=True)
    resumed = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert without_timing(resumed[:2]) == without_timing(rows)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert (tmp_path / "run" / "policy" / "config.json").is_file()
