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


# ------------------------------------------------------------------------------------------------------------
# head_logprobs_and_entropy: the LM head's product fused in, one (N, V) buffer reused between calls
# ------------------------------------------------------------------------------------------------------------
def _head_case(dtype, bias, seed=3, N=37, H=24, V=301):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    weight = (0.5 * torch.randn(V, H, generator=g, dtype=dtype)).requires_grad_(True)
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    tokens = torch.randint(0, V, (N,), generator=g)
    w_lp, w_h = torch.randn(N, generator=g, dtype=dtype), torch.randn(N, generator=g, dtype=dtype)
    return hidden, weight, b, tokens, w_lp, w_h


def _grads(loss, inputs):
    return torch.autograd.grad(loss, [t for t in inputs if t is not None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_head_fused_equals_linear_then_logprobs_bit_for_bit(dtype, temperature, bias):
    """The same products as F.linear's forward and backward and the same block passes on the same data: the same
    bits, values and gradients of hidden, weight and bias, for every combination of used outputs."""
    from rlhfkit.core.logprobs import head_logprobs_and_entropy

    hidden, weight, b, tokens, w_lp, w_h = _head_case(dtype, bias)
    # (log-probs weight, entropy weight) of the loss: log-probs only (the PPO loss), entropy only, both
    for with_entropy, c_lp, c_h in ((False, 1, 0), (True, 1, 0), (True, 0, 1), (True, 1, 1)):
        outs = []
        for fused in (False, True):  # a fresh graph each: the fused backward overwrites its logits
            if fused:
                lp, h = head_logprobs_and_entropy(hidden, weight, b, tokens, temperature, with_entropy=with_entropy)
            else:
                lp, h = logprobs_and_entropy(torch.nn.functional.linear(hidden, weight, b)[:, None],
                                             tokens[:, None], temperature, with_entropy=with_entropy)
                lp, h = lp[:, 0], h[:, 0] if with_entropy else None
            loss = c_lp * (w_lp * lp).sum() + (c_h * (w_h * h).sum() if with_entropy else 0)
            outs.append((lp, h, *_grads(loss, (hidden, weight, b))))
        plain, fused = outs
        assert fused[1] is None if not with_entropy else torch.equal(fused[1], plain[1])
        assert all(torch.equal(x, y) for x, y in zip(fused[:1] + fused[2:], plain[:1] + plain[2:]))


def test_head_fused_second_backward_is_a_clear_error():
    from rlhfkit.core.logprobs import head_logprobs_and_entropy

    hidden, weight, _, tokens, w_lp, _ = _head_case(torch.float32, False)
    lp, _ = head_logprobs_and_entropy(hidden, weight, None, tokens)
    (w_lp * lp).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        (w_lp * lp).sum().backward()


def test_head_fused_hand_values_and_frozen_weight():
    """One token, H = 1, weight (log 1, log 2, log 3), hidden 1: the hand values of the tests above; with the weight
    frozen only the hidden state gets a gradient, ∂ logp_2 / ∂ h = Σ_v (1[v = 2] - p_v) W_v."""
    from rlhfkit.core.logprobs import head_logprobs_and_entropy

    weight = torch.log(torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64))
    hidden = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    lp, h = head_logprobs_and_entropy(hidden, weight, None, torch.tensor([2]))
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-15)
    assert h.item() == pytest.approx(math.log(6) / 6 + math.log(3) / 3 + math.log(2) / 2, abs=1e-15)
    (g,) = torch.autograd.grad(lp.sum(), hidden)
    p = torch.tensor([1 / 6, 1 / 3, 1 / 2], dtype=torch.float64)
    expected = ((torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) - p) * weight[:, 0]).sum()
    assert g.item() == pytest.approx(expected.item(), abs=1e-15)


def test_head_fused_reuses_one_buffer_and_keeps_two_live_graphs_apart():
    """A second call after a backward takes the first call's buffer (the same memory); two forwards before their
    backwards take two buffers, so each backward still reads its own logits (equal to the plain gradients)."""
    from rlhfkit.core.logprobs import LOGIT_BUFFERS, head_logprobs_and_entropy

    LOGIT_BUFFERS.clear()
    hidden, weight, _, tokens, w_lp, w_h = _head_case(torch.float32, False)
    lp, h = head_logprobs_and_entropy(hidden, weight, None, tokens)
    (w_lp * lp + w_h * h).sum().backward()
    kept = [buf.data_ptr() for buf in LOGIT_BUFFERS._free[torch.float32]]
    assert len(kept) == 1
    a = head_logprobs_and_entropy(hidden, weight, None, tokens)
    assert not LOGIT_BUFFERS._free[torch.float32]  # taken
    other = _head_case(torch.float32, False, seed=4)
    b = head_logprobs_and_entropy(other[0], other[1], None, other[3])
    grads_b = _grads((other[4] * b[0] + other[5] * b[1]).sum(), (other[0], other[1]))
    grads_a = _grads((w_lp * a[0] + w_h * a[1]).sum(), (hidden, weight))
    for (x, wt, toks, wl, wh), got in (((hidden, weight, tokens, w_lp, w_h), grads_a),
                                       ((other[0], other[1], other[3], other[4], other[5]), grads_b)):
        plp, ph = logprobs_and_entropy(torch.nn.functional.linear(x, wt)[:, None], toks[:, None])
        want = _grads((wl * plp[:, 0] + wh * ph[:, 0]).sum(), (x, wt))
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert kept[0] in [buf.data_ptr() for buf in LOGIT_BUFFERS._free[torch.float32]]


def test_head_fused_without_grad_and_under_inference_mode_returns_the_buffer():
    """No input needs a gradient: the buffer goes back at once; one first taken under inference mode is a normal
    tensor that a later training call can write (an inference tensor could not be written outside the mode)."""
    from rlhfkit.core.logprobs import LOGIT_BUFFERS, head_logprobs_and_entropy

    LOGIT_BUFFERS.clear()
    hidden, weight, _, tokens, w_lp, _ = _head_case(torch.float32, False)
    with torch.inference_mode():
        first, _ = head_logprobs_and_entropy(hidden.detach(), weight.detach(), None, tokens)
    (buf,) = LOGIT_BUFFERS._free[torch.float32]
    assert not buf.is_inference()
    lp, _ = head_logprobs_and_entropy(hidden, weight, None, tokens)
    (w_lp * lp).sum().backward()
    with torch.no_grad():
        again, _ = head_logprobs_and_entropy(hidden, weight, None, tokens)
    assert torch.equal(first, lp) and torch.equal(again, lp)
    assert len(LOGIT_BUFFERS._free[torch.float32]) == 1


def test_logit_buffers_fit_grow_and_stay_within_their_budget():
    from rlhfkit.core.logprobs import _LogitBuffers

    pool = _LogitBuffers(max_bytes=4 * 1000)
    cpu = torch.device("cpu")
    small = pool.take(10, 10, torch.float32, cpu)
    assert small.numel() == 100
    pool.give(small)
    assert pool.take(5, 10, torch.float32, cpu) is small  # a kept buffer that is large enough
    pool.give(small)
    big = pool.take(20, 10, torch.float32, cpu)  # too small: dropped, a larger one with headroom
    assert big.numel() == 200 and not pool._free[torch.float32]
    grown = pool.take(11, 11, torch.float32, cpu)
    assert grown.numel() == 121
    pool.give(big)
    pool.give(grown)
    pool.give(torch.empty(900))  # 4 * (900 + 200 + 121) bytes > 4000: the smallest go first
    assert [b.numel() for b in pool._free[torch.float32]] == [900]


def test_head_fused_bad_inputs():
    from rlhfkit.core.logprobs import head_logprobs_and_entropy

    hidden, weight, _, tokens, _, _ = _head_case(torch.float32, False)
    with pytest.raises(ValueError, match="do not match"):
        head_logprobs_and_entropy(hidden, weight[:, :3], None, tokens)
    with pytest.raises(ValueError, match="do not match"):
        head_logprobs_and_entropy(hidden, weight, None, tokens[:3])
    with pytest.raises(ValueError, match="dtype"):
        head_logprobs_and_entropy(hidden.bfloat16(), weight.bfloat16(), None, tokens)
    with pytest.raises(ValueError, match="dtype"):
        head_logprobs_and_entropy(hidden, weight.double(), None, tokens)
    with pytest.raises(ValueError, match="temperature"):
        head_logprobs_and_entropy(hidden, weight, None, tokens, 0.0)
