"""The resizable batch sampler: nothing skipped or repeated when the size changes mid-epoch."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from batchlab.adaptive import ResizableBatchSampler
from batchlab.errors import ConfigError


def run_epoch(sampler: ResizableBatchSampler, sizes: list[int]) -> list[list[int]]:
    """One epoch, setting the next size from `sizes` (cycled) before every batch."""
    batches, i = [], 0
    while True:
        sampler.batch_size = sizes[i % len(sizes)]
        batch = sampler.take()
        if batch is None:
            return batches
        batches.append(batch)
        i += 1


@pytest.mark.parametrize("seed", range(5))
def test_mid_epoch_resizes_cover_every_example_exactly_once(seed):
    rng = random.Random(seed)
    n = rng.randint(50, 300)
    sizes = [rng.randint(1, 40) for _ in range(20)]
    sampler = ResizableBatchSampler(n, sizes[0], seed=seed)
    for _epoch in range(2):
        batches = run_epoch(sampler, sizes)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        expected = [min(s, n - sum(len(b) for b in batches[:j])) for j, s in enumerate(sizes)]
        assert [len(b) for b in batches][: len(expected)] == expected[: len(batches)]


def test_deterministic_given_seed_and_sizes():
    a = run_epoch(ResizableBatchSampler(100, 7, seed=3), [7, 20, 3])
    b = run_epoch(ResizableBatchSampler(100, 7, seed=3), [7, 20, 3])
    c = run_epoch(ResizableBatchSampler(100, 7, seed=4), [7, 20, 3])
    assert a == b and a != c
    # The order of examples depends on the seed only, not on the sizes.
    d = run_epoch(ResizableBatchSampler(100, 7, seed=3), [50])
    assert [i for x in a for i in x] == [i for x in d for i in x]


def test_epochs_get_fresh_permutations_and_unshuffled_walks_in_order():
    s = ResizableBatchSampler(30, 10, seed=0)
    first, second = run_epoch(s, [10]), run_epoch(s, [10])
    assert first != second and s.epoch == 2
    assert run_epoch(ResizableBatchSampler(5, 2, shuffle=False), [2]) == [[0, 1], [2, 3], [4]]
    assert run_epoch(ResizableBatchSampler(5, 2, shuffle=False, drop_last=True), [2]) == [
        [0, 1],
        [2, 3],
    ]


def test_dataloader_sees_a_size_change_at_the_next_batch():
    ds = TensorDataset(torch.arange(64))
    sampler = ResizableBatchSampler(ds, 4, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=0)
    seen, lengths = [], []
    for (x,) in loader:
        lengths.append(len(x))
        seen += x.tolist()
        if len(lengths) == 3:
            sampler.batch_size = 16
    assert lengths[:4] == [4, 4, 4, 16]
    assert sorted(seen) == list(range(64))
    assert len(loader) == 4  # next epoch, at 16 per batch


def test_replicas_split_each_global_batch_without_overlap():
    n = 101
    samplers = [ResizableBatchSampler(n, 5, seed=2, num_replicas=2, rank=r) for r in (0, 1)]
    per_rank = [run_epoch(s, [5, 9, 2]) for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1])  # ranks step together
    flat0 = [i for b in per_rank[0] for i in b]
    flat1 = [i for b in per_rank[1] for i in b]
    assert sorted(flat0 + flat1) == list(range(n))  # 101 = 2 * 50 + 1: no padding needed
    assert not set(flat0) & set(flat1)


def test_state_dict_resumes_mid_epoch():
    s = ResizableBatchSampler(50, 6, seed=5)
    s.take(), s.take()
    state = s.state_dict()
    rest = run_epoch(s, [6])
    resumed = ResizableBatchSampler(50, 1, seed=5)
    resumed.load_state_dict(state)
    assert run_epoch(resumed, [6]) == rest


def test_bad_batch_size_is_a_clear_error():
    s = ResizableBatchSampler(10, 2)
    with pytest.raises(ConfigError) as info:
        s.batch_size = 0
    assert "expected a positive integer, got 0" in str(info.value)
    with pytest.raises(ConfigError):
        ResizableBatchSampler(10, 2, num_replicas=2, rank=2)


def test_set_epoch_reaches_the_sampler_lightning_calls_it_on():
    # Lightning calls set_epoch on loader.batch_sampler.sampler only (issue 13).
    ds = TensorDataset(torch.arange(30))
    sampler = ResizableBatchSampler(ds, 4, seed=3)
    loader = DataLoader(ds, batch_sampler=sampler)
    it = iter(loader)
    first = next(it)[0].tolist()  # Lightning prefetches before its set_epoch(0)
    loader.batch_sampler.sampler.set_epoch(0)  # the current epoch: nothing changes
    rest = [i for (x,) in it for i in x.tolist()]
    assert sorted(first + rest) == list(range(30))  # epoch 0 once, nothing repeated
    sampler.take(), sampler.take()  # epoch 1 under way (the loop above ended epoch 0)
    assert sampler.epoch == 1 and sampler.position == 8
    loader.batch_sampler.sampler.set_epoch(2)  # a new epoch starts from its beginning
    assert sampler.epoch == 2 and sampler.remaining == 30
    order = sampler.sampler.order().tolist()
    epoch2 = [i for (x,) in loader for i in x.tolist()]
    assert epoch2 == order and sorted(order) == list(range(30))  # the permutation, in order


def test_unsized_sampler_has_no_length():
    ds = TensorDataset(torch.arange(30))
    sampler = ResizableBatchSampler(ds, 4, sized=False)
    loader = DataLoader(ds, batch_sampler=sampler)
    with pytest.raises(TypeError, match="has no length"):
        len(loader)
    assert sum(len(x) for (x,) in loader) == 30  # iterating does not need it
