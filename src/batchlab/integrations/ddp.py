"""Data-parallel training (torchrun, `DistributedDataParallel`): noise scale and decisions.

Under DDP every replica computes the gradient of its own local batch before the all-reduce
averages them. Those local gradients are the small batches of the two-batch estimator and
the average is the big one (McCandlish et al. 2018, App. A.1), so B_simple comes for free:
`DDPNoiseScale` registers a communication hook that takes the squared norm of each bucket
before and after the all-reduce. The hook adds two reductions of a bucket to a scalar and
one scalar all-reduce per optimizer step; the gradients themselves are untouched.

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

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from batchlab.adaptive.controller import AdaptiveBatchSize, Decision
from batchlab.adaptive.noise_source import smoothed_noise_estimate


class DDPNoiseScale:
    """B_simple from per-replica gradients, through a DDP communication hook.

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
        self._local: list[torch.Tensor] = []
        self._global: list[torch.Tensor] = []
        # The tracker's own attach_ddp would do, but its hook's string annotations fail
        # DDP's runtime check (see docs/adaptive.md); this hook has none.
        self.estimate = smoothed_noise_estimate(decay)
        model.register_comm_hook(None, self._hook)

    def _hook(self, process_group, bucket):  # no annotations: DDP checks them at runtime
        # Before the all-reduce the bucket holds this replica's gradient.
        self._local.append(bucket.buffer().detach().float().pow(2).sum())

        def averaged(fut: torch.futures.Future) -> torch.Tensor:
            tensor = fut.value()
            self._global.append(tensor.detach().float().pow(2).sum())
            return tensor

        return default_hooks.allreduce_hook(process_group, bucket).then(averaged)

    def end_step(self) -> None:
        """Call after the last backward of an optimizer step (before `optimizer.step()`)."""
        local, big = self._local, self._global
        self._local, self._global = [], []
        if not local or not big or self.world_size < 2:
            return
        local_sq = torch.stack(local).sum().reshape(1)
        dist.all_reduce(local_sq)  # sum over replicas of |g_r|^2
        mean_local_sq = float(local_sq) / self.world_size
        big_sq = float(torch.stack(big).sum())
        b = self.local_batch_size
        self.estimate.update(mean_local_sq, b, big_sq, b * self.world_size)

    def b_simple(self, step: int = 0) -> float | None:
        """The smoothed B_simple (identical on every rank), or None before an estimate."""
        return self.estimate.b_simple()


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
