"""`batchlab.probe`: what fits (memory) and what runs fastest (throughput), in one result."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from batchlab.core.checks import check_batch_size
from batchlab.measure.budget import check_budget, check_margin
from batchlab.measure.distributed import agree_min, rank_device, world_size
from batchlab.measure.memory import DEFAULT_MARGIN, MemoryProbe, ProgressFn, probe_memory
from batchlab.measure.step_timing import one_thread_when_starved
from batchlab.measure.throughput import (
    TIME_BUDGET_SECONDS,
    AccumulationPlan,
    AlignmentFinding,
    ThroughputPoint,
    ThroughputProfile,
    check_time_budget,
    plan_accumulation,
    profile_throughput,
)
from batchlab.results import JsonResult
from batchlab.step import resolve_device
from batchlab.task import Task
from batchlab.tasks import load_task

BATCHNORM_MIN_BATCH = 8


@dataclass(frozen=True)
class ProbeResult(JsonResult):
    """Hardware analysis of one task on one device (every rank agrees under torchrun).

    `probe_steps` counts the training steps the memory search spent (warm-up and
    verification included); `throughput_steps` those spent timing.
    """

    task: str
    device: str
    world_size: int
    max_batch_size: int  # per device; the MIN over ranks under torchrun
    knee_batch_size: int
    knee_fraction: float
    aligned_knee_batch_size: int
    peak_samples_per_s: float
    memory: MemoryProbe
    throughput: tuple[ThroughputPoint, ...]
    alignment: tuple[AlignmentFinding, ...]
    accumulation: AccumulationPlan | None
    probe_steps: int
    throughput_steps: int
    predicted_only: bool
    local_max_batch_size: int  # this rank's own answer, before agreement
    seconds: float
    warnings: tuple[str, ...] = ()

    def throughput_profile(self) -> ThroughputProfile:
        """The throughput part as a `ThroughputProfile` (for plotting and planning)."""
        return ThroughputProfile(
            device=self.device,
            amp=self.memory.amp,
            points=self.throughput,
            knee_batch_size=self.knee_batch_size,
            knee_fraction=self.knee_fraction,
            peak_samples_per_s=self.peak_samples_per_s,
            alignment=self.alignment,
            aligned_knee_batch_size=self.aligned_knee_batch_size,
            steps=self.throughput_steps,
            seconds=0.0,
        )


@dataclass(frozen=True)
class ProbeSettings:
    """The settings of a hardware probe, defined and checked once.

    `probe`, `batchlab.plan` and the CLI each build one and hand it to `run_probe`, so
    the settings are passed on in one piece, and a bad one fails at once, before any
    measurement runs. Fields are those of `probe`.
    """

    device: str = "auto"
    memory_budget: str | int | float | None = None
    target_memory: str | int | float | None = None
    margin: float = DEFAULT_MARGIN
    amp: bool = False
    seed: int = 0
    throughput_seconds: float = TIME_BUDGET_SECONDS

    def __post_init__(self) -> None:
        check_budget(self.memory_budget, self.target_memory)
        check_margin(self.margin)
        check_time_budget(self.throughput_seconds, param="throughput_seconds")


def probe(
    task: Task | str,
    *,
    device: str = "auto",
    memory_budget: str | int | float | None = None,
    target_memory: str | int | float | None = None,
    margin: float = DEFAULT_MARGIN,
    amp: bool = False,
    seed: int = 0,
    effective_batch_size: int | None = None,
    throughput_seconds: float = TIME_BUDGET_SECONDS,
    check_alignment: bool = True,
    progress: ProgressFn | None = None,
) -> ProbeResult:
    """Largest batch that fits, throughput curve and knee, and an accumulation plan.

    Args are those of `probe_memory` and `profile_throughput`, plus
    `effective_batch_size`: plan gradient accumulation for it (default: the task's
    reference batch when that does not fit in one step).

    Under `torchrun` (an initialized process group) each rank probes its own device, and
    the ranks agree on the MIN of the max batch size (and of the knee) before timing.
    """
    # positional, in the order of ProbeSettings' fields
    settings = ProbeSettings(
        device, memory_budget, target_memory, margin, amp, seed, throughput_seconds
    )
    return run_probe(
        task,
        settings,
        effective_batch_size=effective_batch_size,
        check_alignment=check_alignment,
        progress=progress,
    )


def run_probe(
    task: Task | str,
    settings: ProbeSettings,
    *,
    effective_batch_size: int | None = None,
    check_alignment: bool = True,
    progress: ProgressFn | None = None,
) -> ProbeResult:
    """`probe` with its settings in one piece (what `batchlab.plan` and the CLI call)."""
    t0 = time.perf_counter()
    task = load_task(task)
    if effective_batch_size is not None:
        check_batch_size(effective_batch_size, what="effective batch size")
    s = settings
    device = rank_device(s.device)
    starved: list[str] = []  # the memory probe's steps, with one thread on a busy CPU
    with one_thread_when_starved(resolve_device(device), starved):
        memory = probe_memory(
            task, device=device, memory_budget=s.memory_budget, target_memory=s.target_memory,
            margin=s.margin, amp=s.amp, seed=s.seed, progress=progress,
        )  # fmt: skip
    max_batch = agree_min(memory.max_batch_size)
    profile = profile_throughput(
        task, max_batch_size=max_batch, device=device, amp=s.amp, seed=s.seed,
        time_budget=s.throughput_seconds, check_alignment=check_alignment, progress=progress,
    )  # fmt: skip
    knee = agree_min(profile.knee_batch_size)
    aligned = profile.aligned_knee_batch_size if knee == profile.knee_batch_size else knee

    warnings = list(memory.warnings) + list(profile.warnings)
    warnings += [f"memory probe run with 1 thread: the CPU was busy ({why})" for why in starved]
    if max_batch < memory.max_batch_size:
        warnings.append(
            f"this rank fits B={memory.max_batch_size}, but another rank fits only "
            f"B={max_batch}; every rank uses the minimum"
        )
    wanted = effective_batch_size
    if wanted is None and task.batch_size > max_batch:
        wanted = task.batch_size
    plan = None if wanted is None else plan_accumulation(wanted, max_batch, profile)
    per_device = plan.micro_batch_size if plan is not None else max_batch
    bn_warning = batchnorm_warning(task.model, per_device)
    if bn_warning is not None:
        warnings.append(bn_warning)
    return ProbeResult(
        task=task.name,
        device=memory.device,
        world_size=world_size(),
        max_batch_size=max_batch,
        knee_batch_size=knee,
        knee_fraction=profile.knee_fraction,
        aligned_knee_batch_size=aligned,
        peak_samples_per_s=profile.peak_samples_per_s,
        memory=memory,
        throughput=profile.points,
        alignment=profile.alignment,
        accumulation=plan,
        probe_steps=memory.probe_steps,
        throughput_steps=profile.steps,
        predicted_only=memory.predicted_only,
        local_max_batch_size=memory.max_batch_size,
        seconds=time.perf_counter() - t0,
        warnings=tuple(warnings),
    )


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def batchnorm_warning(model: nn.Module | type | object, per_device_batch: int) -> str | None:
    """A warning when a BatchNorm model would train with fewer than 8 examples per device.

    BatchNorm normalizes with the statistics of each device's micro-batch; at 1 they are
    meaningless, and below ~8 they are noisy enough to hurt (Wu & He 2018, "Group
    Normalization", Fig. 1). `model` is a module or a zero-argument factory.
    """
    if per_device_batch >= BATCHNORM_MIN_BATCH:
        return None
    if not isinstance(model, nn.Module):
        with torch.random.fork_rng():
            model = model()
    if not has_batchnorm(model):
        return None
    why = "meaningless" if per_device_batch == 1 else "noisy"
    return (
        f"the model has BatchNorm and the per-device batch is {per_device_batch} (< "
        f"{BATCHNORM_MIN_BATCH}): its batch statistics are {why}; use GroupNorm/LayerNorm, "
        "SyncBatchNorm across devices, or a smaller model"
    )
