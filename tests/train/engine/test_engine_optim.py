"""The one optimizer builder: weight decay on >= 2-D weights only, one learning rate per named module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhfkit.errors import RlhfkitError
from rlhfkit.train.engine.optim import ModuleGroup, build_optimizer, build_scheduler, module_lr


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 3)  # weight (4, 3): decayed
        self.proj = nn.Linear(3, 2)  # weight (2, 3): decayed; bias (2,): not
        self.norm = nn.LayerNorm(2)  # weight (2,), bias (2,): not
        self.frozen = nn.Linear(2, 2)  # requires_grad off: in no group
        self.frozen.requires_grad_(False)


def _ids(params):
    return [id(p) for p in params]


def test_decay_goes_to_matrices_only_and_frozen_parameters_are_left_out():
    toy = Toy()
    opt = build_optimizer([ModuleGroup("policy", toy, 1e-3)], weight_decay=0.1)
    groups = opt.param_groups
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("policy", 1e-3, 0.1), ("policy", 1e-3, 0.0)]
    assert _ids(groups[0]["params"]) == _ids([toy.embed.weight, toy.proj.weight])
    assert _ids(groups[1]["params"]) == _ids([toy.proj.bias, toy.norm.weight, toy.norm.bias])


def test_without_weight_decay_each_module_is_one_group_in_module_order():
    policy, head = Toy(), nn.Linear(3, 1)
    opt = build_optimizer([ModuleGroup("policy", policy, 1e-3), ModuleGroup("critic", head, 5e-3)], 0.0)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [("policy", 1e-3, 0.0),
                                                                                  ("critic", 5e-3, 0.0)]
    trainable = [policy.embed.weight, policy.proj.weight, policy.proj.bias, policy.norm.weight, policy.norm.bias]
    assert _ids(opt.param_groups[0]["params"]) == _ids(trainable)
    assert _ids(opt.param_groups[1]["params"]) == _ids([head.weight, head.bias])


def test_one_step_with_zero_gradients_decays_the_matrices_alone():
    """AdamW with a zero gradient: m = v = 0, so the Adam step is 0 and p <- p · (1 - lr·wd) on decayed weights,
    p unchanged elsewhere (decoupled decay, Loshchilov & Hutter 2019)."""
    torch.manual_seed(0)
    toy = Toy()
    before = {n: p.detach().clone() for n, p in toy.named_parameters()}
    opt = build_optimizer([ModuleGroup("model", toy, 0.5)], weight_decay=0.2)
    for p in toy.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    factor = 1 - 0.5 * 0.2
    for name, p in toy.named_parameters():
        if name in ("embed.weight", "proj.weight"):
            torch.testing.assert_close(p.detach(), before[name] * factor, rtol=2 ** -23, atol=0)
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_a_module_without_trainable_parameters_is_an_error_naming_it():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(RlhfkitError, match="critic .*Linear.* no trainable parameter"):
        build_optimizer([ModuleGroup("critic", frozen, 1e-3)], 0.0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_module_lr_reads_each_module_by_its_parameters(weight_decay):
    """Two modules at different rates under one warm-up schedule (2 warm-up steps of 4): after one step each is
    at half its peak, whatever the number or order of param groups."""
    policy, head = Toy(), nn.Linear(3, 1)
    opt = build_optimizer([ModuleGroup("policy", policy, 1e-3), ModuleGroup("critic", head, 4e-3)], weight_decay)
    scheduler = build_scheduler("constant", opt, warmup_steps=2, total_steps=4)
    assert module_lr(scheduler, policy) == 0.0 and module_lr(scheduler, head) == 0.0
    opt.step()
    scheduler.step()
    assert module_lr(scheduler, policy) == pytest.approx(0.5e-3, rel=1e-15)
    assert module_lr(scheduler, head) == pytest.approx(2e-3, rel=1e-15)
    with pytest.raises(KeyError):
        module_lr(scheduler, nn.Linear(1, 1))


@pytest.mark.parametrize(("name", "lrs"), [("linear", [0.0, 1.0, 2 / 3, 1 / 3]), ("constant", [0.0, 1.0, 1.0, 1.0]),
                                           ("cosine", [0.0, 1.0, 0.75, 0.25])])
def test_the_schedule_names(name, lrs):
    """1 warm-up step of 4: linear decays to 0 over the 3 left (1, 2/3, 1/3), cosine by (1 + cos(π·k/3)) / 2."""
    opt = build_optimizer([ModuleGroup("m", nn.Linear(2, 2), 1.0)], 0.0)
    scheduler = build_scheduler(name, opt, warmup_steps=1, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    assert seen == pytest.approx(lrs, abs=1e-15)
