"""Built-in tasks: real data, no download, deterministic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from batchlab.task import Task
from batchlab.tasks.charlm import charlm
from batchlab.tasks.digits import digits_mlp
from batchlab.tasks.dots import dots
from batchlab.tasks.mnist1d import mnist1d_cnn, mnist1d_mlp


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    factory: Callable[[], Task]
    summary: str


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        BuiltinTask("mnist1d-cnn", mnist1d_cnn, "MNIST-1D, 1-D CNN (paper: ~94%)"),
        BuiltinTask("mnist1d-mlp", mnist1d_mlp, "MNIST-1D, MLP (paper: ~68%)"),
        BuiltinTask("digits-mlp", digits_mlp, "sklearn 8x8 digits, MLP"),
        BuiltinTask("charlm", charlm, "char transformer, stdlib source"),
        BuiltinTask("dots", dots, "2-D red-vs-blue spirals"),
    )
}

DEFAULT_TASK = "mnist1d-cnn"

__all__ = ["BUILTIN_TASKS", "DEFAULT_TASK", "BuiltinTask"]
