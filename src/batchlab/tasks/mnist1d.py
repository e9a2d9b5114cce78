"""MNIST-1D (Greydanus & Kaplan 2020), generated offline: 4000 train / 1000 test, length 40.

Reference settings follow the paper's baselines: Adam, lr 1e-2, batch 100, 8000 steps
(200 epochs). The paper reports ~68% test accuracy for the MLP and ~94% for the CNN.
"""

from __future__ import annotations

import contextlib
import functools
import io

import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchlab.task import Task
from batchlab.tasks.common import accuracy, adam, cross_entropy_loss


@functools.lru_cache(maxsize=1)
def mnist1d_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The standard MNIST-1D split, generated (never downloaded) with the paper's seed."""
    from mnist1d.data import get_dataset_args, make_dataset

    with contextlib.redirect_stdout(io.StringIO()):  # mnist1d prints progress
        data = make_dataset(get_dataset_args())
    x = torch.as_tensor(data["x"], dtype=torch.float32)
    y = torch.as_tensor(data["y"], dtype=torch.long)
    x_test = torch.as_tensor(data["x_test"], dtype=torch.float32)
    y_test = torch.as_tensor(data["y_test"], dtype=torch.long)
    return x, y, x_test, y_test


class MLP(nn.Module):
    def __init__(self, input_size: int = 40, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """The paper's ConvBase: three stride-2 convolutions (25 channels) and a linear head."""

    def __init__(self, channels: int = 25, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, classes)  # length 40 -> 19 -> 10 -> 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.shape[0], 1, x.shape[-1])
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


def _mnist1d_task(name: str, model, description: str) -> Task:
    x, y, x_test, y_test = mnist1d_tensors()
    return Task(
        name=name,
        model=model,
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x_test, y_test),
        loss=cross_entropy_loss,
        metrics=accuracy,
        optimizer=adam,
        lr=1e-2,
        batch_size=100,
        epochs=200,
        description=description,
    )


def mnist1d_mlp() -> Task:
    return _mnist1d_task("mnist1d-mlp", MLP, "MNIST-1D, MLP 40-256-256-10, Adam")


def mnist1d_cnn() -> Task:
    return _mnist1d_task("mnist1d-cnn", CNN, "MNIST-1D, 3-layer 1-D CNN, Adam")
