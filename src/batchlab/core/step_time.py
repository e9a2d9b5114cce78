"""The ONE step-time model: seconds per optimizer step at (micro-batch, accumulation, world).

    step_seconds(b, k) = k * micro_seconds(b) + gamma

`micro_seconds(b)` is the time of one forward/backward of `b` examples on one replica and
`gamma` the once-per-step cost (the optimizer step, zero_grad, ...), as in Pollux's
throughput model (Qiao et al., OSDI'21, section 3.2) without its network term. Replicas run
their micro-batches in parallel, so the world size changes the examples per step, not
the time.

`micro_seconds` is built from measured points without assuming a shape:
- made non-decreasing in b by isotonic regression in log-log space: a bigger batch does at
  least the work of a smaller one, so a measured dip is timing noise (15-40% on shared
  machines), and pooling keeps one noisy point from deciding;
- interpolated linearly in log-log between the measured sizes (close to a power law there);
- extrapolated by a named policy. `conservative` (the planner: it commits to a batch it
  may never have timed): above the largest point throughput stays at its last value,
  below the smallest a micro-batch is no faster. `line` (the adaptive controller: it
  moves at most `max_growth` per decision and times each new size): the affine line
  alpha + beta * b fitted through the points continues past them, so bigger micro-batches
  look as much faster as the fixed cost alpha predicts.

`gamma` is identified only by points at one micro-batch size with different accumulation
(the slope in k is micro_seconds(b), the intercept gamma), or measured directly by the
caller; otherwise it is 0 and folded into micro_seconds.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.errors import ConfigError
from batchlab.results import JsonResult

EXTRAPOLATIONS = ("conservative", "line")


@dataclass(frozen=True)
class StepTimeModel(JsonResult):
    """Seconds per optimizer step: `k * micro_seconds(b) + gamma` (see the module doc).

    With no measured points (`micro_batch_sizes` empty), `micro_seconds(b)` is the line
    `alpha + beta * b` everywhere: a model written down by hand, e.g. for another device.
    """

    micro_batch_sizes: tuple[int, ...] = ()  # measured sizes, increasing
    micro_seconds_fitted: tuple[float, ...] = ()  # non-decreasing seconds at those sizes
    gamma: float = 0.0  # seconds per optimizer step
    alpha: float = 0.0  # the line through the points: fixed seconds per micro-batch
    beta: float = 0.0  # ... and seconds per example
    extrapolation: str = "conservative"

    def __post_init__(self) -> None:
        if self.extrapolation not in EXTRAPOLATIONS:
            raise ConfigError(
                f"extrapolation: expected one of {', '.join(EXTRAPOLATIONS)}, "
                f"got {self.extrapolation!r}"
            )
        if len(self.micro_batch_sizes) != len(self.micro_seconds_fitted):
            raise ConfigError(
                f"step-time model: expected one time per size, got {len(self.micro_batch_sizes)}"
                f" sizes and {len(self.micro_seconds_fitted)} times"
            )

    def micro_seconds(self, micro_batch_size: float) -> float:
        """Seconds of one micro-batch of `micro_batch_size` examples on one replica."""
        xs, ts = self.micro_batch_sizes, self.micro_seconds_fitted
        if not xs:
            return self.alpha + self.beta * micro_batch_size
        if self.extrapolation == "line" and micro_batch_size > xs[-1]:
            return ts[-1] + self.beta * (micro_batch_size - xs[-1])
        if self.extrapolation == "line" and micro_batch_size < xs[0]:
            return max(self.alpha, ts[0] - self.beta * (xs[0] - micro_batch_size))
        return interpolate_step_seconds(xs, ts, micro_batch_size)

    def step_seconds(
        self, micro_batch_size: float, accumulation_steps: int = 1, world_size: int = 1
    ) -> float:
        """Seconds per optimizer step; `world_size` replicas run in parallel."""
        return accumulation_steps * self.micro_seconds(micro_batch_size) + self.gamma

    def samples_per_second(
        self, micro_batch_size: int, accumulation_steps: int = 1, world_size: int = 1
    ) -> float:
        """Examples per second over all replicas (each replica runs its own micro-batches)."""
        batch = micro_batch_size * accumulation_steps * world_size
        return batch / self.step_seconds(micro_batch_size, accumulation_steps, world_size)


def median_step_interval(
    step_s: float, samples_per_s: float, low: float, high: float, windows: int
) -> tuple[float, float]:
    """The fast and slow ends of a median step time's uncertainty, from its windows.

    `step_s` is the median over `windows` timed windows whose samples/s ranged from `low`
    to `high` around the median `samples_per_s`. The range of single windows is not the
    uncertainty of their median: the median of n windows varies about 1/sqrt(n) as much
    as one window does (its standard error is 1.25 sigma/sqrt(n); the range of 3-5
    windows spans about 2 sigma). So each end is the window range's, shrunk by sqrt(n) in
    log space (positive however wide the range): about one standard error of the median.
    Measured on the loaded 2-core VM: over five plans of mnist1d-cnn, each size's median
    relative to B=2's moved by 5-35% (max/min), where one plan's windows ranged 13-58%
    (benchmarks/results/plan_stability.md).
    """
    if not (low > 0 and high > 0 and samples_per_s > 0) or windows < 1:
        return step_s, step_s
    shrink = 1 / math.sqrt(windows)
    fast = step_s * (min(samples_per_s / high, 1.0)) ** shrink
    slow = step_s * (max(samples_per_s / low, 1.0)) ** shrink
    return fast, slow


def fit_step_time(
    points: Sequence[tuple[int, int, float]],
    *,
    weights: Sequence[float] | None = None,
    gamma: float | None = None,
    extrapolation: str = "conservative",
) -> StepTimeModel:
    """Fit the model to measured `(micro_batch_size, accumulation_steps, step_seconds)`.

    `weights` (one per point, default 1) say how much each point is trusted (how many
    timings it is the median of). `gamma`: the per-step cost when measured directly;
    None identifies it from the points (see the module doc) or sets it to 0.
    """
    ws = [1.0] * len(points) if weights is None else [float(w) for w in weights]
    if not points or len(ws) != len(points):
        raise ConfigError(
            f"step-time fit: expected one or more (micro, accumulation, seconds) points and "
            f"one weight each, got {len(points)} points and {len(ws)} weights"
        )
    for micro, accumulation, seconds in points:
        if micro < 1 or accumulation < 1 or not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(
                "step-time fit: expected micro >= 1, accumulation >= 1 and seconds > 0, got "
                f"({micro}, {accumulation}, {seconds})"
            )
    if gamma is None:
        gamma = identify_gamma(points)
    by_size: dict[int, list[float]] = defaultdict(list)
    size_weight: dict[int, float] = defaultdict(float)
    for (micro, accumulation, seconds), w in zip(points, ws, strict=True):
        # A tiny floor keeps the log finite when gamma takes nearly all of a step.
        by_size[micro].append(max((seconds - gamma) / accumulation, 1e-12))
        size_weight[micro] += w
    sizes = tuple(sorted(by_size))
    medians = [statistics.median(by_size[b]) for b in sizes]
    size_ws = [size_weight[b] for b in sizes]
    fitted = isotonic_log_log(sizes, medians, size_ws)
    alpha, beta = line_through(sizes, fitted, size_ws)
    return StepTimeModel(sizes, tuple(fitted), gamma, alpha, beta, extrapolation)


def with_head_to_head(
    ladder: Sequence[tuple[int, float]], head_to_head: Sequence[tuple[int, float]]
) -> list[tuple[int, float]]:
    """`(batch, seconds)` of a ladder with a head-to-head timing in its place over the range
    of sizes the head-to-head covers (fewer than 2 head-to-head sizes: the ladder as is).

    The head-to-head times the few sizes that decide with more windows, after the ladder
    (`planner.head_to_head`), so over its range only its points count. Below and above,
    the ladder keeps its shape, scaled to meet the head-to-head's end point (the level
    moves between timings on a shared machine, and a ladder timed with another thread
    count differs in shape, most at the far ends) and clipped so no scaled point crosses
    that end point: ladder noise cannot then move the head-to-head's own times through
    the monotone fit. Ladder sizes inside the range are dropped, read between the
    head-to-head's points.
    """
    h2h = sorted(head_to_head)
    if len(h2h) < 2 or not ladder:
        return sorted(ladder)
    model = fit_step_time([(b, 1, t) for b, t in ladder])
    (lo_b, lo_t), (hi_b, hi_t) = h2h[0], h2h[-1]
    below = lo_t / model.step_seconds(lo_b)
    above = hi_t / model.step_seconds(hi_b)
    return (
        [(b, min(t * below, lo_t)) for b, t in sorted(ladder) if b < lo_b]
        + h2h
        + [(b, max(t * above, hi_t)) for b, t in sorted(ladder) if b > hi_b]
    )


def identify_gamma(points: Sequence[tuple[int, int, float]]) -> float:
    """The per-step cost from sizes timed at two or more accumulation counts, else 0.

    At one micro-batch size, step_seconds = k * micro_seconds + gamma is a line in k:
    its intercept is gamma. The median over sizes resists one noisy size; >= 0.
    """
    by_size: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for micro, accumulation, seconds in points:
        by_size[micro].append((accumulation, seconds))
    intercepts = []
    for pairs in by_size.values():
        if len({k for k, _ in pairs}) < 2:
            continue
        ks = [float(k) for k, _ in pairs]
        intercept, _slope = _least_squares(ks, [s for _, s in pairs], [1.0] * len(ks))
        intercepts.append(intercept)
    return max(0.0, statistics.median(intercepts)) if intercepts else 0.0


def isotonic_log_log(
    sizes: Sequence[float], seconds: Sequence[float], weights: Sequence[float] | None = None
) -> list[float]:
    """`seconds` made non-decreasing in `sizes` by weighted isotonic regression of log time.

    Pool-adjacent-violators: a violating run is replaced by its weighted mean of log time
    (a geometric mean). Returned in input order.
    """
    ws = [1.0] * len(sizes) if weights is None else list(weights)
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    blocks: list[list[float]] = []  # [weighted sum of log t, weight, count]
    for i in order:
        blocks.append([ws[i] * math.log(seconds[i]), ws[i], 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, weight, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += weight
            blocks[-1][2] += count
    fitted = [0.0] * len(sizes)
    position = 0
    for total, weight, count in blocks:
        for i in order[position : position + int(count)]:
            fitted[i] = math.exp(total / weight)
        position += int(count)
    return fitted


def interpolate_step_seconds(
    sizes: Sequence[float], seconds: Sequence[float], size: float
) -> float:
    """Seconds at `size`, interpolated linearly in log-log space, extrapolated conservatively.

    Step time is close to a power law in B between measured points, so log-log is the
    natural scale. Above the largest point throughput stays at its last measured value
    (t grows in proportion to B); below the smallest point a step takes no less time than
    the smallest measured.
    """
    if len(sizes) != len(seconds) or not sizes:
        raise ConfigError(
            f"step times: expected matching, non-empty sizes and seconds, got {len(sizes)} "
            f"sizes and {len(seconds)} times"
        )
    pairs = sorted(zip(sizes, seconds, strict=True))
    if size >= pairs[-1][0]:
        return pairs[-1][1] * size / pairs[-1][0]
    if size <= pairs[0][0]:
        return pairs[0][1]
    for (x0, t0), (x1, t1) in zip(pairs, pairs[1:], strict=False):
        if size <= x1:
            share = math.log(size / x0) / math.log(x1 / x0)
            return math.exp(math.log(t0) + share * math.log(t1 / t0))
    raise AssertionError("unreachable: size is inside the measured range")


def line_through(
    sizes: Sequence[float], seconds: Sequence[float], weights: Sequence[float]
) -> tuple[float, float]:
    """`(alpha, beta)` of the weighted least-squares line, both costs kept physical.

    One size cannot separate alpha from beta: all of it is alpha. A slope <= 0 (noise
    made bigger batches look free) becomes a small positive per-example cost; a negative
    intercept becomes a line through the origin (time proportional to the batch).
    """
    if len(sizes) < 2:
        return float(seconds[0]), 0.0
    alpha, beta = _least_squares(list(sizes), list(seconds), list(weights))
    if beta <= 0:
        beta = max(t / b for b, t in zip(sizes, seconds, strict=True)) * 1e-3
        alpha = max(0.0, statistics.median(seconds) - beta * statistics.median(sizes))
    if alpha < 0:
        alpha = 0.0
        beta = sum(w * t * b for b, t, w in zip(sizes, seconds, weights, strict=True)) / sum(
            w * b * b for b, w in zip(sizes, weights, strict=True)
        )
    return alpha, beta


def _least_squares(
    xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]
) -> tuple[float, float]:
    """Intercept and slope of the weighted least-squares line through (xs, ys)."""
    total = sum(ws)
    mx = sum(w * x for x, w in zip(xs, ws, strict=True)) / total
    my = sum(w * y for y, w in zip(ys, ws, strict=True)) / total
    sxx = sum(w * (x - mx) ** 2 for x, w in zip(xs, ws, strict=True))
    sxy = sum(w * (x - mx) * (y - my) for x, y, w in zip(xs, ys, ws, strict=True))
    slope = sxy / sxx
    return my - slope * mx, slope
