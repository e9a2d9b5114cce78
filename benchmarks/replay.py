"""Step times for benchmarks, timed side by side: every configuration in one interleaved pass.

Wall-clock times of runs made one after the other on a shared machine drift with its load.
Timing every step configuration in rounds (A B C A B C ..., fastest round) makes the
ratios between them fair; a run's time is then the sum of its steps' times.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch

import batchlab
from batchlab.data import Batcher
from batchlab.step import TrainStep

Config = tuple[int, int]  # (micro-batch size, micro-batches per optimizer step)


def step_configs(h: batchlab.History) -> list[Config]:
    """(micro-batch size, micro-batches) of each step of a run, up to its target: a fixed
    run's one configuration, an adaptive run's from its decisions (with the engine's split
    noise steps), a scheduled run's from the phase each step ran in."""
    end = h.steps_to_target or h.total_steps
    if "schedule" in h.extras:
        log = h.extras["schedule"]
        starts = [(p["step"], log["phases"][p["phase"]]) for p in log["phases_run"]]
        out = []
        for step in range(1, end + 1):
            phase = [ph for s, ph in starts if s <= step][-1]
            out.append((phase["micro_batch_size"], phase["accumulation_steps"]))
        return out
    if "adaptive" not in h.extras:
        return [(h.effective_batch_size, 1)] * end
    log = h.extras["adaptive"]
    by_step = {d["step"]: d for d in log["decisions"]}
    current = log["decisions"][0]
    out = []
    for step, size in zip(h.steps[:end], log["batch_sizes"][:end], strict=True):
        current = by_step.get(step - 1, current)
        micro, accum = current["micro_batch_size"], current["accumulation_steps"]
        if accum == 1 and step % 4 == 0 and size >= 4:  # the engine's split step (noise)
            out.append(((size + 1) // 2, 2))
        else:
            out.append((min(micro, size), -(-size // micro)))
    return out


def replay_step_times(
    task: batchlab.Task, rows: Mapping[str, list[batchlab.History]]
) -> dict[Config, float]:
    """Seconds of one optimizer step per configuration any run used, timed interleaved."""
    return time_step_configs(
        task, {c for runs in rows.values() for h in runs for c in step_configs(h)}
    )


def replayed_seconds(h: batchlab.History, step_times: Mapping[Config, float]) -> float | None:
    """A run's training time to its target, summed from the replayed step times."""
    if not h.reached_target:
        return None
    return sum(step_times[c] for c in step_configs(h))


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
