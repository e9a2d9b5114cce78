"""Shared test fixtures: small tasks that train in well under a second."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchlab
from batchlab.tasks.common import accuracy, cross_entropy_loss

torch.set_num_threads(1)  # tests run beside each other on 2 cores; keep them predictable


def tiny_task(n: int = 64, *, name: str = "tiny", optimizer=None, lr: float = 0.1) -> batchlab.Task:
    """A 4-feature, 3-class linear-ish problem: no batch-dependent layers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    return batchlab.Task(
        name=name,
        model=model,
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x[: n // 2], y[: n // 2]),
        loss=cross_entropy_loss,
        metrics=accuracy,
        optimizer=optimizer or (lambda params, lr: torch.optim.SGD(params, lr=lr)),
        lr=lr,
        batch_size=8,
        epochs=2,
    )


@pytest.fixture
def task() -> batchlab.Task:
    return tiny_task()


def free_port() -> int:
    """A free TCP port on localhost for a spawned DDP test's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ddp_worker(rank: int, world: int, port: int, timeout_s: float | None = None) -> None:
    """Join a spawned DDP test worker to a gloo group on localhost, one torch thread.

    timeout_s: for the collectives, so that ranks that disagree fail instead of hanging
    (default: torch's)."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world, **extra)
    torch.set_num_threads(1)


def end_ddp_worker() -> None:
    """Leave a spawned DDP test worker: free DDP (its reducer holds gloo work), leave the
    group at a barrier, then exit at once. An interpreter teardown that destroys a joinable
    C++ thread aborts the rank ("terminate called without an active exception", SIGABRT),
    which fails the test after everything it checks has passed (seen in CI)."""
    import gc

    from batchlab.measure.distributed import shutdown

    gc.collect()
    shutdown()
    os._exit(0)


def quiet_trainer(callbacks: list, epochs: int, **kwargs):
    """A one-CPU Lightning Trainer that logs, checkpoints and prints nothing."""
    import lightning.pytorch as pl

    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )
