"""Plots of a batch-size sweep. Each takes `ax=None` and returns the axes it drew into.

With `ax=None` a new figure is made (a plain `matplotlib.figure.Figure`: no pyplot state,
no GUI backend). The functions only draw what `analyze_sweep` and the stored records hold;
they compute no recommendation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from batchlab.report.axes import legend_below, new_axes, style_axes
from batchlab.sweep.analysis import SweepAnalysis
from batchlab.sweep.fit import regime_borders
from batchlab.sweep.groups import GroupAnalysis
from batchlab.sweep.store import RunRecord

FIGSIZE = (6.4, 4.0)
GROUP_COLORS = ["#2f6fde", "#e4572e", "#29a35a", "#9b5de5", "#f0a202", "#00a6a6"]
PLAN_COLOR = "#111111"


def _style(
    ax: Any, title: str, xlabel: str, ylabel: str, *, logx: bool = True, logy: bool = False
) -> None:
    lim = ax.dataLim
    has_data = bool(math.isfinite(lim.y0) and math.isfinite(lim.y1) and lim.y1 > 0)
    if not has_data:  # nothing reached the target, every run diverged...: say so
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="#999")
        logx = logy = False
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        # Label 1-2-5 ticks: sweeps often span less than a decade, where plain log axes
        # would show a single label.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    style_axes(ax, title, xlabel, ylabel)


def _batch_ticks(ax: Any, batches: Sequence[int]) -> None:
    kept: list[int] = []
    for b in sorted(batches):  # skip ticks too close to the previous one to read
        if not kept or b >= 1.3 * kept[-1]:
            kept.append(b)
    batches = kept
    if batches:
        ax.set_xticks(list(batches))
        ax.set_xticklabels([str(b) for b in batches], fontsize=8)
        ax.minorticks_off()


def _batch_colors(batches: Sequence[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = max(1, len(batches) - 1)
    return {b: cmap(0.9 * i / n) for i, b in enumerate(sorted(batches))}


def _main_records(records: Sequence[RunRecord], analysis: SweepAnalysis) -> list[RunRecord]:
    """Repeat 0 of the first group's ladder runs (the tuned LR's pick, when tuned)."""
    if not analysis.groups:
        return []
    group = analysis.groups[0]
    picked = {(p.batch_size, p.lr_multiplier) for p in group.points}
    out = [
        r
        for r in records
        if r.history is not None
        and r.spec.source == "ladder"
        and r.spec.optimizer == group.optimizer
        and r.spec.repeat == 0
        and (r.spec.batch_size, r.spec.lr_multiplier) in picked
    ]
    return sorted(out, key=lambda r: r.spec.batch_size)


def plot_val_curves(
    records: Sequence[RunRecord], analysis: SweepAnalysis, metric: str = "loss", ax: Any = None
) -> Any:
    """Validation loss (or a metric such as `acc`) vs epoch, one line per batch size."""
    ax = ax if ax is not None else new_axes(FIGSIZE)
    runs = _main_records(records, analysis)
    colors = _batch_colors([r.spec.batch_size for r in runs])
    for r in runs:
        evals = [ev for ev in r.history.evals if ev.epoch > 0]  # log axis: skip the init eval
        ys = [ev.val_loss if metric == "loss" else ev.metrics.get(metric) for ev in evals]
        ax.plot(
            [ev.epoch for ev in evals],
            ys,
            color=colors[r.spec.batch_size],
            lw=1.4,
            label=f"B={r.spec.batch_size}",
        )
    label = "val loss" if metric == "loss" else f"val {metric}"
    group = analysis.groups[0].label if analysis.groups else ""
    _style(ax, f"{label} vs epoch ({group}, repeat 0)", "epoch (log)", label, logx=False)
    if runs:
        # Big batches may run many more epochs (at least `min_steps` steps): a log axis
        # keeps the first epochs of every batch size readable.
        ax.set_xscale("log")
    if metric == "loss":
        finite = [
            y
            for r in runs
            for y in (ev.val_loss for ev in r.history.evals)
            if y is not None and math.isfinite(y)
        ]
        if finite:  # keep early spikes from flattening everything else
            lo, hi = min(finite), sorted(finite)[int(0.98 * (len(finite) - 1))]
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    if runs:
        legend_below(ax, ncol=5)
    return ax


def plot_batch_metric(
    analysis: SweepAnalysis,
    field: str,
    *,
    title: str,
    ylabel: str,
    logy: bool = False,
    ax: Any = None,
) -> Any:
    """Any per-batch median (a `BatchPoint` field) vs batch size, one line per group."""
    ax = ax if ax is not None else new_axes(FIGSIZE)
    batches: set[int] = set()
    for i, group in enumerate(analysis.groups):
        pts = [
            (p.batch_size, getattr(p, field)) for p in group.points if getattr(p, field) is not None
        ]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        batches.update(xs)
        ax.plot(
            xs, ys, "o-", color=GROUP_COLORS[i % len(GROUP_COLORS)], label=group.label, lw=1.6, ms=5
        )
    _style(ax, title, "batch size B", ylabel, logy=logy)
    _batch_ticks(ax, sorted(batches))
    if len(analysis.groups) > 1:
        legend_below(ax)
    return ax


def plot_seconds_per_epoch(analysis: SweepAnalysis, ax: Any = None) -> Any:
    return plot_batch_metric(
        analysis,
        "seconds_per_epoch",
        title="seconds per epoch",
        ylabel="s / epoch",
        logy=True,
        ax=ax,
    )


def plot_epochs_to_target(analysis: SweepAnalysis, ax: Any = None) -> Any:
    return plot_batch_metric(
        analysis,
        "median_epochs_to_target",
        title=f"epochs to {analysis.target}",
        ylabel="epochs",
        logy=True,
        ax=ax,
    )


def plot_total_time(analysis: SweepAnalysis, ax: Any = None) -> Any:
    """Training seconds to reach the target (solid) and for the whole run (dashed)."""
    ax = plot_batch_metric(
        analysis,
        "median_seconds_to_target",
        title=f"seconds to {analysis.target} (solid) and whole run (dashed)",
        ylabel="training seconds",
        logy=True,
        ax=ax,
    )
    for i, group in enumerate(analysis.groups):
        pts = [(p.batch_size, p.train_seconds) for p in group.points if p.train_seconds]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, "--", color=GROUP_COLORS[i % len(GROUP_COLORS)], lw=1.0, alpha=0.7)
    return ax


def plot_generalization_gap(analysis: SweepAnalysis, ax: Any = None) -> Any:
    acc = any(p.gap_acc is not None for g in analysis.groups for p in g.points)
    field, ylabel = (
        ("gap_acc", "train acc - val acc") if acc else ("gap_loss", "val loss - train loss")
    )
    ax = plot_batch_metric(
        analysis, field, title="generalization gap at the end", ylabel=ylabel, ax=ax
    )
    ax.axhline(0, color="#999", lw=0.8)
    return ax


def plot_sharpness(analysis: SweepAnalysis, ax: Any = None) -> Any:
    return plot_batch_metric(
        analysis,
        "sharpness",
        title="sharpness: top Hessian eigenvalue at the end",
        ylabel="lambda_max (power iteration)",
        logy=True,
        ax=ax,
    )


def plot_grad_norm(analysis: SweepAnalysis, ax: Any = None) -> Any:
    return plot_batch_metric(
        analysis,
        "grad_norm",
        title="mean mini-batch gradient norm |g_B|",
        ylabel="|g_B|",
        logy=True,
        ax=ax,
    )


def plot_optimizers(analysis: SweepAnalysis, ax: Any = None) -> Any:
    """Optimizers side by side: min val loss vs batch size, one line per optimizer."""
    return plot_batch_metric(
        analysis, "min_val_loss", title="min val loss by optimizer", ylabel="min val loss", ax=ax
    )


def _fit_curve(ax: Any, group: GroupAnalysis, color: str, examples: bool) -> None:
    fit = group.fit
    if fit is None:
        return
    import numpy as np

    bs = [p.batch_size for p in group.points]
    xs = np.geomspace(min(bs) / 1.5, max(bs) * 1.5, 200)
    ys = [fit.examples(x) if examples else fit.steps(x) for x in xs]
    what = "E_min (1 + B/B_crit)" if examples else "S_min (1 + B_crit/B)"
    ax.plot(xs, ys, "-", color=color, lw=1.2, alpha=0.8, label=f"fit {what}, R^2={fit.r2:.2f}")
    ax.axvline(fit.b_crit, color=color, ls=":", lw=1.2, label=f"B_crit = {fit.b_crit:.0f}")
    if fit.b_crit_ci is not None:
        lo, hi = fit.b_crit_ci
        ax.axvspan(lo, hi, color=color, alpha=0.08)


def _shade_regimes(ax: Any, group: GroupAnalysis, label_at_top: bool) -> None:
    """Tint Shallue et al.'s three regimes under the fit and name them."""
    if group.fit is None or group.fit.at_bound:
        return
    from matplotlib.transforms import blended_transform_factory

    left, right = regime_borders(group.fit.b_crit)
    xmin, xmax = ax.get_xlim()
    where = blended_transform_factory(ax.transData, ax.transAxes)
    spans = (
        (xmin, left, "perfect scaling", "#29a35a"),
        (left, right, "diminishing returns", "#888888"),
        (right, xmax, "maximal data parallelism", "#e4572e"),
    )
    for lo, hi, name, color in spans:
        lo, hi = max(lo, xmin), min(hi, xmax)
        if hi <= lo:
            continue
        ax.axvspan(lo, hi, color=color, alpha=0.06, lw=0)
        y, va = (0.985, "top") if label_at_top else (0.015, "bottom")
        ax.text(
            math.sqrt(lo * hi),
            y,
            name,
            transform=where,
            ha="center",
            va=va,
            fontsize=7,
            color=color,
        )
    ax.set_xlim(xmin, xmax)


def _to_target_plot(
    analysis: SweepAnalysis, examples: bool, ax: Any, b_simple: float | None
) -> Any:
    ax = ax if ax is not None else new_axes(FIGSIZE)
    batches: set[int] = set()
    for i, group in enumerate(analysis.groups):
        color = GROUP_COLORS[i % len(GROUP_COLORS)]
        xs, ys, mx, my = [], [], [], []
        for p in group.points:
            for s in p.steps_to_target:
                xs.append(p.batch_size)
                ys.append(s * p.batch_size if examples else s)
            med = p.median_examples_to_target if examples else p.median_steps_to_target
            if med is not None:
                mx.append(p.batch_size)
                my.append(med)
            batches.add(p.batch_size)
        ax.scatter(xs, ys, s=12, color=color, alpha=0.35, lw=0)
        ax.plot(mx, my, "o", color=color, ms=6, label=f"{group.label} (median)")
        _fit_curve(ax, group, color, examples)
    if b_simple:
        ax.axvline(
            b_simple,
            color=PLAN_COLOR,
            ls="--",
            lw=1.0,
            label=f"B_simple = {b_simple:.0f} (measured)",
        )
    what = "examples" if examples else "steps"
    _style(ax, f"{what} to {analysis.target}", "batch size B", what, logy=True)
    _batch_ticks(ax, sorted(batches))
    if analysis.groups:
        _shade_regimes(ax, analysis.groups[0], label_at_top=not examples)
    legend_below(ax)
    return ax


def plot_steps_to_target(
    analysis: SweepAnalysis, ax: Any = None, b_simple: float | None = None
) -> Any:
    """Steps to target vs B (each repeat a dot), the fitted hyperbola, B_crit with its
    interval, Shallue et al.'s three regimes, and B_simple when measured."""
    return _to_target_plot(
        analysis, False, ax, b_simple if b_simple is not None else analysis.b_simple
    )


def plot_examples_to_target(
    analysis: SweepAnalysis, ax: Any = None, b_simple: float | None = None
) -> Any:
    """Examples to target vs B with E = E_min (1 + B/B_crit)."""
    return _to_target_plot(
        analysis, True, ax, b_simple if b_simple is not None else analysis.b_simple
    )


def plot_distance_from_init(
    records: Sequence[RunRecord], analysis: SweepAnalysis, ax: Any = None
) -> Any:
    """|theta_t - theta_0| vs optimizer step (log), one line per batch size."""
    ax = ax if ax is not None else new_axes(FIGSIZE)
    runs = _main_records(records, analysis)
    colors = _batch_colors([r.spec.batch_size for r in runs])
    for r in runs:
        d = (r.history.extras or {}).get("distance_from_init")
        if not d:
            continue
        pts = [
            (s, v) for s, v in zip(d["steps"], d["values"], strict=True) if s > 0 and v is not None
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=colors[r.spec.batch_size], lw=1.4, label=f"B={r.spec.batch_size}")
    _style(
        ax, "distance from init |theta - theta_0| vs step", "optimizer step", "|theta - theta_0|"
    )
    ax.set_xscale("log")
    if runs:
        legend_below(ax, ncol=5)
    return ax


def plot_plan_check(analysis: SweepAnalysis, what: str = "speedup", ax: Any = None) -> Any:
    """The plan against measurement, vs batch size, relative to the plan's reference batch.

    `what="speedup"`: time to target, reference / B (the plan's `predicted_speedup`).
    `what="steps"`: steps to target, reference / B (the plan's steps model alone).
    Predicted values are a line through the plan's candidates; measured ones are markers,
    filled for the plan's own batches (with its LRs), hollow for ladder batches.
    """
    ax = ax if ax is not None else new_axes(FIGSIZE)
    pred_key, meas_key = (
        ("predicted_speedup", "measured_speedup")
        if what == "speedup"
        else ("predicted_steps_ratio", "measured_steps_ratio")
    )
    rows = sorted(analysis.plan, key=lambda r: r.batch_size)
    pred = sorted({(r.batch_size, getattr(r, pred_key)) for r in rows if getattr(r, pred_key)})
    if pred:
        xs, ys = zip(*pred, strict=True)
        ax.plot(xs, ys, "-", color="#8aa2d6", lw=1.6, label="predicted by the plan")
    for r in rows:
        value = getattr(r, meas_key)
        if value is None:
            continue
        planned = r.role != "ladder"
        ax.plot(
            r.batch_size,
            value,
            "o",
            ms=7 if planned else 5,
            color=GROUP_COLORS[1] if planned else GROUP_COLORS[0],
            mfc=None if planned else "none",
        )
        if planned:
            ax.annotate(
                r.role, (r.batch_size, value), textcoords="offset points", xytext=(5, 5), fontsize=7
            )
    ax.plot([], [], "o", color=GROUP_COLORS[1], label="measured, plan's batches and LRs")
    ax.plot([], [], "o", color=GROUP_COLORS[0], mfc="none", label="measured, sweep ladder")
    ax.axhline(1.0, color="#999", lw=0.8)
    title = "time-to-target speedup" if what == "speedup" else "steps-to-target ratio S(B0)/S(B)"
    _style(ax, f"plan check: {title}", "batch size B", "x over the plan's reference", logy=True)
    _batch_ticks(ax, sorted({r.batch_size for r in rows}))
    legend_below(ax)
    return ax
