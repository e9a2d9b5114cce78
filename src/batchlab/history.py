"""`History`: the complete, JSON-round-trippable record of one training run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchlab.results import JsonResult


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
