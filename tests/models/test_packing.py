"""Packing (rlhfkit.models.packing): both layouts by hand, and the reward model's outputs and gradients with
packing equal those without, for Llama (rotary positions) and GPT-2 (learned positions): shared-prompt packing
with a dense mask, and padding-free (variable-length) packing of unrelated rows, with and without shared
prompts, in float64 and float32, with LoRA and gradient checkpointing, and at the edges (one row, rows of one
token, very unequal lengths, a row without tokens)."""

from __future__ import annotations

import pytest
import torch
from tolerances import (EPS32, assert_close_f32, assert_within, forward_factor, gradient_factor, gradient_terms,
                        linear_terms)
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralModel

from rlhfkit.models.loading import forward_hidden
from rlhfkit.models.packing import (GROUP_PADDING_SLACK, MIN_PREFIX_SAVING, VARLEN_ATTENTION, Segment,
                                    _segment_attention, attention_groups, packed_hidden, shared_prefix,
                                    shared_prompt_layout, varlen_layout, varlen_problem)
from rlhfkit.models.reward import RewardModel

PAD = 9


def rows(prompt_and_suffix: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask, response_mask) of rows given as (prompt ids, response ids)."""
    width = max(len(p) + len(r) for p, r in prompt_and_suffix)
    ids = torch.full((len(prompt_and_suffix), width), PAD)
    att = torch.zeros_like(ids, dtype=torch.bool)
    resp = torch.zeros_like(att)
    for i, (p, r) in enumerate(prompt_and_suffix):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        att[i, :len(p) + len(r)] = True
        resp[i, len(p):len(p) + len(r)] = True
    return ids, att, resp


def test_layout_by_hand():
    # rows 0 and 2 share prompt [5, 6]; row 1 has its own prompt [5, 7, 8]
    ids, att, resp = rows([([5, 6], [11, 12, 13]), ([5, 7, 8], [14]), ([5, 6], [15, 16])])
    lay = shared_prompt_layout(ids, att, resp, PAD)
    assert lay is not None
    assert lay.input_ids.tolist() == [[5, 6, 11, 12, 13, 15, 16], [5, 7, 8, 14, PAD, PAD, PAD]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 2, 3, 0, 0, 0]]
    T, F = True, False
    assert lay.attention_mask[0, 0].tolist() == [
        [T, F, F, F, F, F, F],
        [T, T, F, F, F, F, F],
        [T, T, T, F, F, F, F],
        [T, T, T, T, F, F, F],
        [T, T, T, T, T, F, F],
        [T, T, F, F, F, T, F],  # row 2's first response token: the prompt and itself, not row 0's response
        [T, T, F, F, F, T, T],
    ]
    assert lay.attention_mask[1, 0].tolist() == [
        [T, F, F, F, F, F, F],
        [T, T, F, F, F, F, F],
        [T, T, T, F, F, F, F],
        [T, T, T, T, F, F, F],
        [F, F, F, F, T, F, F],  # padding queries see only themselves (no empty softmax row)
        [F, F, F, F, F, T, F],
        [F, F, F, F, F, F, T],
    ]
    # the gather index maps (row, position) to g * 7 + packed position; padding points at the group's position 0
    assert lay.gather_index.tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 7], [0, 1, 5, 6, 0]]
    assert (lay.tokens, lay.packed_tokens) == (5 + 4 + 4, 7 + 4)
    packed = torch.arange(14.0).reshape(2, 7)
    assert lay.unpack(packed).tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 7], [0, 1, 5, 6, 0]]


def test_layout_refuses_what_it_cannot_pack():
    ids, att, resp = rows([([5, 6], [11]), ([5, 7], [12])])
    assert shared_prompt_layout(ids, att, resp, PAD) is None  # no shared prompt: nothing to save
    ids, att, resp = rows([([5, 6], [11]), ([5, 6], [12])])
    assert shared_prompt_layout(ids, att.flip(1), resp.flip(1), PAD) is None  # left padding
    no_prompt = resp.clone()
    no_prompt[:, 0] = True
    assert shared_prompt_layout(ids, att, no_prompt, PAD) is None  # response from position 0
    empty = resp.clone()
    empty[1] = False
    assert shared_prompt_layout(ids, att, empty, PAD) is None  # a row without response


def gpt2_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=PAD,
                        eos_token_id=2, bos_token_id=1, attn_implementation="sdpa")
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> str:
    return gpt2_dir(tmp_path_factory)


def k_wise_batch(vocab: int, seed: int = 0):
    """Two prompts with 3 and 2 responses (different lengths), plus one row with its own prompt: 6 rows."""
    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    p1, p2, p3 = toks(6), toks(4), toks(5)
    return rows([(p1, toks(3)), (p2, toks(5)), (p1, toks(7)), (p3, toks(2)), (p1, toks(4)), (p2, toks(1))])


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
@pytest.mark.parametrize("aggregation, aspects", [("last", 1), ("mean", 1), ("sum", 3)])
def test_packed_scores_and_gradients_equal_unpacked(backbone, aggregation, aspects, sft_dir, gpt2_folder):
    folder = str(sft_dir) if backbone == "llama" else gpt2_folder
    torch.manual_seed(0)
    names = None if aspects == 1 else [f"a{i}" for i in range(aspects)]
    rm = RewardModel.from_backbone(folder, kind="decoder", aggregation=aggregation, num_aspects=aspects,
                                   aspect_names=names)
    rm = rm.double()
    assert rm.packs_prompts
    ids, att, resp = k_wise_batch(rm.config.vocab_size)
    assert shared_prompt_layout(ids, att, resp, rm.pad_token_id or 0).packed_tokens < int(att.sum())

    def run(share: bool):
        rm.zero_grad()
        out = rm(ids, att, resp, share_prompts=share)
        weights = torch.linspace(-1, 1, ids.shape[0], dtype=torch.float64)
        (out.scores * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
        return out, grads

    plain, g_plain = run(False)
    packed, g_packed = run(True)
    torch.testing.assert_close(packed.scores, plain.scores, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed.token_scores, plain.token_scores, rtol=1e-10, atol=1e-10)
    if aspects > 1:
        torch.testing.assert_close(packed.aspect_token_scores, plain.aspect_token_scores, rtol=1e-10, atol=1e-10)
    assert g_plain.keys() == g_packed.keys() and len(g_plain) > 0
    # errors are measured against the whole gradient's norm (some parameters' gradients are 0 up to rounding, e.g.
    # GPT-2's ln_f.bias here). Llama's RMSNorm computes in float32 even in a float64 model: its 5 norms (2 per
    # layer, the final one) round in float32, in the forward and the backward pass; GPT-2 is float64 throughout.
    scale = torch.cat([g.flatten() for g in g_plain.values()]).norm()
    bound = 2 * 5 * EPS32 * scale if backbone == "llama" else 1e-12 * scale
    for name in g_plain:
        assert_within((g_packed[name] - g_plain[name]).norm(), 0.0, bound, name)
    # and the packed path really differs from a wrong mask: letting responses see each other changes the scores
    lay = shared_prompt_layout(ids, att, resp, rm.pad_token_id or 0)
    leaky = lay.attention_mask | torch.ones_like(lay.attention_mask).tril()
    with torch.no_grad():
        h = forward_hidden(rm._backbone(), lay.input_ids, leaky, lay.position_ids)
        wrong = lay.unpack(rm._head()(h))
    assert not torch.allclose(wrong[..., 0] * att, plain.aspect_token_scores[..., 0] * att if aspects > 1
                              else plain.token_scores * att)


def test_eager_attention_is_not_packed(sft_dir):
    rm = RewardModel.from_backbone(str(sft_dir), kind="decoder", aggregation="mean")
    rm.config._attn_implementation = "eager"
    assert not rm.packs_prompts
    ids, att, resp = k_wise_batch(rm.config.vocab_size)
    with torch.no_grad():
        # not packed: the very same forward twice, exactly
        torch.testing.assert_close(rm(ids, att, resp, share_prompts=True).scores, rm(ids, att, resp).scores,
                                   rtol=0, atol=0)



# ----------------------------------------------------------------------------------------------------------
# Padding-free (variable-length) packing
# ----------------------------------------------------------------------------------------------------------
T, F = True, False


def allowed_keys(layout) -> dict[int, list[int]]:
    """For each packed query position, the packed key positions its attention group lets it see."""
    seen = {}
    for g in attention_groups(layout.segments, torch.device("cpu")):
        s, n, m = g.mask.shape[0], g.mask.shape[2], g.mask.shape[3]
        keys = g.key_index.view(s, m)
        for slot in g.real.tolist():
            seg, i = divmod(slot, n)
            seen[int(g.query_index[slot])] = sorted(int(k) for k in keys[seg][g.mask[seg, 0, i]])
    return dict(sorted(seen.items()))


def test_varlen_layout_by_hand():
    # rows 0 and 2 share prompt [5, 6]; row 1 has its own prompt [5, 7, 8]
    ids, att, resp = rows([([5, 6], [11, 12, 13]), ([5, 7, 8], [14]), ([5, 6], [15, 16])])
    lay = varlen_layout(ids, att, resp)  # unrelated rows: each row one causal segment, no padding
    assert lay.input_ids.tolist() == [[5, 6, 11, 12, 13, 5, 7, 8, 14, 5, 6, 15, 16]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert lay.segments == (Segment(0, 5), Segment(5, 9), Segment(9, 13))
    assert allowed_keys(lay) == {q: list(range(s, q + 1)) for s, e in ((0, 5), (5, 9), (9, 13)) for q in range(s, e)}
    assert lay.attention_mask is None and (lay.tokens, lay.packed_tokens) == (13, 13)
    # padding positions point at packed index 0 (the forward masks them with the original attention_mask)
    assert lay.gather_index.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 0], [9, 10, 11, 12, 0]]
    assert lay.unpack(torch.arange(13.0)[None]).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 0], [9, 10, 11, 12, 0]]

    shared = varlen_layout(ids, att, resp, share_prompts=True)
    # groups in order of first appearance: rows {0, 2} (prompt [5, 6] once, then both responses), then row 1
    assert shared.input_ids.tolist() == [[5, 6, 11, 12, 13, 15, 16, 5, 7, 8, 14]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3]]  # responses continue the prompt
    assert shared.segments == (Segment(0, 2), Segment(2, 5, ((0, 2),)), Segment(5, 7, ((0, 2),)), Segment(7, 11))
    # each response sees the prompt, then causally its own tokens; the prompt and row 1 see causally their own
    assert allowed_keys(shared) == {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4],
                                    5: [0, 1, 5], 6: [0, 1, 5, 6], 7: [7], 8: [7, 8], 9: [7, 8, 9], 10: [7, 8, 9, 10]}
    # the attention's groups by hand: by key count (5, 4 with 4 queries, 4 with 2, 2), all four in one padded group
    # (4 · 4 queries · 5 keys = 80 scores <= 2 × the 43 exact ones)
    (group,) = attention_groups(shared.segments, torch.device("cpu"))
    assert group.query_index.tolist() == [2, 3, 4, 2, 7, 8, 9, 10, 5, 6, 5, 5, 0, 1, 0, 0]
    assert group.key_index.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 7, 0, 1, 5, 6, 5, 0, 1, 0, 0, 0]
    assert group.real.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 12, 13]
    pad = [T, F, F, F, F]  # a padding query sees one real key (no empty softmax row); its output is dropped
    assert group.mask[:, 0].tolist() == [
        [[T, T, T, F, F], [T, T, T, T, F], [T, T, T, T, T], pad],
        [[T, F, F, F, F], [T, T, F, F, F], [T, T, T, F, F], [T, T, T, T, F]],
        [[T, T, T, F, F], [T, T, T, T, F], pad, pad],
        [[T, F, F, F, F], [T, T, F, F, F], pad, pad]]
    assert shared.gather_index.tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 0], [0, 1, 5, 6, 0]]
    assert (shared.tokens, shared.packed_tokens) == (13, 11)


def test_segment_groups_cover_every_segment_within_the_padding_slack():
    """Segments of very different sizes: every segment in exactly one group, each group's padded scores within
    GROUP_PADDING_SLACK of its exact ones, and a long segment does not pad the short ones (several groups)."""
    segs = (Segment(0, 100), Segment(100, 102), Segment(102, 104, ((0, 2),)), Segment(104, 140),
            Segment(140, 141, ((104, 140),)), Segment(141, 150))
    groups = attention_groups(segs, torch.device("cpu"))
    assert len(groups) >= 3
    covered = []
    for g in groups:
        s, n, m = g.mask.shape[0], g.mask.shape[2], g.mask.shape[3]
        starts = g.query_index.view(s, n)[:, 0].tolist()
        members = [seg for seg in segs if seg.start in starts]
        covered += members
        assert s * n * m <= GROUP_PADDING_SLACK * sum(e.length * e.key_count for e in members)
    assert sorted(covered, key=lambda e: e.start) == list(segs)


def test_grouped_segment_attention_equals_per_segment_attention_with_gradients():
    """`_segment_attention` (segments in padded groups, grouped-query heads) against attention written out per
    segment from its definition (softmax over its context keys and its own keys up to the query), float64,
    outputs and the gradients of query, key and value."""
    ids, att, resp = rows([([1, 2, 5, 6], [11, 12, 13, 14, 15]), ([1, 2, 7], [13]), ([1, 2, 5, 6], [15]),
                           ([3] * 30, [4] * 9), ([8], [9])])
    lay = varlen_layout(ids, att, resp, share_prompts=True, min_prefix_saving=2)
    groups, inverse = lay.attention_plan(torch.device("cpu"))
    assert len(groups) >= 2 and inverse is not None  # several groups, out of packed order
    t, heads, kv_heads, d = lay.packed_tokens, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(1, h, t, d, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads

    def grads(fn):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out = fn(q, k, v)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    def reference(q, k, v):  # (1, T, H, D)
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        out = []
        for seg in lay.segments:
            keys = torch.cat([torch.arange(a, b) for a, b in seg.contexts] + [torch.arange(seg.start, seg.end)])
            n, c = seg.end - seg.start, seg.context_length
            scores = q[0][:, seg.start:seg.end] @ k[0][:, keys].transpose(-1, -2) / d ** 0.5
            scores = scores.masked_fill(~torch.ones(n, c + n, dtype=torch.bool).tril(c), float("-inf"))
            out.append((scores.softmax(-1) @ v[0][:, keys]).transpose(0, 1))
        return torch.cat(out)[None]

    got = grads(lambda q, k, v: _segment_attention(module, q, k, v, None, rlhfkit_segments=lay)[0])
    want = grads(reference)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_varlen_layout_takes_any_padding_and_skips_empty_rows():
    ids = torch.tensor([[9, 5, 6, 7], [5, 6, 9, 9], [9, 9, 9, 9], [5, 9, 6, 7]])
    att = torch.tensor([[F, T, T, T], [T, T, F, F], [F, F, F, F], [T, F, T, T]])  # left, right, empty, middle
    resp = torch.tensor([[F, F, T, T], [F, F, F, F], [F, F, F, F], [F, F, T, T]])
    lay = varlen_layout(ids, att, resp, share_prompts=True)
    # rows 0 and 3 share the prompt [5] (row 3's real tokens are 5, 6, 7); row 1 has no response: its own segment
    assert lay.input_ids.tolist() == [[5, 6, 7, 6, 7, 5, 6]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 1, 2, 0, 1]]
    assert lay.segments == (Segment(0, 1), Segment(1, 3, ((0, 1),)), Segment(3, 5, ((0, 1),)), Segment(5, 7))
    assert lay.gather_index.tolist() == [[0, 0, 1, 2], [5, 6, 0, 0], [0, 0, 0, 0], [0, 0, 3, 4]]
    assert varlen_layout(ids[2:3], att[2:3]) is None  # no token at all: nothing to run


def test_shared_prefix_by_hand():
    assert shared_prefix([[1, 2, 3], [1, 2, 4], [1, 2]], [5, 5, 5]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]], [1, 5]) == 1  # capped by the smallest limit
    assert shared_prefix([[1, 2, 3], [4, 2, 3]], [5, 5]) == 0
    assert shared_prefix([[1, 2, 3]], [5]) == 0  # one sequence: nothing to share


def test_varlen_layout_runs_the_rows_common_prefix_once_by_hand():
    # every row starts [1, 2]; rows 0 and 2 share the prompt [1, 2, 5, 6]; row 1 has the prompt [1, 2, 7]
    ids, att, resp = rows([([1, 2, 5, 6], [11, 12]), ([1, 2, 7], [13]), ([1, 2, 5, 6], [15])])
    assert varlen_layout(ids, att, resp, share_prompts=True).segments[0] == Segment(0, 4)  # saves 2 < 32: off
    lay = varlen_layout(ids, att, resp, share_prompts=True, min_prefix_saving=2)
    # [prefix | group's prompt rest | its 2 responses | row 1's rest]: each token at its own row's position
    assert lay.input_ids.tolist() == [[1, 2, 5, 6, 11, 12, 15, 7, 13]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 2, 3]]
    assert lay.segments == (Segment(0, 2), Segment(2, 4, ((0, 2),)), Segment(4, 6, ((0, 2), (2, 4))),
                            Segment(6, 7, ((0, 2), (2, 4))), Segment(7, 9, ((0, 2),)))
    # [prefix keys | prompt keys | own keys]: all of the context, then causally its own tokens
    assert allowed_keys(lay) == {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4],
                                 5: [0, 1, 2, 3, 4, 5], 6: [0, 1, 2, 3, 6], 7: [0, 1, 7], 8: [0, 1, 7, 8]}
    assert lay.gather_index.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 7, 8, 0, 0], [0, 1, 2, 3, 6, 0]]
    assert (lay.tokens, lay.packed_tokens) == (15, 9)
    assert varlen_layout(ids, att, resp, min_prefix_saving=2).packed_tokens == 15  # share_prompts off: no prefix


def test_varlen_shared_prefix_scores_and_gradients_equal_unpacked(sft_dir):
    """A chat-like head common to every row (12 tokens x 3 more prompts >= MIN_PREFIX_SAVING) runs once."""
    rm = double_rm(str(sft_dir), "mean")
    g = torch.Generator().manual_seed(3)

    def toks(n: int) -> list[int]:
        return torch.randint(10, rm.config.vocab_size, (n,), generator=g).tolist()

    head, p1 = toks(12), toks(3)
    batch = [(head + p1, toks(4)), (head + toks(2), toks(5)), (head + p1, toks(2)), (head + toks(5), toks(1)),
             (head + toks(1), toks(3))]
    ids, att, resp = flip_padding(*rows(batch))
    assert 12 * 3 >= MIN_PREFIX_SAVING
    lay = varlen_layout(ids, att, resp, share_prompts=True)
    assert lay.segments[0] == Segment(0, 12)
    assert lay.packed_tokens == int(att.sum()) - 15 - 12 * 3  # row 2's prompt and 3 more copies of the head
    plain, g_plain = outputs_and_grads(rm, ids, att, resp)
    packed, g_packed = outputs_and_grads(rm, ids, att, resp, share_prompts=True, packing=True)
    assert_float64_equal(rm, "llama", plain, g_plain, packed, g_packed)


def flip_padding(ids: torch.Tensor, att: torch.Tensor, resp: torch.Tensor):
    """The same right-padded rows, left-padded."""
    out = [torch.zeros_like(t) for t in (ids, att, resp)]
    for i in range(ids.shape[0]):
        shift = ids.shape[1] - int(att[i].sum())
        for src, dst in zip((ids, att, resp), out):
            dst[i] = src[i].roll(shift)
    return out


def unequal_batch(vocab: int, seed: int = 1):
    """Unrelated rows of very different lengths (1 to 24 tokens), a 1-token response, a pair sharing a prompt."""
    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    p = toks(3)
    return rows([(toks(20), toks(4)), ([], toks(1)), (p, toks(1)), (toks(1), toks(2)), (p, toks(6))])


def double_rm(folder: str, aggregation: str = "last", aspects: int = 1) -> RewardModel:
    torch.manual_seed(0)
    names = None if aspects == 1 else [f"a{i}" for i in range(aspects)]
    return RewardModel.from_backbone(folder, kind="decoder", aggregation=aggregation, num_aspects=aspects,
                                     aspect_names=names).double()


def outputs_and_grads(rm: RewardModel, ids, att, resp, **flags):
    rm.zero_grad(set_to_none=True)
    out = rm(ids, att, resp, **flags)
    weights = torch.linspace(-1, 1, ids.shape[0], dtype=out.scores.dtype)
    ((out.scores * weights).sum() + 0.1 * out.token_scores.square().sum()).backward()
    return out, {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}


def assert_float64_equal(rm: RewardModel, backbone: str, plain, g_plain, packed, g_packed) -> None:
    """Packed vs plain in float64: outputs to 1e-10, gradients to the bound of the shared-prompt test above (Llama's
    RMSNorm rounds in float32 even in a float64 model)."""
    torch.testing.assert_close(packed.scores, plain.scores, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed.token_scores, plain.token_scores, rtol=1e-10, atol=1e-10)
    if plain.aspect_token_scores is not None:
        torch.testing.assert_close(packed.aspect_token_scores, plain.aspect_token_scores, rtol=1e-10, atol=1e-10)
    assert g_plain.keys() == g_packed.keys() and len(g_plain) == len(list(rm.parameters()))
    scale = torch.cat([g.flatten() for g in g_plain.values()]).norm()
    bound = 2 * 5 * EPS32 * scale if backbone == "llama" else 1e-12 * scale
    for name in g_plain:
        assert_within((g_packed[name] - g_plain[name]).norm(), 0.0, bound, name)


@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
@pytest.mark.parametrize("aggregation, aspects", [("last", 1), ("mean", 1), ("sum", 3)])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_varlen_scores_and_gradients_equal_unpacked(backbone, aggregation, aspects, share, padding, sft_dir,
                                                    gpt2_folder):
    rm = double_rm(str(sft_dir) if backbone == "llama" else gpt2_folder, aggregation, aspects)
    assert rm.packing_problem() is None
    ids, att, resp = k_wise_batch(rm.config.vocab_size)
    if padding == "left":
        ids, att, resp = flip_padding(ids, att, resp)
    plain, g_plain = outputs_and_grads(rm, ids, att, resp)
    packed, g_packed = outputs_and_grads(rm, ids, att, resp, share_prompts=share, packing=True)
    assert rm.config._attn_implementation == VARLEN_ATTENTION  # the packed forward took the varlen path
    lay = varlen_layout(ids, att, resp, share)
    assert lay.packed_tokens == int(att.sum()) - (2 * 6 + 4 if share else 0)  # p1 (6 tokens) runs once, not 3x
    assert_float64_equal(rm, backbone, plain, g_plain, packed, g_packed)
    # after the switch, an unpacked forward is the very same SDPA computation as before, bit for bit
    again, g_again = outputs_and_grads(rm, ids, att, resp)
    assert torch.equal(again.token_scores, plain.token_scores)
    assert all(torch.equal(g_again[n], g_plain[n]) for n in g_plain)


@pytest.mark.parametrize("case", ["unequal", "one_row", "length_one"])
def test_varlen_edge_cases_equal_unpacked(case, sft_dir):
    rm = double_rm(str(sft_dir), "mean")
    ids, att, resp = unequal_batch(rm.config.vocab_size)
    if case == "one_row":
        ids, att, resp = ids[:1], att[:1], resp[:1]
    elif case == "length_one":  # every row a single token (its response)
        ids, att, resp = ids[:3, :1].clone(), att[:3, :1].clone(), att[:3, :1].clone()
    for share in (False, True):
        plain, g_plain = outputs_and_grads(rm, ids, att, resp)
        packed, g_packed = outputs_and_grads(rm, ids, att, resp, share_prompts=share, packing=True)
        assert_float64_equal(rm, "llama", plain, g_plain, packed, g_packed)
    if case == "unequal":  # padding-free: 24 + 1 + 4 + 3 + 9 tokens instead of 5 rows of 24
        assert varlen_layout(ids, att, resp).input_ids.shape == (1, 41) and ids.shape == (5, 24)


def test_varlen_packing_in_float32_within_rounding(sft_dir):
    """The float32 model: packed outputs within the forward's rounding of the head's terms, gradients within the
    forward and backward's rounding of their reduction terms (tests/tolerances.py)."""
    torch.manual_seed(0)
    rm = RewardModel.from_backbone(str(sft_dir), kind="decoder", aggregation="mean")
    ids, att, resp = unequal_batch(rm.config.vocab_size)
    runs = []
    with linear_terms(rm._head()) as terms:
        grad_terms = gradient_terms(rm, lambda: runs.append(outputs_and_grads(rm, ids, att, resp)))
    (plain, g_plain), = runs
    packed, g_packed = outputs_and_grads(rm, ids, att, resp, share_prompts=True, packing=True)
    factor = forward_factor(rm.config.num_hidden_layers)
    assert_close_f32(packed.token_scores, plain.token_scores, terms[0].max(), factor, "token_scores")
    # a mean over up to 24 tokens of outputs within the bound above
    assert_close_f32(packed.scores, plain.scores, terms[0].max(), factor + 5, "scores")
    assert g_plain.keys() == g_packed.keys() == grad_terms.keys()
    for name in g_plain:
        assert_close_f32(g_packed[name], g_plain[name], grad_terms[name], gradient_factor(2), name)


def test_varlen_attention_really_restricts_each_segment(sft_dir):
    """Guard that the equality above is not trivial: the same packed row with plain causal attention over all of
    it (rows seeing each other) gives other outputs; with the segment plan, the outputs of the rows alone."""
    rm = double_rm(str(sft_dir))
    ids, att, resp = unequal_batch(rm.config.vocab_size)
    lay = varlen_layout(ids, att, resp)
    backbone = rm._backbone()
    with torch.no_grad():
        per_row = forward_hidden(backbone, ids, att)
        packed = lay.unpack(packed_hidden(backbone, lay))
        leaky = lay.unpack(forward_hidden(backbone, lay.input_ids, torch.ones_like(lay.input_ids), lay.position_ids))
    torch.testing.assert_close(packed[att], per_row[att], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(leaky[att], per_row[att])


def test_varlen_with_lora_and_gradient_checkpointing_equal_unpacked(sft_dir):
    """LoRA layers and activation checkpointing (whose backward recomputes each layer's forward, segments
    included) give the plain path's outputs and gradients."""
    from rlhfkit.models.adapters import apply_lora
    from rlhfkit.models.reward import unwrap_peft

    torch.manual_seed(0)
    rm = RewardModel.from_backbone(str(sft_dir), kind="decoder", aggregation="mean")
    apply_lora(rm, 4, 8.0, 0.0, None)
    rm = rm.double().train()
    for n, p in rm.named_parameters():  # LoRA's B starts at 0: move it so that the adapters matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    hf = unwrap_peft(rm.model)
    if hasattr(hf, "activation_checkpointing_enable"):  # as reward_trainer.build_model does
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    handle = rm._backbone().layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    ids, att, resp = k_wise_batch(rm.config.vocab_size)
    plain, g_plain = outputs_and_grads(rm, ids, att, resp)
    packed, g_packed = outputs_and_grads(rm, ids, att, resp, share_prompts=True, packing=True)
    handle.remove()
    assert len(calls) == 4  # each forward ran twice: checkpointing recomputed it in the backward pass
    assert any("lora_B" in n for n in g_plain) and g_plain.keys() == g_packed.keys()
    torch.testing.assert_close(packed.scores, plain.scores, rtol=1e-10, atol=1e-10)
    scale = torch.cat([g.flatten() for g in g_plain.values()]).norm()
    for name in g_plain:
        assert_within((g_packed[name] - g_plain[name]).norm(), 0.0, 2 * 5 * EPS32 * scale, name)


def test_models_that_cannot_be_packed_say_why_and_run_unpacked(sft_dir, bert_dir):
    rm = RewardModel.from_backbone(str(sft_dir), kind="decoder", aggregation="mean")
    rm.config._attn_implementation = "eager"
    assert "eager" in rm.packing_problem()
    ids, att, resp = k_wise_batch(rm.config.vocab_size)
    with torch.no_grad():  # not packed: the very same forward twice, exactly
        torch.testing.assert_close(rm(ids, att, resp, packing=True).scores, rm(ids, att, resp).scores, rtol=0,
                                   atol=0)
    assert rm.config._attn_implementation == "eager"
    encoder = RewardModel.from_backbone(str(bert_dir), kind="encoder")
    assert "decoder" in encoder.packing_problem()
    mistral = MistralModel(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
                                         attn_implementation="sdpa"))
    assert "sliding_window" in varlen_problem(mistral)
    with pytest.raises(ValueError, match="sliding_window"):
        packed_hidden(mistral, varlen_layout(*rows([([5], [6, 7])])[:2]))
    # the attention function refuses a mask it would otherwise ignore
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="must not be packed"):
        _segment_attention(torch.nn.Module(), q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.bool),
                           rlhfkit_segments=varlen_layout(*rows([([5], [6, 7])])[:2]))


def test_the_switched_attention_implementation_is_not_saved(sft_dir, tmp_path):
    """The folder of a model that ran packed loads anywhere: config.json records no attention implementation."""
    rm = RewardModel.from_backbone(str(sft_dir), kind="decoder")
    ids, att, resp = k_wise_batch(rm.config.vocab_size)
    with torch.no_grad():
        rm(ids, att, resp, packing=True)
    assert rm.config._attn_implementation == VARLEN_ATTENTION
    rm.save_pretrained(tmp_path / "rm")
    assert VARLEN_ATTENTION not in (tmp_path / "rm" / "config.json").read_text()
    assert RewardModel.from_pretrained(tmp_path / "rm").config._attn_implementation == "sdpa"


def test_varlen_causal_lm_logits_equal_unpacked_with_prompts_left_and_responses_right_padded(sft_dir):
    """The PPO layout (left-padded prompts, right-padded responses: padding on both sides of a row): a causal LM's
    logits from the packed row equal its padded forward's at every real position (float64)."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.loading import causal_lm_logits

    lm = AutoModelForCausalLM.from_pretrained(sft_dir, attn_implementation="sdpa").double().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, lm.config.vocab_size, (3, 12), generator=g)
    att = torch.tensor([[F, F, T, T, T, T, T, T, T, F, F, F],   # prompt 4 | response 3
                        [T, T, T, T, T, T, T, T, T, T, T, T],   # prompt 6 | response 6
                        [F, F, F, F, T, T, T, F, F, F, F, F]])  # prompt 2 | response 1
    lay = varlen_layout(ids, att)
    with torch.no_grad():
        plain = causal_lm_logits(lm, ids, att)
        packed = lay.unpack(lm.lm_head(packed_hidden(lm.model, lay)))
    assert lay.input_ids.shape == (1, int(att.sum()))
    torch.testing.assert_close(packed[att], plain[att], rtol=1e-10, atol=1e-10)
