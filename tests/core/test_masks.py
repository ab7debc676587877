"""Hand-computed checks of rlhfkit.core.masks (float64)."""

import math

import pytest
import torch

from rlhfkit.core.masks import (
    first_difference_index,
    first_stop_index,
    lengths_to_mask,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    truncate_after_stop,
)

NAN = float("nan")
X = torch.tensor([[1.0, 2.0, NAN], [4.0, 100.0, float("inf")]], dtype=torch.float64)
M = torch.tensor([[True, True, False], [True, False, False]])


def test_masked_sum_and_mean_ignore_masked_values_even_nan():
    # selected values {1, 2, 4}: sum 7, mean 7/3; per row: sums (3, 4), means (1.5, 4)
    assert masked_sum(X, M).item() == 7.0
    assert masked_mean(X, M).item() == pytest.approx(7 / 3, abs=1e-15)
    assert torch.equal(masked_sum(X, M, dim=1), torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert torch.equal(masked_mean(X, M, dim=1), torch.tensor([1.5, 4.0], dtype=torch.float64))


def test_masked_var_biased_and_unbiased():
    # {1, 2, 4}: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # biased: (14/3)/3 = 14/9; unbiased: (14/3)/2 = 7/3
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9, abs=1e-15)
    assert masked_var(X, M).item() == pytest.approx(7 / 3, abs=1e-15)


def test_masked_var_errors():
    with pytest.raises(ValueError, match="no element"):
        masked_var(X, torch.zeros_like(M))
    one = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, one)
    assert masked_var(X, one, unbiased=False).item() == 0.0


def test_masked_whiten_uses_unbiased_var_and_eps_inside_sqrt():
    # μ = 7/3, var = 7/3 (unbiased); y = (x - μ) / sqrt(var + eps); eps = 0.5 makes its placement visible
    eps = 0.5
    scale = 1 / math.sqrt(7 / 3 + eps)
    expected = torch.tensor(
        [[(1 - 7 / 3) * scale, (2 - 7 / 3) * scale, 0.0], [(4 - 7 / 3) * scale, 0.0, 0.0]], dtype=torch.float64
    )
    assert torch.allclose(masked_whiten(X, M, eps=eps), expected, rtol=0, atol=1e-14)
    # shift_mean=False adds μ back on real tokens; padding stays 0
    kept = torch.where(M, expected + 7 / 3, torch.zeros_like(expected))
    assert torch.allclose(masked_whiten(X, M, shift_mean=False, eps=eps), kept, rtol=0, atol=1e-14)
    # default eps 1e-8: the whitened real values have mean 0 and unbiased variance var / (var + eps)
    y = masked_whiten(X, M)
    assert masked_mean(y, M).item() == pytest.approx(0.0, abs=1e-14)
    assert masked_var(y, M).item() == pytest.approx((7 / 3) / (7 / 3 + 1e-8), abs=1e-14)


def test_first_stop_index_and_truncate_after_stop():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [3, 9, 1, 1]])
    # stops {2, 3}: row 0 first at 1, row 1 none (T = 4), row 2 at 0
    assert first_stop_index(tokens, [2, 3]).tolist() == [1, 4, 0]
    assert first_stop_index(tokens, torch.tensor([8])).tolist() == [4, 3, 4]
    assert first_stop_index(tokens, []).tolist() == [4, 4, 4]
    out, mask, stopped = truncate_after_stop(tokens, [2, 3], pad_id=0)
    # the stop token itself is kept and is a response token; everything after it becomes pad
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [3, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert stopped.tolist() == [True, False, True]


def test_truncate_after_stop_when_pad_equals_stop():
    # SmolLM2: pad == EOS (id 2); a sampler that padded with EOS after stopping is truncated at the first EOS
    tokens = torch.tensor([[4, 2, 2, 2], [4, 5, 6, 2]])
    out, mask, stopped = truncate_after_stop(tokens, [2], pad_id=2)
    assert out.tolist() == [[4, 2, 2, 2], [4, 5, 6, 2]]
    assert mask.sum(dim=1).tolist() == [2, 4]
    assert stopped.tolist() == [True, True]


def test_lengths_to_mask():
    mask = lengths_to_mask(torch.tensor([0, 2, 3]), 3)
    assert mask.tolist() == [[False] * 3, [True, True, False], [True] * 3]


def test_first_difference_index():
    a = torch.tensor([[1, 2, 3], [1, 2, 0], [1, 2, 3], [9, 2, 3]])
    ma = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    b = torch.tensor([[1, 2, 4, 0], [1, 2, 5, 0], [1, 2, 3, 0], [8, 2, 3, 0]])
    mb = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    # row 0: token differs at 2; row 1: a ends at 2 while b goes on (end counts as a difference);
    # row 2: identical -> common length 3; row 3: differs at 0. Widths 3 and 4 differ (narrower is padded).
    assert first_difference_index(a, ma, b, mb).tolist() == [2, 2, 3, 0]
    # padding content is never compared: same real tokens, different pad ids
    assert first_difference_index(a[1:2], ma[1:2], torch.tensor([[1, 2, 7]]), ma[1:2]).tolist() == [2]


def test_position_ids_from_mask_match_across_padding_sides():
    left = torch.tensor([[0, 0, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0]])
    # cumsum - 1, clamped at 0: left (0,0,1,2,3)-1 -> (0,0,0,1,2); right (1,2,3,3,3)-1 -> (0,1,2,2,2)
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2]]
    assert position_ids_from_mask(right).tolist() == [[0, 1, 2, 2, 2]]
    # the real tokens get positions 0, 1, 2 on both sides
    real_left = position_ids_from_mask(left)[left.bool()]
    assert real_left.tolist() == position_ids_from_mask(right)[right.bool()].tolist() == [0, 1, 2]
