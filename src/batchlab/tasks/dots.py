"""The classic red-vs-blue points: two interleaved spirals in 2-D. The only synthetic task."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchlab.task import Task
from batchlab.tasks.common import adam

DATA_SEED = 1234


def make_spirals(n: int, *, noise: float = 0.15, seed: int = DATA_SEED):
    """`n` points, half on each of two spirals; labels are 0 (red) and 1 (blue)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % 2
    radius = torch.rand(n, generator=g) * 1.0 + 0.05
    angle = radius * 3 * math.pi + label * math.pi
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    points = points + noise * 0.3 * torch.randn(n, 2, generator=g)
    return points, label.float()


@functools.lru_cache(maxsize=1)
def dots_tensors():
    x, y = make_spirals(2500)
    return x[:2000], y[:2000], x[2000:], y[2000:]


def _dots_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def bce_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def binary_accuracy(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"acc": ((model(x).squeeze(-1) > 0).float() == y).float().mean()}


def dots() -> Task:
    x, y, x_val, y_val = dots_tensors()
    return Task(
        name="dots",
        model=_dots_model,
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x_val, y_val),
        loss=bce_loss,
        metrics=binary_accuracy,
        optimizer=adam,
        lr=1e-2,
        batch_size=32,
        epochs=40,
        description="two spirals, 2-64-64-1 tanh MLP, Adam",
    )
