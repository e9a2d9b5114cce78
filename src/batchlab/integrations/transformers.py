"""Hugging Face `Trainer` callbacks: log B_simple, and grow gradient accumulation with it.

    noise = NoiseScaleCallback()
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[noise, AdaptiveAccumulation(noise)])

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

import math

from batchlab.adaptive.controller import AdaptiveBatchSize, Decision, LrRule
from batchlab.adaptive.noise_source import smoothed_noise_estimate
from batchlab.core.checks import check_batch_size, check_positive
from batchlab.core.lr import efficiency
from batchlab.core.tradeoff import efficient_batch_size
from batchlab.tracking.readout import TrackerReadout

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchlab.integrations.transformers needs transformers: "
        "pip install 'batchlab[transformers]'"
    ) from exc


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


class AdaptiveAccumulation(TrainerCallback):
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
    at the next epoch's start. The learning rate follows the AdaScale gain of the new batch
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
        base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        self._ratios = [g.get("initial_lr", g["lr"]) / base for g in optimizer.param_groups]

    def on_step_end(self, args, state, control, **kwargs):
        c = self.controller
        c.record_step(args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if c.due(state.global_step):
            self.decisions.append(self.decide(state.global_step, self.noise.b_simple, args))

    def decide(self, step: int, b_simple: float | None, args) -> Decision:
        """The accumulation from the next epoch on: toward B_noise, never down. A `switch` is
        applied at the next epoch's start, unless a later decision in the epoch keeps."""
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
