"""What a training run shows its callbacks: `RunState` and the `TrainCallback` hooks.

A leaf below the training loop, so that callbacks (the noise tracker, the recorder) can
be written without importing the loop that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from batchlab.history import Evaluation
from batchlab.step import TrainStep
from batchlab.task import Task


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
    """Hooks into `train`. Override what you need; each default does nothing.

    Library callbacks must not print; put what they measure into `state.extras`, which
    ends up in `History.extras`.
    """

    def on_start(self, state: RunState) -> None: ...

    def on_step(self, state: RunState) -> None: ...

    def on_eval(self, state: RunState, evaluation: Evaluation) -> None: ...

    def on_end(self, state: RunState) -> None: ...
