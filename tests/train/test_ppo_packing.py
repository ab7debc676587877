"""``packing`` in PPO: padding-free packed micro-batches (the no-grad forwards and the update) give the padded
path's rollout numbers and whole update (float64, to 1e-12: every trainable weight and the statistics) for a
separate critic, a shared critic, a critic-free estimator with several samples per prompt (prompts shared inside
a packed micro-batch) and frozen trunks; the first minibatch's ratio is exactly 1; ``packing=on`` refuses a
policy it cannot pack, ``auto`` runs such a policy padded."""

from __future__ import annotations

import pytest
import torch
from ppo_helpers import (make_config, make_policy_folder, one_thread,  # noqa: F401  (one_thread: autouse fixture)
                         randomize_value_head, trainable)
from tolerances import float64_rms_norm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import rlhfkit.train.ppo_inputs as ppo_inputs
from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.forward import packing_problem
from rlhfkit.train.ppo_trainer import PPOTrainer

VARIANTS = {
    "separate": dict(critic="separate"),
    "separate-trunk": dict(critic="separate", freeze_layers=1, critic_freeze_layers=2),
    "shared": dict(critic="shared", critic_init="auto"),
    "grpo-k2": dict(advantage_estimator="grpo", critic_init="auto", samples_per_prompt=2, rollout_batch_size=4,
                    micro_batch_size=4),
}


@pytest.fixture(autouse=True)
def float64_norms(monkeypatch):
    """LlamaRMSNorm without its float32 cast: a packed micro-batch sums a shared prompt's gradient in another
    order, a 1e-16 difference that the cast would round to float32 size (tests/rollout/test_forward.py)."""
    monkeypatch.setattr(LlamaRMSNorm, "forward", float64_rms_norm)


def _trainer(tmp_path, packing: str, dtype=torch.float64, **overrides) -> PPOTrainer:
    """A 3-block policy in ``dtype``, perturbed away from the reference (a KL that is not 0), SGD optimizers (the
    weight change is the gradient itself); equal arguments give equal trainers."""
    if not (tmp_path / "sft").exists():
        make_policy_folder(tmp_path / "sft", layers=3)
    kw = dict(kl_coef=0.3, micro_batch_size=3, max_new_tokens=8, entropy_coef=0.01, packing=packing)
    trainer = PPOTrainer(make_config(tmp_path, **{**kw, **overrides}))
    if trainer.critic is not None and not trainer.shared_critic:
        randomize_value_head(trainer.critic)
    models = [m for m in (trainer.policy, trainer.reference, trainer.critic) if m is not None]
    for model in models:
        model.to(dtype)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (trainer.policy, trainer.critic):
            for p in (model.parameters() if model is not None else ()):
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    params = [p for m in (trainer.policy, trainer.critic) if m is not None for p in m.parameters() if p.requires_grad]
    trainer.policy_optimizer = torch.optim.SGD(params if trainer.shared_critic else
                                               [p for p in trainer.policy.parameters() if p.requires_grad], lr=0.5)
    if trainer.critic_optimizer is not None:
        trainer.critic_optimizer = torch.optim.SGD([p for p in trainer.critic.parameters() if p.requires_grad],
                                                   lr=0.5)
    return trainer


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_update_equals_the_padded_update_float64(tmp_path, variant):
    """The same rollout through both trainers: the same old/reference log-probs, values and advantages, then a
    whole update (2 epochs × 2 minibatches, micro-batches of 3 or 4): the same statistics and weights."""
    packed, padded = (_trainer(tmp_path, p, **VARIANTS[variant]) for p in ("on", "off"))
    assert packed.update_settings.packing and not padded.update_settings.packing
    rollout, _ = packed.rollout()
    raw = torch.linspace(-1, 1, rollout.query_ids.shape[0])
    a, b = packed.prepare(rollout, raw), padded.prepare(rollout, raw)
    m = a.batch.response_mask
    assert int(m.sum()) < m.numel()  # responses of different lengths: padding for packing to drop
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        x, y = getattr(a.batch, name), getattr(b.batch, name)
        if x is None or y is None:
            assert x is None and y is None and name in ("old_values", "returns")
            continue
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12, msg=name)
    torch.testing.assert_close(a.ref_logprobs, b.ref_logprobs, rtol=0, atol=1e-12)
    assert float(a.shaped.kl[m].abs().max()) > 1e-3
    histories = [packed.update(a), padded.update(b)]
    assert len(histories[0]) == len(histories[1]) == 4
    for h0, h1 in zip(*histories):
        assert h0.keys() == h1.keys()
        for key in h0:
            assert h0[key] == pytest.approx(h1[key], rel=1e-12, abs=1e-14), key
    assert histories[0][0]["policy/ratio_mean"] == 1.0  # the first minibatch: the rollout's own layouts
    assert histories[0][3]["policy/approx_kl"] > 1e-6
    for model in ("policy", "critic"):
        if getattr(packed, model) is None:
            continue
        p0, p1 = trainable(getattr(packed, model)), trainable(getattr(padded, model))
        moved = max(float((p1[n] - w).abs().max()) for n, w in trainable(getattr(
            _trainer(tmp_path / "fresh", "off", **VARIANTS[variant]), model)).items())
        assert moved > 1e-4  # the update moved the weights
        for n in p0:
            torch.testing.assert_close(p0[n], p1[n], rtol=0, atol=1e-12, msg=n)


def test_first_minibatch_has_ratio_exactly_one_when_packed_float32(tmp_path):
    trainer = _trainer(tmp_path, "on", torch.float32, freeze_layers=1, critic_freeze_layers=2)
    result = trainer.iteration(1)
    first = result.minibatch_stats[0]
    assert (first["policy/approx_kl"], first["policy/ratio_mean"], first["policy/ratio_var"]) == (0.0, 1.0, 0.0)
    assert all(s["policy/ratio_mean"] != 1.0 for s in result.minibatch_stats[1:])


def test_packing_on_refuses_a_policy_it_cannot_pack_and_auto_runs_it_padded(tmp_path, monkeypatch):
    load = ppo_inputs.load_causal_lm

    def eager(*args, **kwargs):  # a policy with eager attention (rlhfkit loads SDPA): no per-segment path
        model = load(*args, **kwargs)
        model.config._attn_implementation = "eager"
        return model

    monkeypatch.setattr(ppo_inputs, "load_causal_lm", eager)
    with pytest.raises(RlhfkitError, match="--packing on.*attention implementation is 'eager'"):
        PPOTrainer(make_config(tmp_path, packing="on"))
    trainer = PPOTrainer(make_config(tmp_path, packing="auto", iterations=1))
    assert "eager" in packing_problem(trainer.policy) and trainer.update_settings.packing
    assert trainer.iteration(1).minibatch_stats[0]["policy/ratio_mean"] == 1.0
