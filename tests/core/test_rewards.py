"""Hand-computed checks of rlhfkit.core.rewards (float64)."""

import json
import math

import numpy as np
import pytest
import torch

from rlhfkit.core.kl import full_kl_from_logits
from rlhfkit.core.rewards import (
    RunningMoments,
    clip_scores,
    missing_stop_penalty,
    shape_rewards,
    whiten_scores,
)


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def test_whiten_scores_unbiased_std():
    # (1, 2, 3, 6): mean 3, squared deviations 4 + 1 + 0 + 9 = 14, unbiased var 14/3
    s = math.sqrt(14 / 3)
    expected = f64([-2 / s, -1 / s, 0.0, 3 / s])
    assert torch.allclose(whiten_scores(f64([1.0, 2.0, 3.0, 6.0]), eps=0.0), expected, rtol=0, atol=1e-15)
    # eps is added to the std: (6 - 3) / (s + 1)
    assert whiten_scores(f64([1.0, 2.0, 3.0, 6.0]), eps=1.0)[3].item() == pytest.approx(3 / (s + 1), abs=1e-15)
    with pytest.raises(ValueError):
        whiten_scores(f64([1.0]))


def test_clip_scores():
    scores = f64([-3.0, 0.5, 2.0])
    assert clip_scores(scores, 1.0).tolist() == [-1.0, 0.5, 1.0]
    assert clip_scores(scores, None) is scores
    with pytest.raises(ValueError):
        clip_scores(scores, 0.0)


def test_running_moments_hand_merge():
    rm = RunningMoments()
    # batch (1, 2): mean 1.5, unbiased std sqrt(0.5)
    assert rm.update(f64([1.0, 2.0])) == pytest.approx((1.5, math.sqrt(0.5)), abs=1e-15)
    assert math.isnan(rm.update(f64([4.0]))[1])  # single-element batch: its own std is undefined
    # Chan merge: δ = 4 - 1.5 = 2.5, n = 3, μ = 1.5 + 2.5/3 = 7/3, M2 = 0.5 + 0 + 2.5² · 2 · 1 / 3 = 14/3
    # var = M2 / 2 = 7/3, the unbiased variance of (1, 2, 4)
    assert rm.count == 3
    assert rm.mean == pytest.approx(7 / 3, abs=1e-15)
    assert rm.var == pytest.approx(7 / 3, abs=1e-14)
    assert rm.std == pytest.approx(math.sqrt(7 / 3), abs=1e-14)
    assert rm.normalize(f64([4.0]), eps=0.0).item() == pytest.approx((4 - 7 / 3) / math.sqrt(7 / 3), abs=1e-14)


def test_running_moments_equal_numpy_over_concatenation_and_state_round_trip():
    rng = np.random.default_rng(3)
    batches = [rng.normal(5.0, 3.0, size=n) for n in (7, 1, 13, 4, 2)]
    rm = RunningMoments()
    for i, batch in enumerate(batches):
        mean_b, std_b = rm.update(torch.from_numpy(batch))
        assert mean_b == pytest.approx(batch.mean(), abs=1e-13)
        if batch.size > 1:
            assert std_b == pytest.approx(batch.std(ddof=1), abs=1e-13)
        if i == 2:  # save after three batches, then continue in a fresh object
            state = json.loads(json.dumps(rm.state_dict()))
    allv = np.concatenate(batches)
    assert rm.count == allv.size
    assert rm.mean == pytest.approx(allv.mean(), abs=1e-13)
    assert rm.var == pytest.approx(allv.var(ddof=1), abs=1e-12)
    resumed = RunningMoments()
    resumed.load_state_dict(state)
    for batch in batches[3:]:
        resumed.update(torch.from_numpy(batch))
    assert resumed.state_dict() == pytest.approx(rm.state_dict(), abs=1e-12)


def test_running_moments_errors():
    rm = RunningMoments()
    with pytest.raises(ValueError):
        rm.update(f64([]))
    rm.update(f64([1.0]))
    assert math.isnan(rm.std)
    with pytest.raises(ValueError):
        rm.normalize(f64([1.0]))


def test_missing_stop_penalty():
    scores, stopped = f64([1.0, 2.0, 3.0]), torch.tensor([True, False, True])
    assert missing_stop_penalty(scores, stopped, -1.0, "replace").tolist() == [1.0, -1.0, 3.0]
    assert missing_stop_penalty(scores, stopped, 0.5, "subtract").tolist() == [1.0, 1.5, 3.0]
    assert missing_stop_penalty(scores, stopped, None, "replace") is scores
    with pytest.raises(ValueError, match="replace, subtract"):
        missing_stop_penalty(scores, stopped, 1.0, "add")


def test_shape_rewards_score_on_last_token_and_zero_padding():
    # row 0: 3 response tokens; row 1 stopped early: 1 response token, then padding holding garbage (nan)
    logprobs = f64([[-1.0, -2.0, -0.5], [-0.6, float("nan"), 5.0]])
    ref_logprobs = f64([[-1.1, -1.8, -0.8], [-1.0, 3.0, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    scores = f64([1.0, 2.0])
    out = shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.5)
    # kl = logp - logq = (0.1, -0.2, 0.3) and (0.4, 0, 0) (padding zeroed)
    assert torch.allclose(out.kl, f64([[0.1, -0.2, 0.3], [0.4, 0.0, 0.0]]), rtol=0, atol=1e-15)
    # non_score = -0.5 kl = (-0.05, 0.1, -0.15), (-0.2, 0, 0)
    assert torch.allclose(out.non_score_reward, f64([[-0.05, 0.1, -0.15], [-0.2, 0.0, 0.0]]), rtol=0, atol=1e-15)
    # score on the last response token: row 0 at t=2 (-0.15 + 1), row 1 at t=0 (-0.2 + 2); padding exactly 0
    assert torch.allclose(out.rewards, f64([[-0.05, 0.1, 0.85], [1.8, 0.0, 0.0]]), rtol=0, atol=1e-15)
    assert out.rewards[1, 1:].tolist() == [0.0, 0.0]


def test_shape_rewards_with_other_estimators():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    lp = torch.zeros(2, 3, dtype=torch.float64)
    out = shape_rewards(f64([0.0, 0.0]), lp, lp, mask, 0.1, "full", logits, ref_logits, temperature=0.5)
    kl = torch.where(mask, full_kl_from_logits(logits, ref_logits, 0.5), 0.0)
    assert torch.allclose(out.kl, kl, rtol=0, atol=1e-15)
    assert torch.allclose(out.rewards, -0.1 * kl, rtol=0, atol=1e-15)
    # k3 of d = ln 2 is ln 2 - 1/2, with kl_coef 1 and score 0
    d = f64([[math.log(2)]])
    k3 = shape_rewards(f64([0.0]), d, torch.zeros_like(d), torch.tensor([[True]]), 1.0, "k3")
    assert k3.rewards.item() == pytest.approx(-(math.log(2) - 0.5), abs=1e-15)


def test_shape_rewards_errors():
    lp = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        shape_rewards(f64([1.0, 1.0]), lp, lp, torch.tensor([[True, False], [False, False]]), 0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        shape_rewards(f64([1.0, 1.0]), lp, lp, torch.ones(2, 2, dtype=torch.bool), 0.1, "bogus")
