"""Peak CPU memory of a piece of code, by replaying the profiler's allocation events.

RSS deltas are too noisy for this; the replay is exact and linear in batch size.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch


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
