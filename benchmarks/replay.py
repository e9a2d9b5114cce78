"""Step times for benchmarks, timed side by side: every configuration in one interleaved pass.

Wall-clock times of runs made one after the other on a shared machine drift with its load.
Timing every step configuration in rounds (A B C A B C ..., fastest round) makes the
ratios between them fair; a run's time is then the sum of its steps' times.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

import batchlab
from batchlab.data import Batcher
from batchlab.step import TrainStep

Config = tuple[int, int]  # (micro-batch size, micro-batches per optimizer step)


def time_step_configs(
    task: batchlab.Task,
    configs: Iterable[Config],
    *,
    rounds: int = 15,
    min_seconds: float = 0.02,
) -> dict[Config, float]:
    """Seconds of one optimizer step per configuration, all timed interleaved.

    Round 0 is warm-up and sets how many steps each sample repeats, so that a sample lasts
    at least `min_seconds`: a sub-millisecond step timed alone is mostly timer and
    scheduler noise on a shared machine. Each configuration's time is its fastest round
    (`timeit`'s rule): other work on the cores only ever slows a round down, so the median
    still drifts with the load while the minimum does not.

    With one torch thread every kernel runs on this thread, so its CPU time
    (`time.thread_time`) is the step's own work: time spent waiting for a core that other
    processes hold is not counted. With more threads it falls back to wall time.
    """
    configs = sorted(set(configs))
    with torch.random.fork_rng():  # the caller's RNG stays where it was
        model = task.model()
    optimizer = task.optimizer(model.parameters(), task.lr)
    batcher = Batcher(task.train_data, torch.device("cpu"), task.collate_fn)
    step = TrainStep(model, optimizer, task.loss, batcher, micro_batch_size=1, device="cpu")
    g = torch.Generator().manual_seed(0)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    reps = dict.fromkeys(configs, 1)
    times: dict[Config, list[float]] = {c: [] for c in configs}
    for r in range(rounds + 1):
        for config in configs:
            micro, count = config
            step.micro_batch_size = micro
            idx = torch.randperm(task.num_train, generator=g)[: micro * count]
            t0 = clock()
            for _ in range(reps[config]):
                step(idx)
            seconds = (clock() - t0) / reps[config]
            if r:
                times[config].append(seconds)
            else:
                reps[config] = max(1, round(min_seconds / max(seconds, 1e-6)))
    return {c: min(v) for c, v in times.items()}
