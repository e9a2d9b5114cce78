"""The numbers of one run, read from its stored record, and the target runs are compared at."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from batchlab.history import History
from batchlab.results import JsonResult
from batchlab.sweep.store import RunRecord
from batchlab.target import Target

# Without a `target` the analysis compares batches at 95% of the median best val accuracy
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


def median_of(values: Iterable[float | None]) -> float | None:
    """The median of the finite values given; None when there are none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


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
