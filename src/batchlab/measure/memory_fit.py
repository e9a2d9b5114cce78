"""The memory model: `peak(B) = fixed_bytes + bytes_per_sample * B`, fitted to measured steps.

It is close to linear but not exactly (the optimizer's temporaries dominate at small B;
CPU kernels change algorithm with B), so `fit_memory_model` says whether one line fits
every point, and `local_model` gives the upper segment to extrapolate from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from batchlab.errors import MemoryBudgetError
from batchlab.results import JsonResult


@dataclass(frozen=True)
class MemoryPoint(JsonResult):
    """One measured training step. `peak_bytes` is None when it ran out of memory."""

    batch_size: int
    peak_bytes: int | None
    fits: bool  # ran, and the peak is within the usable budget (budget minus margin)
    oom: bool = False
    reserved_bytes: int | None = None  # CUDA caching allocator, for reference
    role: str = "fit"  # "fit" (the ladder), "search" (verification and back-off)


@dataclass(frozen=True)
class MemoryModel(JsonResult):
    """`peak(B) = fixed_bytes + bytes_per_sample * B`, from two or more measured points."""

    fixed_bytes: float
    bytes_per_sample: float
    kind: str = "linear"  # "linear": one line fits every point; "piecewise": it does not
    max_residual: float = 0.0  # largest |residual| / peak of one line through all points

    def predict(self, batch_size: float) -> float:
        return self.fixed_bytes + self.bytes_per_sample * batch_size

    def max_batch_size(self, usable_bytes: float) -> float:
        """Largest B with predict(B) <= usable_bytes (inf when memory does not grow with B)."""
        if self.bytes_per_sample <= 0:
            return math.inf if self.fixed_bytes <= usable_bytes else 0.0
        return (usable_bytes - self.fixed_bytes) / self.bytes_per_sample


def fit_memory_model(points: list[MemoryPoint] | tuple[MemoryPoint, ...]) -> MemoryModel:
    """Least-squares line through every point that ran; `kind` says whether one line fits.

    Residuals above 2% of the peak mean the line is wrong somewhere (typically the
    optimizer's temporaries dominate at small B); `local_model` then gives the segment
    to extrapolate from.
    """
    ran = measured_peaks(points)
    if not ran:
        raise MemoryBudgetError("no training step ran, so there is nothing to fit")
    if len(ran) == 1:  # through the origin: the conservative guess (all memory per sample)
        b, peak = ran[0]
        return MemoryModel(0.0, peak / b, "proportional", 0.0)
    n = len(ran)
    mean_b = sum(b for b, _ in ran) / n
    mean_p = sum(p for _, p in ran) / n
    sxx = sum((b - mean_b) ** 2 for b, _ in ran)
    slope = sum((b - mean_b) * (p - mean_p) for b, p in ran) / sxx
    fixed = mean_p - slope * mean_b
    worst = max(abs(fixed + slope * b - p) / max(p, 1) for b, p in ran)
    kind = "linear" if worst <= 0.02 else "piecewise"
    return MemoryModel(fixed, slope, kind, worst)


def local_model(points: list[MemoryPoint] | tuple[MemoryPoint, ...]) -> MemoryModel:
    """The line through the two largest batch sizes that ran (the upper segment)."""
    ran = measured_peaks(points)
    if len(ran) < 2:
        return fit_memory_model(points)
    (b0, p0), (b1, p1) = ran[-2], ran[-1]
    slope = (p1 - p0) / (b1 - b0)
    return MemoryModel(p1 - slope * b1, slope, "local", 0.0)


def measured_peaks(points: Iterable[MemoryPoint]) -> list[tuple[int, int]]:
    """(batch size, peak) of the points that ran, one per batch size, sorted by size."""
    by_size = {p.batch_size: p.peak_bytes for p in points if p.peak_bytes is not None}
    return sorted(by_size.items())
