"""Reward-model losses by hand (float64)."""

import math

import pytest
import torch

from rlhfkit.core.losses import (
    mse_regression,
    multi_objective_regression,
    pairwise_logexp,
    pairwise_logsigmoid,
    pointwise_bce,
    pointwise_ce2,
    reward_centering,
    token_level_pairwise,
)
from rlhfkit.core.masks import first_difference_index


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def sp(x):
    """softplus(x) = log(1 + e^x) = -log σ(-x)."""
    return math.log1p(math.exp(x))


def test_pairwise_both_signs():
    # r_c - r_r = 1 (right order): -log σ(1) = log(1 + e^-1); = -1 (wrong order): log(1 + e^1)
    assert pairwise_logsigmoid(f64([2.0]), f64([1.0])).item() == pytest.approx(sp(-1.0), abs=1e-15)
    assert pairwise_logsigmoid(f64([0.0]), f64([1.0])).item() == pytest.approx(sp(1.0), abs=1e-15)
    # batch mean
    both = pairwise_logsigmoid(f64([2.0, 0.0]), f64([1.0, 1.0])).item()
    assert both == pytest.approx((sp(-1.0) + sp(1.0)) / 2, abs=1e-15)
    assert pairwise_logexp(f64([2.0, 0.0]), f64([1.0, 1.0])).item() == pytest.approx(both, abs=1e-15)


def test_margin_shifts_the_difference():
    # differences (1, -1) minus margin 0.5 -> (0.5, -1.5): mean of log(1 + e^-0.5) and log(1 + e^1.5)
    loss = pairwise_logsigmoid(f64([2.0, 0.0]), f64([1.0, 1.0]), margin=f64([0.5, 0.5]))
    assert loss.item() == pytest.approx((sp(-0.5) + sp(1.5)) / 2, abs=1e-15)
    # a margin m on (c, r) equals no margin on (c - m, r)
    c, r, m = f64([0.3, -2.0, 4.0]), f64([1.0, 0.5, -1.0]), f64([0.2, 1.0, 3.0])
    assert pairwise_logsigmoid(c, r, m).item() == pytest.approx(pairwise_logsigmoid(c - m, r).item(), abs=1e-15)


def test_logsigmoid_equals_logexp_including_large_differences():
    g = torch.Generator().manual_seed(7)
    c = torch.randn(50, generator=g, dtype=torch.float64) * 30
    r = torch.randn(50, generator=g, dtype=torch.float64) * 30
    a, b = pairwise_logsigmoid(c, r), pairwise_logexp(c, r)
    assert torch.isfinite(a) and torch.allclose(a, b, rtol=0, atol=1e-13)
    # and the same gradient: d/dc = -σ(r - c) / B
    cc = c.clone().requires_grad_(True)
    pairwise_logexp(cc, r).backward()
    assert torch.allclose(cc.grad, -torch.sigmoid(r - c) / 50, rtol=0, atol=1e-15)
    # extreme: difference -800 would overflow a naive log(1 + exp(800)); the loss is 800
    assert pairwise_logexp(f64([0.0]), f64([800.0])).item() == pytest.approx(800.0, abs=1e-12)


def test_token_level_pairwise_unequal_lengths():
    nan = float("nan")  # padding is never read: nan there would poison the result
    # pair 0: chosen length 4, rejected length 2, first difference at 1, end = max(4, 2) = 4
    #   t = 1, 2, 3: s_c = (0.2, 0.5, 0.9); s_r = (0.3, 0.3, 0.3) (rejected's last real score past its end)
    #   diffs (-0.1, 0.2, 0.6): loss0 = [log(1 + e^0.1) + log(1 + e^-0.2) + log(1 + e^-0.6)] / 3
    # pair 1: chosen length 2, rejected length 3, first difference at 1, end = 3
    #   t = 1, 2: s_c = (2.0, 2.0) (chosen's last real score), s_r = (0.5, -1.0)
    #   diffs (1.5, 3.0): loss1 = [log(1 + e^-1.5) + log(1 + e^-3)] / 2
    sc = f64([[0.1, 0.2, 0.5, 0.9, nan], [1.0, 2.0, nan, nan, nan]])
    mc = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    sr = f64([[0.1, 0.3, nan], [1.0, 0.5, -1.0]])
    mr = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss0 = (sp(0.1) + sp(-0.2) + sp(-0.6)) / 3
    loss1 = (sp(-1.5) + sp(-3.0)) / 2
    sc.requires_grad_(True)
    loss = token_level_pairwise(sc, mc, sr, mr, torch.tensor([1, 1]))
    assert loss.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-15)
    loss.backward()
    assert torch.isfinite(sc.grad).all() and (sc.grad[~mc] == 0).all()
    # first_diff from token ids: a shared prefix of 1 token in both pairs
    ids_c = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 0, 0, 0]])
    ids_r = torch.tensor([[5, 4, 0], [5, 3, 2]])
    assert first_difference_index(ids_c, mc, ids_r, mr).tolist() == [1, 1]


def test_token_level_pairwise_identical_pair_is_an_error():
    s = f64([[0.1, 0.2]])
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="identical"):
        token_level_pairwise(s, m, s, m, torch.tensor([2]))


def test_pointwise_losses_by_hand():
    # bce: z = 0, y = 1: -log σ(0) = ln 2; z = 2, y = 0: -log(1 - σ(2)) = log(1 + e^2)
    assert pointwise_bce(f64([0.0, 2.0]), torch.tensor([1, 0])).item() == pytest.approx(
        (math.log(2) + sp(2.0)) / 2, abs=1e-15
    )
    # ce2: (0, 2) label 1: log(1 + e^-2); (1, 1) label 0: ln 2; (3, 0) label 0: log(1 + e^-3)
    logits2 = f64([[0.0, 2.0], [1.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([1, 0, 0])
    ce = pointwise_ce2(logits2, labels).item()
    assert ce == pytest.approx((sp(-2.0) + math.log(2) + sp(-3.0)) / 3, abs=1e-15)
    # equals bce on the logit difference z1 - z0
    assert ce == pytest.approx(pointwise_bce(logits2[:, 1] - logits2[:, 0], labels).item(), abs=1e-15)


def test_regression_losses_by_hand():
    # (1 - 0)² and (2 - 4)²: (1 + 4) / 2
    assert mse_regression(f64([1.0, 2.0]), f64([0.0, 4.0])).item() == 2.5
    # observed: (1-0)², (3-1)², (4-4)²; the unobserved target 9 is skipped: (1 + 4 + 0) / 3
    pred, target = f64([[1.0, 2.0], [3.0, 4.0]]), f64([[0.0, 9.0], [1.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert multi_objective_regression(pred, target, mask).item() == pytest.approx(5 / 3, abs=1e-15)
    with pytest.raises(ValueError, match="no target"):
        multi_objective_regression(pred, target, torch.zeros_like(mask))


def test_reward_centering_by_hand():
    # sums (1.5, -1): squares (2.25, 1), mean 1.625, times coef 0.01
    assert reward_centering(f64([1.0, -2.0]), f64([0.5, 1.0]), 0.01).item() == pytest.approx(0.01625, abs=1e-15)
