"""What fits: the memory probe. The largest batch whose full training step fits, verified.

The quantity measured is the peak of one *whole* optimizer step (forward, backward and
`optimizer.step()` with its state already created, AMP when asked), run by the engine's
`TrainStep`, so the numbers match real training. Tools that measure forward+backward only
(YOLO's AutoBatch) miss the optimizer's temporaries and OOM later.

The parts, each in its own module: `sizes` (parse and format bytes), `oom` (the one
`is_oom_error`), `memory_fit` (the memory model), `batch_search` (the search, pure),
`cpu_replay` and `step_memory` (measuring one real step), `budget` (how many bytes).

The search refines the memory model's first prediction with the two measured points
nearest the limit, and never reports a batch size that was not run for real (except with
`target_memory`, which is a labelled prediction for a device you do not have).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from batchlab.data import Batcher
from batchlab.errors import BatchlabError, TaskError
from batchlab.measure.batch_search import (
    FIT_BATCH_SIZES,
    MAX_SEARCH_STEPS,
    TOLERANCE,
    BatchSearch,
    StepPeak,
    find_max_batch_size,
)
from batchlab.measure.budget import check_margin, resolve_budget
from batchlab.measure.memory_fit import MemoryModel, MemoryPoint
from batchlab.measure.oom import is_oom_error
from batchlab.measure.sizes import format_bytes
from batchlab.measure.state import preserve_training_state, release_memory
from batchlab.measure.step_memory import (
    DeviceBaseline,
    device_baseline,
    measure_eval_memory,
    measure_step_memory,
)
from batchlab.results import JsonResult
from batchlab.step import build_step, resolve_device
from batchlab.task import Task
from batchlab.tasks import load_task

DEFAULT_MARGIN = 0.1
MAX_STEP_SECONDS = 30.0  # never run a single probe step predicted to take longer

ProgressFn = Callable[[str, float, float | None], None]


@dataclass(frozen=True)
class MemoryProbe(JsonResult):
    """The largest batch whose full training step fits, and the measurements behind it.

    `max_batch_size` was run for real (`verified`) unless `predicted_only` (a
    `target_memory` plan for another device) or a warning says the step was too slow to run.
    """

    device: str
    max_batch_size: int
    fixed_bytes: float
    bytes_per_sample: float
    budget_bytes: int
    budget_source: str
    margin: float
    usable_bytes: int
    points: tuple[MemoryPoint, ...]
    tried: tuple[int, ...]  # batch size of every training step, warm-up included
    probe_steps: int
    fit: str
    max_residual: float
    predicted_batch_size: float  # where the memory model puts the limit, uncapped
    verified: bool
    predicted_only: bool
    capped_by_dataset: bool
    num_train: int
    eval_peak_bytes: int | None
    amp: bool
    seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def model(self) -> MemoryModel:
        return MemoryModel(self.fixed_bytes, self.bytes_per_sample, self.fit, self.max_residual)


def probe_memory(
    task: Task | str,
    *,
    device: str | torch.device = "auto",
    memory_budget: str | int | float | None = None,
    target_memory: str | int | float | None = None,
    margin: float = DEFAULT_MARGIN,
    amp: bool = False,
    seed: int = 0,
    max_batch_size: int | None = None,
    fit_batch_sizes: tuple[int, ...] = FIT_BATCH_SIZES,
    tolerance: float = TOLERANCE,
    max_search_steps: int = MAX_SEARCH_STEPS,
    max_step_seconds: float = MAX_STEP_SECONDS,
    progress: ProgressFn | None = None,
) -> MemoryProbe:
    """The largest batch size whose full training step fits in memory, verified by running it.

    Args:
        device: `auto`, `cpu`, `cuda` or `cuda:N`.
        memory_budget: bytes or a size like `6GiB`; default: the free device memory on CUDA,
            half the available system RAM on the CPU.
        target_memory: plan for a device you do not have; the result is a prediction.
        margin: fraction of the budget kept free: fragmentation, other processes, longer
            sequences later.
        amp: measure with autocast (bf16, or fp16 with a GradScaler).
        max_batch_size: upper bound on the search (default: the training set size).
        max_step_seconds: a step predicted to take longer is not run (the result is then
            the model's prediction, flagged); keeps CPU probes short.
        progress: `progress(phase, done, total)` for a progress bar.

    Every step is the engine's `TrainStep` on a model built from the task with `seed`;
    the caller's RNG state is untouched and memory is freed afterwards. Search settings:
    `batch_search.find_max_batch_size`.
    """
    t0 = time.perf_counter()
    task = load_task(task)
    margin = check_margin(margin)
    dev = resolve_device(device)
    limit = task.num_train if max_batch_size is None else min(max_batch_size, task.num_train)
    release_memory()
    baseline = device_baseline(dev)
    budget, source, predict_only, warnings = resolve_budget(
        dev, memory_budget, target_memory, baseline
    )
    usable = int(budget * (1 - margin))

    timings: dict[int, float] = {}  # seconds of each measured step, by batch size
    search, eval_peak = _search_fresh_model(
        task, dev, amp=amp, seed=seed, baseline=baseline, timings=timings, progress=progress,
        usable_bytes=usable, limit=limit, fit_batch_sizes=fit_batch_sizes, tolerance=tolerance,
        max_search_steps=max_search_steps, predict_only=predict_only,
        too_slow=lambda b: _predict_seconds(timings, b) > max_step_seconds,
    )  # fmt: skip
    release_memory()  # the model, optimizer and activations are gone with the helper's frame

    capped = search.max_batch_size >= limit and search.predicted_batch_size > limit
    warnings += _search_warnings(
        search, task, capped and limit == task.num_train, predict_only, eval_peak, usable,
        _predict_seconds(timings, search.max_batch_size), max_step_seconds,
    )  # fmt: skip
    return MemoryProbe(
        device=str(dev),
        budget_bytes=budget,
        budget_source=source,
        margin=margin,
        usable_bytes=usable,
        predicted_only=predict_only,
        capped_by_dataset=capped,
        num_train=task.num_train,
        eval_peak_bytes=eval_peak,
        amp=amp,
        seconds=time.perf_counter() - t0,
        warnings=tuple(warnings),
        **_search_fields(search, predict_only),
    )


def _search_fields(search: BatchSearch, predict_only: bool) -> dict[str, Any]:
    """The fields of `MemoryProbe` that say what the search found."""
    return {
        "max_batch_size": search.max_batch_size,
        "fixed_bytes": search.model.fixed_bytes,
        "bytes_per_sample": search.model.bytes_per_sample,
        "points": search.points,
        "tried": search.tried,
        "probe_steps": len(search.tried),
        "fit": search.global_fit.kind,
        "max_residual": search.global_fit.max_residual,
        "predicted_batch_size": search.predicted_batch_size,
        "verified": search.verified and not predict_only,
    }


def _search_warnings(
    search: BatchSearch,
    task: Task,
    capped_by_dataset: bool,
    predict_only: bool,
    eval_peak: int | None,
    usable: int,
    max_step_predicted_seconds: float,
    max_step_seconds: float,
) -> list[str]:
    """What the caller should know about the answer: capped, unverified, eval too big."""
    warnings = []
    predicted = search.predicted_batch_size
    if capped_by_dataset:
        would = "all of it" if not math.isfinite(predicted) else f"about {int(predicted)}"
        warnings.append(
            f"capped at the training set size ({task.num_train} examples); memory would "
            f"allow {would}"
        )
    if not search.verified and not predict_only:
        warnings.append(
            f"B={search.max_batch_size} was not run: one step would take about "
            f"{max_step_predicted_seconds:.0f}s "
            f"(> {max_step_seconds:g}s); it is the memory model's prediction. Give a smaller "
            "`memory_budget` to verify one"
        )
    if eval_peak is not None and eval_peak > usable:
        warnings.append(
            f"the evaluation pass at B={search.max_batch_size} peaks at "
            f"{format_bytes(eval_peak)}, above the usable budget; evaluate at a smaller batch"
        )
    return warnings


def _search_fresh_model(
    task: Task,
    dev: torch.device,
    *,
    amp: bool,
    seed: int,
    baseline: DeviceBaseline,
    timings: dict[int, float],
    progress: ProgressFn | None,
    **search_kwargs,
) -> tuple[BatchSearch, int | None]:
    """Build the task's model on `dev`, run the search on it, and measure one eval pass.

    The model is built from `seed` inside a forked RNG and restored afterwards, so the
    caller's RNG and nothing else is touched; its memory goes with this frame.
    """
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        step = build_step(task, dev, lr=task.lr, micro_batch_size=1, amp=amp)
        order = torch.randperm(task.num_train, generator=torch.Generator().manual_seed(seed))

        def run_step(b: int) -> StepPeak:
            step.micro_batch_size = b
            try:
                peak = measure_step_memory(step, order[:b], baseline=baseline)
            except Exception as exc:
                if is_oom_error(exc) or isinstance(exc, BatchlabError):
                    raise
                raise TaskError(
                    f"a training step of task {task.name!r} at batch size {b} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            timings[b] = peak.seconds or 0.0
            if progress is not None:
                progress("memory", len(timings), None)
            return peak

        eval_peak = None
        with preserve_training_state(step.model, step.optimizer, step.scaler):
            search = find_max_batch_size(run_step, **search_kwargs)
            predict_only = search_kwargs["predict_only"]
            if search.verified and not predict_only and task.val_data is not None:
                val_batcher = Batcher(task.val_data, dev, task.collate_fn)
                n_eval = min(search.max_batch_size, task.num_val)
                eval_peak = measure_eval_memory(
                    step.model, task.loss, val_batcher, torch.arange(n_eval), device=dev,
                    amp=amp, baseline=baseline,
                )  # fmt: skip
    return search, eval_peak


def _predict_seconds(timings: dict[int, float], batch_size: int) -> float:
    """Seconds for one probe step at `batch_size`, from the steps measured so far.

    Two estimates, each pessimistic in its own way, and the smaller is taken: the lowest
    seconds-per-sample seen times B (ignores the fixed cost of a step, so overestimates),
    and the line through the smallest and largest measured sizes (its slope absorbs noise,
    but the fixed cost of a step is not multiplied by B).
    """
    if not timings:
        return 0.0
    proportional = batch_size * min(seconds / b for b, seconds in timings.items())
    lo, hi = min(timings), max(timings)
    if hi == lo:
        return proportional
    slope = max(0.0, (timings[hi] - timings[lo]) / (hi - lo))
    return min(proportional, timings[hi] + slope * (batch_size - hi))
