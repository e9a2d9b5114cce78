"""Plots of a plan. Each takes `ax=None` and returns the axes it drew into; none computes
a recommendation: they draw what `batchlab.plan` decided."""

from __future__ import annotations

from typing import Any

from batchlab.plan.model import Plan
from batchlab.theory import relative_steps

FIGSIZE = (6.4, 4.2)
REC_COLOR = "#29a35a"
EFF_COLOR = "#0f9bb5"
REF_COLOR = "#6b7280"
LINE_COLOR = "#2f6fde"


def _new_axes(figsize: tuple[float, float] = FIGSIZE) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained").subplots()


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_time_to_target(plan: Plan, ax: Any = None) -> Any:
    """Predicted time to target relative to the reference batch, with the picks marked.

    The dashed line is steps alone, S(B)/S(B0): what a batch size buys if a step cost the
    same at every B. The solid line adds the measured step time.
    """
    ax = ax if ax is not None else _new_axes()
    _style(ax, "Predicted time to target vs batch size", "batch size B", "time / time at B0")
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
    for rec, color, name in (
        (plan.efficient, EFF_COLOR, "efficient"),
        (plan.recommended, REC_COLOR, "fastest"),
    ):
        y = 1 / rec.predicted_speedup
        ax.plot([rec.batch_size], [y], "*", color=color, ms=16, mec="white", zorder=5)
        ax.annotate(f"{name}\nB={rec.batch_size}", (rec.batch_size, y), textcoords="offset points",
                    xytext=(8, 8), color=color, fontsize=9, fontweight="bold")  # fmt: skip
    ax.plot([b0], [1.0], "s", color=REF_COLOR, ms=7, zorder=4)
    ax.annotate(f"reference B0={b0:g}", (b0, 1.0), textcoords="offset points", xytext=(8, -14),
                color=REF_COLOR, fontsize=9)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper center", frameon=False)
    return ax


def plot_b_simple(plan: Plan, ax: Any = None) -> Any:
    """B_simple against training step (with its interval) and the training loss."""
    ax = ax if ax is not None else _new_axes()
    _style(ax, "Gradient noise scale during the measured phase", "training step", "B_simple")
    pts = [p for p in plan.b_simple_trajectory if p.b_simple is not None]
    steps = [p.step for p in pts]
    ax.plot(steps, [p.b_simple for p in pts], "o-", color=LINE_COLOR, ms=4, label="B_simple")
    lows = [p.b_simple_ci[0] if p.b_simple_ci else p.b_simple for p in pts]
    highs = [
        p.b_simple_ci[1] if p.b_simple_ci and p.b_simple_ci[1] != float("inf") else p.b_simple
        for p in pts
    ]
    ax.fill_between(steps, lows, highs, color=LINE_COLOR, alpha=0.15, label="interval")
    ax.axhline(plan.b_simple, color=EFF_COLOR, ls="--", lw=1.2, label=f"used: {plan.b_simple:.0f}")
    ax.set_ylim(bottom=0)
    loss_pts = [p for p in plan.b_simple_trajectory if p.train_loss is not None]
    if loss_pts:
        twin = ax.twinx()
        twin.plot([p.step for p in loss_pts], [p.train_loss for p in loss_pts], color="#e4572e",
                  lw=1.2, alpha=0.8, label="train loss")  # fmt: skip
        twin.set_ylabel("train loss", color="#e4572e")
        twin.spines["top"].set_visible(False)
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(handles + h2, labels + l2, fontsize=8, loc="upper left", frameon=False)
    else:
        ax.legend(fontsize=8, loc="upper left", frameon=False)
    return ax
