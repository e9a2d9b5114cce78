"""Plots of a hardware probe. Each takes `ax=None` and returns the axes it drew into.

With `ax=None` a new figure is made (a plain `matplotlib.figure.Figure`: no pyplot state,
no GUI backend). The plots draw what the probe measured; they compute nothing new.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchlab.measure.memory import MemoryProbe
from batchlab.measure.probe import ProbeResult
from batchlab.measure.sizes import format_bytes
from batchlab.measure.throughput import ThroughputProfile
from batchlab.report.axes import new_axes, style_axes

POINT_COLOR = "#2f6fde"
MISFIT_COLOR = "#e4572e"
BUDGET_COLOR = "#111111"
KNEE_COLOR = "#29a35a"


def _bytes_axis(ax: Any, top: float) -> float:
    """Label the y axis in KiB, MiB or GiB; return the scale the data must be divided by."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if top >= 2 * scale:
            ax.set_ylabel(f"peak memory of one training step ({unit})")
            return scale
    ax.set_ylabel("peak memory of one training step (bytes)")
    return 1


def plot_memory(memory: MemoryProbe, ax: Any = None) -> Any:
    """Measured peak per step against B, the fitted line, the budget and the usable limit."""
    ax = ax if ax is not None else new_axes()
    ran = [p for p in memory.points if p.peak_bytes is not None]
    x_max = max([p.batch_size for p in memory.points] + [memory.max_batch_size]) * 1.08
    top = max([p.peak_bytes for p in ran] + [memory.budget_bytes]) * 1.08
    scale = _bytes_axis(ax, top)
    style_axes(ax, f"Memory ({memory.device})", "batch size B", ax.get_ylabel())

    fit_x = [0.0, x_max]
    fit_y = [(memory.fixed_bytes + memory.bytes_per_sample * x) / scale for x in fit_x]
    ax.plot(
        fit_x,
        fit_y,
        color=POINT_COLOR,
        alpha=0.6,
        lw=1.2,
        label=f"model: {format_bytes(memory.fixed_bytes)} + "
        f"{format_bytes(memory.bytes_per_sample)} x B",
    )
    fits = [p for p in ran if p.fits]
    misfits = [p for p in ran if not p.fits]
    ax.scatter(
        [p.batch_size for p in fits],
        [p.peak_bytes / scale for p in fits],
        color=POINT_COLOR,
        zorder=3,
        label="measured step (fits)",
    )
    if misfits:
        ax.scatter(
            [p.batch_size for p in misfits],
            [p.peak_bytes / scale for p in misfits],
            color=MISFIT_COLOR,
            marker="x",
            s=60,
            zorder=3,
            label="measured step (over the limit)",
        )
    for p in memory.points:
        if p.oom:
            ax.axvline(p.batch_size, color=MISFIT_COLOR, ls=":", lw=1)
            ax.annotate(
                "OOM", (p.batch_size, top / scale * 0.97), color=MISFIT_COLOR, fontsize=8,
                ha="center", va="top",
            )  # fmt: skip
    budget_label = "target memory" if memory.predicted_only else "budget"
    ax.axhline(
        memory.budget_bytes / scale,
        color=BUDGET_COLOR,
        lw=1.2,
        label=f"{budget_label} {format_bytes(memory.budget_bytes)}",
    )
    ax.axhline(
        memory.usable_bytes / scale,
        color=BUDGET_COLOR,
        lw=1,
        ls="--",
        label=f"usable (margin {memory.margin:.0%})",
    )
    verb = "predicted" if not memory.verified else "max"
    ax.axvline(memory.max_batch_size, color=KNEE_COLOR, lw=1.2)
    right_half = memory.max_batch_size > x_max * 0.6
    ax.annotate(
        f"{verb} B={memory.max_batch_size}",
        (memory.max_batch_size, memory.budget_bytes / scale),
        xytext=(-6 if right_half else 6, 6),
        textcoords="offset points",
        color=KNEE_COLOR,
        fontsize=9,
        ha="right" if right_half else "left",
        va="bottom",
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
    )
    ax.set_xlim(0, x_max)
    ax.set_ylim(0, top / scale)
    ax.legend(fontsize=8, loc="best", framealpha=0.9, edgecolor="none")
    return ax


def plot_throughput(profile: ThroughputProfile, ax: Any = None) -> Any:
    """Median samples/s against B (log2 axis) with the windows' range, and the knee."""
    ax = ax if ax is not None else new_axes()
    style_axes(ax, f"Throughput ({profile.device})", "batch size B", "training samples / s")
    sizes = [p.batch_size for p in profile.points]
    medians = [p.samples_per_s for p in profile.points]
    low = [p.samples_per_s - p.samples_per_s_low for p in profile.points]
    high = [p.samples_per_s_high - p.samples_per_s for p in profile.points]
    ax.set_xscale("log", base=2)
    ax.errorbar(
        sizes,
        medians,
        yerr=[low, high],
        color=POINT_COLOR,
        marker="o",
        ms=4,
        capsize=3,
        lw=1.2,
        label="median over windows (bars: range)",
    )
    threshold = profile.knee_fraction * profile.peak_samples_per_s
    ax.axhline(
        threshold, color=BUDGET_COLOR, ls="--", lw=1, label=f"{profile.knee_fraction:.0%} of peak"
    )
    knee = next(p for p in profile.points if p.batch_size == profile.knee_batch_size)
    ax.axvline(knee.batch_size, color=KNEE_COLOR, lw=1.2)
    ax.scatter([knee.batch_size], [knee.samples_per_s], color=KNEE_COLOR, s=70, zorder=4)
    right_end = knee.batch_size >= sizes[-1]
    ax.annotate(
        f"knee B={knee.batch_size}",
        (knee.batch_size, 0),
        xytext=(-6 if right_end else 6, 8),
        textcoords="offset points",
        color=KNEE_COLOR,
        fontsize=9,
        ha="right" if right_end else "left",
        va="bottom",
        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
    )
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes], fontsize=8, rotation=45)
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best", framealpha=0.9, edgecolor="none")
    return ax


def probe_figure(result: ProbeResult) -> Any:
    """Both panels side by side: memory (left) and throughput (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_memory(result.memory, ax=left)
    plot_throughput(result.throughput_profile(), ax=right)
    fig.suptitle(f"batchlab probe {result.task}", fontsize=12, x=0.01, ha="left")
    return fig


def save_probe_figure(result: ProbeResult, path: str | Path) -> Path:
    """Write `probe_figure(result)` as a PNG; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probe_figure(result).savefig(path, dpi=120)
    return path
