"""The built-in tasks by name, and `load_task`: a built-in name or `file.py:function`.

Kept apart from the `Task` contract (`batchlab.task`), which the built-in tasks import.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchlab.errors import BatchlabError, TaskError
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


def load_task(spec: str | Task) -> Task:
    """Resolve a built-in task name or `path/to/file.py:function` to a `Task`."""
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str):
        raise TaskError(
            f"expected `task` to be a batchlab.Task, a built-in name or path/to/file.py:function, "
            f"got {type(spec).__name__}",
            param="task",
        )
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec].factory()
    path_part, sep, func_name = spec.rpartition(":")
    if not sep or not path_part.endswith(".py"):
        names = ", ".join(BUILTIN_TASKS)
        raise TaskError(
            f"unknown task {spec!r}: expected a built-in name ({names}) or path/to/file.py:function"
        )
    return _load_task_file(Path(path_part), func_name)


def _load_task_file(path: Path, func_name: str) -> Task:
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist; check the path before ':'")
    module_name = f"batchlab_user_task_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # The user's file may import siblings next to it.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise TaskError(f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.pop(0)
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        available = sorted(
            n
            for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module_name and not n.startswith("_")
        )
        raise TaskError(
            f"{str(path)!r} has no function {func_name!r}; "
            f"functions defined there: {', '.join(available) or 'none'}"
        )
    try:
        task = func()
    except BatchlabError:
        raise
    except Exception as exc:
        raise TaskError(
            f"the task function {path}:{func_name}() raised {type(exc).__name__}: {exc}; "
            "fix it in the task file"
        ) from exc
    if not isinstance(task, Task):
        raise TaskError(
            f"{path}:{func_name}() returned {type(task).__name__}, expected a batchlab.Task; "
            "return Task(name=..., model=..., ...)"
        )
    return task
