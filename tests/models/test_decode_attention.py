"""rlhfkit.models.decode_attention: one query token per row as two batched products equals SDPA (float64, to
1e-12), every other call is transformers' SDPA bit for bit, the model's implementation is switched only inside the
block, and the sampler draws the same tokens with the same log-probs with it as without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import rlhfkit.models.decode_attention as da
from rlhfkit.rollout.sampling import GenerationConfig, sample


def _qkv(batch: int, heads: int, kv_heads: int, keys: int, dim: int = 8, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, keys, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, keys, dim, generator=g, dtype=dtype)
    return q, k, v


def _reference(q, k, v, mask, scale):
    """SDPA with every key head repeated for its query heads (h reads key head h // G)."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          attn_mask=mask, scale=scale)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool_shared", "float"])
def test_grouped_products_equal_sdpa_float64(heads, kv_heads, mask_kind):
    B, L = 5, 7
    q, k, v = _qkv(B, heads, kv_heads, L)
    allowed = torch.rand(B, 1, 1, L, generator=torch.Generator().manual_seed(1)) > 0.4
    allowed[..., -1] = True  # the step's own token
    mask = {"none": None, "bool": allowed, "bool_shared": allowed[:1],
            "float": torch.zeros(B, 1, 1, L, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
            + 0.25 * torch.randn(B, 1, 1, L, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            .masked_fill(~allowed, 0.0)}[mask_kind]
    got = da.grouped_decode_attention(q, k, v, mask, scale=0.3)
    want = _reference(q, k, v, mask, 0.3)
    assert got.shape == (B, heads, 1, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if mask_kind == "bool":  # a masked key changes nothing: the row reads only its allowed keys
        v2 = v.clone()
        v2[0, :, ~allowed[0, 0, 0]] = 1e6
        torch.testing.assert_close(da.grouped_decode_attention(q, k, v2, mask, 0.3), got, rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("mask_kind", ["bool", "bool_shared", "float"])
def test_two_query_tokens_with_a_mask_equal_sdpa_float64(heads, kv_heads, mask_kind):
    """The capture's last step: two tokens per row, the second also seeing the first (causal between them), each
    row with its own padding; per query token and head the same attention as SDPA with repeated key heads."""
    B, L, D = 5, 9, 8
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, heads, 2, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, kv_heads, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, kv_heads, L, D, generator=g, dtype=torch.float64)
    allowed = (torch.rand(B, 1, 1, L, generator=g) > 0.4).expand(B, 1, 2, L).clone()
    allowed[:, :, 0, -2] = True  # the first token (key L - 2) sees itself, not the second
    allowed[:, :, 0, -1] = False
    allowed[:, :, 1, -2:] = True  # the second sees both
    mask = {"bool": allowed, "bool_shared": allowed[:1],
            "float": torch.zeros(B, 1, 2, L, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
            + 0.25 * torch.randn(B, 1, 2, L, generator=g, dtype=torch.float64).masked_fill(~allowed, 0.0)}[mask_kind]
    got = da.grouped_decode_attention(q, k, v, mask, scale=0.3)
    assert got.shape == (B, heads, 2, D)
    torch.testing.assert_close(got, _reference(q, k, v, mask, 0.3), rtol=0, atol=1e-12)
    # each query token reads its own mask row: token t equals a one-token call with mask row t
    m = mask if mask.shape[0] == B else mask.expand(B, 1, 2, L)
    for t in range(2):
        one = da.grouped_decode_attention(q[:, :, t:t + 1], k, v, m[:, :, t:t + 1], scale=0.3)
        torch.testing.assert_close(got[:, :, t:t + 1], one, rtol=0, atol=1e-12)


def test_grouped_products_refuse_other_shapes():
    q, k, v = _qkv(2, 4, 3, 5)
    with pytest.raises(ValueError, match="multiple"):
        da.grouped_decode_attention(q, k, v, None, 1.0)
    q, k, v = _qkv(2, 4, 2, 5)
    with pytest.raises(ValueError, match="one query token"):
        da.grouped_decode_attention(torch.cat([q, q], dim=2), k, v, None, 1.0)


def _module(groups: int, training: bool = False):
    m = torch.nn.Module()
    m.num_key_value_groups, m.is_causal = groups, True
    m.train(training)
    return m


def test_the_registered_function_takes_one_token_steps_and_hands_the_rest_to_sdpa():
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    fn = ALL_ATTENTION_FUNCTIONS[da.DECODE_ATTENTION]
    q, k, v = _qkv(3, 6, 2, 5, dtype=torch.float32)
    mask = torch.ones(3, 1, 1, 5, dtype=torch.bool)
    mask[0, ..., :2] = False
    out, weights = fn(_module(3), q, k, v, mask, scaling=0.35)
    assert weights is None and out.shape == (3, 1, 6, 8)
    want = sdpa(_module(3), q.double(), k.double(), v.double(), mask, scaling=0.35)[0]
    torch.testing.assert_close(out.double(), want, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    # two query tokens with a (B, 1, 2, L) mask (the capture's last step) take the grouped path too
    q2 = torch.cat([q, q * 0.5], dim=2)
    mask2 = mask.expand(3, 1, 2, 5).clone()
    mask2[:, :, 0, -1] = False
    real = da.grouped_decode_attention
    calls = []
    try:
        da.grouped_decode_attention = lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw)
        out2 = fn(_module(3), q2, k, v, mask2, scaling=0.35)[0]
        # three tokens (a prefill) keep SDPA
        q3 = torch.cat([q2, q], dim=2)
        mask3 = torch.cat([mask2, mask], dim=2)
        assert torch.equal(fn(_module(3), q3, k, v, mask3, scaling=0.35)[0],
                           sdpa(_module(3), q3, k, v, mask3, scaling=0.35)[0])
    finally:
        da.grouped_decode_attention = real
    assert calls == [q2.shape]
    want2 = sdpa(_module(3), q2.double(), k.double(), v.double(), mask2, scaling=0.35)[0]
    torch.testing.assert_close(out2.double(), want2, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    # prefill (several query tokens), bf16, float32 queries and keys with bf16 values (what a Llama layer gives
    # under CPU autocast: its rotary promotes q and k; below), a per-head mask: transformers' SDPA, bit for bit
    q4, k4, v4 = _qkv(3, 6, 2, 5, seed=3, dtype=torch.float32)
    q4 = torch.cat([q4, q4 * 0.5], dim=2)
    additive64 = torch.zeros(3, 1, 1, 5, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    cases = [(q4, k4, v4, None), (q.bfloat16(), k.bfloat16(), v.bfloat16(), mask),
             (q, k, v, mask.expand(3, 6, 1, 5))]
    for args in cases:
        assert torch.equal(fn(_module(3), *args, scaling=0.35)[0], sdpa(_module(3), *args, scaling=0.35)[0])
    with pytest.raises(RuntimeError, match="attn_mask dtype"):  # SDPA's own refusal, not a silent float64 promotion
        fn(_module(3), q, k, v, additive64, scaling=0.35)
    calls = []
    real = da.grouped_decode_attention
    try:
        da.grouped_decode_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        torch.manual_seed(0)
        fn(_module(3), q, k, v, mask, dropout=0.5, scaling=0.35)  # dropout asked for: SDPA applies it
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: SDPA, as it would run there
            for values in (v, v.bfloat16()):
                got = fn(_module(3), q, k, values, mask, scaling=0.35)[0]
                assert torch.equal(got, sdpa(_module(3), q, k, values, mask, scaling=0.35)[0])
        fn(_module(3), q, k, v, mask, scaling=0.35)
    finally:
        da.grouped_decode_attention = real
    assert calls == [1]  # only the last call took the grouped path


def _tiny(dtype=torch.float64, attn="sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=36, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, initializer_range=0.3, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    return LlamaForCausalLM(config).to(dtype).eval()


def test_the_model_runs_it_inside_the_block_only_and_is_restored_after_an_error(monkeypatch):
    model = _tiny()
    with da.decode_attention(model) as on:
        assert on and model.config._attn_implementation == da.DECODE_ATTENTION
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with da.decode_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    with da.decode_attention(model, enabled=False) as on:
        assert not on and model.config._attn_implementation == "sdpa"
    eager = _tiny(attn="eager")
    with da.decode_attention(eager) as on:  # eager attention is left alone
        assert not on and eager.config._attn_implementation == "eager"
    composite = _tiny()
    # a composite config (sub-configs): transformers' setter would rewrite their implementations too
    monkeypatch.setattr(type(composite.config), "sub_configs", {"text_config": LlamaConfig})
    with da.decode_attention(composite) as on:
        assert not on and composite.config._attn_implementation == "sdpa"


def _left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths, left-padded with id 0 (two rows share one): ids and mask, (4, 7)."""
    rows = [[5, 17, 33, 9], [40, 8, 12, 60, 21, 7, 30], [11, 3], [11, 3]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    return ids, ids != 0


def _record_grouped_calls(monkeypatch) -> list[torch.Size]:
    """The query shapes of every call that takes the grouped products, from now on."""
    calls = []
    real = da.grouped_decode_attention
    monkeypatch.setattr(da, "grouped_decode_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    return calls


def _assert_same_rollouts(a, b) -> None:
    for name in ("response_ids", "response_mask", "stopped"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.rollout_logprobs, b.rollout_logprobs, rtol=0, atol=1e-12)


def test_the_sampler_draws_the_same_tokens_with_the_same_logprobs_float64(monkeypatch):
    """Rows of different prompt lengths (left padding), stops at EOS mid-way: the grouped path runs every decode
    step of every layer and gives the plain SDPA sampler's tokens, log-probs to 1e-12."""
    model = _tiny()
    ids, mask = _left_padded_prompts()
    config = GenerationConfig(max_new_tokens=9, temperature=1.0, stop_token_ids=(2, 7), pad_token_id=0)
    calls = _record_grouped_calls(monkeypatch)
    out = [sample(model, ids, mask, config, torch.Generator().manual_seed(4), grouped_attention=flag)
           for flag in (True, False)]
    assert model.config._attn_implementation == "sdpa"
    steps = out[0].response_ids.shape[1]
    assert len(calls) == 2 * (steps - 1)  # every decode step (all but the first token) of both layers
    assert bool(out[0].stopped.any()) and not bool(out[0].stopped.all())
    _assert_same_rollouts(*out)


def test_the_sampler_with_a_capture_gives_the_same_states_float64(monkeypatch):
    """With a HiddenCapture the last step feeds two tokens per row under a mask: the grouped path takes it too,
    and the captured states, tokens and log-probs equal the plain SDPA sampler's (float64, 1e-12)."""
    from rlhfkit.rollout.sampling import HiddenCapture

    model = _tiny()
    ids, mask = _left_padded_prompts()
    config = GenerationConfig(max_new_tokens=6, temperature=1.0, stop_token_ids=(2, 7), pad_token_id=0)
    calls = _record_grouped_calls(monkeypatch)
    out, captures = [], []
    for flag in (True, False):
        capture = HiddenCapture(layers=2, end_id=2)  # both layers feed the states
        out.append(sample(model, ids, mask, config, torch.Generator().manual_seed(4), capture=capture,
                          grouped_attention=flag))
        captures.append(capture.hidden)
    queries = [shape[2] for shape in calls]
    assert queries.count(2) == 2 and set(queries) == {1, 2}  # the two-token step, in both layers
    _assert_same_rollouts(*out)
    assert captures[0].shape == captures[1].shape
    torch.testing.assert_close(captures[0], captures[1], rtol=0, atol=1e-12)
