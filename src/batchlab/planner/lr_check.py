"""The plan's LR check: train the rule's LR and its neighbours briefly at the recommended batch.

Scaling rules stop holding past the critical batch: on MNIST-1D with SGD+momentum the best
LR grows linearly up to B~256 and then plateaus at 0.16-0.32, while the linear rule keeps
growing and diverges at B=2048 (docs/DESIGN field notes; Shallue et al. 2019, fig. 8). So
before the plan recommends `(B, lr)`, it trains the rule's lr, x0.5 and x2 (and one more
halving while the best sits at the small edge, or doubling at the large one, up to x8) for
a few steps each, at B as the plan will run it (micro-batch x accumulation), from the same
start, the same batches and the same seed. The decision over the loss logs is pure:
`batchlab.core.lr_choice`.

Where the probes start: the plan passes where its noise phase ended (`measure.state.RunEnd`:
the weights and the optimizer's moments after 5% of the reference training at B0), so each
LR continues a run already past its start-up transient, where the bulk of training happens.
From initialisation the probes saw the start-up instead: a plateau where no LR trained in
20 steps (dots), or a lead of the rule's LR that the whole run reverses (mnist1d-mlp from
B0=100 at B=256: 0.016 kept, 0.008 best); from the noise phase's end they pick the sweep's
best LR or its neighbour (benchmarks/results/lr_check.md, section 4). Without a start, the
probe runs from initialisation with a short warm-up of its own (Goyal et al. 2017). Its cost
is stated in the result: `LrCheck.examples` against the reference training's examples.

It leaves no trace: each probe is a `train()` run on a fresh model, which forks the RNGs;
a task whose factory hands out one live model gets its weights, optimizer and RNG back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator

import torch

from batchlab.callbacks import TrainCallback
from batchlab.core.lr import warmup_steps_for
from batchlab.core.lr_choice import (
    MAX_STEPS_DOWN,
    LrCheck,
    LrTrial,
    decide,
    next_factor,
    probe_steps,
    summarize_trial,
)
from batchlab.errors import ConfigError
from batchlab.measure.memory import ProgressFn
from batchlab.measure.oom import is_oom_error
from batchlab.measure.state import RunEnd, StartFrom, preserve_training_state
from batchlab.planner.plan_types import Plan
from batchlab.task import Task
from batchlab.train import train


class _Progress(TrainCallback):
    def __init__(self, progress: ProgressFn, done: int) -> None:
        self.progress, self.done = progress, done

    def on_step(self, state) -> None:
        self.progress("lr check", self.done + state.step, None)


def probe_lr(
    task: Task,
    *,
    micro_batch_size: int,
    accumulation_steps: int,
    rule_lr: float,
    rule: str,
    planned_steps: int,
    warmup_steps: int = 0,
    steps: int | None = None,
    max_steps_down: int = MAX_STEPS_DOWN,
    device: str = "auto",
    amp: bool = False,
    seed: int = 0,
    progress: ProgressFn | None = None,
    start: RunEnd | None = None,
) -> LrCheck:
    """Probe `rule_lr` x 1, 0.5, 2 (and lower) at `micro_batch_size x accumulation_steps`.

    Args:
        rule_lr / rule: the LR the scaling rule gives at the batch, and the rule's name.
        planned_steps: optimizer steps of the run the plan recommends; each LR trains
            `core.lr_choice.probe_steps(planned_steps)` steps (at least 20), unless `steps`.
        warmup_steps: the plan's warm-up; the probe warms up over at most a quarter of
            its own steps.
        max_steps_down: halvings below x0.5 allowed while the best LR is the smallest tried.
        start: where every probe starts (weights and optimizer moments, `RunEnd`): the
            plan passes where its noise phase ended; None: the task's initialisation.
    Returns an `LrCheck`: the trials, the chosen LR and a one-sentence verdict.
    """
    steps = probe_steps(planned_steps) if steps is None else steps
    if steps < 4:
        raise ConfigError(
            f"`steps`: expected at least 4 probe steps (a first and a last quarter to compare), "
            f"got {steps}; pass more, or None for the default",
            param="steps",
        )
    warmup = min(warmup_steps, steps // 4)
    tail = max(2, steps // 4)  # tail-average the last quarter: one batch's loss swings
    batch = micro_batch_size * accumulation_steps
    t0 = time.perf_counter()
    trials: list[LrTrial] = []
    with _leave_no_trace(task) as reset:
        factor: float | None = 1.0
        while factor is not None:
            callbacks: list[TrainCallback] = []
            if start is not None:  # first: the step-0 loss is already the start's
                callbacks.append(StartFrom(start))
            if progress:
                callbacks.append(_Progress(progress, sum(t.steps for t in trials)))
            history = train(
                task,
                micro_batch_size,
                rule_lr * factor,
                accumulation_steps=accumulation_steps,
                max_steps=steps,
                warmup_steps=warmup,
                eval_every=steps,
                device=device,
                amp=amp,
                seed=seed,
                callbacks=callbacks,
            )
            trials.append(
                summarize_trial(
                    factor,
                    rule_lr,
                    history.train_loss,
                    steps=len(history.train_loss),
                    examples=history.total_examples,
                    tail_steps=tail,
                    diverged_step=history.diverged_step,
                )
            )
            reset()  # the next LR starts from the same weights
            factor = next_factor(trials, max_steps_down=max_steps_down)
    chosen, action, verdict = decide(trials, rule_lr)
    return LrCheck(
        batch_size=batch,
        micro_batch_size=micro_batch_size,
        accumulation_steps=accumulation_steps,
        rule=rule,
        rule_lr=rule_lr,
        chosen_lr=chosen,
        action=action,
        verdict=verdict,
        trials=tuple(trials),
        steps_per_lr=steps,
        warmup_steps=warmup,
        tail_steps=tail,
        examples=sum(t.examples for t in trials),
        reference_examples=(task.epochs or 1) * task.num_train,
        seconds=time.perf_counter() - t0,
        started_from=_where(start),
    )


def _where(start: RunEnd | None) -> str:
    if start is None:
        return "initialisation"
    return f"where the noise phase ended (step {start.step} at B={start.batch_size})"


@contextlib.contextmanager
def _leave_no_trace(task: Task) -> Iterator[Callable[[], None]]:
    """Fork the RNGs; yield a `reset()` that puts a shared live model back between probes.

    `train()` builds a fresh model per run, so a factory that returns new modules is left
    untouched; one that closes over a single module (`model=lambda: net`) would have `net`
    trained by each probe in turn, so its weights, grads, modes and RNG are snapshotted,
    put back after every probe (each LR starts from the same weights) and at the end.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        first, second = task.model(), task.model()
        if first is second:
            with preserve_training_state(first) as snapshot:
                yield snapshot.restore
        else:
            del first, second
            yield lambda: None


def check_recommended_lr(
    task: Task,
    plan: Plan,
    device: str = "auto",
    amp: bool = False,
    seed: int = 0,
    progress: ProgressFn | None = None,
    *,
    started: float | None = None,
    start: RunEnd | None = None,
) -> Plan:
    """The plan with its recommended LR probed at its batch (`Plan.lr_check` says how).

    `started`: the `time.perf_counter()` the plan began at, so `plan_seconds` counts the
    check too; the check's steps are added to `plan_steps`. `start`: where the noise phase
    ended, for the probes to continue from (None: from initialisation).
    """
    rec = plan.recommended
    m = plan.measurements
    if m.memory_predicted_only:
        why = "not run: the memory max is a prediction for another device, B may not fit here"
        return apply_lr_check(plan, _skipped(plan, why))
    epochs = m.reference_epochs or 1
    try:
        check = probe_lr(
            task,
            micro_batch_size=rec.micro_batch_size,
            accumulation_steps=rec.accumulation_steps,
            rule_lr=rec.lr,
            rule=rec.lr_rule,
            planned_steps=epochs * math.ceil(m.num_train / rec.batch_size),
            warmup_steps=rec.warmup_steps,
            device=device,
            amp=amp,
            seed=seed,
            progress=progress,
            start=start,
        )
    except Exception as exc:  # an OOM at a batch the probe predicted: report, do not fail
        if not is_oom_error(exc):
            raise
        check = _skipped(plan, f"not run: out of memory at a micro-batch of {rec.micro_batch_size}")
    checked = apply_lr_check(plan, check)
    seconds = checked.plan_seconds if started is None else time.perf_counter() - started
    return dataclasses.replace(
        checked,
        plan_seconds=seconds,
        plan_steps=plan.plan_steps + sum(t.steps for t in check.trials),
    )


def _skipped(plan: Plan, verdict: str) -> LrCheck:
    rec, m = plan.recommended, plan.measurements
    return LrCheck(
        batch_size=rec.batch_size,
        micro_batch_size=rec.micro_batch_size,
        accumulation_steps=rec.accumulation_steps,
        rule=rec.lr_rule,
        rule_lr=rec.lr,
        chosen_lr=rec.lr,
        action="skipped",
        verdict=verdict,
        trials=(),
        steps_per_lr=0,
        warmup_steps=0,
        tail_steps=0,
        examples=0,
        reference_examples=(m.reference_epochs or 1) * m.num_train,
    )


def apply_lr_check(plan: Plan, check: LrCheck) -> Plan:
    """Put `check` into the plan and make the recommended LR (and its warm-up) the checked one."""
    rec = plan.recommended
    reasons = dict(rec.reasons)
    reasons["lr_check"] = check.summary
    if math.isclose(check.chosen_lr, rec.lr):
        new = dataclasses.replace(rec, reasons=reasons)
        return dataclasses.replace(plan, lr_check=check, recommended=new)
    m = plan.measurements
    total = (m.reference_epochs or 1) * math.ceil(m.num_train / rec.batch_size)
    factor = check.chosen_lr / m.reference_lr
    warmup = warmup_steps_for(factor, total)
    reasons["warmup"] = (
        f"checked LR is {factor:.2g}x the reference: linear warm-up over 5% of the {total} "
        "planned steps (Goyal et al. 2017)"
        if warmup
        else f"checked LR is {factor:.2g}x <= 2x the reference: no warm-up needed"
    )
    new = dataclasses.replace(rec, lr=check.chosen_lr, warmup_steps=warmup, reasons=reasons)
    return dataclasses.replace(plan, lr_check=check, recommended=new)
