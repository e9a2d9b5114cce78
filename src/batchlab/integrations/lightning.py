"""Lightning callbacks: log B_simple, and adapt the batch size during `Trainer.fit`.

    sampler = ResizableBatchSampler(train_set, batch_size=32, seed=0)
    loader = DataLoader(train_set, batch_sampler=sampler)          # num_workers=0: exact
    monitor = NoiseScaleMonitor()
    trainer = Trainer(accumulate_grad_batches=2, callbacks=[monitor, AdaptiveBatchSize(sampler, monitor)])

`NoiseScaleMonitor` reads the accumulation micro-batches' gradients (`on_after_backward`)
and logs the smoothed B_simple as `b_simple` to the Trainer's logger. It needs
`accumulate_grad_batches >= 2` on one device; otherwise it warns once, logs why and lets
training go on (`strict=True` raises). Under DDP use `batchlab.integrations.ddp`.

`AdaptiveBatchSize` changes the micro-batch size through the `ResizableBatchSampler`
between optimizer steps, and the learning rate of every param group. Epochs stay epochs:
Lightning calls `set_epoch` on `loader.batch_sampler.sampler` (the sampler's epoch
permutation), and at fit start the callback makes the sampler unsized (`sized=False`), so
Lightning ends each epoch when its data ends, validates then, and `max_epochs` counts real
epochs. Limits, honestly:
- a float `val_check_interval` other than 1.0 is refused (use an int: every N batches), and
  `trainer.estimated_stepping_batches` is infinite (a scheduler sized from it cannot work);
- accumulation stays the Trainer's `accumulate_grad_batches` (Lightning counts accumulation
  windows from the start of the epoch, so changing it mid-epoch would make a short window);
  the batch moves through the micro-batch size only, up to `memory_cap`;
- a learning-rate scheduler that sets absolute learning rates overrides the new rate at its
  next step; use none, or one that multiplies (LambdaLR on a base rate we update is fine);
- Lightning fetches one batch ahead of training (it must, to know an unsized epoch's last
  batch), and a loader with `num_workers > 0` several, so a new size arrives a batch or
  more late (nothing is skipped or repeated).

`ScheduledBatchSize` runs a `BatchSchedule` (`batchlab plan`'s) instead: its
`ScheduleSampler` cuts each step's micro-batches where the indices are drawn, so phase
switches are exact, and the callback sets each step's accumulation and learning rate.

Lightning is imported when this module is, never by `import batchlab`.
"""

from __future__ import annotations

import time
from typing import Any

from batchlab.adaptive.controller import AdaptiveBatchSize as Controller
from batchlab.adaptive.controller import Decision, LrRule
from batchlab.adaptive.noise_source import smoothed_noise_estimate
from batchlab.adaptive.sampler import ResizableBatchSampler
from batchlab.errors import ConfigError
from batchlab.integrations.schedule import ScheduleSampler, StepSetting
from batchlab.tracking.readout import TrackerReadout

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError(
            "batchlab.integrations.lightning needs Lightning: pip install 'batchlab[lightning]'"
        ) from exc


def _batch_len(batch: Any) -> int:
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    return len(batch)


def _unsize(sampler: ResizableBatchSampler, trainer: Any) -> None:
    """Make the sampler unsized, so Lightning ends each epoch when its data ends (see the
    module docstring); refuse what needs an epoch's length ahead."""
    sampler.sized = False
    interval = trainer.val_check_interval
    if isinstance(interval, float) and interval != 1.0:
        raise ConfigError(
            "`val_check_interval`: expected 1.0 (each epoch's end) or an int (every N "
            f"batches) with a resizing batch, got {interval}; an epoch's length is not "
            "known ahead, so Lightning cannot take a fraction of it",
            param="val_check_interval",
        )


def _lr_ratios(optimizer: Any) -> list[float]:
    """Each param group's lr over the first group's: kept when a new lr is set (groups may
    differ, e.g. no decay on norms), as the plain loop keeps them."""
    lr0 = optimizer.param_groups[0]["lr"]
    return [g["lr"] / lr0 for g in optimizer.param_groups]


def _set_lr(optimizer: Any, lr: float, ratios: list[float]) -> None:
    for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
        group["lr"] = lr * ratio


class NoiseScaleMonitor(TrackerReadout, Callback):
    """Logs the smoothed simple noise scale B_simple (McCandlish et al. 2018) during fit.

    Reads like every batchlab monitor: `b_simple`, `b_simple_ci` and `reliable` are
    properties, `noise_scale()` the whole estimate with its `reason`.

    Args:
        decay: EMA decay of the two-batch estimates (default 0.95, about 20 steps).
        name: the metric's name in the logger (default `b_simple`).
        strict: raise a NoiseEstimateError when it cannot measure (one micro-batch per
            step, or more than one device); by default it warns once, logs the reason and
            lets training go on without an estimate.
    """

    def __init__(self, decay: float = 0.95, name: str = "b_simple", strict: bool = False) -> None:
        # Lightning scales each micro-batch loss by 1/accumulate_grad_batches: equal weights.
        self.estimate = smoothed_noise_estimate(decay, weighting="equal")
        self.tracker = self.estimate.tracker
        self.name = name
        self.strict = strict
        self.history: list[tuple[int, float]] = []  # (global step, B_simple)
        self._active = False
        self._size = 0
        self._last = False
        self._fresh: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._active = False
        if trainer.world_size > 1:
            return self.cannot_measure(
                f"it reads micro-batch gradients on one device, got world size "
                f"{trainer.world_size}; under DDP use batchlab.integrations.ddp.DDPNoiseScale"
            )
        if trainer.accumulate_grad_batches < 2:
            return self.cannot_measure(
                "a step of one micro-batch has nothing to contrast (more steps never help): "
                f"expected Trainer(accumulate_grad_batches>=2), got "
                f"{trainer.accumulate_grad_batches}; halve the batch size and set "
                "accumulate_grad_batches=2 (the same update)"
            )
        self.tracker.unmeasurable = None
        self.tracker.bind(pl_module)
        self._active = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._size = _batch_len(batch)
        # Lightning's own rule for the end of an accumulation window: every k-th batch, or
        # the epoch's last (known ahead: its fetcher prefetches one batch). The tracker puts
        # the step's gradient back into `.grad` after it, before AMP unscaling and clipping.
        k = trainer.accumulate_grad_batches
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        self._last = (
            (batch_idx + 1) % k == 0 or last_batch or batch_idx + 1 == trainer.num_training_batches
        )

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._active:
            self.tracker.after_backward(pl_module, self._size, last=self._last)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._active:
            return
        self.tracker.end_step(pl_module)
        self._fresh = self.estimate.b_simple()  # positive and finite, or None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value, self._fresh = self._fresh, None
        if value is not None:
            self.history.append((trainer.global_step, value))
            pl_module.log(self.name, value, on_step=True, on_epoch=False)


class AdaptiveBatchSize(Callback):
    """Adapts the micro-batch size (and the learning rate) to the measured goodput.

    Args:
        sampler: the `ResizableBatchSampler` of the training DataLoader.
        monitor: the `NoiseScaleMonitor` in the same Trainer (its B_simple drives decisions).
        memory_cap: largest micro-batch that fits (examples), e.g. from `batchlab probe`.
        lr_rule, interval, threshold, max_batch_size: as in `batchlab.AdaptiveBatchSize`.

    The reference batch B0 is the sampler's batch size x accumulation x world size at the
    start of fit, and lr0 the optimizer's learning rate then.
    """

    def __init__(
        self,
        sampler: ResizableBatchSampler,
        monitor: NoiseScaleMonitor,
        *,
        memory_cap: int | None = None,
        lr_rule: LrRule = "auto",
        interval: int = 20,
        threshold: float = 0.05,
        max_batch_size: int | None = None,
    ) -> None:
        if not isinstance(sampler, ResizableBatchSampler):
            raise ConfigError(
                f"expected the DataLoader's ResizableBatchSampler, got {type(sampler).__name__}; "
                "build the loader as DataLoader(ds, batch_sampler=ResizableBatchSampler(ds, B))"
            )
        self.sampler = sampler
        self.monitor = monitor
        self.settings = dict(
            max_micro_batch_size=memory_cap,
            lr_rule=lr_rule,
            interval=interval,
            threshold=threshold,
            max_batch_size=max_batch_size,
        )
        self.controller: Controller | None = None
        self._ratios: list[float] = []
        self._step = 0
        self._t_batch = self._t_opt = 0.0

    @property
    def decisions(self) -> list[Decision]:
        return [] if self.controller is None else list(self.controller.decisions)

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning counts an epoch's batches from len(loader) once, at the start of fit: a
        # shrinking batch would cut the epoch short and a growing one skip the validation
        # due at the counted end. Without a length, an epoch ends when its data does and
        # Lightning validates then (on_fit_start runs before Lightning reads the length).
        _unsize(self.sampler, trainer)
        optimizer = trainer.optimizers[0]
        lr0 = optimizer.param_groups[0]["lr"]
        accum = trainer.accumulate_grad_batches
        self.controller = Controller(
            self.sampler.batch_size * accum * trainer.world_size,
            lr0,
            optimizer=optimizer,
            world_size=trainer.world_size,
            fixed_accumulation_steps=accum,
            max_accumulation_steps=accum,
            **self.settings,
        )
        self._ratios = _lr_ratios(optimizer)
        self._step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._size = _batch_len(batch)
        self._t_batch = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        if self.controller is not None:
            self.controller.throughput.observe_micro(self._size, now - self._t_batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._t_opt = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        c = self.controller
        if c is None or trainer.global_step == self._step:
            return  # still accumulating
        c.throughput.observe_optimizer(time.perf_counter() - self._t_opt)
        self._step = trainer.global_step
        c.record_step(c.batch_size)
        if not c.due(self._step):
            return
        if trainer.world_size > 1:  # rank 0 decides, every rank adopts
            decision = (
                c.decide(self._step, self.monitor.b_simple) if trainer.is_global_zero else None
            )
            decision = trainer.strategy.broadcast(decision, src=0)
            if not trainer.is_global_zero:
                c.adopt(decision)
        else:
            decision = c.decide(self._step, self.monitor.b_simple)
        self.sampler.batch_size = decision.micro_batch_size
        _set_lr(trainer.optimizers[0], decision.lr, self._ratios)
        pl_module.log("batch_size", float(decision.batch_size), on_step=True, on_epoch=False)


class ScheduledBatchSize(Callback):
    """Runs a `BatchSchedule` (`batchlab plan`'s): each phase's batch, micro-batch x
    accumulation and learning rate from its start on.

        sampler = ScheduleSampler(train_set, "plan.json", seed=0)
        trainer = Trainer(max_epochs=8, callbacks=[ScheduledBatchSize(sampler)])
        trainer.fit(module, DataLoader(train_set, batch_sampler=sampler), val_loader)

    The sampler (`batchlab.integrations.schedule.ScheduleSampler`) resizes itself between
    optimizer steps, where it cuts the indices, so a switch is exact however far ahead
    Lightning or the loader's workers fetch. This callback applies, at the first batch of
    each step, the step's accumulation (`trainer.accumulate_grad_batches`, as Lightning's
    own `GradientAccumulationScheduler` changes it) and learning rate (every param group,
    keeping their ratios). Limits, honestly:
    - Lightning closes an accumulation window when the epoch's batch count is a multiple of
      the accumulation, so a phase that changes the accumulation starts at the first step
      boundary where that count is a multiple of its accumulation (at once when it is 1 or
      divides the current one; always at an epoch's start). `sampler.phases_run` says where
      each phase began.
    - Lightning weights a step's micro-batches equally (each loss / accumulation), so a
      phase whose batch is not a multiple of its micro-batch over-weights its short one, as
      does an epoch's short last step.
    - As with `AdaptiveBatchSize`: epochs are exact (the loader is unsized), a float
      `val_check_interval` other than 1.0 is refused, `estimated_stepping_batches` is
      infinite, and an lr scheduler that sets absolute rates overrides the phase's lr.
    - Leave `accumulate_grad_batches` at 1: the schedule sets it. Under DDP build the
      sampler with `num_replicas`/`rank` and `Trainer(use_distributed_sampler=False)`;
      rank 0 decides each phase (see `ScheduleSampler`).

    `settings` lists each step's `StepSetting` as it was applied.
    """

    def __init__(self, sampler: ScheduleSampler) -> None:
        if not isinstance(sampler, ScheduleSampler):
            raise ConfigError(
                f"`sampler`: expected the DataLoader's ScheduleSampler, got "
                f"{type(sampler).__name__}; build the loader as DataLoader(ds, "
                "batch_sampler=ScheduleSampler(ds, schedule))",
                param="sampler",
            )
        self.sampler = sampler
        self.settings: list[StepSetting] = []
        self._ratios: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.accumulate_grad_batches != 1 or trainer.strategy.handles_gradient_accumulation:
            raise ConfigError(
                "`accumulate_grad_batches`: expected 1 with a schedule (each phase sets the "
                f"accumulation), got {trainer.accumulate_grad_batches} under "
                f"{type(trainer.strategy).__name__}; drop it (a strategy that accumulates "
                "by itself, such as DeepSpeed, cannot follow a schedule)",
                param="accumulate_grad_batches",
            )
        if self.sampler.num_replicas != trainer.world_size:
            raise ConfigError(
                f"`sampler`: expected num_replicas={trainer.world_size} (the Trainer's world "
                f"size), got {self.sampler.num_replicas}; build it with num_replicas and rank",
                param="sampler",
            )
        _unsize(self.sampler, trainer)
        self.sampler.align_accumulation = True
        self._ratios = _lr_ratios(trainer.optimizers[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.sampler.handed_out:
            raise ConfigError(
                "`sampler`: expected the training DataLoader to draw from the ScheduleSampler "
                "given to ScheduledBatchSize, got a batch it did not hand out; build the "
                "loader as DataLoader(ds, batch_sampler=sampler)",
                param="sampler",
            )
        setting, first = self.sampler.handed_out.popleft()
        if not first:
            return
        trainer.accumulate_grad_batches = setting.accumulation_steps
        _set_lr(trainer.optimizers[0], setting.lr, self._ratios)
        self.settings.append(setting)
