"""B_noise along a training run: a power law in the training loss, and the steps it implies.

B_simple grows as the loss falls (McCandlish et al. 2018, fig. 8; on mnist1d-mlp the exact
value is 226, 366, 427 and 645 at steps 100, 200, 500 and 800), so one early value
underestimates the critical batch of the whole run. Kaplan et al. 2020 ("Scaling Laws for
Neural Language Models", sec. 5.1) find B_crit(L) = B_* L^(-1/alpha_B): a straight line

    log B_noise = a + b log L          (b = -1/alpha_B)

fitted here by weighted least squares to measured (loss, B_simple, interval) points.

Steps to a target come from McCandlish et al. 2018 eq. 2.11 applied piecewise along the
loss path: a stretch of the path that needs dS_min steps at B -> infinity takes
dS = (1 + B_noise(L)/B) dS_min steps at batch B, so

    S(B) = integral (1 + B_noise/B) dS_min = S_min (1 + B_bar/B),
    B_bar = integral B_noise dS_min / S_min,

the S_min-weighted mean of B_noise over the path. B_bar is exactly the B_crit a sweep fits to
S(B) = S_min (1 + B_crit/B) when the model holds, and S(B)/S(B0) is `relative_steps` with
B_noise = B_bar. The path is measured at one batch B_m (the noise run), whose steps give
dS_min = dS_m / (1 + B_noise(L)/B_m).

Pure functions; the planner (`batchlab.planner.noise_path`) feeds them measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.core.noise_scale import DEFAULT_CONFIDENCE, t_quantile
from batchlab.errors import ConfigError
from batchlab.results import JsonResult

MIN_POWER_LAW_POINTS = 4  # fewer points, or no spread in loss: a constant fit
MIN_LOG_LOSS_SPREAD = 0.05  # ln(max L / min L) below this cannot pin an exponent
ELLIPSE_DIRECTIONS = 64  # parameter points on the confidence ellipse for functionals


@dataclass(frozen=True)
class NoiseTrajectory(JsonResult):
    """log B_noise = log_scale + exponent * log L, with the fit's covariance.

    kind: `power-law`, or `constant` (exponent fixed at 0) when the points cannot pin a
    slope. `scatter` is the factor (reduced chi^2, >= 1) by which the covariance was widened
    because the points scatter more than their own intervals say; `correlation` the factor
    for points that share an averaging window (the tracker's EMA).
    """

    kind: str
    log_scale: float
    exponent: float
    var_log_scale: float
    covariance: float
    var_exponent: float
    confidence: float
    num_points: int
    loss_range: tuple[float, float]
    scatter: float = 1.0
    correlation: float = 1.0

    @property
    def quantile(self) -> float:
        return t_quantile(self.confidence, max(1, self.num_points - self._num_params()))

    def _num_params(self) -> int:
        return 2 if self.kind == "power-law" else 1

    def b_noise(self, loss: float) -> float:
        """The fitted B_noise at training loss `loss`."""
        return math.exp(self.log_scale + self.exponent * math.log(loss))

    def log_sd(self, loss: float) -> float:
        """Standard error of log B_noise(loss) from the fit's covariance."""
        x = math.log(loss)
        var = self.var_log_scale + 2 * x * self.covariance + x * x * self.var_exponent
        return math.sqrt(max(var, 0.0))

    def interval(self, loss: float) -> tuple[float, float]:
        """The fit's interval for B_noise at `loss` (for the mean line, not a new point)."""
        centre, half = math.log(self.b_noise(loss)), self.quantile * self.log_sd(loss)
        return math.exp(centre - half), math.exp(centre + half)

    def ellipse(self) -> list[tuple[float, float]]:
        """(log_scale, exponent) on the boundary of the fit's confidence region.

        For any function of the parameters that is close to linear, its extremes over this
        boundary are its interval at `confidence` (the projection of a normal ellipse).
        """
        z = self.quantile
        va, vb, c = self.var_log_scale, self.var_exponent, self.covariance
        # Cholesky of [[va, c], [c, vb]].
        la = math.sqrt(max(va, 0.0))
        lc = c / la if la > 0 else 0.0
        lb = math.sqrt(max(vb - lc * lc, 0.0))
        out = []
        for k in range(ELLIPSE_DIRECTIONS):
            u, v = (
                math.cos(2 * math.pi * k / ELLIPSE_DIRECTIONS),
                math.sin(2 * math.pi * k / ELLIPSE_DIRECTIONS),
            )
            out.append((self.log_scale + z * la * u, self.exponent + z * (lc * u + lb * v)))
        return out

    def with_params(self, log_scale: float, exponent: float) -> NoiseTrajectory:
        return NoiseTrajectory(
            self.kind, log_scale, exponent, self.var_log_scale, self.covariance,
            self.var_exponent, self.confidence, self.num_points, self.loss_range,
            self.scatter, self.correlation,
        )  # fmt: skip


def _log_sigmas(
    values: Sequence[float], intervals: Sequence[tuple[float, float]], point_confidence: float
) -> list[float]:
    """Each point's standard error in log space, from the wider side of its interval.

    An unbounded side (|G|^2 not above 0) gets twice the largest finite one: the point
    still counts, with little weight.
    """
    z = t_quantile(point_confidence, 1e6)
    sigmas: list[float | None] = []
    for v, (lo, hi) in zip(values, intervals, strict=True):
        sides = [math.log(hi / v) if math.isfinite(hi) and hi > v else None,
                 math.log(v / lo) if lo > 0 and lo < v else None]  # fmt: skip
        if None in sides or not all(sides):
            sigmas.append(None)
        else:
            sigmas.append(max(sides) / z)
    finite = [s for s in sigmas if s is not None and s > 0]
    fallback = 2 * max(finite) if finite else 1.0
    return [fallback if s is None or s <= 0 else s for s in sigmas]


def fit_noise_trajectory(
    losses: Sequence[float],
    b_simples: Sequence[float],
    intervals: Sequence[tuple[float, float]],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    point_confidence: float = DEFAULT_CONFIDENCE,
    correlation: float = 1.0,
) -> NoiseTrajectory:
    """Weighted least squares of log B_simple on log L (Kaplan et al. 2020, sec. 5.1).

    Weights are 1/sigma^2 with sigma each point's log-space standard error (from its
    interval at `point_confidence`). When the residuals scatter more than those errors say
    (reduced chi^2 > 1), the covariance grows by that factor; `correlation` (>= 1) widens
    it further for points that are not independent (a tracker's EMA spans several points).
    Points with a non-positive or non-finite loss or value are left out. Fewer than
    `MIN_POWER_LAW_POINTS` points, or losses spanning less than `MIN_LOG_LOSS_SPREAD` in
    log, give a `constant` fit: the weighted mean, exponent 0.
    """
    rows = [
        (math.log(loss), math.log(v), ci)
        for loss, v, ci in zip(losses, b_simples, intervals, strict=True)
        if loss is not None and v is not None and math.isfinite(loss) and loss > 0
        and math.isfinite(v) and v > 0
    ]  # fmt: skip
    if not rows:
        raise ConfigError(
            "noise trajectory: expected at least one point with a positive loss and B_simple, "
            "got none; measure the noise over more steps (a larger `noise_budget`)",
            param="noise_budget",
        )
    if correlation < 1:
        raise ConfigError(f"`correlation`: expected >= 1, got {correlation!r}")
    xs, ys = [r[0] for r in rows], [r[1] for r in rows]
    sig = _log_sigmas([math.exp(y) for y in ys], [r[2] for r in rows], point_confidence)
    ws = [1 / (s * s) for s in sig]
    loss_range = (math.exp(min(xs)), math.exp(max(xs)))
    n = len(rows)
    if n < MIN_POWER_LAW_POINTS or max(xs) - min(xs) < MIN_LOG_LOSS_SPREAD:
        sw = sum(ws)
        mean = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
        chi2 = sum(w * (y - mean) ** 2 for w, y in zip(ws, ys, strict=True))
        scatter = max(1.0, chi2 / (n - 1)) if n > 1 else 1.0
        return NoiseTrajectory("constant", mean, 0.0, scatter * correlation / sw, 0.0, 0.0,
                               confidence, n, loss_range, scatter, correlation)  # fmt: skip
    s0 = sum(ws)
    s1 = sum(w * x for w, x in zip(ws, xs, strict=True))
    s2 = sum(w * x * x for w, x in zip(ws, xs, strict=True))
    t0 = sum(w * y for w, y in zip(ws, ys, strict=True))
    t1 = sum(w * x * y for w, x, y in zip(ws, xs, ys, strict=True))
    det = s0 * s2 - s1 * s1
    b = (s0 * t1 - s1 * t0) / det
    a = (t0 - b * s1) / s0
    chi2 = sum(w * (y - a - b * x) ** 2 for w, x, y in zip(ws, xs, ys, strict=True))
    scatter = max(1.0, chi2 / (n - 2))
    k = scatter * correlation / det
    return NoiseTrajectory("power-law", a, b, k * s2, -k * s1, k * s0, confidence, n,
                           loss_range, scatter, correlation)  # fmt: skip


# --- the path to the target ----------------------------------------------------------------


def min_steps_along_path(
    trajectory: NoiseTrajectory,
    losses: Sequence[float],
    steps: Sequence[float],
    batch_size: float,
) -> list[float]:
    """dS_min of each stretch of a path measured at `batch_size`: dS / (1 + B_noise(L)/B).

    `steps[i]` is the cumulative step count at the end of stretch i (the first starts at 0)
    and `losses[i]` its mean training loss (McCandlish et al. 2018 eq. 2.11 inverted).
    """
    out, previous = [], 0.0
    for loss, step in zip(losses, steps, strict=True):
        out.append((step - previous) / (1 + trajectory.b_noise(loss) / batch_size))
        previous = step
    return out


def steps_along_path(
    batch_size: float, min_steps: Sequence[float], b_noises: Sequence[float]
) -> float:
    """S(B) = sum over stretches of (1 + B_noise/B) dS_min (eq. 2.11 applied piecewise)."""
    return sum(d * (1 + bn / batch_size) for d, bn in zip(min_steps, b_noises, strict=True))


def path_critical_batch(min_steps: Sequence[float], b_noises: Sequence[float]) -> float:
    """B_bar = sum B_noise dS_min / sum dS_min, so that S(B) = S_min (1 + B_bar/B) exactly."""
    total = sum(min_steps)
    if not total > 0:
        raise ConfigError("noise path: expected a path with steps, got an empty one")
    return sum(d * bn for d, bn in zip(min_steps, b_noises, strict=True)) / total


def critical_batch_with_interval(
    trajectory: NoiseTrajectory,
    losses: Sequence[float],
    steps: Sequence[float],
    batch_size: float,
) -> tuple[float, tuple[float, float]]:
    """B_bar over a path measured at `batch_size`, and its interval from the fit.

    The interval is the range of B_bar over the boundary of the fit's confidence region
    (`NoiseTrajectory.ellipse`), recomputing the dS_min weights each time.
    """

    def bar(t: NoiseTrajectory) -> float:
        d = min_steps_along_path(t, losses, steps, batch_size)
        return path_critical_batch(d, [t.b_noise(loss) for loss in losses])

    centre = bar(trajectory)
    values = [bar(trajectory.with_params(a, b)) for a, b in trajectory.ellipse()]
    return centre, (min([centre, *values]), max([centre, *values]))


def extend_loss_path(
    steps: Sequence[float],
    losses: Sequence[float],
    end_step: float,
    *,
    min_loss: float,
    nodes: int = 24,
) -> tuple[list[float], list[float]]:
    """Continue a measured loss curve to `end_step`: a power law in steps, floored.

    ln L = c + d ln t fitted to the later half of the curve (training losses fall about as
    a power of the steps, Kaplan et al. 2020 sec. 5); a rising or flat fit keeps the last
    loss. The loss never goes below `min_loss` (the caller bounds how far a fit may be
    extrapolated). Returns (steps, losses) of stretches after the last measured step, on a
    geometric grid.
    """
    last = steps[-1]
    if end_step <= last:
        return [], []
    half = [(math.log(t), math.log(v)) for t, v in zip(steps, losses, strict=True)
            if t > 0 and v > 0][len(steps) // 2 :]  # fmt: skip
    slope = 0.0
    if len(half) >= 2:
        mx = sum(x for x, _ in half) / len(half)
        my = sum(y for _, y in half) / len(half)
        sxx = sum((x - mx) ** 2 for x, _ in half)
        slope = sum((x - mx) * (y - my) for x, y in half) / sxx if sxx > 0 else 0.0
    slope = min(slope, 0.0)
    ratio = (end_step / last) ** (1 / nodes)
    out_steps = [last * ratio**k for k in range(1, nodes + 1)]
    out_steps[-1] = end_step
    out_losses, previous = [], last
    for t in out_steps:
        mid = math.sqrt(previous * t)  # the stretch's loss at its geometric middle
        out_losses.append(max(losses[-1] * (mid / last) ** slope, min_loss))
        previous = t
    return out_steps, out_losses


def crossing_step(
    steps: Sequence[float], values: Sequence[float], target: float, *, higher_is_better: bool
) -> float | None:
    """Where a metric curve, linear in log step over its later half, reaches `target`.

    None when the later half does not move towards the target.
    """
    pts = [(math.log(t), v) for t, v in zip(steps, values, strict=True) if t > 0]
    half = pts[len(pts) // 2 :]
    if len(half) < 2:
        return None
    mx = sum(x for x, _ in half) / len(half)
    my = sum(y for _, y in half) / len(half)
    sxx = sum((x - mx) ** 2 for x, _ in half)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in half) / sxx
    if (slope <= 0) if higher_is_better else (slope >= 0):
        return None
    return math.exp(mx + (target - my) / slope)
