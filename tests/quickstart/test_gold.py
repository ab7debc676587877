"""Tests of the quickstart gold judge, the Bradley–Terry labeler and the built-in prompts."""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources

import numpy as np
import pytest
import torch
from tolerances import assert_close_f32

from rlhfkit.errors import RlhfkitError
from rlhfkit.quickstart.gold import (
    GoldJudge,
    bradley_terry_prob,
    expected_agreement,
    label_pairs,
    load_builtin_prompts,
    noiseless_agreement,
)

SIGMOID_2 = 1.0 / (1.0 + math.exp(-2.0))  # σ(2) = 0.8807970779778823


@pytest.fixture(scope="module")
def judge() -> GoldJudge:
    return GoldJudge()


def test_gold_sign_and_range(judge: GoldJudge) -> None:
    positive = ["What a wonderful, sunny morning; I love it!", "The new puppy is adorable and so much fun."]
    negative = ["This is a terrible, miserable day and I hate it.", "The trip was awful and everyone was angry."]
    neutral = ["The table is in the kitchen.", ""]
    pos, neg, neu = judge.score(positive), judge.score(negative), judge.score(neutral)
    assert all(s > 0.5 for s in pos), pos
    assert all(s < -0.5 for s in neg), neg
    assert neu == [0.0, 0.0]
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in pos + neg)


def test_gold_rejects_single_string(judge: GoldJudge) -> None:
    with pytest.raises(TypeError):
        judge.score("one text")


def test_bradley_terry_by_hand() -> None:
    # g_a - g_b = 0.5, T = 0.25 -> σ(0.5 / 0.25) = σ(2) = 1 / (1 + e^-2)
    assert bradley_terry_prob(0.7, 0.2, 0.25) == pytest.approx(SIGMOID_2, rel=0, abs=1e-15)
    # the reverse order gives 1 - σ(2); equal scores give exactly 1/2
    assert bradley_terry_prob(0.2, 0.7, 0.25) == pytest.approx(1.0 - SIGMOID_2, rel=0, abs=1e-15)
    assert bradley_terry_prob(-0.3, -0.3, 0.1) == 0.5
    # vector form; g_a - g_b = -1, T = 0.5 -> σ(-2); g_a - g_b = 0.1, T = 0.5 -> σ(0.2)
    got = bradley_terry_prob([0.0, 0.6], [1.0, 0.5], 0.5)
    want = np.array([1.0 / (1.0 + math.exp(2.0)), 1.0 / (1.0 + math.exp(-0.2))])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    # a huge margin saturates without overflow
    assert bradley_terry_prob(1.0, -1.0, 1e-4) == 1.0
    assert bradley_terry_prob(-1.0, 1.0, 1e-4) == 0.0


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_bradley_terry_rejects_bad_temperature(temperature: float) -> None:
    with pytest.raises(RlhfkitError, match="temperature"):
        bradley_terry_prob(0.1, 0.2, temperature)


def test_label_pairs_seeded_and_reproducible() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-1, 1, 200), rng.uniform(-1, 1, 200)
    first = label_pairs(a, b, 0.3, seed=123)
    assert first == label_pairs(a, b, 0.3, seed=123)
    assert first == label_pairs(a, b, 0.3, seed=np.random.default_rng(123))
    assert first != label_pairs(a, b, 0.3, seed=124)
    assert all(isinstance(x, bool) for x in first) and len(first) == 200


def test_label_pairs_frequency_matches_bt_probability() -> None:
    # Every pair has g_a - g_b = 0.5 and T = 0.25, so each label is True with p = σ(2).
    n = 20_000
    labels = label_pairs(np.full(n, 0.5), np.zeros(n), 0.25, seed=7)
    std = math.sqrt(SIGMOID_2 * (1 - SIGMOID_2) / n)  # binomial std of the fraction, ≈ 0.0023
    assert abs(np.mean(labels) - SIGMOID_2) < 4 * std
    # 1 - σ(2) (labels reversed) or 1.0 (noiseless) would be far outside that band
    assert abs(SIGMOID_2 - 1.0) > 40 * std


def test_label_agreement_matches_mean_bt_probability() -> None:
    rng = np.random.default_rng(2024)
    n = 10_000
    a, b = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    temperature = 0.3
    labels = label_pairs(a, b, temperature, seed=11)
    p_agree = bradley_terry_prob(np.abs(a - b), np.zeros(n), temperature)  # σ(|Δ|/T) per pair
    expected = float(np.mean(p_agree))
    assert expected == pytest.approx(expected_agreement(a, b, temperature), rel=0, abs=1e-12)
    # agreement is a mean of independent Bernoulli(p_i): std = sqrt(Σ p_i (1 - p_i)) / n
    std = math.sqrt(float(np.sum(p_agree * (1 - p_agree)))) / n
    got = noiseless_agreement(a, b, labels)
    assert abs(got - expected) < 4 * std, (got, expected, std)
    # the noise is real: the expected agreement is far from both 1 (noiseless) and 1/2 (coin flips)
    assert 1.0 - expected > 20 * std and expected - 0.5 > 20 * std


def test_noiseless_agreement_by_hand_with_ties() -> None:
    a = [0.5, 0.0, -0.2, 0.3]
    b = [0.1, 0.0, 0.4, 0.3]
    # pairs 2 and 4 are ties and are excluded; pair 1: order A, label A (agree); pair 3: order B, label A
    assert noiseless_agreement(a, b, [True, True, True, False]) == 0.5
    assert noiseless_agreement(a, b, [True, False, False, True]) == 1.0
    assert math.isnan(noiseless_agreement([0.1, 0.2], [0.1, 0.2], [True, False]))
    # expected agreement over the untied pairs: σ(0.4/0.2) = σ(2) and σ(0.6/0.2) = σ(3)
    want = (SIGMOID_2 + 1.0 / (1.0 + math.exp(-3.0))) / 2
    assert expected_agreement(a, b, 0.2) == pytest.approx(want, rel=0, abs=1e-15)
    with pytest.raises(ValueError):
        noiseless_agreement(a, b, [True])


def _raw_prompt_rows() -> list[dict]:
    text = resources.files("rlhfkit.quickstart").joinpath("prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]  # fails on any malformed or blank line


def test_prompts_file_contents() -> None:
    rows = _raw_prompt_rows()
    assert len(rows) >= 320
    assert all(set(r) == {"prompt", "split"} and r["split"] in ("train", "heldout") for r in rows)
    prompts = [r["prompt"] for r in rows]
    normalised = {" ".join(p.lower().split()).rstrip(".?!") for p in prompts}
    assert len(normalised) == len(prompts)
    assert all(5 <= len(p.split()) <= 20 for p in prompts)
    heldout = [r["prompt"] for r in rows if r["split"] == "heldout"]
    assert 0.2 <= len(heldout) / len(rows) <= 0.3
    # the split is the documented rule: held out = the 22% of prompts with the smallest SHA-256 digest
    ranked = sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    assert set(heldout) == set(ranked[: round(0.22 * len(prompts))])


def test_load_builtin_prompts_deterministic() -> None:
    train, heldout = load_builtin_prompts()
    rows = _raw_prompt_rows()
    assert train == [r["prompt"] for r in rows if r["split"] == "train"]
    assert heldout == [r["prompt"] for r in rows if r["split"] == "heldout"]
    assert not set(train) & set(heldout)
    assert load_builtin_prompts() == (train, heldout)


def test_gold_reward_is_a_reward_source_scoring_responses_only():
    from rlhfkit.quickstart.gold import GoldJudge, gold_reward
    from rlhfkit.rollout.scoring import FunctionReward

    responses = ["What a wonderful, happy day!", "This is awful and sad."]
    expected = GoldJudge().score(responses)
    assert gold_reward(["ignored", "prompts"], responses) == expected
    source = FunctionReward("rlhfkit.quickstart.gold:gold_reward")
    scores = source(["p", "q"], responses, None, None, None, None)
    # a reward source returns float32: each score rounded to nearest once (u = eps / 2 of its size)
    want = torch.tensor(expected, dtype=torch.float64)
    assert_close_f32(scores, want, want.abs(), 0.5, "gold")
    assert expected[0] > 0.5 > -0.5 > expected[1]
