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
from batchlab.errors import TaskCodeError, TaskError

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
        if not isinstance(self.name, str) or not self.name:
            raise TaskError(f"expected `name` to be a non-empty string, got {self.name!r}")
        for attr in ("model", "loss", "optimizer"):
            if not callable(getattr(self, attr)):
                raise TaskError(
                    f"task {self.name!r}: expected `{attr}` to be callable, "
                    f"got {type(getattr(self, attr)).__name__}"
                )
        for attr in ("metrics", "collate_fn"):
            value = getattr(self, attr)
            if value is not None and not callable(value):
                raise TaskError(
                    f"task {self.name!r}: expected `{attr}` to be callable or None, "
                    f"got {type(value).__name__}"
                )
        check_batch_size(self.batch_size, what=f"task {self.name!r} reference batch_size")
        check_lr(self.lr, what=f"task {self.name!r} reference lr")
        if self.epochs is not None:
            check_batch_size(self.epochs, what=f"task {self.name!r} reference epochs")
        _check_dataset(self.name, "train_data", self.train_data)
        if self.val_data is not None:
            _check_dataset(self.name, "val_data", self.val_data)
        if len(self.train_data) == 0:
            raise TaskError(
                f"task {self.name!r}: train_data is empty; give it at least one example"
            )
        # The user's functions, checked for what they return (see `_Checked`).
        for attr, expected in _RETURNS.items():
            value = getattr(self, attr)
            if value is not None and not isinstance(value, _Checked):
                object.__setattr__(self, attr, _Checked(value, self.name, attr, expected))

    @property
    def num_train(self) -> int:
        return len(self.train_data)

    @property
    def num_val(self) -> int:
        return 0 if self.val_data is None else len(self.val_data)


def _check_dataset(task_name: str, attr: str, data: object) -> None:
    """A map-style dataset: `len(data)` and `data[i]`, as the batcher indexes it."""
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TaskError(
            f"task {task_name!r}: expected `{attr}` to be a map-style dataset with __len__ "
            f"and __getitem__ (e.g. a TensorDataset), got {type(data).__name__}"
        )
    try:
        len(data)  # type: ignore[arg-type]
    except Exception as exc:
        raise TaskError(
            f"task {task_name!r}: len(`{attr}`) raised {type(exc).__name__}: {exc}"
        ) from exc


# What each user function must return: (type, how to say it).
_RETURNS: dict[str, tuple[type, str]] = {
    "model": (nn.Module, "a torch.nn.Module (a fresh model)"),
    "optimizer": (torch.optim.Optimizer, "a torch.optim.Optimizer"),
    "metrics": (Mapping, "a dict {name: batch mean}"),
}


class _Checked:
    """One of the task's own functions, with a check of what it returns.

    A model factory that returns a string, or metrics that return a list, would otherwise
    fail deep inside batchlab with an AttributeError that names neither. The check costs
    one isinstance per call. Exceptions the function raises pass through unchanged (the
    probes tell an OOM from other errors by their type). Picklable when the function is,
    so sweep workers get it.
    """

    def __init__(self, fn: Callable, task_name: str, role: str, expected: tuple[type, str]):
        self.fn, self.task_name, self.role, self.expected = fn, task_name, role, expected

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.fn(*args, **kwargs)
        if not isinstance(result, self.expected[0]):
            name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
            raise TaskCodeError(
                f"task {self.task_name!r}: its `{self.role}` function {name} returned "
                f"{type(result).__name__}, expected {self.expected[1]}; fix it in the task code"
            )
        return result

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Checked):
            other = other.fn
        return self.fn == other

    def __hash__(self) -> int:
        return hash(self.fn)

    def __repr__(self) -> str:
        return repr(self.fn)

    @property
    def __wrapped__(self) -> Callable:
        return self.fn
