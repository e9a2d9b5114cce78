"""Timing training steps honestly: warm-up, then interleaved windows under a time budget.

A `StepTimer` runs and times windows of steps; `TrainStepTimer` does it on a live
`TrainStep`, synchronizing on CUDA. Interleaving the windows of every batch size
(round 1: B=2, 4, 8 ...; round 2: ... B=4, 2) makes load from other processes hit every
size alike, so ratios between sizes stay meaningful on a shared machine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from batchlab.errors import ConfigError
from batchlab.measure.oom import is_oom_error
from batchlab.measure.state import release_memory
from batchlab.step import TrainStep

MIN_WINDOWS = 3  # rounds always timed, even past the time budget
# Several torch threads running a small fixed workload this many times slower than one
# thread means other processes hold the cores (`thread_slowdown`).
CONTENTION_SLOWDOWN = 4.0


class StepTimer(Protocol):
    """Times windows of training steps. `profile_throughput(timer=...)` takes any such object.

    The default, `TrainStepTimer`, runs the task's real `TrainStep`; a simulated device
    (in tests, or to replay a recorded profile) only has to answer these three.
    """

    steps: int  # training steps timed so far

    def run(self, batch_size: int, count: int) -> float:
        """Seconds for `count` steps at `batch_size`."""
        ...

    def clock(self) -> float:
        """The time now, in seconds: the time budget's deadlines are checked against it."""
        ...


class TrainStepTimer:
    """Runs timed windows of training steps on one live TrainStep (synchronized on CUDA)."""

    def __init__(self, step: TrainStep, order: torch.Tensor) -> None:
        self.step = step
        self.order = order
        self.steps = 0

    def clock(self) -> float:
        return time.perf_counter()

    def run(self, batch_size: int, count: int) -> float:
        """Seconds for `count` steps at `batch_size`, synchronized on CUDA."""
        step, device = self.step, self.step.device
        step.micro_batch_size = batch_size
        indices = self.order[:batch_size]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = _step_clock(device)
        start = elapsed()
        for _ in range(count):
            step(indices)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.steps += count
        return elapsed() - start


def _step_clock(device: torch.device) -> Callable[[], float]:
    """What a window's seconds are read from: wall time, except on a CPU with one torch
    thread. There every kernel runs on this thread, so its CPU time is the steps' own work,
    and time spent waiting while other processes hold the cores is left out: at load 5 on
    2 cores, ladders timed this way repeat within 2% (benchmarks/replay.py)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def thread_slowdown(rounds: int = 5, ops: int = 20) -> float:
    """How many times slower a small fixed CPU workload runs with this process's torch
    threads than the same work takes one thread (its CPU time); 1.0 with one thread.

    On a quiet CPU several threads are never much slower than one. With other processes on
    the cores, every parallel region waits for a thread the scheduler has not run yet:
    on the 2-core VM at load 4, 20 128x128 matmuls took 330 ms with 2 threads and 0.9 ms
    with 1, and the task's steps were uniformly ~200x slower, so the ladder's windows
    agreed with each other and no spread showed it (benchmarks/results/plan_stability.md).
    Starvation comes and goes faster than one round: with two spinning processes and a
    plan on the 2 cores (load 6), 11 of 30 single rounds ran within 1.1x and 19 at
    69-1110x; with the two spinners alone, most rounds ran within 1.1x. So the answer is
    the second-highest ratio of `rounds` alternations: slow in at least two of five rounds
    is starvation, one stall on a quiet machine is not (the least of two rounds, the
    earlier rule, let a plan's noise phase run 75 s with starved threads). It is a
    snapshot: contention that starts later is not seen. Costs ~10 ms when quiet.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return 1.0
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))

    def run(count: int) -> None:
        for _ in range(count):
            torch.relu(torch.mm(x, x))

    ratios = []
    try:
        for _ in range(rounds):
            torch.set_num_threads(threads)
            run(2)  # wake the thread pool
            start = time.perf_counter()
            run(ops)
            several = time.perf_counter() - start
            torch.set_num_threads(1)
            run(2)
            start = time.thread_time()
            run(ops)
            one = max(time.thread_time() - start, 1e-9)
            ratios.append(several / one)
    finally:
        torch.set_num_threads(threads)
    return sorted(ratios)[-2] if len(ratios) > 1 else ratios[0]


def interleaved_rounds(
    timer: StepTimer,
    per_window: dict[int, int],
    windows: int,
    window_seconds: float,
    deadline: float,
    on_window: Callable[[], None] | None = None,
) -> list[dict[int, float]]:
    """Rounds of one timed window per size, alternating the order; samples/s per window.

    After each round every size's steps per window are re-sized from what the round
    measured (a single warm-up step is a poor guide on a busy machine), and once the
    `deadline` (a `timer.clock()` value) has passed, no new round starts after the
    first `MIN_WINDOWS`. `per_window` is updated in place.
    """
    sizes = sorted(per_window)
    rounds = []
    for r in range(windows):
        if r >= MIN_WINDOWS and timer.clock() > deadline:
            break
        rates = {}
        for b in sizes if r % 2 == 0 else reversed(sizes):
            count = per_window[b]
            seconds = timer.run(b, count)
            rates[b] = b * count / seconds
            per_window[b] = max(1, round(count * window_seconds / max(seconds, 1e-9)))
            if on_window is not None:
                on_window()
        rounds.append(rates)
    return rounds


def warm_up(
    timer: StepTimer,
    sizes: list[int],
    windows: int,
    window_seconds: float,
    time_budget: float,
    warnings: list[str],
) -> dict[int, int]:
    """Three warm-up steps per size (smallest first); returns steps per window for each size.

    Sizes whose timing would push the total past `time_budget` are dropped, as is any
    size that runs out of memory, and every size above it.
    """
    timer.run(sizes[0], 1)  # the first step creates the optimizer state
    per_window: dict[int, int] = {}
    planned = 0.0
    for i, b in enumerate(sizes):
        oom = False
        try:
            # the slower of a first step and the mean of two more: a pessimistic guide, so
            # the first round of windows cannot overrun the budget by much
            seconds = max(timer.run(b, 1), timer.run(b, 2) / 2)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            oom = True
        if oom:
            release_memory()
            warnings.append(f"B={b} ran out of memory; throughput measured up to B={sizes[i - 1]}")
            break
        count = max(1, round(window_seconds / max(seconds, 1e-9)))
        cost = windows * max(window_seconds, seconds)  # what its windows are meant to take
        if per_window and planned + cost > time_budget:
            warnings.append(
                f"throughput measured up to B={max(per_window)}: timing B={b} and above "
                f"would take more than the {time_budget:g}s budget"
            )
            break
        per_window[b] = count
        planned += cost
    if not per_window:
        raise ConfigError(f"B={sizes[0]} ran out of memory; pass a smaller batch size")
    return per_window


def threads_starved(slowdown: Callable[[], float] | None) -> str | None:
    """Why this process's torch threads look starved of cores (`slowdown()`, e.g.
    `thread_slowdown`, over `CONTENTION_SLOWDOWN`), or None; None without a `slowdown`."""
    ratio = slowdown() if slowdown is not None else 1.0
    if ratio > CONTENTION_SLOWDOWN:
        return f"a small fixed workload ran {ratio:.0f}x slower than with 1 thread"
    return None


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads; the caller's count comes back
    (on an exception too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def one_thread_when_starved(
    device: torch.device | str, notes: list[str], *, earlier: str | None = None
) -> Iterator[None]:
    """Run the block with one torch thread when this CPU's threads are starved
    (`threads_starved`), appending why to `notes`; otherwise leave the threads alone.

    `earlier`: why an earlier phase of the same job ran with one thread. Contention comes
    and goes within seconds, so once seen the later phases run with one thread without
    checking again: a check in a lucky moment let a plan's noise phase run 118 s with two
    starved threads (benchmarks/results/plan_stability.md).

    Training phases of a plan (the memory probe, the noise phase, the LR check) took
    72-272 s for mnist1d-cnn on the loaded 2-core VM with 2 threads, 15-19 s in quiet
    moments: each parallel region waits for a thread the scheduler has not run. With one
    thread the same steps run at about their quiet speed, and their numbers agree with the
    2-thread run's to ~1e-7 relative (summation order), not bit for bit."""
    dev = torch.device(device)
    starved = None
    if dev.type == "cpu" and torch.get_num_threads() > 1:
        starved = earlier or threads_starved(thread_slowdown)
    if starved is None:
        yield
        return
    notes.append(starved)
    with torch_threads(1):
        yield
