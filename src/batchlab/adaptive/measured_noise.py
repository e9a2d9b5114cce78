"""B_simple measured during training, for the adaptive engine, at almost no cost.

While a step has two or more micro-batches, their gradients are the small batches and the
step's gradient the big one of the two-batch estimator (McCandlish et al. 2018, App. A.1):
the tracker (`batchlab.tracking`) reads them from `.grad` as accumulation goes. While a step would be a
single micro-batch on one replica, there are no small-batch gradients to reuse; instead of
spending extra forward/backward passes on a standalone estimate, the engine runs every
`split_every`-th step as two half micro-batches. That step's update is the same (up to
batch-dependent layers such as BatchNorm), and it yields one small/big pair. It costs one
extra fixed per-micro-batch overhead (alpha in the throughput model) on that step, which the
measured training time includes.
"""

from __future__ import annotations

from batchlab.callbacks import RunState, TrainCallback
from batchlab.tracking import GradientNoiseScaleTracker


class MeasuredNoise(TrainCallback):
    """A `NoiseSource` fed by the engine's accumulation micro-batches.

    Args:
        decay: EMA decay of the two-batch estimates (default 0.95: about 20 steps).
        split_every: while steps are single micro-batches, split every this many (default 4).
        record_every: steps between the tracker's recorded points (default 20).
        preconditioned: also track Adam-preconditioned B_simple (the metric a plan for an
            Adam-like optimizer measured; `TrajectoryNoise` reads it then).
    """

    needs_micro_batches = True

    def __init__(
        self,
        decay: float = 0.95,
        split_every: int = 4,
        record_every: int = 20,
        preconditioned: bool = False,
    ) -> None:
        self.split_every = split_every
        self.tracker = GradientNoiseScaleTracker(
            beta=decay, every=record_every, preconditioned=preconditioned
        )

    def on_start(self, state: RunState) -> None:
        self.tracker.on_start(state)  # installs its micro-batch hook

    def on_step(self, state: RunState) -> None:
        self.tracker.on_step(state)

    def on_end(self, state: RunState) -> None:
        self.tracker.on_end(state)

    def b_simple(self, step: int) -> float | None:
        value = self.tracker.b_simple
        if self.tracker.preconditioned:  # the metric asked for, never the plain one instead
            pre = self.tracker.noise_scale().preconditioned
            value = None if pre is None else pre.b_simple
        return value if value is not None and value > 0 else None

    def describe(self) -> str:
        """Where `b_simple` comes from, in a few words (for a decision's reason)."""
        return f"live tracker EMA, decay {self.tracker.beta:g}"
