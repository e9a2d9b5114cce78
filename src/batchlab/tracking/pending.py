"""A measured step waiting for the host: per-parameter gradient norms still on the device.

The tracker queues one `PendingStep` per optimizer step and reads them all back at once
when an estimate is asked for, so tracking costs one device-to-host sync per read, not one
per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class PendingStep:
    """One optimizer step's norms, not yet on the host (what `squared_sums` reads)."""

    step: int
    small_sq: list[list[torch.Tensor]]  # per-parameter norms of each weighted contribution
    weights: list[float]  # each micro-batch's weight in the step's gradient
    sizes: list[int]
    big_sq: list[torch.Tensor]  # per-parameter norms of the step's gradient
    big_size: float  # examples behind the big batch (its variance: Σ w(big_size))
    scale: float  # AMP loss scale the gradients carry
    pre_small_sq: list[list[torch.Tensor]] | None = None
    pre_big_sq: list[torch.Tensor] | None = None
    big_weight: float = 1.0  # the big batch's share of the step's gradient in `.grad`


def squared_sums(pending: list[PendingStep]) -> Iterator[float]:
    """|g|^2 of every gradient in `pending`, in order: per step its small batches, its big
    batch, then (when preconditioned) the same again. One device-to-host copy for all."""
    groups = [parts for item in pending for parts in _parts_of(item)]
    flat = [t for parts in groups for t in parts]  # 0-d tensors
    values = torch.stack(flat).double().tolist() if flat else []
    sums, start = [], 0
    for parts in groups:  # each group: the per-parameter norms of one gradient
        sums.append(math.fsum(v * v for v in values[start : start + len(parts)]))
        start += len(parts)
    return iter(sums)


def _parts_of(item: PendingStep) -> list[list[torch.Tensor]]:
    out = [*item.small_sq, item.big_sq]
    if item.pre_small_sq is not None:
        out += [*item.pre_small_sq, item.pre_big_sq]
    return out
