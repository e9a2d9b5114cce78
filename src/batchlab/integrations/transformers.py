"""Hugging Face `Trainer` callbacks: log B_simple; grow gradient accumulation with it, or
follow a plan's schedule.

    noise = NoiseScaleCallback()
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[noise, AdaptiveAccumulation(noise)])
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[ScheduledAccumulation("plan.json")])   # a plan's schedule

`NoiseScaleCallback` takes the gradient of every accumulation micro-step (the small batches)
and of their sum (the big batch) and adds the smoothed B_simple to the Trainer's logs as
`b_simple` (McCandlish et al. 2018, App. A.1). Where it cannot measure it warns once, logs
why and lets training go on (`strict=True` raises).

What the Trainer allows, and what it does not (transformers 4.4x-5.x):
- It needs `gradient_accumulation_steps >= 2`, and `>= 3` with clipping on (the default
  `max_grad_norm=1.0`): the Trainer clips `.grad` after the last micro-step's backward,
  before any callback sees it, so with clipping the tracker only reads `.grad` and takes the
  first micro-step as the small batch and the first two as the big one (one pair a step,
  3-5x noisier than all micro-steps). With `max_grad_norm=0` every micro-step is a small
  batch (the tracker's collector, `last=True` at `on_pre_optimizer_step`).
- Micro-steps are weighted equally (loss / k, or tokens / all tokens for models that take
  `num_items_in_batch`), so micro-batches should be of equal size, as the Trainer makes them
  except at the end of an epoch (that step is skipped).
- The Trainer builds its DataLoader once, so the per-device batch cannot change: the batch
  moves through `gradient_accumulation_steps` (`AdaptiveAccumulation` from the noise,
  `ScheduledAccumulation` from a plan's schedule). The loop (read in transformers 5.24)
  reads it at every optimizer step, to gather that many micro-batches, but syncs and steps
  when the epoch's micro-batch count is a multiple of it; so a new accumulation k starts at
  the first step boundary where that count is a multiple of k (at once when k divides it,
  at the latest at the next epoch's start). Elsewhere it would cut a window: switching 1 ->
  2 at count 3 made a step of one micro-batch (tests/test_schedule_integrations.py).
- Only upwards from the accumulation `train()` began with: the number of update steps per
  epoch was fixed then, so a larger accumulation ends each epoch's data early (the leftover
  update steps find no data and do nothing; epochs stay exact) while a smaller one would
  leave the epoch's tail untrained. The epochs that `max_steps` implies, and the lr
  scheduler's length, were fixed then too: a run given `max_steps` ends at the earlier of
  those epochs and `max_steps` steps; prefer `num_train_epochs`.
- The learning rate is set through the scheduler's base rates, so a multiplicative schedule
  (constant, linear, cosine with warm-up) keeps its shape around the new rate.
- `NoiseScaleCallback` and `AdaptiveAccumulation`: single device (under DDP use
  `batchlab.integrations.ddp`). `ScheduledAccumulation` under DDP: rank 0 decides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sized
from pathlib import Path

from batchlab.adaptive.controller import AdaptiveBatchSize, Decision, LrRule
from batchlab.adaptive.noise_source import smoothed_noise_estimate
from batchlab.core.checks import check_batch_size, check_positive
from batchlab.core.lr import efficiency
from batchlab.core.schedule import BatchSchedule
from batchlab.core.tradeoff import efficient_batch_size
from batchlab.errors import ConfigError
from batchlab.integrations.ddp import broadcast_from
from batchlab.integrations.schedule import as_schedule, distributed
from batchlab.tracking.readout import TrackerReadout

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchlab.integrations.transformers needs transformers: "
        "pip install 'batchlab[transformers]'"
    ) from exc

logger = logging.getLogger("batchlab")


class NoiseScaleCallback(TrackerReadout, TrainerCallback):
    """Adds the smoothed simple noise scale to the Trainer's logs.

    Reads like every batchlab monitor: `b_simple`, `b_simple_ci` and `reliable` are
    properties, `noise_scale()` the whole estimate with its `reason`.

    Args:
        decay: EMA decay of the two-batch estimates (default 0.95, about 20 steps).
        name: the key in the logs (default `b_simple`).
        strict: raise a NoiseEstimateError when it cannot measure; by default it warns
            once, logs the reason and lets training go on without an estimate.
    """

    def __init__(self, decay: float = 0.95, name: str = "b_simple", strict: bool = False) -> None:
        self.decay = decay
        self.estimate = smoothed_noise_estimate(decay, weighting="equal")
        self.tracker = self.estimate.tracker
        self.name = name
        self.strict = strict
        self.history: list[tuple[int, float]] = []  # (global step, B_simple)
        self._active = False
        self._clipping = False
        self._substep = 0  # micro-steps seen in the current optimizer step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._active = False
        self._clipping = bool(args.max_grad_norm) and args.max_grad_norm > 0
        if args.world_size > 1:
            return self.cannot_measure(
                f"it reads micro-step gradients on one device, got world size "
                f"{args.world_size}; under DDP use batchlab.integrations.ddp.DDPNoiseScale"
            )
        reason = unmeasurable_reason(args.gradient_accumulation_steps, args.max_grad_norm)
        if reason is not None:
            return self.cannot_measure(reason)
        if self._clipping:
            # The Trainer clips `.grad` after the last backward, before any callback, and an
            # epoch's last step may be short: the tracker must never hold `.grad` then. It
            # reads only (all_micro=False): the first micro-step is the small batch, the
            # first two the big one.
            self.estimate = smoothed_noise_estimate(self.decay, weighting="equal", all_micro=False)
            self.tracker = self.estimate.tracker
        self.tracker.unmeasurable = None
        self.tracker.bind(model)
        self._active = True

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        if not self._active:
            return
        self._substep += 1
        if not self._clipping:
            self.tracker.after_backward(model, args.per_device_train_batch_size)
        elif self._substep <= 2:
            self.tracker.after_backward(model, args.per_device_train_batch_size)
            if self._substep == 2:
                self.tracker.end_step(model, num_micro=args.gradient_accumulation_steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._active:
            return
        substeps, self._substep = self._substep, 0
        if not self._clipping:
            self.tracker.after_backward(model, args.per_device_train_batch_size, last=True)
            self.tracker.end_step(model)
        elif substeps < 2:  # a short step: too few micro-steps before the clipped one
            self.tracker.end_step(model)  # drops the lone small batch; `.grad` untouched
        value = self.estimate.b_simple()  # positive and finite, or None
        if value is not None:
            self.history.append((state.global_step + 1, value))

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = self.estimate.b_simple() if self._active else None  # now, not a stale one
        if value is None or logs is None:
            return
        logs[self.name] = value  # loggers after this callback see it
        if state.log_history:
            state.log_history[-1][self.name] = value


def unmeasurable_reason(accumulation_steps: int, max_grad_norm: float | None) -> str | None:
    """Why `NoiseScaleCallback` cannot measure with these Trainer settings (None: it can)."""
    clipping = bool(max_grad_norm) and max_grad_norm > 0
    needed = 3 if clipping else 2
    if accumulation_steps >= needed:
        return None
    if accumulation_steps >= 2:  # clipping is the only obstacle
        return (
            f"with max_grad_norm={max_grad_norm} the Trainer clips the last micro-step before "
            f"any callback sees it, so it needs gradient_accumulation_steps >= 3, got "
            f"{accumulation_steps}; raise it to 3 or more, or set max_grad_norm=0"
        )
    why = (
        f" (3: max_grad_norm={max_grad_norm} clips the last micro-step before callbacks see it)"
        if clipping
        else ""
    )
    return (
        "a step of one micro-step has nothing to contrast (more steps never help): expected "
        f"gradient_accumulation_steps >= {needed}{why}, got {accumulation_steps}; raise it "
        "and divide per_device_train_batch_size by it (the same update)"
    )


class _EpochWindows(TrainerCallback):
    """Counts the epoch's micro-batches, for the Trainer's window rule (module docstring):
    a new accumulation k may start where `starts(k)`."""

    _epoch_micro = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_micro = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self._epoch_micro += 1

    def on_step_end(self, args, state, control, **kwargs):
        self._epoch_micro += 1

    def starts(self, accumulation: int) -> bool:
        """Whether an accumulation window of `accumulation` may start at this step boundary."""
        return self._epoch_micro % accumulation == 0


class AdaptiveAccumulation(_EpochWindows):
    """Grows `gradient_accumulation_steps` (and the learning rate) while the noise says
    larger batches pay.

    Why not goodput. With the micro-batch fixed, a step of k micro-steps takes about k
    times as long, so the throughput hardly moves with k and goodput (throughput x
    efficiency, what `batchlab.AdaptiveBatchSize` maximises) only falls as the batch grows:
    it never asks for more. What a larger batch buys here is fewer optimizer steps for
    nearly the same examples, as long as it stays below the noise scale: S(B) = S_min (1 +
    B_noise/B) falls almost as 1/B there while E(B) = E_min (1 + B/B_noise) stays within 2x
    of E_min (McCandlish et al. 2018). So at each decision it aims at the efficient batch
    B ~= B_noise (`core.tradeoff.efficient_batch_size`) and grows the accumulation toward it,
    at most `max_growth`x per decision (B_simple is noisy and lags a growing value), applied
    at the first step the Trainer allows (module docstring). The learning rate follows the AdaScale gain of the new batch
    (`lr_rule`, as in `batchlab.AdaptiveBatchSize`).

    Args:
        noise: the `NoiseScaleCallback` in the same Trainer.
        lr_rule: as in `batchlab.AdaptiveBatchSize` (`auto`: by optimizer family).
        interval: optimizer steps between decisions (default 20).
        threshold: grow only when the target is this much above the current batch (0.05).
        max_accumulation_steps: the largest accumulation it sets (default 16).
        max_growth: the batch grows at most this factor per decision (default 2).
    """

    def __init__(
        self,
        noise: NoiseScaleCallback,
        *,
        lr_rule: LrRule = "auto",
        interval: int = 20,
        threshold: float = 0.05,
        max_accumulation_steps: int = 16,
        max_growth: float = 2.0,
    ) -> None:
        self.noise = noise
        self.lr_rule = lr_rule
        self.interval = check_batch_size(interval, what="interval")
        self.threshold = float(threshold)
        self.max_accumulation_steps = check_batch_size(
            max_accumulation_steps, what="max_accumulation_steps"
        )
        self.max_growth = check_positive(max_growth, what="`max_growth`", param="max_growth")
        self.controller: AdaptiveBatchSize | None = None
        self.decisions: list[Decision] = []
        self.applied: list[tuple[int, int]] = []  # (global step, accumulation) when applied
        self._pending: Decision | None = None
        self._ratios: list[float] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        micro = args.per_device_train_batch_size
        k = args.gradient_accumulation_steps
        self.controller = c = AdaptiveBatchSize(
            micro * k,
            args.learning_rate,
            optimizer=optimizer,
            lr_rule=self.lr_rule,
            fixed_micro_batch_size=micro,
            max_accumulation_steps=max(k, self.max_accumulation_steps),
            max_batch_size=micro * max(k, self.max_accumulation_steps),
            interval=self.interval,
        )
        self.decisions = list(c.decisions)
        self._ratios = _base_lr_ratios(optimizer)

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        super().on_step_end(args, state, control)
        c = self.controller
        c.record_step(args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if c.due(state.global_step):
            self.decisions.append(self.decide(state.global_step, self.noise.b_simple, args))
        self._apply_pending(args, state, optimizer, lr_scheduler)

    def decide(self, step: int, b_simple: float | None, args) -> Decision:
        """The accumulation from the next step the Trainer allows on: toward B_noise, never
        down. A `switch` waits for that step unless a later decision keeps or changes it."""
        c = self.controller
        micro, k = args.per_device_train_batch_size, args.gradient_accumulation_steps
        if b_simple is not None and math.isfinite(b_simple) and b_simple > 0:
            c.b_simple = b_simple
        b = c.b_simple
        target = k
        if b is not None:
            wanted = efficient_batch_size(b) / micro  # B ~= B_noise, in micro-steps
            if wanted >= k * (1 + self.threshold):
                target = min(math.floor(wanted), math.floor(k * self.max_growth))
                target = max(k, min(target, self.max_accumulation_steps))
        batch = micro * target
        grow = target > k
        decision = Decision(
            step=step,
            batch_size=batch,
            micro_batch_size=micro,
            accumulation_steps=target,
            lr=c.lr_for(batch, b) if grow else c.lr,  # a keep changes nothing
            b_simple=b,
            predicted_goodput=None,
            efficiency=None if b is None else c.efficiency(batch, b),
            # goodput of the new batch over the current one at a fixed time per example:
            # E(B') / E(B) <= 1, the price in examples of the steps it saves
            gain=1.0 if b is None else efficiency(batch, micro * k, b),
            action="switch" if grow else "keep",
        )
        self._pending = decision if grow else None  # the latest decision is the one applied
        return decision

    def on_epoch_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        super().on_epoch_begin(args, state, control)
        self._apply_pending(args, state, optimizer, lr_scheduler)

    def _apply_pending(self, args, state, optimizer, lr_scheduler) -> None:
        d = self._pending
        if d is None or self.controller is None or not self.starts(d.accumulation_steps):
            return
        self._pending = None
        args.gradient_accumulation_steps = d.accumulation_steps
        self.controller.accumulation_steps = d.accumulation_steps
        self.controller.lr = d.lr
        self.applied.append((state.global_step, d.accumulation_steps))
        _set_base_lr(optimizer, lr_scheduler, d.lr, self._ratios)


def _base_lr_ratios(optimizer) -> list[float]:
    """Each param group's base rate over the first group's (kept when a new rate is set)."""
    base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    return [g.get("initial_lr", g["lr"]) / base for g in optimizer.param_groups]


def _set_base_lr(optimizer, lr_scheduler, lr: float, ratios: list[float]) -> None:
    """Make `lr` (times each group's ratio) the base rate the Trainer's scheduler multiplies,
    so a multiplicative schedule (constant, linear, cosine with warm-up) keeps its shape
    around it; the current rate moves by the same factor at once."""
    new = [lr * r for r in ratios]
    for group, value in zip(optimizer.param_groups, new, strict=True):
        old = group.get("initial_lr", group["lr"])
        multiplier = group["lr"] / old if old else 1.0  # where the schedule is now
        group["initial_lr"] = value
        group["lr"] = value * multiplier
    if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
        lr_scheduler.base_lrs = new


class ScheduledAccumulation(_EpochWindows):
    """Runs a `BatchSchedule` (`batchlab plan`'s) in the Trainer through gradient accumulation.

        trainer = Trainer(model, args, train_dataset=ds,
                          callbacks=[ScheduledAccumulation("plan.json")])

    The per-device batch stays `per_device_train_batch_size` (the Trainer builds its
    DataLoader once); a phase's batch B becomes accumulation k = B / (per-device batch x
    processes), rounded to the nearest (at least 1), with the phase's learning rate as the
    scheduler's base rate (`learning_rate` is replaced; the scheduler's shape is kept).
    What the Trainer allows (read from transformers 5.24's `_inner_training_loop`; the
    limits are checked by `tests/test_schedule_integrations.py`):
    - It reads `gradient_accumulation_steps` at each optimizer step to gather that many
      micro-batches, but syncs and steps when the epoch's micro-batch count is a multiple
      of it. So a new accumulation k starts at the first optimizer step boundary where that
      count is a multiple of k: at once when k divides it, at the latest at the next
      epoch's start. `applied` says where each phase began.
    - It fixes the number of optimizer steps per epoch at the start of `train()` from the
      accumulation then; a smaller one later would leave the epoch's tail untrained. So
      `gradient_accumulation_steps` must be at most every phase's (set it to the first
      phase's): otherwise a `ConfigError` says so. Larger ones end each epoch's data early
      (the leftover steps find no data and do nothing); epochs stay exact.
    - `max_steps` counts optimizer steps, but the Trainer also derives from it, at the start,
      how many epochs to run (ceil(max_steps / steps per epoch)), which a growing
      accumulation makes end first; prefer `num_train_epochs`. The scheduler's length
      (warm-up, decay) is likewise counted at the start accumulation.
    - Samplers sized from the accumulation at the start (`group_by_length`'s) keep it.
    Under DDP rank 0 decides each phase and broadcasts it (`integrations.ddp.broadcast_from`;
    tested in `ScheduleSampler`'s plain DDP loop, not under the Trainer).
    The limits go to the `batchlab` logger once, at INFO, when training begins.
    """

    def __init__(self, schedule: BatchSchedule | str | Path) -> None:
        self.schedule = as_schedule(schedule)
        # where each phase began: {"phase", "step" (its first), "examples", "accumulation"}
        self.applied: list[dict[str, int]] = []
        self._accumulation: list[int] = []
        self._ratios: list[float] = []
        self._phase = -1
        self._epochs = self._micro_examples = self._num_examples = 0

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self._micro_examples = args.train_batch_size * max(1, args.world_size)
        self._accumulation = [
            max(1, math.floor(p.batch_size / self._micro_examples + 0.5))
            for p in self.schedule.phases
        ]
        start = args.gradient_accumulation_steps
        if start > min(self._accumulation):
            raise ConfigError(
                f"`gradient_accumulation_steps`: expected at most the smallest phase's "
                f"accumulation, {min(self._accumulation)} (the Trainer fixes an epoch's "
                f"optimizer steps from it at the start), got {start}; set it to "
                f"{self._accumulation[0]}, the first phase's",
                param="gradient_accumulation_steps",
            )
        loader = kwargs.get("train_dataloader")
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and not isinstance(dataset, Sized):
            raise ConfigError(
                f"ScheduledAccumulation: expected a training dataset with a length (the "
                f"Trainer's accumulation windows and the schedule's examples follow the "
                f"epoch), got {type(dataset).__name__}; use a map-style dataset",
                param="train_dataset",
            )
        self._num_examples = len(dataset) if dataset is not None else 0
        self._ratios = _base_lr_ratios(optimizer)
        self._phase, self._epochs, self._epoch_micro, self.applied = -1, -1, 0, []
        batches = ", ".join(
            f"{self._micro_examples} x {k} (of {p.batch_size})"
            for p, k in zip(self.schedule.phases, self._accumulation, strict=True)
        )
        logger.info(
            "batchlab schedule on the Hugging Face Trainer: batches %s through "
            "gradient_accumulation_steps, the per-device batch fixed; a phase starts at the "
            "first optimizer step where the epoch's micro-batch count is a multiple of its "
            "accumulation (at the latest the next epoch's start); the number of epochs and "
            "the lr scheduler's length were fixed at accumulation %d",
            batches,
            start,
        )
        self._apply_due(args, state, optimizer, lr_scheduler)

    def on_epoch_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        super().on_epoch_begin(args, state, control)
        self._epochs += 1
        self._apply_due(args, state, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        super().on_step_end(args, state, control)
        self._apply_due(args, state, optimizer, lr_scheduler)

    def _examples(self) -> int:
        """Examples seen (all processes): whole epochs, and this one's micro-batches."""
        epoch = self._epoch_micro * self._micro_examples
        if self._num_examples:
            epoch = min(epoch, self._num_examples)
        return max(self._epochs, 0) * self._num_examples + epoch

    def _apply_due(self, args, state, optimizer, lr_scheduler) -> None:
        """Start the phase due for the next step, if the Trainer's window rule allows it now;
        rank 0 decides."""
        index = self.schedule.phase_index(state.global_step, self._examples())
        if index != self._phase and not self.starts(self._accumulation[index]):
            index = self._phase  # wait for an aligned boundary
        if distributed():
            index = broadcast_from(index)
        if index == self._phase:
            return
        self._phase = index
        k = self._accumulation[index]
        args.gradient_accumulation_steps = k
        _set_base_lr(optimizer, lr_scheduler, self.schedule.phases[index].lr, self._ratios)
        self.applied.append(
            {"phase": index, "step": state.global_step + 1, "examples": self._examples(),
             "accumulation": k}
        )  # fmt: skip
