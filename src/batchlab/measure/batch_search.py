"""The batch search: the largest batch whose step fits, in few training steps.

Pure: it sees only a function that runs one step at batch B and returns its peak bytes
(or raises an out-of-memory error), so tests drive it with a fake allocator and assert
the exact sequence of batch sizes tried.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from batchlab.errors import ConfigError, MemoryBudgetError
from batchlab.measure.memory_fit import (
    MemoryModel,
    MemoryPoint,
    fit_memory_model,
    local_model,
    measured_peaks,
)
from batchlab.measure.oom import is_oom_error
from batchlab.measure.sizes import format_bytes
from batchlab.measure.state import release_memory

FIT_BATCH_SIZES = (4, 32)  # two small probes; the search adds points near the limit
TOLERANCE = 0.03  # stop when the max is known to within 3%
MAX_SEARCH_STEPS = 6  # verification/back-off steps after the fit ladder


class StepPeak(NamedTuple):
    """What one measured step returns: its peak, CUDA's reserved peak, its own duration."""

    peak_bytes: int
    reserved_bytes: int | None = None
    seconds: float | None = None


RunStep = Callable[[int], "int | StepPeak"]


@dataclass(frozen=True)
class BatchSearch:
    """What `find_max_batch_size` did."""

    max_batch_size: int
    points: tuple[MemoryPoint, ...]
    tried: tuple[int, ...]
    model: MemoryModel  # the line nearest the limit
    global_fit: MemoryModel
    predicted_batch_size: float
    verified: bool


class _Search:
    """One search in progress: the steps run, the points measured, and the bracket.

    `good` is the largest batch size known to fit (0: none yet), `bad` the smallest known
    not to (`limit + 1`: none yet).
    """

    def __init__(self, run_step: RunStep, usable_bytes: float, limit: int) -> None:
        self.run_step = run_step
        self.usable_bytes = usable_bytes
        self.limit = limit
        self.tried: list[int] = []
        self.points: list[MemoryPoint] = []
        self.good, self.bad = 0, limit + 1

    def attempt(self, b: int, role: str) -> MemoryPoint:
        """Run one step at `b`; an OOM becomes a point that does not fit."""
        self.tried.append(b)
        oom = False
        try:
            result = self.run_step(b)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            oom = True
        if oom:  # outside `except`: the traceback (and the activations it holds) is gone
            release_memory()
            point = MemoryPoint(b, None, fits=False, oom=True, role=role)
        else:
            step_peak = result if isinstance(result, StepPeak) else StepPeak(int(result))
            point = MemoryPoint(
                b,
                int(step_peak.peak_bytes),
                fits=step_peak.peak_bytes <= self.usable_bytes,
                reserved_bytes=step_peak.reserved_bytes,
                role=role,
            )
        if role != "warmup":
            self.points.append(point)
        return point

    def nothing_fits(self) -> MemoryBudgetError:
        return MemoryBudgetError(
            _nothing_fits_message(self.points, self.usable_bytes), param="memory_budget"
        )

    def result(
        self, best: int, model: MemoryModel, global_fit: MemoryModel, verified: bool
    ) -> BatchSearch:
        predicted = model.max_batch_size(self.usable_bytes)
        points, tried = tuple(self.points), tuple(self.tried)
        return BatchSearch(best, points, tried, model, global_fit, predicted, verified)


def find_max_batch_size(
    run_step: RunStep,
    *,
    usable_bytes: float,
    limit: int,
    fit_batch_sizes: tuple[int, ...] = FIT_BATCH_SIZES,
    tolerance: float = TOLERANCE,
    max_search_steps: int = MAX_SEARCH_STEPS,
    predict_only: bool = False,
    too_slow: Callable[[int], bool] | None = None,
) -> BatchSearch:
    """Largest batch size whose step peaks within `usable_bytes`, in few training steps.

    `run_step(B)` runs one training step at batch B and returns its peak bytes, or raises
    an out-of-memory error (`is_oom_error`). The sequence of calls is:

    1. a warm-up step at the smallest ladder size (it creates the optimizer state, so its
       peak is not the steady state and is not used);
    2. the ladder `fit_batch_sizes` (default 4, 32), stopping at the first that does
       not fit; if none fits, halve down to 1;
    3. up to `max_search_steps` steps at the predicted limit: the line through the two
       largest sizes that fit extrapolates, the chord between the largest fit and the
       smallest misfit interpolates (for a convex curve the chord is safe and the
       extrapolation an upper bound, so the limit lies between them). After an OOM, which
       gives no peak, bisect. Stop when the limit is known to within `tolerance`.

    A step "fits" when it ran and peaked at most at `usable_bytes`; on the CPU there is no
    real OOM, so a peak above the budget counts as the misfit. With `predict_only` only
    steps 1-2 run and the model's prediction is returned unverified. `too_slow(B)` can veto
    a step that would take too long; the search then returns its prediction unverified.
    """
    if limit < 1:
        raise ConfigError(f"`limit`: expected a positive batch size, got {limit}", param="limit")
    search = _Search(run_step, usable_bytes, limit)
    ladder = _warm_up(search, sorted({min(max(1, b), limit) for b in fit_batch_sizes}))
    for b in ladder:  # 2. the ladder
        point = search.attempt(b, "fit")
        if point.fits:
            search.good = b
        elif point.oom or not predict_only:
            search.bad = b
            break
    if predict_only:  # a plan for another device: extrapolate, run nothing more
        return _prediction(search)
    while search.good == 0:  # ... then halving below it if nothing fitted
        if search.bad == 1:
            raise search.nothing_fits()
        b = max(1, search.bad // 2)
        if search.attempt(b, "fit").fits:
            search.good = b
        else:
            search.bad = b
    return _refine(search, tolerance, max_search_steps, too_slow)


def _warm_up(search: _Search, ladder: list[int]) -> list[int]:
    """1. The warm-up step, halving while even that does not fit; returns the ladder to run."""
    b = ladder[0]
    while search.attempt(b, "warmup").oom:
        if b == 1:
            raise search.nothing_fits()
        search.bad = b
        b = max(1, b // 2)
        ladder = [b]
    return ladder


def _prediction(search: _Search) -> BatchSearch:
    """The memory model's limit from the ladder alone, unverified (`predict_only`)."""
    if not measured_peaks(search.points):
        raise search.nothing_fits()
    model, global_fit = local_model(search.points), fit_memory_model(search.points)
    predicted = model.max_batch_size(search.usable_bytes)
    if predicted < 1:
        raise search.nothing_fits()
    return search.result(int(min(predicted, search.limit)), model, global_fit, False)


def _refine(
    search: _Search,
    tolerance: float,
    max_search_steps: int,
    too_slow: Callable[[int], bool] | None,
) -> BatchSearch:
    """3. Verify and refine: run the predicted limit until it is known to within `tolerance`."""
    global_fit = fit_memory_model(search.points)
    verified = True
    best = search.good
    for _ in range(max_search_steps):
        candidate = _next_candidate(
            search.points, search.good, search.bad, search.usable_bytes, search.limit, tolerance
        )
        if candidate is None:
            break
        if too_slow is not None and too_slow(candidate):
            best, verified = candidate, False
            break
        if search.attempt(candidate, "search").fits:
            search.good = best = candidate
        else:
            search.bad = candidate
    model = _model_near_limit(search.points, search.good, search.bad)
    return search.result(best, model, global_fit, verified)


def _next_candidate(
    points: list[MemoryPoint], good: int, bad: int, usable: float, limit: int, tolerance: float
) -> int | None:
    """The next batch size to run, or None when the limit is known to within `tolerance`."""
    if good >= limit or bad - good <= max(1, tolerance * good):
        return None
    fits = [p for p in points if p.fits]
    misfit = next((p for p in points if p.batch_size == bad and p.peak_bytes is not None), None)
    estimates = []
    if len({p.batch_size for p in fits}) >= 2:  # extrapolate the upper segment
        estimates.append(local_model(fits).max_batch_size(usable))
    elif bad > limit:  # one point and no misfit: all memory per sample (conservative)
        estimates.append(fit_memory_model(fits).max_batch_size(usable))
    if misfit is not None:  # interpolate between the largest fit and the smallest misfit
        lo = max(fits, key=lambda p: p.batch_size)
        estimates.append(local_model([lo, misfit]).max_batch_size(usable))
    oom_above = bad <= limit and misfit is None
    if not estimates:  # one fitting point and an OOM: nothing to extrapolate from
        return _midpoint(good, bad)
    low, high = min(estimates), max(estimates)
    if high <= good * (1 + tolerance):
        return None
    if oom_above and low >= bad:  # the model says it fits, the device said no: bisect
        return _midpoint(good, bad)
    ceiling = min(limit, bad - 1)
    candidate = low if low > good * (1 + tolerance) else (good + min(high, ceiling)) / 2
    candidate = int(min(max(candidate, good + 1), ceiling))
    return candidate if candidate > good else None


def _midpoint(good: int, bad: int) -> int:
    """Bisection point: geometric while the bracket spans more than 2x, else arithmetic."""
    mid = math.isqrt(good * bad) if bad > 2 * good else (good + bad) // 2
    return min(max(mid, good + 1), bad - 1)


def _model_near_limit(points: list[MemoryPoint], good: int, bad: int) -> MemoryModel:
    """The line through the measured points on either side of the limit (or just below).

    Where the peak is jagged near the limit (allocator rounding, kernels switching), that
    line can have a negative intercept; the least-squares line through every point is
    then the better summary of "fixed + per sample", and failing that, a line through
    the origin.
    """
    near = [p for p in points if p.peak_bytes is not None and p.batch_size in (good, bad)]
    model = local_model(near if len(near) == 2 else [p for p in points if p.fits] or points)
    if model.fixed_bytes >= 0:
        return model
    overall = fit_memory_model(points)
    if overall.fixed_bytes >= 0 and overall.bytes_per_sample > 0:
        return MemoryModel(overall.fixed_bytes, overall.bytes_per_sample, "least-squares")
    largest = max((p for p in points if p.fits), key=lambda p: p.batch_size)
    return MemoryModel(0.0, largest.peak_bytes / largest.batch_size, "proportional")


def _nothing_fits_message(points: list[MemoryPoint], usable: float) -> str:
    ran = measured_peaks(points)
    if len(ran) >= 2:
        model = fit_memory_model(points)
        if model.fixed_bytes > usable:
            return (
                f"the model alone needs about {format_bytes(model.fixed_bytes)} (parameters, "
                f"gradients, optimizer state) but the usable budget is {format_bytes(usable)}; "
                "give a larger `memory_budget`, a smaller `margin`, or a smaller model"
            )
    one = next((p for p in points if p.batch_size == 1), None)
    peak = (
        "ran out of memory"
        if one is None or one.peak_bytes is None
        else f"peaks at {format_bytes(one.peak_bytes)}"
    )
    return (
        f"batch size 1 does not fit: one training step at B=1 {peak}, and the usable budget "
        f"is {format_bytes(usable)}; give a larger `memory_budget` or use a smaller model"
    )
