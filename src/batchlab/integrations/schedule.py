"""A `BatchSchedule` in your own loop, Lightning or torchrun: the sampler that follows it.

`ScheduleSampler` is a `ResizableBatchSampler` that resizes itself between optimizer steps.
At the first micro-batch of each step it looks up the phase (`BatchSchedule.phase_index`
with the steps and examples done, as `batchlab.loop.ScheduledBatch` does) and cuts the
step's batch into micro-batches of the phase's size from the epoch's permutation. Deciding
where the indices are cut, not in a callback, is what makes a switch exact: Lightning
prefetches a batch (and a DataLoader with workers several) before the step that trains it,
so a size set in a callback arrives a batch or more late. Epochs stay exact as in the
plain sampler: a step never crosses an epoch's end (the epoch's last step is short), and
every example is seen once per epoch whatever the phases do.

    sampler = ScheduleSampler(train_set, "plan.json", seed=0)   # or a BatchSchedule
    for step in range(total_steps):
        setting, micro_batches = sampler.next_step()   # the phase, this step's index lists
        ...apply setting.lr, run the micro-batches, optimizer.step()

Under data parallelism (torch.distributed initialised, more than one process) rank 0
decides each step's phase and broadcasts it (`integrations.ddp.broadcast_from`), so ranks
can never disagree, even with different schedule files or counts; it is one small
collective per optimizer step. A phase's batch is global: each of W replicas trains
ceil(B / W) examples a step, in micro-batches of at most the phase's micro-batch size.

`align_accumulation` (set by the Lightning callback) is the frameworks' window rule:
Lightning (and the Hugging Face Trainer) close an accumulation window when the epoch's
micro-batch count is a multiple of the accumulation, so a phase with accumulation k
starts at the first step boundary where that count is a multiple of k (always at an
epoch's start, and at once when k is 1 or divides the current accumulation).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from batchlab.adaptive.sampler import ResizableBatchSampler
from batchlab.core.schedule import BatchSchedule, SchedulePhase
from batchlab.errors import ConfigError
from batchlab.integrations.ddp import broadcast_from
from batchlab.train import load_schedule


@dataclass(frozen=True)
class StepSetting:
    """What one optimizer step trains with on this replica."""

    step: int  # the optimizer step, counting from 1
    phase: int  # the phase's index in the schedule
    batch_size: int  # the phase's batch (all replicas together)
    micro_batch_size: int  # this replica's micro-batch
    accumulation_steps: int  # micro-batches a step on this replica (fewer at an epoch's end)
    lr: float


def as_schedule(schedule: BatchSchedule | str | Path) -> BatchSchedule:
    """A `BatchSchedule`, or the one in a JSON file (a schedule's or a plan's, read as
    `batchlab train --schedule` reads it)."""
    if isinstance(schedule, BatchSchedule):
        return schedule
    if isinstance(schedule, (str, Path)):
        return load_schedule(schedule)
    raise ConfigError(
        f"`schedule`: expected a BatchSchedule or the path of its JSON (or of a plan with one), "
        f"got {type(schedule).__name__}; make one with `batchlab plan TASK --json plan.json`",
        param="schedule",
    )


def replica_split(phase: SchedulePhase, num_replicas: int) -> tuple[int, int]:
    """(micro-batch, accumulation) of one replica's ceil(B / W) examples a step: the phase's
    own micro x accumulation on one replica."""
    local = math.ceil(phase.batch_size / num_replicas)
    micro = min(phase.micro_batch_size, local)
    return micro, math.ceil(local / micro)


def distributed() -> bool:
    """Whether torch.distributed runs more than one process (then rank 0 decides)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ScheduleSampler(ResizableBatchSampler):
    """Yields a schedule's micro-batches; resizes itself when a phase starts.

    Args:
        data_source: the dataset (or anything with `len`), or the number of examples.
        schedule: a `BatchSchedule`, or the path of its JSON or of a plan file with one.
        shuffle / seed / num_replicas / rank: as in `ResizableBatchSampler`.
        align_accumulation: start a phase only where the epoch's micro-batch count is a
            multiple of its accumulation (the Lightning callback sets it; see the module).
        sized: whether `len()` works (the Lightning callback makes it False).

    `phases_run` records where each phase began, as `History.extras["schedule"]` does:
    `{"phase", "step" (its first optimizer step), "examples" (seen before it)}`.
    """

    def __init__(
        self,
        data_source: Sized | int,
        schedule: BatchSchedule | str | Path,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        align_accumulation: bool = False,
        sized: bool = True,
    ) -> None:
        self.schedule = as_schedule(schedule)
        first = replica_split(self.schedule.phases[0], num_replicas)[0]
        super().__init__(
            data_source, first, shuffle=shuffle, seed=seed, num_replicas=num_replicas,
            rank=rank, sized=sized,
        )  # fmt: skip
        largest = max(p.batch_size for p in self.schedule.phases)
        if largest > self.num_examples:
            raise ConfigError(
                f"`schedule`: phase batch {largest} is larger than the training set "
                f"({self.num_examples} examples); use at most {self.num_examples}",
                param="schedule",
            )
        self.align_accumulation = align_accumulation
        self.steps = 0  # optimizer steps whose micro-batches are all handed out
        self.examples = 0  # examples in those steps (all replicas)
        self.setting: StepSetting | None = None  # the step being handed out, or the last
        self.phases_run: list[dict[str, int]] = []
        # what each handed-out micro-batch belongs to, oldest first (the Lightning callback
        # reads it as the batches reach training, however far ahead the loader fetched)
        self.handed_out: deque[tuple[StepSetting, bool]] = deque(maxlen=4096)
        self._left = 0  # examples this replica still takes in the open step (0: none open)
        self._step_examples = 0
        self._in_step = 0  # micro-batches handed out in the open step
        self._epoch_micro = 0  # micro-batches handed out in the current epoch
        self._counted_epoch = self.epoch

    def _decide(self) -> tuple[int, SchedulePhase]:
        """The phase of the next step, on rank 0; every other rank receives it."""
        current = -1 if self.setting is None else self.setting.phase
        index = self.schedule.phase_index(self.steps, self.examples)
        if index != current and current >= 0 and self.align_accumulation:
            k = replica_split(self.schedule.phases[index], self.num_replicas)[1]
            if self._epoch_micro % k:
                index = current  # the framework's window rule: wait for an aligned boundary
        choice = (index, self.schedule.phases[index])
        return broadcast_from(choice) if distributed() else choice

    def _open_step(self) -> None:
        index, phase = self._decide()
        micro, accumulation = replica_split(phase, self.num_replicas)
        if self.setting is None or index != self.setting.phase:
            self.phases_run.append(
                {"phase": index, "step": self.steps + 1, "examples": self.examples}
            )
        self.setting = StepSetting(
            self.steps + 1, index, phase.batch_size, micro, accumulation, phase.lr
        )
        self.batch_size = micro
        self._left = math.ceil(phase.batch_size / self.num_replicas)
        self._step_examples = 0
        self._in_step = 0

    def _close_step(self) -> None:
        self.steps += 1
        self.examples += self._step_examples
        self._left = 0

    def take(self, batch_size: int | None = None) -> list[int] | None:
        """This replica's next micro-batch, or None at the end of the epoch."""
        if batch_size is not None:
            raise ConfigError(
                f"expected no `batch_size` for a ScheduleSampler (its phases set it), got "
                f"{batch_size}; call take()",
                param="batch_size",
            )
        if self.epoch != self._counted_epoch:  # a new epoch (set_epoch): the step ends here
            if self._left:
                self._close_step()
            self._counted_epoch, self._epoch_micro = self.epoch, 0
        if self.remaining == 0:
            return super().take()  # None: the epoch is over (the next call starts the next)
        if not self._left:
            self._open_step()
        size = min(self.batch_size, self._left)
        before = self.position
        batch = super().take(size)
        self._step_examples += self.position - before  # all replicas, short at the end
        self._left -= size
        self._in_step += 1
        self._epoch_micro += 1
        self.handed_out.append((self.setting, self._in_step == 1))
        if not self._left or self.remaining == 0:
            self._close_step()
        return batch

    def next_step(self) -> tuple[StepSetting, list[list[int]]]:
        """The next optimizer step: its setting and this replica's micro-batches (a plain
        loop's way in; it starts the next epoch when one ends)."""
        micro: list[list[int]] = []
        while True:
            batch = self.take()
            if batch is None:
                if micro:
                    break
                continue  # the epoch ended between steps: the next one starts
            micro.append(batch)
            if not self._left:
                break
        return self.setting, micro

    def state_dict(self) -> dict[str, Any]:
        """Taken between optimizer steps (a step half handed out is not resumed)."""
        return {
            **super().state_dict(), "steps": self.steps, "examples": self.examples,
            "epoch_micro": self._epoch_micro,
            "phase": -1 if self.setting is None else self.setting.phase,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps, self.examples = int(state["steps"]), int(state["examples"])
        self._epoch_micro, self._counted_epoch = int(state["epoch_micro"]), self.epoch
        self._left, index = 0, int(state["phase"])
        if index >= 0:  # the phase in force (a phase waiting for its window keeps waiting)
            phase = self.schedule.phases[index]
            micro, accumulation = replica_split(phase, self.num_replicas)
            self.setting = StepSetting(
                self.steps, index, phase.batch_size, micro, accumulation, phase.lr
            )
