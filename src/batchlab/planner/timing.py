"""The plan's step times: the one step-time model through the measured points, and how
uncertain each point's timing is (`core.step_time` holds the model; this reads the plan's
measurements into it). Pure: nothing here measures.

The points are the throughput ladder's, with the head-to-head timing of the leading
candidates (`planner.head_to_head`) in their place over the range it covers: the ladder
gives each of 10-12 sizes 5 short windows before the plan knows which sizes decide
(benchmarks/results/plan_stability.md).
"""

from __future__ import annotations

import dataclasses
import math

from batchlab.core.batching import split
from batchlab.core.step_time import (
    StepTimeModel,
    fit_step_time,
    median_step_interval,
    with_head_to_head,
)
from batchlab.measure.throughput import CONTENTION_WINDOW_RATIO, ThroughputPoint
from batchlab.planner.plan_types import Measurements


def timed_points(m: Measurements) -> tuple[ThroughputPoint, ...]:
    """The plan's timed points, by batch size: the ladder's, with the head-to-head timing of
    the leading candidates in their place over the range of sizes it covers, and the
    ladder's points outside that range scaled to meet it (`core.step_time.with_head_to_head`,
    which the adaptive controller's start from a plan shares)."""
    ladder = sorted(m.throughput, key=lambda p: p.batch_size)
    h2h = _head_to_head_points(m)
    if not h2h:
        return tuple(ladder)
    merged = dict(
        with_head_to_head([(p.batch_size, p.step_s) for p in ladder],
                          [(p.batch_size, p.step_s) for p in h2h])
    )  # fmt: skip
    h2h_sizes = {p.batch_size for p in h2h}
    outside = [
        _scaled(p, merged[p.batch_size] / p.step_s)
        for p in ladder
        if p.batch_size in merged and p.batch_size not in h2h_sizes
    ]
    return tuple(sorted([*h2h, *outside], key=lambda p: p.batch_size))


def _head_to_head_points(m: Measurements) -> tuple[ThroughputPoint, ...]:
    """The head-to-head's points when it timed two sizes or more (fewer decide nothing)."""
    points = m.head_to_head.points if m.head_to_head else ()
    return tuple(points) if len(points) >= 2 else ()


def _scaled(p: ThroughputPoint, level: float) -> ThroughputPoint:
    """The point with every time multiplied by `level` (rates divided)."""
    return dataclasses.replace(
        p,
        step_s=p.step_s * level,
        samples_per_s=p.samples_per_s / level,
        samples_per_s_low=p.samples_per_s_low / level,
        samples_per_s_high=p.samples_per_s_high / level,
    )


def head_to_head_sizes(m: Measurements) -> frozenset[int]:
    """The batch sizes whose times come from the head-to-head (empty without one)."""
    return frozenset(p.batch_size for p in _head_to_head_points(m))


def step_time_model(m: Measurements) -> StepTimeModel:
    """The shared step-time model through the plan's timed points (`timed_points`; one
    micro-batch a step, so the per-step cost is folded into the micro-batch time),
    extrapolated conservatively."""
    return fit_step_time([(p.batch_size, 1, p.step_s) for p in timed_points(m)])


def step_seconds(m: Measurements, batch_size: int) -> tuple[int, int, float]:
    """`(micro, accumulation, seconds per optimizer step)` at B within the memory max."""
    micro, accum = split(batch_size, m.max_batch_size)
    return micro, accum, step_time_model(m).step_seconds(micro, accum)


def step_interval(m: Measurements, batch_size: int, step_s: float) -> tuple[float, float]:
    """The step time's range, from the timing of the nearest timed point, as a
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
    """The timed point nearest `batch_size` (in log B) with a timing range, or None."""
    points = [p for p in timed_points(m) if p.samples_per_s_low > 0 and p.samples_per_s_high > 0]
    if not points:
        return None
    return min(points, key=lambda p: abs(math.log(p.batch_size / batch_size)))


def _contended(p: ThroughputPoint) -> bool:
    """Whether the point's windows were over `CONTENTION_WINDOW_RATIO` apart (stalls, not
    noise a median averages out)."""
    return p.samples_per_s_high > CONTENTION_WINDOW_RATIO * p.samples_per_s_low


def contended_near(m: Measurements, batch_size: int) -> bool:
    """Whether the timed point nearest `batch_size` was contended (`_contended`)."""
    p = timed_point_near(m, batch_size)
    return p is not None and _contended(p)
