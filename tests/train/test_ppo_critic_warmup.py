"""``critic_warmup_iterations``: the first iterations train the critic alone (verl's ``critic_warmup``, OpenRLHF's
``freezing_actor_steps``). The policy, its optimizer and its schedule do not move; the critic's update is the one
it gets in a normal iteration (a separate critic's gradient is the value loss's alone); the policy's schedule starts
after the warm-up; a run killed in or after the warm-up resumes exactly."""

from __future__ import annotations

import pytest
import torch
from ppo_helpers import (make_config, one_thread,  # noqa: F401  (one_thread: autouse fixture)
                         trainable)

from rlhfkit.errors import RlhfkitError
from rlhfkit.train.ppo_trainer import PPOTrainer
from rlhfkit.train.ppo_update import _no_token_stats

LR, CRITIC_LR = 1e-3, 4e-3


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_warmup_iteration_trains_the_critic_exactly_as_a_normal_iteration_and_leaves_the_policy(tmp_path):
    warm = PPOTrainer(make_config(tmp_path, output=str(tmp_path / "warm"), critic_warmup_iterations=1))
    plain = PPOTrainer(make_config(tmp_path, output=str(tmp_path / "plain")))
    policy0, critic0 = trainable(warm.policy), trainable(warm.critic)
    assert _equal(policy0, trainable(plain.policy)) and _equal(critic0, trainable(plain.critic))

    w, p = warm.iteration(1), plain.iteration(1)
    # the policy: weights, gradients and optimizer untouched (no policy pass, no step)
    assert _equal(trainable(warm.policy), policy0)
    assert all(q.grad is None for q in warm.policy.parameters())
    assert warm.policy_optimizer.state_dict()["state"] == {}
    assert not _equal(trainable(plain.policy), policy0)  # a normal iteration moves it: the check is not trivial
    # the critic: moved, and bit for bit as in the normal iteration (same rollout, same value loss gradient)
    assert not _equal(trainable(warm.critic), critic0)
    assert _equal(trainable(warm.critic), trainable(plain.critic))
    # the rollout statistics are the same; the update reports no policy statistics, the same value ones
    assert w.stats["objective/scores"] == p.stats["objective/scores"]
    assert w.stats["objective/kl"] == p.stats["objective/kl"] == 0.0
    assert not [k for k in w.stats if k.startswith("policy/")] and "loss/policy" not in w.stats
    assert "policy/approx_kl" in p.stats
    for key in ("val/error", "val/clipfrac", "val/grad_norm", "loss/value", "train/optimizer_steps"):
        assert w.stats[key] == p.stats[key], key
    assert w.stats["train/optimizer_steps"] == 4.0  # the critic stepped on every minibatch of 2 epochs x 2
    # total loss = vf_coef x value loss (no policy or entropy term)
    assert w.stats["loss/total"] == pytest.approx(0.1 * w.stats["loss/value"], rel=1e-6)
    assert (w.stats["train/lr"], p.stats["train/lr"]) == (0.0, 1e-3)

    # iteration 2 of the warm run trains the policy
    warm.iteration(2)
    assert not _equal(trainable(warm.policy), policy0)
    assert warm.policy_optimizer.state_dict()["state"]


def test_the_policy_schedule_starts_after_the_warmup_and_the_critic_schedule_runs_over_the_run(tmp_path):
    # linear decay, no schedule warm-up, 4 iterations, 2 of critic warm-up: the policy's schedule runs over the
    # last 2 (1, 1/2 of its peak), the critic's over all 4 (1, 3/4, 1/2, 1/4)
    cfg = make_config(tmp_path, iterations=4, lr_scheduler="linear", critic_warmup_iterations=2, learning_rate=LR,
                      critic_learning_rate=CRITIC_LR)
    results = PPOTrainer(cfg).train()
    lrs = [r.stats["train/lr"] for r in results]
    critic_lrs = [r.stats["train/critic_lr"] for r in results]
    assert lrs == pytest.approx([0.0, 0.0, LR, LR / 2], rel=1e-12)
    assert critic_lrs == pytest.approx([CRITIC_LR, CRITIC_LR * 3 / 4, CRITIC_LR / 2, CRITIC_LR / 4], rel=1e-12)
    assert ["policy/approx_kl" in r.stats for r in results] == [False, False, True, True]


def test_a_process_without_tokens_reports_the_warmup_updates_statistic_names():
    """Data parallel: every process reduces the same names; one holding no token of a minibatch sends zeros
    under the names a warm-up micro-batch gives (value statistics, value and total loss, loss/kl)."""
    names = set(_no_token_stats(True, with_policy=False).names())
    assert names == {"val/clipfrac", "val/error", "val/value_mean", "loss/value", "loss/total", "loss/kl"}
    assert {"policy/approx_kl", "loss/policy", "policy/entropy"} <= set(_no_token_stats(True).names())


@pytest.mark.parametrize("overrides,message", [
    ({"critic_warmup_iterations": 2}, r"critic_warmup_iterations=2: the run has 2 iterations"),
    ({"critic_warmup_iterations": -1}, r"critic_warmup_iterations"),
    ({"critic_warmup_iterations": 1, "critic": "shared", "critic_init": "auto"},
     r"critic_warmup_iterations=1 needs critic=separate"),
    ({"critic_warmup_iterations": 1, "advantage_estimator": "rloo", "samples_per_prompt": 2, "critic_init": "auto"},
     r"critic_warmup_iterations=1 needs advantage_estimator='gae'"),
])
def test_a_warmup_that_cannot_work_is_refused(tmp_path, overrides, message):
    with pytest.raises(RlhfkitError, match=message):
        make_config(tmp_path, **overrides)
