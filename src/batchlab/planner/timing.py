"""The plan's step times: the one step-time model through the measured ladder, and how
uncertain each point's timing is (`core.step_time` holds the model; this reads the plan's
measurements into it). Pure: nothing here measures.
"""

from __future__ import annotations

import math

from batchlab.core.batching import split
from batchlab.core.step_time import StepTimeModel, fit_step_time, median_step_interval
from batchlab.measure.throughput import CONTENTION_WINDOW_RATIO, ThroughputPoint
from batchlab.planner.plan_types import Measurements


def step_time_model(m: Measurements) -> StepTimeModel:
    """The shared step-time model through the measured ladder (one micro-batch a step, so
    the per-step cost is folded into the micro-batch time), extrapolated conservatively."""
    return fit_step_time([(p.batch_size, 1, p.step_s) for p in m.throughput])


def step_seconds(m: Measurements, batch_size: int) -> tuple[int, int, float]:
    """`(micro, accumulation, seconds per optimizer step)` at B within the memory max."""
    micro, accum = split(batch_size, m.max_batch_size)
    return micro, accum, step_time_model(m).step_seconds(micro, accum)


def step_interval(m: Measurements, batch_size: int, step_s: float) -> tuple[float, float]:
    """The step time's range, from the timing of the nearest measured ladder point, as a
    ratio applied to `step_s`: the uncertainty of its median
    (`core.step_time.median_step_interval`), or, where its windows ranged over more than
    `CONTENTION_WINDOW_RATIO` (contended: a few windows stalled, not noise a median
    averages out), the whole range of its windows.

    Not the window range everywhere: the fastest and slowest of 3-5 windows are the most
    volatile numbers of a ladder, and a gain interval or tie read from them flips between
    identical plans (benchmarks/results/plan_stability.md)."""
    p = timed_point_near(m, batch_size)
    if p is None:
        return step_s, step_s
    fast, slow = median_step_interval(
        p.step_s, p.samples_per_s, p.samples_per_s_low, p.samples_per_s_high,
        1 if _contended(p) else p.windows,
    )  # fmt: skip
    return step_s * fast / p.step_s, step_s * slow / p.step_s


def timed_point_near(m: Measurements, batch_size: int) -> ThroughputPoint | None:
    """The ladder point nearest `batch_size` (in log B) with a timing range, or None."""
    points = [p for p in m.throughput if p.samples_per_s_low > 0 and p.samples_per_s_high > 0]
    if not points:
        return None
    return min(points, key=lambda p: abs(math.log(p.batch_size / batch_size)))


def _contended(p: ThroughputPoint) -> bool:
    """Whether the point's windows were over `CONTENTION_WINDOW_RATIO` apart (stalls, not
    noise a median averages out)."""
    return p.samples_per_s_high > CONTENTION_WINDOW_RATIO * p.samples_per_s_low


def contended_near(m: Measurements, batch_size: int) -> bool:
    """Whether the ladder point nearest `batch_size` was contended (`_contended`)."""
    p = timed_point_near(m, batch_size)
    return p is not None and _contended(p)
