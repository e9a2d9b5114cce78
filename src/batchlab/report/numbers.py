"""Numbers as people read them in sweep tables and summaries (HTML and terminal alike)."""

from __future__ import annotations


def format_number(value: float | None, digits: int = 3) -> str:
    """`digits` significant figures, thousands as whole numbers with separators; None is "-"."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def format_interval(ci: tuple[float, float] | None) -> str:
    """ "95% CI low to high", or "" when there is no interval."""
    return "" if ci is None else f"95% CI {format_number(ci[0])} to {format_number(ci[1])}"
