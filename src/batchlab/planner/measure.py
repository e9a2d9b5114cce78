"""`batchlab.plan(task)`: measure what fits, what runs fast and what learns, then decide.

The measurements run one after another, each through the training engine:
1. `probe` — the memory max and the throughput ladder with its knee;
2. `measure_noise` — B_simple along a real training phase at the reference settings that
   spends up to `noise_budget` (5%) of the reference training's examples and stops at the
   target: B_simple grows as the loss falls, so the plan fits it against the loss
   (`planner.noise_path`) and needs a range of losses, not the first 200 steps;
3. `build_plan` — pure decision logic over what was measured; the candidates it finds
   within reach of the fastest are then timed head to head (`planner.head_to_head`) and
   the plan is built again on those timings; then the LR check at the chosen batch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchlab.callbacks import TrainCallback
from batchlab.core.checks import check_batch_size
from batchlab.core.lr import PLAN_LR_RULES, check_lr_rule
from batchlab.core.optim import default_lr_rule
from batchlab.errors import BatchlabError, ConfigError
from batchlab.history import History
from batchlab.measure.memory import ProgressFn
from batchlab.measure.noise_run import NoiseInterrupted, NoiseRun, measure_noise
from batchlab.measure.oom import is_oom_error
from batchlab.measure.probe import ProbeResult, ProbeSettings, has_batchnorm, run_probe
from batchlab.measure.state import KeepRunEnd
from batchlab.measure.step_timing import one_thread_when_starved
from batchlab.planner.head_to_head import time_head_to_head
from batchlab.planner.lr_check import check_recommended_lr
from batchlab.planner.model import build_plan
from batchlab.planner.plan_types import Measurements, Plan
from batchlab.planner.reference import reference_seconds_to_target
from batchlab.planner.schedule import with_schedule
from batchlab.planner.trust import REFUSING_WARNINGS, PlanWarning
from batchlab.step import resolve_device
from batchlab.target import target_for_task
from batchlab.task import Task
from batchlab.tasks import load_task

DEFAULT_NOISE_BUDGET = 0.05  # fraction of the reference training's examples (epochs x N)
POINTS_PER_NOISE_RUN = 40  # tracker points along the noise phase
DEFAULT_THROUGHPUT_SECONDS = 10.0
BUSY_PHASES = ("hardware probe", "noise phase", "head-to-head timing", "LR check")


class PlanRefused(BatchlabError):
    """The measurements cannot support a recommendation (the noise phase's loss did not
    fall); `force=True` builds the plan anyway, with warnings."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(
            "no plan: " + "; ".join(reasons) + "; pass `force` to plan anyway (with warnings)",
            param="force",
        )
        self.reasons = reasons


class PlanInterrupted(BatchlabError):
    """Ctrl-C during planning; carries what was measured so far."""

    def __init__(self, phase: str, measured: dict[str, Any]) -> None:
        super().__init__(f"interrupted during {phase}; the plan is partial")
        self.phase = phase
        self.measured = measured


def check_target_for_task(target: str | None, task: Task) -> str | None:
    """Parse `target` and check the task reports its metric (names the available ones)."""
    tgt = target_for_task(target, task, check_metrics=True)
    return None if tgt is None else str(tgt)


def _aligned_multiple(result: ProbeResult) -> int | None:
    for finding in result.alignment:
        if finding.confirmed and finding.rule == "multiple_of_8":
            return 8
    return None


def _task_optimizer(task: Task) -> torch.optim.Optimizer:
    """The task's optimizer over a fresh model, without touching the global RNG."""
    with torch.random.fork_rng():
        return task.optimizer(task.model().parameters(), task.lr)


def measurements_from(
    task: Task, result: ProbeResult, noise: NoiseRun, noise_budget: float | None = None
) -> Measurements:
    """Collect what the plan needs from the probe and noise results."""
    with torch.random.fork_rng():
        model = task.model()
        optimizer = task.optimizer(model.parameters(), task.lr)
    memory = result.memory
    return Measurements(
        task=task.name,
        device=result.device,
        num_train=task.num_train,
        reference_batch_size=task.batch_size,
        reference_lr=task.lr,
        optimizer=type(optimizer).__name__,
        has_batchnorm=has_batchnorm(model),
        reference_epochs=task.epochs,
        max_batch_size=result.max_batch_size,
        memory_predicted_only=result.predicted_only,
        fixed_bytes=memory.fixed_bytes,
        bytes_per_sample=memory.bytes_per_sample,
        budget_bytes=memory.budget_bytes,
        margin=memory.margin,
        memory_points=tuple(p for p in memory.points if p.peak_bytes is not None),
        throughput=tuple(result.throughput),
        knee_batch_size=result.knee_batch_size,
        aligned_multiple=_aligned_multiple(result),
        noise=tuple(noise.points),
        noise_reliable=noise.final.reliable,
        noise_reason=noise.final.reason,
        probe_steps=result.probe_steps + result.throughput_steps,
        noise_steps=noise.steps,
        noise_batch_size=noise.batch_size,
        noise_every=noise.every,
        noise_window=1 / (1 - noise.beta) if noise.method == "two-batch" else 1.0,
        noise_target_step=noise.target_step,
        target_evals=noise.target_evals,
        noise_budget=noise_budget,
        noise_preconditioned=noise.preconditioned,
    )


class _NoiseProgress(TrainCallback):
    def __init__(self, progress: ProgressFn) -> None:
        self.progress = progress

    def on_step(self, state) -> None:
        self.progress("noise", state.step, state.total_steps)


def plan(
    task: Task | str,
    *,
    device: str = "auto",
    memory_budget: str | int | float | None = None,
    target_memory: str | int | float | None = None,
    margin: float = 0.1,
    amp: bool = False,
    noise_budget: float = DEFAULT_NOISE_BUDGET,
    noise_steps: int | None = None,
    throughput_seconds: float = DEFAULT_THROUGHPUT_SECONDS,
    lr_rule: str | None = None,
    target: str | None = None,
    reference_run: History | str | Path | None = None,
    seed: int = 0,
    command: str = "",
    progress: ProgressFn | None = None,
    check_lr: bool = True,
    force: bool = False,
) -> Plan:
    """Measure, then recommend a batch size, learning rate, warm-up and accumulation.

    Args:
        memory_budget / target_memory / margin / amp: as in `batchlab.probe`.
        noise_budget: the most the noise phase may train, as a fraction of the reference
            training's examples (task epochs x N); default 0.05. It trains at the task's
            reference batch and lr, and stops early at `target`.
        noise_steps: a lower cap on the noise phase's steps (default: the budget's).
        throughput_seconds: rough time budget of the throughput ladder.
        lr_rule: force `linear`, `sqrt` or `adascale` (default: the optimizer family's
            rule, `batchlab.core.optim.default_lr_rule`).
        target: e.g. `val_acc>=0.9`; checked against the task's metrics.
        reference_run: a `History` (or its JSON path) of a reference-batch run with the
            same target; the plan then also predicts absolute seconds to target.
        check_lr: probe the recommended LR at the recommended batch (x0.5, x1, x2 for a
            few steps, `batchlab.planner.lr_check`) and lower it where the rule's does not
            train; the plan's `lr_check` says what was tried.
        force: recommend even when the noise phase's loss did not fall or its B_simple
            is unreliable; the plan's warnings say why it should not be trusted.

    Raises `PlanRefused` (one line, the reasons) when the measurements cannot support a
    recommendation and `force` is False: a confident answer from bad data is worse than none.

    Raises `PlanInterrupted` on Ctrl-C, carrying whatever was measured by then.
    """
    t0 = time.perf_counter()
    task = load_task(task)
    steps = noise_phase_steps(task, noise_budget, noise_steps)
    if lr_rule is None:  # decided before minutes of measuring, from the optimizer itself
        lr_rule = default_lr_rule(_task_optimizer(task))
    check_lr_rule(lr_rule, PLAN_LR_RULES)
    settings = ProbeSettings(  # checks them now, before anything is measured
        device, memory_budget, target_memory, margin, amp, seed, throughput_seconds
    )
    dev = resolve_device(device)  # where the head-to-head and the LR check train
    target = check_target_for_task(target, task)
    reference_seconds = _reference_seconds(reference_run, task, target)
    # The phases run with one thread because the CPU was busy, and why (`_busy_before`).
    busy: dict[str, list[str]] = {p: [] for p in BUSY_PHASES}
    measured = _measure(
        task, settings, noise_steps=steps, target=target, progress=progress, busy=busy
    )
    m = measurements_from(task, measured["probe"], measured["noise"], noise_budget)

    def build(m: Measurements) -> Plan:
        return build_plan(
            m,
            lr_rule=lr_rule,
            reference_seconds_to_target=reference_seconds,
            target=target,
            plan_seconds=time.perf_counter() - t0,
            command=command,
            probe=measured["probe"],
            noise=measured["noise"],
        )

    built = build(m)
    refusing = [w.message for w in built.warnings if w.code in REFUSING_WARNINGS]
    if refusing and not force:
        raise PlanRefused(refusing)
    try:  # the sizes that decide, timed again side by side (planner/head_to_head.py)
        with one_thread_when_starved(dev, busy["head-to-head timing"], earlier=_busy_before(busy)):
            built = build(time_head_to_head(task, built, settings, progress))
    except KeyboardInterrupt:
        raise PlanInterrupted("the head-to-head timing", measured) from None
    except Exception as exc:  # an OOM or a budget it cannot meet: the ladder's plan stands
        if not (is_oom_error(exc) or isinstance(exc, BatchlabError)):
            raise
        skipped = PlanWarning("head-to-head", f"the head-to-head timing was skipped: {exc}")
        built = dataclasses.replace(built, warnings=(*built.warnings, skipped))
    if check_lr:  # the recommended LR, probed at its batch (planner/lr_check.py)
        try:
            with one_thread_when_starved(dev, busy["LR check"], earlier=_busy_before(busy)):
                built = check_recommended_lr(
                    task, built, device, amp, seed, progress, started=t0, start=measured["end"]
                )
        except KeyboardInterrupt:  # keep the minutes of probe and noise already measured
            raise PlanInterrupted("the LR check", measured) from None
    built = _with_busy_warning(built, busy)
    return with_schedule(built)  # B(t) rising with the predicted B_noise(t)


def _busy_before(busy: dict[str, list[str]]) -> str | None:
    """Why an earlier phase ran with one thread (the first reason), or None."""
    return next((why[0] for why in busy.values() if why), None)


def _with_busy_warning(built: Plan, busy: dict[str, list[str]]) -> Plan:
    """The plan, with a warning naming the training phases run with one thread because
    the CPU's threads were starved (`measure.step_timing.one_thread_when_starved`)."""
    phases = [phase for phase, why in busy.items() if why]
    if not phases:
        return built
    timed = any(busy[p] for p in ("hardware probe", "head-to-head timing"))
    warning = PlanWarning(
        "busy-cpu",
        f"the CPU was busy ({_busy_before(busy)}), so the {', '.join(phases)} ran with 1 "
        "torch thread, at about quiet speed (their numbers agree with a run on more threads "
        "to rounding" + ("; the step times are 1-thread times)" if timed else ")"),
    )
    return dataclasses.replace(built, warnings=(*built.warnings, warning))


def noise_phase_steps(task: Task, noise_budget: float, noise_steps: int | None = None) -> int:
    """Steps of the noise phase at the reference batch: `noise_budget` x epochs x N examples.

    Capped by `noise_steps` when given; the budget is never exceeded.
    """
    if not (isinstance(noise_budget, (int, float)) and 0 < noise_budget <= 1):
        raise ConfigError(
            f"`noise_budget`: expected a fraction of the reference training in (0, 1], "
            f"got {noise_budget!r}; e.g. 0.05",
            param="noise_budget",
        )
    reference_examples = (task.epochs or 1) * task.num_train
    steps = int(noise_budget * reference_examples // task.batch_size)
    if steps < 1:
        raise ConfigError(
            f"`noise_budget` {noise_budget:g} of {reference_examples} reference examples is "
            f"less than one step at the reference batch {task.batch_size}; raise it",
            param="noise_budget",
        )
    if noise_steps is not None:
        check_batch_size(noise_steps, what="noise steps")
        steps = min(steps, noise_steps)
    return steps


def _reference_seconds(
    reference_run: History | str | Path | None, task: Task, target: str | None
) -> float | None:
    """Seconds to target of the reference run, checked against this task and target."""
    if reference_run is None:
        return None
    return reference_seconds_to_target(reference_run, task, target)


def _measure(
    task: Task,
    settings: ProbeSettings,
    *,
    noise_steps: int,
    target: str | None,
    progress: ProgressFn | None,
    busy: dict[str, list[str]],
) -> dict[str, Any]:
    """The probe, then the noise measurement; on Ctrl-C, `PlanInterrupted` with the results
    so far. `busy[phase]` gets why the phase ran with one thread, if it did."""
    measured: dict[str, Any] = {}
    phase = "the hardware probe"
    device = resolve_device(settings.device)
    try:
        with one_thread_when_starved(device, busy["hardware probe"]):
            measured["probe"] = run_probe(task, settings, progress=progress)
        phase = "the noise measurement"
        end = KeepRunEnd()  # where the noise phase ends: the LR check's probes start there
        callbacks = [end, *([_NoiseProgress(progress)] if progress is not None else [])]
        with one_thread_when_starved(device, busy["noise phase"], earlier=_busy_before(busy)):
            measured["noise"] = measure_noise(
                task,
                steps=noise_steps,
                every=max(1, noise_steps // POINTS_PER_NOISE_RUN),
                target=target,
                seed=settings.seed,
                device=settings.device,
                callbacks=callbacks,
                # For an Adam-like optimizer, B_simple in the geometry Adam steps in (plain
                # B_simple otherwise): on mnist1d-mlp the plain value puts the critical batch
                # at 0.4x the sweep's (benchmarks/results/plan_regret.md).
                preconditioned=True,
            )
        measured["end"] = end.end
    except NoiseInterrupted as exc:  # the points measured so far are kept, and saved
        measured["noise"] = exc.partial
        raise PlanInterrupted(phase, measured) from None
    except KeyboardInterrupt:
        raise PlanInterrupted(phase, measured) from None
    return measured


@dataclass(frozen=True)
class PartialPlan:
    """What an interrupted plan had measured (for the CLI to print and save)."""

    phase: str
    probe: ProbeResult | None
    noise: NoiseRun | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "partial": True,
            "interrupted_during": self.phase,
            "probe": None if self.probe is None else self.probe.to_dict(),
            "noise": None if self.noise is None else self.noise.to_dict(),
        }
