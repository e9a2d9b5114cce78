"""Turning index tensors into device batches, without per-sample Python work where possible."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensor, or tuple/list/dict of them) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class Batcher:
    """Gathers the examples at given indices into one batch on `device`.

    In-memory `TensorDataset`s are moved to the device once and indexed there, so a batch
    costs one gather per tensor. Other datasets fall back to `collate_fn([ds[i] ...])`.
    """

    def __init__(
        self,
        dataset: Dataset,
        device: torch.device,
        collate_fn: Callable[[list], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.device = device
        self.collate_fn = collate_fn or default_collate
        self._tensors: tuple[torch.Tensor, ...] | None = None
        if isinstance(dataset, TensorDataset) and collate_fn is None:
            self._tensors = tuple(t.to(device) for t in dataset.tensors)

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, indices: torch.Tensor) -> Any:
        if self._tensors is not None:
            idx = indices.to(self.device)
            return tuple(t[idx] for t in self._tensors)
        batch = self.collate_fn([self.dataset[i] for i in indices.tolist()])
        return to_device(batch, self.device)

    def sequential(self, batch_size: int) -> Iterator[tuple[int, Any]]:
        """Yield `(size, batch)` over the whole dataset in order (for evaluation)."""
        n = len(self.dataset)
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            yield len(idx), self(idx)


def epoch_chunks(
    num_examples: int, batch_size: int, generator: torch.Generator, drop_last: bool = False
) -> list[torch.Tensor]:
    """A fresh random permutation of the examples, cut into batches of `batch_size`."""
    order = torch.randperm(num_examples, generator=generator)
    chunks = list(order.split(batch_size))
    if drop_last and len(chunks) > 0 and len(chunks[-1]) < batch_size:
        chunks.pop()
    return chunks


class EpochOrder:
    """Fresh random permutations of the examples, one per epoch, handed out in slices of
    any size: a slice never crosses an epoch's end (the last one of an epoch is short), so
    every example is seen once per epoch however the sizes change. The permutations are
    those of `epoch_chunks` with the same generator, so constant sizes give its batches.
    """

    def __init__(self, num_examples: int, generator: torch.Generator) -> None:
        self.num_examples = num_examples
        self.generator = generator
        self._order: torch.Tensor | None = None
        self.position = 0

    def take(self, size: int) -> torch.Tensor:
        """The next `size` examples of the current epoch, fewer at its end."""
        if self._order is None or self.position >= self.num_examples:
            self._order = torch.randperm(self.num_examples, generator=self.generator)
            self.position = 0
        chunk = self._order[self.position : self.position + size]
        self.position += len(chunk)
        return chunk
