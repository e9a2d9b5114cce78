"""What a training run shows the code hooked into it: `RunState`, `TrainCallback`, `evaluate`.

A leaf of the training layer: the loop, the recorder, the noise tracker and every callback
import these, and this module imports nothing that trains, so none of them has to import
the loop (see docs/architecture.md for the layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from batchlab.data import Batcher
from batchlab.history import Evaluation
from batchlab.step import TrainStep, autocast_context, check_scalar_loss
from batchlab.task import Task

# Evaluation runs under no_grad, so it can afford a batch far above any training batch.
EVAL_BATCH_SIZE = 1024


@dataclass
class RunState:
    """What callbacks see while a run is under way."""

    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: TrainStep
    device: torch.device
    total_steps: int
    steps_per_epoch: int
    effective_batch_size: int
    step: int = 0
    examples: int = 0
    last_loss: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class TrainCallback:
    """Hooks into a training run. Override what you need; each default does nothing.

    The order in which the loop calls them is written down in `batchlab.loop`.
    Library callbacks must not print; put what they measure into `state.extras`, which
    ends up in `History.extras`.
    """

    def on_start(self, state: RunState) -> None: ...

    def on_step(self, state: RunState) -> None: ...

    def on_eval(self, state: RunState, evaluation: Evaluation) -> None: ...

    def on_end(self, state: RunState) -> None: ...


def evaluate(
    model: nn.Module,
    batcher: Batcher,
    task: Task,
    *,
    device: torch.device,
    amp: bool = False,
    batch_size: int = EVAL_BATCH_SIZE,
) -> tuple[float, dict[str, float]]:
    """Mean loss and metrics over a whole dataset, weighting each batch by its size."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    metric_sums: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad(), autocast_context(device, amp):
        for size, batch in batcher.sequential(batch_size):
            loss_sum += check_scalar_loss(task.loss(model, batch)).double() * size
            if task.metrics is not None:
                for name, value in task.metrics(model, batch).items():
                    value = torch.as_tensor(value, device=device, dtype=torch.float64)
                    metric_sums[name] = metric_sums.get(name, 0) + value * size
            count += size
    model.train(was_training)
    metrics = {name: float(total / count) for name, total in metric_sums.items()}
    return float(loss_sum / count), metrics
