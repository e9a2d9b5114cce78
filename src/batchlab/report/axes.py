"""The figure and axes style every batchlab plot shares (no pyplot state, no GUI backend)."""

from __future__ import annotations

import math
from typing import Any

FIGSIZE = (6.4, 4.2)


def new_axes(figsize: tuple[float, float] = FIGSIZE) -> Any:
    """Axes on a new plain `matplotlib.figure.Figure`; matplotlib is imported only here."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained").subplots()


def style_axes(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    """Left-aligned title, labels, a light grid, no top or right spine."""
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def legend_below(ax: Any, handles: Any = None, labels: Any = None, ncol: int = 2) -> Any:
    """A legend under the axes, outside the data: dense plots have no empty corner, and
    `loc='best'` still covers points (constrained layout makes room for it). None when
    nothing is labelled."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    kwargs = {"handles": handles, "labels": labels}
    return ax.legend(**kwargs, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                     ncol=ncol, frameon=False)  # fmt: skip


def _minor_log_label(axis: Any, value: float) -> str:
    """A minor tick's label on a log axis: every one under a decade of range, 2x and 5x a
    power of ten up to 2.5 decades, none beyond (the majors, 10^k, say enough)."""
    low, high = sorted(axis.get_view_interval())
    if value <= 0 or low <= 0:
        return ""
    decades = math.log10(high / low)
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    keep = decades < 1 or (decades <= 2.5 and mantissa in (2.0, 5.0))
    return f"{value:g}" if keep else ""


def plain_log_axis(axis: Any) -> None:
    """Plain numbers on a log axis (100, not 10^2), with minor labels thinned by the range
    (see `_minor_log_label`), so a two-decade axis does not stack 0.09 0.08 0.07 ... into
    one smear."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: _minor_log_label(axis, value)))
    axis.set_tick_params(which="minor", labelsize=7)
