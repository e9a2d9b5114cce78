"""Where the adaptive engine gets its smoothed B_simple from.

The controller only needs one number at each decision: the current smoothed simple noise
scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, eq. 2.8). A `NoiseSource` gives
it. Three kinds exist:

- `FixedNoise`: a value (or a function of the step) the caller already knows, e.g. from
  `batchlab noise`. Nothing is measured.
- `TrackerEstimate`: `batchlab.GradientNoiseScaleTracker` fed by the engine's accumulation
  micro-batches, nearly free (the noise-scale issue); used while accumulation >= 2.
- the standalone estimator `batchlab.gradient_noise_scale`, which draws its own batches at
  the current weights and leaves no trace; the fallback while a step is one micro-batch
  on one replica, where no small-batch gradients exist to reuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from batchlab.errors import NoiseEstimateError
from batchlab.tracking import GradientNoiseScaleTracker


@runtime_checkable
class NoiseSource(Protocol):
    """Anything that can say what the smoothed B_simple is now (None: no estimate yet)."""

    def b_simple(self, step: int) -> float | None: ...


class FixedNoise:
    """A known B_simple: a number, or a function `step -> B_simple` (for schedules, tests)."""

    def __init__(self, value: float | Callable[[int], float]) -> None:
        if not callable(value):
            value = float(value)
            if not (math.isfinite(value) and value > 0):
                raise NoiseEstimateError(
                    f"b_simple: expected a positive finite number, got {value!r}; measure it "
                    "with batchlab.measure_noise(task)"
                )
        self.value = value

    def b_simple(self, step: int) -> float | None:
        return float(self.value(step)) if callable(self.value) else self.value

    def describe(self) -> str:
        """Where `b_simple` comes from, in a few words (for a decision's reason)."""
        return "given as a function of the step" if callable(self.value) else "given"


class TrackerEstimate:
    """A `NoiseSource` over a `batchlab.GradientNoiseScaleTracker`, for loops and
    integrations that feed the tracker themselves (`estimate.tracker.after_backward`,
    `end_step`, or `attach_ddp`/`ddp_end_step`)."""

    def __init__(self, tracker: GradientNoiseScaleTracker) -> None:
        self.tracker = tracker

    def b_simple(self, step: int = 0) -> float | None:
        value = self.tracker.b_simple
        return value if value is not None and value > 0 and math.isfinite(value) else None


def smoothed_noise_estimate(decay: float = 0.95, **settings: Any) -> TrackerEstimate:
    """The smoothed two-batch estimator (bias-corrected EMAs of tr(Sigma) and |G|^2).

    `settings` go to `GradientNoiseScaleTracker` (e.g. `weighting="equal"` for loops that
    scale each micro-batch loss by 1/k).
    """
    return TrackerEstimate(GradientNoiseScaleTracker(beta=decay, **settings))
