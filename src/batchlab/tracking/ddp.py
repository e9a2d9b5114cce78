"""The one DDP path: each replica's local gradient norm, taken in a communication hook.

Under `DistributedDataParallel` every replica's local gradient (before the all-reduce) is a
small batch of the two-batch estimator and the averaged gradient the big one (McCandlish
et al. 2018, App. A.1). `LocalNormHook` replaces DDP's default all-reduce hook with the same
all-reduce plus one squared norm per bucket; the gradients themselves are untouched.
`GradientNoiseScaleTracker.attach_ddp` installs it; `batchlab.integrations.ddp` wraps that
tracker for the adaptive controller.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchlab.errors import ConfigError


class LocalNormHook:
    """Sums |g_local|^2 over the buckets of one synchronizing backward on this replica."""

    def __init__(self) -> None:
        self._local_sq: torch.Tensor | None = None
        self._allreduce: Any = None

    def attach(self, ddp_model: nn.Module, process_group: Any = None) -> None:
        """Register on `ddp_model` (its comm-hook slot must be free; DDP allows one hook)."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self._allreduce = default_hooks.allreduce_hook
        ddp_model.register_comm_hook(state=process_group, hook=self._hook)

    # No annotations: DDP checks a hook's annotations at registration, and this module's
    # `from __future__ import annotations` would turn them into strings that fail the check.
    def _hook(self, process_group, bucket):
        # Before the all-reduce the bucket holds this replica's gradient.
        sq = bucket.buffer().detach().float().square().sum()
        self._local_sq = sq if self._local_sq is None else self._local_sq + sq
        return self._allreduce(process_group, bucket)

    @property
    def fired(self) -> bool:
        """Whether a gradient went through the hook since the last `mean_local_sq`."""
        return self._local_sq is not None

    def mean_local_sq(self) -> torch.Tensor:
        """mean over replicas of |g_r|^2 (one scalar all-reduce); resets for the next step."""
        import torch.distributed as dist

        if self._local_sq is None:
            raise ConfigError(
                "ddp_end_step: no gradient went through the comm hook; call attach_ddp(model) "
                "before training and ddp_end_step after a backward that synchronizes"
            )
        local = self._local_sq.reshape(1).clone()
        self._local_sq = None
        dist.all_reduce(local)  # sum over replicas
        return local.double() / dist.get_world_size()
