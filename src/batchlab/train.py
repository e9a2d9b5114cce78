"""`train()`: one run at a fixed batch size. Every number batchlab reports is measured so.

It checks its input, turns the lr rule and run length into a `FixedBatch` policy and runs
the one training loop (`batchlab.loop`), which adds nothing a hand-written loop would not
have: in-memory datasets are indexed on the device, the loss is read back to the host only
where needed, evaluation runs under `torch.no_grad()` at a large batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from batchlab.callbacks import TrainCallback
from batchlab.core.checks import check_batch_size, check_lr, check_warmup_steps
from batchlab.core.evals import check_eval_every
from batchlab.core.lr import scale_lr
from batchlab.core.schedule import BatchSchedule, schedule_run_steps
from batchlab.errors import ConfigError
from batchlab.history import History
from batchlab.loop import FixedBatch, ScheduledBatch, check_run_length, run_training
from batchlab.results import FieldError, read_json_object
from batchlab.step import resolve_device
from batchlab.target import Target, target_for_task
from batchlab.task import Task
from batchlab.tasks import load_task
from batchlab.tracking import GradientNoiseScaleTracker


def _plan_length(
    num_train: int, effective_batch: int, epochs: float | None, max_steps: int | None, task: Task
) -> tuple[int, int]:
    """Steps per epoch and total steps; the task's reference epochs when neither is given."""
    check_run_length(epochs, max_steps)
    steps_per_epoch = math.ceil(num_train / effective_batch)
    if epochs is None and max_steps is None:
        epochs = task.epochs or 1
    total = math.inf
    if epochs is not None:
        total = math.ceil(epochs * steps_per_epoch)
    if max_steps is not None:
        total = min(total, max_steps)
    return steps_per_epoch, int(total)


def train(
    task: Task | str,
    batch_size: int | None = None,
    lr: float | None = None,
    *,
    epochs: float | None = None,
    max_steps: int | None = None,
    lr_rule: str = "none",
    warmup_steps: int = 0,
    accumulation_steps: int = 1,
    amp: bool = False,
    device: str | torch.device = "auto",
    seed: int = 0,
    eval_every: int | str | None = None,
    target: str | Target | None = None,
    b_simple: float | None = None,
    callbacks: Sequence[TrainCallback] = (),
    track_noise: bool = False,
    schedule: BatchSchedule | str | Path | None = None,
) -> History:
    """Train `task` at micro-batch `batch_size` (or as `schedule` says); return its `History`.

    Args:
        batch_size: examples per micro-batch (required without `schedule`); a step sees
            `batch_size * accumulation_steps` examples (the effective batch).
        lr: learning rate at the task's reference batch (default: the task's `lr`). The
            `lr_rule` scales it from the reference batch to the effective batch.
        epochs / max_steps: run length; the task's reference epochs when both are None.
            With both, whichever ends first.
        lr_rule: `none`, `linear` (Goyal et al. 2017), `sqrt` (Hoffer et al. 2017) or
            `adascale` (needs `b_simple`).
        warmup_steps: linear warm-up from lr/warmup_steps to the peak over these steps.
        accumulation_steps: micro-batches per optimizer step.
        amp: autocast (bf16, or fp16 with loss scaling on CUDA cards without bf16).
        device: `auto`, `cpu`, `cuda`, `cuda:N`.
        seed: seeds the model init, the shuffling and dropout; the same seed gives the
            same History on CPU. The caller's global RNG state is restored afterwards.
        eval_every: optimizer steps between evaluations (default: once an epoch, and at
            least ~20 times a run), or `"geometric"`: every step below 32, then whenever the
            step is a multiple of 2^floor(log2(step/16)), so steps to `target` are read to
            within 6.25% (`batchlab.core.evals`; what `batchlab sweep` uses).
        target: e.g. `val_acc>=0.9`; the run stops at the first evaluation reaching it.
        callbacks: `TrainCallback`s, e.g. a progress bar or a noise tracker.
        track_noise: record B_simple (McCandlish et al. 2018) from the accumulation
            micro-batches into `History.extras["noise"]` (a GradientNoiseScaleTracker; with
            accumulation_steps=1 every 4th step runs as two half micro-batches).
        schedule: a `BatchSchedule`, or the path of its JSON or of a plan file with one
            (`batchlab plan --json`): each phase's batch, micro-batch and lr from its start
            on, epochs kept exact (`loop.ScheduledBatch`); `History.extras["schedule"]`
            records where each phase began. Then `batch_size`, `lr`, `lr_rule` and
            `accumulation_steps` come from the schedule and must not be given.
    """
    task = load_task(task)
    if schedule is not None:
        return _train_scheduled(
            task, schedule, (batch_size, lr, lr_rule, accumulation_steps, track_noise),
            epochs=epochs, max_steps=max_steps, warmup_steps=warmup_steps, amp=amp,
            device=device, seed=seed, eval_every=eval_every, target=target, callbacks=callbacks,
        )  # fmt: skip
    if batch_size is None:
        raise ConfigError(
            "expected a `batch_size` (or a `schedule`), got neither; pass e.g. 32",
            param="batch_size",
        )
    check_batch_size(batch_size, what="batch_size")
    check_batch_size(accumulation_steps, what="accumulation_steps")
    if track_noise:
        callbacks = [*callbacks, _noise_tracker(task, accumulation_steps)]
    check_warmup_steps(warmup_steps)
    effective = batch_size * accumulation_steps
    if effective > task.num_train:
        raise ConfigError(
            f"effective batch size {effective} is larger than the training set of "
            f"{task.name!r} ({task.num_train} examples); use at most {task.num_train}"
        )
    base_lr = check_lr(task.lr if lr is None else lr)
    tgt = target_for_task(target, task)
    steps_per_epoch, total_steps = _plan_length(task.num_train, effective, epochs, max_steps, task)
    if eval_every is None:
        eval_every = max(1, min(steps_per_epoch, total_steps // 20))
    policy = FixedBatch(
        batch_size=batch_size,
        accumulation_steps=accumulation_steps,
        peak_lr=scale_lr(base_lr, task.batch_size, effective, lr_rule, b_simple=b_simple),
        lr_rule=lr_rule,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        eval_every=check_eval_every(eval_every),
        seed=seed,
    )
    dev = resolve_device(device)
    return run_training(
        task, policy, device=dev, amp=amp, seed=seed, target=tgt, callbacks=callbacks
    )


def _noise_tracker(task: Task, accumulation_steps: int) -> TrainCallback:
    """The tracker behind `track_noise=True`: with one micro-batch a step, every 4th step
    runs as two halves (the same update), as the adaptive engine does."""
    split_every = 4 if accumulation_steps == 1 else 0
    return GradientNoiseScaleTracker(
        num_examples=task.num_train, on_nonfinite="skip", split_every=split_every
    )


def load_schedule(path: str | Path) -> BatchSchedule:
    """The schedule in a JSON file: a `BatchSchedule`'s own, or a plan's `schedule` field.

    A missing, foreign or malformed file gets one `ConfigError` line naming it.
    """
    remake = "make one with `batchlab plan TASK --json plan.json` or `BatchSchedule.save`"
    data = read_json_object(path, "schedule file", remake, param="schedule")
    if "phases" not in data:  # a plan file: its recommended schedule
        forecast = data.get("schedule")
        if not (isinstance(forecast, dict) and isinstance(forecast.get("schedule"), dict)):
            raise ConfigError(
                f"schedule file {str(path)!r} has no schedule: expected a schedule's JSON or "
                f"a plan with one (a plan made from measured noise); {remake}",
                param="schedule",
            )
        data = forecast["schedule"]
    try:
        return BatchSchedule.from_dict(data)
    except FieldError as exc:
        raise ConfigError(
            f"schedule file {str(path)!r}: `schedule` field {exc}; {remake}", param="schedule"
        ) from None


def _train_scheduled(
    task: Task,
    schedule: BatchSchedule | str | Path,
    fixed_settings: tuple,
    *,
    epochs: float | None,
    max_steps: int | None,
    warmup_steps: int,
    amp: bool,
    device: str | torch.device,
    seed: int,
    eval_every: int | str | None,
    target: str | Target | None,
    callbacks: Sequence[TrainCallback],
) -> History:
    """`train(schedule=...)`: the run length in epochs (passes over the data), the loop with
    a `ScheduledBatch`."""
    batch_size, lr, lr_rule, accumulation_steps, track_noise = fixed_settings
    given = [
        name
        for name, value, default in (
            ("batch_size", batch_size, None),
            ("lr", lr, None),
            ("lr_rule", lr_rule, "none"),
            ("accumulation_steps", accumulation_steps, 1),
            ("track_noise", track_noise, False),
        )  # fmt: skip
        if value != default
    ]
    if given:
        raise ConfigError(
            f"`schedule` sets each phase's batch, micro-batch and lr; expected no "
            f"{', '.join(f'`{g}`' for g in given)} with it, got {given[0]}; drop it",
            param=given[0],
        )
    if not isinstance(schedule, BatchSchedule):
        schedule = load_schedule(schedule)
    largest = max(p.batch_size for p in schedule.phases)
    if largest > task.num_train:
        raise ConfigError(
            f"`schedule`: phase batch {largest} is larger than the training set of "
            f"{task.name!r} ({task.num_train} examples); use at most {task.num_train}",
            param="schedule",
        )
    check_warmup_steps(warmup_steps)
    check_run_length(epochs, max_steps)
    if epochs is None and max_steps is None:
        epochs = task.epochs or 1
    total = schedule_run_steps(schedule, task.num_train, math.inf if epochs is None else epochs,
                               max_steps)  # fmt: skip
    if eval_every is None:
        first_epoch = schedule_run_steps(schedule, task.num_train, 1)
        eval_every = max(1, min(first_epoch, total // 20))
    policy = ScheduledBatch(
        schedule,
        total_steps=total,
        eval_every=check_eval_every(eval_every),
        seed=seed,
        warmup_steps=warmup_steps,
    )
    tgt = target_for_task(target, task)
    return run_training(
        task, policy, device=resolve_device(device), amp=amp, seed=seed, target=tgt,
        callbacks=callbacks,
    )  # fmt: skip
