"""The no-grad forwards of a PPO iteration run each thing once: the frozen trunk (``reuse_frozen_trunk``) is
computed once per rollout and gives the plain path's numbers; ``old_logprobs=rollout`` skips the policy's pass
and gives the recomputing path's numbers up to the float32 storage of the sampler's log-probs."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from ppo_helpers import (make_config, make_policy_folder, one_thread,  # noqa: F401  (one_thread: autouse fixture)
                         randomize_value_head, trainable)
from tolerances import EPS32, assert_within, forward_factor, linear_terms, logprob_tolerance

import rlhfkit.train.ppo_trainer as ppo_trainer
from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.forward import policy_forward
from rlhfkit.train.ppo_config import PPOConfig, resolve_old_logprobs
from rlhfkit.train.ppo_trainer import PPOTrainer
from rlhfkit.train.ppo_trunk import TrunkPlan
from rlhfkit.train.ppo_update import UpdateSettings, ppo_update

LAYERS = 4


def _trainer(tmp_path, dtype=torch.float64, perturb=True, **overrides) -> PPOTrainer:
    """A 4-block policy with its 2 lowest blocks frozen and a critic (from the policy, random head) with 3; in
    ``dtype``; the policy's trainable weights perturbed so that it differs from the reference (a KL that is not
    0, reference log-probs that are not the old ones). Equal arguments give equal trainers."""
    if not (tmp_path / "sft").exists():
        make_policy_folder(tmp_path / "sft", layers=LAYERS)
    kw = dict(freeze_layers=2, critic_freeze_layers=3, kl_coef=0.3, micro_batch_size=3, max_new_tokens=8)
    trainer = PPOTrainer(make_config(tmp_path, **{**kw, **overrides}))
    randomize_value_head(trainer.critic)
    for model in (trainer.policy, trainer.reference, trainer.critic):
        model.to(dtype)
    if perturb:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in trainer.policy.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return trainer


def _sgd(trainer: PPOTrainer, lr: float = 0.5) -> None:
    """SGD instead of AdamW: the new weights are the gradients themselves (Adam would hide their scale)."""
    trainer.policy_optimizer = torch.optim.SGD([p for p in trainer.policy.parameters() if p.requires_grad], lr=lr)
    trainer.critic_optimizer = torch.optim.SGD([p for p in trainer.critic.parameters() if p.requires_grad], lr=lr)


def _pair(tmp_path, dtype=torch.float64, **overrides):
    """(fast, plain) trainers on the same rollout: their prepared experiences."""
    fast, plain = (_trainer(tmp_path, dtype, reuse_frozen_trunk=on, **overrides) for on in (True, False))
    rollout, _ = fast.rollout()
    raw = torch.linspace(-1, 1, rollout.query_ids.shape[0])
    return fast, plain, fast.prepare(rollout, raw), plain.prepare(rollout, raw)


# ------------------------------------------------------------------------------------------- the plan
def test_plan_follows_the_models(tmp_path):
    trainer = _trainer(tmp_path, torch.float32)
    plan = trainer.trunks.plan(trainer.policy, trainer.reference, trainer.critic)
    # critic_init=policy: the critic's embeddings and lowest blocks are the policy's, so its trunk (3 blocks)
    # continues from the policy's hidden states after min(2, 3) blocks; its 3 blocks are also the reference's
    # (both the SFT model's), so the reference runs from the deeper critic trunk
    assert plan == TrunkPlan(policy=2, reference=True, critic=3, shared=2, reference_critic=True)
    assert _trainer(tmp_path, torch.float32, critic_freeze_layers=1).trunks.plan(
        trainer.policy, trainer.reference, trainer.critic) == TrunkPlan(policy=2, reference=True, critic=1, shared=1)
    # the critic's block 2 differs from the reference's: the reference runs from the policy's trunk
    other = _trainer(tmp_path, torch.float32)
    with torch.no_grad():
        other.critic.model.base_model.layers[2].mlp.up_proj.weight[0, 0] += 1e-3
    assert other.trunks.plan(other.policy, other.reference, other.critic) == TrunkPlan(2, True, 3, 2, False)
    # the critic's frozen blocks alone: its own trunk, which the reference (the same SFT blocks) runs from too
    alone = _trainer(tmp_path, torch.float32, freeze_layers=0)
    assert alone.trunks.plan(alone.policy, alone.reference, alone.critic) == TrunkPlan(policy=0, critic=3,
                                                                                        reference_critic=True)
    # a change of a frozen parameter is seen (its version counter) and re-planned: block 1 of the reference now
    # differs from the policy's, so the reference runs in full and the critic shares only block 0
    with torch.no_grad():
        trainer.reference.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    plan = trainer.trunks.plan(trainer.policy, trainer.reference, trainer.critic)
    assert plan == TrunkPlan(policy=2, reference=False, critic=3, shared=2)
    with torch.no_grad():
        trainer.critic.model.base_model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert trainer.trunks.plan(trainer.policy, trainer.reference, trainer.critic).shared == 1
    # another dtype of the critic: nothing is shared with it, its own trunk stays
    trainer.critic.double()
    assert trainer.trunks.plan(trainer.policy, trainer.reference, trainer.critic) == TrunkPlan(2, False, 3, 0)


@pytest.mark.parametrize("overrides", [{"reuse_frozen_trunk": False}, {"lora_r": 2}, {"freeze_layers": 0,
                                       "critic_freeze_layers": 0}])
def test_plain_path_where_the_trunk_does_not_apply(tmp_path, overrides):
    """Turned off, LoRA (the policy is a peft model: its adapters change what blocks compute, and the reference is
    the same model with them off), nothing frozen: no trunk, and the iteration is today's (ratio 1 exactly)."""
    trainer = _trainer(tmp_path, torch.float32, perturb=False, **overrides)
    plan = trainer.trunks.plan(trainer.policy, trainer.reference, trainer.critic)
    assert plan.policy == 0 and not plan.reference
    if "lora_r" not in overrides:
        assert plan == TrunkPlan()
    result = trainer.iteration(1)
    assert result.minibatch_stats[0]["policy/ratio_mean"] == 1.0


# ------------------------------------------------------------------------------------------- fast == plain
def test_fast_path_gives_the_plain_paths_rollout_numbers_float64(tmp_path):
    fast, plain, a, b = _pair(tmp_path)
    assert a.batch.trunks is not None and b.batch.trunks is None
    m = a.batch.response_mask
    assert float(a.shaped.kl[m].abs().max()) > 1e-3 and float(a.batch.old_values[m].abs().min()) > 0
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        torch.testing.assert_close(getattr(a.batch, name), getattr(b.batch, name), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.ref_logprobs, b.ref_logprobs, rtol=0, atol=1e-12)


def test_fast_path_gives_the_plain_paths_gradients_float64(tmp_path):
    """One SGD step of lr 1 over all 8 rows in micro-batches of 3, a grouping other than the one the trunks were
    computed in (micro-batches of 3 within minibatches of 4): the weight change is the gradient of every
    trainable parameter."""
    fast, plain, a, b = _pair(tmp_path)
    assert a.batch.trunks is not None and b.batch.trunks is None
    settings = UpdateSettings(clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, entropy_coef=0.01,
                              temperature=fast.cfg.temperature, micro_batch_size=3)
    grads, stats = [], []
    for trainer, exp in ((fast, a), (plain, b)):
        before = {**trainable(trainer.policy), **{f"critic.{n}": p for n, p in trainable(trainer.critic).items()}}
        _sgd(trainer, lr=1.0)
        stats.append(ppo_update(trainer.policy, trainer.critic, trainer.policy_optimizer, trainer.critic_optimizer,
                                exp.batch, [[list(range(8))]], settings, trainer.dist)[0])
        after = {**trainable(trainer.policy), **{f"critic.{n}": p for n, p in trainable(trainer.critic).items()}}
        grads.append({n: before[n] - after[n] for n in before})
    assert grads[0].keys() == grads[1].keys()
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1.")) for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-12, msg=n)
    assert min(float(g.abs().max()) for g in grads[1].values()) > 1e-6  # every parameter has a gradient
    for key in stats[1]:
        assert stats[0][key] == pytest.approx(stats[1][key], rel=1e-12, abs=1e-14), key


def test_fast_path_gives_the_plain_paths_update_float64(tmp_path):
    """A whole update (2 epochs x 2 minibatches, SGD): the same per-minibatch statistics and trained weights."""
    fast, plain, a, b = _pair(tmp_path)
    histories = []
    for trainer, exp in ((fast, a), (plain, b)):
        _sgd(trainer)
        histories.append(trainer.update(exp))
    assert len(histories[0]) == len(histories[1]) == 4
    for h0, h1 in zip(*histories):
        assert h0.keys() == h1.keys()
        for key in h0:
            assert h0[key] == pytest.approx(h1[key], rel=1e-12, abs=1e-14), key
    assert histories[0][0]["policy/ratio_mean"] == 1.0  # the first minibatch: ratio 1 exactly on the fast path
    assert histories[0][3]["policy/approx_kl"] > 1e-6
    for model in ("policy", "critic"):
        p0, p1 = trainable(getattr(fast, model)), trainable(getattr(plain, model))
        for n in p0:
            torch.testing.assert_close(p0[n], p1[n], rtol=0, atol=1e-12, msg=n)


def test_fast_path_rollout_numbers_are_the_plain_paths_bits_in_float32(tmp_path):
    """The trunks are computed over the first epoch's micro-batches, the very shapes of the plain path: the old
    and reference log-probs and the values are equal to the last bit (the later epochs' other groupings differ
    by rounding only, as the float64 tests show). Padded micro-batches: a packed one runs the trunk's padded
    states in the packed layout, the same numbers up to rounding (the float64 tests and tests/train/test_ppo_packing.py).
    The trunk from its tokens: the sampler's states (``reuse_rollout_states``) are another computation of them."""
    fast, plain, a, b = _pair(tmp_path, torch.float32, packing="off", reuse_rollout_states=False)
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        assert torch.equal(getattr(a.batch, name), getattr(b.batch, name)), name
    assert torch.equal(a.ref_logprobs, b.ref_logprobs)


@pytest.mark.parametrize("variant", ["float32", "bf16"])
def test_first_minibatch_has_ratio_exactly_one_on_the_fast_path(tmp_path, variant):
    """The ratio is 1 exactly (the old log-probs and the first minibatch are the same computation). The reference
    (unperturbed: the policy's own weights) runs from the critic's deeper trunk, so its log-probs are the old ones
    computed in other shapes: equal up to the network's rounding in the compute precision (float32, or bf16 under
    autocast), not bit for bit (AVX2 kernels round those shapes differently from AVX-512 ones)."""
    trainer = _trainer(tmp_path, torch.float32, perturb=False, bf16=variant == "bf16", ppo_epochs=2)
    plan = trainer.trunks.plan(trainer.policy, trainer.reference, trainer.critic)
    assert plan.policy == 2 and plan.reference_critic
    rollout, _ = trainer.rollout()
    m = rollout.response_mask.bool()
    with torch.no_grad(), linear_terms(trainer.policy.lm_head) as terms:
        old = policy_forward(trainer.policy, rollout.query_ids, rollout.query_mask.bool(), rollout.response_ids, m,
                             temperature=trainer.cfg.temperature).logprobs
    exp = trainer.prepare(rollout, torch.linspace(-1, 1, rollout.query_ids.shape[0]))
    history = trainer.update(exp)
    first = history[0]
    assert (first["policy/approx_kl"], first["policy/ratio_mean"], first["policy/ratio_var"]) == (0.0, 1.0, 0.0)
    assert first["val/clipfrac"] == 0.0
    assert all(s["policy/ratio_mean"] != 1.0 for s in history[1:])
    eps = torch.finfo(torch.bfloat16 if variant == "bf16" else torch.float32).eps
    tol = logprob_tolerance(terms[0], old, trainer.cfg.temperature, forward_factor(LAYERS)) * (eps / EPS32)
    assert_within(exp.ref_logprobs, exp.batch.old_logprobs, torch.where(m, tol, 0.0), "reference vs old")


# ------------------------------------------------------------------------------------------- the sampler's states
def test_rollout_states_start_the_trunk_with_the_plain_numbers_float64(tmp_path):
    """``reuse_rollout_states``: the sampler keeps the policy's states after the shared stage (2 blocks) of every
    row, which equal one plain forward of ``[prompt; response]`` at every real token (float64: to 1e-12; zeros on
    padding). The trainer starts the trunks from them (the policy's blocks 0-1 do not run in ``prepare``) and
    gets the numbers of the trunk computed from the tokens, on the same rollout."""
    from rlhfkit.rollout.forward import trunk_forward

    on, off = (_trainer(tmp_path, reuse_rollout_states=flag) for flag in (True, False))
    rollout, _ = on.rollout()
    assert off.trunks.plan(off.policy, off.reference, off.critic).base_depth == 2
    kept_rollout, states = on._rollout_states
    assert kept_rollout is rollout and states.layers == 2
    q, qm, r, rm = rollout.query_ids, rollout.query_mask.bool(), rollout.response_ids, rollout.response_mask.bool()
    assert states.hidden.shape[:2] == (q.shape[0], q.shape[1] + r.shape[1])
    assert 0 < int(rm.sum()) < rm.numel()  # rows of different lengths: padding in the response columns
    with torch.no_grad():
        plain = trunk_forward(on.policy, q, qm, r, rm, layers=2).hidden
    real = torch.cat([qm, rm], dim=1)
    torch.testing.assert_close(states.hidden[real], plain[real], rtol=0, atol=1e-12)
    assert float(plain[real].abs().max()) > 0.01 and float(states.hidden[~real].abs().max()) == 0.0
    counts, handles = _count_rows({"policy0": on.policy.model.layers[0], "policy1": on.policy.model.layers[1]})
    raw = torch.linspace(-1, 1, q.shape[0])
    try:
        a = on.prepare(rollout, raw)
    finally:
        for h in handles:
            h.remove()
    assert counts == {"policy0": 0, "policy1": 0} and on._rollout_states is None  # used once, then dropped
    b = off.prepare(rollout, raw)
    assert a.batch.trunks is not None and b.batch.trunks is not None
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        torch.testing.assert_close(getattr(a.batch, name), getattr(b.batch, name), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.ref_logprobs, b.ref_logprobs, rtol=0, atol=1e-12)
    # the trunks at real tokens (padding holds zeros from the sampler, the pad token's states from the plain path:
    # attention never reads them, as the equal numbers above show)
    real = torch.cat([a.batch.query_mask.bool(), a.batch.response_mask.bool()], dim=1)
    for t0, t1 in ((a.batch.trunks.policy, b.batch.trunks.policy), (a.batch.trunks.critic, b.batch.trunks.critic)):
        torch.testing.assert_close(t0.hidden[real], t1.hidden[real], rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides,plan", [
    # the policy runs block 2 from the base
    (dict(freeze_layers=3, critic_freeze_layers=2), TrunkPlan(policy=3, reference=True, critic=2, shared=2)),
    (dict(critic_freeze_layers=0), TrunkPlan(policy=2, reference=True))])  # the base is the policy's own trunk
def test_rollout_states_in_the_other_plans_give_the_plain_numbers_float64(tmp_path, overrides, plan):
    on, off = (_trainer(tmp_path, reuse_rollout_states=flag, **overrides) for flag in (True, False))
    assert on.trunks.plan(on.policy, on.reference, on.critic) == plan
    rollout, _ = on.rollout()
    assert on._rollout_states is not None and on._rollout_states[1].layers == plan.base_depth
    raw = torch.linspace(-1, 1, rollout.query_ids.shape[0])
    a, b = on.prepare(rollout, raw), off.prepare(rollout, raw)
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        torch.testing.assert_close(getattr(a.batch, name), getattr(b.batch, name), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.ref_logprobs, b.ref_logprobs, rtol=0, atol=1e-12)


def test_rollout_states_sample_the_same_tokens_float64(tmp_path):
    """Keeping finished rows in the sampler's batch changes its shapes only: in float64 the same seed draws the
    same tokens with and without the kept states."""
    rollouts = [_trainer(tmp_path, reuse_rollout_states=flag).rollout()[0] for flag in (True, False)]
    for name in ("response_ids", "response_mask", "stopped"):
        assert torch.equal(getattr(rollouts[0], name), getattr(rollouts[1], name)), name
    torch.testing.assert_close(rollouts[0].rollout_logprobs, rollouts[1].rollout_logprobs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides", [dict(reuse_rollout_states=False), dict(reuse_frozen_trunk=False),
                                       dict(freeze_layers=0, critic_freeze_layers=0),
                                       dict(freeze_layers=1, critic_freeze_layers=1)])  # 1 of 4 blocks: under half
def test_no_states_are_kept_where_no_trunk_starts_from_the_tokens(tmp_path, overrides):
    trainer = _trainer(tmp_path, torch.float32, **overrides)
    trainer.rollout()
    assert trainer._rollout_states is None


def test_an_injected_rollout_runs_the_trunk_from_its_tokens(tmp_path):
    """States are read only for the rollout they belong to: a rollout the trainer did not sample last (a test's,
    or a copy with the same tokens) runs the shared stage itself."""
    trainer = _trainer(tmp_path, torch.float32)
    rollout, _ = trainer.rollout()
    other = ppo_trainer.Rollout(*(t.clone() for t in rollout))
    counts, handles = _count_rows({"policy0": trainer.policy.model.layers[0]})
    try:
        trainer.prepare(other, torch.zeros(rollout.query_ids.shape[0]))
    finally:
        for h in handles:
            h.remove()
    assert counts == {"policy0": 8} and trainer._rollout_states is None


# ------------------------------------------------------------------------------------------- work skipped
def _count_rows(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], list]:
    counts = {name: 0 for name in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: counts.__setitem__(
        name, counts[name] + args[0].shape[0])) for name, m in modules.items()]
    return counts, handles


def _blocks(trainer: PPOTrainer) -> dict[str, torch.nn.Module]:
    critic = trainer.critic.model.base_model.layers
    return {"policy0": trainer.policy.model.layers[0], "policy3": trainer.policy.model.layers[3],
            "reference0": trainer.reference.model.layers[0], "reference2": trainer.reference.model.layers[2],
            "reference3": trainer.reference.model.layers[3],
            "critic0": critic[0], "critic2": critic[2], "critic3": critic[3]}


@pytest.mark.parametrize("reuse,states", [(True, True), (True, False), (False, True)])
def test_lower_blocks_run_once_per_row_per_rollout(tmp_path, reuse, states):
    # padded micro-batches, so that a block's input rows are the batch rows it runs
    trainer = _trainer(tmp_path, torch.float32, reuse_frozen_trunk=reuse, ppo_epochs=3, packing="off",
                       reuse_rollout_states=states)
    rollout, _ = trainer.rollout()
    counts, handles = _count_rows(_blocks(trainer))
    try:
        trainer.update(trainer.prepare(rollout, torch.zeros(rollout.query_ids.shape[0])))
    finally:
        for h in handles:
            h.remove()
    B, E = 8, 3
    if reuse:
        # the shared stage (policy blocks 0-1) once, or not at all after the sampler kept its states; the critic's
        # block 2 (frozen, not shared) once; the reference runs only block 3, on the critic's 3-block trunk (the
        # same SFT blocks); the upper blocks: once for the old log-probs / values, once per epoch
        assert counts == {"policy0": 0 if states else B, "policy3": B + E * B,
                          "reference0": 0, "reference2": 0, "reference3": B,
                          "critic0": 0, "critic2": B, "critic3": B + E * B}
    else:
        assert counts == {"policy0": B + E * B, "policy3": B + E * B, "reference0": B, "reference2": B,
                          "reference3": B, "critic0": B + E * B, "critic2": B + E * B, "critic3": B + E * B}


@pytest.mark.parametrize("freeze", [0, 2])
def test_rollout_old_logprobs_skip_the_policy_pass(tmp_path, freeze):
    trainer = _trainer(tmp_path, torch.float32, old_logprobs="rollout", freeze_layers=freeze, ppo_epochs=1,
                       packing="off")  # padded: the head's input rows are the batch rows
    rollout, _ = trainer.rollout()
    counts, handles = _count_rows({"head": trainer.policy.lm_head, "reference": trainer.reference.lm_head})
    try:
        exp = trainer.prepare(rollout, torch.zeros(rollout.query_ids.shape[0]))
    finally:
        for h in handles:
            h.remove()
    assert counts == {"head": 0, "reference": 8}
    m = exp.batch.response_mask
    assert torch.equal(exp.batch.old_logprobs, torch.where(m, rollout.rollout_logprobs.double(), 0.0).float())


# ------------------------------------------------------------------------------------------- old_logprobs
def test_sampler_logprobs_are_the_training_forwards_in_float64(tmp_path):
    """The sampler (KV cache, one position at a time) and the training forward (whole sequences) compute the same
    log-probs. The sampler casts its logits to float32 before the log-softmax (`rollout.sampling`), so in float64
    they differ by that alone: the float32 rounding of the logits (1 stage) and of the log-softmax, nothing of the
    network's (the float32 test below allows the 4 blocks' rounding, here there is none)."""
    trainer = _trainer(tmp_path, torch.float64)
    rollout, _ = trainer.rollout()
    m = rollout.response_mask.bool()
    with torch.no_grad():
        exact = policy_forward(trainer.policy, rollout.query_ids, rollout.query_mask.bool(), rollout.response_ids, m,
                               temperature=trainer.cfg.temperature, with_logits=True)
    assert exact.logprobs.dtype == torch.float64 and rollout.rollout_logprobs.dtype == torch.float32
    tol = logprob_tolerance(exact.logits.abs(), exact.logprobs, trainer.cfg.temperature, 1)
    assert_within(rollout.rollout_logprobs.double(), exact.logprobs, torch.where(m, tol, 0.0), "sampler vs forward")
    assert bool(m.sum(1).ne(m.shape[1]).any())  # rows of different lengths: padding is compared too


def test_sampler_logprobs_are_the_training_forwards_in_float32(tmp_path):
    trainer = _trainer(tmp_path, torch.float32)
    rollout, _ = trainer.rollout()
    m = rollout.response_mask.bool()
    with torch.no_grad(), linear_terms(trainer.policy.lm_head) as terms:
        exact = policy_forward(trainer.policy, rollout.query_ids, rollout.query_mask.bool(), rollout.response_ids, m,
                               temperature=trainer.cfg.temperature).logprobs
    # the same network in other shapes (one position with a cache vs whole sequences): the rounding of the 4
    # blocks, then the log-softmax over the vocabulary
    tol = torch.where(m, logprob_tolerance(terms[0], exact, trainer.cfg.temperature, forward_factor(LAYERS)), 0.0)
    assert_within(rollout.rollout_logprobs, exact, tol, "sampler vs forward")


def test_rollout_old_logprobs_are_recompute_with_the_samplers_numbers(tmp_path, monkeypatch):
    """``rollout`` is ``recompute`` with the sampler's log-probs in place of the recomputed ones, nothing else:
    the recomputing trainer given those gives the same prepared batch and the same update, bit for bit. (The two
    sampler tests above bound how far those numbers are from the recomputed ones.)"""
    real = ppo_trainer.rollout_forward
    rollout_mode, recompute = (_trainer(tmp_path, old_logprobs=mode) for mode in ("rollout", "recompute"))
    rollout, _ = rollout_mode.rollout()
    raw = torch.linspace(-1, 1, 8)
    a = rollout_mode.prepare(rollout, raw)

    def with_sampler_logprobs(*args, **kwargs):
        fwd = real(*args, **kwargs)
        assert fwd.old_logprobs is not None  # the recomputing trainer did run the policy pass
        mask = args[7]
        return fwd._replace(old_logprobs=torch.where(mask, rollout.rollout_logprobs.to(fwd.old_logprobs.dtype), 0.0))

    monkeypatch.setattr(ppo_trainer, "rollout_forward", with_sampler_logprobs)
    b = recompute.prepare(rollout, raw)
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        assert torch.equal(getattr(a.batch, name), getattr(b.batch, name)), name
    histories = []
    for trainer, exp in ((rollout_mode, a), (recompute, b)):
        _sgd(trainer)
        histories.append(trainer.update(exp))
    assert histories[0] == histories[1]
    for model in ("policy", "critic"):
        p0, p1 = trainable(getattr(rollout_mode, model)), trainable(getattr(recompute, model))
        assert all(torch.equal(p0[n], p1[n]) for n in p0), model


def test_rollout_old_logprobs_move_the_first_ratio_by_the_samplers_gap_only(tmp_path):
    """With ``rollout`` the first minibatch's ratio is exp(recomputed - sampler's) per token: 1 up to the gap δ
    between the two (float32 log-softmax of the sampler), not exactly 1; the same policy otherwise."""
    rollout_mode, recompute = (_trainer(tmp_path, old_logprobs=mode) for mode in ("rollout", "recompute"))
    rollout, _ = rollout_mode.rollout()
    raw = torch.linspace(-1, 1, 8)
    a, b = rollout_mode.prepare(rollout, raw), recompute.prepare(rollout, raw)
    m = a.batch.response_mask
    gap = float((a.batch.old_logprobs - b.batch.old_logprobs)[m].abs().max())
    assert 0 < gap < 1e-5
    first = [t.update(exp)[0] for t, exp in ((rollout_mode, a), (recompute, b))]
    assert first[1]["policy/ratio_mean"] == 1.0
    assert abs(first[0]["policy/ratio_mean"] - 1.0) <= math.expm1(gap)
    assert first[0]["policy/approx_kl"] <= gap ** 2  # (ρ - 1) - log ρ ≈ ½ (log ρ)²


def test_auto_old_logprobs_are_the_samplers_only_where_they_equal_the_forwards_to_float32_rounding(tmp_path):
    """``auto`` (the default) resolves to ``rollout`` for the built-in sampler in float32 (the gap bounded by the
    float32 test above), and to ``recompute`` where the gap is larger (bf16, vLLM's kernels) or the pass runs anyway
    (a shared critic, the full KL's logits); an explicit choice stays."""
    def resolved(**settings) -> str:
        cfg = make_config(tmp_path, old_logprobs="auto")
        for name, value in settings.items():  # set after construction: vLLM need not be installed
            setattr(cfg, name, value)
        return resolve_old_logprobs(cfg)

    assert PPOConfig(output="x").old_logprobs == "auto"  # the default
    assert resolved(bf16=False) == "rollout"
    assert resolved(bf16=False, advantage_estimator="rloo", samples_per_prompt=2) == "rollout"  # no critic
    assert resolved(bf16=True) == "recompute"
    assert resolved(bf16=False, rollout_engine="vllm") == "recompute"
    assert resolved(bf16=False, critic="shared") == "recompute"
    assert resolved(bf16=False, kl_estimator="full") == "recompute"
    assert resolved(bf16=True, old_logprobs="rollout") == "rollout"
    assert resolved(bf16=False, old_logprobs="recompute") == "recompute"


def test_the_default_trainer_takes_the_samplers_log_probs_and_records_the_choice(tmp_path, monkeypatch):
    """On a CPU (float32) the default runs no policy pass in step 3: the old log-probs are the sampler's, bit for
    bit, and config.yaml records ``rollout``; the reference and the critic still run."""
    passes = []
    real = ppo_trainer.rollout_forward

    def spy(*args, **kwargs):
        passes.append(kwargs["policy_pass"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo_trainer, "rollout_forward", spy)
    trainer = PPOTrainer(make_config(tmp_path, iterations=1, old_logprobs="auto"))
    assert (trainer.cfg.bf16, trainer.cfg.old_logprobs) == (False, "rollout")
    rollout, _ = trainer.rollout()
    exp = trainer.prepare(rollout, torch.linspace(-1, 1, rollout.query_ids.shape[0]))
    m = exp.batch.response_mask
    assert passes == [False]
    assert torch.equal(exp.batch.old_logprobs, torch.where(m, rollout.rollout_logprobs, 0.0))
    assert exp.batch.old_values is not None and bool(exp.ref_logprobs[m].ne(0).all())
    trainer.train()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["old_logprobs"], saved["bf16"]) == ("rollout", False)


def test_rollout_old_logprobs_need_no_full_kl(tmp_path):
    with pytest.raises(RlhfkitError, match="old_logprobs='rollout' cannot be combined with kl_estimator='full'"):
        make_config(tmp_path, old_logprobs="rollout", kl_estimator="full")
    with pytest.raises(RlhfkitError, match="old_logprobs"):
        make_config(tmp_path, old_logprobs="sampler")



# ------------------------------------------------------------------------------ the reward model on a trunk
def _rm_trainer(tmp_path, dtype=torch.float64, **overrides) -> PPOTrainer:
    """`_trainer` scored by a reward model on the SFT backbone (random head) that also initialises the critic
    (``critic_init=reward``): the critic's 3 frozen blocks are the reward model's, which runs only its top block
    from the critic's trunk. Everything in ``dtype``."""
    from rlhfkit.models.reward import RewardModel, init_head_
    from ppo_helpers import make_tokenizer

    if not (tmp_path / "rm").exists():
        make_policy_folder(tmp_path / "sft", layers=LAYERS)
        torch.manual_seed(3)
        rm = RewardModel.from_backbone(tmp_path / "sft", kind="decoder", aggregation="last", tokenizer=make_tokenizer())
        init_head_(rm.model.score)
        rm.save_pretrained(tmp_path / "rm", make_tokenizer())
    trainer = _trainer(tmp_path, dtype, reward_model=[str(tmp_path / "rm")], critic_init="reward", **overrides)
    trainer.reward.model.to(dtype)
    return trainer


def _scored(trainer: PPOTrainer, monkeypatch) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, bool]]]:
    """(scores from the trunks, plain scores, (rows, from a trunk?) of each reward-model forward) of one rollout."""
    calls, forward = [], trainer.reward._forward

    def recording(ids, mask, resp_mask, trunk=None):
        calls.append((ids.shape[0], trunk is not None))
        return forward(ids, mask, resp_mask, trunk)

    monkeypatch.setattr(trainer.reward, "_forward", recording)
    rollout, _ = trainer.rollout()
    batch = trainer.rollout_batch(rollout)
    trunks = batch.shared_trunks(trainer.policy, trainer.critic)
    fast = trainer.raw_scores(rollout, None, trunks)[0]
    plain = trainer.raw_scores(rollout)[0]
    return fast, plain, calls


@pytest.mark.parametrize("packing", ["auto", "off"])
def test_reward_model_runs_from_the_critics_trunk_with_the_plain_scores_float64(tmp_path, monkeypatch, packing):
    """The reward model's 3 lowest blocks are the critic's frozen ones: it runs only block 3 from the critic's
    trunk for every row whose input is exactly the trunk row (a response that ended at an extra stop id gets an
    EOS appended: those rows take the plain path). Float64 throughout, so the two paths agree to ~1e-15 and the
    float32 scores to the one rounding step that can then separate them (one float32 spacing, <= EPS32 |s|)."""
    trainer = _rm_trainer(tmp_path, packing=packing)
    trunks = trainer.rollout_batch(trainer.rollout()[0]).shared_trunks(trainer.policy, trainer.critic)
    assert trainer.reward.shared_trunk(trunks).layers == 3  # the critic's trunk, deeper than the policy's 2
    trainer = _rm_trainer(tmp_path, packing=packing)  # the same rollout again
    fast, plain, calls = _scored(trainer, monkeypatch)
    n = fast.shape[0]
    from_trunk = sum(rows for rows, trunk in calls if trunk)
    assert 0 < from_trunk < n and sum(rows for rows, _ in calls) == 2 * n  # both paths, then all rows plain
    assert float(plain.abs().min()) > 1e-3
    assert_within(fast, plain, EPS32 * plain.abs(), "scores from the trunk vs plain")


def test_packed_reward_model_micro_batches_give_the_padded_scores_float64(tmp_path):
    from rlhfkit.rollout.scoring import RMReward

    trainer = _rm_trainer(tmp_path)
    rollout, _ = trainer.rollout()
    texts = [""] * rollout.query_ids.shape[0]
    args = (texts, texts, rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
            rollout.stopped)
    scores = []
    for packing in (True, False):
        source = RMReward(tmp_path / "rm", trainer.tokenizer, batch_size=3, packing=packing)
        source.model.to(torch.float64)
        scores.append(source(*args))
    lengths = (rollout.query_mask.sum(1) + rollout.response_mask.sum(1)).unique()
    assert len(lengths) > 1  # rows of different lengths: the padded batches hold padding
    assert_within(scores[0], scores[1], EPS32 * scores[1].abs(), "packed vs padded")


def test_reward_model_blocks_that_differ_are_not_read_from_a_trunk(tmp_path):
    trainer = _rm_trainer(tmp_path, torch.float32)
    trunks = trainer.rollout_batch(trainer.rollout()[0]).shared_trunks(trainer.policy, trainer.critic)
    reward = trainer.reward
    blocks = reward.model.model.base_model.layers
    assert reward.shared_trunk(trunks).layers == 3
    with torch.no_grad():  # block 2 now differs from the critic's: the policy's 2-block trunk is the deepest shared
        blocks[2].mlp.up_proj.weight[0, 0] += 1e-3
    assert reward.shared_trunk(trunks).layers == 2
    with torch.no_grad():  # block 0 too: nothing shared
        blocks[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert reward.shared_trunk(trunks) is None
    # another dtype: never mixed
    reward.model.double()
    assert reward.shared_trunk(trunks) is None


@pytest.mark.parametrize("overrides", [{"bf16": True}, {"reuse_frozen_trunk": False}])
def test_reward_model_is_offered_no_trunk_under_autocast_or_without_trunk_reuse(tmp_path, monkeypatch, overrides):
    """bf16 autocast computes the trunks in bf16 matrix products, which the float32 reward model's own forward
    would not: no trunk is offered (and none exists without trunk reuse); the iteration scores the plain way."""
    trainer = _rm_trainer(tmp_path, torch.float32, **overrides)
    seen, call = [], type(trainer.reward).__call__

    def recording(self, *args, trunks=None):
        seen.append(trunks)
        return call(self, *args, trunks=trunks)

    monkeypatch.setattr(type(trainer.reward), "__call__", recording)
    trainer.iteration(1)
    assert seen == [None]


def test_iteration_scores_from_the_trunk(tmp_path, monkeypatch):
    trainer = _rm_trainer(tmp_path, torch.float32)
    seen, call = [], type(trainer.reward).__call__

    def recording(self, *args, trunks=None):
        seen.append(self.shared_trunk(trunks))
        return call(self, *args, trunks=trunks)

    monkeypatch.setattr(type(trainer.reward), "__call__", recording)
    trainer.iteration(1)
    assert [t.layers for t in seen] == [3]


def test_rollout_states_train_the_same_weights_over_iterations_float64(tmp_path):
    """Three whole iterations (sampling with the kept states, scores, the no-grad passes, two epochs of AdamW)
    with and without ``reuse_rollout_states``: the same tokens drawn in every iteration, the same metrics and the
    same trained weights (float64, to 1e-10), so that nothing but float rounding separates the two in float32."""
    runs = []
    for flag in (True, False):
        trainer = _trainer(tmp_path, reuse_rollout_states=flag, perturb=False)
        start = trainable(trainer.policy)
        rows = [trainer.iteration(step) for step in (1, 2, 3)]
        assert trainer._rollout_states is None  # each iteration used (or dropped) its states
        runs.append((trainer, rows))
    (on, rows_on), (off, rows_off) = runs
    assert any(not torch.equal(start[n], p) for n, p in trainable(off.policy).items())  # it trained
    for a, b in zip(rows_on, rows_off):
        assert [s["response"] for s in a.samples] == [s["response"] for s in b.samples]
        for key in a.stats:
            if not key.startswith(("time/", "throughput/")):
                assert a.stats[key] == pytest.approx(b.stats[key], rel=1e-10, abs=1e-12), key
    for model in ("policy", "critic"):
        p0, p1 = trainable(getattr(on, model)), trainable(getattr(off, model))
        for n in p0:
            torch.testing.assert_close(p0[n], p1[n], rtol=0, atol=1e-10, msg=n)
