"""Tests of rlhfkit.rollout.sampling: KV-cache correctness, padding invariance, seeds, stops, filters, statistics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import paths
import pytest
import torch
from tolerances import assert_within, forward_factor, linear_terms, logprob_tolerance
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.sampling import (
    GenerationConfig,
    filter_logits,
    generate_greedy,
    invert_cdf,
    sample,
    sample_categorical,
    top_k_filter,
    top_p_filter,
)

TOKENIZER_DIR = str(paths.TOKENIZER_DIR)
PAD = 0


def tiny_llama(vocab_size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer Llama; initializer_range 0.3 makes the next-token distributions peaked (no near-ties)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    return LlamaForCausalLM(config).to(dtype).eval()


def left_padded(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


PROMPTS = [[5, 17, 33, 9], [40, 8, 12, 60, 21, 7, 30], [11, 3]]


def full_forward_logprobs(model, rollout, temperature: float) -> torch.Tensor:
    """log-softmax(logits / T) of the response tokens from ONE forward pass over [prompt; response]."""
    ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], dim=1).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    P, T = rollout.query_ids.shape[1], rollout.response_ids.shape[1]
    # the logits at position P-1+t predict response token t
    logp = torch.log_softmax(logits[:, P - 1:P - 1 + T].double() / temperature, dim=-1)
    return logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------- KV cache, padding


def test_rollout_logprobs_equal_one_full_forward_and_are_unfiltered():
    model = tiny_llama(dtype=torch.float64)
    ids, mask = left_padded(PROMPTS)
    config = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=12, top_p=0.9, stop_token_ids=(4, 6, 13),
                              pad_token_id=PAD)
    rollout = sample(model, ids, mask, config, torch.Generator().manual_seed(3))
    expected = full_forward_logprobs(model, rollout, temperature=0.7)
    m = rollout.response_mask
    assert m.any(dim=1).all()
    ids_full = torch.cat([ids, rollout.response_ids], dim=1)
    mask_full = torch.cat([mask, m], dim=1).long()
    with torch.no_grad():
        logits = model(input_ids=ids_full, attention_mask=mask_full,
                       position_ids=(mask_full.cumsum(-1) - 1).clamp(min=0)).logits[:, ids.shape[1] - 1:-1]
    # a float64 model: the float32 cast of its logits (1 stage) and the float32 log-softmax over V
    assert_within(rollout.rollout_logprobs[m], expected[m], logprob_tolerance(logits.abs(), expected, 0.7, 1)[m],
                  "log-probs")
    assert (rollout.rollout_logprobs[~m] == 0).all()
    # They are the full tempered distribution's log-probs: the renormalised top-k/top-p ones differ.
    assert rollout.rollout_logprobs.dtype == torch.float32
    filtered = torch.log_softmax(filter_logits(logits, 0.7, 12, 0.9), -1).gather(
        -1, rollout.response_ids[..., None]).squeeze(-1)
    assert ((filtered[m] - expected[m]).abs() > 1e-3).any()


def test_left_padding_does_not_change_greedy_response_or_logprobs():
    model = tiny_llama()
    config = GenerationConfig(max_new_tokens=8, temperature=0.0, pad_token_id=PAD)
    alone = generate_greedy(model, *left_padded([PROMPTS[0]]), config)
    assert alone.query_mask.all()  # no padding at all
    with linear_terms(model.lm_head) as terms:  # one call per generated token, the last position's logits
        batched = generate_greedy(model, *left_padded([PROMPTS[1], PROMPTS[0]]), config)
    assert batched.query_mask[1].sum() == len(PROMPTS[0]) < batched.query_mask.shape[1]
    assert torch.equal(batched.response_ids[1], alone.response_ids[0])
    row_terms = torch.stack([t[1, -1] for t in terms])[:alone.rollout_logprobs.shape[1]]
    # float32 through the 2 decoder layers with padding and another batch shape, then the log-softmax over V
    assert_within(batched.rollout_logprobs[1], alone.rollout_logprobs[0],
                  logprob_tolerance(row_terms, alone.rollout_logprobs[0], 1.0, forward_factor(2)), "log-probs")


def test_greedy_matches_transformers_generate():
    model = tiny_llama(seed=1)
    ids, mask = left_padded(PROMPTS)
    ours = generate_greedy(model, ids, mask, GenerationConfig(max_new_tokens=7, temperature=0, pad_token_id=PAD))
    ref = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=7, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(ours.response_ids, ref[:, ids.shape[1]:])
    assert torch.equal(ours.query_ids, ids) and torch.equal(ours.query_mask, mask)


# ---------------------------------------------------------------------------------------------- randomness


def test_same_seed_same_samples_and_different_seed_different_samples():
    model = tiny_llama()
    ids, mask = left_padded(PROMPTS)
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, pad_token_id=PAD)
    a = sample(model, ids, mask, config, torch.Generator().manual_seed(7))
    b = sample(model, ids, mask, config, torch.Generator().manual_seed(7))
    c = sample(model, ids, mask, config, torch.Generator().manual_seed(8))
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.rollout_logprobs, b.rollout_logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


# ---------------------------------------------------------------------------------------------- stops


def test_stop_token_is_last_response_token_and_rest_is_padding():
    model = tiny_llama(seed=2)
    ids, mask = left_padded(PROMPTS[:2])
    base = generate_greedy(model, ids, mask, GenerationConfig(max_new_tokens=10, temperature=0, pad_token_id=PAD))
    row0, row1 = base.response_ids.tolist()
    # The first token that row 0 emits for the first time at a step k >= 2 and that row 1 never emits.
    k = next(k for k in range(2, 10) if row0[k] not in row0[:k] and row0[k] not in row1)
    stop = row0[k]
    # pad == stop id (as with SmolLM2, whose pad token is its EOS): the mask still marks the stop token.
    config = GenerationConfig(max_new_tokens=10, temperature=0, stop_token_ids=(stop,), pad_token_id=stop)
    r = generate_greedy(model, ids, mask, config)
    assert r.response_ids.shape == (2, 10)
    assert r.response_ids[0].tolist() == row0[:k + 1] + [stop] * (10 - k - 1)
    assert r.response_mask[0].tolist() == [True] * (k + 1) + [False] * (10 - k - 1)
    assert r.response_ids[1].tolist() == row1 and r.response_mask[1].all()
    assert r.stopped.tolist() == [True, False]
    torch.testing.assert_close(r.rollout_logprobs[0, :k + 1], base.rollout_logprobs[0, :k + 1], rtol=0, atol=0)
    assert (r.rollout_logprobs[0, k + 1:] == 0).all()
    # When every row has stopped the loop ends: row 0 alone gives exactly k+1 tokens.
    alone = generate_greedy(model, ids[:1], mask[:1], config)
    assert alone.response_ids[0].tolist() == row0[:k + 1] and alone.stopped.tolist() == [True]


def test_stop_string_truncates_right_after_the_completing_token():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = tiny_llama(vocab_size=len(tokenizer), seed=4)
    enc = [tokenizer(t)["input_ids"] for t in ("The weather today is", "Hi")]
    ids, mask = left_padded(enc, pad=tokenizer.pad_token_id)
    config = GenerationConfig(max_new_tokens=12, temperature=0, pad_token_id=tokenizer.pad_token_id)
    base = generate_greedy(model, ids, mask, config)
    row0, row1 = base.response_ids.tolist()
    text1 = tokenizer.decode(row1)

    # A stop string spanning the boundary between response tokens j-1 and j of row 0: last character of the
    # text before token j + first character that token j adds. Its first occurrence is completed by token j.
    def candidate(j: int) -> str | None:
        prev, text = tokenizer.decode(row0[:j]), tokenizer.decode(row0[:j + 1])
        if not prev or len(text) <= len(prev) or not text.startswith(prev):
            return None
        s = text[len(prev) - 1:len(prev) + 1]
        ok = s not in prev and s not in text1 and "\ufffd" not in s and s.strip() == s
        return s if ok else None

    j, stop_string = next((j, s) for j in range(2, 12) if (s := candidate(j)) is not None)
    config = GenerationConfig(max_new_tokens=12, temperature=0, stop_strings=("never-in-this-text", stop_string),
                              pad_token_id=tokenizer.pad_token_id)
    r = generate_greedy(model, ids, mask, config, tokenizer=tokenizer)
    assert r.response_ids[0, :j + 1].tolist() == row0[:j + 1]
    assert r.response_mask[0].tolist() == [True] * (j + 1) + [False] * (12 - j - 1)
    assert (r.response_ids[0, j + 1:] == tokenizer.pad_token_id).all()
    assert r.response_ids[1].tolist() == row1 and r.response_mask[1].all()
    assert r.stopped.tolist() == [True, False]
    with pytest.raises(RlhfkitError, match="needs a tokenizer"):
        generate_greedy(model, ids, mask, config)


# ---------------------------------------------------------------------------------------------- filters


def test_top_k_filter_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 2.5, 2.0]], dtype=torch.float64)
    inf = float("-inf")
    assert top_k_filter(logits, 2).tolist() == [[inf, 3.0, 2.0, inf], [inf, inf, 2.5, 2.0]]
    assert top_k_filter(logits, 1).tolist() == [[inf, 3.0, inf, inf], [inf, inf, 2.5, inf]]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, None), logits)
    assert torch.equal(top_k_filter(logits, 4), logits)
    # ties with the k-th value are kept
    assert top_k_filter(torch.tensor([1.0, 2.0, 2.0, 0.0]), 2).tolist() == [inf, 2.0, 2.0, inf]


def test_top_p_filter_by_hand():
    # softmax(log p) = p.  Row 0 sorted: 0.5 (id 1), 0.3 (id 2), 0.15 (id 3), 0.05 (id 0); the mass before each
    # is 0, 0.5, 0.8, 0.95, and a token is kept iff its mass-before < top_p.  Row 1 is a permutation.
    p = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.3, 0.15, 0.05, 0.5]], dtype=torch.float64)
    logits = p.log()
    kept = {0.01: [[1], [3]], 0.45: [[1], [3]], 0.75: [[1, 2], [0, 3]], 0.9: [[1, 2, 3], [0, 1, 3]],
            0.99: [[0, 1, 2, 3], [0, 1, 2, 3]]}
    for top_p, rows in kept.items():
        out = top_p_filter(logits, top_p)
        for r, ids in enumerate(rows):
            assert torch.isfinite(out[r]).nonzero().flatten().tolist() == ids, top_p
            assert torch.equal(out[r, ids], logits[r, ids])
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_filter_logits_tempers_then_top_k_then_nucleus_of_the_renormalised_rest():
    p = torch.tensor([0.05, 0.5, 0.3, 0.15], dtype=torch.float64)
    # top-k 2 keeps ids 1, 2 renormalised to 0.625, 0.375; nucleus 0.6: mass before id 2 is 0.625 >= 0.6, so only
    # id 1 survives (on the un-renormalised probabilities 0.5 < 0.6 would have kept id 2).
    out = filter_logits(p.log() * 2.0, temperature=2.0, top_k=2, top_p=0.6)
    assert torch.isfinite(out).nonzero().flatten().tolist() == [1]
    torch.testing.assert_close(out[1], p.log()[1], rtol=0, atol=0)  # (2·log p)/2: both steps exact in binary
    assert torch.isfinite(filter_logits(p.log(), 1.0, 2, 0.64)).sum() == 2  # 0.625 < 0.64 keeps id 2


def test_top_k_one_and_tiny_top_p_equal_greedy():
    model = tiny_llama(seed=5)
    ids, mask = left_padded(PROMPTS)
    greedy = generate_greedy(model, ids, mask, GenerationConfig(max_new_tokens=9, temperature=0, pad_token_id=PAD))
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        config = GenerationConfig(max_new_tokens=9, temperature=1.0, pad_token_id=PAD, **kwargs)
        r = sample(model, ids, mask, config, torch.Generator().manual_seed(0))
        assert torch.equal(r.response_ids, greedy.response_ids), kwargs
        torch.testing.assert_close(r.rollout_logprobs, greedy.rollout_logprobs, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- controlled logits


class FixedLogitsLM(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are the same fixed vector at every position."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.row = torch.nn.Parameter(torch.tensor(logits), requires_grad=False)
        self.config = None

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep):
        # each row's newest position is its count of real tokens minus one (left padding skipped)
        assert torch.equal(position_ids[:, -1], attention_mask.sum(-1) - 1)
        return SimpleNamespace(logits=self.row.expand(input_ids.shape[0], 1, -1), past_key_values=past_key_values)


LOGITS = [2.0, 1.0, 0.0, -1.0, -0.5]


def test_logprobs_are_tempered_and_unfiltered_by_hand():
    model = FixedLogitsLM(LOGITS)
    ids, mask = left_padded([[1, 2], [3]])
    config = GenerationConfig(max_new_tokens=3, temperature=0.5, top_k=2, pad_token_id=PAD)
    r = sample(model, ids, mask, config, torch.Generator().manual_seed(0))
    # log π(v) = l_v/T - log Σ_u exp(l_u/T) with T = 0.5, over all 5 tokens (not the top-2 only).
    lse = math.log(sum(math.exp(x / 0.5) for x in LOGITS))
    expected = torch.tensor([[LOGITS[v] / 0.5 - lse for v in row] for row in r.response_ids.tolist()])
    assert set(r.response_ids.flatten().tolist()) <= {0, 1}
    # exact logits: the float32 log-softmax over 5 logits (and the float32 rounding of the reference)
    exact = torch.tensor(LOGITS).abs()
    assert_within(r.rollout_logprobs, expected.float(), logprob_tolerance(exact, expected, 0.5, 0), "log-probs")
    # greedy: argmax, log-probs at temperature 1
    g = generate_greedy(model, ids, mask, GenerationConfig(max_new_tokens=2, temperature=0, pad_token_id=PAD))
    lse1 = math.log(sum(math.exp(x) for x in LOGITS))
    assert g.response_ids.tolist() == [[0, 0], [0, 0]]
    want = torch.full((2, 2), 2.0 - lse1)
    assert_within(g.rollout_logprobs, want, logprob_tolerance(exact, want, 1.0, 0), "greedy log-probs")


def chi_square(counts: torch.Tensor, probs: list[float]) -> float:
    n = counts.sum().item()
    return sum((counts[v].item() - n * p) ** 2 / (n * p) for v, p in enumerate(probs) if p > 0)


def test_empirical_distribution_matches_tempered_softmax():
    n = 4000
    model = FixedLogitsLM(LOGITS)
    ids, mask = left_padded([[1]] * n)

    def counts(**kwargs) -> torch.Tensor:
        config = GenerationConfig(max_new_tokens=1, pad_token_id=PAD, **kwargs)
        r = sample(model, ids, mask, config, torch.Generator().manual_seed(11))
        return torch.bincount(r.response_ids[:, 0], minlength=len(LOGITS))

    def softmax(xs: list[float]) -> list[float]:
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    critical = 18.47  # chi-square, 4 degrees of freedom, upper 0.1% point
    c = counts(temperature=0.8)
    target = softmax([x / 0.8 for x in LOGITS])
    assert chi_square(c, target) < critical
    assert chi_square(c, softmax(LOGITS)) > 5 * critical  # the test can tell T = 0.8 from T = 1

    # T = 1.3, top-k 4 drops id 3 (-1.0); of the rest (renormalised) sorted 0, 1, 2, 4 the nucleus 0.85 keeps
    # 0, 1, 2 (mass before id 2 is q0 + q1 < 0.85, before id 4 it is >= 0.85); sample from those, renormalised.
    q = softmax([x / 1.3 for x in LOGITS[:3] + LOGITS[4:]])
    assert q[0] + q[1] < 0.85 <= q[0] + q[1] + q[2]
    kept = softmax([x / 1.3 for x in LOGITS[:3]])
    c = counts(temperature=1.3, top_k=4, top_p=0.85)
    assert c[3] == 0 and c[4] == 0
    assert chi_square(c[:3], kept) < 13.82  # 2 degrees of freedom, upper 0.1% point


def test_invert_cdf_by_hand():
    # unnormalised rows (sums 4 and 2); the draw is the first index whose cumulative mass exceeds u * total, so
    # zero-probability tokens (ids 1, 3 of row 0; id 4 of row 1) are skipped, also on the CDF's steps
    probs = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5, 0.0]])
    cases = [  # (u row 0, u row 1) -> tokens; row 0's CDF / 4: .25 .25 .75 .75 1; row 1's / 2: .25 .5 .75 1 1
        ((0.0, 0.0), [0, 0]),
        ((0.25, 0.5), [2, 2]),       # exactly on a step: the next token with mass
        ((0.7499, 0.7499), [2, 2]),
        ((0.75, 0.99999), [4, 3]),
    ]
    for u, want in cases:
        assert invert_cdf(probs, torch.tensor(u)).tolist() == want


def test_sample_categorical_uses_one_uniform_per_row_from_the_generator():
    probs = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5, 0.0]])
    u = torch.rand(2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = sample_categorical(probs, torch.Generator().manual_seed(3))
    assert got.dtype == torch.long and got.tolist() == invert_cdf(probs, u).tolist()


def test_sample_categorical_frequencies_on_a_large_vocabulary():
    # a 1000-token distribution with half the tokens at zero mass: empirical frequencies of 20000 draws (20 rows
    # x 1000 calls) pass a chi-square test on 20 buckets of 25 live tokens, and no dead token is ever drawn
    torch.manual_seed(0)
    weights = torch.rand(1000) * (torch.arange(1000) % 2 == 0)
    g = torch.Generator().manual_seed(5)
    draws = torch.cat([sample_categorical(weights.expand(20, -1), g) for _ in range(1000)])
    assert (draws % 2 == 0).all()
    counts = torch.bincount(draws // 50, minlength=20).double()
    mass = torch.stack([weights[b * 50:(b + 1) * 50].sum() for b in range(20)]).double()
    assert chi_square(counts, (mass / mass.sum()).tolist()) < 43.82  # 19 degrees of freedom, upper 0.1% point


# ---------------------------------------------------------------------------------------------- validation, modes


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop_token_ids": (2, -1)}, "stop_token_ids"),
    ({"stop_strings": ("",)}, "stop_strings"),
    ({"stop_strings": "</s>"}, "stop_strings"),
    ({"pad_token_id": -3}, "pad_token_id"),
])
def test_invalid_config_values_raise(kwargs, field):
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**args)
    with pytest.raises(RlhfkitError):
        GenerationConfig(**args)


def test_lists_become_tuples_and_bad_prompts_are_refused():
    config = GenerationConfig(max_new_tokens=2, stop_token_ids=[2, 3], stop_strings=["\n\n"])
    assert config.stop_token_ids == (2, 3) and config.stop_strings == ("\n\n",)
    model = tiny_llama()
    ids, mask = left_padded(PROMPTS[:2])
    good = GenerationConfig(max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, ids, mask.flip(1), good, torch.Generator())
    with pytest.raises(ValueError, match="torch.Generator"):
        sample(model, ids, mask, good)
    with pytest.raises(RlhfkitError, match="pad_token_id"):
        sample(model, ids, mask, GenerationConfig(max_new_tokens=2), torch.Generator())


def test_outputs_are_ordinary_tensors_mode_is_restored_and_autocast_is_used():
    model = tiny_llama().train()
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    ids, mask = left_padded(PROMPTS)
    config = GenerationConfig(max_new_tokens=3, temperature=1.0, pad_token_id=PAD)
    r = sample(model, ids, mask, config, torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16)
    assert model.training  # restored after sampling in eval mode
    assert seen and set(seen) == {torch.bfloat16}
    assert r.rollout_logprobs.dtype == torch.float32 and torch.isfinite(r.rollout_logprobs).all()
    # not inference tensors: PPO feeds them to forward passes that build autograd graphs
    assert not any(t.is_inference() for t in r)
    assert r.response_ids.dtype == torch.long and r.response_mask.dtype == torch.bool


# ---------------------------------------------------------------------------------------------- the cache keyword


class CacheNamedLM(FixedLogitsLM):
    """The same stand-in with the current transformers signature (the cache passed as ``cache``)."""

    def __init__(self, logits: list[float]):
        super().__init__(logits)
        self.seen: list[object] = []

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep):
        self.seen.append(cache)
        return SimpleNamespace(logits=self.row.expand(input_ids.shape[0], 1, -1))


def test_the_cache_goes_under_the_name_the_forward_takes():
    """A forward naming ``cache`` gets the one DynamicCache of the call at every step (a forward naming
    ``past_key_values``, FixedLogitsLM above, is served by every other test of this module)."""
    from rlhfkit.rollout.sampling import cache_keyword

    model = CacheNamedLM(LOGITS)
    assert cache_keyword(model) == "cache" and cache_keyword(FixedLogitsLM(LOGITS)) == "past_key_values"
    ids, mask = left_padded([[1, 2], [3]])
    sample(model, ids, mask, GenerationConfig(max_new_tokens=3, temperature=1.0, pad_token_id=PAD),
           torch.Generator().manual_seed(0))
    assert len(model.seen) == 3 and all(c is model.seen[0] for c in model.seen) and model.seen[0] is not None


def test_sampling_a_real_model_raises_no_deprecation_warning():
    """transformers 5.24 deprecates ``past_key_values`` (a FutureWarning at every forward): the sampler uses the
    name the installed release expects, so sampling warns about nothing."""
    import warnings

    model = tiny_llama()
    ids, mask = left_padded([[5, 6, 7], [8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(model, ids, mask, GenerationConfig(max_new_tokens=4, temperature=1.0, pad_token_id=PAD),
               torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- preallocated KV cache


def test_preallocated_layer_holds_exactly_what_a_dynamic_layer_holds():
    """Prefill, single-token steps past the capacity (the buffers grow), rows leaving the batch, a crop: after each
    operation the keys and values (and the length the attention mask is built from) equal a DynamicLayer's."""
    from transformers.cache_utils import DynamicLayer

    from rlhfkit.rollout.sampling import PreallocatedLayer

    gen = torch.Generator().manual_seed(0)
    plain, ours = DynamicLayer(), PreallocatedLayer(capacity=7)

    def step(batch: int, new: int) -> None:
        k = torch.randn(batch, 2, new, 4, generator=gen, dtype=torch.float64)
        v = torch.randn(batch, 2, new, 4, generator=gen, dtype=torch.float64)
        for a, b in zip(plain.update(k, v), ours.update(k, v)):
            assert torch.equal(a, b)

    def same() -> None:
        assert torch.equal(plain.keys, ours.keys) and torch.equal(plain.values, ours.values)
        assert plain.get_seq_length() == ours.get_seq_length()
        assert plain.get_mask_sizes(1) == ours.get_mask_sizes(1)

    assert ours.get_seq_length() == 0
    step(3, 5)
    same()
    for _ in range(4):  # 5 + 4 = 9 > capacity 7
        step(3, 1)
        same()
    keep = torch.tensor([2, 0])
    plain.batch_select_indices(keep)
    ours.batch_select_indices(keep)
    same()
    step(2, 1)
    same()
    plain.crop(-2)
    ours.crop(-2)
    same()
    step(2, 2)
    same()


def _stop_often_model() -> LlamaForCausalLM:
    """A float64 tiny Llama over 16 tokens, which samples its stop tokens 2 and 3 often."""
    return tiny_llama(vocab_size=16, seed=3, dtype=torch.float64)


def assert_same_rollouts(fast, plain, fast_state, plain_state) -> None:
    """Two float64 rollouts of the same prompts and seed: same tokens, masks, stops and generator state, log-probs
    to 1e-12 (the rounding of different matrix shapes, ~1e-16 relative)."""
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.response_mask, plain.response_mask)
    assert torch.equal(fast.stopped, plain.stopped)
    torch.testing.assert_close(fast.rollout_logprobs, plain.rollout_logprobs, rtol=0, atol=1e-12)
    assert torch.equal(fast_state, plain_state)


def test_shared_prompts_once_and_finished_rows_leave_the_batch_and_no_row_changes(monkeypatch):
    """A prompt that several rows share is run once (the prefill sees the 6 distinct prompts of 9 rows), rows that
    stop leave the forward batch (the batch the model sees shrinks), and every row's tokens, mask, stop flag and
    log-probs are those of the plain loop (every row in every forward, transformers' DynamicCache), as is the
    generator's state afterwards (one uniform per batch row per step in both). float64: the two loops differ only
    by the rounding of different matrix shapes (~1e-16 relative), far from any sampling boundary."""
    import rlhfkit.rollout.sampling as sampling
    from transformers import DynamicCache

    model = _stop_often_model()
    prompts = [[5, 7], [9, 4, 6, 8], [5, 7], [11], [12, 13, 14], [6, 6], [8, 9, 10, 11, 12], [5, 7], [11]]
    ids, mask = left_padded(prompts)
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, stop_token_ids=(2, 3), pad_token_id=PAD)

    def run() -> tuple:
        seen: list[int] = []
        handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)
        gen = torch.Generator().manual_seed(11)
        try:
            r = sample(model, ids, mask, config, gen)
        finally:
            handle.remove()
        return r, seen, gen.get_state()

    fast, fast_batches, fast_state = run()
    with monkeypatch.context() as m:
        m.setattr(sampling, "_should_compact", lambda *a: False)
        m.setattr(sampling, "make_cache", lambda model, capacity: DynamicCache(config=model.config))
        m.setattr(sampling, "distinct_prompts", lambda ids, mask: None)
        plain, plain_batches, plain_state = run()

    assert set(plain_batches) == {len(prompts)}
    assert fast_batches[0] == 6  # the distinct prompts
    assert fast_batches[1] <= len(prompts) and min(fast_batches) < len(prompts)  # rows did leave the batch
    assert fast_batches[1:] == sorted(fast_batches[1:], reverse=True)
    assert 0 < int(fast.stopped.sum()) < len(prompts) or fast.response_ids.shape[1] < config.max_new_tokens
    assert_same_rollouts(fast, plain, fast_state, plain_state)


def test_should_compact_rule():
    from rlhfkit.rollout.sampling import _should_compact

    assert not _should_compact(0, 64, 10)        # nothing finished
    assert not _should_compact(7, 64, 10)        # under an eighth of the batch
    assert _should_compact(8, 64, 10)
    assert not _should_compact(8, 64, 0)         # no step left to save
    assert _should_compact(1, 3, 1)              # small batches: one row is enough


def test_distinct_prompts_by_hand():
    from rlhfkit.rollout.sampling import distinct_prompts

    ids, mask = left_padded([[5, 6], [7, 8, 9], [5, 6], [6], [7, 8, 9], [5, 6]])
    first, inverse = distinct_prompts(ids, mask)
    assert sorted(first.tolist()) == [0, 1, 3]                      # the first row of each prompt
    assert first[inverse].tolist() == [0, 1, 0, 3, 1, 0]             # every row points at its prompt's first row
    # a real token equal to the pad id is not padding: [0, 6] (pad, 6) and [PAD-token 0, 6] differ
    ids2 = torch.tensor([[0, 6], [0, 6]])
    assert distinct_prompts(ids2, torch.tensor([[False, True], [True, True]])) is None
    assert distinct_prompts(*left_padded([[1], [2], [3]])) is None


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 1.0), (0.7, 50, 0.9), (0.0, None, 1.0)])
def test_draw_tokens_in_chunks_equals_one_pass_and_the_plain_draw(temperature, top_k, top_p):
    # 13 of a 20-row batch (finished rows left it), a 500-token vocabulary: chunks of 1, 4 and all rows give the
    # same bits, and those of the plain composition (sample_categorical with the batch's uniforms, the log-prob of
    # the drawn token under the full tempered distribution)
    from rlhfkit.core.logprobs import logprobs_from_logits
    from rlhfkit.rollout.sampling import GenerationConfig, draw_tokens, filter_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(13, 500, generator=g) * 3
    rows = torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 11, 14, 15, 17, 19])
    config = GenerationConfig(max_new_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p, pad_token_id=0)
    t = 1.0 if config.greedy else temperature
    if config.greedy:
        want = logits.argmax(-1)
    else:
        probs = torch.softmax(filter_logits(logits, t, top_k, top_p), dim=-1)
        want = sample_categorical(probs, torch.Generator().manual_seed(7), rows=rows, num_rows=20)
    want_lp = logprobs_from_logits(logits[:, None], want[:, None], t, chunk_rows=13).squeeze(1)
    # the formula itself, against float64: a float32 evaluation's rounding (`tolerances.logprob_tolerance`, the
    # logits given exactly: network factor 0)
    exact = torch.log_softmax(logits.double() / t, -1).gather(-1, want[:, None]).squeeze(1)
    assert ((want_lp.double() - exact).abs() <= logprob_tolerance(logits.abs(), exact, t, 0)).all()
    for chunk in (1, 4, 13):
        gen = None if config.greedy else torch.Generator().manual_seed(7)
        drawn, lp = draw_tokens(logits, config, t, gen, rows, 20, chunk_rows=chunk)
        assert torch.equal(drawn, want) and torch.equal(lp, want_lp)
        if gen is not None:  # the generator advanced by the batch's 20 uniforms, whatever the chunking
            assert torch.equal(torch.rand(1, generator=gen), torch.rand(1, generator=_advanced(7, 20)))


def _advanced(seed: int, n: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    torch.rand(n, generator=g, dtype=torch.float64)
    return g


def test_temperature_one_takes_the_logits_undivided_with_the_same_bits():
    from rlhfkit.core.logprobs import logprobs_from_logits
    from rlhfkit.rollout.sampling import filter_logits

    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(1)) * 4
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    z = logits / 1.0
    want = z.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    assert torch.equal(logprobs_from_logits(logits, tokens, 1.0), want)
    assert filter_logits(logits, 1.0, None, 1.0) is logits  # no copy at all
    assert torch.equal(filter_logits(logits, 1.0, 5, 0.8), filter_logits(z, 1.0, 5, 0.8))


def test_shared_prefix_length_by_hand():
    from rlhfkit.rollout.sampling import shared_prefix_length

    # real tokens [4, 5, 6, 7], [4, 5, 6, 9, 9], [4, 5, 8]: 2 shared ([4, 5]); padding is not compared
    assert shared_prefix_length(*left_padded([[4, 5, 6, 7], [4, 5, 6, 9, 9], [4, 5, 8]])) == 2
    # identical leading tokens up to the shortest prompt: each row keeps one token of its own
    assert shared_prefix_length(*left_padded([[4, 5, 6], [4, 5, 6, 7, 8]])) == 2
    assert shared_prefix_length(*left_padded([[4, 5, 6], [1, 5, 6]])) == 0
    assert shared_prefix_length(*left_padded([[4], [4, 5]])) == 0  # a one-token prompt keeps its token
    assert shared_prefix_length(*left_padded([[4, 5, 6]])) == 0     # one row: nothing to share


def _prefill_batches(model, ids, mask, config, **kwargs) -> tuple:
    """The rollout, the (rows, tokens) of every forward and the generator's state afterwards."""
    seen: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    gen = torch.Generator().manual_seed(5)
    try:
        r = sample(model, ids, mask, config, gen, **kwargs)
    finally:
        handle.remove()
    return r, seen, gen.get_state()


def test_shared_prefix_runs_once_and_changes_no_row():
    """Prompts that share a 12-token head (a chat template's system prompt), some of them repeated: the prefill
    runs the head once as one row, then only each distinct prompt's remaining tokens (left-padded behind the
    head), and every row's tokens, mask, stop flag and log-probs are those of prefilling every prompt whole, as
    is the generator's state. float64: the paths differ only by the rounding of other matrix shapes."""
    model = _stop_often_model()
    head = [5, 7, 9, 4, 6, 8, 4, 5, 9, 7, 13, 12]  # 12 tokens x 3 more distinct prompts >= MIN_PREFIX_SAVING
    tails = [[11], [12, 13, 14], [6, 6], [11], [8, 9, 10, 11, 12], [12, 13, 14]]
    ids, mask = left_padded([head + t for t in tails])
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, stop_token_ids=(2, 3), pad_token_id=PAD)

    fast, fast_seen, fast_state = _prefill_batches(model, ids, mask, config)
    plain, plain_seen, plain_state = _prefill_batches(model, ids, mask, config, share_prefix=False)

    assert plain_seen[0] == (4, 17)                  # the 4 distinct prompts, whole
    assert fast_seen[:2] == [(1, 12), (4, 5)]        # the head once, then the longest tail's 5 tokens
    assert fast_seen[2:] == plain_seen[1:]           # the decode steps are the same
    assert_same_rollouts(fast, plain, fast_state, plain_state)


def test_shared_prefix_is_not_used_with_a_sliding_window_cache():
    """A model with sliding-window layers (Mistral) prefills every prompt whole: its window counts cached
    columns, which the padding behind a shared head would shift."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=16, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=4, initializer_range=0.3, pad_token_id=PAD)).eval()
    head = [5, 7, 9, 4, 6, 8, 10, 11]
    ids, mask = left_padded([head + t for t in [[11], [12, 13, 14], [6, 6], [8, 9, 10, 11, 12]]])
    config = GenerationConfig(max_new_tokens=4, temperature=1.0, stop_token_ids=(2,), pad_token_id=PAD)
    _, seen, _ = _prefill_batches(model, ids, mask, config)
    assert seen[0] == (4, 13)


def test_a_short_shared_prefix_is_not_worth_its_own_forward():
    """Two prompts sharing 2 tokens save 2 row-tokens, under MIN_PREFIX_SAVING: one prefill over both."""
    from rlhfkit.rollout.sampling import MIN_PREFIX_SAVING

    assert MIN_PREFIX_SAVING > 2
    model = _stop_often_model()
    ids, mask = left_padded([[5, 7, 11], [5, 7, 12, 13]])
    config = GenerationConfig(max_new_tokens=2, temperature=1.0, stop_token_ids=(2,), pad_token_id=PAD)
    _, seen, _ = _prefill_batches(model, ids, mask, config)
    assert seen[0] == (2, 4)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_captured_hidden_states_equal_one_forward_over_prompt_response_and_end(monkeypatch, share_prefix):
    """`HiddenCapture(layers=1, end_id=2)`: for every row, the states after block 1 of `[prompt; response; end
    unless stopped]` equal one plain forward over that row alone (float64, RMSNorm without its float32 cast: to
    1e-12); the rollout itself is the one sampled without capturing. Prompts share a 12-token head (the prefix
    prefill with share_prefix) and repeat (one prefill per distinct prompt); rows stop at different steps and
    leave the forward batch (one step after they stop: their stop token is fed first)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from tolerances import float64_rms_norm

    from rlhfkit.models.trunk import run_blocks
    from rlhfkit.rollout.sampling import HiddenCapture

    monkeypatch.setattr(LlamaRMSNorm, "forward", float64_rms_norm)
    model = _stop_often_model()
    head = [5, 7, 9, 4, 6, 8, 4, 5, 9, 7, 13, 12]
    ids, mask = left_padded([head + t for t in [[11], [12, 13, 14], [6, 6], [11], [8, 9, 10, 11, 12]]])
    config = GenerationConfig(max_new_tokens=4, temperature=1.0, stop_token_ids=(3,), pad_token_id=PAD)
    capture = HiddenCapture(layers=1, end_id=2)
    r, seen, state = _prefill_batches(model, ids, mask, config, share_prefix=share_prefix, capture=capture)
    plain, plain_seen, plain_state = _prefill_batches(model, ids, mask, config, share_prefix=share_prefix)
    assert_same_rollouts(r, plain, state, plain_state)
    # finished rows left the forward batch while capturing too, never before the sampler without capture let
    # them go (one step later: their last token fed first); the last forward feeds [last, end] to those left
    decode = [n for n, t in seen if t == 1]
    plain_decode = [n for n, t in plain_seen if t == 1]
    assert min(decode) < 5 and len(decode) == len(plain_decode)
    assert all(n >= m for n, m in zip(decode, plain_decode))
    assert seen[-1] == (decode[-1], 2)
    assert capture.hidden.shape == (5, ids.shape[1] + r.response_ids.shape[1] + 1, 32)
    assert not capture.hidden.requires_grad and not capture.hidden.is_inference()
    assert 0 < int(r.stopped.sum()) < 5  # rows that stopped and rows that ran to max_new_tokens
    assert bool((r.stopped & (r.response_mask.sum(1) < r.response_ids.shape[1])).any())  # a stop fed mid-loop
    for b in range(5):
        tokens = ids[b][mask[b]].tolist() + r.response_ids[b][r.response_mask[b]].tolist()
        tokens += [] if bool(r.stopped[b]) else [2]
        row = torch.tensor([tokens])
        with torch.no_grad():
            want = run_blocks(model.model, torch.ones_like(row, dtype=torch.bool), 0, 1, input_ids=row)[0]
        got = capture.row_states(r, b)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # padding columns hold zeros (prompt padding, response padding, the end column of stopped rows)
    width, steps = ids.shape[1], r.response_ids.shape[1]
    assert capture.hidden[:, :width][~mask].abs().max() == 0
    assert capture.hidden[:, width:width + steps][~r.response_mask].abs().max() == 0
    assert capture.hidden[r.stopped, width + steps].abs().max() == 0
