"""The one training loop. `batchlab.train` and `train_adaptive` both run it.

What each optimizer step trains on (which examples, at which micro-batch size and learning
rate) is the business of a `BatchPolicy`: `FixedBatch` here (one batch, warm-up, then a
constant lr), `ScheduledBatch` here (a `BatchSchedule`'s phases), `AdaptiveBatch` in `batchlab.adaptive` (the goodput controller). Everything
else lives here once: seeding, the model and optimizer, evaluation, the loss log, target and
divergence, timing, callbacks and the `History`.

Callbacks fire in this order, whatever the policy (callbacks the policy brings, such as the
adaptive engine's noise tracker, come first, then the caller's, in the order given):

1. `on_start(state)`: the model and optimizer exist; nothing has run.
2. The policy's `start(state)` (it sees any micro-batch hook a callback installed).
3. The initial evaluation, at step 0: `on_eval(state, evaluation)`.
4. For each optimizer step, until the policy has no next step, a target is reached or the
   loss is not finite:
   a. the policy picks the examples and the lr (`next_step`); the step runs (`run_step`);
   b. `on_step(state)`, with `state.step` and `state.examples` already counting the step
      and, whenever the loss was read back this step (below), `state.last_loss` its loss;
   c. if the loss was not finite, the run stops here: no evaluation of a diverged model;
   d. the policy updates itself (`after_step`), e.g. switches the batch for the next step;
   e. if an evaluation is due: `on_eval(state, evaluation)`; a reached target stops the run.
5. If the run stopped between evaluations (and did not diverge), a last evaluation:
   `on_eval(state, evaluation)`.
6. `on_end(state)`.

Evaluation time is kept out of `History.train_seconds`. The loss is read back to the host
at every step on CPU; on CUDA, where that read is a sync, at evaluations and every
`CUDA_SYNC_EVERY` steps (or every step when the policy asks, as the adaptive one does).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from batchlab.callbacks import RunState, TrainCallback
from batchlab.core.checks import check_batch_size, check_epochs, check_seed
from batchlab.core.evals import eval_due
from batchlab.core.schedule import BatchSchedule
from batchlab.data import EpochOrder, epoch_chunks
from batchlab.history import History
from batchlab.recorder import RunRecorder
from batchlab.step import build_step
from batchlab.target import Target
from batchlab.task import Task

Clock = Callable[[], float]
CUDA_SYNC_EVERY = 25


@dataclass(frozen=True)
class StepPlan:
    """What the next optimizer step trains on."""

    indices: torch.Tensor  # training examples of the step (all its micro-batches)
    lr: float  # learning rate of the step, warm-up included


@dataclass(frozen=True)
class BatchSummary:
    """A policy's part of the `History`: the setting it ended the run with."""

    batch_size: int  # micro-batch size
    accumulation_steps: int
    effective_batch_size: int
    lr: float  # peak learning rate
    lr_rule: str
    warmup_steps: int
    final: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class BatchPolicy(ABC):
    """Decides what each optimizer step of the loop trains on. Subclass it for a new policy.

    The loop calls, in order: `bind` once the model and optimizer exist; `start` after the
    callbacks' `on_start`; then per step `next_step`, `run_step`, `eval_due` (right after the
    step, before `on_step`), `after_step` (after `on_step`); and `summary` for the History.

    A policy owns the order of examples, so it keeps epochs exact however its batch
    changes (`AdaptiveBatch` cuts each epoch's permutation with a `ResizableBatchSampler`,
    `ScheduledBatch` with an `EpochOrder`): a schedule is one more class, no change to the
    loop.

    Attributes:
        build_lr: the lr the optimizer is built with. Each param group keeps its ratio to
            it when the loop applies a step's lr (groups may differ, e.g. no decay on norms).
        callbacks: callbacks the policy needs run (e.g. a noise tracker); before the caller's.
        loss_every_step: read the loss back every step on CUDA too (a sync per step).
    """

    build_lr: float
    callbacks: Sequence[TrainCallback] = ()
    loss_every_step: bool = False

    @abstractmethod
    def bind(self, state: RunState, clock: Clock) -> None:
        """Set the micro-batch size on `state.step_fn` and the run length fields of `state`
        (`total_steps`, `steps_per_epoch`, `effective_batch_size`)."""

    def start(self, state: RunState) -> None:
        """After every callback's `on_start`, before the initial evaluation (optional)."""
        return None

    @abstractmethod
    def next_step(self, state: RunState) -> StepPlan | None:
        """The examples and lr of step `state.step + 1`, or None when the run is complete."""

    def run_step(self, state: RunState, plan: StepPlan) -> torch.Tensor:
        """Run the optimizer step and return its detached mean loss (a hook for timing)."""
        return state.step_fn(plan.indices)

    @abstractmethod
    def eval_due(self, state: RunState) -> bool:
        """Whether to evaluate after step `state.step` (called once per step)."""

    def after_step(self, state: RunState) -> None:
        """After `on_step`, unless the loss diverged: may change the batch from the next step
        on (optional)."""
        return None

    @abstractmethod
    def summary(self, recorder: RunRecorder) -> BatchSummary:
        """The batch, accumulation, lr and extras the History reports."""


class FixedBatch(BatchPolicy):
    """One micro-batch size and accumulation for the whole run; lr with linear warm-up.

    Each epoch is a fresh permutation from a generator seeded with `seed`, cut into
    effective batches; the last batch of an epoch may be short.

    Args:
        peak_lr: the lr after warm-up (the lr rule already applied).
        warmup_steps: the lr rises linearly from peak_lr / warmup_steps over these steps.
        total_steps / steps_per_epoch: the run length, and how many steps make an epoch.
        eval_every: optimizer steps between evaluations, or `"geometric"` (every step below
            32, then at most 6.25% apart: `batchlab.core.evals`); and one at the last step.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        accumulation_steps: int,
        peak_lr: float,
        lr_rule: str,
        warmup_steps: int,
        total_steps: int,
        steps_per_epoch: int,
        eval_every: int | str,
        seed: int,
    ) -> None:
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.effective_batch_size = batch_size * accumulation_steps
        self.build_lr = self.peak_lr = peak_lr
        self.lr_rule = lr_rule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.eval_every = eval_every
        self.seed = seed
        self._chunks: list[torch.Tensor] = []
        self._generator: torch.Generator | None = None

    def bind(self, state: RunState, clock: Clock) -> None:
        state.step_fn.micro_batch_size = self.batch_size
        state.total_steps = self.total_steps
        state.steps_per_epoch = self.steps_per_epoch
        state.effective_batch_size = self.effective_batch_size
        self._chunks = []
        self._generator = torch.Generator().manual_seed(self.seed)

    def lr_at(self, step: int) -> float:
        """The lr of (1-based) `step`."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        return self.peak_lr

    def next_step(self, state: RunState) -> StepPlan | None:
        if state.step >= self.total_steps:
            return None
        if not self._chunks:
            self._chunks = epoch_chunks(
                state.task.num_train, self.effective_batch_size, self._generator
            )
            self._chunks.reverse()  # pop() from the end walks the epoch in order
        return StepPlan(self._chunks.pop(), self.lr_at(state.step + 1))

    def eval_due(self, state: RunState) -> bool:
        return eval_due(state.step, self.eval_every, self.total_steps)

    def summary(self, recorder: RunRecorder) -> BatchSummary:
        return BatchSummary(
            batch_size=self.batch_size,
            accumulation_steps=self.accumulation_steps,
            effective_batch_size=self.effective_batch_size,
            lr=self.peak_lr,
            lr_rule=self.lr_rule,
            warmup_steps=self.warmup_steps,
        )


class ScheduledBatch(BatchPolicy):
    """A `BatchSchedule`: each phase's batch, micro-batch and lr from its start on.

    The phase of a step is the last one whose `start` (steps or examples done before the
    step) has been reached; the switch happens between optimizer steps. Examples come from
    an `EpochOrder` seeded like `FixedBatch`'s, so every example is seen once per epoch
    whatever the phases do, and a one-phase schedule trains exactly as `FixedBatch`.

    Args:
        total_steps: the run length (`batchlab.core.schedule.schedule_run_steps`).
        eval_every: optimizer steps between evaluations, or `"geometric"`.
        warmup_steps: the phases' lr rises linearly over these first steps.
    """

    def __init__(
        self,
        schedule: BatchSchedule,
        *,
        total_steps: int,
        eval_every: int | str,
        seed: int,
        warmup_steps: int = 0,
    ) -> None:
        self.schedule = schedule
        self.build_lr = schedule.phases[0].lr
        self.total_steps = total_steps
        self.eval_every = eval_every
        self.seed = seed
        self.warmup_steps = warmup_steps
        self.phase = -1
        self.phases_run: list[dict[str, int]] = []

    def bind(self, state: RunState, clock: Clock) -> None:
        first = self.schedule.phases[0]
        state.step_fn.micro_batch_size = first.micro_batch_size
        state.total_steps = self.total_steps
        state.steps_per_epoch = math.ceil(state.task.num_train / first.batch_size)
        state.effective_batch_size = first.batch_size
        self._order = EpochOrder(state.task.num_train, torch.Generator().manual_seed(self.seed))
        self.phase = -1
        self.phases_run = []

    def next_step(self, state: RunState) -> StepPlan | None:
        if state.step >= self.total_steps:
            return None
        index = self.schedule.phase_index(state.step, state.examples)
        phase = self.schedule.phases[index]
        if index != self.phase:  # a new phase from this step on
            self.phase = index
            state.step_fn.micro_batch_size = phase.micro_batch_size
            state.effective_batch_size = phase.batch_size
            state.steps_per_epoch = math.ceil(state.task.num_train / phase.batch_size)
            self.phases_run.append(
                {"phase": index, "step": state.step + 1, "examples": state.examples}
            )
        step = state.step + 1
        factor = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        return StepPlan(self._order.take(phase.batch_size), phase.lr * factor)

    def eval_due(self, state: RunState) -> bool:
        return eval_due(state.step, self.eval_every, self.total_steps)

    def summary(self, recorder: RunRecorder) -> BatchSummary:
        last = self.schedule.phases[max(self.phase, 0)]
        return BatchSummary(
            batch_size=last.micro_batch_size,
            accumulation_steps=last.accumulation_steps,
            effective_batch_size=last.batch_size,
            lr=max(p.lr for p in self.schedule.phases),
            lr_rule="schedule",
            warmup_steps=self.warmup_steps,
            # phases_run: where each phase began (its first step, examples seen before it).
            extras={"schedule": {**self.schedule.to_dict(), "phases_run": self.phases_run}},
        )


def run_training(
    task: Task,
    policy: BatchPolicy,
    *,
    device: torch.device,
    amp: bool = False,
    seed: int = 0,
    target: Target | None = None,
    callbacks: Sequence[TrainCallback] = (),
    clock: Clock = time.perf_counter,
) -> History:
    """Train a fresh model of `task` as `policy` says; return the run's `History`.

    The model is initialised from `torch.manual_seed(seed)`; the caller's global RNG state
    is restored afterwards. `clock` (seconds) times training, evaluation and whatever the
    policy times; tests pass a fake one. Callbacks fire in the order of the module docstring.
    """
    check_seed(seed)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        step_fn = build_step(
            task, device, lr=policy.build_lr, micro_batch_size=task.batch_size, amp=amp
        )
        # The policy fills in the run length in bind().
        state = RunState(task, step_fn.model, step_fn.optimizer, step_fn, device, 0, 0, 0)
        policy.bind(state, clock)
        hooks = [*policy.callbacks, *callbacks]
        rec = RunRecorder(state, amp=amp, target=target, callbacks=hooks, clock=clock)
        for cb in hooks:
            cb.on_start(state)
        policy.start(state)
        rec.evaluate()
        _train_steps(state, policy, rec, hooks)
        if rec.diverged_step is None and rec.evals[-1].step != state.step:
            rec.evaluate()  # stopped between evaluations
        for cb in hooks:
            cb.on_end(state)
        summary = policy.summary(rec)
        return rec.history(
            batch_size=summary.batch_size,
            accumulation_steps=summary.accumulation_steps,
            effective_batch_size=summary.effective_batch_size,
            lr=summary.lr,
            lr_rule=summary.lr_rule,
            warmup_steps=summary.warmup_steps,
            seed=seed,
            final=summary.final,
            extras=summary.extras,
        )


def _train_steps(
    state: RunState, policy: BatchPolicy, rec: RunRecorder, hooks: Sequence[TrainCallback]
) -> None:
    """Step 4 of the module docstring: the optimizer steps, with the clock running."""
    optimizer = state.optimizer
    # Each param group keeps its own ratio to the lr the optimizer was built with.
    group_ratios = [g["lr"] / policy.build_lr for g in optimizer.param_groups]
    applied_lr = policy.build_lr
    sync_every = 1 if state.device.type == "cpu" or policy.loss_every_step else CUDA_SYNC_EVERY
    rec.start_clock()
    while not rec.done:
        plan = policy.next_step(state)
        if plan is None:
            break
        if plan.lr != applied_lr:
            for group, ratio in zip(optimizer.param_groups, group_ratios, strict=True):
                group["lr"] = plan.lr * ratio
            applied_lr = plan.lr
        loss = policy.run_step(state, plan)
        state.step += 1
        state.examples += len(plan.indices)
        rec.record_step(state.step, loss, plan.lr)
        due = policy.eval_due(state)
        diverged = (due or state.step % sync_every == 0) and rec.flush() is not None
        for cb in hooks:
            cb.on_step(state)
        if diverged:
            break
        policy.after_step(state)
        if due:
            rec.evaluate()
    rec.stop_clock()
    rec.flush()


def check_run_length(epochs: float | None, max_steps: int | None) -> None:
    """The input checks of `epochs` and `max_steps` (None: not given) both entry points share."""
    if max_steps is not None:
        check_batch_size(max_steps, what="max_steps")
    if epochs is not None:
        check_epochs(epochs)
