"""The built-in MNIST-1D tasks from a folklore reference batch B0 = 32 (issue 11, item 3).

Used by benchmarks/results/plan_trajectory.md:
    batchlab plan benchmarks/plan_trajectory_tasks.py:mnist1d_mlp_b32 --target 'val_acc>=0.65'
"""

from __future__ import annotations

import dataclasses

from batchlab.task import Task
from batchlab.tasks import load_task


def mnist1d_mlp_b32() -> Task:
    return dataclasses.replace(load_task("mnist1d-mlp"), batch_size=32)


def mnist1d_cnn_b32() -> Task:
    return dataclasses.replace(load_task("mnist1d-cnn"), batch_size=32)
