"""sklearn's bundled 8x8 handwritten digits (1797 images), with a fixed 80/20 split."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchlab.task import Task
from batchlab.tasks.common import accuracy, cross_entropy_loss, sgd_momentum

SPLIT_SEED = 0  # the split is fixed: the same examples are held out on every machine


@functools.lru_cache(maxsize=1)
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.as_tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(0.8 * len(x))
    train, val = order[:n_train], order[n_train:]
    return x[train], y[train], x[val], y[val]


def _digits_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def digits_mlp() -> Task:
    x, y, x_val, y_val = digits_tensors()
    return Task(
        name="digits-mlp",
        model=_digits_model,
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x_val, y_val),
        loss=cross_entropy_loss,
        metrics=accuracy,
        optimizer=sgd_momentum,
        lr=0.05,
        batch_size=32,
        epochs=30,
        description="sklearn digits 8x8, MLP 64-128-10, SGD momentum 0.9",
    )
