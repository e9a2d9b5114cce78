"""The figure and axes style every batchlab plot shares (no pyplot state, no GUI backend)."""

from __future__ import annotations

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
