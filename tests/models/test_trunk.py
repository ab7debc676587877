"""rlhfkit.models.trunk: a supported decoder's blocks run in two parts compute exactly its forward; everything
else is refused (and the forwards that use it fall back, see tests/rollout/test_forward.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import (Gemma2Config, Gemma2Model, LlamaConfig, LlamaModel, MistralConfig, MistralModel, Qwen2Config,
                          Qwen2Model, Qwen3Config, Qwen3Model)

from rlhfkit.models.loading import forward_hidden
from rlhfkit.models.trunk import mask_kinds, run_blocks, supports_split

COMMON = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.3)
# window 3 < the 9 columns: a sliding-window block sees fewer keys than a full one, so picking the wrong mask
# for a block would change the result
DECODERS = {
    "llama": lambda: LlamaModel(LlamaConfig(**COMMON)),
    "mistral_sliding": lambda: MistralModel(MistralConfig(sliding_window=3, **COMMON)),
    "qwen2_sliding_upper": lambda: Qwen2Model(Qwen2Config(use_sliding_window=True, sliding_window=3,
                                                          max_window_layers=2, **COMMON)),
    "qwen3_alternating": lambda: Qwen3Model(Qwen3Config(use_sliding_window=True, sliding_window=3,
                                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                                        **COMMON)),
}


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :3] = False  # a left-padded row
    mask[1, 7:] = False  # a right-padded row
    return ids, mask


@pytest.mark.parametrize("name", list(DECODERS))
def test_blocks_run_in_two_parts_equal_the_decoders_forward_bit_for_bit(name):
    torch.manual_seed(0)
    decoder = DECODERS[name]().eval()
    ids, mask = _batch()
    if name != "llama":  # the configurations above do mix the mask kinds
        assert "sliding_attention" in mask_kinds(decoder)
    with torch.no_grad():
        expected = forward_hidden(decoder, ids, mask)
        assert torch.equal(run_blocks(decoder, mask, 0, input_ids=ids), expected)
        for k in range(1, 5):
            trunk = run_blocks(decoder, mask, 0, k, input_ids=ids)
            # the same ops on the same tensors in the same order: equal bits (float32), padding positions too
            assert torch.equal(run_blocks(decoder, mask, k, hidden=trunk), expected), k
            # and in three parts
            middle = run_blocks(decoder, mask, k // 2, k, input_ids=ids,
                                hidden=run_blocks(decoder, mask, 0, k // 2, input_ids=ids))
            assert torch.equal(middle, trunk), k


def test_other_decoders_are_refused():
    class Custom(LlamaModel):  # a subclass may change forward
        pass

    torch.manual_seed(0)
    ids, mask = _batch()
    # Gemma scales the embeddings by sqrt(H) inside forward: not the layout run_blocks reproduces
    gemma = Gemma2Model(Gemma2Config(head_dim=8, **COMMON))
    for decoder in (gemma, Custom(LlamaConfig(**COMMON)), torch.nn.Linear(2, 2), None):
        assert not supports_split(decoder)
    assert supports_split(LlamaModel(LlamaConfig(**COMMON)))
    with pytest.raises(ValueError, match="blocks can be run in parts"):
        run_blocks(gemma, mask, 0, 1, input_ids=ids)


def test_bad_arguments_raise():
    torch.manual_seed(0)
    decoder = LlamaModel(LlamaConfig(**COMMON)).eval()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="blocks 3..2"):
        run_blocks(decoder, mask, 3, 2, hidden=torch.zeros(3, 9, 32))
    with pytest.raises(ValueError, match="needs input_ids"):
        run_blocks(decoder, mask, 0, 2)
    with pytest.raises(ValueError, match="needs hidden states"):
        run_blocks(decoder, mask, 2, hidden=torch.zeros(3, 8, 32))
    with pytest.raises(ValueError, match="float64"):
        run_blocks(decoder, mask, 2, hidden=torch.zeros(3, 9, 32, dtype=torch.float64))


def test_shared_depth_counts_the_bit_equal_lowest_blocks():
    """Two copies of a 3-block Llama, block 1 of one changed by one float32 unit in one weight: 1 block shared
    (None = all the blocks both have; a limit caps it); a model shares all its blocks with itself; other
    embeddings share none."""
    from rlhfkit.models.trunk import shared_depth

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    a = LlamaModel(config)
    b = LlamaModel(config)
    b.load_state_dict(a.state_dict())
    assert shared_depth(a, b) == 3 and shared_depth(a, b, 2) == 2 and shared_depth(a, a) == 3
    with torch.no_grad():
        w = b.layers[1].mlp.up_proj.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert shared_depth(a, b) == 1 and shared_depth(b, a) == 1 and shared_depth(a, b, 1) == 1
    with torch.no_grad():
        b.embed_tokens.weight[0, 0] += 1.0
    assert shared_depth(a, b) == 0
