"""Hand-computed checks of rlhfkit.core.logprobs."""

import math

import pytest
import torch
from tolerances import assert_within, logprob_tolerance

from rlhfkit.core.logprobs import entropy_from_logits, logprobs_from_logits

# logits log(1, 2, 3) give p = (1/6, 2/6, 3/6)
LOGITS = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]], dtype=torch.float64))


def test_logprobs_hand_values():
    tokens = torch.tensor([[2, 0]])
    # row 0: p(token 2) = 3/6; row 1 uniform: p = 1/3
    expected = torch.tensor([[math.log(0.5), math.log(1 / 3)]], dtype=torch.float64)
    assert torch.allclose(logprobs_from_logits(LOGITS, tokens), expected, rtol=0, atol=1e-15)


def test_logprobs_temperature():
    # logits / 2 = log sqrt(1, 2, 3): p(token 2) = sqrt 3 / (1 + sqrt 2 + sqrt 3)
    tokens = torch.tensor([[2, 1]])
    p = math.sqrt(3) / (1 + math.sqrt(2) + math.sqrt(3))
    out = logprobs_from_logits(LOGITS, tokens, temperature=2.0)
    assert out[0, 0].item() == pytest.approx(math.log(p), abs=1e-15)
    assert out[0, 1].item() == pytest.approx(math.log(1 / 3), abs=1e-15)


def test_logprobs_bf16_are_computed_in_float32_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 11, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 11, (5, 4), generator=g)
    reference = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    for rows in (1, 2, 5, 100):
        out = logprobs_from_logits(logits, tokens, temperature=0.7, chunk_rows=rows)
        assert out.dtype == torch.float64
        assert torch.allclose(out, reference, rtol=0, atol=1e-14)
    low = logits.to(torch.bfloat16)
    out = logprobs_from_logits(low, tokens, temperature=0.7, chunk_rows=2)
    assert out.dtype == torch.float32
    up = low.double()
    ref32 = torch.log_softmax(up / 0.7, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # one float32 log-softmax (vs float64) of exact logits: its own rounding over the 11 logits
    assert_within(out, ref32, logprob_tolerance(up.abs(), ref32, 0.7, 0), "float32 log-probs")


def test_logprobs_gradient_flows():
    logits = LOGITS.clone().requires_grad_(True)
    logprobs_from_logits(logits, torch.tensor([[2, 0]])).sum().backward()
    # d log p_y / d z_v = 1[v = y] - p_v; row 0: (0 - 1/6, 0 - 2/6, 1 - 3/6)
    assert torch.allclose(logits.grad[0, 0], torch.tensor([-1 / 6, -1 / 3, 0.5], dtype=torch.float64), atol=1e-15)


def test_entropy_hand_values_and_temperature():
    # H(1/6, 1/3, 1/2) = (1/6) ln 6 + (1/3) ln 3 + (1/2) ln 2; uniform over 3: ln 3
    h = entropy_from_logits(LOGITS)
    assert h[0, 0].item() == pytest.approx(math.log(6) / 6 + math.log(3) / 3 + math.log(2) / 2, abs=1e-15)
    assert h[0, 1].item() == pytest.approx(math.log(3), abs=1e-15)
    # temperature 2: p ∝ (1, sqrt 2, sqrt 3)
    w = torch.tensor([1, math.sqrt(2), math.sqrt(3)], dtype=torch.float64)
    p = w / w.sum()
    expected = -(p * p.log()).sum().item()
    assert entropy_from_logits(LOGITS, temperature=2.0)[0, 0].item() == pytest.approx(expected, abs=1e-15)


def test_entropy_with_minus_inf_logits_is_finite_with_finite_gradient():
    # one vocabulary entry masked (-inf): H(1/2, 1/2, 0) = ln 2
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], dtype=torch.float64, requires_grad=True)
    h = entropy_from_logits(logits)
    assert h.item() == pytest.approx(math.log(2), abs=1e-15)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(LOGITS, torch.tensor([[0, 0]]), temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(LOGITS, temperature=-1.0)
