"""Where the adaptive engine gets its smoothed B_simple from.

The controller only needs one number at each decision: the current smoothed simple noise
scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, eq. 2.8). A `NoiseSource` gives
it. Three kinds exist:

- `FixedNoise`: a value (or a function of the step) the caller already knows, e.g. from
  `batchlab noise`. Nothing is measured.
- `TrackerNoise`: `batchlab.GradientNoiseScaleTracker` fed by the engine's accumulation
  micro-batches, nearly free (the noise-scale issue); used while accumulation >= 2.
- the standalone estimator `batchlab.gradient_noise_scale`, which draws its own batches at
  the current weights and leaves no trace; the fallback while a step is one micro-batch
  on one replica, where no small-batch gradients exist to reuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from batchlab.errors import NoiseEstimateError


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
                    "with `batchlab noise TASK`"
                )
        self.value = value

    def b_simple(self, step: int) -> float | None:
        return float(self.value(step)) if callable(self.value) else self.value


class TwoBatchEMA:
    """Smoothed two-batch estimate of B_simple (McCandlish et al. 2018, Appendix A.1).

    From the mean squared norm of gradients over `small_batch` examples and the squared
    norm of their mean over `big_batch` examples, both at the same weights:

        |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(S)    ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

    Each is unbiased, their ratio is not, so the two are averaged separately (EMA with bias
    correction, as the paper does) and B_simple = EMA(tr S) / EMA(|G|^2).

    Interim: `batchlab.GradientNoiseScaleTracker` (noise-scale issue) owns this estimator;
    this copy only turns the norms that the integrations collect into a number until the
    adaptive code can hand them to the tracker.
    """

    def __init__(self, decay: float = 0.95) -> None:
        if not 0 <= decay < 1:
            raise NoiseEstimateError(f"noise EMA decay: expected 0 <= decay < 1, got {decay!r}")
        self.decay = decay
        self.updates = 0
        self._grad_sq = 0.0
        self._trace = 0.0

    def update(
        self, small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float
    ) -> None:
        """One observation: `small_sq_norm` is the mean |g|^2 of the small-batch gradients."""
        if big_batch <= small_batch or small_batch <= 0:
            return
        if not (math.isfinite(small_sq_norm) and math.isfinite(big_sq_norm)):
            raise NoiseEstimateError(
                f"gradient norm is not finite (|g_small|^2={small_sq_norm}, |G|^2={big_sq_norm})"
                "; the loss diverged: lower the learning rate"
            )
        grad_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (
            big_batch - small_batch
        )
        trace = (small_sq_norm - big_sq_norm) / (1 / small_batch - 1 / big_batch)
        d = self.decay
        self._grad_sq = d * self._grad_sq + (1 - d) * grad_sq
        self._trace = d * self._trace + (1 - d) * trace
        self.updates += 1

    @property
    def grad_sq_norm(self) -> float | None:
        """Bias-corrected EMA of the |G|^2 estimates."""
        return self._grad_sq / (1 - self.decay**self.updates) if self.updates else None

    @property
    def trace_sigma(self) -> float | None:
        """Bias-corrected EMA of the tr(Sigma) estimates."""
        return self._trace / (1 - self.decay**self.updates) if self.updates else None

    def b_simple(self, step: int = 0) -> float | None:
        """tr(Sigma) / |G|^2 from the averages; None until positive and finite."""
        if not self.updates or self._grad_sq <= 0 or self._trace <= 0:
            return None
        return self._trace / self._grad_sq  # the bias corrections cancel


class _TrackerEstimate:
    """`TwoBatchEMA`'s interface over `batchlab.GradientNoiseScaleTracker.update`."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def update(
        self, small_sq_norm: float, small_batch: float, big_sq_norm: float, big_batch: float
    ) -> None:
        self.tracker.update([small_sq_norm], [small_batch], big_sq_norm, big_batch)

    def b_simple(self, step: int = 0) -> float | None:
        value = self.tracker.b_simple
        return value if value is not None and value > 0 and math.isfinite(value) else None


def two_batch_estimate(decay: float = 0.95) -> TwoBatchEMA | _TrackerEstimate:
    """The smoothed two-batch estimator: batchlab's tracker when installed, else the copy."""
    try:
        from batchlab.measure.noise_tracker import GradientNoiseScaleTracker
    except ImportError:
        return TwoBatchEMA(decay)
    return _TrackerEstimate(GradientNoiseScaleTracker(beta=decay))
