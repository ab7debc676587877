"""Tests of rlhfkit.rollout.prepack: prepacked decode products equal the plain ones, apply only where they may,
leave the modules as they were; the sampler with them samples what it samples without them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_within, forward_factor, linear_terms, logprob_tolerance
from torch import nn

import rlhfkit.rollout.sampling as sampling
import rlhfkit.rollout.prepack as prepack
from rlhfkit.rollout.prepack import (BACKENDS, MAX_PREPACK_ROWS, MIN_PREPACK_ROWS, MIN_PREPACK_STEPS,
                                     REPACK_ROW_STEPS, PrepackedLinears, available_backends, default_backend,
                                     prepack_available)
from rlhfkit.rollout.sampling import GenerationConfig, sample

EPS32 = torch.finfo(torch.float32).eps
HERE = available_backends()
needs_mkl = pytest.mark.skipif(not HERE, reason="this torch build has neither oneDNN nor MKL")
# every backend this build has (the fast path of each is checked against the plain product)
per_backend = pytest.mark.parametrize("backend", HERE or [pytest.param(None, marks=pytest.mark.skip(
    reason="this torch build has neither oneDNN nor MKL"))])


def _linear_bound(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Two float32 evaluations of x @ Wᵀ + b differ by a few eps of each output's Σ|terms| per reduction level."""
    terms = x.abs() @ linear.weight.abs().t() + (linear.bias.abs() if linear.bias is not None else 0)
    return 2 * math.log2(linear.in_features) * EPS32 * terms


@per_backend
@pytest.mark.parametrize("bias", [True, False])
def test_a_prepared_call_uses_the_packed_weight_and_equals_the_plain_product(bias, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 80, bias=bias), nn.Linear(80, 16, bias=bias))
    x = torch.randn(6, 1, 48)  # a decode step's (rows, 1, hidden) input
    with torch.inference_mode():
        with PrepackedLinears(model, backend=backend) as packer:
            assert packer.backend == backend and len(packer.modules) == 2
            packer.prepare(rows=6, steps_left=10)
            hidden = model[0](x)
            out = model[1](hidden)
            assert packer.packs == 2                     # each weight packed once for 6 rows...
            assert torch.equal(model[1](model[0](x)), out)
            assert packer.packs == 2                     # ...and reused by the next step
            x5 = torch.randn(5, 1, 48)
            other = model(x5)                            # another row count: the plain product, nothing packed
            assert packer.packs == 2
            # finished rows left the batch, few steps remain: (6 - 5) x 10 row-steps, not worth a repack: padded
            packer.prepare(rows=5, steps_left=10)
            padded = model[0](x5)
            assert (packer.packs, packer.padded_calls, packer.rows) == (2, 1, 6)
            x4 = torch.randn(4, 1, 48)
            packer.prepare(rows=4, steps_left=REPACK_ROW_STEPS // 2)  # (6 - 4) x 64: packed again for 4
            four = model[0](x4)
            assert (packer.packs, packer.padded_calls, packer.rows) == (3, 1, 4)
        assert hidden.shape == (6, 1, 80) and out.shape == (6, 1, 16) and other.shape == (5, 1, 16)
        assert padded.shape == (5, 1, 80) and padded.is_contiguous() and four.shape == (4, 1, 80)
        assert torch.equal(other, model(x5))
        assert_within(hidden, model[0](x), _linear_bound(x, model[0]), "first linear")
        assert_within(out, model[1](hidden), _linear_bound(hidden, model[1]), "second linear")
        assert_within(padded, model[0](x5), _linear_bound(x5, model[0]), "first linear, 5 rows padded to 6")
        assert_within(four, model[0](x4), _linear_bound(x4, model[0]), "first linear, 4 rows")


@needs_mkl
def test_exit_restores_the_modules_and_frees_the_packs():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.inference_mode(), PrepackedLinears(model) as packer:
        assert all("forward" in m.__dict__ for m in model)
        packer.prepare(4, 10)
        model(torch.randn(4, 8))
        assert len(packer._packed) == 2
    assert all("forward" not in m.__dict__ for m in model)
    assert packer._packed == {} and packer.rows is None
    x = torch.randn(4, 8)
    assert torch.equal(model(x), model[1](F.linear(x, model[0].weight, model[0].bias)))


def test_the_default_backend_is_mkl_on_intel_cpus_and_onednn_elsewhere(monkeypatch):
    for vendor, have, want in (("GenuineIntel", ["onednn", "mkl"], "mkl"), ("AuthenticAMD", ["onednn", "mkl"], "onednn"),
                               ("", ["onednn", "mkl"], "onednn"), ("GenuineIntel", ["onednn"], "onednn"),
                               ("AuthenticAMD", ["mkl"], "mkl"), ("AuthenticAMD", [], None)):
        monkeypatch.setattr(prepack, "_cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(prepack, "available_backends", lambda have=have: have)
        assert default_backend() == want, (vendor, have)
        assert PrepackedLinears(nn.Linear(4, 4)).backend == want
    assert BACKENDS == ("onednn", "mkl")


def test_an_unknown_backend_is_an_error_and_a_missing_one_packs_nothing(monkeypatch):
    with pytest.raises(ValueError, match="onednn, mkl"):
        PrepackedLinears(nn.Linear(4, 4), backend="blas")
    monkeypatch.setattr(prepack, "available_backends", lambda: ["mkl"])
    assert PrepackedLinears(nn.Linear(4, 4), backend="onednn").modules == []
    assert not prepack_available(nn.Linear(4, 4), backend="onednn")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepare_packs_only_for_few_rows_and_enough_steps(backend):
    packer = PrepackedLinears(nn.Linear(4, 4), backend=backend)
    low = MIN_PREPACK_ROWS[backend]
    assert packer.min_rows == low
    packer.prepare(MAX_PREPACK_ROWS, MIN_PREPACK_STEPS)
    assert packer.rows == MAX_PREPACK_ROWS
    packer.prepare(MAX_PREPACK_ROWS + 1, 100)
    assert packer.rows is None                           # many rows: the per-call copy is a small part
    packer.prepare(8, MIN_PREPACK_STEPS - 1)
    assert packer.rows is None                           # too few steps left to pay for packing
    packer.prepare(8, 50)
    assert packer.rows == 8
    packer.prepare(8, 1)
    assert packer.rows == 8                              # packed for these rows already: kept to the last step
    packer.prepare(7, 2)
    assert (packer.rows, packer.live) == (8, 7)          # one row left, 2 steps: padded up to 8, not repacked
    packer.prepare(low, REPACK_ROW_STEPS)
    assert (packer.rows, packer.live) == (low, low)      # (8 - low) x 128 row-steps: repacked
    if low > 1:
        packer.prepare(low - 1, 1)
        assert packer.rows is packer.live is None        # fewer rows: the plain product reads at memory speed
    assert PrepackedLinears(nn.Linear(4, 4), backend=backend, min_rows=2).min_rows == 2


@per_backend
def test_packs_kept_for_the_last_steps_are_used_and_not_repacked(backend):
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    x = torch.randn(6, 1, 16)
    with torch.inference_mode(), PrepackedLinears(model, backend=backend) as packer:
        packer.prepare(6, 10)
        first = model(x)
        packer.prepare(6, 1)                             # the last step, same rows: the same packed weight
        last = model(x)
        assert packer.packs == 1 and len(packer._packed) == 1
    assert torch.equal(first, last)


@needs_mkl
def test_only_plain_float32_cpu_linears_without_replaced_forwards_are_patched():
    class Wrapped(nn.Linear):  # keeps nn.Linear's forward, as FSDP2's FSDPLinear does
        pass

    class Quantised(nn.Linear):  # a product of its own
        def forward(self, x):
            return super().forward(x).round()

    hooked = nn.Linear(8, 8)
    hooked.forward = lambda x: x  # e.g. accelerate's hooks replace an instance's forward
    model = nn.ModuleDict({"plain": nn.Linear(8, 8), "bf16": nn.Linear(8, 8).bfloat16(), "sub": Wrapped(8, 8),
                           "own": Quantised(8, 8), "hooked": hooked})
    packer = PrepackedLinears(model)
    assert packer.modules == [model["plain"], model["sub"]]
    assert prepack_available(model) and not prepack_available(model, autocast_dtype=torch.bfloat16)
    assert not prepack_available(nn.Sequential(nn.Linear(4, 4).bfloat16()))
    with packer:
        assert model["hooked"].forward(torch.ones(2, 8)).equal(torch.ones(2, 8))  # its own forward untouched
    assert "forward" in hooked.__dict__


@per_backend
def test_a_patched_linear_multiplies_by_the_weight_it_holds_at_the_call(backend):
    """FSDP2 swaps a wrapped module's parameters (shards <-> full tensors): the patched forward reads the module's
    weight at each call, packs that one, and runs a weight that is not a plain tensor plainly."""
    torch.manual_seed(0)
    linear, x = nn.Linear(16, 8), torch.randn(4, 16)
    replacement = nn.Parameter(torch.randn(8, 16))
    with torch.inference_mode(), PrepackedLinears(linear, backend=backend) as packer:
        packer.prepare(4, MIN_PREPACK_STEPS)
        linear.weight = replacement  # after entering, before the first call
        got = linear(x)
        assert packer.packs == 1
    assert_within(got, F.linear(x, replacement, linear.bias), _linear_bound(x, linear), "swapped weight")


@needs_mkl
def test_autocast_and_autograd_calls_run_the_plain_product():
    torch.manual_seed(1)
    linear = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with PrepackedLinears(linear) as packer:
        packer.prepare(4, 10)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x).dtype == torch.bfloat16     # autocast's own product, not the packed float32 one
        y = linear(x)                                    # autograd on: the plain product, with its gradient
        y.sum().backward()
        assert packer.packs == 0
    assert torch.equal(y, F.linear(x, linear.weight, linear.bias))
    assert_within(linear.weight.grad, torch.ones(8, 1) * x.sum(0), 4 * EPS32 * x.abs().sum(0).expand(8, 16),
                  "weight gradient")


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@needs_mkl
@per_backend
@pytest.mark.parametrize("repack", ["padded", "repacked"])
def test_the_sampler_with_prepacked_weights_samples_what_it_samples_without(monkeypatch, backend, repack):
    """float32 (the path applies to float32 only): the same tokens, masks and stops, and log-probs equal to the
    rounding of two float32 forwards; the packed path did run after rows left the batch: padded up to the first
    row count (the default, few steps) or packed again for each (``REPACK_ROW_STEPS`` 0)."""
    if repack == "repacked":
        monkeypatch.setattr(prepack, "REPACK_ROW_STEPS", 0)
    model = _tiny_llama()
    prompts = [[5, 17, 33, 9], [40, 8, 12, 60, 21, 7, 30], [11, 3], [7, 7, 7], [21], [30, 31, 32, 33, 34]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=16, temperature=1.0, stop_token_ids=(2, 4, 6, 13), pad_token_id=0)
    packers: list[PrepackedLinears] = []

    class Recording(PrepackedLinears):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            packers.append(self)

    monkeypatch.setattr(sampling, "PrepackedLinears", Recording)
    packed = sample(model, ids, mask, config, torch.Generator().manual_seed(5), prepack_weights=backend)
    plain = sample(model, ids, mask, config, torch.Generator().manual_seed(5), prepack_weights=False)
    assert len(packers) == 1 and packers[0].backend == backend
    # oneDNN: each block's q/k/v and gate/up ran as one stacked product (2 groups per block, 2 blocks)
    assert len({id(g) for g in packers[0].groups.values()}) == (4 if backend == "onednn" else 0)
    assert "forward" not in model.lm_head.__dict__
    assert 0 < int(packed.stopped.sum()) < len(prompts)  # rows left the batch: padded or packed again for fewer
    if repack == "padded":
        assert packers[0].packs == packers[0].units and packers[0].padded_calls > 0
    else:
        assert packers[0].packs > packers[0].units and packers[0].padded_calls == 0
    assert torch.equal(packed.response_ids, plain.response_ids)
    assert torch.equal(packed.response_mask, plain.response_mask)
    assert torch.equal(packed.stopped, plain.stopped)
    full = torch.cat([ids, plain.response_ids], 1)
    full_mask = torch.cat([mask, plain.response_mask], 1).long()
    with torch.no_grad(), linear_terms(model.lm_head) as terms:
        model(input_ids=full, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
    head_terms = terms[0][:, width - 1:-1]
    m = plain.response_mask
    bound = logprob_tolerance(head_terms, plain.rollout_logprobs, 1.0, forward_factor(2))
    assert_within(packed.rollout_logprobs[m], plain.rollout_logprobs[m], bound[m], "rollout log-probs")


class _Block(nn.Module):
    """The sibling projections of a transformer block (`prepack.FUSED_SIBLINGS`) and one more linear."""

    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(48, 80, bias), nn.Linear(48, 16, bias), nn.Linear(48, 16, bias)
        self.gate_proj, self.up_proj = nn.Linear(48, 64, bias), nn.Linear(48, 64, bias)
        self.o_proj = nn.Linear(80, 48, bias)


needs_onednn = pytest.mark.skipif("onednn" not in HERE, reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_sibling_projections_run_as_one_stacked_product(bias, monkeypatch):
    """oneDNN: q/k/v (and gate/up) called on the same input run ONE product by the stacked weights, packed once
    per row count; each member's output is its slice, within float32 rounding of its own plain product; the
    other linears stay single."""
    torch.manual_seed(0)
    block = _Block(bias)
    products = []
    real = prepack._packed_linear
    monkeypatch.setattr(prepack, "_packed_linear", lambda *a: products.append(a[2].shape) or real(*a))
    x = torch.randn(6, 1, 48)
    with torch.inference_mode(), PrepackedLinears(block, backend="onednn") as packer:
        assert len(packer.groups) == 5 and packer.units == 3
        packer.prepare(rows=6, steps_left=10)
        q, k, v = block.q_proj(x), block.k_proj(x), block.v_proj(x)
        gate, up = block.gate_proj(x), block.up_proj(x)
        assert len(products) == 2 and packer.packs == 2  # the two stacked products, each packed once
        o = block.o_proj(q)
        assert len(products) == 3 and packer.packs == 3
        again = block.k_proj(x), block.q_proj(x)  # k first this time: it runs the product, q takes its slice
        assert len(products) == 4 and packer.packs == 3
    for name, got in (("q", q), ("k", k), ("v", v), ("gate", gate), ("up", up), ("o", o)):
        linear = getattr(block, f"{name}_proj")
        inp = q if name == "o" else x
        assert got.shape == (6, 1, linear.out_features) and got.is_contiguous()
        with torch.inference_mode():
            assert_within(got, F.linear(inp, linear.weight, linear.bias), _linear_bound(inp, linear), name)
    assert torch.equal(again[0], k) and torch.equal(again[1], q)


@needs_onednn
def test_a_sibling_called_with_another_or_a_changed_input_runs_its_own_product():
    """A kept slice serves only the very same input tensor, unchanged: another tensor (even of the same shape)
    or the same one changed in place gets a product of its own, never a stale slice."""
    torch.manual_seed(1)
    block = _Block(True)
    x1, x2 = torch.randn(4, 48), torch.randn(4, 48)
    with torch.no_grad(), PrepackedLinears(block, backend="onednn") as packer:
        packer.prepare(rows=4, steps_left=10)
        block.q_proj(x1)
        k2 = block.k_proj(x2)  # another input: computed for x2
        block.gate_proj(x1)
        x1.add_(1.0)  # changed in place (a normal tensor's version counter moves)
        up = block.up_proj(x1)
    with torch.no_grad():
        assert_within(k2, F.linear(x2, block.k_proj.weight, block.k_proj.bias), _linear_bound(x2, block.k_proj), "k")
        assert_within(up, F.linear(x1, block.up_proj.weight, block.up_proj.bias), _linear_bound(x1, block.up_proj),
                      "up")


@per_backend
def test_siblings_stay_single_with_mkl_or_when_told(backend):
    block = _Block(False)
    assert PrepackedLinears(block, backend=backend, fuse_siblings=False).groups == {}
    assert bool(PrepackedLinears(block, backend=backend).groups) == (backend == "onednn")
    # a parent without all of a group's members, or with members of different input widths, forms no group
    partial = nn.Module()
    partial.q_proj, partial.k_proj = nn.Linear(8, 8), nn.Linear(8, 4)
    partial.gate_proj, partial.up_proj = nn.Linear(8, 8), nn.Linear(6, 8)
    assert PrepackedLinears(partial, backend=backend).groups == {}
