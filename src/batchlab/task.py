"""The Task contract: everything batchlab needs to train and measure a model.

A task file is any Python file with a function that returns a `Task`; `batchlab.tasks`
holds the built-in tasks and `load_task`, which resolves a name or `path/to/file.py:function`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from batchlab.core.checks import check_batch_size, check_lr
from batchlab.errors import TaskError

Batch = Any
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
MetricsFn = Callable[[nn.Module, Batch], Mapping[str, float | torch.Tensor]]
OptimizerFactory = Callable[[Any, float], torch.optim.Optimizer]


@dataclass(frozen=True, kw_only=True)
class Task:
    """A training problem at a known-good reference setting.

    Attributes:
        name: short identifier shown in reports.
        model: zero-argument factory returning a fresh `nn.Module`.
        train_data: map-style dataset of training examples.
        val_data: optional map-style dataset for evaluation.
        loss: `loss(model, batch)` returning the scalar *mean* loss over the batch.
        optimizer: `optimizer(params, lr)` returning a torch optimizer.
        lr: the reference learning rate, known to work at `batch_size`.
        batch_size: the reference batch size.
        metrics: optional `metrics(model, batch) -> {name: batch mean}`, e.g. `{"acc": 0.93}`.
        collate_fn: optional collate function for datasets that are not tensor datasets.
        description: one line for `batchlab tasks`.
        epochs: the reference training length in epochs, if known.
    """

    name: str
    model: Callable[[], nn.Module]
    train_data: Dataset
    loss: LossFn
    optimizer: OptimizerFactory
    lr: float
    batch_size: int
    val_data: Dataset | None = None
    metrics: MetricsFn | None = None
    collate_fn: Callable[[list], Batch] | None = None
    description: str = ""
    epochs: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("model", "loss", "optimizer"):
            if not callable(getattr(self, attr)):
                raise TaskError(
                    f"task {self.name!r}: expected `{attr}` to be callable, "
                    f"got {type(getattr(self, attr)).__name__}"
                )
        check_batch_size(self.batch_size, what=f"task {self.name!r} reference batch_size")
        check_lr(self.lr, what=f"task {self.name!r} reference lr")
        if len(self.train_data) == 0:
            raise TaskError(
                f"task {self.name!r}: train_data is empty; give it at least one example"
            )

    @property
    def num_train(self) -> int:
        return len(self.train_data)

    @property
    def num_val(self) -> int:
        return 0 if self.val_data is None else len(self.val_data)
