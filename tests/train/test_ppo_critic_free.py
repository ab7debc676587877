"""Critic-free advantage estimators, samples_per_prompt, KL in the loss and the policy-loss options in the PPO
trainer: the rollout layout, the step-4 dispatch against the core functions, no critic held or saved, micro-batch
invariance of every loss aggregation, config errors."""

from __future__ import annotations

import copy

import pytest
import torch
from ppo_helpers import (assert_same_update, make_config, one_thread,  # noqa: F401  (one_thread: autouse fixture)
                         trainable)

from rlhfkit.core.advantages import grpo_advantages, remax_advantages, rloo_advantages
from rlhfkit.core.kl import kl_loss
from rlhfkit.core.losses import ppo_policy_loss
from rlhfkit.core.masks import LOSS_AGGREGATIONS, masked_sum
from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.forward import policy_forward
from rlhfkit.train.ppo_trainer import PPOTrainer
from rlhfkit.train.ppo_update import UpdateBatch, UpdateSettings, ppo_update
from rlhfkit.utils import read_jsonl

CRITIC_FREE = dict(critic_init="auto", samples_per_prompt=2, rollout_batch_size=4)


def _trainer(tmp_path, **overrides) -> PPOTrainer:
    return PPOTrainer(make_config(tmp_path, **{**CRITIC_FREE, **overrides}))


# ------------------------------------------------------------------------------------ rollout layout
def test_a_rollout_holds_k_consecutive_responses_per_prompt(tmp_path):
    trainer = _trainer(tmp_path, advantage_estimator="grpo", samples_per_prompt=3, num_minibatches=1)
    rollout, local = trainer.rollout()
    assert rollout.query_ids.shape[0] == len(local) == 4 * 3  # rollout_batch_size counts prompts
    assert local[0::3] == local[1::3] == local[2::3]  # prompt-major: rows 3p, 3p+1, 3p+2 answer one prompt
    assert len(set(local)) == 4
    for p in range(4):
        group = rollout.query_ids[3 * p:3 * p + 3]
        assert bool((group == group[0]).all())
    # the k responses are independent samples, not copies
    assert not all(bool((rollout.response_ids[3 * p] == rollout.response_ids[3 * p + 1]).all()) for p in range(4))


# ------------------------------------------------------------------------------------ step 4 dispatch
@pytest.mark.parametrize("estimator,kl_in", [("grpo", "loss"), ("dr_grpo", "reward"), ("rloo", "reward"),
                                             ("rloo", "loss")])
def test_outcome_estimators_get_the_core_advantages_of_the_sequence_rewards(tmp_path, estimator, kl_in):
    trainer = _trainer(tmp_path, advantage_estimator=estimator, kl_in=kl_in, kl_coef=0.5)
    with torch.no_grad():  # a reference away from the policy: a non-zero KL
        trainer.reference.lm_head.weight.add_(0.3 * torch.randn(trainer.reference.lm_head.weight.shape))
    rollout, _ = trainer.rollout()
    raw = torch.tensor([3.0, 1.0, 0.0, 0.0, 2.0, 5.0, 1.0, 4.0])
    exp = trainer.prepare(rollout, raw)
    b = exp.batch
    assert b.old_values is None and b.returns is None
    # the outcome score: the row sum of the shaped rewards = score - kl_coef Σ_t KL_t (kl_in=reward), score (loss)
    outcome = masked_sum(exp.shaped.rewards, b.response_mask, dim=1)
    if kl_in == "loss":
        torch.testing.assert_close(outcome, raw, rtol=0, atol=0)
        assert b.ref_logprobs is not None
    else:
        kl_sum = masked_sum(exp.shaped.kl, b.response_mask, dim=1)
        torch.testing.assert_close(outcome, raw - 0.5 * kl_sum, rtol=1e-6, atol=1e-6)
        assert float(kl_sum.abs().min()) > 1e-3  # the KL moved every score
        assert b.ref_logprobs is None
    if estimator == "rloo":
        expected = rloo_advantages(outcome, b.response_mask, 2)
    else:
        expected = grpo_advantages(outcome, b.response_mask, 2, scale_by_std=estimator == "grpo")
    torch.testing.assert_close(b.advantages, expected, rtol=0, atol=0)
    if kl_in == "loss" and estimator == "grpo":
        # hand-computed: pairs (3, 1), (0, 0), (2, 5), (1, 4); std of a pair (a, b) = |a - b| / sqrt(2)
        s2 = 2 ** 0.5
        per_row = torch.tensor([s2 / 2, -s2 / 2, 0, 0, -s2 / 2, s2 / 2, -s2 / 2, s2 / 2])
        first = b.advantages[:, 0]
        torch.testing.assert_close(first, per_row, rtol=0, atol=1e-5)


def test_reinforce_pp_baseline_centres_the_scores_of_each_group_first(tmp_path):
    raw = torch.tensor([3.0, 1.0, 0.0, 0.0, 2.0, 5.0, 1.0, 4.0])
    centered = torch.tensor([1.0, -1.0, 0.0, 0.0, -1.5, 1.5, -1.5, 1.5])
    plain = _trainer(tmp_path, advantage_estimator="reinforce_pp", kl_coef=0.0, gamma=1.0)
    rollout, _ = plain.rollout()
    base = _trainer(tmp_path, advantage_estimator="reinforce_pp_baseline", kl_coef=0.0, gamma=1.0,
                    output=str(tmp_path / "run2"))
    # with no KL and γ = 1 the reward-to-go of every token is its row's score: reinforce_pp whitens the raw
    # scores, the baseline variant the centred ones, over all response tokens
    for trainer, scores in ((plain, raw), (base, centered)):
        b = trainer.prepare(rollout, raw).batch
        m = b.response_mask
        per_token = torch.where(m, scores.unsqueeze(1), 0.0)
        mean = per_token.sum() / m.sum()
        var = (torch.where(m, per_token - mean, 0.0) ** 2).sum() / (m.sum() - 1)
        expected = torch.where(m, (per_token - mean) / torch.sqrt(var + 1e-8), 0.0)
        torch.testing.assert_close(b.advantages, expected, rtol=1e-6, atol=1e-6)


def test_remax_subtracts_the_score_of_the_greedy_response_to_the_prompt(tmp_path):
    trainer = _trainer(tmp_path, advantage_estimator="remax", kl_in="loss", missing_stop_penalty=-1.0)
    rollout, _ = trainer.rollout()
    greedy_raw, greedy_stopped = trainer.greedy_scores(rollout)
    assert greedy_raw.shape == greedy_stopped.shape == (4,)  # one greedy response per prompt
    again = trainer.greedy_scores(rollout)  # greedy decoding: deterministic
    torch.testing.assert_close(again[0], greedy_raw, rtol=0, atol=0)
    raw = torch.tensor([3.0, 1.0, 0.0, 0.0, 2.0, 5.0, 1.0, 4.0])
    greedy = (torch.tensor([2.0, 0.0, 3.0, 1.0]), torch.tensor([True, True, True, False]))
    b = trainer.prepare(rollout, raw, greedy).batch
    assert b.old_values is None and b.returns is None
    # the greedy scores go through the samples' processing: prompt 3's greedy response has no stop -> -1.0
    used = trainer.process_scores(raw, rollout.stopped)
    expected = remax_advantages(used, torch.tensor([2.0, 0.0, 3.0, -1.0]), b.response_mask)
    torch.testing.assert_close(b.advantages, expected, rtol=0, atol=0)
    if bool(rollout.stopped.all()):  # hand-computed: (3-2, 1-2, 0-0, 0-0, 2-3, 5-3, 1+1, 4+1)
        torch.testing.assert_close(b.advantages[:, 0], torch.tensor([1.0, -1, 0, 0, -1, 2, 2, 5]), rtol=0, atol=0)


def test_a_process_count_that_does_not_divide_the_prompts_is_refused(tmp_path):
    from types import SimpleNamespace

    fake = SimpleNamespace(world_size=3, rank=0, device=torch.device("cpu"), is_main=True)
    with pytest.raises(RlhfkitError, match="rollout_batch_size.*whole prompts"):
        PPOTrainer(make_config(tmp_path, **{**CRITIC_FREE, "advantage_estimator": "grpo"}), dist=fake)


# ------------------------------------------------------------------------------------ no critic
@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_a_critic_free_run_holds_saves_and_resumes_no_critic(tmp_path, estimator):
    trainer = _trainer(tmp_path, advantage_estimator=estimator, save_every=1, iterations=2)
    assert trainer.critic is None and trainer.critic_optimizer is None and trainer.critic_scheduler is None
    # the memory claim: the only models held are the policy and its reference
    modules = {name: m for name, m in vars(trainer).items() if isinstance(m, torch.nn.Module)}
    assert set(modules) == {"policy", "reference"}, sorted(modules)
    held = {id(p) for m in modules.values() for p in m.parameters()}
    assert len(held) == 2 * len(list(trainer.policy.parameters()))
    assert len(trainer.policy_optimizer.param_groups) == 1
    results = trainer.train()
    out = tmp_path / "run"
    assert (out / "policy").is_dir()
    assert not (out / "critic").exists() and not (out / "value_head.safetensors").exists()
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts and not any((c / "critic.safetensors").exists() for c in ckpts)
    rows = read_jsonl(out / "metrics.jsonl")
    for row in rows + [r.stats for r in results]:
        assert not [k for k in row if k.startswith(("val/", "returns/")) or k in ("loss/value", "train/critic_lr")]
        assert "loss/policy" in row and "objective/scores" in row
    assert rows[-1]["train/episodes"] == 2 * 4 * 2  # iterations × prompts × samples_per_prompt
    # resume continues the critic-free run exactly
    resumed = PPOTrainer(make_config(tmp_path, **{**CRITIC_FREE, "advantage_estimator": estimator,
                                                  "save_every": 1, "iterations": 3, "resume": True}))
    assert resumed.critic is None
    assert len(resumed.train()) == 1


# ------------------------------------------------------------------------------------ micro-batch invariance
def _batch(trainer: PPOTrainer, kl_in_loss: bool) -> UpdateBatch:
    """A rollout of the tiny policy with float64 old log-probs perturbed (ratios away from 1: both clips and the
    dual clip occur) and random advantages of both signs; no values or returns."""
    rollout, _ = trainer.rollout()
    b = trainer.prepare(rollout, torch.arange(rollout.query_ids.shape[0], dtype=torch.float32)).batch
    g = torch.Generator().manual_seed(1)
    m = b.response_mask
    noise = 0.7 * torch.randn(m.shape, generator=g, dtype=torch.float64)
    ref = torch.where(m, b.old_logprobs.double() + 0.3 * torch.randn(m.shape, generator=g, dtype=torch.float64), 0.)
    return UpdateBatch(b.query_ids, b.query_mask, b.response_ids, m,
                       old_logprobs=torch.where(m, b.old_logprobs.double() + noise, 0.0), old_values=None,
                       advantages=torch.where(m, 2 * torch.randn(m.shape, generator=g, dtype=torch.float64), 0.0),
                       returns=None, ref_logprobs=ref if kl_in_loss else None)


def _update(trainer, batch, micro_batch_size, rows, aggregation, kl_loss_coef):
    policy = copy.deepcopy(trainer.policy).double()
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)  # new weights = gradient
    settings = UpdateSettings(clip_range=0.2, clip_range_value=None, vf_coef=0.1, entropy_coef=0.01,
                              temperature=trainer.cfg.temperature, micro_batch_size=micro_batch_size,
                              max_grad_norm=None, clip_range_low=0.1, clip_range_high=0.3, dual_clip=2.0,
                              loss_aggregation=aggregation, max_length=trainer.cfg.max_new_tokens,
                              kl_loss_coef=kl_loss_coef)
    history = ppo_update(policy, None, opt, None, batch, [[rows]], settings, trainer.dist)
    return trainable(policy), history[0]


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_every_loss_aggregation_accumulates_micro_batches_to_the_one_batch_update(tmp_path, aggregation):
    trainer = _trainer(tmp_path, advantage_estimator="rloo")
    batch = _batch(trainer, kl_in_loss=True)
    rows = list(range(8))
    assert len(set(batch.response_mask.sum(1).tolist())) > 1  # rows of different lengths trim differently
    p8, s8 = _update(trainer, batch, 8, rows, aggregation, 0.1)
    # the one-batch loss is the core functions on the whole (untrimmed) batch
    with torch.no_grad():
        policy = copy.deepcopy(trainer.policy).double()
        lp = policy_forward(policy, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask,
                            temperature=trainer.cfg.temperature).logprobs
    norm = {"max_length": trainer.cfg.max_new_tokens} if aggregation == "seq_mean_token_sum_norm" else {}
    p_loss, p_stats = ppo_policy_loss(lp, batch.old_logprobs, batch.advantages, batch.response_mask, 0.2,
                                      clip_range_low=0.1, clip_range_high=0.3, dual_clip=2.0,
                                      aggregation=aggregation, **norm)
    k_loss = kl_loss(lp, batch.ref_logprobs, batch.response_mask, "k3", aggregation, **norm)
    assert s8["loss/policy"] == pytest.approx(float(p_loss), rel=1e-10)
    assert s8["loss/kl"] == pytest.approx(float(k_loss), rel=1e-10)
    assert 0 < s8["policy/clipfrac"] < 1 and 0 < s8["policy/dual_clipfrac"] < 1
    assert s8["policy/dual_clipfrac"] == pytest.approx(float(p_stats.dual_clipfrac), rel=1e-10)
    assert not [k for k in s8 if k.startswith("val/") or k == "loss/value"]
    for micro in (1, 3, 5):
        p, s = _update(trainer, batch, micro, rows, aggregation, 0.1)
        assert_same_update((p,), s, (p8,), s8, keys=("loss/policy", "loss/kl", "loss/total", "policy/clipfrac",
                                                     "policy/dual_clipfrac", "policy/grad_norm"))


def test_the_aggregations_and_the_kl_loss_change_the_update(tmp_path):
    """Negative control: each mode is really passed through (the sequence modes weigh rows differently)."""
    trainer = _trainer(tmp_path, advantage_estimator="rloo")
    batch = _batch(trainer, kl_in_loss=True)
    rows = list(range(8))
    updates = [_update(trainer, batch, 3, rows, a, 0.1)[0] for a in LOSS_AGGREGATIONS]
    updates.append(_update(trainer, batch, 3, rows, "token_mean", None)[0])
    for i in range(len(updates)):
        for j in range(i):
            assert max((updates[i][n] - updates[j][n]).abs().max().item() for n in updates[i]) > 1e-6, (i, j)


# ------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("overrides,field", [
    ({"advantage_estimator": "rloo", "samples_per_prompt": 1}, "samples_per_prompt"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 1}, "samples_per_prompt"),
    ({"advantage_estimator": "grpo", "critic_init": "policy"}, "critic_init"),
    ({"advantage_estimator": "dr_grpo", "critic": "shared"}, "critic"),
    ({"advantage_estimator": "reinforce_pp", "critic_learning_rate": 1e-4}, "critic_learning_rate"),
    ({"advantage_estimator": "remax", "score_norm": "whiten"}, "score_norm"),
    ({"advantage_estimator": "gae_v2"}, "advantage_estimator"),
    ({"samples_per_prompt": 0}, "samples_per_prompt"),
    ({"kl_in": "both"}, "kl_in"),
    ({"loss_aggregation": "sum"}, "loss_aggregation"),
    ({"dual_clip": 1.0}, "dual_clip"),
    ({"clip_range_low": 1.0}, "clip_range_low"),
    ({"clip_range_high": -0.1}, "clip_range_high"),
    ({"rollout_batch_size": 3, "samples_per_prompt": 1, "num_minibatches": 2}, "num_minibatches"),
])
def test_bad_settings_are_refused_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(RlhfkitError, match=field):
        make_config(tmp_path, **{**CRITIC_FREE, **overrides})


def test_samples_per_prompt_makes_an_odd_prompt_count_divisible(tmp_path):
    cfg = make_config(tmp_path, **{**CRITIC_FREE, "rollout_batch_size": 3, "num_minibatches": 2,
                                   "advantage_estimator": "grpo"})
    assert cfg.episodes_per_iteration == 6
    assert cfg.num_iterations == 2
    assert make_config(tmp_path, total_episodes=13, iterations=None, **CRITIC_FREE).num_iterations == 2  # ⌈13/8⌉
