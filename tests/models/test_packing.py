"""Shared-prompt packing (rlhfkit.models.packing): the layout by hand, and the reward model's outputs and
gradients with packing equal those without, for Llama (rotary positions) and GPT-2 (learned positions)."""

from __future__ import annotations

import pytest
import torch
from tolerances import EPS32, assert_within
from transformers import GPT2Config, GPT2LMHeadModel

from rlhfkit.models.packing import shared_prompt_layout
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
    from rlhfkit.models.loading import forward_hidden

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
