"""From stored runs to the numbers of the batch-size study. Pure functions, no training.

The central fit is McCandlish et al. 2018's steps-to-target curve (eq. 2.11):

    S(B) = S_min (1 + B_crit / B)        E(B) = B S(B) = E_min (1 + B / B_crit),

with E_min = S_min B_crit. It is fitted by least squares on log S (each repeat one point),
with a bootstrap interval over repeats. Shallue et al. 2018 describe three regimes of the
curve: perfect scaling (doubling B halves the steps), diminishing returns, and maximal data
parallelism (more B buys no fewer steps); `regime()` draws the borders from the fit.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from batchlab.errors import ConfigError
from batchlab.history import History
from batchlab.results import JsonResult
from batchlab.sweep.spec import SweepSpec
from batchlab.sweep.store import RunRecord
from batchlab.target import Target, parse_target

# A regime border: the batch where one efficiency falls to this level. 0.8 puts the borders
# at B_crit/4 (examples 80% as efficient as at B -> 0) and 4 B_crit (steps within 80% of S_min).
REGIME_EFFICIENCY = 0.8
PERFECT, DIMINISHING, MAXIMAL = "perfect scaling", "diminishing returns", "maximal data parallelism"
# Without --target the analysis compares batches at 95% of the median best val accuracy
# (or 105% of the median best val loss) across batch sizes: most batches reach it.
AUTO_TARGET_FRACTION = 0.95


@dataclass(frozen=True)
class RunMetrics(JsonResult):
    """The numbers of one run, derived from its record."""

    run_id: str
    source: str
    optimizer: str
    lr_rule: str
    lr: float
    lr_multiplier: float
    batch_size: int
    repeat: int
    status: str
    steps: int | None = None
    epochs: float | None = None
    train_seconds: float | None = None  # total training time (evaluation excluded)
    seconds_per_epoch: float | None = None
    steps_to_target: int | None = None
    examples_to_target: int | None = None
    epochs_to_target: float | None = None
    seconds_to_target: float | None = None
    min_val_loss: float | None = None
    final_val_loss: float | None = None
    best_val_metric: float | None = None  # the target's metric, best over the run
    final_val_acc: float | None = None
    final_train_loss: float | None = None  # over the full training set, at the end
    final_train_acc: float | None = None
    gap_loss: float | None = None  # val loss - train loss (positive: overfit)
    gap_acc: float | None = None  # train acc - val acc
    sharpness: float | None = None  # top Hessian eigenvalue
    epsilon_sharpness: float | None = None
    grad_norm: float | None = None  # mean |g_B| over the run
    distance_from_init: float | None = None  # final |theta - theta_0|
    stalled: bool = False  # ended no better than at initialization (in the target's metric)


@dataclass(frozen=True)
class StepsFit(JsonResult):
    """S(B) = S_min (1 + B_crit/B) fitted to steps-to-target (McCandlish et al. 2018)."""

    s_min: float
    b_crit: float
    e_min: float  # S_min * B_crit
    r2: float  # of log S
    s_min_ci: tuple[float, float] | None
    b_crit_ci: tuple[float, float] | None
    ci_method: str  # "bootstrap over repeats", "bootstrap over batch sizes" or "none"
    num_points: int
    batch_sizes: tuple[int, ...]
    at_bound: bool  # B_crit hit the search range: the data does not pin it down

    def steps(self, batch_size: float) -> float:
        return self.s_min * (1.0 + self.b_crit / batch_size)

    def examples(self, batch_size: float) -> float:
        return self.e_min * (1.0 + batch_size / self.b_crit)


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


# -- per run -------------------------------------------------------------------------------


def first_reaching(history: History, target: Target) -> tuple[int, int, float] | None:
    """(step, examples, train seconds) at the first evaluation that met `target`."""
    for ev in history.evals:
        if target.reached(ev.val_loss, ev.metrics):
            return ev.step, ev.examples, ev.train_seconds
    return None


def _best_metric(history: History, target: Target) -> float | None:
    if target.metric == "loss":
        return history.best_val_loss
    values = [ev.metrics[target.metric] for ev in history.evals if target.metric in ev.metrics]
    if not values:
        return None
    return max(values) if target.op in (">=", ">") else min(values)


def run_metrics(record: RunRecord, target: Target | None) -> RunMetrics:
    spec = record.spec
    base = dict(
        run_id=record.run_id,
        source=spec.source,
        optimizer=spec.optimizer,
        lr_rule=spec.lr_rule,
        lr=spec.lr,
        lr_multiplier=spec.lr_multiplier,
        batch_size=spec.batch_size,
        repeat=spec.repeat,
        status=record.status,
    )
    h = record.history
    if h is None:
        return RunMetrics(**base)
    last = h.evals[-1]
    hit = first_reaching(h, target) if target is not None and not h.diverged else None
    val_acc = last.metrics.get("acc")
    train_acc = record.train_metrics.get("acc")
    ok = record.status == "ok"
    extras = h.extras or {}
    hess = (record.sharpness or {}).get("hessian_top_eigenvalue", {})
    eps = (record.sharpness or {}).get("epsilon_sharpness", {})
    return RunMetrics(
        **base,
        steps=h.total_steps,
        epochs=h.epochs,
        train_seconds=h.train_seconds,
        seconds_per_epoch=h.train_seconds / h.epochs if h.epochs else None,
        steps_to_target=None if hit is None else hit[0],
        examples_to_target=None if hit is None else hit[1],
        epochs_to_target=None if hit is None else hit[1] / h.num_train,
        seconds_to_target=None if hit is None else hit[2],
        min_val_loss=h.best_val_loss,
        final_val_loss=last.val_loss if ok else None,
        best_val_metric=_best_metric(h, target) if target is not None else None,
        final_val_acc=val_acc if ok else None,
        final_train_loss=record.train_loss,
        final_train_acc=train_acc,
        gap_loss=(last.val_loss - record.train_loss)
        if ok and last.val_loss is not None and record.train_loss is not None
        else None,
        gap_acc=(train_acc - val_acc)
        if ok and train_acc is not None and val_acc is not None
        else None,
        sharpness=hess.get("value"),
        epsilon_sharpness=eps.get("value"),
        grad_norm=(extras.get("grad_norm") or {}).get("mean"),
        distance_from_init=(extras.get("distance_from_init") or {}).get("final"),
        stalled=ok and target is not None and _stalled(h, target),
    )


def _stalled(history: History, target: Target) -> bool:
    """Did the run end no better than it started, in the target's metric? (An overfit run
    whose val loss climbs back above its initial value but kept its accuracy is not.)"""
    first, last = history.evals[0], history.evals[-1]
    if target.metric == "loss":
        best = history.best_val_loss
        return best is not None and first.val_loss is not None and best >= first.val_loss
    start, end = first.metrics.get(target.metric), last.metrics.get(target.metric)
    if start is None or end is None:
        return False
    return end <= start if target.op in (">=", ">") else end >= start


# -- the target ----------------------------------------------------------------------------


def auto_target(records: Sequence[RunRecord]) -> Target | None:
    """A target most batch sizes of every optimizer reach.

    For each optimizer and batch size: the best val accuracy of the run (over repeats the
    median, over a tuned LR grid the best LR). Then the median over batch sizes, the lowest
    over optimizers, and 95% of that. Tasks without accuracy get 105% of the analogous val
    loss.
    """
    ok = [r for r in records if r.status == "ok" and r.history is not None]
    if not ok:
        return None
    has_acc = all("acc" in r.history.evals[-1].metrics for r in ok)
    probe = Target("acc", ">=", 0.0) if has_acc else Target("loss", "<=", 0.0)
    runs: dict[tuple[str, int, float], list[float]] = defaultdict(list)
    for r in ok:
        best = _best_metric(r.history, probe)
        if r.spec.source == "ladder" and best is not None and math.isfinite(best):
            runs[(r.spec.optimizer, r.spec.batch_size, r.spec.lr_multiplier)].append(best)
    if not runs:
        return None
    pick = max if has_acc else min
    per_batch: dict[tuple[str, int], list[float]] = defaultdict(list)
    for (opt, batch, _), values in runs.items():
        per_batch[(opt, batch)].append(statistics.median(values))
    per_group: dict[str, list[float]] = defaultdict(list)
    for (opt, _), values in per_batch.items():
        per_group[opt].append(pick(values))
    level = (min if has_acc else max)(statistics.median(v) for v in per_group.values())
    if has_acc:
        return Target("acc", ">=", math.floor(AUTO_TARGET_FRACTION * level * 100) / 100)
    return Target("loss", "<=", float(f"{level / AUTO_TARGET_FRACTION:.3g}"))


# -- the fit -------------------------------------------------------------------------------


def _profile_fit(
    log_b: np.ndarray, log_s: np.ndarray, lo: float, hi: float
) -> tuple[float, float, float]:
    """Least squares of log S = log S_min + log(1 + B_crit/B) over u = log B_crit in [lo, hi].

    For fixed B_crit the best log S_min is the mean residual, so only u is searched: a grid
    then a bounded refinement. Returns (log S_min, u, sum of squared residuals).
    """
    from scipy.optimize import minimize_scalar

    def ssr_for(u: np.ndarray) -> np.ndarray:
        shape = np.log1p(np.exp(u[:, None] - log_b[None, :]))  # log(1 + B_crit/B)
        resid = log_s[None, :] - shape
        centered = resid - resid.mean(axis=1, keepdims=True)
        return (centered**2).sum(axis=1)

    grid = np.linspace(lo, hi, 241)
    ssr = ssr_for(grid)
    i = int(np.argmin(ssr))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    res = minimize_scalar(
        lambda u: float(ssr_for(np.array([u]))[0]),
        bounds=(a, b),
        method="bounded",
        options={"xatol": 1e-6},
    )
    u = float(res.x) if res.fun <= ssr[i] else float(grid[i])
    log_s_min = float(np.mean(log_s - np.log1p(np.exp(u - log_b))))
    return log_s_min, u, float(ssr_for(np.array([u]))[0])


def fit_steps_to_target(
    batch_sizes: Sequence[float],
    steps: Sequence[float],
    *,
    n_boot: int = 500,
    seed: int = 0,
    bound_factor: float = 100.0,
) -> StepsFit:
    """Fit S(B) = S_min (1 + B_crit/B) by least squares on log S; bootstrap the interval.

    Each (batch size, steps) pair is one observation: pass every repeat. The interval is a
    95% percentile bootstrap, resampling repeats within each batch size when some batch
    has two or more, else resampling batch sizes. B_crit is searched within
    [min B / bound_factor, max B * bound_factor]; `at_bound` says when it ended on an edge.
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ConfigError("fit: expected equal-length sequences of batch sizes and steps")
    if np.any(b <= 0) or np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ConfigError("fit: expected positive, finite batch sizes and steps")
    distinct = np.unique(b)
    if len(distinct) < 3:
        raise ConfigError(
            f"fit: expected steps at >= 3 different batch sizes, got {len(distinct)}; "
            "add batch sizes or use a target more of them reach"
        )
    log_b, log_s = np.log(b), np.log(s)
    lo, hi = math.log(distinct[0] / bound_factor), math.log(distinct[-1] * bound_factor)
    log_s_min, u, ssr = _profile_fit(log_b, log_s, lo, hi)
    sst = float(((log_s - log_s.mean()) ** 2).sum())
    r2 = 1.0 - ssr / sst if sst > 0 else math.nan
    at_bound = min(u - lo, hi - u) < 1e-3 * (hi - lo)

    groups = [np.flatnonzero(b == value) for value in distinct]
    by_repeats = any(len(g) >= 2 for g in groups)
    rng = np.random.default_rng(seed)
    samples: list[tuple[float, float]] = []
    for _ in range(n_boot):
        if by_repeats:
            idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        else:
            idx = rng.choice(len(b), size=len(b), replace=True)
            if len(np.unique(b[idx])) < 3:
                continue
        ls, uu, _ = _profile_fit(log_b[idx], log_s[idx], lo, hi)
        samples.append((math.exp(ls), math.exp(uu)))
    s_ci = b_ci = None
    method = "none"
    if len(samples) >= 20:
        arr = np.array(samples)
        s_ci = (float(np.percentile(arr[:, 0], 2.5)), float(np.percentile(arr[:, 0], 97.5)))
        b_ci = (float(np.percentile(arr[:, 1], 2.5)), float(np.percentile(arr[:, 1], 97.5)))
        method = "bootstrap over repeats" if by_repeats else "bootstrap over batch sizes"
    s_min, b_crit = math.exp(log_s_min), math.exp(u)
    return StepsFit(
        s_min=s_min,
        b_crit=b_crit,
        e_min=s_min * b_crit,
        r2=r2,
        s_min_ci=s_ci,
        b_crit_ci=b_ci,
        ci_method=method,
        num_points=len(b),
        batch_sizes=tuple(int(v) for v in distinct),
        at_bound=bool(at_bound),
    )


def regime(batch_size: float, b_crit: float, efficiency: float = REGIME_EFFICIENCY) -> str:
    """Shallue et al. 2018's regime of `batch_size` under the fitted curve.

    Perfect scaling while examples stay >= `efficiency` as useful as at B -> 0, i.e.
    E_min/E(B) = 1/(1 + B/B_crit) >= eff; maximal data parallelism once steps are within
    `efficiency` of the floor, S_min/S(B) = 1/(1 + B_crit/B) >= eff; in between,
    diminishing returns. With eff = 0.8 the borders are B_crit/4 and 4 B_crit.
    """
    k = 1.0 / efficiency - 1.0
    if batch_size <= b_crit * k:
        return PERFECT
    if batch_size >= b_crit / k:
        return MAXIMAL
    return DIMINISHING


def regime_borders(b_crit: float, efficiency: float = REGIME_EFFICIENCY) -> tuple[float, float]:
    k = 1.0 / efficiency - 1.0
    return b_crit * k, b_crit / k


# -- grouping ------------------------------------------------------------------------------


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def _point(batch: int, runs: list[RunMetrics]) -> BatchPoint:
    reached = [r for r in runs if r.steps_to_target is not None]

    def med(name: str) -> float | None:
        return _median(getattr(r, name) for r in runs)

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
        median_steps_to_target=_median(r.steps_to_target for r in reached),
        median_examples_to_target=_median(r.examples_to_target for r in reached),
        median_epochs_to_target=_median(r.epochs_to_target for r in reached),
        median_seconds_to_target=_median(r.seconds_to_target for r in reached),
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


def _pick_multiplier(runs: list[RunMetrics]) -> list[RunMetrics]:
    """--lr-rule tuned: keep the LR with the fewest median steps to target (ties, or none
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
        loss = _median(r.min_val_loss for r in group)
        return (-len(reached), steps, loss if loss is not None else math.inf)

    return min(by_mult.values(), key=score)


def _group_label(optimizer: str, lr_rule: str, spec: SweepSpec | None) -> str:
    name = optimizer
    if optimizer == "task" and spec is not None:
        name = f"task ({spec.task_optimizer_family})"
    return f"{name}, lr {lr_rule}"


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
    tuned = spec.lr_rule == "tuned"

    missing = len(spec.runs) - len({r.run_id for r in records} & {r.run_id for r in spec.runs})
    if missing:
        warnings.append(
            f"{missing} of {len(spec.runs)} runs are not finished; re-run the sweep command to resume"
        )
    failed = [m for m in metrics if m.status == "failed"]
    if failed:
        warnings.append(
            f"{len(failed)} runs failed (see `error` in results.jsonl): "
            + ", ".join(m.run_id for m in failed[:5])
        )

    groups: list[GroupAnalysis] = []
    keys = sorted({(m.optimizer, m.lr_rule) for m in metrics if m.source == "ladder"})
    for optimizer, rule in keys:
        label = _group_label(optimizer, "tuned" if tuned else rule, spec)
        by_batch: dict[int, list[RunMetrics]] = defaultdict(list)
        for m in metrics:
            if m.source == "ladder" and m.optimizer == optimizer and m.lr_rule == rule:
                by_batch[m.batch_size].append(m)
        points = []
        for batch in sorted(by_batch):
            chosen = _pick_multiplier(by_batch[batch]) if tuned else by_batch[batch]
            point = _point(batch, chosen)
            points.append(point)
            if (
                tuned
                and len(spec.lr_grid) > 1
                and point.lr_multiplier in (min(spec.lr_grid), max(spec.lr_grid))
                and point.reached
            ):
                warnings.append(
                    f"{label}: at B={batch} the best LR is at the grid's edge "
                    f"(x{point.lr_multiplier:g}); a wider grid might do better"
                )
            if point.stalled:
                warnings.append(
                    f"{label}: B={batch} did not learn in {point.stalled} of {point.repeats} "
                    f"repeats (it ended no better than at initialization; lr {point.lr:.3g} too high?)"
                )
            if point.diverged:
                warnings.append(
                    f"{label}: B={batch} diverged in {point.diverged} of {point.repeats} "
                    f"repeats (lr {point.lr:.3g})"
                )
        fit, notes = None, []
        obs = [(p.batch_size, s) for p in points for s in p.steps_to_target if s > 0]
        at_init = sorted({p.batch_size for p in points for s in p.steps_to_target if s <= 0})
        unreached = [p.batch_size for p in points if p.reached == 0]
        if tgt is None:
            notes.append("no target: the runs record no validation metric")
        elif unreached:
            notes.append(
                f"B={', '.join(map(str, unreached))} never reached {tgt}; fitted without them"
            )
        if at_init:
            notes.append(
                f"{tgt} already held at initialization for B={', '.join(map(str, at_init))}; "
                "those repeats are left out of the fit (pick a harder --target)"
            )
        try:
            if tgt is not None:
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
            elif fit.r2 < 0.8:
                notes.append(f"poor fit (R^2 {fit.r2:.2f})")
            points = [
                dataclasses.replace(p, regime=regime(p.batch_size, fit.b_crit)) for p in points
            ]
        note = "; ".join(notes) or None
        if note:
            warnings.append(f"{label}: {note}")
        groups.append(
            GroupAnalysis(label, optimizer, "tuned" if tuned else rule, tuple(points), fit, note)
        )

    plan_rows = _plan_comparison(spec, metrics, groups) if spec.plan is not None else ()
    adaptive = _adaptive_comparison(spec, records, metrics, groups)
    return SweepAnalysis(
        task=spec.task,
        target=None if tgt is None else str(tgt),
        target_auto=is_auto,
        num_train=spec.num_train,
        runs_total=len(spec.runs),
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
        median_steps_to_target=_median(m.steps_to_target for m in runs),
        median_examples_to_target=_median(m.examples_to_target for m in runs),
        median_seconds_to_target=_median(m.seconds_to_target for m in runs),
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
    ref_seconds = _median(r.seconds_to_target for r in ref_runs)
    ref_steps = _median(r.steps_to_target for r in ref_runs)
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
                measured_speedup=ratio(ref_seconds, _median(r.seconds_to_target for r in reached)),
                predicted_steps_ratio=predicted_steps(point.batch_size, point.steps_factor),
                measured_steps_ratio=ratio(ref_steps, _median(r.steps_to_target for r in reached)),
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
