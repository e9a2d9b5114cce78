"""Built-in tasks (real data, no download, deterministic) and `load_task`."""

from batchlab.tasks.registry import BUILTIN_TASKS, DEFAULT_TASK, BuiltinTask, load_task

__all__ = ["BUILTIN_TASKS", "DEFAULT_TASK", "BuiltinTask", "load_task"]
