"""What runs fastest: samples/s against batch size, the knee, alignment, accumulation.

Timing is honest in the way nanoGPT's `bench.py` is: every batch size gets a warm-up step,
then several timed windows between `synchronize()` calls on CUDA; each point reports the
median and the spread over its windows. The windows of all batch sizes are interleaved
(round 1: B=2, 4, 8 ...; round 2: ... B=4, 2), so load from other processes hits every
size alike, and ratios between sizes stay meaningful on a shared machine.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from batchlab.core.batching import split
from batchlab.core.checks import check_batch_size
from batchlab.core.step_time import interpolate_step_seconds
from batchlab.errors import ConfigError
from batchlab.measure.memory import ProgressFn
from batchlab.measure.state import preserve_training_state, release_memory
from batchlab.measure.step_timing import (
    CONTENTION_SLOWDOWN,
    StepTimer,
    TrainStepTimer,
    interleaved_rounds,
    thread_slowdown,
    threads_starved,
    torch_threads,
    warm_up,
)
from batchlab.results import JsonResult
from batchlab.step import build_step, resolve_device
from batchlab.task import Task
from batchlab.tasks import load_task

KNEE_FRACTION = 0.9
WINDOWS = 5
WINDOW_SECONDS = 0.1
TIME_BUDGET_SECONDS = 10.0
MIN_ALIGNMENT_GAIN = 0.03  # an aligned size must be >= 3% faster ...
MIN_ALIGNMENT_WIN_RATE = 0.8  # ... in at least 80% of the interleaved rounds
ALIGNMENT_SIZES = 5  # sizes timed by the alignment check (two rules share one)
NOISY_SPREAD = 0.5  # warn when a point's windows range over more than 50% of its median
# Contention: the fastest window of one size runs over 3x the samples/s of its slowest, or
# a larger batch runs at less than 1/4 of the smallest one's samples/s. Neither happens on
# a quiet device (the windows are interleaved, so a slow phase hits every size); both are
# what a loaded CPU gave (issue 14: load 6 on 2 cores, windows over 21032%).
CONTENTION_WINDOW_RATIO = 3.0


@dataclass(frozen=True)
class ThroughputPoint(JsonResult):
    """Training throughput at one batch size: median over timed windows, and its spread."""

    batch_size: int
    samples_per_s: float  # median over windows
    step_s: float  # median seconds per optimizer step
    spread: float  # (highest - lowest) / median samples/s over the windows
    samples_per_s_low: float
    samples_per_s_high: float
    windows: int
    steps_per_window: int


@dataclass(frozen=True)
class AlignmentFinding(JsonResult):
    """Does an aligned batch size (multiple of 8, power of two) measure faster here?"""

    rule: str  # "multiple_of_8" or "power_of_2"
    aligned_batch_size: int
    compared_batch_sizes: tuple[int, ...]
    speedup: float  # median over rounds of samples/s(aligned) / mean samples/s(compared)
    win_rate: float  # fraction of rounds in which the aligned size was faster
    confirmed: bool  # speedup >= 1.03 and win rate >= 0.8
    note: str


@dataclass(frozen=True)
class ThroughputProfile(JsonResult):
    """Samples/s along a geometric ladder of batch sizes, and what to make of it."""

    device: str
    amp: bool
    points: tuple[ThroughputPoint, ...]
    knee_batch_size: int  # smallest B reaching `knee_fraction` of the peak samples/s
    knee_fraction: float
    peak_samples_per_s: float
    alignment: tuple[AlignmentFinding, ...]
    aligned_knee_batch_size: int  # the knee, rounded only where alignment was confirmed
    steps: int  # training steps spent
    seconds: float
    warnings: tuple[str, ...] = ()
    contention: bool = False  # `timing_contention` found the timings untrustworthy

    def samples_per_s_at(self, batch_size: float) -> float:
        """Samples/s at any B, interpolating the step time in log-log space."""
        sizes = [p.batch_size for p in self.points]
        step_s = interpolate_step_seconds(sizes, [p.step_s for p in self.points], batch_size)
        return batch_size / step_s


@dataclass(frozen=True)
class AccumulationPlan(JsonResult):
    """How to reach an effective batch larger than what fits: micro-batches x accumulation."""

    effective_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    samples_per_s: float | None  # estimated at the micro-batch, from the throughput curve
    peak_samples_per_s: float | None
    throughput_cost: float | None  # 1 - samples_per_s / peak: what accumulation costs
    note: str


# ---------------------------------------------------------------------------------------
# Pure analysis


def check_time_budget(seconds: float, *, param: str = "time_budget") -> float:
    """`seconds` if it is a positive number (`param` names it in the error)."""
    if not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ConfigError(
            f"time budget: expected a positive number of seconds, got {seconds!r}", param=param
        )
    return seconds


def geometric_ladder(max_batch_size: int, *, start: int = 2) -> list[int]:
    """Powers of two from `start` below `max_batch_size`, then the max itself."""
    check_batch_size(max_batch_size, what="max batch size")
    sizes = []
    b = start
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def find_knee(
    batch_sizes: Sequence[int], samples_per_s: Sequence[float], fraction: float = KNEE_FRACTION
) -> int:
    """The smallest batch size whose throughput reaches `fraction` of the peak."""
    if not batch_sizes or len(batch_sizes) != len(samples_per_s):
        raise ConfigError("expected matching, non-empty batch sizes and throughputs")
    if not 0 < fraction <= 1:
        raise ConfigError(f"knee fraction: expected a number in (0, 1], got {fraction!r}")
    peak = max(samples_per_s)
    return min(b for b, s in zip(batch_sizes, samples_per_s, strict=True) if s >= fraction * peak)


def summarize_windows(
    batch_size: int, samples_per_s: Sequence[float], steps_per_window: int
) -> ThroughputPoint:
    """Median, low and high samples/s over the timed windows of one batch size."""
    rates = list(samples_per_s)
    median = statistics.median(rates)
    return ThroughputPoint(
        batch_size=batch_size,
        samples_per_s=median,
        step_s=batch_size / median,
        spread=(max(rates) - min(rates)) / median,
        samples_per_s_low=min(rates),
        samples_per_s_high=max(rates),
        windows=len(rates),
        steps_per_window=steps_per_window,
    )


def alignment_candidates(knee: int, max_batch_size: int) -> list[tuple[str, int, tuple[int, ...]]]:
    """(rule, aligned size, neighbours) pairs to time around the knee.

    A multiple of 8 is compared with its two odd neighbours (B-1, B+1): both need
    padding for Tensor Cores. A power of two P >= 32 is compared with P-8 and P+8, which
    are multiples of 8 but not powers of two. Neighbours sit on both sides so the natural
    rise of throughput with B cancels out.
    """
    found = []
    m8 = max(8, math.floor(knee / 8 + 0.5) * 8)  # nearest, halves up
    if m8 + 1 > max_batch_size:
        m8 = (max_batch_size - 1) // 8 * 8
    if m8 >= 8:
        found.append(("multiple_of_8", m8, (m8 - 1, m8 + 1)))
    p2 = 2 ** round(math.log2(max(knee, 1)))
    if p2 + 8 > max_batch_size:
        p2 = 2 ** math.floor(math.log2(max(max_batch_size - 8, 1)))
    if p2 >= 32:
        found.append(("power_of_2", p2, (p2 - 8, p2 + 8)))
    return found


def judge_alignment(
    rule: str,
    aligned: int,
    compared: tuple[int, ...],
    rounds: Sequence[dict[int, float]],
    *,
    min_gain: float = MIN_ALIGNMENT_GAIN,
    min_win_rate: float = MIN_ALIGNMENT_WIN_RATE,
) -> AlignmentFinding:
    """Compare samples/s of `aligned` with the mean of `compared`, round by round."""
    ratios = [r[aligned] / statistics.fmean(r[b] for b in compared) for r in rounds]
    speedup = statistics.median(ratios)
    win_rate = sum(x > 1 for x in ratios) / len(ratios)
    confirmed = speedup >= 1 + min_gain and win_rate >= min_win_rate
    others = " and ".join(str(b) for b in compared)
    verdict = "faster: round to it" if confirmed else "no measurable gain: do not bother rounding"
    note = f"B={aligned} vs {others}: x{speedup:.3f} ({win_rate:.0%} of rounds faster), {verdict}"
    return AlignmentFinding(rule, aligned, compared, speedup, win_rate, confirmed, note)


def aligned_knee(knee: int, findings: Sequence[AlignmentFinding], max_batch_size: int) -> int:
    """Round the knee up to the confirmed alignment (power of two wins over 8), if it fits."""
    confirmed = {f.rule for f in findings if f.confirmed}
    if "power_of_2" in confirmed:
        p2 = 2 ** math.ceil(math.log2(knee))
        if p2 <= max_batch_size:
            return p2
    if "multiple_of_8" in confirmed:
        m8 = math.ceil(knee / 8) * 8
        if m8 <= max_batch_size:
            return m8
    return knee


def plan_accumulation(
    effective_batch_size: int, max_batch_size: int, profile: ThroughputProfile | None = None
) -> AccumulationPlan:
    """Micro-batch and accumulation steps for an effective batch (the fewest steps that fit).

    With k = ceil(E / max) micro-batches of ceil(E / k), the last one may be smaller;
    `TrainStep` weights each micro-batch by its share, so the update equals one batch of E.
    The cost is the throughput lost at the micro-batch compared with the peak.
    """
    check_batch_size(effective_batch_size, what="effective batch size")
    check_batch_size(max_batch_size, what="max batch size")
    micro, steps = split(effective_batch_size, max_batch_size)
    rate = peak = cost = None
    if profile is not None and profile.points:
        rate = profile.samples_per_s_at(micro)
        peak = profile.peak_samples_per_s
        cost = max(0.0, 1 - rate / peak)
    if steps == 1:
        note = f"B={effective_batch_size} fits in one step: no accumulation needed"
    else:
        last = effective_batch_size - micro * (steps - 1)
        tail = "" if last == micro else f" (the last micro-batch has {last})"
        note = f"{steps} micro-batches of {micro}{tail} make one step of {effective_batch_size}"
        if cost is not None:
            note += f"; about {cost:.0%} below peak throughput (estimated from the curve)"
    return AccumulationPlan(effective_batch_size, micro, steps, rate, peak, cost, note)


# ---------------------------------------------------------------------------------------
# Measuring


def profile_throughput(
    task: Task | str,
    *,
    batch_sizes: Sequence[int] | None = None,
    max_batch_size: int | None = None,
    device: str | torch.device = "auto",
    amp: bool = False,
    seed: int = 0,
    windows: int = WINDOWS,
    window_seconds: float | None = None,
    time_budget: float = TIME_BUDGET_SECONDS,
    knee_fraction: float = KNEE_FRACTION,
    check_alignment: bool = True,
    progress: ProgressFn | None = None,
    timer: StepTimer | None = None,
) -> ThroughputProfile:
    """Training samples/s at a geometric ladder of batch sizes, the knee and alignment.

    Args:
        batch_sizes: the sizes to time (default: powers of two up to `max_batch_size`,
            and the max itself).
        max_batch_size: the largest size (default: the training set size); pass
            `probe_memory(...).max_batch_size`.
        windows: timed windows per size; each window lasts about `window_seconds`
            (default: the time budget shared by every size, at most 0.1 s).
        time_budget: seconds to spend timing, roughly; larger sizes are dropped once
            timing them would exceed it (a warning says which).
        knee_fraction: the knee is the smallest B reaching this fraction of peak samples/s.
        check_alignment: also time multiples of 8 and powers of two around the knee
            against their neighbours; rounding is recommended only where it measured faster.
        timer: what runs and times the steps (default: a `TrainStepTimer` on the task's
            model); a `StepTimer` that simulates a device makes the analysis testable.
            On a CPU with several threads the real model's ladder is timed with one
            thread when `step_timing.thread_slowdown` finds the threads contended; a
            simulated timer may answer that check with its own `thread_slowdown()`.

    Every step is the engine's `TrainStep` on a model built from the task with `seed`;
    the caller's RNG state is untouched and memory is freed afterwards.
    """
    t0 = time.perf_counter()
    task = load_task(task)
    dev = resolve_device(device)
    check_batch_size(windows, what="windows")
    check_time_budget(time_budget)
    warnings: list[str] = []
    sizes = _sizes_to_time(task, batch_sizes, max_batch_size, warnings)
    if window_seconds is None:  # share the budget among the ladder and the alignment sizes
        slots = windows * (len(sizes) + (ALIGNMENT_SIZES if check_alignment else 0))
        window_seconds = min(WINDOW_SECONDS, time_budget / slots)
    schedule = _Schedule(windows, window_seconds, time_budget, knee_fraction, check_alignment)

    def measure(notes: list[str]) -> tuple[list[ThroughputPoint], list, int]:
        if timer is not None:
            before = timer.steps
            points, findings = _time_sizes(timer, sizes, schedule, progress, notes)
            return points, findings, timer.steps - before
        fork_devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            timed = _time_fresh_model(
                task, dev, sizes, schedule, amp=amp, seed=seed, progress=progress,
                warnings=notes,
            )  # fmt: skip
        release_memory()  # the model and optimizer went with the helper's frame
        return timed

    # The thread check times this CPU: for the real model, or as a simulated timer says.
    slowdown = thread_slowdown if timer is None else getattr(timer, "thread_slowdown", None)
    points, findings, steps, warnings = _timed_steadily(measure, warnings, dev, slowdown)
    knee = find_knee(
        [p.batch_size for p in points], [p.samples_per_s for p in points], knee_fraction
    )
    noisy = _noise_warning(points, dev)
    return ThroughputProfile(
        device=str(dev),
        amp=amp,
        points=points,
        knee_batch_size=knee,
        knee_fraction=knee_fraction,
        peak_samples_per_s=max(p.samples_per_s for p in points),
        alignment=tuple(findings),
        aligned_knee_batch_size=aligned_knee(knee, findings, points[-1].batch_size),
        steps=steps,
        seconds=time.perf_counter() - t0,
        warnings=tuple(warnings + ([noisy] if noisy else [])),
        contention=timing_contention(points) is not None,
    )


def _timed_steadily(
    measure: Callable[[list[str]], tuple[Sequence[ThroughputPoint], list, int]],
    warnings: list[str],
    dev: torch.device,
    slowdown: Callable[[], float] | None = thread_slowdown,
) -> tuple[Sequence[ThroughputPoint], list, int, list[str]]:
    """`measure(notes)` with the caller's threads, or with one thread on a CPU whose
    several threads are contended. (points, findings, steps, warnings).

    Other processes on the cores: with several intra-op threads a step waits for the
    slowest of them (100-500x slower under load on 2 cores, DESIGN.md). One thread is
    slowed far less, and its windows are read as CPU time (`step_timing`). Contention is
    seen before timing (`thread_slowdown`: uniformly slow steps show no spread) or in the
    ladder's windows (`timing_contention`); the 1-thread ladder is then kept if steadier.
    """
    threads = torch.get_num_threads()
    if dev.type != "cpu" or threads == 1:
        points, findings, steps = measure(warnings)
        return points, findings, steps, warnings
    starved = threads_starved(slowdown)
    if starved:
        notes = list(warnings)
        points, findings, steps = _with_one_thread(measure, notes)
        notes.append(_one_thread_note(threads, starved, timing_contention(points)))
        return points, findings, steps, notes
    points, findings, steps = measure(warnings)
    # Contention that began while the ladder ran shows in its windows, or, when it slowed
    # every window alike, in the thread check run again.
    contended = timing_contention(points) or threads_starved(slowdown)
    if not contended:
        return points, findings, steps, warnings
    notes = list(warnings)
    again, again_findings, again_steps = _with_one_thread(measure, notes)
    still = timing_contention(again)
    if still is not None and _worst_window_ratio(again) >= _worst_window_ratio(points):
        return points, findings, steps + again_steps, warnings
    # Keep the 1-thread CPU times when they are steadier, even if not clean: the contended
    # several-thread medians are the worse of the two.
    notes.append(_one_thread_note(threads, contended, still))
    return again, again_findings, steps + again_steps, notes


def _with_one_thread(
    measure: Callable[[list[str]], tuple[Sequence[ThroughputPoint], list, int]],
    notes: list[str],
) -> tuple[Sequence[ThroughputPoint], list, int]:
    with torch_threads(1):
        return measure(notes)


def _one_thread_note(threads: int, contended: str, still: str | None) -> str:
    return (
        f"timings with {threads} threads looked contended ({contended}); re-timed with 1 "
        "thread by its CPU time, which time spent waiting for a core does not count: the "
        "step times are 1-thread times (train with torch.set_num_threads(1) on a busy "
        "machine)" + ("" if still is None else f"; still contended ({still})")
    )


def _worst_window_ratio(points: Sequence[ThroughputPoint]) -> float:
    """The largest ratio of fastest to slowest window samples/s over the ladder."""
    return max(
        (p.samples_per_s_high / p.samples_per_s_low for p in points if p.samples_per_s_low > 0),
        default=1.0,
    )


def _sizes_to_time(
    task: Task, batch_sizes: Sequence[int] | None, max_batch_size: int | None, warnings: list[str]
) -> list[int]:
    """The batch sizes to time, sorted: the given ones, or the ladder up to the max."""
    limit = task.num_train if max_batch_size is None else check_batch_size(max_batch_size)
    if limit > task.num_train:
        warnings.append(f"capped at the training set size ({task.num_train} examples)")
        limit = task.num_train
    if batch_sizes is None:
        return geometric_ladder(limit, start=min(2, limit))
    sizes = sorted({check_batch_size(b, what="batch size") for b in batch_sizes})
    if sizes[-1] > task.num_train:
        raise ConfigError(
            f"batch sizes: expected at most the training set size ({task.num_train}), "
            f"got {sizes[-1]}; drop the larger sizes",
            param="batch_sizes",
        )
    return sizes


def timing_contention(points: Sequence[ThroughputPoint]) -> str | None:
    """Why the ladder's timings look contended (other processes on the device), or None.

    Two signs: one size's fastest window runs over `CONTENTION_WINDOW_RATIO` times the
    samples/s of its slowest (a ratio, not the spread over the median, which a few very
    slow windows barely move), or a larger batch running at under 1/`CONTENTION_SLOWDOWN` of the smallest
    batch's samples/s (a real device gets no slower per sample as B grows, short of
    swapping). Step times under contention say nothing about the device.
    """
    if not points:
        return None
    ladder = sorted(points, key=lambda p: p.batch_size)

    def window_ratio(p: ThroughputPoint) -> float:
        return p.samples_per_s_high / p.samples_per_s_low if p.samples_per_s_low > 0 else 1.0

    noisiest = max(ladder, key=window_ratio)
    if window_ratio(noisiest) > CONTENTION_WINDOW_RATIO:
        return (
            f"at B={noisiest.batch_size} the fastest timed window ran "
            f"{window_ratio(noisiest):.0f}x the samples/s of the slowest"
        )
    slowest = min(ladder, key=lambda p: p.samples_per_s)
    if slowest.samples_per_s * CONTENTION_SLOWDOWN < ladder[0].samples_per_s:
        ratio = ladder[0].samples_per_s / slowest.samples_per_s
        return (
            f"B={slowest.batch_size} ran {ratio:.0f}x fewer samples/s than B={ladder[0].batch_size}"
        )
    return None


def _noise_warning(points: Sequence[ThroughputPoint], dev: torch.device) -> str | None:
    """A warning when the noisiest point's windows spread over more than `NOISY_SPREAD`."""
    noisiest = max(points, key=lambda p: p.spread)
    if noisiest.spread <= NOISY_SPREAD:
        return None
    hint = ""
    if dev.type == "cpu" and torch.get_num_threads() > 1:
        hint = f" (with {torch.get_num_threads()} threads on a busy CPU, OMP_NUM_THREADS=1 helps)"
    return (
        f"timing is noisy: at B={noisiest.batch_size} the windows range over "
        f"{noisiest.spread:.0%} of the median; other processes are competing for the "
        f"device{hint}"
    )


@dataclass(frozen=True)
class _Schedule:
    """How to spend the time budget: windows per size, their length, and what to time."""

    windows: int
    window_seconds: float
    time_budget: float
    knee_fraction: float
    check_alignment: bool


def _time_fresh_model(
    task: Task,
    dev: torch.device,
    sizes: list[int],
    schedule: _Schedule,
    *,
    amp: bool,
    seed: int,
    progress: ProgressFn | None,
    warnings: list[str],
) -> tuple[tuple[ThroughputPoint, ...], list[AlignmentFinding], int]:
    """Build the task's model on `dev` and time it; everything it touches is put back."""
    step = build_step(task, dev, lr=task.lr, micro_batch_size=1, amp=amp)
    model, optimizer, scaler = step.model, step.optimizer, step.scaler
    order = torch.randperm(task.num_train, generator=torch.Generator().manual_seed(seed))
    timer = TrainStepTimer(step, order)
    with preserve_training_state(model, optimizer, scaler):
        points, findings = _time_sizes(timer, sizes, schedule, progress, warnings)
    return points, findings, timer.steps


def _time_sizes(
    timer: StepTimer,
    sizes: list[int],
    schedule: _Schedule,
    progress: ProgressFn | None,
    warnings: list[str],
) -> tuple[tuple[ThroughputPoint, ...], list[AlignmentFinding]]:
    """Time the ladder (interleaved windows), then alignment around the knee."""
    s = schedule
    per_window = warm_up(timer, sizes, s.windows, s.window_seconds, s.time_budget, warnings)
    total = s.windows * len(per_window)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress("throughput", done[0], total)

    start = timer.clock()
    share = len(per_window) / (len(per_window) + (ALIGNMENT_SIZES if s.check_alignment else 0))
    rounds = interleaved_rounds(
        timer, per_window, s.windows, s.window_seconds, start + share * s.time_budget, tick
    )
    points = tuple(
        summarize_windows(b, [r[b] for r in rounds], per_window[b]) for b in sorted(per_window)
    )
    findings: list[AlignmentFinding] = []
    if s.check_alignment and timer.clock() > start + s.time_budget:
        warnings.append("alignment not checked: timing the ladder used up the time budget")
    elif s.check_alignment:
        knee = find_knee(
            [p.batch_size for p in points], [p.samples_per_s for p in points], s.knee_fraction
        )
        findings = _time_alignment(
            timer, knee, points[-1].batch_size, s.windows, s.window_seconds, start + s.time_budget
        )
    return points, findings


def _time_alignment(
    timer: StepTimer,
    knee: int,
    max_batch_size: int,
    windows: int,
    window_seconds: float,
    deadline: float,
) -> list[AlignmentFinding]:
    candidates = alignment_candidates(knee, max_batch_size)
    if not candidates:
        return []
    sizes = sorted({b for _, a, nb in candidates for b in (a, *nb)})
    per_window = {}
    for b in sizes:  # warm-up, then size the windows
        timer.run(b, 1)
        per_window[b] = max(1, round(window_seconds / max(timer.run(b, 1), 1e-9)))
    rounds = interleaved_rounds(timer, per_window, windows, window_seconds, deadline)
    return [judge_alignment(rule, a, nb, rounds) for rule, a, nb in candidates]
