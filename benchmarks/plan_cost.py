"""Plan cost vs one full reference training of the same task (goal: <= 5%).

Both are measured in this one run on this machine: `batchlab.plan(task)` wall time (and the
training steps it spent), then `batchlab.train(task, B0)` for the task's reference epochs.

    .venv/bin/python benchmarks/plan_cost.py [--tasks mnist1d-cnn,mnist1d-mlp]
"""

from __future__ import annotations

import argparse
import time

import torch

import batchlab
from batchlab.planner import plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist1d-cnn,mnist1d-mlp,digits-mlp")
    parser.add_argument("--memory-budget", default=None)
    args = parser.parse_args()
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(
        f"{'task':<12} {'plan s':>7} {'plan steps':>10} {'train s':>8} {'train steps':>11} "
        f"{'time ratio':>10} {'step ratio':>10}"
    )
    for name in args.tasks.split(","):
        task = batchlab.load_task(name)
        t0 = time.perf_counter()
        p = plan(task, memory_budget=args.memory_budget)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        history = batchlab.train(task, task.batch_size)
        train_s = time.perf_counter() - t0
        print(
            f"{name:<12} {plan_s:>7.1f} {p.plan_steps:>10} {train_s:>8.1f} "
            f"{history.total_steps:>11} {plan_s / train_s:>10.1%} "
            f"{p.plan_steps / history.total_steps:>10.1%}"
        )


if __name__ == "__main__":
    main()
