"""Data-parallel training (torchrun, `DistributedDataParallel`): noise scale and decisions.

Under DDP every replica computes the gradient of its own local batch before the all-reduce
averages them. Those local gradients are the small batches of the two-batch estimator and
the average is the big one (McCandlish et al. 2018, App. A.1), so B_simple comes for free.

`DDPNoiseScale` is the one DDP path for training code: it attaches the tracker's comm hook
(`GradientNoiseScaleTracker.attach_ddp`, one squared norm per bucket and one scalar
all-reduce per step; the gradients are untouched), remembers the local batch size and reads
like every batchlab monitor (`b_simple`, `b_simple_ci`, `reliable` as properties).
`attach()` again is a no-op, `detach()` stops measuring (DDP cannot remove a comm hook, so
the hook stays as a plain all-reduce) and keeps the estimate.

Decisions must be identical on every rank, or the replicas would disagree on the batch and
the collective calls would hang. `decide_and_broadcast` lets rank 0 decide and sends the
`Decision` to the others, which `adopt` it. The estimate is identical on every rank too
(the norms are all-reduced), so every rank may read it.

    ddp = DistributedDataParallel(model)
    noise = DDPNoiseScale(ddp, local_batch_size=micro * accumulation)
    ...backward of the last micro-batch (the others under ddp.no_sync())...
    noise.end_step()
    if controller.due(step):
        decision = decide_and_broadcast(controller, step, noise.b_simple)
"""

from __future__ import annotations

from typing import TypeVar

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from batchlab.adaptive.controller import AdaptiveBatchSize, Decision
from batchlab.adaptive.noise_source import smoothed_noise_estimate
from batchlab.tracking.readout import TrackerReadout

T = TypeVar("T")


class DDPNoiseScale(TrackerReadout):
    """B_simple from per-replica gradients, through `GradientNoiseScaleTracker.attach_ddp`.

    Args:
        model: the `DistributedDataParallel` module (its comm-hook slot must be free, or
            hold a hook an earlier batchlab monitor attached and detached).
        local_batch_size: examples behind each replica's gradient in one optimizer step
            (micro-batch size x accumulation steps); update it when the batch changes.
        decay: EMA decay of the two-batch estimates (default 0.95).
        strict: raise when it cannot measure (one replica); by default it warns once.
        attach: attach now (default True); else call `attach()` later.
    """

    def __init__(
        self,
        model: DistributedDataParallel,
        local_batch_size: int,
        decay: float = 0.95,
        *,
        strict: bool = False,
        attach: bool = True,
    ) -> None:
        self.model = model
        self.local_batch_size = local_batch_size
        self.world_size = dist.get_world_size()
        self.strict = strict
        self.estimate = smoothed_noise_estimate(decay)
        self.tracker = self.estimate.tracker
        if attach:
            self.attach()

    @property
    def attached(self) -> bool:
        return self.tracker.ddp_model is self.model

    def attach(self) -> None:
        """Start measuring (a no-op when attached)."""
        if self.world_size < 2:  # one replica has no small batch: leave DDP's own hook
            return self.cannot_measure(
                "one replica has no per-replica gradients to contrast; run with >= 2 "
                "processes, or on one device use accumulation with GradientNoiseScaleTracker"
            )
        self.tracker.attach_ddp(self.model)

    def detach(self) -> None:
        """Stop measuring; the estimate so far stays readable (a no-op when detached)."""
        self.tracker.detach_ddp()

    def end_step(self) -> None:
        """Call after the last backward of an optimizer step (before `optimizer.step()`)."""
        if not self.attached or not self.tracker.ddp_synced:
            return  # detached, one replica, or no synchronizing backward since the last step
        self.tracker.ddp_end_step(self.model, self.local_batch_size)


def broadcast_from(value: T, src: int = 0) -> T:
    """Rank `src`'s `value` on every rank (a picklable object; the others' values are
    ignored). The one way decisions travel: a schedule's phase, a controller's `Decision`."""
    payload: list[T | None] = [value if dist.get_rank() == src else None]
    dist.broadcast_object_list(payload, src=src)
    return payload[0]  # filled in by the broadcast on every rank


def decide_and_broadcast(
    controller: AdaptiveBatchSize, step: int, b_simple: float | None, src: int = 0
) -> Decision:
    """Rank `src` decides; every other rank adopts its `Decision`. Returns the decision."""
    decision = broadcast_from(
        controller.decide(step, b_simple) if dist.get_rank() == src else None, src
    )
    if dist.get_rank() != src:
        controller.adopt(decision)
    return decision
