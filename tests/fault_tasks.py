"""Test-only tasks that break the process running them, for the sweep fault tests.

Loaded by path (`tests/fault_tasks.py:killer`) so that spawned sweep workers can load them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import batchlab

DEADLY_BATCH = 24  # a training step at this batch size kills its own worker process


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _deadly_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    in_worker = multiprocessing.parent_process() is not None  # never the test process
    if in_worker and model.training and x.shape[0] == DEADLY_BATCH:
        if os.environ.get("BATCHLAB_TEST_DEATH") == "exit":
            os._exit(137)  # what a shell reports for a SIGKILLed child
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return F.cross_entropy(model(x), y)


def killer() -> batchlab.Task:
    """96 examples, 4 features, 3 classes; training at batch 24 kills the worker."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return batchlab.Task(
        name="killer",
        model=_model,
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x[:48], y[:48]),
        loss=_deadly_loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.1,
        batch_size=8,
        epochs=1,
    )
