"""Hand-computed checks of rlhfkit.core.logprobs."""

import math

import pytest
import torch
from tolerances import EPS32, assert_within, logprob_tolerance

from rlhfkit.core.logprobs import (DEFAULT_CHUNK_ROWS, entropy_from_logits, logprobs_and_entropy,
                                   logprobs_from_logits)

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


# ---------------------------------------------------------------------------------------------------------------
# logprobs_and_entropy: the one-pass path with a hand-written backward, against the two plain functions
# ---------------------------------------------------------------------------------------------------------------
def _plain(logits, tokens, temperature, chunk_rows=DEFAULT_CHUNK_ROWS):
    return (logprobs_from_logits(logits, tokens, temperature, chunk_rows=chunk_rows),
            entropy_from_logits(logits, temperature, chunk_rows=chunk_rows))


def test_fused_hand_values():
    # the same hand values as above: log(1/2), log(1/3); H(1/6, 1/3, 1/2) and ln 3
    lp, h = logprobs_and_entropy(LOGITS, torch.tensor([[2, 0]]))
    assert torch.allclose(lp, torch.tensor([[math.log(0.5), math.log(1 / 3)]], dtype=torch.float64), atol=1e-15)
    assert h[0, 0].item() == pytest.approx(math.log(6) / 6 + math.log(3) / 3 + math.log(2) / 2, abs=1e-15)
    assert h[0, 1].item() == pytest.approx(math.log(3), abs=1e-15)


def test_fused_gradients_hand_values():
    # row 0, p = (1/6, 1/3, 1/2), token 2: d logp / dz = (-1/6, -1/3, 1/2);
    # d H / dz_v = -p_v (log p_v + H) with H = ln6/6 + ln3/3 + ln2/2
    logits = LOGITS[:, :1].clone().requires_grad_(True)
    lp, h = logprobs_and_entropy(logits, torch.tensor([[2]]))
    (g_lp,) = torch.autograd.grad(lp.sum(), logits, retain_graph=True)
    (g_h,) = torch.autograd.grad(h.sum(), logits)
    assert torch.allclose(g_lp[0, 0], torch.tensor([-1 / 6, -1 / 3, 0.5], dtype=torch.float64), atol=1e-15)
    p = torch.tensor([1 / 6, 1 / 3, 1 / 2], dtype=torch.float64)
    big_h = math.log(6) / 6 + math.log(3) / 3 + math.log(2) / 2
    assert torch.allclose(g_h[0, 0], -p * (p.log() + big_h), atol=1e-15)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 16, 64])
def test_fused_equals_plain_float64_values_and_gradients(temperature, chunk_tokens):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(5, 7, 301, generator=g, dtype=torch.float64)).requires_grad_(True)
    tokens = torch.randint(0, 301, (5, 7), generator=g)
    w_lp, w_h = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    plain_lp, plain_h = _plain(logits, tokens, temperature)
    lp, h = logprobs_and_entropy(logits, tokens, temperature, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(lp, plain_lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, plain_h, rtol=0, atol=1e-12)
    for loss, plain_loss in [((w_lp * lp).sum(), (w_lp * plain_lp).sum()),  # log-probs only (the PPO loss)
                             ((w_h * h).sum(), (w_h * plain_h).sum()),  # entropy only
                             ((w_lp * lp + w_h * h).sum(), (w_lp * plain_lp + w_h * plain_h).sum())]:
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        (plain_grad,) = torch.autograd.grad(plain_loss, logits, retain_graph=True)
        torch.testing.assert_close(grad, plain_grad, rtol=0, atol=1e-12)


def test_fused_float32_and_bf16_within_rounding_of_float64():
    g = torch.Generator().manual_seed(2)
    exact = 4 * torch.randn(3, 6, 4099, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 4099, (3, 6), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        low = exact.to(dtype).requires_grad_(True)
        lp, h = logprobs_and_entropy(low, tokens, 0.7)
        assert lp.dtype == h.dtype == torch.float32
        # compared with the float64 log-softmax of the same (rounded) logits: the log-softmax's own rounding
        up = low.detach().double()
        ref_lp, ref_h = _plain(up, tokens, 0.7)
        assert_within(lp, ref_lp, logprob_tolerance(up.abs(), ref_lp, 0.7, 0), "fused float32 log-probs")
        # H = Σ p (-log p): each term within the log-prob tolerance of its log p, p-weighted
        assert_within(h, ref_h, logprob_tolerance(up.abs(), ref_h, 0.7, 0), "fused float32 entropy")
        (grad,) = torch.autograd.grad(lp.sum() + h.sum(), low)
        assert grad.dtype == dtype
        up64 = up.clone().requires_grad_(True)
        plain_lp, plain_h = _plain(up64, tokens, 0.7)
        (ref_grad,) = torch.autograd.grad(plain_lp.sum() + plain_h.sum(), up64)
        # gradient entries p_v (...) of size <= |log p| + H + 1: float32 rounds each by a few eps of that scale
        scale = (ref_lp.abs().amax() + ref_h.abs().amax() + 1).item()
        bound = (8 * EPS32 * scale) if dtype == torch.float32 else (2 * 2 ** -8 * scale)
        assert (grad.double() - ref_grad).abs().max().item() <= bound


def test_fused_log_probs_do_not_depend_on_the_entropy_flag():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 5, 257, generator=g)
    tokens = torch.randint(0, 257, (9, 5), generator=g)
    with_h, h = logprobs_and_entropy(logits, tokens, 0.7)
    without, none = logprobs_and_entropy(logits, tokens, 0.7, with_entropy=False)
    assert none is None and torch.equal(with_h, without)  # bit for bit: rollout and update passes agree exactly


def test_fused_with_minus_inf_logits_is_finite_with_finite_gradient():
    # one vocabulary entry masked (-inf): H(1/2, 1/2, 0) = ln 2; its gradient entries are 0
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], dtype=torch.float64, requires_grad=True)
    lp, h = logprobs_and_entropy(logits, torch.tensor([[0]]))
    assert h.item() == pytest.approx(math.log(2), abs=1e-15) and lp.item() == pytest.approx(math.log(0.5), abs=1e-15)
    (grad,) = torch.autograd.grad(3 * h.sum() + lp.sum(), logits)
    assert torch.isfinite(grad).all() and grad[0, 0, 2].item() == 0.0
    # H-gradient: -p_v (log p_v + ln 2) = 0 for v = 0, 1; log-prob gradient: (1/2, -1/2)
    assert torch.allclose(grad[0, 0, :2], torch.tensor([0.5, -0.5], dtype=torch.float64), atol=1e-15)


def test_fused_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy(LOGITS, torch.tensor([[0, 0]]), temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        logprobs_and_entropy(LOGITS, torch.tensor([[0]]))


def test_fused_blocks_cover_every_token_once_and_change_no_bit():
    from rlhfkit.core.logprobs import _blocks

    for rows, cols, chunk in [(5, 7, 1), (5, 7, 3), (5, 7, 7), (5, 7, 16), (5, 7, 64), (1, 0, 4), (0, 3, 4)]:
        seen = torch.zeros(rows, cols, dtype=torch.long)
        for r, c in _blocks(rows, cols, chunk):
            assert seen[r, c].numel() <= max(chunk, 1)
            seen[r, c] += 1
        assert (seen == 1).all()
    # float32: every block size gives the same bits, values and gradients (every operation is per token)
    g = torch.Generator().manual_seed(2)
    base = 4 * torch.randn(3, 11, 257, generator=g)
    tokens = torch.randint(0, 257, (3, 11), generator=g)
    w = torch.randn(3, 11, generator=g)
    outs = []
    for chunk in (1, 5, 11, 16, 40):
        logits = base.clone().requires_grad_(True)
        lp, h = logprobs_and_entropy(logits, tokens, 0.7, chunk_tokens=chunk)
        (w * lp + 0.3 * w * h).sum().backward()
        outs.append((lp, h, logits.grad))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))
