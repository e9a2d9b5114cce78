"""The adaptive training loop behind `batchlab train TASK --adaptive`.

Same pieces as `batchlab.train` (`TrainStep`, `Batcher`, `evaluate`, `History`), with three
additions: the examples come from a `ResizableBatchSampler`, every step is timed per
micro-batch to feed the `ThroughputModel`, and every `interval` steps the
`AdaptiveBatchSize` controller may change `(micro_batch_size, accumulation_steps)` and the
learning rate. Changes happen between optimizer steps only.

Run length is counted in reference-batch epochs of progress (sum of B * E(B) / N): at a
bigger batch each example is worth less, so `epochs=20` means "as far as 20 epochs at the
task's reference batch get", not 20 passes over the data. Evaluations are spaced by the
examples actually seen, so they line up with those of fixed-batch runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchlab.adaptive.controller import AdaptiveBatchSize, LrRule
from batchlab.adaptive.noise_source import FixedNoise, NoiseSource
from batchlab.adaptive.sampler import ResizableBatchSampler
from batchlab.adaptive.throughput_model import FixedThroughput, ThroughputModel
from batchlab.core.checks import check_batch_size, check_lr, check_warmup_steps
from batchlab.core.step_time import StepTimeModel
from batchlab.errors import ConfigError
from batchlab.history import History
from batchlab.recorder import RunRecorder
from batchlab.step import TrainStep, build_step, resolve_device
from batchlab.target import Target, target_for_task
from batchlab.task import Task, load_task
from batchlab.train import RunState, TrainCallback

NoiseArg = float | Callable[[int], float] | NoiseSource | None


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
) -> History:
    """Train `task` with a batch size that follows the measured goodput; return its History.

    It starts at the task's reference batch B0 and lr, and every `interval` optimizer steps
    lets `AdaptiveBatchSize` pick the batch that maximises throughput x efficiency.

    Args:
        lr: learning rate at the reference batch (default: the task's).
        epochs: run length in reference-batch epochs of progress (default: the task's).
        max_steps: stop after this many optimizer steps, whichever ends first.
        lr_rule: `auto` (AdaScale gain for SGD-like optimizers, its square root for
            Adam-like), `adascale`, `sqrt-adascale`, `none`, or `(lr0, gain) -> lr`.
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
    """
    task = load_task(task)
    base_lr = check_lr(task.lr if lr is None else lr)
    check_warmup_steps(warmup_steps)
    if epochs is not None and (not isinstance(epochs, (int, float)) or epochs <= 0):
        raise ConfigError(f"epochs: expected a positive number, got {epochs!r}")
    if max_steps is not None:
        check_batch_size(max_steps, what="max steps")
    ref_epochs = float(epochs if epochs is not None else (task.epochs or 1))
    if max_batch_size is None:
        max_batch_size = max(task.batch_size, min(64 * task.batch_size, task.num_train // 4))
    if max_batch_size > task.num_train:
        raise ConfigError(
            f"max batch size {max_batch_size} is larger than the training set of "
            f"{task.name!r} ({task.num_train} examples); use at most {task.num_train}"
        )
    tgt = target_for_task(target, task)
    ref_steps_per_epoch = math.ceil(task.num_train / task.batch_size)
    if eval_every is None:
        eval_every = max(1, min(ref_steps_per_epoch, int(ref_epochs * ref_steps_per_epoch) // 20))
    check_batch_size(eval_every, what="eval every")
    dev = resolve_device(device)
    settings = dict(
        lr_rule=lr_rule,
        max_micro_batch_size=memory_cap,
        max_batch_size=max_batch_size,
        max_accumulation_steps=max_accumulation_steps,
        interval=interval,
        threshold=threshold,
    )
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        return _run(
            task,
            dev,
            base_lr=base_lr,
            settings=settings,
            b_simple=b_simple,
            fixed_throughput=throughput,
            ref_epochs=ref_epochs,
            max_steps=max_steps,
            warmup_steps=warmup_steps,
            amp=amp,
            seed=seed,
            eval_every_examples=eval_every * task.batch_size,
            target=tgt,
            callbacks=callbacks,
        )


class _StepTimer:
    """Times each micro-batch of a step through `TrainStep.micro_hook`.

    Wraps whatever hook was installed before (a noise tracker), so both run; the wrapped
    hook's own time lands in the optimizer-step share, where per-step overhead belongs.
    """

    def __init__(self, step_fn: TrainStep, sync: Callable[[], None]) -> None:
        self.inner = step_fn.micro_hook
        self.sync = sync
        self.enabled = False
        self.micro_seconds: list[tuple[int, float]] = []  # (micro-batch size, seconds)
        self._last = 0.0
        step_fn.micro_hook = self

    def start(self, enabled: bool) -> None:
        self.enabled = enabled
        self.micro_seconds = []
        if enabled:
            self.sync()
            self._last = time.perf_counter()

    def __call__(self, index: int, num_micro: int, size: int) -> None:
        if self.enabled:
            self.sync()
            now = time.perf_counter()
            self.micro_seconds.append((size, now - self._last))
        if self.inner is not None:
            self.inner(index, num_micro, size)
        if self.enabled:
            self._last = time.perf_counter()

    def finish(self) -> float:
        """Seconds from the last micro-batch to now (the optimizer step)."""
        self.sync()
        return time.perf_counter() - self._last


def _noise_source(b_simple: NoiseArg) -> NoiseSource:
    if b_simple is None:
        from batchlab.adaptive.measured_noise import MeasuredNoise

        return MeasuredNoise()
    if isinstance(b_simple, NoiseSource):
        return b_simple
    return FixedNoise(b_simple)


def _run(
    task: Task,
    dev: torch.device,
    *,
    base_lr: float,
    settings: dict[str, Any],
    b_simple: NoiseArg,
    fixed_throughput: StepTimeModel | None,
    ref_epochs: float,
    max_steps: int | None,
    warmup_steps: int,
    amp: bool,
    seed: int,
    eval_every_examples: int,
    target: Target | None,
    callbacks: Sequence[TrainCallback],
) -> History:
    step_fn = build_step(task, dev, lr=base_lr, micro_batch_size=task.batch_size, amp=amp)
    model, optimizer = step_fn.model, step_fn.optimizer
    group_ratios = [g["lr"] / base_lr for g in optimizer.param_groups]
    throughput = (
        ThroughputModel() if fixed_throughput is None else FixedThroughput(fixed_throughput)
    )
    controller = AdaptiveBatchSize(
        task.batch_size, base_lr, optimizer=optimizer, throughput=throughput, **settings
    )
    step_fn.micro_batch_size = controller.micro_batch_size
    noise = _noise_source(b_simple)
    split_every = (
        getattr(noise, "split_every", 0) if getattr(noise, "needs_micro_batches", False) else 0
    )
    budget = ref_epochs * task.num_train  # in reference-batch examples of progress
    ref_steps = math.ceil(budget / task.batch_size)
    state = RunState(
        task,
        model,
        optimizer,
        step_fn,
        dev,
        total_steps=ref_steps if max_steps is None else min(ref_steps, max_steps),
        steps_per_epoch=math.ceil(task.num_train / controller.batch_size),
        effective_batch_size=controller.batch_size,
    )
    sampler = ResizableBatchSampler(task.num_train, controller.batch_size, seed=seed)
    # On CUDA, timing a step needs synchronisation; time one step in `cuda_time_every`.
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    cuda_time_every = 5

    batch_sizes: list[int] = []
    hooks = [cb for cb in (noise, *callbacks) if isinstance(cb, TrainCallback)]
    rec = RunRecorder(state, amp=amp, target=target, callbacks=callbacks)

    for cb in hooks:
        cb.on_start(state)
    timer = _StepTimer(step_fn, sync)  # after on_start: wraps any hook a tracker installed
    rec.evaluate()

    next_eval = eval_every_examples
    fresh_config = True  # the first step at a new micro-batch size pays one-off costs
    rec.start_clock()
    while not rec.done and controller.reference_examples < budget - 1e-9:
        if max_steps is not None and state.step >= max_steps:
            break
        indices = sampler.take(controller.batch_size)
        if indices is None:  # end of an epoch
            continue
        step = state.step + 1
        factor = min(1.0, step / warmup_steps) if warmup_steps else 1.0
        lr_now = controller.lr * factor
        for group, ratio in zip(optimizer.param_groups, group_ratios, strict=True):
            group["lr"] = lr_now * ratio
        # No accumulation: split every few steps in two for the noise estimate (same update).
        split = (
            split_every > 0
            and controller.accumulation_steps == 1
            and step % split_every == 0
            and len(indices) >= 4
        )
        timed = not split and not fresh_config and (not cuda or step % cuda_time_every == 0)
        timer.start(timed)
        if split:
            step_fn.micro_batch_size = (len(indices) + 1) // 2
        loss = step_fn(torch.as_tensor(indices))
        step_fn.micro_batch_size = controller.micro_batch_size
        if timed:
            optimizer_seconds = timer.finish()
            for size, seconds in timer.micro_seconds:
                throughput.observe_micro(size, seconds)
            throughput.observe_optimizer(optimizer_seconds)
        fresh_config = False
        controller.record_step(len(indices))
        state.step = step
        state.examples += len(indices)
        rec.record_step(step, loss, lr_now)
        batch_sizes.append(len(indices))
        # The controller reads the loss every step anyway: CPU free, CUDA a sync per step.
        diverged = rec.flush() is not None
        for cb in hooks:
            cb.on_step(state)
        if diverged:
            break
        if controller.due(step):
            before = (controller.micro_batch_size, controller.accumulation_steps)
            decision = controller.decide(step, noise.b_simple(step))
            after = (decision.micro_batch_size, decision.accumulation_steps)
            if after != before:
                step_fn.micro_batch_size = decision.micro_batch_size
                state.effective_batch_size = decision.batch_size
                state.steps_per_epoch = math.ceil(task.num_train / decision.batch_size)
                fresh_config = after[0] != before[0]
        if state.examples >= next_eval or controller.reference_examples >= budget - 1e-9:
            next_eval = (state.examples // eval_every_examples + 1) * eval_every_examples
            rec.evaluate()
    rec.stop_clock()
    if rec.evals[-1].step != state.step and rec.diverged_step is None:
        rec.evaluate()  # stopped between evaluations
    for cb in hooks:
        cb.on_end(state)

    adaptive = {
        "lr_rule": controller.lr_rule if isinstance(controller.lr_rule, str) else "custom",
        "reference_batch_size": task.batch_size,
        "reference_lr": base_lr,
        "reference_epochs": controller.reference_epochs(task.num_train),
        "batch_sizes": batch_sizes,
        "throughput_fit": throughput.fit().to_dict() if throughput.ready else None,
        "decisions": [d.to_dict() for d in controller.decisions],
    }
    return rec.history(
        batch_size=controller.micro_batch_size,
        accumulation_steps=controller.accumulation_steps,
        effective_batch_size=controller.batch_size,
        lr=max(rec.lrs) if rec.lrs else controller.lr,
        lr_rule=f"adaptive ({adaptive['lr_rule']})",
        warmup_steps=warmup_steps,
        seed=seed,
        final={"reference_epochs": controller.reference_epochs(task.num_train)},
        extras={"adaptive": adaptive},
    )
