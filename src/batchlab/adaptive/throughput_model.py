"""Online model of how long a training step takes at a given micro-batch and accumulation.

One micro-batch of `b` examples takes `alpha + beta * b` seconds: `alpha` is the fixed cost
of a forward/backward pass (kernel launches, Python, a device that is not yet full) and
`beta` the cost of each example. An optimizer step adds `gamma`, once per step:

    step_seconds(b, k) = k * (alpha + beta * b) + gamma

This is the throughput half of Pollux's goodput (Qiao et al., OSDI'21, section 3.2),
without its network term (that one matters across machines, not on one).

The fit keeps the median of the last `window` timings of each micro-batch size, so one slow
step on a shared machine does not move it, and solves a least-squares line through those
medians, weighting each size by how often it was seen. Two distinct micro-batch sizes make
it `ready`; before that it cannot tell `alpha` from `beta` and says so.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from batchlab.errors import ConfigError
from batchlab.results import JsonResult


@dataclass(frozen=True)
class ThroughputFit(JsonResult):
    """The fitted step-time model: `k * (alpha + beta * b) + gamma` seconds."""

    alpha: float  # seconds per micro-batch, fixed part
    beta: float  # seconds per example
    gamma: float  # seconds per optimizer step (the step itself, zero_grad...)
    micro_batch_sizes: tuple[int, ...]  # the distinct sizes the fit rests on

    def step_seconds(self, micro_batch_size: int, accumulation_steps: int = 1) -> float:
        return accumulation_steps * (self.alpha + self.beta * micro_batch_size) + self.gamma

    def samples_per_second(
        self, micro_batch_size: int, accumulation_steps: int = 1, world_size: int = 1
    ) -> float:
        """Examples per second over all replicas (each replica runs its own micro-batches)."""
        batch = micro_batch_size * accumulation_steps * world_size
        return batch / self.step_seconds(micro_batch_size, accumulation_steps)


class ThroughputModel:
    """Collects measured micro-batch and optimizer-step times and fits `ThroughputFit`.

    Args:
        window: timings kept per micro-batch size (the median of these is used). Default 20.
    """

    def __init__(self, window: int = 20) -> None:
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"throughput window: expected a positive integer, got {window!r}")
        self.window = window
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
        """True once two distinct micro-batch sizes were timed (the line is identifiable)."""
        return len(self._micro) >= 2

    def fit(self, allow_single: bool = False) -> ThroughputFit:
        """Weighted least squares of the per-size medians; `alpha, beta >= 0`.

        With `allow_single` and one size timed, the fit is exact at that size only
        (`alpha` = its median time, `beta` = 0): enough when the micro-batch never changes.
        """
        if allow_single and len(self._micro) == 1:
            (size,) = self._micro
            gamma = statistics.median(self._optimizer) if self._optimizer else 0.0
            median = statistics.median(self._micro[size])
            return ThroughputFit(alpha=median, beta=0.0, gamma=gamma, micro_batch_sizes=(size,))
        if not self.ready:
            raise ConfigError(
                "throughput model: expected timings at two or more micro-batch sizes, got "
                f"{list(self.micro_batch_sizes)}; time another size before fitting"
            )
        sizes = self.micro_batch_sizes
        medians = [statistics.median(self._micro[b]) for b in sizes]
        weights = [min(self._counts[b], self.window) for b in sizes]
        alpha, beta = _weighted_line(sizes, medians, weights)
        if beta <= 0:  # noise made bigger batches look free; per-example cost is never <= 0
            beta = max(m / b for b, m in zip(sizes, medians, strict=True)) * 1e-3
            alpha = max(0.0, statistics.median(medians) - beta * statistics.median(sizes))
        if alpha < 0:  # through the origin instead: time proportional to the batch
            alpha = 0.0
            beta = sum(w * m * b for b, m, w in zip(sizes, medians, weights, strict=True)) / sum(
                w * b * b for b, w in zip(sizes, weights, strict=True)
            )
        gamma = statistics.median(self._optimizer) if self._optimizer else 0.0
        return ThroughputFit(alpha=alpha, beta=beta, gamma=gamma, micro_batch_sizes=sizes)


def _weighted_line(xs: tuple[int, ...], ys: list[float], ws: list[int]) -> tuple[float, float]:
    """Intercept and slope of the weighted least-squares line through (xs, ys)."""
    total = sum(ws)
    mx = sum(w * x for x, w in zip(xs, ws, strict=True)) / total
    my = sum(w * y for y, w in zip(ys, ws, strict=True)) / total
    sxx = sum(w * (x - mx) ** 2 for x, w in zip(xs, ws, strict=True))
    sxy = sum(w * (x - mx) * (y - my) for x, y, w in zip(xs, ys, ws, strict=True))
    slope = sxy / sxx
    return my - slope * mx, slope


class FixedThroughput(ThroughputModel):
    """A throughput model that ignores measurements and always answers `fit`.

    For reproducible runs (decisions then depend on the seed only, not on the clock) and
    for planning for another device from its measured `ThroughputFit`.
    """

    def __init__(self, fit: ThroughputFit) -> None:
        super().__init__()
        self._fixed = fit

    def observe_micro(self, micro_batch_size: int, seconds: float) -> None:
        return None

    def observe_optimizer(self, seconds: float) -> None:
        return None

    @property
    def ready(self) -> bool:
        return True

    def fit(self, allow_single: bool = False) -> ThroughputFit:
        return self._fixed
