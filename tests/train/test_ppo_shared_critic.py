"""``critic=shared``: a value head on the policy's trunk. Its values are the head of the policy's last hidden state
at the response-predicting positions (every forward path), the update is micro-batch invariant and lets the value
loss reach the trunk, one gradient clip spans policy and head, the mode learns the rule-reward task, runs from
the CLI (outputs, refusals) and resumes exactly."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from statistics import mean

import pytest
import torch
from ppo_helpers import (PAD, REWARD, assert_same_update, make_config, make_policy_folder,
                         one_thread,  # noqa: F401  (autouse fixture)
                         trainable)
from safetensors.torch import load_file
from test_ppo_update import _synthetic_batch
from transformers import AutoModelForCausalLM

from rlhfkit.cli import main
from rlhfkit.errors import RlhfkitError
from rlhfkit.models.adapters import apply_lora, freeze_lower_layers
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.models.value_head import VALUE_HEAD_FILE, ValueHead, load_value_head
from rlhfkit.rollout import forward
from rlhfkit.rollout.forward import policy_forward, policy_value_forward, trunk_forward
from rlhfkit.train.ppo_trainer import PPOTrainer
from rlhfkit.train.ppo_update import UpdateSettings, _clip_grads, ppo_update
from rlhfkit.utils import read_jsonl

SHARED = dict(critic="shared", critic_init="auto")


def _random_head(head: ValueHead, seed: int = 0) -> ValueHead:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return head


def _hand_batch():
    """3 rows: prompts of 2, 4, 1 tokens (left-padded to 4), responses of 3, 1, 0 tokens (right-padded to 3)."""
    q = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10], [PAD, PAD, PAD, 11]])
    qm = q != PAD
    r = torch.tensor([[12, 13, 14], [15, PAD, PAD], [PAD, PAD, PAD]])
    rm = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    return q, qm, r, rm


@pytest.mark.parametrize("path", ["decoder", "logits_to_keep", "lora", "trunk"])
def test_values_are_the_head_of_the_policys_last_hidden_state_at_the_response_positions(tmp_path, monkeypatch,
                                                                                         path):
    lm = load_causal_lm(make_policy_folder(tmp_path / "sft")).double().eval()
    if path == "lora":  # adapters with non-zero B, so the adapted hidden states differ from the base model's
        lm = apply_lora(lm, r=4, alpha=8)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    if path == "logits_to_keep":  # the path of models with a logit transform: the whole model is called
        monkeypatch.setattr(forward, "_has_logit_transform", lambda model: True)
    head = _random_head(ValueHead.for_model(lm).double())
    q, qm, r, rm = _hand_batch()
    trunk = None
    if path == "trunk":
        freeze_lower_layers(lm, 1)
        trunk = trunk_forward(lm, q, qm, r, rm, layers=1)
    with torch.no_grad():
        out, values = policy_value_forward(lm, head, q, qm, r, rm, temperature=0.7, trunk=trunk)
        plain = policy_forward(lm, q, qm, r, rm, temperature=0.7, trunk=trunk)
        # expected, by hand: the decoder's last hidden state (after its final norm) of [query; response] with
        # positions counting real tokens only, read at position P - 1 + t for response token t
        base = lm.get_base_model() if path == "lora" else lm
        ids, mask = torch.cat([q, r], 1), torch.cat([qm, rm], 1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = base.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions).last_hidden_state
    P, T = q.shape[1], r.shape[1]
    w, b = head.summary.weight[0], head.summary.bias[0]
    expected = torch.zeros(3, T, dtype=torch.float64)
    for row in range(3):
        for t in range(T):
            if rm[row, t]:
                expected[row, t] = hidden[row, P - 1 + t] @ w + b
    assert values.dtype == torch.float64
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-12)
    assert (values[rm] != 0).all() and (values[~rm] == 0).all()
    # the log-probs are policy_forward's, bit for bit (the same computation; the head only reads)
    assert torch.equal(out.logprobs, plain.logprobs)


def test_a_new_value_head_gives_exactly_zero_values(tmp_path):
    lm = load_causal_lm(make_policy_folder(tmp_path / "sft")).eval()
    head = ValueHead.for_model(lm)
    assert head.summary.weight.shape == (1, 32) and head.summary.bias.shape == (1,)
    with torch.no_grad():
        _, values = policy_value_forward(lm, head, *_hand_batch())
    assert values.dtype == torch.float32 and torch.equal(values, torch.zeros(3, 3))


def test_the_value_head_saves_and_loads(tmp_path):
    head = _random_head(ValueHead(8).double())
    head.save(tmp_path / VALUE_HEAD_FILE)
    loaded = load_value_head(tmp_path / VALUE_HEAD_FILE, dtype=torch.float64)
    assert torch.equal(loaded.summary.weight, head.summary.weight)
    assert torch.equal(loaded.summary.bias, head.summary.bias)
    with pytest.raises(RlhfkitError, match="no value head file"):
        load_value_head(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------ the update
def test_joint_clip_hand_computed():
    # policy gradient (3, 0), head gradient (4): joint norm 5, the head's share 4; clipped to 1: every gradient
    # scaled by 1 / (5 + 1e-6) (torch's clip_grad_norm_)
    p, v = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    p.grad, v.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert _clip_grads([p], [v], 1.0, joint=True) == (pytest.approx(5.0, rel=1e-7), pytest.approx(4.0, rel=1e-7))
    scale = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(p.grad, torch.tensor([3.0 * scale, 0.0]))
    torch.testing.assert_close(v.grad, torch.tensor([4.0 * scale]))
    # separate models: each clipped on its own norm
    p.grad, v.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert _clip_grads([p], [v], 1.0, joint=False) == (pytest.approx(3.0, rel=1e-7), pytest.approx(4.0, rel=1e-7))
    torch.testing.assert_close(p.grad, torch.tensor([3.0 / (3.0 + 1e-6), 0.0]))
    torch.testing.assert_close(v.grad, torch.tensor([4.0 / (4.0 + 1e-6)]))


def _shared_update(trainer, batch, micro_batch_size, rows, vf_coef=0.1, max_grad_norm=0.5):
    policy = copy.deepcopy(trainer.policy).double()
    head = copy.deepcopy(trainer.critic).double()
    # one SGD over both (the head at another learning rate, as critic_learning_rate gives it): the new weights
    # are the gradient itself
    opt = torch.optim.SGD([{"params": [p for p in policy.parameters() if p.requires_grad], "lr": 0.5},
                           {"params": list(head.parameters()), "lr": 0.25}])
    settings = UpdateSettings(clip_range=0.2, clip_range_value=0.2, vf_coef=vf_coef, entropy_coef=0.01,
                              temperature=trainer.cfg.temperature, micro_batch_size=micro_batch_size,
                              max_grad_norm=max_grad_norm)
    history = ppo_update(policy, head, opt, None, batch, [[rows]], settings, trainer.dist)
    return trainable(policy), trainable(head), history[0]


def test_shared_micro_batches_accumulate_to_the_same_update_and_the_value_loss_trains_the_trunk(tmp_path):
    trainer = PPOTrainer(make_config(tmp_path, **SHARED))
    assert trainer.critic_optimizer is None and isinstance(trainer.critic, ValueHead)
    torch.manual_seed(0)
    with torch.no_grad():  # a zero head would send the value loss no gradient into the trunk
        trainer.critic.summary.weight.normal_(0, 1 / math.sqrt(33))
    batch = _synthetic_batch(trainer)
    rows = [0, 1, 2, 3]
    before_p = trainable(copy.deepcopy(trainer.policy).double())
    before_h = trainable(copy.deepcopy(trainer.critic).double())
    p4, h4, s4 = _shared_update(trainer, batch, 4, rows)
    assert max((p4[n] - before_p[n]).abs().max().item() for n in p4) > 1e-4
    assert max((h4[n] - before_h[n]).abs().max().item() for n in h4) > 1e-4
    assert s4["policy/grad_norm"] > 0.5  # the joint clip binds (so its invariance is tested too)
    assert 0 < s4["val/grad_norm"] < s4["policy/grad_norm"]  # the head's share of the joint norm
    assert 0 < s4["policy/clipfrac"] < 1
    for micro in (2, 1, 3):
        p, h, s = _shared_update(trainer, batch, micro, rows)
        assert_same_update((p, h), s, (p4, h4), s4)
    # the value loss's gradient flows into the policy's trunk: without it (vf_coef 0, no clipping) the trunk's
    # update differs, by far more than float64 rounding; with it, the head's update is the value loss's alone
    p0, h0, _ = _shared_update(trainer, batch, 4, rows, vf_coef=0.0, max_grad_norm=None)
    pv, hv, _ = _shared_update(trainer, batch, 4, rows, vf_coef=0.1, max_grad_norm=None)
    trunk = [n for n in p0 if "layers.0." in n]
    assert trunk and max((pv[n] - p0[n]).abs().max().item() for n in trunk) > 1e-6
    assert all(torch.equal(h0[n], before_h[n]) for n in h0)  # no value loss: the head gets no gradient


# ------------------------------------------------------------------------------------ the trainer
def test_shared_critic_builds_no_critic_model_and_the_first_minibatch_is_exact(tmp_path):
    trainer = PPOTrainer(make_config(tmp_path, **SHARED, micro_batch_size=3))
    assert isinstance(trainer.critic, ValueHead)
    groups = trainer.policy_optimizer.param_groups
    assert len(groups) == 2 and groups[1]["params"] == list(trainer.critic.parameters())
    result = trainer.iteration(1)
    first = result.minibatch_stats[0]
    assert first["policy/approx_kl"] == 0.0 and first["policy/ratio_mean"] == 1.0
    assert first["val/clipfrac"] == 0.0
    # the old values came from the zero head: exactly 0, so explained variance is 0 and the value mean too
    assert result.stats["val/mean"] == 0.0
    # the head moved (it trains on the value loss) and the second minibatch's values are no longer 0
    assert trainer.critic.summary.bias.abs().item() > 0
    assert result.minibatch_stats[1]["val/value_mean"] != 0.0
    assert result.stats["train/critic_lr"] == trainer.cfg.value_learning_rate


@pytest.mark.parametrize("overrides,field", [({"critic_init": "policy"}, "critic_init"),
                                             ({"critic_init": "reward"}, "critic_init"),
                                             ({"critic_init": "auto", "critic_freeze_layers": 1},
                                              "critic_freeze_layers")])
def test_shared_critic_refuses_the_knobs_of_a_separate_critic(tmp_path, overrides, field):
    with pytest.raises(RlhfkitError, match=f"{field}=.*needs critic=separate"):
        make_config(tmp_path, critic="shared", **overrides)
    with pytest.raises(RlhfkitError, match="critic"):
        make_config(tmp_path, critic="both")


TASK = dict(iterations=25, rollout_batch_size=16, max_new_tokens=8, ppo_epochs=4, num_minibatches=2,
            micro_batch_size=4, learning_rate=1e-3, sample_table_every=0, stop_token_ids=[], seed=3, kl_coef=0.05)


def test_shared_critic_raises_a_rule_reward_far_beyond_its_start(tmp_path):
    """test_ppo_learning's task (target word in an 8-token response, optimum 8; a random policy scores ~0.25) with
    the value head on the policy's trunk."""
    results = PPOTrainer(make_config(tmp_path, **SHARED, **TASK)).train()
    scores = [r.stats["objective/scores"] for r in results]
    start, end = mean(scores[:3]), mean(scores[-3:])
    # the starting batch mean of 16 responses has a standard deviation of about 0.18
    assert start < 1.0
    assert end > 5.0, scores
    assert end > start + 4.0
    # the value head learns the returns' level (from 0 at the start; the value clip of 0.2 lets the old values rise
    # by at most ~0.2-0.4 per iteration): seed 3 ends at 6.3 against returns of 6.8, a zero head would stay at 0
    values, returns = (mean(r.stats[k] for r in results[-3:]) for k in ("val/mean", "returns/mean"))
    assert results[0].stats["val/mean"] == 0.0
    assert values > 0.8 * returns > 4.0, [(r.stats["val/mean"], r.stats["returns/mean"]) for r in results]


# ------------------------------------------------------------------------------------ CLI, outputs, resume
def test_cli_shared_critic_end_to_end(tmp_path, capsys):
    cfg = make_config(tmp_path)
    out = tmp_path / "run"
    args = ["ppo", "--policy", cfg.policy, "--reward_model", REWARD, "--prompts", cfg.prompts, "--output", str(out),
            "--rollout_batch_size", "8", "--max_new_tokens", "5", "--temperature", "1.0", "--num_minibatches", "2",
            "--micro_batch_size", "2", "--learning_rate", "1e-3", "--iterations", "2", "--save_every", "1"]
    assert main([*args, "--critic", "shared", "--critic_init", "policy"]) == 2
    err = capsys.readouterr().err
    assert "critic_init='policy' needs critic=separate" in err and "Traceback" not in err
    assert not out.exists()

    assert main([*args, "--critic", "shared"]) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert not (out / "critic").exists()  # no critic model is saved
    ckpt = out / "checkpoints" / "step-00000002"
    assert set(load_file(str(ckpt / "critic.safetensors"))) == {"summary.weight", "summary.bias"}
    # OUTPUT/policy is a plain causal LM; the value head beside it reads its last hidden state
    policy = AutoModelForCausalLM.from_pretrained(out / "policy").eval()
    head = load_value_head(out / VALUE_HEAD_FILE)
    assert head.summary.bias.abs().item() > 0  # it trained
    with torch.no_grad():
        _, values = policy_value_forward(policy, head, *_hand_batch())
    assert torch.isfinite(values).all() and (values[_hand_batch()[3]] != 0).all()
    # critic is not a resumable change
    assert main([*args, "--critic", "separate", "--critic_init", "policy", "--resume", "--iterations", "3"]) == 2
    assert "critic: 'shared' -> 'separate'" in capsys.readouterr().err
    assert main([*args, "--critic", "shared", "--resume", "--iterations", "3"]) == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_overwrite_removes_a_previous_value_head(tmp_path):
    PPOTrainer(make_config(tmp_path, **SHARED, iterations=1)).train()
    run = Path(make_config(tmp_path).output)
    assert (run / VALUE_HEAD_FILE).is_file()
    with pytest.raises(RlhfkitError, match="already holds a run"):
        PPOTrainer(make_config(tmp_path, iterations=1)).train()
    PPOTrainer(make_config(tmp_path, iterations=1, overwrite=True)).train()
    assert not (run / VALUE_HEAD_FILE).exists() and (run / "critic" / "config.json").is_file()
