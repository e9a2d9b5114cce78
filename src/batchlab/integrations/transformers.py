"""Hugging Face `Trainer` callbacks: log B_simple, and grow gradient accumulation with it.

    noise = NoiseScaleCallback()
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[noise, AdaptiveAccumulation(noise)])

`NoiseScaleCallback` takes the gradient of every accumulation micro-step (the small batches)
and of their sum (the big batch) and adds the smoothed B_simple to the Trainer's logs as
`b_simple` (McCandlish et al. 2018, App. A.1). It needs `gradient_accumulation_steps >= 2`.

What the Trainer allows, and what it does not (transformers 4.4x-5.x):
- The Trainer clips gradients before any callback sees the last micro-step, and an epoch's
  last step may have fewer micro-steps. With `max_grad_norm=0` every micro-step is a small
  batch (the tracker's collector, `last=True` at `on_pre_optimizer_step`); with clipping on
  the tracker only reads `.grad`: the first micro-step is the small batch and the first two
  the big one (so `gradient_accumulation_steps >= 3` is needed then).
- Micro-steps are weighted equally (loss / k, or tokens / all tokens for models that take
  `num_items_in_batch`), so micro-batches should be of equal size, as the Trainer makes them
  except at the end of an epoch (that step is skipped).
- The Trainer builds its own DataLoader, so the per-device batch size cannot change during
  training. `AdaptiveAccumulation` changes `gradient_accumulation_steps` instead, only at
  the start of an epoch (mid-epoch, the Trainer's accumulation counter would misalign), and
  only upwards: the number of update steps per epoch was fixed when training began, so a
  larger accumulation ends each epoch's data early (the leftover update steps find no data
  and do nothing) while a smaller one would skip data. `max_steps` then counts steps that
  may each see more examples; prefer `num_train_epochs`.
- The learning rate is set through the scheduler's base rates, so a multiplicative schedule
  (constant, linear, cosine with warm-up) keeps its shape around the new rate.
- Single device: under DDP use `batchlab.integrations.ddp`.
"""

from __future__ import annotations

import time

from batchlab.adaptive.controller import AdaptiveBatchSize, Decision, LrRule
from batchlab.adaptive.noise_source import smoothed_noise_estimate
from batchlab.errors import NoiseEstimateError

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchlab.integrations.transformers needs transformers: "
        "pip install 'batchlab[transformers]'"
    ) from exc


class NoiseScaleCallback(TrainerCallback):
    """Adds the smoothed simple noise scale to the Trainer's logs.

    Args:
        decay: EMA decay of the two-batch estimates (default 0.95, about 20 steps).
        name: the key in the logs (default `b_simple`).
    """

    def __init__(self, decay: float = 0.95, name: str = "b_simple") -> None:
        self.decay = decay
        self.estimate = smoothed_noise_estimate(decay, weighting="equal")
        self.tracker = self.estimate.tracker
        self.name = name
        self.b_simple: float | None = None
        self.history: list[tuple[int, float]] = []  # (global step, B_simple)
        self._active = False
        self._clipping = False
        self._substep = 0  # micro-steps seen in the current optimizer step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        k = args.gradient_accumulation_steps
        self._clipping = bool(args.max_grad_norm) and args.max_grad_norm > 0
        if args.world_size > 1:
            raise NoiseEstimateError(
                f"NoiseScaleCallback reads micro-step gradients on one device, got world size "
                f"{args.world_size}; under DDP use batchlab.integrations.ddp.DDPNoiseScale"
            )
        needed = 3 if self._clipping else 2
        if k < needed:
            why = " (the last micro-step is clipped before callbacks see it)" * self._clipping
            raise NoiseEstimateError(
                f"NoiseScaleCallback needs micro-steps: expected gradient_accumulation_steps >= "
                f"{needed}{why}, got {k}; raise it (and lower per_device_train_batch_size), "
                "or set max_grad_norm=0"
            )
        if self._clipping:
            # The Trainer clips `.grad` after the last backward, before any callback, and an
            # epoch's last step may be short: the tracker must never hold `.grad` then. It
            # reads only (all_micro=False): the first micro-step is the small batch, the
            # first two the big one.
            self.estimate = smoothed_noise_estimate(self.decay, weighting="equal", all_micro=False)
            self.tracker = self.estimate.tracker
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
        value = self.estimate.b_simple()
        if value is not None:
            self.b_simple = value
            self.history.append((state.global_step + 1, value))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.b_simple is None or logs is None:
            return
        logs[self.name] = self.b_simple  # loggers after this callback see it
        if state.log_history:
            state.log_history[-1][self.name] = self.b_simple


class AdaptiveAccumulation(TrainerCallback):
    """Grows `gradient_accumulation_steps` (and the learning rate) with the goodput.

    Args:
        noise: the `NoiseScaleCallback` in the same Trainer.
        lr_rule, interval, threshold: as in `batchlab.AdaptiveBatchSize`.
        max_accumulation_steps: the largest accumulation it sets (default 16).
    """

    def __init__(
        self,
        noise: NoiseScaleCallback,
        *,
        lr_rule: LrRule = "auto",
        interval: int = 20,
        threshold: float = 0.05,
        max_accumulation_steps: int = 16,
    ) -> None:
        self.noise = noise
        self.settings = dict(
            lr_rule=lr_rule,
            interval=interval,
            threshold=threshold,
            max_accumulation_steps=max_accumulation_steps,
        )
        self.controller: AdaptiveBatchSize | None = None
        self.applied: list[tuple[int, int]] = []  # (global step, accumulation) when applied
        self._pending: Decision | None = None
        self._ratios: list[float] = []
        self._t = 0.0

    @property
    def decisions(self) -> list[Decision]:
        return [] if self.controller is None else list(self.controller.decisions)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        micro = args.per_device_train_batch_size
        k = args.gradient_accumulation_steps
        self.controller = AdaptiveBatchSize(
            micro * k,
            args.learning_rate,
            optimizer=optimizer,
            fixed_micro_batch_size=micro,
            max_batch_size=micro * self.settings["max_accumulation_steps"],
            **self.settings,
        )
        base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        self._ratios = [g.get("initial_lr", g["lr"]) / base for g in optimizer.param_groups]

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_substep_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.controller.throughput.observe_micro(args.per_device_train_batch_size, now - self._t)
        self._t = now

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.controller.throughput.observe_micro(args.per_device_train_batch_size, now - self._t)
        self._t = now

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.controller.throughput.observe_optimizer(time.perf_counter() - self._t)

    def on_step_end(self, args, state, control, **kwargs):
        c = self.controller
        c.record_step(args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if not c.due(state.global_step):
            return
        decision = c.decide(state.global_step, self.noise.b_simple)
        # Nothing changes until the next epoch starts; keep the controller on what runs.
        c.accumulation_steps = args.gradient_accumulation_steps
        c.lr = c.lr_for(c.batch_size, c.b_simple)
        if decision.accumulation_steps > args.gradient_accumulation_steps:
            self._pending = decision

    def on_epoch_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        d, self._pending = self._pending, None
        if d is None or self.controller is None:
            return
        args.gradient_accumulation_steps = d.accumulation_steps
        self.controller.accumulation_steps = d.accumulation_steps
        self.controller.lr = d.lr
        self.applied.append((state.global_step, d.accumulation_steps))
        new = [d.lr * r for r in self._ratios]
        for group, lr in zip(optimizer.param_groups, new, strict=True):
            old = group.get("initial_lr", group["lr"])
            multiplier = group["lr"] / old if old else 1.0  # where the schedule is now
            group["initial_lr"] = lr
            group["lr"] = lr * multiplier
        if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = new
