"""B_simple measured during training, for the adaptive engine, at almost no cost.

While a step has two or more micro-batches, their gradients are the small batches and the
step's gradient the big one of the two-batch estimator (McCandlish et al. 2018, App. A.1):
`MicroBatchGradNorms` reads them from `.grad` as accumulation goes. While a step would be a
single micro-batch on one replica, there are no small-batch gradients to reuse; instead of
spending extra forward/backward passes on a standalone estimate, the engine runs every
`split_every`-th step as two half micro-batches. That step's update is the same (up to
batch-dependent layers such as BatchNorm), and it yields one small/big pair. It costs one
extra fixed per-micro-batch overhead (alpha in the throughput model) on that step, which the
measured training time includes.
"""

from __future__ import annotations

from batchlab.adaptive.grad_norms import MicroBatchGradNorms
from batchlab.adaptive.noise_source import TwoBatchEMA
from batchlab.train import RunState, TrainCallback


class MeasuredNoise(TrainCallback):
    """A `NoiseSource` fed by the engine's accumulation micro-batches.

    Args:
        decay: EMA decay of the two-batch estimates (default 0.95: about 20 steps).
        split_every: while steps are single micro-batches, split every this many (default 4).
    """

    needs_micro_batches = True

    def __init__(self, decay: float = 0.95, split_every: int = 4) -> None:
        self.estimate = TwoBatchEMA(decay)
        self.split_every = split_every
        self.history: list[tuple[int, float]] = []  # (step, B_simple) at each read

    def on_start(self, state: RunState) -> None:
        norms = MicroBatchGradNorms(state.model.parameters(), self.estimate.update)
        inner = state.step_fn.micro_hook

        def hook(index: int, num_micro: int, size: int) -> None:
            if num_micro >= 2:
                norms.after_backward(size)
                if index == num_micro - 1:
                    norms.end_step()
            if inner is not None:
                inner(index, num_micro, size)

        state.step_fn.micro_hook = hook

    def b_simple(self, step: int) -> float | None:
        value = self.estimate.b_simple()
        if value is not None:
            self.history.append((step, value))
        return value
