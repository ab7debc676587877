"""Hand-computed checks of rlhfkit.core.kl (float64)."""

import math

import numpy as np
import pytest
import torch

from rlhfkit.core.kl import KL_ESTIMATORS, full_kl_from_logits, kl_k1, kl_loss, kl_penalty

LN2 = math.log(2)
# p = (0.5, 0.2), q = (0.25, 0.4): d = log p - log q = (ln 2, -ln 2)
LOGP = torch.log(torch.tensor([[0.5, 0.2]], dtype=torch.float64))
LOGQ = torch.log(torch.tensor([[0.25, 0.4]], dtype=torch.float64))


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("kl", [LN2, -LN2]),  # d
        ("abs", [LN2, LN2]),  # |d|
        ("mse", [0.5 * LN2**2, 0.5 * LN2**2]),  # ½ d²
        # k3 = exp(-d) - 1 + d: d = ln 2 -> 1/2 - 1 + ln 2; d = -ln 2 -> 2 - 1 - ln 2
        ("k3", [LN2 - 0.5, 1 - LN2]),
    ],
)
def test_sample_estimators_by_hand(estimator, expected):
    out = kl_penalty(LOGP, LOGQ, estimator)
    assert torch.allclose(out, torch.tensor([expected], dtype=torch.float64), rtol=0, atol=1e-15)


def test_k1_is_the_log_ratio_by_hand():
    # log 0.5 - log 0.25 = ln 2; log 0.2 - log 0.4 = -ln 2 (negative per token: k1 is a signed estimate)
    assert torch.allclose(kl_k1(LOGP, LOGQ), torch.tensor([[LN2, -LN2]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_full_kl_by_hand():
    # p = softmax(log(1,2,3)) = (1/6, 1/3, 1/2), q uniform (1/3):
    # KL = 1/6 ln(1/2) + 1/3 ln 1 + 1/2 ln(3/2)
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64))
    ref_logits = torch.zeros(1, 1, 3, dtype=torch.float64)
    dummy = torch.zeros(1, 1, dtype=torch.float64)
    out = kl_penalty(dummy, dummy, "full", logits=logits, ref_logits=ref_logits)
    assert out.item() == pytest.approx(-LN2 / 6 + math.log(1.5) / 2, abs=1e-15)


def test_full_kl_matches_independent_numpy_with_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 2
    ref_logits = torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 2
    for temperature in (1.0, 0.6):
        a = logits.numpy() / temperature
        b = ref_logits.numpy() / temperature
        p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
        q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
        expected = (p * np.log(p / q)).sum(-1)
        dummy = torch.zeros(3, 4, dtype=torch.float64)
        out = kl_penalty(dummy, dummy, "full", logits=logits, ref_logits=ref_logits, temperature=temperature)
        assert np.allclose(out.numpy(), expected, rtol=0, atol=1e-13)
        assert torch.allclose(full_kl_from_logits(logits, ref_logits, temperature, chunk_rows=1), out, atol=1e-15)


def test_k3_is_nonnegative_and_all_estimators_vanish_when_p_equals_q():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 5
    logq = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 5
    assert (kl_penalty(logp, logq, "k3") >= 0).all()
    logits = torch.randn(6, 5, 9, generator=g, dtype=torch.float64)
    for estimator in KL_ESTIMATORS:
        out = kl_penalty(logp, logp, estimator, logits=logits, ref_logits=logits)
        assert torch.allclose(out, torch.zeros_like(out), rtol=0, atol=1e-15), estimator


def test_errors():
    with pytest.raises(ValueError, match="kl, abs, mse, k3, full"):
        kl_penalty(LOGP, LOGQ, "k2")
    with pytest.raises(ValueError, match="logits"):
        kl_penalty(LOGP, LOGQ, "full")


def test_kl_loss_k3_by_hand_with_gradient():
    # d = logp - ref_logp: row 0 (ln 2, -ln 2), row 1 (0, padding holding nan)
    # k3 = exp(-d) - 1 + d: ln 2 - 1/2, 1 - ln 2, 0 -> token mean over 3 tokens: (ln 2 - 1/2 + 1 - ln 2 + 0)/3 = 1/6
    # d k3 / d logp = 1 - exp(-d): 1 - 1/2 = 1/2, 1 - 2 = -1, 0 -> divided by 3 tokens
    logp = torch.cat([LOGP, torch.tensor([[-1.0, float("nan")]], dtype=torch.float64)]).requires_grad_(True)
    ref = torch.cat([LOGQ, torch.tensor([[-1.0, float("nan")]], dtype=torch.float64)])
    mask = torch.tensor([[True, True], [True, False]])
    loss = kl_loss(logp, ref, mask)
    assert loss.item() == pytest.approx(1 / 6, abs=1e-15)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.5 / 3, -1 / 3], [0.0, 0.0]], dtype=torch.float64),
                          rtol=0, atol=1e-15)


def test_kl_loss_aggregations_and_estimators_by_hand():
    # per-token k3 as above: row 0 (ln 2 - 1/2, 1 - ln 2) sum 1/2, row 1 (0) sum 0
    #   seq_mean_token_mean: (1/2 / 2 + 0 / 1) / 2 sequences = 1/8
    #   seq_mean_token_sum_norm, max_length 4: (1/2 + 0) / (2 · 4) = 1/16
    logp = torch.cat([LOGP, torch.tensor([[-1.0, 0.0]], dtype=torch.float64)])
    ref = torch.cat([LOGQ, torch.tensor([[-1.0, 0.0]], dtype=torch.float64)])
    mask = torch.tensor([[True, True], [True, False]])
    assert kl_loss(logp, ref, mask, aggregation="seq_mean_token_mean").item() == pytest.approx(1 / 8, abs=1e-15)
    out = kl_loss(logp, ref, mask, aggregation="seq_mean_token_sum_norm", max_length=4)
    assert out.item() == pytest.approx(1 / 16, abs=1e-15)
    # the other sample estimators: k1 (ln 2 - ln 2 + 0)/3 = 0; k2 ½(ln² 2 + ln² 2 + 0)/3 = ln² 2 / 3
    assert kl_loss(logp, ref, mask, estimator="kl").item() == pytest.approx(0.0, abs=1e-15)
    assert kl_loss(logp, ref, mask, estimator="mse").item() == pytest.approx(LN2**2 / 3, abs=1e-15)
    with pytest.raises(ValueError, match="kl, abs, mse, k3"):
        kl_loss(logp, ref, mask, estimator="full")
