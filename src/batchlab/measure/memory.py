"""What fits: peak memory of one full training step, a memory model, and the batch search.

The quantity measured is the peak of one *whole* optimizer step (forward, backward and
`optimizer.step()` with its state already created, AMP when asked), run by the engine's
`TrainStep`, so the numbers match real training. Tools that measure forward+backward only
(YOLO's AutoBatch) miss the optimizer's temporaries and OOM later.

- CUDA: `torch.cuda.max_memory_allocated` around the step (and reserved memory, reported).
- CPU: a replay of the profiler's `[memory]` events: the running sum of their `nbytes`
  in time order, plus the bytes alive when the step starts (parameters, buffers,
  optimizer state). RSS deltas are too noisy for this; the replay is exact.

Memory model: `peak(B) = fixed_bytes + bytes_per_sample * B`. It is close to linear but not
exactly (the optimizer's temporaries dominate at small B; CPU kernels change algorithm with
B), so the search refines the first prediction with the two measured points nearest the
limit, and never reports a batch size that was not run for real (except with
`target_memory`, which is a labelled prediction for a device you do not have).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from batchlab.data import Batcher
from batchlab.errors import BatchlabError, ConfigError, MemoryBudgetError, TaskError
from batchlab.measure.state import preserve_training_state, release_memory
from batchlab.results import JsonResult
from batchlab.step import TrainStep, autocast_context, build_step, resolve_device
from batchlab.task import Task
from batchlab.tasks import load_task

DEFAULT_MARGIN = 0.1
FIT_BATCH_SIZES = (4, 32)  # two small probes; the search adds points near the limit
TOLERANCE = 0.03  # stop when the max is known to within 3%
MAX_SEARCH_STEPS = 6  # verification/back-off steps after the fit ladder
MAX_STEP_SECONDS = 30.0  # never run a single probe step predicted to take longer

# ---------------------------------------------------------------------------------------
# Sizes


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: str | int | float, *, what: str = "memory size") -> int:
    """Bytes from `6GiB`, `512MB`, `1.5e9`, `300k` or a number.

    KB/MB/GB/TB are powers of 1000; KiB/MiB/GiB/TiB and the bare K/M/G/T are powers of
    1024 (as in `docker --memory 6g`).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 6GiB or 512MB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"{what}: expected a number with an optional unit (B, KB, MB, GB, TB, "
                f"KiB, MiB, GiB, TiB), e.g. 6GiB or 512MB, got {value!r}"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise ConfigError(f"{what}: expected a positive size, e.g. 6GiB, got {value!r}")
    return int(size)


def format_bytes(n: float | None) -> str:
    """`1.50 GiB`, `12.0 MiB`, `900 B`."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------
# OOM


_OOM_MESSAGES = (
    "out of memory",  # CUDA, MPS, XPU: "CUDA out of memory. Tried to allocate ..."
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    # cuDNN reports a failed workspace allocation this way (Lightning and Accelerate agree)
    "cudnn error: cudnn_status_not_supported.",
    "can't allocate memory",  # CPU: "DefaultCPUAllocator: can't allocate memory"
)


def is_oom_error(exc: BaseException) -> bool:
    """True if `exc` means "this step did not fit in memory". The one place that decides."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError) and exc.args:
        message = str(exc.args[0]).lower()
        return any(m in message for m in _OOM_MESSAGES)
    return False


# ---------------------------------------------------------------------------------------
# Results


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


@dataclass(frozen=True)
class MemoryProbe(JsonResult):
    """The largest batch whose full training step fits, and the measurements behind it.

    `max_batch_size` was run for real (`verified`) unless `predicted_only` (a
    `target_memory` plan for another device) or a warning says the step was too slow to run.
    """

    device: str
    max_batch_size: int
    fixed_bytes: float
    bytes_per_sample: float
    budget_bytes: int
    budget_source: str
    margin: float
    usable_bytes: int
    points: tuple[MemoryPoint, ...]
    tried: tuple[int, ...]  # batch size of every training step, warm-up included
    probe_steps: int
    fit: str
    max_residual: float
    predicted_batch_size: float  # where the memory model puts the limit, uncapped
    verified: bool
    predicted_only: bool
    capped_by_dataset: bool
    num_train: int
    eval_peak_bytes: int | None
    amp: bool
    seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def model(self) -> MemoryModel:
        return MemoryModel(self.fixed_bytes, self.bytes_per_sample, self.fit, self.max_residual)


# ---------------------------------------------------------------------------------------
# The memory model


def fit_memory_model(points: list[MemoryPoint] | tuple[MemoryPoint, ...]) -> MemoryModel:
    """Least-squares line through every point that ran; `kind` says whether one line fits.

    Residuals above 2% of the peak mean the line is wrong somewhere (typically the
    optimizer's temporaries dominate at small B); `local_model` then gives the segment
    to extrapolate from.
    """
    ran = _distinct(points)
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
    ran = _distinct(points)
    if len(ran) < 2:
        return fit_memory_model(points)
    (b0, p0), (b1, p1) = ran[-2], ran[-1]
    slope = (p1 - p0) / (b1 - b0)
    return MemoryModel(p1 - slope * b1, slope, "local", 0.0)


def _distinct(points) -> list[tuple[int, int]]:
    """(batch size, peak) of the points that ran, one per batch size, sorted by size."""
    by_size = {p.batch_size: p.peak_bytes for p in points if p.peak_bytes is not None}
    return sorted(by_size.items())


# ---------------------------------------------------------------------------------------
# The search (pure: it only sees a function that runs one step)


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
        raise ConfigError(f"limit: expected a positive batch size, got {limit}")
    tried: list[int] = []
    points: list[MemoryPoint] = []

    def attempt(b: int, role: str) -> MemoryPoint:
        tried.append(b)
        oom = False
        try:
            result = run_step(b)
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
                fits=step_peak.peak_bytes <= usable_bytes,
                reserved_bytes=step_peak.reserved_bytes,
                role=role,
            )
        if role != "warmup":
            points.append(point)
        return point

    ladder = sorted({min(max(1, b), limit) for b in fit_batch_sizes})
    good, bad = 0, limit + 1  # largest size that fits, smallest that does not

    # 1. Warm-up, halving if even that does not fit.
    b = ladder[0]
    while attempt(b, "warmup").oom:
        if b == 1:
            raise MemoryBudgetError(_nothing_fits_message(points, usable_bytes))
        bad = b
        b = max(1, b // 2)
        ladder = [b]

    # 2. The ladder, then halving below it if nothing fitted.
    for b in ladder:
        point = attempt(b, "fit")
        if point.fits:
            good = b
        elif point.oom or not predict_only:
            bad = b
            break
    if predict_only:  # a plan for another device: extrapolate, run nothing more
        if not _distinct(points):
            raise MemoryBudgetError(_nothing_fits_message(points, usable_bytes))
        model, global_fit = local_model(points), fit_memory_model(points)
        predicted = model.max_batch_size(usable_bytes)
        if predicted < 1:
            raise MemoryBudgetError(_nothing_fits_message(points, usable_bytes))
        best = int(min(predicted, limit))
        return BatchSearch(best, tuple(points), tuple(tried), model, global_fit, predicted, False)
    while good == 0:
        if bad == 1:
            raise MemoryBudgetError(_nothing_fits_message(points, usable_bytes))
        b = max(1, bad // 2)
        if attempt(b, "fit").fits:
            good = b
        else:
            bad = b
    global_fit = fit_memory_model(points)

    # 3. Verify and refine.
    verified = True
    best = good
    for _ in range(max_search_steps):
        candidate = _next_candidate(points, good, bad, usable_bytes, limit, tolerance)
        if candidate is None:
            break
        if too_slow is not None and too_slow(candidate):
            best, verified = candidate, False
            break
        if attempt(candidate, "search").fits:
            good = best = candidate
        else:
            bad = candidate
    model = _model_near_limit(points, good, bad)
    predicted = model.max_batch_size(usable_bytes)
    return BatchSearch(best, tuple(points), tuple(tried), model, global_fit, predicted, verified)


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
    ran = _distinct(points)
    if len(ran) >= 2:
        model = fit_memory_model(points)
        if model.fixed_bytes > usable:
            return (
                f"the model alone needs about {format_bytes(model.fixed_bytes)} (parameters, "
                f"gradients, optimizer state) but the usable budget is {format_bytes(usable)}; "
                "give a larger --memory-budget, a smaller --margin, or a smaller model"
            )
    one = next((p for p in points if p.batch_size == 1), None)
    peak = (
        "ran out of memory"
        if one is None or one.peak_bytes is None
        else f"peaks at {format_bytes(one.peak_bytes)}"
    )
    return (
        f"batch size 1 does not fit: one training step at B=1 {peak}, and the usable budget "
        f"is {format_bytes(usable)}; give a larger --memory-budget or use a smaller model"
    )


# ---------------------------------------------------------------------------------------
# Measuring one real step


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence C++ writes to fds 1 and 2 (the profiler's `USDT:` lines and allocator warning)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def replay_peak_bytes(fn: Callable[[], object]) -> tuple[int, float]:
    """(peak bytes, seconds) of `fn` on the CPU, by profiler replay.

    `torch.profiler.profile(profile_memory=True)` records one `[memory]` event per
    allocation (positive `nbytes`) and free (negative); summing them in time order gives
    the bytes `fn` holds at every instant. The peak is the maximum (>= 0). The seconds are
    `fn`'s own wall time, without the profiler's start and stop (which cost far more).
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_native_output():
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
        events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return peak, seconds


def persistent_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes held between steps: parameters, buffers, optimizer state (distinct storages)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class _DeviceBaseline:
    allocated: int = 0
    reserved: int = 0


def _device_baseline(device: torch.device) -> _DeviceBaseline:
    if device.type != "cuda":
        return _DeviceBaseline()
    torch.cuda.synchronize(device)
    return _DeviceBaseline(torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def measure_step_memory(
    step: TrainStep, indices: torch.Tensor, *, baseline: _DeviceBaseline | None = None
) -> StepPeak:
    """Run `step(indices)` once and return its peak memory (bytes above `baseline` on CUDA).

    Gradients are dropped first, as `TrainStep` does at the start of every step, so the
    previous step's gradients are not counted twice.
    """
    device = step.device
    step.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        baseline = baseline or _DeviceBaseline()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step(indices)
        torch.cuda.synchronize(device)
        return StepPeak(
            torch.cuda.max_memory_allocated(device) - baseline.allocated,
            torch.cuda.max_memory_reserved(device) - baseline.reserved,
            time.perf_counter() - start,
        )
    held = persistent_bytes(step.model, step.optimizer)
    peak, seconds = replay_peak_bytes(lambda: step(indices))
    return StepPeak(held + peak, None, seconds)


def measure_eval_memory(
    model: torch.nn.Module,
    loss_fn: Callable,
    batcher: Batcher,
    indices: torch.Tensor,
    *,
    device: torch.device,
    amp: bool,
    baseline: _DeviceBaseline | None = None,
) -> int:
    """Peak bytes of one evaluation forward pass (`eval()`, `no_grad`) at `len(indices)`."""
    was_training = model.training
    model.eval()

    def forward() -> None:
        with torch.no_grad(), autocast_context(device, amp):
            loss_fn(model, batcher(indices))

    try:
        if device.type == "cuda":
            baseline = baseline or _DeviceBaseline()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            forward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - baseline.allocated
        return persistent_bytes(model, None) + replay_peak_bytes(forward)[0]
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# The budget


def resolve_budget(
    device: torch.device,
    memory_budget: str | int | float | None,
    target_memory: str | int | float | None,
    baseline: _DeviceBaseline,
) -> tuple[int, str, bool, list[str]]:
    """(budget bytes, where it came from, prediction only?, warnings)."""
    if memory_budget is not None and target_memory is not None:
        raise ConfigError(
            "expected one of --memory-budget (verify on this device) or --target-memory "
            "(predict for another device), got both; drop one"
        )
    warnings: list[str] = []
    if target_memory is not None:
        size = parse_size(target_memory, what="target memory")
        return size, f"target memory {format_bytes(size)} (prediction only)", True, warnings
    available, available_source = _available_bytes(device, baseline)
    if memory_budget is not None:
        size = parse_size(memory_budget, what="memory budget")
        if device.type == "cuda" and size > available:
            warnings.append(
                f"memory budget {format_bytes(size)} is more than the free device memory "
                f"({format_bytes(available)}); using the free memory"
            )
            return available, available_source, False, warnings
        return size, f"--memory-budget {format_bytes(size)}", False, warnings
    return available, available_source, False, warnings


def _available_bytes(device: torch.device, baseline: _DeviceBaseline) -> tuple[int, str]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory this process has cached but not allocated is usable too.
        return free + baseline.reserved - baseline.allocated, f"free memory on {device}"
    available = _system_available_bytes()
    if available is None:
        raise ConfigError(
            "cannot read the available system RAM here; give --memory-budget, e.g. 4GiB"
        )
    # Half, so that a probe can never starve the machine (there is no OOM on the CPU,
    # only swapping and the kernel's OOM killer).
    source = "half the available system RAM (CPU default; set --memory-budget)"
    return available // 2, source


def _system_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (free plus reclaimable cache), else free pages."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


# ---------------------------------------------------------------------------------------
# The probe


ProgressFn = Callable[[str, float, float | None], None]


def probe_memory(
    task: Task | str,
    *,
    device: str | torch.device = "auto",
    memory_budget: str | int | float | None = None,
    target_memory: str | int | float | None = None,
    margin: float = DEFAULT_MARGIN,
    amp: bool = False,
    seed: int = 0,
    max_batch_size: int | None = None,
    fit_batch_sizes: tuple[int, ...] = FIT_BATCH_SIZES,
    tolerance: float = TOLERANCE,
    max_search_steps: int = MAX_SEARCH_STEPS,
    max_step_seconds: float = MAX_STEP_SECONDS,
    progress: ProgressFn | None = None,
) -> MemoryProbe:
    """The largest batch size whose full training step fits in memory, verified by running it.

    Args:
        device: `auto`, `cpu`, `cuda` or `cuda:N`.
        memory_budget: bytes or a size like `6GiB`; default: the free device memory on CUDA,
            the available system RAM on the CPU.
        target_memory: plan for a device you do not have; the result is a prediction.
        margin: fraction of the budget kept free (default 0.1): fragmentation, other
            processes, longer sequences later.
        amp: measure with autocast (bf16, or fp16 with a GradScaler).
        max_batch_size: upper bound on the search (default: the training set size).
        max_step_seconds: a step predicted to take longer is not run (the result is then
            the model's prediction, flagged); keeps CPU probes short.
        progress: `progress(phase, done, total)` for a progress bar.

    Every training step goes through the engine's `TrainStep`. The model is built from the
    task with `seed`; the caller's RNG state is untouched and memory is freed afterwards.
    """
    t0 = time.perf_counter()
    task = load_task(task)
    margin = check_margin(margin)
    dev = resolve_device(device)
    limit = task.num_train if max_batch_size is None else min(max_batch_size, task.num_train)
    release_memory()
    baseline = _device_baseline(dev)
    budget, source, predict_only, warnings = resolve_budget(
        dev, memory_budget, target_memory, baseline
    )
    usable = int(budget * (1 - margin))

    timings: dict[int, float] = {}  # seconds of each measured step, by batch size
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        search, eval_peak = _search_fresh_model(
            task,
            dev,
            amp=amp,
            seed=seed,
            baseline=baseline,
            timings=timings,
            progress=progress,
            usable_bytes=usable,
            limit=limit,
            fit_batch_sizes=fit_batch_sizes,
            tolerance=tolerance,
            max_search_steps=max_search_steps,
            predict_only=predict_only,
            too_slow=lambda b: _predict_seconds(timings, b) > max_step_seconds,
        )
    release_memory()  # the model, optimizer and activations are gone with the helper's frame

    predicted = search.predicted_batch_size
    capped = search.max_batch_size >= limit and predicted > limit
    if capped and limit == task.num_train:
        would = "all of it" if not math.isfinite(predicted) else f"about {int(predicted)}"
        warnings.append(
            f"capped at the training set size ({task.num_train} examples); memory would "
            f"allow {would}"
        )
    if not search.verified and not predict_only:
        warnings.append(
            f"B={search.max_batch_size} was not run: one step would take about "
            f"{_predict_seconds(timings, search.max_batch_size):.0f}s "
            f"(> {max_step_seconds:g}s); it is the memory model's prediction. Give a smaller "
            "--memory-budget to verify one"
        )
    if eval_peak is not None and eval_peak > usable:
        warnings.append(
            f"the evaluation pass at B={search.max_batch_size} peaks at "
            f"{format_bytes(eval_peak)}, above the usable budget; evaluate at a smaller batch"
        )
    return MemoryProbe(
        device=str(dev),
        max_batch_size=search.max_batch_size,
        fixed_bytes=search.model.fixed_bytes,
        bytes_per_sample=search.model.bytes_per_sample,
        budget_bytes=budget,
        budget_source=source,
        margin=margin,
        usable_bytes=usable,
        points=search.points,
        tried=search.tried,
        probe_steps=len(search.tried),
        fit=search.global_fit.kind,
        max_residual=search.global_fit.max_residual,
        predicted_batch_size=predicted,
        verified=search.verified and not predict_only,
        predicted_only=predict_only,
        capped_by_dataset=capped,
        num_train=task.num_train,
        eval_peak_bytes=eval_peak,
        amp=amp,
        seconds=time.perf_counter() - t0,
        warnings=tuple(warnings),
    )


def _search_fresh_model(
    task: Task,
    dev: torch.device,
    *,
    amp: bool,
    seed: int,
    baseline: _DeviceBaseline,
    timings: dict[int, float],
    progress: ProgressFn | None,
    **search_kwargs,
) -> tuple[BatchSearch, int | None]:
    """Build the task's model on `dev`, run the search on it, and measure one eval pass."""
    step = build_step(task, dev, lr=task.lr, micro_batch_size=1, amp=amp)
    model, optimizer, scaler = step.model, step.optimizer, step.scaler
    order = torch.randperm(task.num_train, generator=torch.Generator().manual_seed(seed))

    def run_step(b: int) -> StepPeak:
        step.micro_batch_size = b
        try:
            peak = measure_step_memory(step, order[:b], baseline=baseline)
        except Exception as exc:
            if is_oom_error(exc) or isinstance(exc, BatchlabError):
                raise
            raise TaskError(
                f"a training step of task {task.name!r} at batch size {b} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        timings[b] = peak.seconds or 0.0
        if progress is not None:
            progress("memory", len(timings), None)
        return peak

    eval_peak = None
    with preserve_training_state(model, optimizer, scaler):
        search = find_max_batch_size(run_step, **search_kwargs)
        if search.verified and not search_kwargs["predict_only"] and task.val_data is not None:
            val_batcher = Batcher(task.val_data, dev, task.collate_fn)
            n_eval = min(search.max_batch_size, task.num_val)
            eval_peak = measure_eval_memory(
                model, task.loss, val_batcher, torch.arange(n_eval), device=dev, amp=amp,
                baseline=baseline,
            )  # fmt: skip
    return search, eval_peak


def check_margin(margin: float) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ConfigError(
            f"margin: expected a fraction of the budget in [0, 1), got {margin!r}; e.g. 0.1"
        )
    return float(margin)


def _predict_seconds(timings: dict[int, float], batch_size: int) -> float:
    """Seconds for one probe step at `batch_size`, from the steps measured so far.

    Two estimates, each pessimistic in its own way, and the smaller is taken: the lowest
    seconds-per-sample seen times B (ignores the fixed cost of a step, so overestimates),
    and the line through the smallest and largest measured sizes (its slope absorbs noise,
    but the fixed cost of a step is not multiplied by B).
    """
    if not timings:
        return 0.0
    proportional = batch_size * min(seconds / b for b, seconds in timings.items())
    lo, hi = min(timings), max(timings)
    if hi == lo:
        return proportional
    slope = max(0.0, (timings[hi] - timings[lo]) / (hi - lo))
    return min(proportional, timings[hi] + slope * (batch_size - hi))
