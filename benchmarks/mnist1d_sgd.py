"""MNIST-1D tasks with SGD + momentum 0.9 from a small "folklore" reference (B0=32).

Used by `benchmarks/results/lr_check.md`: the LR the linear rule gives at B=2048 from
(B0=32, lr0=0.02) is 1.28, past where SGD+momentum is stable on MNIST-1D (DESIGN.md: the
best LR grows linearly to B~256 and then stays at 0.16-0.32). Load as a task file:
`benchmarks/mnist1d_sgd.py:mnist1d_mlp_sgd`.
"""

from __future__ import annotations

import dataclasses

from batchlab.task import Task
from batchlab.tasks.common import sgd_momentum
from batchlab.tasks.mnist1d import mnist1d_cnn, mnist1d_mlp

REFERENCE_BATCH = 32
REFERENCE_LR = 0.02


def _sgd(task: Task, name: str) -> Task:
    return dataclasses.replace(
        task,
        name=name,
        optimizer=sgd_momentum,
        lr=REFERENCE_LR,
        batch_size=REFERENCE_BATCH,
        description=task.description.replace("Adam", "SGD momentum 0.9, B0=32"),
    )


def mnist1d_mlp_sgd() -> Task:
    return _sgd(mnist1d_mlp(), "mnist1d-mlp-sgd")


def mnist1d_cnn_sgd() -> Task:
    return _sgd(mnist1d_cnn(), "mnist1d-cnn-sgd")
