"""A batch sampler whose batch size may change at any batch boundary, mid-epoch included.

Each epoch is one random permutation of the dataset, drawn from a generator seeded with
`(seed, epoch)`, and batches are consecutive slices of it. Changing `batch_size` only
changes where the next slice ends, so within an epoch every example is seen exactly once
whatever the sizes were, and the order of examples depends only on the seed and epoch.

Use it as `DataLoader(dataset, batch_sampler=sampler)`. With `num_workers > 0` the loader
fetches `prefetch_factor * num_workers` batches ahead, so a new size shows up that many
batches late (still with nothing skipped or repeated); use `num_workers=0` for an exact
switch, or `take()` directly.

Frameworks that call `set_epoch` (Lightning calls it on `loader.batch_sampler.sampler`,
never on the batch sampler itself) reach it through `sampler`, the epoch's permutation.
`set_epoch(e)` starts epoch `e` from its beginning, unless `e` is already the current epoch:
then nothing changes, since a loader may already have taken that epoch's first batches
(Lightning builds its first iterator, and prefetches a batch, before it calls `set_epoch(0)`)
and a resumed sampler continues where it stopped. `len()` is the number of
batches left at the current size; a trainer that counts an epoch's batches from `len()` once
(Lightning) would cut a shrinking epoch short and miss validation after a growing one, so
`sized=False` makes `len()` raise `TypeError`: the loader then has no length and such a
trainer ends each epoch when the data ends (`batchlab.integrations.lightning` sets it).

Under data parallelism each replica builds the same sampler with its `rank`: the global
batch `batch_size * num_replicas` is cut from the shared permutation and replica `rank`
gets its slice. The last global batch of an epoch may be short; it is split as evenly as
possible and a replica left empty gets the epoch's first example again (as
`DistributedSampler` pads), unless `drop_last`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from batchlab.core.checks import check_batch_size
from batchlab.errors import ConfigError


class EpochPermutation(Sampler[int]):
    """The order of one epoch's examples: a permutation seeded with `(seed, epoch)`.

    The index sampler behind `ResizableBatchSampler` (its `sampler`, as torch's
    `BatchSampler.sampler`), so that a framework calling `loader.batch_sampler.sampler.
    set_epoch(e)` starts epoch `e` (the batch sampler notices the new epoch and starts it
    from its first example).
    """

    def __init__(self, num_examples: int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.num_examples = num_examples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._order: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Make `epoch` the current epoch (as `DistributedSampler.set_epoch`)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._order = None

    def order(self) -> torch.Tensor:
        """This epoch's permutation of `range(num_examples)` (cached)."""
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(self.num_examples, generator=g)
            else:
                self._order = torch.arange(self.num_examples)
        return self._order

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.num_examples


class ResizableBatchSampler(Sampler[list[int]]):
    """Yields lists of indices; `batch_size` may be reassigned between batches.

    Args:
        data_source: the dataset (or anything with `len`), or the number of examples.
        batch_size: examples per batch on this replica.
        shuffle: a fresh permutation each epoch (default True); False walks 0..n-1.
        seed: seeds the permutations; the same seed and sizes give the same batches.
        drop_last: drop an epoch's final global batch when it is short (default False).
        num_replicas / rank: data-parallel world size and this replica's rank.
        sized: whether `len()` works (the batches left at the current size). False: `len()`
            raises TypeError, so a loader over it has no length (for Lightning; see above).
    """

    def __init__(
        self,
        data_source: Sized | int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        sized: bool = True,
    ) -> None:
        self.num_examples = data_source if isinstance(data_source, int) else len(data_source)
        check_batch_size(self.num_examples, what="dataset size")
        self.num_replicas = check_batch_size(num_replicas, what="num replicas")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank: expected 0 <= rank < {num_replicas}, got {rank!r}")
        self.rank = rank
        self.drop_last = drop_last
        self.sized = sized
        self.batch_size = batch_size  # validated by the setter
        self.sampler = EpochPermutation(self.num_examples, shuffle=shuffle, seed=seed)
        self._position = 0  # examples of the current epoch's permutation already handed out
        self._position_epoch = self.sampler.epoch  # the epoch `_position` belongs to

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = check_batch_size(value, what="batch size")

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def shuffle(self) -> bool:
        return self.sampler.shuffle

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def position(self) -> int:
        """Examples of the current epoch already handed out (all replicas together)."""
        self._follow_restarts()
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        self._follow_restarts()
        self._position = value

    def _follow_restarts(self) -> None:
        if self._position_epoch != self.sampler.epoch:  # a new epoch (set on `sampler`)
            self._position_epoch, self._position = self.sampler.epoch, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning; nothing changes if it is the current one."""
        self.sampler.set_epoch(epoch)

    @property
    def remaining(self) -> int:
        """Examples of the current epoch not yet handed out (all replicas together)."""
        return self.num_examples - self.position

    def take(self, batch_size: int | None = None) -> list[int] | None:
        """This replica's next batch, or None at the end of the epoch (then the next call
        starts the following epoch). `batch_size` overrides `self.batch_size` for one batch."""
        if self.remaining == 0:
            self.set_epoch(self.epoch + 1)
            return None
        size = self.batch_size if batch_size is None else check_batch_size(batch_size)
        global_size = size * self.num_replicas
        if self.drop_last and self.remaining < global_size:
            self.set_epoch(self.epoch + 1)
            return None
        order = self.sampler.order()
        chunk = order[self.position : self.position + global_size]
        self.position += len(chunk)
        if self.num_replicas == 1:
            return chunk.tolist()
        mine = chunk.tensor_split(self.num_replicas)[self.rank]
        if len(mine) == 0:  # short last batch: pad this replica with one example
            mine = order[:1]
        return mine.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch (all of it after `set_epoch`), then the epoch ends."""
        while True:
            batch = self.take()
            if batch is None:
                return
            yield batch

    def __len__(self) -> int:
        """Batches left in this epoch at the current batch size (changes as it does).

        Raises TypeError with `sized=False` (no length: see the module docstring)."""
        if not self.sized:
            raise TypeError(
                "ResizableBatchSampler(sized=False) has no length: its batch size changes "
                "during the epoch, so the epoch ends when the data does"
            )
        global_size = self.batch_size * self.num_replicas
        if self.drop_last:
            return self.remaining // global_size
        return -(-self.remaining // global_size)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))
        self.position = int(state["position"])
        self.batch_size = int(state["batch_size"])
