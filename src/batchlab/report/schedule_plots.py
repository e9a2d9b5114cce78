"""The plan's schedule drawn over the predicted B_noise trajectory (`ax=None` in, `ax` out).

Nothing is computed here: the curve and the phases are the plan's `ScheduleForecast`
(`batchlab.planner.schedule`); the band is the trajectory fit's own interval.
"""

from __future__ import annotations

from typing import Any

from batchlab.planner.plan_types import Plan
from batchlab.report.axes import legend_below, new_axes, style_axes

NOISE_COLOR = "#0f9bb5"
SCHEDULE_COLOR = "#29a35a"
FIXED_COLOR = "#6b7280"


def plot_schedule(plan: Plan, ax: Any = None) -> Any:
    """B_noise(t) predicted along the path to the target (with the fit's band), the
    schedule's batch B(t) as steps, and the best fixed batch, against the schedule's steps."""
    ax = new_axes() if ax is None else ax
    fc, outlook = plan.schedule, plan.noise_outlook
    if fc is None or outlook is None or not fc.path_steps:
        ax.text(0.5, 0.5, "no schedule (no fitted B_noise trajectory)", ha="center",
                transform=ax.transAxes)  # fmt: skip
        return ax
    steps = [0.0, *fc.path_steps]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:], strict=False)]
    band = [outlook.trajectory.interval(loss) for loss in outlook.path_losses]
    ax.fill_between(mids, [lo for lo, _ in band], [hi for _, hi in band], color=NOISE_COLOR,
                    alpha=0.15, lw=0)  # fmt: skip
    ax.plot(mids, fc.path_b_noise, color=NOISE_COLOR, lw=1.5, label="predicted B_noise(t)")
    ax.step(steps, [fc.path_batches[0], *fc.path_batches], where="pre", color=SCHEDULE_COLOR,
            lw=2.2, label=f"schedule B(t): {fc.predicted_gain:.2f}x the best fixed")  # fmt: skip
    ax.axhline(fc.best_fixed_batch_size, color=FIXED_COLOR, ls="--", lw=1.2,
               label=f"best fixed B={fc.best_fixed_batch_size}")  # fmt: skip
    ax.set_yscale("log")
    style_axes(ax, "The schedule over the predicted B_noise",
               "optimizer step (predicted, under the schedule)", "batch size / B_noise")  # fmt: skip
    legend_below(ax)
    return ax
