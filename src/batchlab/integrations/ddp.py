"""Data-parallel training (torchrun, `DistributedDataParallel`): noise scale and decisions.

Under DDP every replica computes the gradient of its own local batch before the all-reduce
averages them. Those local gradients are the small batches of the two-batch estimator and
the average is the big one (McCandlish et al. 2018, App. A.1), so B_simple comes for free.
The one DDP path is `GradientNoiseScaleTracker.attach_ddp` / `ddp_end_step` (a comm hook
that adds one squared norm per bucket and one scalar all-reduce per step; the gradients are
untouched). `DDPNoiseScale` is a thin adapter over it for the adaptive controller: it
remembers the local batch size and gives `b_simple(step)` like every `NoiseSource`.

Decisions must be identical on every rank, or the replicas would disagree on the batch and
the collective calls would hang. `decide_and_broadcast` lets rank 0 decide and sends the
`Decision` to the others, which `adopt` it.

    ddp = DistributedDataParallel(model)
    noise = DDPNoiseScale(ddp, local_batch_size=micro * accumulation)
    ...backward of the last micro-batch (the others under ddp.no_sync())...
    noise.end_step()
    if controller.due(step):
        decision = decide_and_broadcast(controller, step, noise.b_simple())
"""

from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from batchlab.adaptive.controller import AdaptiveBatchSize, Decision
from batchlab.adaptive.noise_source import smoothed_noise_estimate


class DDPNoiseScale:
    """B_simple from per-replica gradients: `GradientNoiseScaleTracker.attach_ddp`, adapted.

    Args:
        model: the `DistributedDataParallel` module (its hook slot must be free).
        local_batch_size: examples behind each replica's gradient in one optimizer step
            (micro-batch size x accumulation steps); update it when the batch changes.
        decay: EMA decay of the two-batch estimates (default 0.95).
    """

    def __init__(
        self, model: DistributedDataParallel, local_batch_size: int, decay: float = 0.95
    ) -> None:
        self.model = model
        self.local_batch_size = local_batch_size
        self.world_size = dist.get_world_size()
        self.estimate = smoothed_noise_estimate(decay)
        self.tracker = self.estimate.tracker
        if self.world_size >= 2:  # one replica has no small batch: leave DDP's own hook
            self.tracker.attach_ddp(model)

    def end_step(self) -> None:
        """Call after the last backward of an optimizer step (before `optimizer.step()`)."""
        if self.world_size < 2 or not self.tracker.ddp_synced:
            return  # one replica, or no synchronizing backward since the last step
        self.tracker.ddp_end_step(self.model, self.local_batch_size)

    def b_simple(self, step: int = 0) -> float | None:
        """The smoothed B_simple (identical on every rank), or None before an estimate."""
        return self.estimate.b_simple(step)


def decide_and_broadcast(
    controller: AdaptiveBatchSize, step: int, b_simple: float | None, src: int = 0
) -> Decision:
    """Rank `src` decides; every other rank adopts its `Decision`. Returns the decision."""
    if dist.get_rank() == src:
        decision = controller.decide(step, b_simple)
        payload: list[Decision | None] = [decision]
    else:
        payload = [None]
    dist.broadcast_object_list(payload, src=src)
    decision = payload[0]  # filled in by the broadcast on every rank
    if dist.get_rank() != src:
        controller.adopt(decision)
    return decision
