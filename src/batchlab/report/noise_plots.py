"""Plot of a `NoiseRun`: B_simple against step, with its interval, and the training loss.

`plot_noise_run(run, ax=None)` draws into `ax` (a new figure without pyplot state when
None) and returns it; the loss goes on a twin axis (`ax.loss_axis`). The plot draws what
was measured and computes nothing new.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchlab.core.trajectory import NoiseTrajectory
from batchlab.measure.noise_run import NoisePoint, NoiseRun
from batchlab.report.axes import legend_below, new_axes, plain_log_axis

FIGSIZE = (7.0, 4.2)
NOISE_COLOR = "#2f6fde"
LOSS_COLOR = "#e4572e"
BATCH_COLOR = "#555555"


def plot_noise_run(run: NoiseRun, ax: Any = None) -> Any:
    """B_simple (log scale) with its confidence band, unreliable points hollow; loss on a
    second axis; the reference batch as a dotted line for scale."""
    ax = ax if ax is not None else new_axes(FIGSIZE)
    pts = [p for p in run.points if p.b_simple is not None]
    finite_highs = [p.b_simple_ci[1] for p in run.points if math.isfinite(p.b_simple_ci[1])]
    values = [p.b_simple for p in pts] + finite_highs + [run.batch_size]
    lows = [p.b_simple_ci[0] for p in run.points if p.b_simple_ci[0] > 0]
    top = max(values) * 1.6
    bottom = min(values + lows) / 1.6
    # An unbounded interval reaches the top of the axes.
    steps = [p.step for p in run.points]
    band_low = [max(p.b_simple_ci[0], bottom) for p in run.points]
    band_high = [min(p.b_simple_ci[1], top) for p in run.points]
    level = f"{run.final.confidence:.0%}"
    ax.fill_between(
        steps, band_low, band_high, color=NOISE_COLOR, alpha=0.18, lw=0, label=f"{level} interval"
    )
    ax.plot([p.step for p in pts], [p.b_simple for p in pts], "-", color=NOISE_COLOR, lw=1.4)
    good = [p for p in pts if p.reliable]
    weak = [p for p in pts if not p.reliable]
    ax.plot(
        [p.step for p in good],
        [p.b_simple for p in good],
        "o",
        color=NOISE_COLOR,
        ms=4,
        label="B_simple",
    )
    if weak:
        ax.plot(
            [p.step for p in weak],
            [p.b_simple for p in weak],
            "o",
            mfc="white",
            color=NOISE_COLOR,
            ms=4,
            label="unreliable",
        )
    ax.axhline(
        run.batch_size, color=BATCH_COLOR, ls=":", lw=1, label=f"reference batch {run.batch_size}"
    )
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("training step")
    # The points are B_simple of g/(sqrt(v)+eps) when the run measured Adam-preconditioned.
    pre = "Adam-preconditioned " if run.preconditioned else ""
    ax.set_ylabel(f"{pre}B_simple = tr(Σ) / |G|²", color=NOISE_COLOR)
    ax.set_title(
        f"Gradient noise scale: {run.task} ({pre}{run.method}, seed {run.seed})",
        fontsize=11,
        loc="left",
    )
    ax.grid(True, alpha=0.3, which="both")
    ax.spines["top"].set_visible(False)

    loss_ax = ax.twinx()
    loss_pts = [p for p in run.points if p.train_loss is not None]
    loss_ax.plot(
        [p.step for p in loss_pts],
        [p.train_loss for p in loss_pts],
        "s--",
        color=LOSS_COLOR,
        ms=3,
        lw=1.1,
        label="train loss",
    )
    loss_ax.set_ylabel("train loss (mean since the previous point)", color=LOSS_COLOR)
    loss_ax.spines["top"].set_visible(False)
    handles, labels = ax.get_legend_handles_labels()
    more_h, more_l = loss_ax.get_legend_handles_labels()
    legend_below(ax, handles + more_h, labels + more_l, ncol=3)
    ax.loss_axis = loss_ax
    return ax


def plot_b_simple_vs_loss(
    points: Sequence[NoisePoint],
    trajectory: NoiseTrajectory | None = None,
    ax: Any = None,
    *,
    loss_span: tuple[float, float] | None = None,
) -> Any:
    """B_simple against the training loss (log-log), with each point's interval, and the
    fitted trajectory log B = a + b log L with its band (Kaplan et al. 2020, sec. 5.1).

    `loss_span` (low, high) is how far to draw the fit (default: the measured losses).
    """
    ax = ax if ax is not None else new_axes(FIGSIZE)
    pts = [p for p in points if p.b_simple is not None and p.train_loss is not None]
    for p in pts:
        lo, hi = p.b_simple_ci
        top = hi if math.isfinite(hi) else p.b_simple * 4
        ax.plot([p.train_loss] * 2, [max(lo, p.b_simple / 4), top], "-", color=NOISE_COLOR,
                alpha=0.25, lw=1)  # fmt: skip
    ax.plot([p.train_loss for p in pts], [p.b_simple for p in pts], "o", color=NOISE_COLOR,
            ms=4, label="measured B_simple (95% interval)")  # fmt: skip
    if trajectory is not None:
        low, high = loss_span or trajectory.loss_range
        grid = [low * (high / low) ** (k / 60) for k in range(61)]
        band = [trajectory.interval(v) for v in grid]
        ax.fill_between(grid, [b[0] for b in band], [b[1] for b in band], color=LOSS_COLOR,
                        alpha=0.15, lw=0, label=f"fit {trajectory.confidence:.0%} band")  # fmt: skip
        ax.plot(grid, [trajectory.b_noise(v) for v in grid], "-", color=LOSS_COLOR, lw=1.8,
                label=f"fit: B = {math.exp(trajectory.log_scale):.3g} L^{trajectory.exponent:.2f}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()  # training moves right: the loss falls
    plain_log_axis(ax.xaxis)
    plain_log_axis(ax.yaxis)
    ax.set_xlabel("training loss (falls as training goes on)")
    ax.set_ylabel("B_noise")
    ax.set_title("B_simple against the training loss", fontsize=11, loc="left")
    ax.grid(True, alpha=0.3, which="both")
    legend_below(ax)
    return ax


def save_noise_plot(run: NoiseRun, path: str | Path) -> Path:
    """Write `plot_noise_run` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax = plot_noise_run(run)
    ax.figure.savefig(path, dpi=120)
    return path
