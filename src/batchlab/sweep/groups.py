"""One group of a sweep (an optimizer under an LR rule): its batch sizes, summarized over
repeats, and the S(B) fit through them."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.errors import ConfigError
from batchlab.results import JsonResult
from batchlab.sweep.fit import StepsFit, fit_steps_to_target, regime
from batchlab.sweep.metrics import RunMetrics, median_of
from batchlab.sweep.spec import SweepSpec, lr_grid_limits
from batchlab.target import Target

# A fit explaining less of log S than this is reported as poor.
POOR_FIT_R2 = 0.8


@dataclass(frozen=True)
class BatchPoint(JsonResult):
    """One batch size of one group: its repeats, summarized by medians."""

    batch_size: int
    lr: float
    lr_multiplier: float  # the tuned grid's pick (1.0 otherwise)
    repeats: int
    reached: int  # repeats that reached the target
    diverged: int
    failed: int
    steps_to_target: tuple[int, ...]  # one per repeat that reached it
    stalled: int = 0  # repeats that ended no better than they started
    median_steps_to_target: float | None = None
    median_examples_to_target: float | None = None
    median_epochs_to_target: float | None = None
    median_seconds_to_target: float | None = None
    seconds_per_epoch: float | None = None
    train_seconds: float | None = None
    min_val_loss: float | None = None
    final_val_loss: float | None = None
    final_val_acc: float | None = None
    final_train_loss: float | None = None
    gap_loss: float | None = None
    gap_acc: float | None = None
    sharpness: float | None = None
    epsilon_sharpness: float | None = None
    grad_norm: float | None = None
    distance_from_init: float | None = None
    regime: str | None = None  # from the group's fit


@dataclass(frozen=True)
class GroupAnalysis(JsonResult):
    """All batch sizes of one optimizer under one LR rule."""

    label: str  # e.g. "adam, lr sqrt"
    optimizer: str
    lr_rule: str
    points: tuple[BatchPoint, ...]
    fit: StepsFit | None
    fit_note: str | None  # why there is no fit, or a caveat


def batch_point(batch: int, runs: list[RunMetrics]) -> BatchPoint:
    reached = [r for r in runs if r.steps_to_target is not None]

    def med(name: str) -> float | None:
        return median_of(getattr(r, name) for r in runs)

    return BatchPoint(
        batch_size=batch,
        lr=runs[0].lr,
        lr_multiplier=runs[0].lr_multiplier,
        repeats=len(runs),
        reached=len(reached),
        diverged=sum(r.status == "diverged" for r in runs),
        failed=sum(r.status == "failed" for r in runs),
        steps_to_target=tuple(r.steps_to_target for r in reached),
        stalled=sum(r.stalled for r in runs),
        median_steps_to_target=median_of(r.steps_to_target for r in reached),
        median_examples_to_target=median_of(r.examples_to_target for r in reached),
        median_epochs_to_target=median_of(r.epochs_to_target for r in reached),
        median_seconds_to_target=median_of(r.seconds_to_target for r in reached),
        seconds_per_epoch=med("seconds_per_epoch"),
        train_seconds=med("train_seconds"),
        min_val_loss=med("min_val_loss"),
        final_val_loss=med("final_val_loss"),
        final_val_acc=med("final_val_acc"),
        final_train_loss=med("final_train_loss"),
        gap_loss=med("gap_loss"),
        gap_acc=med("gap_acc"),
        sharpness=med("sharpness"),
        epsilon_sharpness=med("epsilon_sharpness"),
        grad_norm=med("grad_norm"),
        distance_from_init=med("distance_from_init"),
    )


def pick_multiplier(runs: list[RunMetrics]) -> list[RunMetrics]:
    """lr_rule="tuned": keep the LR with the fewest median steps to target (ties, or none
    reaching it: the lowest median min val loss)."""
    by_mult: dict[float, list[RunMetrics]] = defaultdict(list)
    for r in runs:
        by_mult[r.lr_multiplier].append(r)
    if len(by_mult) == 1:
        return runs

    def score(group: list[RunMetrics]) -> tuple[float, float, float]:
        reached = [r.steps_to_target for r in group if r.steps_to_target is not None]
        # Most repeats reaching first, then fewest steps, then lowest loss.
        steps = statistics.median(reached) if reached else math.inf
        loss = median_of(r.min_val_loss for r in group)
        return (-len(reached), steps, loss if loss is not None else math.inf)

    return min(by_mult.values(), key=score)


def group_label(optimizer: str, lr_rule: str, spec: SweepSpec | None) -> str:
    name = optimizer
    if optimizer == "task" and spec is not None:
        name = f"task ({spec.task_optimizer_family})"
    return f"{name}, lr {lr_rule}"


def analyze_group(
    spec: SweepSpec,
    runs: Sequence[RunMetrics],
    target: Target | None,
    *,
    n_boot: int = 500,
    seed: int = 0,
) -> tuple[GroupAnalysis, list[str]]:
    """Summarize the ladder runs of one optimizer and rule, fit S(B); return the warnings."""
    tuned = spec.lr_rule == "tuned"
    rule = "tuned" if tuned else runs[0].lr_rule
    label = group_label(runs[0].optimizer, rule, spec)
    by_batch: dict[int, list[RunMetrics]] = defaultdict(list)
    for m in runs:
        by_batch[m.batch_size].append(m)
    points, warnings = [], []
    for batch in sorted(by_batch):
        point = batch_point(batch, pick_multiplier(by_batch[batch]) if tuned else by_batch[batch])
        points.append(point)
        warnings += [f"{label}: {w}" for w in _point_warnings(spec, point)]
    fit, notes = _fit_group(points, target, n_boot=n_boot, seed=seed)
    if fit is not None:
        points = [dataclasses.replace(p, regime=regime(p.batch_size, fit.b_crit)) for p in points]
    note = "; ".join(notes) or None
    if note:
        warnings.append(f"{label}: {note}")
    group = GroupAnalysis(label, runs[0].optimizer, rule, tuple(points), fit, note)
    return group, warnings


def _point_warnings(spec: SweepSpec, point: BatchPoint) -> list[str]:
    """An LR at the edge of the tuned grid once widened as far as it goes, repeats that
    did not learn, and divergence."""
    out = []
    grid = spec.lr_grid
    if (
        spec.lr_rule == "tuned"
        and len(grid) > 1
        and point.lr_multiplier in lr_grid_limits(grid)
        and point.reached
    ):
        out.append(
            f"at B={point.batch_size} the best LR is at the edge of the widened grid "
            f"(x{point.lr_multiplier:g}); a wider grid might do better"
        )
    if point.stalled:
        out.append(
            f"B={point.batch_size} did not learn in {point.stalled} of {point.repeats} "
            f"repeats (it ended no better than at initialization; lr {point.lr:.3g} too high?)"
        )
    if point.diverged:
        out.append(
            f"B={point.batch_size} diverged in {point.diverged} of {point.repeats} "
            f"repeats (lr {point.lr:.3g})"
        )
    return out


def _fit_group(
    points: Sequence[BatchPoint], target: Target | None, *, n_boot: int, seed: int
) -> tuple[StepsFit | None, list[str]]:
    """The S(B) fit through every repeat that reached the target, and notes on its quality."""
    fit, notes = None, []
    obs = [(p.batch_size, s) for p in points for s in p.steps_to_target if s > 0]
    at_init = sorted({p.batch_size for p in points for s in p.steps_to_target if s <= 0})
    unreached = [p.batch_size for p in points if p.reached == 0]
    if target is None:
        notes.append("no target: the runs record no validation metric")
    elif unreached:
        notes.append(
            f"B={', '.join(map(str, unreached))} never reached {target}; fitted without them"
        )
    if at_init:
        notes.append(
            f"{target} already held at initialization for B={', '.join(map(str, at_init))}; "
            "those repeats are left out of the fit (pick a harder `target`)"
        )
    try:
        if target is not None:
            fit = fit_steps_to_target(
                [o[0] for o in obs], [o[1] for o in obs], n_boot=n_boot, seed=seed
            )
    except ConfigError as exc:
        notes.append(str(exc).replace("fit: ", "no fit: ", 1))
    if fit is not None:
        if fit.at_bound:
            notes.append(
                "B_crit is at the edge of the search range: the measured batches do not bracket it"
            )
        elif fit.r2 < POOR_FIT_R2:
            notes.append(f"poor fit (R^2 {fit.r2:.2f})")
    return fit, notes
