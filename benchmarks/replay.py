"""Step times for benchmarks, timed side by side: every configuration in one interleaved pass.

Wall-clock times of runs made one after the other on a shared machine drift with its load.
Timing every step configuration in rounds (A B C A B C ..., median over rounds) makes the
ratios between them fair; a run's time is then the sum of its steps' medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import torch

import batchlab
from batchlab.data import Batcher
from batchlab.step import TrainStep

Config = tuple[int, int]  # (micro-batch size, micro-batches per optimizer step)


def time_step_configs(
    task: batchlab.Task, configs: Iterable[Config], *, rounds: int = 7, reps: int = 3
) -> dict[Config, float]:
    """Median seconds of one optimizer step per configuration, all timed interleaved."""
    configs = sorted(set(configs))
    model = task.model()
    optimizer = task.optimizer(model.parameters(), task.lr)
    batcher = Batcher(task.train_data, torch.device("cpu"), task.collate_fn)
    step = TrainStep(model, optimizer, task.loss, batcher, micro_batch_size=1, device="cpu")
    g = torch.Generator().manual_seed(0)
    times: dict[Config, list[float]] = {c: [] for c in configs}
    for r in range(rounds + 1):  # round 0 is warm-up
        for micro, count in configs:
            step.micro_batch_size = micro
            idx = torch.randperm(task.num_train, generator=g)[: micro * count]
            t0 = time.perf_counter()
            for _ in range(reps):
                step(idx)
            if r:
                times[(micro, count)].append((time.perf_counter() - t0) / reps)
    return {c: statistics.median(v) for c, v in times.items()}
