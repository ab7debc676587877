"""Tests of rlhfkit.rollout.forward: alignment against a naive full forward, padding invariance, gradients,
peft adapters, autocast, models with a logit transform, the critic's positions, and trim_batch."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tolerances import (assert_close_f32, assert_within, float64_rms_norm, forward_factor, linear_terms,
                        logprob_tolerance)
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhfkit.core.logprobs import entropy_from_logits
from rlhfkit.models.reward import RewardModel
from rlhfkit.rollout.forward import critic_forward, policy_forward, trim_batch, trunk_decoder, trunk_forward

V = 96
PAD = 0
TEMPERATURE = 0.7
# (query, response) pairs of different lengths; the batch left-pads queries and right-pads responses
ROWS = [([5, 17, 33, 9], [40, 8, 12]), ([40, 8, 12, 60, 21, 7, 30], [11]), ([11, 3], [50, 51, 52, 53, 54])]


def llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, initializer_range=0.3, pad_token_id=PAD, bos_token_id=1,
                       eos_token_id=2, **kw)


def tiny_llama(dtype: torch.dtype = torch.float64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).to(dtype).eval()


def batch(rows=ROWS, extra_left: int = 0, extra_right: int = 0):
    """Left-padded queries (B, P) and right-padded responses (B, T), with optional all-pad columns."""
    P = max(len(q) for q, _ in rows) + extra_left
    T = max(len(r) for _, r in rows) + extra_right
    q_ids = torch.tensor([[PAD] * (P - len(q)) + q for q, _ in rows])
    q_mask = torch.tensor([[False] * (P - len(q)) + [True] * len(q) for q, _ in rows])
    r_ids = torch.tensor([r + [PAD] * (T - len(r)) for _, r in rows])
    r_mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for _, r in rows])
    return q_ids, q_mask, r_ids, r_mask


def naive_logits(model, q_ids, q_mask, r_ids, r_mask) -> torch.Tensor:
    """Full-sequence logits (B, L, V) with position ids from the mask, sliced at positions P-1 … P+T-2."""
    ids = torch.cat([q_ids, r_ids], 1)
    mask = torch.cat([q_mask, r_mask], 1).long()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    P, T = q_ids.shape[1], r_ids.shape[1]
    return logits[:, P - 1:P - 1 + T]  # the logits at position P-1+t predict response token t


def naive_logprobs(model, q_ids, q_mask, r_ids, r_mask, temperature=TEMPERATURE) -> torch.Tensor:
    logp = torch.log_softmax(naive_logits(model, q_ids, q_mask, r_ids, r_mask) / temperature, dim=-1)
    return torch.where(r_mask, logp.gather(-1, r_ids[..., None]).squeeze(-1), 0.0)


# ------------------------------------------------------------------------------------------- policy_forward
def test_logprobs_entropy_logits_match_a_naive_full_forward():
    model = tiny_llama()
    b = batch()
    with torch.no_grad():
        out = policy_forward(model, *b, temperature=TEMPERATURE, with_entropy=True, with_logits=True)
        expected = naive_logprobs(model, *b)
        ref_logits = naive_logits(model, *b)
    B, T = b[2].shape
    assert out.logprobs.shape == (B, T) and out.logprobs.dtype == torch.float64
    torch.testing.assert_close(out.logprobs, expected, rtol=0, atol=1e-10)
    assert out.logits.shape == (B, T, V)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-10)
    ent = torch.where(b[3], entropy_from_logits(ref_logits, TEMPERATURE), 0.0)
    torch.testing.assert_close(out.entropy, ent, rtol=0, atol=1e-10)
    assert (out.logprobs[~b[3]] == 0).all() and (out.entropy[~b[3]] == 0).all()
    assert (out.logprobs[b[3]] < 0).all()
    # the temperature matters: at T=1 the values differ
    with torch.no_grad():
        plain = policy_forward(model, *b).logprobs
    assert (plain[b[3]] - out.logprobs[b[3]]).abs().min() > 1e-6


def test_parameter_gradients_equal_the_plain_log_softmax_path(monkeypatch):
    # policy_forward's one-pass log-probs + entropy (core.logprobs.logprobs_and_entropy, hand-written backward) vs
    # the plain autograd of log_softmax on the naive logits: the same gradient of every parameter (float64
    # throughout: the two paths add the log-prob and entropy gradients in different orders, a 1e-16 difference
    # that Llama's float32 RMSNorm would round to float32 size)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", float64_rms_norm)
    model = tiny_llama()
    b = batch()
    g = torch.Generator().manual_seed(0)
    w_lp, w_h = torch.randn(b[2].shape, generator=g, dtype=torch.float64), torch.randn(b[2].shape, generator=g,
                                                                                        dtype=torch.float64)
    out = policy_forward(model, *b, temperature=TEMPERATURE, with_entropy=True)
    fast = torch.autograd.grad((w_lp * out.logprobs + w_h * out.entropy).sum(), list(model.parameters()))
    logits = naive_logits(model, *b)
    ent = torch.where(b[3], entropy_from_logits(logits, TEMPERATURE), 0.0)
    plain = torch.autograd.grad((w_lp * naive_logprobs(model, *b) + w_h * ent).sum(), list(model.parameters()))
    for (name, _), f, p in zip(model.named_parameters(), fast, plain):
        torch.testing.assert_close(f, p, rtol=0, atol=1e-12, msg=name)
    assert max(p.abs().max().item() for p in plain) > 1e-2  # not a comparison of zeros


def test_lm_head_sees_only_the_response_predicting_positions():
    model = tiny_llama(torch.float32)
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(tuple(args[0].shape)))
    b = batch()
    with torch.no_grad():
        policy_forward(model, *b)
    assert seen == [(3, b[2].shape[1], 32)]  # (B, T, H), not (B, P + T, H)


def test_defaults_return_no_entropy_no_logits_and_float32_for_float32_model():
    model = tiny_llama(torch.float32)
    with torch.no_grad():
        out = policy_forward(model, *batch())
    assert out.entropy is None and out.logits is None and out.logprobs.dtype == torch.float32


def test_padding_invariance_each_row_alone_vs_in_a_padded_batch():
    model = tiny_llama(torch.float32)
    with torch.no_grad(), linear_terms(model.lm_head) as terms:
        batched = policy_forward(model, *batch(extra_left=2, extra_right=3), temperature=TEMPERATURE).logprobs
        for i, row in enumerate(ROWS):
            alone = policy_forward(model, *batch([row]), temperature=TEMPERATURE).logprobs[0]
            n = len(row[1])
            # float32 through the 2 decoder layers in other shapes, then the log-softmax over V
            assert_within(batched[i, :n], alone, logprob_tolerance(terms[0][i, :n], alone, TEMPERATURE,
                                                                   forward_factor(2)), f"row {i}")
            assert (batched[i, n:] == 0).all()


def test_gradients_match_the_naive_computation():
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for fn in (lambda m, b: policy_forward(m, *b, temperature=TEMPERATURE).logprobs,
               lambda m, b: naive_logprobs(m, *b)):
        model = tiny_llama().train()
        b = batch()
        loss = (fn(model, b) * weights).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12, msg=name)
    assert grads[0]["model.embed_tokens.weight"].abs().sum() > 0 and grads[0]["lm_head.weight"].abs().sum() > 0


def test_peft_lora_model_and_disabled_adapter():
    base = tiny_llama()
    with torch.no_grad():
        base_logprobs = naive_logprobs(base, *batch())
    # init_lora_weights=False: random A and B, so the adapter changes the outputs
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                                 init_lora_weights=False))
    b = batch()
    with torch.no_grad():
        adapted = policy_forward(peft_model, *b, temperature=TEMPERATURE).logprobs
        torch.testing.assert_close(adapted, naive_logprobs(peft_model, *b), rtol=0, atol=1e-10)
        assert (adapted - base_logprobs).abs().max() > 1e-3
        with peft_model.disable_adapter():
            reference = policy_forward(peft_model, *b, temperature=TEMPERATURE).logprobs
    torch.testing.assert_close(reference, base_logprobs, rtol=0, atol=1e-10)
    # gradients reach the LoRA parameters
    policy_forward(peft_model, *b).logprobs.sum().backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_autocast_runs_the_model_in_bfloat16_and_returns_float32():
    model = tiny_llama(torch.float32)
    b = batch()
    with torch.no_grad():
        out = policy_forward(model, *b, temperature=TEMPERATURE, with_logits=True, autocast_dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_logits = naive_logits(model, *b)
    assert out.logits.dtype == torch.bfloat16 and out.logprobs.dtype == torch.float32
    # same computation under the same autocast: the logits agree to the last bf16 bit
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=0)


def test_model_with_logit_softcapping_uses_its_own_head():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.3,
                          final_logit_softcapping=2.0, pad_token_id=PAD)
    model = Gemma2ForCausalLM(config).eval()  # float32: Gemma2's eager attention gives nan on padded rows in float64
    b = batch()
    with torch.no_grad(), linear_terms(model.lm_head) as terms:
        out = policy_forward(model, *b, temperature=TEMPERATURE, with_logits=True)
        expected = naive_logprobs(model, *b)
        mask = torch.cat([b[1], b[3]], 1).long()
        hidden = model.model(input_ids=torch.cat([b[0], b[2]], 1), attention_mask=mask,
                             position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        uncapped = model.lm_head(hidden)
    # the same hidden states; the head's dot products in other matrix shapes (2 evaluations of one stage), the cap
    # (|d tanh| <= 1) and the log-softmax
    assert_within(out.logprobs, expected, logprob_tolerance(terms[0], expected, TEMPERATURE, 2), "log-probs")
    assert uncapped.abs().max() > 2.5 and out.logits.abs().max() <= 2.0  # the soft cap was applied


def test_distributed_data_parallel_wrapper_goes_through_its_forward(tmp_path):
    import torch.distributed as dist

    model = tiny_llama()
    b = batch()
    with torch.no_grad():
        expected = naive_logprobs(model, *b)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert trunk_decoder(ddp) is None  # DDP must see the forward call: never split
        logprobs = policy_forward(ddp, *b, temperature=TEMPERATURE).logprobs
        logprobs.sum().backward()
        got = logprobs.detach().clone()
        del ddp, logprobs  # release DDP's reducer while the process group still exists
    finally:
        dist.destroy_process_group()
    assert calls == [1]  # the full model ran, via DDP's forward (which prepares the gradient all-reduce)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert model.lm_head.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- critic_forward
def tiny_critic() -> RewardModel:
    torch.manual_seed(3)
    backbone = LlamaForSequenceClassification(llama_config(num_labels=1)).eval()
    return RewardModel(backbone, "decoder", "last", ["score"], [1.0])


def test_critic_values_are_token_scores_at_the_response_predicting_positions():
    critic = tiny_critic()
    q_ids, q_mask, r_ids, r_mask = batch()
    with torch.no_grad():
        values = critic_forward(critic, q_ids, q_mask, r_ids, r_mask)
        token_scores = critic(torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)).token_scores
    P = q_ids.shape[1]
    assert values.shape == r_ids.shape and values.dtype == torch.float32
    for i, (q, r) in enumerate(ROWS):
        for t in range(len(r)):
            # value t: the state before response token t, i.e. the output at sequence position P-1+t
            assert values[i, t] == token_scores[i, P - 1 + t]
        assert (values[i, len(r):] == 0).all()
    assert values[r_mask].abs().min() > 0


def test_critic_padding_invariance():
    critic = tiny_critic()
    with torch.no_grad(), linear_terms(critic._head()) as terms:
        batched = critic_forward(critic, *batch(extra_left=3, extra_right=2))
        for i, row in enumerate(ROWS):
            alone = critic_forward(critic, *batch([row]))[0]
            # float32 through the 2 decoder layers in other shapes, relative to the head's terms
            assert_close_f32(batched[i, :len(row[1])], alone, terms[0].max(), forward_factor(2), f"row {i}")


# ------------------------------------------------------------------------------------------- trunks
def deeper_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = llama_config()
    config.num_hidden_layers = 4
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("layers", [1, 3, 4])
def test_policy_forward_from_a_trunk_equals_the_plain_forward_bit_for_bit(layers):
    model = deeper_llama()
    b = batch()
    with torch.no_grad():
        plain = policy_forward(model, *b, temperature=TEMPERATURE, with_entropy=True, with_logits=True)
        trunk = trunk_forward(model, *b, layers=layers)
        fast = policy_forward(model, *b, temperature=TEMPERATURE, with_entropy=True, with_logits=True, trunk=trunk)
    assert trunk.hidden.shape == (3, b[0].shape[1] + b[2].shape[1], 32) and trunk.layers == layers
    for name in ("logprobs", "entropy", "logits"):  # the same ops in the same order
        assert torch.equal(getattr(fast, name), getattr(plain, name)), name
    # gradients of the blocks above the trunk: the same as the plain forward's (whose lower blocks also get some)
    grads = []
    for t in (None, trunk):
        model.zero_grad()
        policy_forward(model, *b, temperature=TEMPERATURE, trunk=t).logprobs.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    upper = [n for n in grads[0] if n.startswith("lm_head") or n.startswith("model.norm") or
             any(n.startswith(f"model.layers.{i}.") for i in range(layers, 4))]
    assert sorted(grads[1]) == sorted(upper)  # nothing reaches the trunk's blocks from the trunk path
    for n in upper:
        assert torch.equal(grads[1][n], grads[0][n]), n


def test_critic_forward_from_a_trunk_equals_the_plain_forward_bit_for_bit():
    critic = tiny_critic()
    b = batch()
    with torch.no_grad():
        plain = critic_forward(critic, *b)
        fast = critic_forward(critic, *b, trunk=trunk_forward(critic, *b, layers=1))
    assert plain[b[3]].abs().min() > 0 and torch.equal(fast, plain)


def test_models_that_cannot_run_from_a_trunk_are_refused():
    base = tiny_llama(torch.float32)
    assert trunk_decoder(base) is base.model
    critic = tiny_critic()
    assert trunk_decoder(critic) is critic.model.base_model
    peft_model = get_peft_model(tiny_llama(torch.float32), LoraConfig(r=4, target_modules=["q_proj"]))
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    from rlhfkit.models.adapters import apply_lora
    lora_critic = apply_lora(tiny_critic(), r=2)
    for model in (peft_model, gemma, lora_critic):
        assert trunk_decoder(model) is None, type(model).__name__
    b = batch()
    trunk = trunk_forward(base, *b, layers=1)
    with pytest.raises(ValueError, match="cannot run from a trunk"):
        policy_forward(peft_model, *b, trunk=trunk)
    with pytest.raises(ValueError, match="cannot run from a trunk"):
        critic_forward(lora_critic, *b, trunk=trunk)
    with pytest.raises(ValueError, match="do not match the sequence"):
        policy_forward(base, *batch(extra_left=1), trunk=trunk)


# ------------------------------------------------------------------------------------------- trim_batch
def test_trim_batch_offsets_and_round_trip():
    model = tiny_llama(torch.float32)
    b = batch(extra_left=2, extra_right=3)
    trimmed = trim_batch(*b)
    P, T = b[0].shape[1], b[2].shape[1]
    assert trimmed.query_start == 2 and trimmed.response_end == T - 3 and trimmed.response_length == T
    assert trimmed.query_ids.shape[1] == P - 2 and trimmed.response_ids.shape[1] == T - 3
    assert trimmed.query_mask[:, 0].any() and trimmed.response_mask[:, -1].any()
    torch.testing.assert_close(trimmed.query_ids, b[0][:, 2:], rtol=0, atol=0)
    with torch.no_grad(), linear_terms(model.lm_head) as terms:
        full = policy_forward(model, *b, temperature=TEMPERATURE).logprobs
        part = policy_forward(model, *trimmed[:4], temperature=TEMPERATURE).logprobs
    restored = trimmed.restore(part)
    assert restored.shape == (3, T)
    # float32 through the 2 decoder layers without the padding columns, then the log-softmax over V
    assert_within(restored, full, logprob_tolerance(terms[0], full, TEMPERATURE, forward_factor(2)), "log-probs")
    # a batch without padding columns is unchanged
    again = trim_batch(*trimmed[:4])
    assert again.query_start == 0 and again.response_end == trimmed.response_end
    assert again.restore(part) is part


def test_trim_batch_all_padding_responses_keep_one_query_column():
    q_ids, q_mask = torch.tensor([[0, 0, 7]]), torch.tensor([[False, False, True]])
    r_ids, r_mask = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool)
    trimmed = trim_batch(q_ids, q_mask, r_ids, r_mask)
    assert trimmed.query_start == 2 and trimmed.response_end == 0 and trimmed.response_ids.shape == (1, 0)
    restored = trimmed.restore(torch.zeros(1, 0), value=-1.0)
    torch.testing.assert_close(restored, torch.full((1, 4), -1.0), rtol=0, atol=0)
    with pytest.raises(ValueError):
        trimmed.restore(torch.zeros(1, 2))


def test_shape_errors():
    model = tiny_llama(torch.float32)
    q_ids, q_mask, r_ids, r_mask = batch()
    with pytest.raises(ValueError, match="batch sizes"):
        policy_forward(model, q_ids[:2], q_mask[:2], r_ids, r_mask)
    with pytest.raises(ValueError, match="shape"):
        policy_forward(model, q_ids, q_mask[:, 1:], r_ids, r_mask)
