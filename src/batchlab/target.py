"""Training targets such as `val_loss<=0.45` or `val_acc>=0.9`."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from batchlab.errors import ConfigError

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_PATTERN = re.compile(r"^\s*val_([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Target:
    """Stop at the first evaluation where `val_<metric> <op> <value>` holds."""

    metric: str  # "loss" or a name from the task's metrics(), e.g. "acc"
    op: str
    value: float

    def __str__(self) -> str:
        return f"val_{self.metric}{self.op}{self.value:g}"

    def reached(self, val_loss: float | None, metrics: dict[str, float]) -> bool:
        current = val_loss if self.metric == "loss" else metrics.get(self.metric)
        return current is not None and _OPS[self.op](current, self.value)

    def check_available(self, metric_names: list[str]) -> None:
        available = ["val_loss"] + [f"val_{m}" for m in metric_names]
        if f"val_{self.metric}" not in available:
            raise ConfigError(
                f"target {self} names val_{self.metric}, which this task does not report; "
                f"available: {', '.join(available)}"
            )


def parse_target(text: str | Target | None) -> Target | None:
    if text is None or isinstance(text, Target):
        return text
    match = _PATTERN.match(text)
    if match is None:
        raise ConfigError(
            f"target: expected METRIC OP VALUE such as 'val_loss<=0.45' or 'val_acc>=0.9', "
            f"got {text!r}"
        )
    metric, op, raw = match.groups()
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"target: {raw!r} in {text!r} is not a number") from None
    return Target(metric=metric, op=op, value=value)


def target_for_task(
    text: str | Target | None, task: Any, *, check_metrics: bool = False
) -> Target | None:
    """Parse `text` for `task`: it needs validation data, and with `check_metrics` the
    task's metrics must include the target's (checked on two validation examples with a
    fresh model, leaving the RNG as it was), so a typo fails before any training."""
    target = parse_target(text)
    if target is None:
        return None
    if task.val_data is None:
        raise ConfigError(f"target {target} needs validation data, and task {task.name!r} has none")
    if check_metrics:
        import torch

        from batchlab.data import Batcher

        names: list[str] = []
        if task.metrics is not None:
            batcher = Batcher(task.val_data, torch.device("cpu"), task.collate_fn)
            _, batch = next(batcher.sequential(2))
            with torch.no_grad(), torch.random.fork_rng():
                names = list(task.metrics(task.model(), batch))
        target.check_available(names)
    return target
