"""Masked reductions, whitening and response masks.

Convention: masks are ``bool`` and True means "real token". Responses are right-padded: the real tokens of
a row form a prefix. Every reduction ignores the values at masked-out positions entirely (they may hold
garbage, even inf or nan), because values are selected with ``torch.where`` rather than multiplied by the mask.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask.bool()


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is True.

    Equation: ``Σ_i m_i x_i``, with masked-out values never read (so a nan there does not leak).
    Shapes: ``x`` and ``mask`` broadcastable to the same shape; ``dim=None`` gives a 0-dim tensor, otherwise
    the reduction over ``dim``.
    Source: standard; the masked reductions of OpenAI's lm-human-preferences (Ziegler et al. 2019).
    """
    mask = _as_bool(mask)
    values = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return values.sum() if dim is None else values.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True.

    Equation: ``Σ_i m_i x_i / Σ_i m_i``; an empty mask gives nan (0/0).
    Shapes: as :func:`masked_sum`.
    Source: standard (lm-human-preferences, Ziegler et al. 2019).
    """
    mask = _as_bool(mask)
    count = mask.expand_as(x).sum() if dim is None else mask.expand_as(x).sum(dim=dim)
    return masked_sum(x, mask, dim) / count.to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the positions where ``mask`` is True (all dimensions).

    Equation: ``n = Σ m_i``, ``μ = Σ m_i x_i / n``, ``var = Σ m_i (x_i - μ)² / n``; with ``unbiased=True``
    Bessel's correction ``var · n / (n - 1)``.
    Shapes: ``x``, ``mask`` of the same shape -> 0-dim tensor.
    Raises ValueError when the mask is empty, or holds a single element and ``unbiased=True``.
    Source: standard; unbiased by default as in the reference PPO implementations (e.g. TRL's whiten).
    """
    mask = _as_bool(mask).expand_as(x)
    n = int(mask.sum().item())
    if n == 0:
        raise ValueError("masked_var: the mask selects no element")
    if unbiased and n < 2:
        raise ValueError("masked_var: the unbiased variance needs at least 2 masked elements")
    mean = masked_sum(x, mask) / n
    var = masked_sum((x - mean) ** 2, mask) / n
    return var * n / (n - 1) if unbiased else var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the mean and variance of its masked elements.

    Equation: ``y = (x - μ) / sqrt(var + eps)`` with μ and var (unbiased) over the masked elements; with
    ``shift_mean=False`` the mean is added back, ``y = (x - μ) / sqrt(var + eps) + μ``. Positions outside the
    mask are set to 0.
    Shapes: ``x``, ``mask`` of the same shape -> same shape.
    Source: ``whiten`` of OpenAI's lm-human-preferences (Ziegler et al. 2019), used for PPO advantages.
    """
    mask = _as_bool(mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


LOSS_AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregation_count(response_mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The count a loss of ``aggregation`` is divided by, for this (part of a) batch.

    Equation: ``token_mean``: ``Σ_{b,t} m_bt`` (response tokens); ``seq_mean_token_mean`` and
    ``seq_mean_token_sum_norm``: ``Σ_b [Σ_t m_bt > 0]`` (sequences with at least one response token).
    Counts add over micro-batches and processes: the sum over the parts of a minibatch is what
    :func:`aggregate_token_losses` takes as ``num_tokens`` / ``num_sequences`` to make the parts' losses add up to
    the whole minibatch's loss exactly.
    Shapes: ``response_mask`` (B, T) -> 0-dim long tensor. Raises ValueError for an unknown aggregation.
    Source: rlhfkit (the normalisers of the three modes of :func:`aggregate_token_losses`).
    """
    _check_aggregation(aggregation)
    mask = _as_bool(response_mask)
    return mask.sum() if aggregation == "token_mean" else mask.any(dim=1).sum()


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")


def _positive(name: str, value: int | float | torch.Tensor | None) -> None:
    if value is not None and not isinstance(value, torch.Tensor) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def aggregate_token_losses(
    per_token: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: str = "token_mean",
    num_tokens: int | float | torch.Tensor | None = None,
    num_sequences: int | float | torch.Tensor | None = None,
    max_length: int | float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses to the scalar loss, in one of three ways.

    Equations, with ``n_b = Σ_t m_bt`` and ``S_b = Σ_t m_bt ℓ_bt``:

    - ``token_mean``: ``Σ_b S_b / num_tokens`` (default ``num_tokens = Σ_b n_b``): every token weighs the same.
    - ``seq_mean_token_mean``: ``Σ_{b: n_b > 0} (S_b / n_b) / num_sequences`` (default: the rows with
      ``n_b > 0``): every sequence weighs the same, its tokens share its weight.
    - ``seq_mean_token_sum_norm``: ``Σ_b S_b / (num_sequences · max_length)`` with ``max_length`` a constant (the
      generation budget, ``max_new_tokens``): every token weighs the same whatever its sequence's length, without
      the length bias of a per-sequence mean.

    Each is a sum over rows divided by a constant, so a batch split into parts (micro-batches, processes, each
    trimmed to its own longest row) gives exactly the whole batch's loss and gradient when every part is given
    the whole batch's ``num_tokens`` / ``num_sequences`` (the sum of :func:`aggregation_count` over the parts)
    and the same ``max_length`` (never a part's own width, which trimming changes). Masked-out values are never
    read. A normaliser that the mode does not use is refused, so that a count meant for one mode is never taken
    for another.
    Shapes: ``per_token``, ``response_mask`` (B, T) -> 0-dim tensor.
    Raises ValueError for an unknown mode, a missing ``max_length`` (``seq_mean_token_sum_norm``), a normaliser
    the mode does not use, or one that is not > 0.
    Source: the ``loss_agg_mode`` options of Sheng et al. 2024 (HybridFlow / verl); ``seq_mean_token_mean`` is
    the per-response mean of GRPO (Shao et al. 2024, DeepSeekMath eq. 3); ``seq_mean_token_sum_norm`` is
    Dr. GRPO's constant normaliser (Liu et al. 2025, "Understanding R1-Zero-like training"); ``token_mean`` is
    the token-level loss of DAPO (Yu et al. 2025, §3.3).
    """
    _check_aggregation(aggregation)
    for name, value, used in (("num_tokens", num_tokens, aggregation == "token_mean"),
                              ("num_sequences", num_sequences, aggregation != "token_mean"),
                              ("max_length", max_length, aggregation == "seq_mean_token_sum_norm")):
        if value is not None and not used:
            raise ValueError(f"{name} is not a normaliser of loss aggregation {aggregation!r}")
        _positive(name, value)
    mask = _as_bool(response_mask)
    if aggregation == "token_mean":
        return masked_sum(per_token, mask) / (mask.sum() if num_tokens is None else num_tokens)
    if num_sequences is None:
        num_sequences = mask.any(dim=1).sum()
    row_sums = masked_sum(per_token, mask, dim=1)
    if aggregation == "seq_mean_token_mean":
        lengths = mask.sum(dim=1).clamp(min=1).to(per_token.dtype)  # an empty row: S_b = 0, not counted
        return (row_sums / lengths).sum() / num_sequences
    if max_length is None:
        raise ValueError("loss aggregation 'seq_mean_token_sum_norm' needs max_length (the generation budget)")
    return row_sums.sum() / (num_sequences * max_length)


def _stop_tensor(stop_ids: Iterable[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(stop_ids, torch.Tensor):
        return stop_ids.to(device=device, dtype=torch.long).flatten()
    return torch.tensor(list(stop_ids), dtype=torch.long, device=device)


def first_stop_index(tokens: torch.Tensor, stop_ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """Index of the first stop token in each row, or ``T`` where the row holds none.

    Equation: ``i_b = min{t : tokens[b, t] ∈ stop_ids}`` (``T`` if the set is empty).
    Shapes: ``tokens`` (B, T) integer -> (B,) long.
    Source: standard response post-processing (truncation at EOS, e.g. Ouyang et al. 2022 / TRL).
    """
    T = tokens.shape[1]
    is_stop = torch.isin(tokens, _stop_tensor(stop_ids, tokens.device))
    positions = torch.arange(T, device=tokens.device).expand_as(tokens)
    return torch.where(is_stop, positions, torch.full_like(positions, T)).min(dim=1).values


def truncate_after_stop(
    tokens: torch.Tensor, stop_ids: Iterable[int] | torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each sampled response after its first stop token.

    Equation: with ``i_b = first_stop_index``, ``response_mask[b, t] = t <= i_b`` (the stop token is kept and
    is a response token), ``tokens[b, t] = pad_id`` where the mask is False, ``stopped[b] = i_b < T``.
    Shapes: ``tokens`` (B, T) -> ``(tokens (B, T), response_mask (B, T) bool, stopped (B,) bool)``.
    The input must be the raw sampled tokens (nothing before the first stop is padding).
    Source: standard response post-processing (Ouyang et al. 2022; the "missing EOS" handling of
    Huang et al. 2024, "The N+ implementation details of RLHF with PPO").
    """
    T = tokens.shape[1]
    stop_index = first_stop_index(tokens, stop_ids)
    positions = torch.arange(T, device=tokens.device).unsqueeze(0)
    response_mask = positions <= stop_index.unsqueeze(1)
    truncated = torch.where(response_mask, tokens, torch.full_like(tokens, pad_id))
    return truncated, response_mask, stop_index < T


def lengths_to_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Right-padded mask from lengths.

    Equation: ``mask[b, t] = t < lengths[b]``.
    Shapes: ``lengths`` (B,) integer -> (B, T) bool.
    Source: standard.
    """
    positions = torch.arange(T, device=lengths.device).unsqueeze(0)
    return positions < lengths.unsqueeze(1)


def first_difference_index(
    ids_a: torch.Tensor, mask_a: torch.Tensor, ids_b: torch.Tensor, mask_b: torch.Tensor
) -> torch.Tensor:
    """Index of the first position where two right-padded sequences differ.

    Equation: ``d_b = min{t : real_a(t) ≠ real_b(t) or (real_a(t) and real_b(t) and a_t ≠ b_t)}`` where
    ``real(t)`` is the mask; the end of one sequence while the other goes on counts as a difference. Identical
    sequences give their common length.
    Shapes: ``ids_a`` (B, La), ``mask_a`` (B, La), ``ids_b`` (B, Lb), ``mask_b`` (B, Lb) -> (B,) long; the two
    widths may differ (the narrower is treated as padded).
    Source: the divergence index of the DeepSpeed-Chat step-2 reward loss (Yao et al. 2023).
    """
    L = max(ids_a.shape[1], ids_b.shape[1])

    def widen(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = L - ids.shape[1]
        if extra == 0:
            return ids, _as_bool(mask)
        ids = torch.nn.functional.pad(ids, (0, extra), value=0)
        mask = torch.nn.functional.pad(_as_bool(mask), (0, extra), value=False)
        return ids, mask

    ids_a, mask_a = widen(ids_a, mask_a)
    ids_b, mask_b = widen(ids_b, mask_b)
    differs = (mask_a != mask_b) | (mask_a & mask_b & (ids_a != ids_b))
    positions = torch.arange(L, device=ids_a.device).expand_as(ids_a)
    first = torch.where(differs, positions, torch.full_like(positions, L)).min(dim=1).values
    both_end = torch.maximum(mask_a.sum(dim=1), mask_b.sum(dim=1))
    return torch.minimum(first, both_end)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left- and right-padded inputs give the same outputs.

    Equation: ``pos[b, t] = max(Σ_{s<=t} mask[b, s] - 1, 0)``.
    Shapes: ``attention_mask`` (B, L) -> (B, L) long.
    Source: the position-id convention of HF ``generate`` for left-padded batches (transformers).
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
