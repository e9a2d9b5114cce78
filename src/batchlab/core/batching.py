"""Batch arithmetic: micro-batch x accumulation x replicas, iterations and steps.

`split` is the ONE place that turns a wanted batch into `(micro_batch_size,
accumulation_steps)`; the planner, the throughput probe and the adaptive controller call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchlab.core.checks import check_batch_size
from batchlab.errors import ConfigError
from batchlab.results import JsonResult


def split(
    batch_size: int,
    cap: int | None,
    world_size: int = 1,
    *,
    fixed_micro: int | None = None,
    fixed_accumulation: int | None = None,
) -> tuple[int, int]:
    """`(micro, accumulation)` for an optimizer step of at least `batch_size` examples.

    Each of `world_size` replicas takes `ceil(batch_size / world_size)` examples, in the
    fewest micro-batches of at most `cap` (None: no memory cap), as even as possible:
    `accumulation = ceil(per_replica / cap)`, `micro = ceil(per_replica / accumulation)`.
    `micro * accumulation * world_size` may exceed `batch_size` by less than one
    micro-batch per replica; a caller that keeps exactly `batch_size` makes the last
    micro-batch shorter (TrainStep weights each by its share). `fixed_micro` or
    `fixed_accumulation` pins one factor (trainers that own their data loader or their
    accumulation) and the other makes up the batch.

    >>> split(1000, 512)
    (500, 2)
    """
    check_batch_size(batch_size, what="batch_size")
    check_batch_size(world_size, what="world_size")
    per_replica = math.ceil(batch_size / world_size)
    if fixed_micro is not None and fixed_accumulation is not None:
        raise ConfigError(
            "split: fixing both fixed_micro and fixed_accumulation leaves nothing to choose; "
            "fix at most one"
        )
    if fixed_micro is not None:
        micro = check_batch_size(fixed_micro, what="fixed_micro")
        return micro, math.ceil(per_replica / micro)
    if fixed_accumulation is not None:
        accumulation = check_batch_size(fixed_accumulation, what="fixed_accumulation")
        return math.ceil(per_replica / accumulation), accumulation
    limit = per_replica if cap is None else check_batch_size(cap, what="cap")
    accumulation = math.ceil(per_replica / limit)
    return math.ceil(per_replica / accumulation), accumulation


@dataclass(frozen=True)
class BatchArithmetic(JsonResult):
    """How many iterations and optimizer steps a run takes (what `batchlab calc` prints)."""

    samples: int
    batch_size: int
    epochs: int
    accumulation_steps: int
    world_size: int
    drop_last: bool
    iterations_per_epoch: int  # micro-batches each rank runs per epoch
    total_iterations: int
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int
    effective_batch_size: int  # batch_size * accumulation_steps * world_size
    samples_per_epoch: int  # examples actually processed per epoch, all ranks together
    last_batch_size: int  # size of each rank's final micro-batch of an epoch


def calc(
    samples: int,
    batch_size: int,
    epochs: int = 1,
    *,
    accumulation_steps: int = 1,
    world_size: int = 1,
    drop_last: bool = False,
) -> BatchArithmetic:
    """Batch, iteration and epoch arithmetic.

    Each of `world_size` ranks gets `ceil(samples / world_size)` examples per epoch (as
    `DistributedSampler` pads), or `floor(...)` with `drop_last`. A rank's final partial
    micro-batch is kept, or dropped with `drop_last`. A partial accumulation window at
    the end of an epoch still makes an optimizer step (as Lightning and HF Trainer do).

    >>> calc(1024, 8, 10).total_iterations
    1280
    """
    check_batch_size(samples, what="samples")
    check_batch_size(batch_size, what="batch size")
    check_batch_size(epochs, what="epochs")
    check_batch_size(accumulation_steps, what="accumulation steps")
    check_batch_size(world_size, what="world size")
    if drop_last:
        per_rank = samples // world_size
        iterations = per_rank // batch_size
        last = batch_size if iterations else 0
        processed = iterations * batch_size * world_size
    else:
        per_rank = -(-samples // world_size)  # ceil in integers: exact for any size
        iterations = -(-per_rank // batch_size)
        last = per_rank - (iterations - 1) * batch_size
        processed = per_rank * world_size
    if iterations == 0:
        raise ConfigError(
            f"with drop_last, batch size {batch_size} x world size {world_size} is larger "
            f"than the {samples} samples, so an epoch has no iterations; use a smaller batch"
        )
    steps = iterations // accumulation_steps if drop_last else -(-iterations // accumulation_steps)
    return BatchArithmetic(
        samples=samples,
        batch_size=batch_size,
        epochs=epochs,
        accumulation_steps=accumulation_steps,
        world_size=world_size,
        drop_last=drop_last,
        iterations_per_epoch=iterations,
        total_iterations=iterations * epochs,
        optimizer_steps_per_epoch=steps,
        total_optimizer_steps=steps * epochs,
        effective_batch_size=batch_size * accumulation_steps * world_size,
        samples_per_epoch=processed,
        last_batch_size=last,
    )
