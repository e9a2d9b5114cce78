"""One way to read B_simple from anything that tracks it, and one way to stop measuring.

Every monitor (the tracker itself, the Lightning and Hugging Face callbacks, `DDPNoiseScale`)
reads the same: `b_simple`, `b_simple_ci` and `reliable` are properties of the latest
smoothed estimate and `noise_scale()` returns all of it, with the `reason` it cannot be
trusted. A monitor that cannot measure in the setting it was given (one micro-batch per
step, a world size it cannot read) does not stop the user's training: it warns once, logs
the reason to the `batchlab` logger, keeps the reason in `noise_scale().reason` and reports
no estimate; with `strict=True` it raises instead.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from batchlab.core.noise_scale import NoiseScale
from batchlab.errors import NoiseEstimateError

logger = logging.getLogger("batchlab")


class NoiseScaleWarning(UserWarning):
    """A noise monitor cannot measure as configured; training goes on without it."""


def single_micro_reason(steps: int) -> str:
    """Why a tracker fed only steps of one micro-batch has no estimate, and what to change."""
    return (
        f"no step had two micro-batches ({steps} steps of one), and a step of one has "
        "nothing to contrast, so more steps never help: split each step's batch into >= 2 "
        "micro-batches (a backward and `after_backward` for each, each loss scaled by its "
        "share) or accumulate >= 2"
    )


class NoiseReadout:
    """`b_simple`, `b_simple_ci`, `reliable`: properties over `noise_scale()`.

    Subclasses implement `noise_scale()`; monitors that feed a tracker use `TrackerReadout`.
    """

    def noise_scale(self) -> NoiseScale:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def b_simple(self) -> float | None:
        """The smoothed B_simple now (None until |G|^2 averages above 0)."""
        return self.noise_scale().b_simple

    @property
    def b_simple_ci(self) -> tuple[float, float]:
        """Its interval at the tracker's confidence ((0, inf) before two samples)."""
        return self.noise_scale().b_simple_ci

    @property
    def reliable(self) -> bool:
        """Whether the estimate can be trusted (`noise_scale().reason` says why not)."""
        return self.noise_scale().reliable


class TrackerReadout(NoiseReadout):
    """A monitor over a `GradientNoiseScaleTracker` (`self.tracker`), with `strict`."""

    tracker: Any  # a GradientNoiseScaleTracker (not imported here: it reads like this)
    strict: bool = False

    def noise_scale(self) -> NoiseScale:
        """The tracker's smoothed estimate, its interval and why it is not reliable."""
        return self.tracker.noise_scale()

    def cannot_measure(self, reason: str) -> None:
        """Stop measuring for `reason`: raise if `strict`, else warn once and log it."""
        self.tracker.unmeasurable = reason
        if self.strict:
            raise NoiseEstimateError(f"{type(self).__name__}: {reason}")
        if getattr(self, "_warned", False):
            return
        self._warned = True
        message = f"{type(self).__name__} is not measuring: {reason} (strict=True raises)"
        logger.warning(message)
        warnings.warn(message, NoiseScaleWarning, stacklevel=3)
