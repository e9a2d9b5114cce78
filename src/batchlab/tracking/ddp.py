"""The one DDP path: each replica's local gradient norm, taken in a communication hook.

Under `DistributedDataParallel` every replica's local gradient (before the all-reduce) is a
small batch of the two-batch estimator and the averaged gradient the big one (McCandlish
et al. 2018, App. A.1). `LocalNormHook` replaces DDP's default all-reduce hook with the same
all-reduce plus one squared norm per bucket; the gradients themselves are untouched.
`GradientNoiseScaleTracker.attach_ddp` installs it; `batchlab.integrations.ddp` wraps that
tracker for training code and the adaptive controller.

DDP takes one comm hook per model and has no way to remove it, so the hook is registered
once per model and stays; a tracker *claims* it (`attach_ddp`) and *releases* it
(`detach_ddp`). A released hook is DDP's plain all-reduce (no norm taken); a later tracker
claims the same hook again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchlab.errors import ConfigError
from batchlab.tracking.pending import PendingStep

_HOOK_ATTR = "_batchlab_local_norm_hook"  # where a model keeps its registered hook


class LocalNormHook:
    """Sums |g_local|^2 over the buckets of one synchronizing backward on this replica."""

    def __init__(self) -> None:
        self._local_sq: torch.Tensor | None = None
        self.owner: object | None = None  # the tracker that reads the norms (None: plain)
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self._allreduce = default_hooks.allreduce_hook

    @classmethod
    def claim(cls, ddp_model: nn.Module, owner: object, process_group: Any = None) -> LocalNormHook:
        """The model's hook (registered on first use), now measuring for `owner`.

        Claiming again for the same owner is a no-op; a hook another owner holds is an error
        (two trackers would each reset the other's sums).
        """
        hook = getattr(ddp_model, _HOOK_ATTR, None)
        if hook is None:
            hook = cls()
            # DDP allows one comm hook per model: a model with another hook fails here.
            ddp_model.register_comm_hook(state=process_group, hook=hook._hook)
            setattr(ddp_model, _HOOK_ATTR, hook)
        if hook.owner is not None and hook.owner is not owner:
            raise ConfigError(
                "attach_ddp: expected a model no other tracker is attached to, got one that "
                f"{type(hook.owner).__name__} is attached to; call detach_ddp() on that one first"
            )
        hook.owner = owner
        return hook

    def release(self, owner: object) -> None:
        """Stop measuring for `owner` (the hook stays as DDP's plain all-reduce)."""
        if self.owner is owner:
            self.owner = None
            self._local_sq = None

    # No annotations: DDP checks a hook's annotations at registration, and this module's
    # `from __future__ import annotations` would turn them into strings that fail the check.
    def _hook(self, process_group, bucket):
        if self.owner is not None:  # before the all-reduce: this replica's gradient
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


class ReplicaNorms:
    """One tracker's DDP attachment: the model, its claimed hook, and each step's sample."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.hook: LocalNormHook | None = None

    def attach(self, ddp_model: nn.Module, owner: object, process_group: Any = None) -> bool:
        """Claim `ddp_model`'s hook for `owner`; False if already attached to it (a no-op)."""
        if self.model is ddp_model:
            return False
        if self.model is not None:
            raise ConfigError(
                "attach_ddp: expected one model per tracker, got a second one; call "
                "detach_ddp() first or use one tracker per model"
            )
        self.hook = LocalNormHook.claim(ddp_model, owner, process_group)
        self.model = ddp_model
        return True

    def detach(self, owner: object) -> None:
        if self.hook is not None:
            self.hook.release(owner)
        self.hook = self.model = None

    @property
    def synced(self) -> bool:
        return self.hook is not None and self.hook.fired

    def pending_step(
        self,
        ddp_model: nn.Module,
        params: list[nn.Parameter],
        step: int,
        local_batch_size: int,
        loss_scale: float,
    ) -> PendingStep:
        """This step's sample: the replicas' mean |g_r|^2 (small) against `.grad` (big)."""
        import torch.distributed as dist

        if self.hook is None or ddp_model is not self.model:
            got = "no attached model" if self.model is None else "another model"
            raise ConfigError(
                f"ddp_end_step: expected the model given to attach_ddp, got {got}; call "
                "attach_ddp(model) before training"
            )
        mean_local_sq = self.hook.mean_local_sq()
        big = torch._foreach_norm([p.grad for p in params if p.grad is not None])
        # The replicas' mean of |g_r|^2 stands for all of them (stored as a norm, like the
        # per-parameter norms elsewhere).
        return PendingStep(
            step,
            [[mean_local_sq.sqrt().reshape(())]],
            [1.0],
            [local_batch_size],
            list(big),
            local_batch_size * dist.get_world_size(),
            loss_scale,
        )
