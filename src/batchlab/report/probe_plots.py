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
from batchlab.report.axes import legend_below, new_axes, style_axes

POINT_COLOR = "#2f6fde"
MISFIT_COLOR = "#e4572e"
BUDGET_COLOR = "#111111"
KNEE_COLOR = "#29a35a"


def _bytes_log_axis(ax: Any, low: float, high: float) -> None:
    """Log y axis in bytes from `low` to `high`, ticks at powers of two (thinned to about
    eight), labelled "64 KiB", "8 MiB": a log axis keeps a 200 KiB step and an 11 GiB budget both
    readable, where a linear one flattens every CPU measurement onto the zero line."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(LogLocator(base=2, numticks=9))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_bytes(value)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.tick_params(axis="y", labelsize=8)


def _batch_log_axis(ax: Any, low: float, high: float) -> None:
    """Log2 x axis of batch sizes with plain labels (4, 32, 4000)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.set_xlim(low, high)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def plot_memory(memory: MemoryProbe, ax: Any = None) -> Any:
    """Measured peak per step against B, the fitted line, the budget and the usable limit,
    log-log so the measured points, the fit and the budget are all visible at once."""
    ax = ax if ax is not None else new_axes()
    style_axes(ax, f"Memory ({memory.device})", "batch size B",
               "peak memory of one training step (log)")  # fmt: skip
    ran = [p for p in memory.points if p.peak_bytes is not None]
    sizes = [p.batch_size for p in memory.points] + [memory.max_batch_size]
    x_low, x_high = min(sizes) / 1.4, max(sizes) * 1.4
    grid = [x_low * (x_high / x_low) ** (k / 60) for k in range(61)]
    model = [memory.fixed_bytes + memory.bytes_per_sample * x for x in grid]
    values = [p.peak_bytes for p in ran] + [m for m in model if m > 0]
    _bytes_log_axis(ax, min(values) / 2, max(values + [memory.budget_bytes]) * 2)
    _batch_log_axis(ax, x_low, x_high)
    ax.plot(grid, model, color=POINT_COLOR, alpha=0.6, lw=1.2,
            label=f"model: {format_bytes(memory.fixed_bytes)} + "
            f"{format_bytes(memory.bytes_per_sample)} x B")  # fmt: skip
    for fits, style in ((True, {"color": POINT_COLOR, "label": "measured step (fits)"}),
                        (False, {"color": MISFIT_COLOR, "marker": "x", "s": 60,
                                 "label": "measured step (over the limit)"})):  # fmt: skip
        chosen = [p for p in ran if p.fits == fits]
        if chosen:
            ax.scatter([p.batch_size for p in chosen], [p.peak_bytes for p in chosen],
                       zorder=3, **style)  # fmt: skip
    for p in memory.points:
        if p.oom:
            ax.axvline(p.batch_size, color=MISFIT_COLOR, ls=":", lw=1)
            ax.text(p.batch_size, 0.97, "OOM", color=MISFIT_COLOR, fontsize=8, ha="center",
                    va="top", transform=ax.get_xaxis_transform())  # fmt: skip
    budget_label = "target memory" if memory.predicted_only else "budget"
    ax.axhline(memory.budget_bytes, color=BUDGET_COLOR, lw=1.2,
               label=f"{budget_label} {format_bytes(memory.budget_bytes)}")  # fmt: skip
    ax.axhline(memory.usable_bytes, color=BUDGET_COLOR, lw=1, ls="--",
               label=f"usable (margin {memory.margin:.0%})")  # fmt: skip
    verb = "predicted" if not memory.verified else "max"
    ax.axvline(memory.max_batch_size, color=KNEE_COLOR, lw=1.2, label=f"{verb} B")
    right_half = memory.max_batch_size > (x_low * x_high) ** 0.5
    # At the bottom: the fit is highest at the largest batch, so its foot is clear.
    ax.text(memory.max_batch_size, 0.03, f" {verb} B={memory.max_batch_size} ", color=KNEE_COLOR,
            fontsize=9, ha="right" if right_half else "left", va="bottom",
            transform=ax.get_xaxis_transform(),
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
    legend_below(ax)
    return ax


def _clipped_bars(profile: ThroughputProfile, top: float) -> tuple[list[float], list[float]]:
    """Lengths of the error bars below and above each median, the upper ones cut at `top`
    (the axes' top edge)."""
    low = [p.samples_per_s - max(p.samples_per_s_low, 0.0) for p in profile.points]
    high = [min(p.samples_per_s_high, top) - p.samples_per_s for p in profile.points]
    return low, high


def plot_throughput(profile: ThroughputProfile, ax: Any = None) -> Any:
    """Median samples/s against B (log2 axis) with the windows' range, and the knee.

    The y axis is set by the medians (plus a margin), not by the bars: one noisy window
    must not flatten the curve. A bar cut at the top ends in an arrow marker."""
    ax = ax if ax is not None else new_axes()
    style_axes(ax, f"Throughput ({profile.device})", "batch size B", "training samples / s")
    sizes = [p.batch_size for p in profile.points]
    medians = [p.samples_per_s for p in profile.points]
    top = max(medians) * 1.25
    low, high = _clipped_bars(profile, top)
    ax.set_xscale("log", base=2)
    ax.errorbar(sizes, medians, yerr=[low, high], color=POINT_COLOR, marker="o", ms=4,
                capsize=3, lw=1.2, label="median over windows (bars: range)")  # fmt: skip
    cut = [p.batch_size for p in profile.points if p.samples_per_s_high > top]
    if cut:
        ax.plot(cut, [top] * len(cut), "^", color=POINT_COLOR, ms=7, clip_on=False, zorder=4,
                label="range goes above the axes")  # fmt: skip
    threshold = profile.knee_fraction * profile.peak_samples_per_s
    ax.axhline(threshold, color=BUDGET_COLOR, ls="--", lw=1,
               label=f"{profile.knee_fraction:.0%} of peak")  # fmt: skip
    knee = next(p for p in profile.points if p.batch_size == profile.knee_batch_size)
    ax.axvline(knee.batch_size, color=KNEE_COLOR, lw=1.2)
    ax.scatter([knee.batch_size], [knee.samples_per_s], color=KNEE_COLOR, s=70, zorder=4)
    right_end = knee.batch_size >= sizes[-1]
    ax.annotate(f"knee B={knee.batch_size}", (knee.batch_size, 0),
                xytext=(-6 if right_end else 6, 8), textcoords="offset points", color=KNEE_COLOR,
                fontsize=9, ha="right" if right_end else "left", va="bottom",
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes], fontsize=8, rotation=45)
    ax.minorticks_off()
    ax.set_ylim(0, top)
    legend_below(ax)
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
