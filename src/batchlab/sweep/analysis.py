"""From stored runs to the numbers of the batch-size study. Pure functions, no training.

`analyze_sweep` computes each run's numbers (`metrics`), summarizes every group of the
ladder with its S(B) fit (`groups`, `fit`), and checks the plan and the adaptive runs
against the fixed batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.results import JsonResult
from batchlab.sweep.extend import all_runs
from batchlab.sweep.groups import GroupAnalysis, analyze_group
from batchlab.sweep.metrics import RunMetrics, auto_target, median_of, run_metrics
from batchlab.sweep.spec import SweepSpec
from batchlab.sweep.store import RunRecord
from batchlab.target import Target, parse_target


@dataclass(frozen=True)
class PlanComparison(JsonResult):
    """Predicted vs measured speedup over the plan's reference batch, one row per batch."""

    role: str  # reference, recommended, efficient, or "ladder" for a plan candidate
    batch_size: int
    lr: float
    predicted_speedup: float | None
    measured_speedup: float | None  # time to target, reference / this
    predicted_steps_ratio: float | None  # S(B0) / S(B) from the plan's steps factors
    measured_steps_ratio: float | None
    reached: int
    repeats: int


@dataclass(frozen=True)
class AdaptiveComparison(JsonResult):
    """`train_adaptive` runs (medians over repeats) next to the best fixed batch."""

    runs: int
    reached: int
    median_steps_to_target: float | None
    median_examples_to_target: float | None
    median_seconds_to_target: float | None
    batch_path: tuple[int, ...]  # the batch sizes the first repeat's decisions chose, in order
    best_fixed_batch_size: int | None  # fastest to target among the task optimizer's ladder
    best_fixed_seconds_to_target: float | None
    reference_seconds_to_target: float | None  # the ladder's run at the reference batch


@dataclass(frozen=True)
class SweepAnalysis(JsonResult):
    task: str
    target: str | None
    target_auto: bool
    num_train: int
    runs_total: int
    runs_recorded: int
    groups: tuple[GroupAnalysis, ...]
    plan: tuple[PlanComparison, ...]
    runs: tuple[RunMetrics, ...]
    b_simple: float | None
    warnings: tuple[str, ...]
    adaptive: AdaptiveComparison | None = None


def analyze_sweep(
    spec: SweepSpec,
    records: Sequence[RunRecord],
    *,
    target: str | Target | None = None,
    n_boot: int = 500,
    seed: int = 0,
    store_warnings: Sequence[str] = (),
) -> SweepAnalysis:
    """Summarize a sweep: per-run numbers, per-batch medians, the S(B) fit per group, the
    plan check, and warnings. `target` overrides the spec's (runs must not have stopped
    earlier than it); without either, `auto_target` picks one."""
    warnings = list(store_warnings)
    tgt = parse_target(target) if target is not None else parse_target(spec.target)
    is_auto = tgt is None
    if tgt is None:
        tgt = auto_target(records)
    metrics = [run_metrics(r, tgt) for r in records]
    expected = all_runs(spec, records)
    missing = len({r.run_id for r in expected} - {r.run_id for r in records})
    if missing:
        warnings.append(
            f"{missing} of {len(expected)} runs are not finished; re-run the sweep command to resume"
        )
    failed = [m for m in metrics if m.status == "failed"]
    if failed:
        warnings.append(
            f"{len(failed)} runs failed (see `error` in results.jsonl): "
            + ", ".join(m.run_id for m in failed[:5])
        )

    groups: list[GroupAnalysis] = []
    for optimizer, rule in sorted(
        {(m.optimizer, m.lr_rule) for m in metrics if m.source == "ladder"}
    ):
        runs = [
            m
            for m in metrics
            if m.source == "ladder" and (m.optimizer, m.lr_rule) == (optimizer, rule)
        ]
        group, group_warnings = analyze_group(spec, runs, tgt, n_boot=n_boot, seed=seed)
        groups.append(group)
        warnings += group_warnings

    plan_rows = _plan_comparison(spec, metrics, groups) if spec.plan is not None else ()
    adaptive = _adaptive_comparison(spec, records, metrics, groups)
    return SweepAnalysis(
        task=spec.task,
        target=None if tgt is None else str(tgt),
        target_auto=is_auto,
        num_train=spec.num_train,
        runs_total=len(expected),
        runs_recorded=len(records),
        groups=tuple(groups),
        plan=tuple(plan_rows),
        runs=tuple(metrics),
        b_simple=spec.b_simple,
        warnings=tuple(warnings),
        adaptive=adaptive,
    )


def _adaptive_comparison(
    spec: SweepSpec,
    records: Sequence[RunRecord],
    metrics: list[RunMetrics],
    groups: list[GroupAnalysis],
) -> AdaptiveComparison | None:
    runs = [m for m in metrics if m.source == "adaptive"]
    if not runs:
        return None
    path: tuple[int, ...] = ()
    for record in records:
        if record.spec.source == "adaptive" and record.history is not None:
            decisions = record.history.extras.get("adaptive", {}).get("decisions", [])
            sizes = [spec.reference_batch_size] + [d["batch_size"] for d in decisions]
            path = tuple(b for i, b in enumerate(sizes) if i == 0 or b != sizes[i - 1])
            break
    fixed = next((g for g in groups if g.optimizer == "task" and g.lr_rule != "tuned"), None)
    timed = [p for p in (fixed.points if fixed else ()) if p.median_seconds_to_target]
    best = min(timed, key=lambda p: p.median_seconds_to_target, default=None)
    ref = next((p for p in timed if p.batch_size == spec.reference_batch_size), None)
    return AdaptiveComparison(
        runs=len(runs),
        reached=sum(m.steps_to_target is not None for m in runs),
        median_steps_to_target=median_of(m.steps_to_target for m in runs),
        median_examples_to_target=median_of(m.examples_to_target for m in runs),
        median_seconds_to_target=median_of(m.seconds_to_target for m in runs),
        batch_path=path,
        best_fixed_batch_size=None if best is None else best.batch_size,
        best_fixed_seconds_to_target=None if best is None else best.median_seconds_to_target,
        reference_seconds_to_target=None if ref is None else ref.median_seconds_to_target,
    )


def _plan_comparison(
    spec: SweepSpec, metrics: list[RunMetrics], groups: list[GroupAnalysis]
) -> list[PlanComparison]:
    """Measured speedup over the plan's reference run next to the plan's prediction."""
    plan_runs: dict[str, list[RunMetrics]] = defaultdict(list)
    for m in metrics:
        if m.source.startswith("plan:"):
            plan_runs[m.source.removeprefix("plan:")].append(m)
    ref_role = next((role for role in plan_runs if "reference" in role.split("+")), None)
    ref_runs = plan_runs.get(ref_role, []) if ref_role else []
    ref_seconds = median_of(r.seconds_to_target for r in ref_runs)
    ref_steps = median_of(r.steps_to_target for r in ref_runs)
    factors = {c.batch_size: c.steps_factor for c in spec.plan.candidates if c.steps_factor}
    ref_b = spec.plan.reference_batch_size

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def predicted_steps(b: int, own: float | None = None) -> float | None:
        # The plan's steps factors are S(B) / S(B0), so S(B0)'s is 1 unless listed.
        return ratio(factors.get(ref_b, 1.0), factors.get(b, own))

    rows = []
    by_role = spec.plan.batches()
    for role, runs in sorted(plan_runs.items(), key=lambda kv: runs_order(kv[0])):
        first_role = role.split("+")[0]
        point = by_role[first_role]
        reached = [r for r in runs if r.steps_to_target is not None]
        rows.append(
            PlanComparison(
                role=role,
                batch_size=point.batch_size,
                lr=point.lr,
                predicted_speedup=point.predicted_speedup,
                measured_speedup=ratio(
                    ref_seconds, median_of(r.seconds_to_target for r in reached)
                ),
                predicted_steps_ratio=predicted_steps(point.batch_size, point.steps_factor),
                measured_steps_ratio=ratio(
                    ref_steps, median_of(r.steps_to_target for r in reached)
                ),
                reached=len(reached),
                repeats=len(runs),
            )
        )
    # Plan candidates the ladder measured (with the sweep's own LR rule).
    predicted = {c.batch_size: c.predicted_speedup for c in spec.plan.candidates}
    # The plan trains with the task's own optimizer: compare with that group.
    task_group = next(
        (g for g in groups if g.optimizer in ("task", spec.task_optimizer_family)), None
    )
    if task_group is not None:
        for p in task_group.points:
            if p.batch_size in predicted:
                rows.append(
                    PlanComparison(
                        role="ladder",
                        batch_size=p.batch_size,
                        lr=p.lr,
                        predicted_speedup=predicted[p.batch_size],
                        measured_speedup=ratio(ref_seconds, p.median_seconds_to_target),
                        predicted_steps_ratio=predicted_steps(p.batch_size),
                        measured_steps_ratio=ratio(ref_steps, p.median_steps_to_target),
                        reached=p.reached,
                        repeats=p.repeats,
                    )
                )
    return rows


def runs_order(role: str) -> int:
    order = {"reference": 0, "recommended": 1, "efficient": 2}
    return order.get(role.split("+")[0], 3)
