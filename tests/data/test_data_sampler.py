"""LengthGroupedBatchSampler: exactly-once coverage, determinism, grouping, resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from rlhfkit.data import LengthGroupedBatchSampler, PromptGroupedBatchSampler


def lengths(n: int, seed: int = 0) -> list[int]:
    return torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n,batch_size,mult", [(103, 4, 5), (10, 3, 50), (1, 8, 2), (64, 8, 1)])
def test_every_index_exactly_once_per_epoch(n, batch_size, mult):
    sampler = LengthGroupedBatchSampler(lengths(n), batch_size, seed=3, group_size_multiplier=mult)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert len(batches) == len(sampler) == -(-n // batch_size)
        assert sum(len(b) < batch_size for b in batches) == (n % batch_size != 0)  # at most one short batch


def test_drop_last_drops_only_the_short_batch():
    sampler = LengthGroupedBatchSampler(lengths(103), 4, seed=3, drop_last=True, group_size_multiplier=5)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert len(batches) == len(sampler) == 25 and all(len(b) == 4 for b in batches)
    assert len(set(flat)) == 100  # 103 = 25 * 4 + 3: three indices are left out


def test_deterministic_per_seed_and_epoch():
    a = LengthGroupedBatchSampler(lengths(50), 4, seed=7)
    b = LengthGroupedBatchSampler(lengths(50), 4, seed=7)
    assert a.batches(0) == b.batches(0) and a.batches(1) == b.batches(1)
    assert a.batches(0) != a.batches(1)  # a new epoch reshuffles
    assert a.batches(0) != LengthGroupedBatchSampler(lengths(50), 4, seed=8).batches(0)
    b.set_epoch(1)
    assert list(b) == a.batches(1)


def test_batches_hold_similar_lengths():
    # lengths are a permutation of 0..99 and one mega-batch covers everything, so sorting by length makes
    # batch k hold exactly the lengths 10k..10k+9 (in some batch order)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedBatchSampler(perm, batch_size=10, seed=1, group_size_multiplier=10)
    groups = sorted(sorted(perm[i] for i in b) for b in sampler)
    assert groups == [list(range(10 * k, 10 * k + 10)) for k in range(10)]
    # mega-batches of 2 batches (sorted inside each random 20-index group) vs of 1 batch (no grouping):
    # the summed within-batch length spread must shrink
    grouped = LengthGroupedBatchSampler(perm, batch_size=10, seed=1, group_size_multiplier=2)
    random_like = LengthGroupedBatchSampler(perm, batch_size=10, seed=1, group_size_multiplier=1)
    spread = lambda s: sum(max(perm[i] for i in b) - min(perm[i] for i in b) for b in s)  # noqa: E731
    assert spread(grouped) < spread(random_like)


def test_batch_order_is_shuffled():
    perm = list(range(100))
    order = [min(b) for b in LengthGroupedBatchSampler(perm, batch_size=10, seed=1, group_size_multiplier=10)]
    assert order != sorted(order) and order != sorted(order, reverse=True)


def test_resume_by_skipping_batches():
    sampler = LengthGroupedBatchSampler(lengths(30), 4, seed=2)
    full = sampler.batches(3)
    sampler.set_epoch(3, skip_batches=5)
    assert list(sampler) == full[5:] and len(sampler) == len(full) - 5


def test_works_as_a_dataloader_batch_sampler():
    data = list(range(100, 110))
    sampler = LengthGroupedBatchSampler([1] * 10, 3, seed=0)
    loaded = [b.tolist() for b in DataLoader(data, batch_sampler=sampler)]
    assert loaded == [[data[i] for i in b] for b in sampler.batches(0)]


# -- PromptGroupedBatchSampler -------------------------------------------------------------------------------
def prompt_keys() -> list[str]:
    # 7 prompts with 1..6 pairs each, interleaved in the file (as a data set of several files might be)
    sizes = {"a": 6, "b": 3, "c": 1, "d": 6, "e": 2, "f": 3, "g": 4}
    keys = [k for k, n in sizes.items() for _ in range(n)]
    return [keys[i] for i in torch.randperm(len(keys), generator=torch.Generator().manual_seed(0)).tolist()]


def test_prompt_groups_are_contiguous_and_every_index_appears_once():
    keys = prompt_keys()
    sampler = PromptGroupedBatchSampler(keys, 4, seed=1)
    for epoch in range(3):
        order = [i for b in sampler.batches(epoch) for i in b]
        assert sorted(order) == list(range(len(keys)))
        runs = [keys[order[0]]] + [keys[j] for i, j in zip(order, order[1:]) if keys[i] != keys[j]]
        assert len(runs) == len(set(keys)) == 7  # each prompt's pairs form one run
        assert [len(b) for b in sampler.batches(epoch)] == [4] * 6 + [1]


def test_prompt_grouped_order_is_seeded_and_reshuffled_per_epoch():
    keys = prompt_keys()
    a, b = PromptGroupedBatchSampler(keys, 4, seed=1), PromptGroupedBatchSampler(keys, 4, seed=1)
    assert a.batches(0) == b.batches(0) and a.batches(0) != a.batches(1)
    assert a.batches(0) != PromptGroupedBatchSampler(keys, 4, seed=2).batches(0)


def test_prompt_grouped_drop_last_and_resume_skip():
    sampler = PromptGroupedBatchSampler(prompt_keys(), 4, seed=1, drop_last=True)
    assert len(sampler) == 6 and all(len(b) == 4 for b in sampler.batches(0))
    sampler.set_epoch(1, skip_batches=2)
    assert list(sampler) == sampler.batches(1)[2:]
