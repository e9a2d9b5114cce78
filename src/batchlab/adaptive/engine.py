"""The adaptive batch policy behind `batchlab train TASK --adaptive`, and `train_adaptive`.

It runs the one training loop (`batchlab.loop`) with `AdaptiveBatch` as its batch policy:
the examples come from a `ResizableBatchSampler`, every step is timed per micro-batch to
feed the `ThroughputModel`, and every `interval` steps the `AdaptiveBatchSize` controller
may change `(micro_batch_size, accumulation_steps)` and the learning rate. Changes happen
between optimizer steps only.

Run length is counted in reference-batch epochs of progress (sum of B * E(B) / N): at a
bigger batch each example is worth less, so `epochs=20` means "as far as 20 epochs at the
task's reference batch get", not 20 passes over the data. Evaluations are spaced by the
examples actually seen, so they line up with those of fixed-batch runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from batchlab.adaptive.controller import AdaptiveBatchSize, LrRule
from batchlab.adaptive.noise_source import FixedNoise, NoiseSource
from batchlab.adaptive.plan_start import PlanStart, plan_start
from batchlab.adaptive.sampler import ResizableBatchSampler
from batchlab.adaptive.throughput_model import FixedThroughput, ThroughputModel
from batchlab.adaptive.trajectory_noise import TrajectoryNoise
from batchlab.callbacks import RunState, TrainCallback
from batchlab.core.checks import check_batch_size, check_lr, check_warmup_steps
from batchlab.core.schedule import BatchSchedule
from batchlab.core.step_time import StepTimeModel
from batchlab.errors import ConfigError
from batchlab.history import History
from batchlab.loop import BatchPolicy, BatchSummary, Clock, StepPlan, check_run_length, run_training
from batchlab.recorder import RunRecorder
from batchlab.step import TrainStep, resolve_device
from batchlab.target import Target, target_for_task
from batchlab.task import Task
from batchlab.tasks import load_task

NoiseArg = float | Callable[[int], float] | NoiseSource | None
# On CUDA, timing a step needs synchronisation; time one step in this many.
CUDA_TIME_EVERY = 5


def train_adaptive(
    task: Task | str,
    *,
    lr: float | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    lr_rule: LrRule = "auto",
    warmup_steps: int = 0,
    memory_cap: int | None = None,
    max_batch_size: int | None = None,
    max_accumulation_steps: int = 16,
    interval: int = 20,
    threshold: float = 0.05,
    b_simple: NoiseArg = None,
    throughput: StepTimeModel | None = None,
    amp: bool = False,
    device: str | torch.device = "auto",
    seed: int = 0,
    eval_every: int | None = None,
    target: str | Target | None = None,
    callbacks: Sequence[TrainCallback] = (),
    schedule: object = None,
) -> History:
    """Train `task` with a batch size that follows the measured goodput; return its History.

    It starts at the task's reference batch B0 and lr (or at a plan's first schedule
    phase), and every `interval` optimizer steps lets `AdaptiveBatchSize` pick the batch
    that minimises (1 + B_noise/B) t(B), the plan's rule, with B_noise from `b_simple` and
    t(B) from the step times it measures (`core.step_time`, the plan's model).

    Args:
        lr: learning rate at the reference batch (default: the task's).
        epochs: run length in reference-batch epochs of progress (default: the task's).
        max_steps: stop after this many optimizer steps, whichever ends first.
        lr_rule: `auto` (AdaScale gain for SGD-like optimizers, its square root for
            Adam-like; from a plan, the plan's coupling), `adascale`, `sqrt-adascale`,
            `linear`, `sqrt` (the fixed rules at the current batch), `none`, or
            `(lr0, gain) -> lr`.
        warmup_steps: linear warm-up of the learning rate over these optimizer steps.
        memory_cap: largest micro-batch that fits (examples), e.g. from `batchlab probe`;
            bigger batches use gradient accumulation. None: no cap.
        max_batch_size: largest batch (default: a quarter of the training set, at most 64 B0).
        max_accumulation_steps: most micro-batches per step (default 16).
        interval: optimizer steps between decisions (default 20).
        threshold: goodput gain needed to switch (default 0.05).
        b_simple: the noise scale: None measures it during training (tracker on
            accumulation micro-batches, the standalone estimator otherwise); a number or a
            function of the step uses that; or any `NoiseSource`.
        throughput: a fixed `StepTimeModel` (`batchlab.core.step_time`) to plan with instead of timing the steps
            (decisions then depend on the seed only: reproducible runs, tests).
        eval_every: evaluate every `eval_every * B0` training examples (default: once a
            reference epoch, and at least ~20 times a run).
        target, amp, device, seed, callbacks: as in `batchlab.train`.
        schedule: start from a plan's schedule and correct it online: a plan file
            (`batchlab plan --json`), a `Plan`, its `ScheduleForecast`, a schedule's JSON or
            a `BatchSchedule` (`adaptive.plan_start`). The run starts at its first phase's
            batch and lr (the lr rule rescaled to give that lr there); with a plan and
            `b_simple=None`, B_noise is the plan's trajectory fit (`TrajectoryNoise` with the
            plan's noise points as its prior) corrected by the points this run measures,
            read at the current training loss (a bare schedule: this run's points only);
            with `lr_rule="auto"` the LR follows the plan's coupling (`sqrt`/`linear`, or
            AdaScale when the plan used it). `lr` must not be given.
    """
    task = load_task(task)
    start = None
    prior = None
    if schedule is not None:
        begin, b_simple, lr_rule = _from_plan(task, schedule, lr, b_simple, lr_rule)
        first, schedule, prior = begin.schedule.phases[0], begin.schedule, begin.step_time
        start = (first.batch_size, first.lr, begin.why(), _start_noise(b_simple))
        if max_batch_size is not None and first.batch_size > max_batch_size:
            raise ConfigError(
                f"`max_batch_size`: the plan starts at B={first.batch_size}, above the given "
                f"max {max_batch_size}; raise it to at least {first.batch_size} or re-plan",
                param="max_batch_size",
            )
    base_lr = check_lr(task.lr if lr is None else lr)
    check_warmup_steps(warmup_steps)
    check_run_length(epochs, max_steps)
    ref_epochs = float(epochs if epochs is not None else (task.epochs or 1))
    policy = AdaptiveBatch(
        base_lr=base_lr,
        noise=_noise_source(b_simple),
        throughput=ThroughputModel(prior=prior)
        if throughput is None
        else FixedThroughput(throughput),
        epochs=ref_epochs,
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        eval_every_examples=_eval_every(task, ref_epochs, eval_every) * task.batch_size,
        seed=seed,
        lr_rule=lr_rule,
        memory_cap=memory_cap,
        max_batch_size=_max_batch_size(task, max_batch_size),
        max_accumulation_steps=max_accumulation_steps,
        interval=interval,
        threshold=threshold,
        start=start,
        schedule=schedule,
    )
    tgt = target_for_task(target, task)
    dev = resolve_device(device)
    return run_training(
        task, policy, device=dev, amp=amp, seed=seed, target=tgt, callbacks=callbacks
    )


def _from_plan(
    task: Task, source: object, lr: float | None, b_simple: NoiseArg, lr_rule: LrRule
) -> tuple[PlanStart, NoiseArg, LrRule]:
    """`train_adaptive(schedule=...)`: what the plan gives (its schedule, whose first phase
    is the start, and its step-time model), the noise source (the plan's trajectory,
    corrected by this run's points, unless `b_simple` says otherwise) and the lr rule (the
    plan's coupling unless one is given)."""
    if lr is not None:
        raise ConfigError(
            "`schedule` sets the starting lr (its first phase's); expected no `lr` with "
            f"it, got {lr!r}; drop it",
            param="lr",
        )
    begin = plan_start(source)
    first = begin.schedule.phases[0]
    if first.batch_size > task.num_train:
        raise ConfigError(
            f"`schedule`: first phase batch {first.batch_size} is larger than the training "
            f"set of {task.name!r} ({task.num_train} examples); use at most {task.num_train}",
            param="schedule",
        )
    if b_simple is None:
        b_simple = TrajectoryNoise(prior=begin.noise, preconditioned=begin.preconditioned)
    if lr_rule == "auto" and begin.lr_rule is not None:
        lr_rule = begin.lr_rule
    return begin, b_simple, lr_rule


def _max_batch_size(task: Task, max_batch_size: int | None) -> int:
    if max_batch_size is None:
        max_batch_size = default_max_batch_size(task)
    if max_batch_size > task.num_train:
        raise ConfigError(
            f"max_batch_size {max_batch_size} is larger than the training set of "
            f"{task.name!r} ({task.num_train} examples); use at most {task.num_train}"
        )
    return max_batch_size


def _eval_every(task: Task, ref_epochs: float, eval_every: int | None) -> int:
    """Reference steps between evaluations: default once a reference epoch, >= ~20 a run."""
    if eval_every is None:
        ref_steps_per_epoch = math.ceil(task.num_train / task.batch_size)
        return max(1, min(ref_steps_per_epoch, int(ref_epochs * ref_steps_per_epoch) // 20))
    return check_batch_size(eval_every, what="eval_every")


def default_max_batch_size(task: Task) -> int:
    """A quarter of the training set, at most 64 reference batches, at least one."""
    return max(task.batch_size, min(64 * task.batch_size, task.num_train // 4))


def _start_noise(b_simple: NoiseArg) -> float | None:
    """The B_noise a plan's first phase was coupled at: its trajectory at the start of its
    path (the highest loss it measured), or a fixed value as given."""
    if isinstance(b_simple, TrajectoryNoise):
        fit = b_simple.fit()
        return None if fit is None else fit.b_noise(fit.loss_range[1])
    return float(b_simple) if isinstance(b_simple, (int, float)) else None


def _noise_source(b_simple: NoiseArg) -> NoiseSource:
    if b_simple is None:
        from batchlab.adaptive.measured_noise import MeasuredNoise

        return MeasuredNoise()
    if isinstance(b_simple, NoiseSource):
        return b_simple
    return FixedNoise(b_simple)


class _StepTimer:
    """Times each micro-batch of a step through `TrainStep.micro_hook`.

    Wraps whatever hook was installed before (a noise tracker), so both run; the wrapped
    hook's own time is left out of the timings, so the model learns what training costs,
    not what measuring it does.
    """

    def __init__(self, step_fn: TrainStep, sync: Callable[[], None], clock: Clock) -> None:
        self.inner = step_fn.micro_hook
        self.sync = sync
        self.clock = clock
        self.enabled = False
        self.micro_seconds: list[tuple[int, float]] = []  # (micro-batch size, seconds)
        self._last = 0.0
        step_fn.micro_hook = self

    def start(self, enabled: bool) -> None:
        self.enabled = enabled
        self.micro_seconds = []
        if enabled:
            self.sync()
            self._last = self.clock()

    def __call__(self, index: int, num_micro: int, size: int) -> None:
        if self.enabled:
            self.sync()
            self.micro_seconds.append((size, self.clock() - self._last))
        if self.inner is not None:
            self.inner(index, num_micro, size)
        if self.enabled:
            self._last = self.clock()

    def finish(self) -> float:
        """Seconds from the last micro-batch to now (the optimizer step)."""
        self.sync()
        return self.clock() - self._last


class AdaptiveBatch(BatchPolicy):
    """The `AdaptiveBatchSize` controller as the loop's batch policy, with its noise source
    and a step timer.

    It starts at the task's reference batch B0 and lr. Every step but the first at a new
    micro-batch size (which pays one-off costs) is timed per micro-batch into `throughput`;
    on CUDA only one step in `CUDA_TIME_EVERY`, as timing needs a sync. Every `interval`
    steps the controller may change the micro-batch, accumulation and lr, from the next
    step on. While a step is one micro-batch and the noise source needs micro-batches (it
    measures B_simple from them), every `split_every`-th step runs as two half micro-batches:
    the same update, one small/big pair for the estimate.

    Args:
        base_lr: learning rate at the reference batch.
        noise: where B_simple comes from; one that is a `TrainCallback` runs as a callback.
        throughput: the step-time model the controller plans with; the timer feeds it.
        epochs: run length in reference-batch epochs of progress.
        max_steps: stop after this many optimizer steps (None: no limit).
        warmup_steps: linear warm-up of the learning rate over these optimizer steps.
        eval_every_examples: evaluate every this many training examples, and at the end.
        seed: seeds the sampler's permutations.
        lr_rule, memory_cap, max_batch_size, max_accumulation_steps, interval, threshold:
            the controller's settings, as in `train_adaptive`.
        start: `(batch, lr, why)` to start from (a plan's first phase), not B0 and lr0.
        schedule: the plan's schedule it started from: each decision's reason says which
            batch the schedule has at that point, and the History keeps its phases.
    """

    loss_every_step = True  # no decision on a diverged model; on CUDA the timer syncs anyway

    def __init__(
        self,
        *,
        base_lr: float,
        noise: NoiseSource,
        throughput: ThroughputModel,
        epochs: float,
        eval_every_examples: int,
        max_steps: int | None = None,
        warmup_steps: int = 0,
        seed: int = 0,
        lr_rule: LrRule = "auto",
        memory_cap: int | None = None,
        max_batch_size: int | None = None,
        max_accumulation_steps: int = 16,
        interval: int = 20,
        threshold: float = 0.05,
        start: tuple[int, float, str, float | None] | None = None,
        schedule: BatchSchedule | None = None,
    ) -> None:
        self.start_at = start
        self.schedule = schedule
        self.build_lr = self.base_lr = base_lr
        self.noise = noise
        self.callbacks = [noise] if isinstance(noise, TrainCallback) else []
        needs_micro = getattr(noise, "needs_micro_batches", False)
        self.split_every = getattr(noise, "split_every", 0) if needs_micro else 0
        self.throughput = throughput
        self.epochs = epochs
        self.eval_every_examples = eval_every_examples
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.settings = dict(
            lr_rule=lr_rule,
            max_micro_batch_size=memory_cap,
            max_batch_size=max_batch_size,
            max_accumulation_steps=max_accumulation_steps,
            interval=interval,
            threshold=threshold,
        )
        self.batch_sizes: list[int] = []

    def bind(self, state: RunState, clock: Clock) -> None:
        task = state.task
        if self.settings["max_batch_size"] is None:
            self.settings["max_batch_size"] = default_max_batch_size(task)
        bounds = {}
        if self.start_at is not None:  # the plan's first phase may lie outside B0..max
            first = self.start_at[0]
            bounds["min_batch_size"] = min(task.batch_size, first)
            self.settings["max_batch_size"] = max(self.settings["max_batch_size"], first)
        self.controller = controller = AdaptiveBatchSize(
            task.batch_size,
            self.base_lr,
            optimizer=state.optimizer,
            throughput=self.throughput,
            start=self.start_at,
            **bounds,
            **self.settings,
        )
        state.step_fn.micro_batch_size = controller.micro_batch_size
        self.budget = self.epochs * task.num_train  # in reference-batch examples of progress
        ref_steps = math.ceil(self.budget / task.batch_size)
        state.total_steps = ref_steps if self.max_steps is None else min(ref_steps, self.max_steps)
        state.steps_per_epoch = math.ceil(task.num_train / controller.batch_size)
        state.effective_batch_size = controller.batch_size
        self.sampler = ResizableBatchSampler(task.num_train, controller.batch_size, seed=self.seed)
        device = state.device
        self.cuda = device.type == "cuda"
        self.sync = (lambda: torch.cuda.synchronize(device)) if self.cuda else (lambda: None)
        self.clock = clock
        self.batch_sizes = []
        self.next_eval = self.eval_every_examples
        self.fresh_config = True  # the first step at a new micro-batch size pays one-off costs

    def start(self, state: RunState) -> None:
        # After on_start: the timer wraps any micro-batch hook a tracker installed.
        self.timer = _StepTimer(state.step_fn, self.sync, self.clock)

    def next_step(self, state: RunState) -> StepPlan | None:
        controller = self.controller
        if controller.reference_examples >= self.budget - 1e-9:
            return None
        if self.max_steps is not None and state.step >= self.max_steps:
            return None
        indices = self.sampler.take(controller.batch_size)
        while indices is None:  # the end of an epoch; the next take starts the next one
            indices = self.sampler.take(controller.batch_size)
        step = state.step + 1
        factor = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        return StepPlan(torch.as_tensor(indices), controller.lr * factor)

    def run_step(self, state: RunState, plan: StepPlan) -> torch.Tensor:
        controller, step_fn = self.controller, state.step_fn
        step, size = state.step + 1, len(plan.indices)
        # No accumulation: split every few steps in two for the noise estimate (same update).
        split = (
            self.split_every > 0
            and controller.accumulation_steps == 1
            and step % self.split_every == 0
            and size >= 4
        )
        timed = (
            not split and not self.fresh_config and (not self.cuda or step % CUDA_TIME_EVERY == 0)
        )
        self.timer.start(timed)
        if split:
            step_fn.micro_batch_size = (size + 1) // 2
        loss = step_fn(plan.indices)
        step_fn.micro_batch_size = controller.micro_batch_size
        if timed:
            optimizer_seconds = self.timer.finish()
            for micro_size, seconds in self.timer.micro_seconds:
                self.throughput.observe_micro(micro_size, seconds)
            self.throughput.observe_optimizer(optimizer_seconds)
        self.fresh_config = False
        controller.record_step(size)
        self.batch_sizes.append(size)
        return loss

    def eval_due(self, state: RunState) -> bool:
        if (
            state.examples >= self.next_eval
            or self.controller.reference_examples >= self.budget - 1e-9
        ):
            every = self.eval_every_examples
            self.next_eval = (state.examples // every + 1) * every
            return True
        return False

    def after_step(self, state: RunState) -> None:
        controller = self.controller
        if not controller.due(state.step):
            return
        before = (controller.micro_batch_size, controller.accumulation_steps)
        value = self.noise.b_simple(state.step)
        describe = getattr(self.noise, "describe", None)
        source = describe() if callable(describe) else type(self.noise).__name__
        if self.schedule is not None:
            phase = self.schedule.phase_index(state.step, state.examples)
            source += f"; the plan has B={self.schedule.phases[phase].batch_size} here"
        decision = controller.decide(state.step, value, source)
        after = (decision.micro_batch_size, decision.accumulation_steps)
        if after != before:
            state.step_fn.micro_batch_size = decision.micro_batch_size
            state.effective_batch_size = decision.batch_size
            state.steps_per_epoch = math.ceil(state.task.num_train / decision.batch_size)
            self.fresh_config = after[0] != before[0]

    def summary(self, recorder: RunRecorder) -> BatchSummary:
        controller, task = self.controller, recorder.state.task
        rule = controller.lr_rule if isinstance(controller.lr_rule, str) else "custom"
        reference_epochs = controller.reference_epochs(task.num_train)
        adaptive = {
            "lr_rule": rule,
            "reference_batch_size": task.batch_size,
            "reference_lr": self.base_lr,
            "reference_epochs": reference_epochs,
            "batch_sizes": self.batch_sizes,
            "throughput_fit": self.throughput.fit().to_dict() if self.throughput.ready else None,
            "decisions": [d.to_dict() for d in controller.decisions],
            "noise_source": type(self.noise).__name__,
        }
        if self.schedule is not None:
            adaptive["plan_schedule"] = self.schedule.to_dict()
        return BatchSummary(
            batch_size=controller.micro_batch_size,
            accumulation_steps=controller.accumulation_steps,
            effective_batch_size=controller.batch_size,
            lr=max(recorder.lrs) if recorder.lrs else controller.lr,
            lr_rule=f"adaptive ({rule})",
            warmup_steps=self.warmup_steps,
            final={"reference_epochs": reference_epochs},
            extras={"adaptive": adaptive},
        )
