"""Online collector of step timings for the adaptive controller.

The training loop reports how long each micro-batch's forward/backward and each optimizer
step took; `fit()` turns the per-size medians into the ONE step-time model of
`batchlab.core.step_time` (the planner's too), with the `line` extrapolation: the
controller grows the batch at most `max_growth` per decision and times every new size, so
it may trust the fixed-cost line a little beyond what it has seen.

Keeping the median of the last `window` timings of each micro-batch size means one slow
step on a shared machine does not move the fit; each size is weighted by how often it was
seen. Two distinct micro-batch sizes make it `ready`: before that it cannot tell the fixed
cost of a micro-batch from the cost of each example, and says so.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from batchlab.core.step_time import StepTimeModel, fit_step_time
from batchlab.errors import ConfigError


class ThroughputModel:
    """Collects measured micro-batch and optimizer-step times and fits the step-time model (`batchlab.core.step_time`).

    Args:
        window: timings kept per micro-batch size (the median of these is used). Default 20.
        prior: a step-time model to answer with until this run has timed two micro-batch
            sizes (e.g. the plan's, through its measured throughput ladder); then the run's
            own timings take over.
    """

    def __init__(self, window: int = 20, prior: StepTimeModel | None = None) -> None:
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"throughput window: expected a positive integer, got {window!r}")
        self.window = window
        self.prior = prior
        self._micro: dict[int, deque[float]] = {}
        self._counts: dict[int, int] = {}
        self._optimizer: deque[float] = deque(maxlen=window)

    def observe_micro(self, micro_batch_size: int, seconds: float) -> None:
        """One micro-batch's forward + backward took `seconds`."""
        if micro_batch_size < 1 or not math.isfinite(seconds) or seconds < 0:
            return  # a clock glitch or an empty batch teaches nothing
        self._micro.setdefault(micro_batch_size, deque(maxlen=self.window)).append(seconds)
        self._counts[micro_batch_size] = self._counts.get(micro_batch_size, 0) + 1

    def observe_optimizer(self, seconds: float) -> None:
        """The optimizer step (after the last backward) took `seconds`."""
        if math.isfinite(seconds) and seconds >= 0:
            self._optimizer.append(seconds)

    def observe_step(self, micro_batch_size: int, micro_seconds: list[float], step_seconds: float):
        """Convenience: the micro-batch times of one step, and the whole step's time."""
        for s in micro_seconds:
            self.observe_micro(micro_batch_size, s)
        self.observe_optimizer(step_seconds - sum(micro_seconds))

    @property
    def micro_batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._micro))

    @property
    def ready(self) -> bool:
        """True once two distinct micro-batch sizes were timed (the line is identifiable),
        or from the start with a `prior`."""
        return len(self._micro) >= 2 or self.prior is not None

    @property
    def source(self) -> str:
        """Where `fit()` comes from now, in a few words (for a decision's reason)."""
        if len(self._micro) < 2 and self.prior is not None:
            return "t(B) from the plan's throughput ladder"
        return "t(B) from this run's step times"

    def fit(self, allow_single: bool = False) -> StepTimeModel:
        """The step-time model through the per-size medians (weights: timings seen); the
        `prior` until two sizes are timed.

        With `allow_single` and one size timed, the model is exact at that size only (its
        time at any micro-batch is that median): enough when the micro-batch never changes.
        """
        if len(self._micro) < 2 and self.prior is not None:
            return self.prior
        if not (self.ready or (allow_single and len(self._micro) == 1)):
            raise ConfigError(
                "throughput model: expected timings at two or more micro-batch sizes, got "
                f"{list(self.micro_batch_sizes)}; time another size before fitting"
            )
        gamma = statistics.median(self._optimizer) if self._optimizer else 0.0
        sizes = self.micro_batch_sizes
        # One optimizer step of one micro-batch of b took median(b) + gamma.
        points = [(b, 1, statistics.median(self._micro[b]) + gamma) for b in sizes]
        weights = [min(self._counts[b], self.window) for b in sizes]
        return fit_step_time(points, weights=weights, gamma=gamma, extrapolation="line")


class FixedThroughput(ThroughputModel):
    """A throughput model that ignores measurements and always answers `fit`.

    For reproducible runs (decisions then depend on the seed only, not on the clock) and
    for planning for another device from its measured `StepTimeModel`.
    """

    def __init__(self, fit: StepTimeModel) -> None:
        super().__init__()
        self._fixed = fit

    def observe_micro(self, micro_batch_size: int, seconds: float) -> None:
        return None

    def observe_optimizer(self, seconds: float) -> None:
        return None

    @property
    def ready(self) -> bool:
        return True

    @property
    def source(self) -> str:
        return "t(B) from the given step-time model"

    def fit(self, allow_single: bool = False) -> StepTimeModel:
        return self._fixed
