"""Tests of padding-free packing in rlhfkit.rollout.forward (``packing=True``): the packed policy, shared-critic
and critic passes give the padded path's log-probs, entropies, logits, values and gradients (float64: to 1e-10;
float32: within rounding), from a trunk too; rows that share a prompt run it once; the LM head sees the real
response tokens only; models that cannot be packed take the padded path unchanged."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_forward import TEMPERATURE, V, batch, deeper_llama, llama_config, tiny_critic, tiny_llama
from tolerances import (assert_close_f32, assert_within, float64_rms_norm, forward_factor, gradient_factor,
                        gradient_terms, linear_terms,
                        logprob_tolerance)
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rlhfkit.models.value_head import ValueHead
from rlhfkit.rollout.forward import (critic_forward, packing_problem, policy_forward, policy_value_forward,
                                     trunk_forward)

# rows 0 and 2 share their prompt (run once when packed); rows of every length, left and right padding
SHARED = [([5, 17, 33, 9], [40, 8, 12]), ([40, 8, 12, 60, 21, 7, 30], [11]), ([5, 17, 33, 9], [50, 51, 52, 53, 54]),
          ([11, 3], [7, 7])]
# the same rows behind a 12-token head that every row shares (a chat template's system prompt), plus one more
# prompt: 4 prompts, so the head runs once instead of 4 times (12 x 3 tokens saved >= MIN_PREFIX_SAVING)
HEAD = [2, 3, 4, 6, 10, 13, 14, 15, 16, 18, 19, 20]
PREFIXED = [(HEAD + p, r) for p, r in SHARED] + [(HEAD + [9, 9], [4])]


@pytest.fixture(autouse=True)
def float64_norms(request, monkeypatch):
    """float64 tests: LlamaRMSNorm without its float32 cast, which would round a float64 model's gradients (and
    a shared prompt's summed gradient) to float32 size; the float32 tests keep the real norm."""
    if "float32" not in request.node.name:
        monkeypatch.setattr(LlamaRMSNorm, "forward", float64_rms_norm)


def _close(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("rows", [SHARED, PREFIXED, None], ids=["shared-prompts", "shared-prefix", "distinct-prompts"])
def test_packed_policy_forward_equals_the_padded_one_with_gradients(rows):
    model = tiny_llama().train()
    b = batch(rows) if rows is not None else batch(extra_left=2, extra_right=1)
    mask = b[3]
    w_lp, w_h = _weights(mask.shape, 0), _weights(mask.shape, 1)
    outs, grads = [], []
    for packing in (False, True):
        out = policy_forward(model, *b, temperature=TEMPERATURE, with_entropy=True, with_logits=True, packing=packing)
        outs.append(out)
        grads.append(_grads(model, (w_lp * out.logprobs + w_h * out.entropy).sum()))
    plain, packed = outs
    for name in ("logprobs", "entropy"):
        _close(getattr(packed, name), getattr(plain, name), name)
        assert (getattr(packed, name)[~mask] == 0).all()
    _close(packed.logits[mask], plain.logits[mask], "logits")
    assert (plain.logprobs[mask] < 0).all()
    assert grads[0].keys() == grads[1].keys() and "model.embed_tokens.weight" in grads[1]
    for name in grads[0]:
        _close(grads[1][name], grads[0][name], name)
    assert max(g.abs().max().item() for g in grads[0].values()) > 1e-2  # not a comparison of zeros


@pytest.mark.parametrize("rows, saved", [(SHARED, 4), (PREFIXED, 16 + 12 * 3)], ids=["shared-prompts", "shared-prefix"])
def test_packed_rows_that_share_a_prompt_run_it_once_and_the_head_sees_real_response_tokens_only(rows, saved):
    model = tiny_llama(torch.float32)
    tokens, head = [], []
    model.model.layers[0].register_forward_hook(lambda m, args, out: tokens.append(args[0].shape[:2]))
    model.lm_head.register_forward_hook(lambda m, args, out: head.append(tuple(args[0].shape)))
    b = batch(rows)
    with torch.no_grad():
        policy_forward(model, *b, packing=True)
    real = int(b[1].sum() + b[3].sum())
    # rows 0 and 2 share their prompt (4 tokens, 16 behind the head); the head runs once for the 4 prompts
    assert tokens == [(1, real - saved)]
    assert head == [(int(b[3].sum()), 32)]  # (N, H): no prompt and no padded response position


def test_packed_policy_forward_in_float32_within_rounding():
    model = tiny_llama(torch.float32)
    b = batch(SHARED)
    with torch.no_grad(), linear_terms(model.lm_head) as terms:
        plain = policy_forward(model, *b, temperature=TEMPERATURE, packing=False).logprobs
        packed = policy_forward(model, *b, temperature=TEMPERATURE, packing=True).logprobs
    mask = b[3]
    # the padded run's logit terms per (row, token); float32 through 2 decoder layers in other shapes
    tol = logprob_tolerance(terms[0][mask], plain[mask], TEMPERATURE, forward_factor(2))
    assert_within(packed[mask], plain[mask], tol, "logprobs")


@pytest.mark.parametrize("layers", [1, 3])
def test_packed_policy_forward_from_a_trunk_equals_the_padded_trunk_path(layers):
    model = deeper_llama().double().train()
    b = batch(SHARED)
    with torch.no_grad():
        trunk = trunk_forward(model, *b, layers=layers)
    w = _weights(b[3].shape, 2)
    outs, grads, seen = [], [], []
    model.model.layers[layers].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    for packing in (False, True):
        out = policy_forward(model, *b, temperature=TEMPERATURE, with_entropy=True, trunk=trunk, packing=packing)
        outs.append(out)
        grads.append(_grads(model, (w * out.logprobs).sum() + out.entropy.sum()))
    assert seen == [4, 1]  # the blocks above the trunk: padded (B = 4 rows), then one packed row
    _close(outs[1].logprobs, outs[0].logprobs, "logprobs")
    _close(outs[1].entropy, outs[0].entropy, "entropy")
    # and both equal the plain forward without a trunk
    with torch.no_grad():
        _close(outs[1].logprobs, policy_forward(model, *b, temperature=TEMPERATURE).logprobs, "vs plain")
    assert grads[0].keys() == grads[1].keys()
    assert not any(n.startswith("model.layers.0.") for n in grads[1])  # nothing reaches the trunk's blocks
    for name in grads[0]:
        _close(grads[1][name], grads[0][name], name)


def test_packed_shared_critic_values_and_gradients_equal_the_padded_ones():
    model = tiny_llama().train()
    head = ValueHead.for_model(model).double()
    with torch.no_grad():
        head.summary.weight.normal_(generator=torch.Generator().manual_seed(3))
    b = batch(SHARED)
    mask = b[3]
    w = _weights(mask.shape, 4)
    results = []
    for packing in (False, True):
        out, values = policy_value_forward(model, head, *b, temperature=TEMPERATURE, with_entropy=True,
                                           packing=packing)
        loss = (w * values).sum() + out.logprobs.sum()
        model.zero_grad()
        head.zero_grad()
        loss.backward()
        results.append((out.logprobs, values, {n: p.grad.clone() for n, p in
                                               [*model.named_parameters(), *head.named_parameters()]
                                               if p.grad is not None}))
    (lp0, v0, g0), (lp1, v1, g1) = results
    _close(lp1, lp0, "logprobs")
    _close(v1, v0, "values")
    assert (v1[~mask] == 0).all() and v0[mask].abs().min() > 0
    assert g0.keys() == g1.keys() and "summary.weight" in g1
    for name in g0:
        _close(g1[name], g0[name], name)


@pytest.mark.parametrize("with_trunk", [False, True])
def test_packed_critic_values_and_gradients_equal_the_padded_ones(with_trunk):
    critic = tiny_critic().double().train()
    b = batch(SHARED)
    trunk = None
    if with_trunk:
        with torch.no_grad():
            trunk = trunk_forward(critic, *b, layers=1)
    w = _weights(b[3].shape, 5)
    values, grads, seen = [], [], []
    critic._backbone().layers[1].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    for packing in (False, True):
        v = critic_forward(critic, *b, trunk=trunk, packing=packing)
        values.append(v)
        grads.append(_grads(critic, (w * v).sum()))
    assert seen == [4, 1]  # padded (B = 4 rows), then one packed row
    _close(values[1], values[0], "values")
    assert (values[1][~b[3]] == 0).all() and values[0][b[3]].abs().min() > 0
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        _close(grads[1][name], grads[0][name], name)


def test_packed_lora_policy_and_disabled_adapter_equal_the_padded_ones():
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(llama_config()).double(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    b = batch(SHARED)
    with torch.no_grad():
        for context in (model.disable_adapter, None):
            if context is None:
                plain, packed = (policy_forward(model, *b, packing=p).logprobs for p in (False, True))
            else:
                with context():
                    plain, packed = (policy_forward(model, *b, packing=p).logprobs for p in (False, True))
            _close(packed, plain, "adapter off" if context else "adapter on")
    assert packing_problem(model) is None


def test_models_that_cannot_be_packed_take_the_padded_path_unchanged():
    eager = tiny_llama(torch.float32)
    eager.config._attn_implementation = "eager"
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
                                           final_logit_softcapping=30.0)).eval()
    b = batch(SHARED)
    for model, why in ((eager, "attention implementation is 'eager'"), (gemma, "cannot be applied by hand")):
        assert why in packing_problem(model)
        with torch.no_grad():
            assert torch.equal(policy_forward(model, *b, with_entropy=True, packing=True).logprobs,
                               policy_forward(model, *b, with_entropy=True).logprobs)
    assert packing_problem(tiny_llama(torch.float32)) is None


def test_packed_gradients_in_float32_within_rounding():
    """Gradients within the forward and backward's rounding of their reduction terms (tests/tolerances.py)."""
    model = tiny_llama(torch.float32).train()
    b = batch(SHARED)
    runs = []
    terms = gradient_terms(model, lambda: runs.append(
        _grads(model, policy_forward(model, *b, temperature=TEMPERATURE).logprobs.sum())))
    (plain,) = runs
    packed = _grads(model, policy_forward(model, *b, temperature=TEMPERATURE, packing=True).logprobs.sum())
    assert plain.keys() == packed.keys()
    for name in plain:
        assert_close_f32(packed[name], plain[name], terms[name], gradient_factor(2), name)


# ------------------------------------------------------------------------------------------- fused LM head
@pytest.mark.parametrize("path", ["padded", "packed", "trunk", "packed-trunk"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_lm_head_equals_the_head_then_logprobs_bit_for_bit(path, dtype, monkeypatch):
    """policy_forward applies a plain nn.Linear head through `core.logprobs.head_logprobs_and_entropy` (by
    default; ``fused_head=False``: the head's call then `logprobs_and_entropy`): the same log-probs, entropies and
    parameter gradients, bit for bit, on every path (the same products and block passes on the same data)."""
    import rlhfkit.rollout.forward as fw

    calls = []
    fused_fn = fw.head_logprobs_and_entropy
    monkeypatch.setattr(fw, "head_logprobs_and_entropy", lambda *a, **k: calls.append(1) or fused_fn(*a, **k))
    model = deeper_llama().to(getattr(torch, dtype)).train()
    b = batch(SHARED)
    mask = b[3]
    w_lp, w_h = _weights(mask.shape, 0).to(model.dtype), _weights(mask.shape, 1).to(model.dtype)
    trunk = trunk_forward(model, *b, layers=2).hidden.detach() if "trunk" in path else None
    results = []
    for fused in (False, True):
        kw = dict(temperature=TEMPERATURE, with_entropy=True, packing="packed" in path, fused_head=fused)
        if trunk is not None:
            from rlhfkit.models.trunk import Trunk
            kw["trunk"] = Trunk(trunk, 2)
        out = policy_forward(model, *b, **kw)
        grads = _grads(model, (w_lp * out.logprobs + w_h * out.entropy).sum())
        results.append((out, grads))
    (plain, g_plain), (fused, g_fused) = results
    assert len(calls) == 1  # the fused run only
    assert torch.equal(fused.logprobs, plain.logprobs) and torch.equal(fused.entropy, plain.entropy)
    assert fused.logits is None and g_fused.keys() == g_plain.keys() and "lm_head.weight" in g_plain
    for name in g_plain:
        assert torch.equal(g_fused[name], g_plain[name]), name
    assert plain.logprobs[mask].abs().min() > 0


def test_heads_that_are_not_fused():
    """The fused head needs exactly an nn.Linear without hooks, plain float32/float64 weights of the hidden
    states' dtype, and no autocast: a LoRA head, a hooked head, bf16 hidden states and autocast take the head's
    own call (and `with_logits` needs the logits, so it never fuses)."""
    from rlhfkit.rollout.forward import fusable_head

    model = tiny_llama(torch.float32)
    hidden = torch.zeros(2, 32)
    assert fusable_head(model.lm_head, hidden) == (model.lm_head.weight, None)
    assert fusable_head(model.lm_head, hidden.double()) is None  # another dtype than the weight's
    assert fusable_head(model.lm_head, hidden.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusable_head(model.lm_head, hidden) is None
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: None)
    assert fusable_head(model.lm_head, hidden) is None
    handle.remove()
    lora = get_peft_model(tiny_llama(torch.float32), LoraConfig(r=2, target_modules=["lm_head"]))
    assert fusable_head(lora.get_base_model().get_output_embeddings(), hidden) is None
    assert fusable_head(torch.nn.Embedding(4, 32), hidden) is None


@pytest.mark.parametrize("packing", [False, True])
def test_shared_critic_reads_the_fused_heads_input_bit_for_bit(packing, monkeypatch):
    """`policy_value_forward` takes the LM head's input from `policy_forward` (no hook), so a plain linear head is
    fused there too: the same log-probs, values and gradients, bit for bit, as with the head's own call
    (``fused_head=False``), padded and packed; a model that calls its own head (a logit transform) is still read
    by the hook."""
    import rlhfkit.rollout.forward as fw

    calls = []
    fused_fn = fw.head_logprobs_and_entropy
    monkeypatch.setattr(fw, "head_logprobs_and_entropy", lambda *a, **k: calls.append(1) or fused_fn(*a, **k))
    model = tiny_llama(torch.float32).train()
    head = ValueHead.for_model(model)
    with torch.no_grad():  # the head starts at zero
        head.summary.weight.normal_(generator=torch.Generator().manual_seed(3))
    b = batch(SHARED)
    w = _weights(b[3].shape, 4).float()
    results = []
    for fused in (False, True):
        out, values = policy_value_forward(model, head, *b, temperature=TEMPERATURE, with_entropy=True,
                                           packing=packing, fused_head=fused)
        model.zero_grad()
        head.zero_grad()
        ((w * values).sum() + (w * out.logprobs).sum() + out.entropy.sum()).backward()
        results.append((out.logprobs, out.entropy, values, {n: p.grad.clone() for n, p in
                                                             [*model.named_parameters(), *head.named_parameters()]}))
    assert len(calls) == 1 and "forward" not in model.lm_head.__dict__ and not model.lm_head._forward_pre_hooks
    (lp0, h0, v0, g0), (lp1, h1, v1, g1) = results
    assert torch.equal(lp1, lp0) and torch.equal(h1, h0) and torch.equal(v1, v0) and v0[b[3]].abs().min() > 0
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name
    # the fallback path: Gemma2's final logit softcapping makes the model call its own head, read by the hook
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=30.0, pad_token_id=0)).eval()
    gemma_head = ValueHead.for_model(gemma)
    with torch.no_grad():
        gemma_head.summary.weight.normal_(generator=torch.Generator().manual_seed(3))
    out, values = policy_value_forward(gemma, gemma_head, *b, packing=packing)
    assert values.shape == b[3].shape and values[b[3]].abs().min() > 0 and not gemma.lm_head._forward_pre_hooks
