"""`batchlab.plan(task)`: measure what fits, what runs fast and what learns, then decide.

The three measurements run one after another, each through the training engine:
1. `probe` — the memory max and the throughput ladder with its knee;
2. `measure_noise` — B_simple over a short real training phase at the reference settings
   (B_simple grows as training progresses, so a value at initialisation alone would be
   biased low);
3. `build_plan` — pure decision logic over what was measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
from batchlab.measure.noise_run import NoiseRun, measure_noise
from batchlab.measure.probe import ProbeResult, ProbeSettings, has_batchnorm, run_probe
from batchlab.planner.lr_check import check_recommended_lr
from batchlab.planner.model import Measurements, Plan, build_plan
from batchlab.target import target_for_task
from batchlab.task import Task
from batchlab.tasks import load_task

DEFAULT_NOISE_STEPS = 200
DEFAULT_THROUGHPUT_SECONDS = 10.0
ProgressFn = Callable[[str, float, float | None], None]


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


def measurements_from(task: Task, result: ProbeResult, noise: NoiseRun) -> Measurements:
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
    noise_steps: int = DEFAULT_NOISE_STEPS,
    throughput_seconds: float = DEFAULT_THROUGHPUT_SECONDS,
    lr_rule: str | None = None,
    target: str | None = None,
    reference_run: History | str | Path | None = None,
    seed: int = 0,
    command: str = "",
    progress: ProgressFn | None = None,
    check_lr: bool = True,
) -> Plan:
    """Measure, then recommend a batch size, learning rate, warm-up and accumulation.

    Args:
        memory_budget / target_memory / margin / amp: as in `batchlab.probe`.
        noise_steps: optimizer steps of the B_simple measurement phase, at the task's
            reference batch and lr.
        throughput_seconds: rough time budget of the throughput ladder.
        lr_rule: force `linear`, `sqrt` or `adascale` (default: the optimizer family's
            rule, `batchlab.core.optim.default_lr_rule`).
        target: e.g. `val_acc>=0.9`; checked against the task's metrics.
        reference_run: a `History` (or its JSON path) of a reference-batch run with the
            same target; the plan then also predicts absolute seconds to target.
        check_lr: probe the recommended LR at the recommended batch (x0.5, x1, x2 for a
            few steps, `batchlab.planner.lr_check`) and lower it where the rule's does not
            train; the plan's `lr_check` says what was tried.

    Raises `PlanInterrupted` on Ctrl-C, carrying whatever was measured by then.
    """
    t0 = time.perf_counter()
    task = load_task(task)
    check_batch_size(noise_steps, what="noise steps")
    if lr_rule is None:  # decided before minutes of measuring, from the optimizer itself
        lr_rule = default_lr_rule(_task_optimizer(task))
    check_lr_rule(lr_rule, PLAN_LR_RULES)
    settings = ProbeSettings(  # checks them now, before anything is measured
        device, memory_budget, target_memory, margin, amp, seed, throughput_seconds
    )
    target = check_target_for_task(target, task)
    reference_seconds = _reference_seconds(reference_run)
    measured = _measure(task, settings, noise_steps=noise_steps, progress=progress)
    m = measurements_from(task, measured["probe"], measured["noise"])
    built = build_plan(
        m,
        lr_rule=lr_rule,
        reference_seconds_to_target=reference_seconds,
        target=target,
        plan_seconds=time.perf_counter() - t0,
        command=command,
        probe=measured["probe"],
        noise=measured["noise"],
    )
    if check_lr:  # the recommended LR, probed at its batch (planner/lr_check.py)
        built = check_recommended_lr(task, built, device, amp, seed, progress, started=t0)
    return built


def _reference_seconds(reference_run: History | str | Path | None) -> float | None:
    """Seconds to target of the reference run, which must have reached its target."""
    if reference_run is None:
        return None
    history = reference_run if isinstance(reference_run, History) else History.load(reference_run)
    if history.seconds_to_target is None:
        raise ConfigError(
            f"the reference run never reached its target ({history.target}); pass as "
            "`reference_run` a run that did (train with a `target`, save its History)"
        )
    return history.seconds_to_target


def _measure(
    task: Task, settings: ProbeSettings, *, noise_steps: int, progress: ProgressFn | None
) -> dict[str, Any]:
    """The probe, then the noise measurement; on Ctrl-C, `PlanInterrupted` with the results so far."""
    measured: dict[str, Any] = {}
    phase = "the hardware probe"
    try:
        measured["probe"] = run_probe(task, settings, progress=progress)
        phase = "the noise measurement"
        callbacks = [_NoiseProgress(progress)] if progress is not None else []
        measured["noise"] = measure_noise(
            task,
            steps=noise_steps,
            every=max(1, noise_steps // 20),
            seed=settings.seed,
            device=settings.device,
            callbacks=callbacks,
        )
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
