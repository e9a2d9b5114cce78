"""Plots of a plan. Each takes `ax=None` and returns the axes it drew into; none computes
a recommendation: they draw what `batchlab.plan` decided."""

from __future__ import annotations

from typing import Any

from batchlab.core.tradeoff import relative_steps
from batchlab.planner.plan_types import Plan
from batchlab.report.axes import legend_below, new_axes, style_axes
from batchlab.report.noise_plots import plot_b_simple_vs_loss

REC_COLOR = "#29a35a"
EFF_COLOR = "#0f9bb5"
REF_COLOR = "#6b7280"
LINE_COLOR = "#2f6fde"


def plot_time_to_target(plan: Plan, ax: Any = None) -> Any:
    """Predicted time to target relative to the reference batch, with the picks marked.

    The dashed line is steps alone, S(B)/S(B0): what a batch size buys if a step cost the
    same at every B. The solid line adds the measured step time.
    """
    ax = ax if ax is not None else new_axes()
    style_axes(ax, "Predicted time to target vs batch size", "batch size B", "time / time at B0")
    cands = sorted(plan.candidates, key=lambda c: c.batch_size)
    xs = [c.batch_size for c in cands]
    ax.plot(
        xs, [c.relative_time for c in cands], "-", color=LINE_COLOR, lw=2, label="predicted time"
    )
    measured = [c for c in cands if c.measured]
    ax.plot(
        [c.batch_size for c in measured],
        [c.relative_time for c in measured],
        "o",
        color=LINE_COLOR,
        ms=5,
        label="step time measured",
    )
    b0 = plan.reference["batch_size"]
    ax.plot(
        xs,
        [relative_steps(b, b0, plan.b_simple) for b in xs],
        "--",
        color=REF_COLOR,
        lw=1.2,
        label="steps only, S(B)/S(B0)",
    )
    ax.axvline(plan.b_simple, color=EFF_COLOR, lw=1, ls=":", alpha=0.8)
    ax.text(plan.b_simple, 0.98, f" B_noise={plan.b_simple:.0f}", color=EFF_COLOR, fontsize=8,
            transform=ax.get_xaxis_transform(), va="top")  # fmt: skip
    if plan.max_batch_size < max(xs):
        ax.axvline(plan.max_batch_size, color="#111111", lw=1, ls="-.", alpha=0.7)
        ax.text(plan.max_batch_size, 0.02, " memory max\n (accumulate beyond)", fontsize=8,
                transform=ax.get_xaxis_transform(), va="bottom")  # fmt: skip
    _mark_picks(plan, ax)
    # Below-left of B0 is under the falling curve: the label covers no line there.
    ax.plot([b0], [1.0], "s", color=REF_COLOR, ms=7, zorder=4)
    ax.annotate(f"reference B0={b0:g}", (b0, 1.0), textcoords="offset points", xytext=(-8, -8),
                ha="right", va="top", color=REF_COLOR, fontsize=9)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    legend_below(ax, ncol=3)
    return ax


def _mark_picks(plan: Plan, ax: Any) -> None:
    """Stars at the efficient and the fastest batch; one label "fastest = efficient" when
    they are the same batch (two labels at one point overlap). Different batches: the
    efficient (smaller) one is labelled up-left, the fastest up-right."""
    eff, rec = plan.efficient, plan.recommended
    if eff.batch_size == rec.batch_size:
        picks = [(rec, REC_COLOR, "fastest = efficient", (0, 16), "center")]
    else:
        marks = sorted([(eff, EFF_COLOR, "efficient"), (rec, REC_COLOR, "fastest")],
                       key=lambda mark: mark[0].batch_size)  # fmt: skip
        places = [((-10, 14), "right"), ((10, 14), "left")]
        picks = [(*mark, *place) for mark, place in zip(marks, places, strict=True)]
    for pick, color, name, offset, align in picks:
        y = 1 / pick.predicted_speedup
        ax.plot([pick.batch_size], [y], "*", color=color, ms=16, mec="white", zorder=5)
        ax.annotate(f"{name}\nB={pick.batch_size}", (pick.batch_size, y), textcoords="offset points",
                    xytext=offset, ha=align, va="bottom", color=color, fontsize=9, fontweight="bold",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                    zorder=6)  # fmt: skip


def plot_noise_trajectory(plan: Plan, ax: Any = None) -> Any:
    """The measured B_simple against the loss, the fitted trajectory with its band out to
    the target's loss, the value at the target and the predicted critical batch (the
    S_min-weighted mean over the path) with its interval."""
    outlook = plan.noise_outlook
    if outlook is None:
        return plot_b_simple_vs_loss(plan.b_simple_trajectory, None, ax)
    lo, hi = outlook.trajectory.loss_range
    span = (min(lo, outlook.target_loss), max(hi, max(outlook.path_losses)))
    ax = plot_b_simple_vs_loss(plan.b_simple_trajectory, outlook.trajectory, ax, loss_span=span)
    t_lo, t_hi = outlook.b_noise_at_target_interval
    ax.errorbar([outlook.target_loss], [outlook.b_noise_at_target],
                yerr=[[outlook.b_noise_at_target - t_lo], [t_hi - outlook.b_noise_at_target]],
                fmt="*", color=REC_COLOR, ms=14, mec="white", capsize=3, zorder=5,
                label=f"at the target: {outlook.b_noise_at_target:.0f}")  # fmt: skip
    c_lo, c_hi = outlook.critical_batch_interval
    ax.axhspan(c_lo, c_hi, color=EFF_COLOR, alpha=0.12, lw=0)
    ax.axhline(plan.b_simple, color=EFF_COLOR, ls="--", lw=1.2,
               label=f"predicted critical batch {plan.b_simple:.0f} ({c_lo:.0f}-{c_hi:.0f})")  # fmt: skip
    ax.set_title("B_noise along the run: measured, fitted, at the target", fontsize=11, loc="left")
    legend_below(ax)
    return ax
