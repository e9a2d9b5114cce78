"""`History`: the complete, JSON-round-trippable record of one training run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.errors import ConfigError
from batchlab.results import JsonResult, read_json_object


@dataclass(frozen=True)
class Evaluation(JsonResult):
    """One evaluation on the validation set."""

    step: int  # optimizer steps done when it was taken
    examples: int  # training examples seen by then
    epoch: float
    train_seconds: float  # training wall-clock so far, evaluation time excluded
    val_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"acc": 0.93}


@dataclass(frozen=True)
class History(JsonResult):
    """What one `batchlab.train` run did, step by step.

    `seconds_to_target` counts training time only (evaluation excluded), up to the first
    evaluation that reached the target.
    """

    task: str
    batch_size: int  # micro-batch size
    accumulation_steps: int
    effective_batch_size: int  # examples per optimizer step
    lr: float  # peak learning rate, after the lr rule
    lr_rule: str
    warmup_steps: int
    seed: int
    device: str
    amp: bool
    num_train: int
    steps: tuple[int, ...]  # optimizer step of each train_loss entry (1-based)
    train_loss: tuple[float, ...]  # mean loss of that step's batch
    lrs: tuple[float, ...]  # learning rate used at that step
    evals: tuple[Evaluation, ...]
    total_steps: int
    total_examples: int
    epochs: float
    train_seconds: float
    eval_seconds: float
    target: str | None = None
    steps_to_target: int | None = None
    examples_to_target: int | None = None
    seconds_to_target: float | None = None
    diverged: bool = False
    diverged_step: int | None = None
    final: dict[str, float] = field(default_factory=dict)
    # Extra per-run measurements added by other parts (noise scale, distance from init...).
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def reached_target(self) -> bool:
        return self.steps_to_target is not None

    @property
    def best_val_loss(self) -> float | None:
        losses = [e.val_loss for e in self.evals if e.val_loss is not None]
        return min(losses) if losses else None

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / self.epochs if self.epochs else float("nan")

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a History saved by `History.save` (`batchlab train --json` writes one).

        A missing, empty, cut-off or foreign file (a plan, a probe result) gets one
        ConfigError naming the file and what is wrong, not a KeyError from deep inside.
        """
        fix = "pass the JSON `batchlab train --json PATH` wrote (or `History.save`)"
        data = read_json_object(path, "history file", fix)
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ConfigError(
                f"history file {str(path)!r} is not a training history: it lacks {shown}; {fix}"
            )
        try:
            history = cls.from_dict(data)
            bad = [
                name
                for name in ("batch_size", "total_steps", "effective_batch_size")
                if isinstance(getattr(history, name), bool)
                or not isinstance(getattr(history, name), int)
            ]
            if bad or not all(isinstance(e, Evaluation) for e in history.evals):
                raise TypeError(f"wrong type of {', '.join(bad) or 'evals'}")
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"history file {str(path)!r} does not match the History schema ({exc}); {fix}"
            ) from None
        return history
