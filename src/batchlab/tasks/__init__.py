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
        BuiltinTask("mnist1d-cnn", mnist1d_cnn, "MNIST-1D, 3-layer 1-D CNN (paper baseline ~94%)"),
        BuiltinTask("mnist1d-mlp", mnist1d_mlp, "MNIST-1D, 2-hidden-layer MLP (paper baseline ~68%)"),
        BuiltinTask("digits-mlp", digits_mlp, "sklearn 8x8 digits, MLP with SGD + momentum"),
        BuiltinTask("charlm", charlm, "character-level transformer on Python stdlib source"),
        BuiltinTask("dots", dots, "synthetic red-vs-blue 2-D points (two spirals), small MLP"),
    )
}

DEFAULT_TASK = "mnist1d-cnn"

__all__ = ["BUILTIN_TASKS", "DEFAULT_TASK", "BuiltinTask"]
