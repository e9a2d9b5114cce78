"""The one training engine. Every number batchlab reports is measured through it.

It adds nothing a hand-written loop would not have: in-memory datasets are indexed on the
device, the loss is read back to the host only where needed, evaluation runs under
`torch.no_grad()` at a large batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from batchlab.callbacks import RunState, TrainCallback
from batchlab.data import Batcher, epoch_chunks
from batchlab.errors import ConfigError
from batchlab.history import History
from batchlab.recorder import RunRecorder
from batchlab.step import (
    autocast_context,
    build_step,
    check_scalar_loss,
    resolve_device,
)
from batchlab.target import Target, target_for_task
from batchlab.task import Task, check_batch_size, check_lr, check_warmup_steps, load_task
from batchlab.theory import scale_lr

EVAL_BATCH_SIZE = 1024


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


def _plan_length(
    num_train: int, effective_batch: int, epochs: float | None, max_steps: int | None, task: Task
) -> tuple[int, int]:
    steps_per_epoch = math.ceil(num_train / effective_batch)
    if max_steps is not None:
        check_batch_size(max_steps, what="max steps")
    if epochs is not None and (not isinstance(epochs, (int, float)) or epochs <= 0):
        raise ConfigError(f"epochs: expected a positive number, got {epochs!r}")
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
    batch_size: int,
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
    eval_every: int | None = None,
    target: str | Target | None = None,
    b_simple: float | None = None,
    callbacks: Sequence[TrainCallback] = (),
    track_noise: bool = False,
) -> History:
    """Train `task` at micro-batch `batch_size` and return its `History`.

    Args:
        batch_size: examples per micro-batch; an optimizer step sees
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
            least ~20 times a run).
        target: e.g. `val_acc>=0.9`; the run stops at the first evaluation reaching it.
        callbacks: `TrainCallback`s, e.g. a progress bar or a noise tracker.
        track_noise: record B_simple (McCandlish et al. 2018) from the accumulation
            micro-batches into `History.extras["noise"]` (a GradientNoiseScaleTracker; needs
            accumulation_steps >= 2).
    """
    task = load_task(task)
    check_batch_size(batch_size)
    check_batch_size(accumulation_steps, what="accumulation steps")
    if track_noise:
        if accumulation_steps < 2:
            raise ConfigError(
                "track_noise: expected accumulation_steps >= 2 (the tracker contrasts "
                f"micro-batch gradients with the step's), got {accumulation_steps!r}"
            )
        from batchlab.tracking import GradientNoiseScaleTracker

        tracker = GradientNoiseScaleTracker(num_examples=task.num_train, on_nonfinite="skip")
        callbacks = [*callbacks, tracker]
    check_warmup_steps(warmup_steps)
    effective = batch_size * accumulation_steps
    if effective > task.num_train:
        raise ConfigError(
            f"effective batch size {effective} is larger than the training set of "
            f"{task.name!r} ({task.num_train} examples); use at most {task.num_train}"
        )
    base_lr = check_lr(task.lr if lr is None else lr)
    peak_lr = scale_lr(base_lr, task.batch_size, effective, lr_rule, b_simple=b_simple)
    tgt = target_for_task(target, task)
    steps_per_epoch, total_steps = _plan_length(task.num_train, effective, epochs, max_steps, task)
    if eval_every is None:
        eval_every = max(1, min(steps_per_epoch, total_steps // 20))
    check_batch_size(eval_every, what="eval every")
    dev = resolve_device(device)

    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        return _run(
            task,
            dev,
            batch_size=batch_size,
            accumulation_steps=accumulation_steps,
            peak_lr=peak_lr,
            lr_rule=lr_rule,
            warmup_steps=warmup_steps,
            amp=amp,
            seed=seed,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            eval_every=eval_every,
            target=tgt,
            callbacks=callbacks,
        )


def _run(
    task: Task,
    dev: torch.device,
    *,
    batch_size: int,
    accumulation_steps: int,
    peak_lr: float,
    lr_rule: str,
    warmup_steps: int,
    amp: bool,
    seed: int,
    total_steps: int,
    steps_per_epoch: int,
    eval_every: int,
    target: Target | None,
    callbacks: Sequence[TrainCallback],
) -> History:
    effective = batch_size * accumulation_steps
    step_fn = build_step(task, dev, lr=peak_lr, micro_batch_size=batch_size, amp=amp)
    model, optimizer = step_fn.model, step_fn.optimizer
    # Each param group keeps its own ratio to the peak lr during warm-up.
    group_ratios = [g["lr"] / peak_lr for g in optimizer.param_groups]
    state = RunState(task, model, optimizer, step_fn, dev, total_steps, steps_per_epoch, effective)
    rec = RunRecorder(state, amp=amp, target=target, callbacks=callbacks)
    generator = torch.Generator().manual_seed(seed)
    # Reading the loss back forces a CUDA sync; on CPU it is free, so check every step.
    sync_every = 1 if dev.type == "cpu" else 25

    def lr_at(step: int) -> float:  # step is 1-based
        if warmup_steps and step <= warmup_steps:
            return peak_lr * step / warmup_steps
        return peak_lr

    for cb in callbacks:
        cb.on_start(state)
    rec.evaluate()
    chunks: list[torch.Tensor] = []
    rec.start_clock()
    while not rec.done and state.step < total_steps:
        if not chunks:
            chunks = epoch_chunks(task.num_train, effective, generator)
            chunks.reverse()  # pop() from the end walks the epoch in order
        indices = chunks.pop()
        step = state.step + 1
        lr_now = lr_at(step)
        if warmup_steps and step <= warmup_steps + 1:
            for group, ratio in zip(optimizer.param_groups, group_ratios, strict=True):
                group["lr"] = lr_now * ratio
        loss = step_fn(indices)
        state.step = step
        state.examples += len(indices)
        rec.record_step(step, loss, lr_now)
        for cb in callbacks:
            cb.on_step(state)
        is_eval = step % eval_every == 0 or step == total_steps
        if (is_eval or step % sync_every == 0) and rec.flush() is not None:
            break
        if is_eval:
            rec.evaluate()
    rec.stop_clock()
    rec.flush()
    for cb in callbacks:
        cb.on_end(state)
    return rec.history(
        batch_size=batch_size,
        accumulation_steps=accumulation_steps,
        effective_batch_size=effective,
        lr=peak_lr,
        lr_rule=lr_rule,
        warmup_steps=warmup_steps,
        seed=seed,
    )
