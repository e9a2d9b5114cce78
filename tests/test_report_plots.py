"""The report's plots read at a glance (issue 14, item 8): the measured points fill the
axes, one wide error bar does not flatten a curve, and no two labels overlap.

The plan is a real CPU plan (mnist1d-cnn, `make demo`): its memory points are KiB-MiB
against an 11.4 GiB budget, which a linear axis drew as a flat line at 0.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import combinations
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from batchlab.planner.plan_types import Plan
from batchlab.planner.schedule import with_schedule
from batchlab.report.noise_plots import plot_noise_run
from batchlab.report.plan_plots import plot_noise_trajectory, plot_time_to_target
from batchlab.report.probe_plots import plot_memory, plot_throughput
from batchlab.report.schedule_plots import plot_schedule

PLAN = Path(__file__).parent / "data" / "plan_cpu.json"


@pytest.fixture(scope="module")
def plan() -> Plan:
    return Plan.load(PLAN)


def _texts(fig):
    """Every visible, non-empty text on the figure with its box in pixels, after a draw."""
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    found, seen = [], _undrawn_tick_labels(fig)
    for text in fig.findobj(Text):
        if id(text) in seen or not text.get_visible() or not text.get_text().strip():
            continue
        seen.add(id(text))
        found.append((text.get_text(), text.get_window_extent(renderer)))
    return found


def _undrawn_tick_labels(fig) -> set[int]:
    """Ids of tick labels outside the view limits: matplotlib keeps them, but never draws them."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                loc = tick.get_loc()
                if loc is None or not low * (1 - 1e-9) <= loc <= high * (1 + 1e-9) + 1e-12:
                    hidden.update({id(tick.label1), id(tick.label2)})
    return hidden


def _overlaps(fig):
    boxes = _texts(fig)
    return [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2)
            if box_a.overlaps(box_b) and box_a.width > 0 and box_b.width > 0]  # fmt: skip


def _efficient_elsewhere(plan: Plan) -> Plan:
    """The same plan with the efficient pick at a smaller batch than the fastest."""
    cand = max((c for c in plan.candidates if c.batch_size < plan.recommended.batch_size / 1.5),
               key=lambda c: c.batch_size)  # fmt: skip
    eff = dataclasses.replace(plan.efficient, batch_size=cand.batch_size,
                              predicted_speedup=1 / cand.relative_time)  # fmt: skip
    return dataclasses.replace(plan, efficient=eff)


def _all_figures(plan: Plan):
    yield "time", plot_time_to_target(plan).figure
    yield "time, two picks", plot_time_to_target(_efficient_elsewhere(plan)).figure
    yield "noise run", plot_noise_run(plan.noise).figure
    yield "trajectory", plot_noise_trajectory(plan).figure
    yield "schedule", plot_schedule(with_schedule(plan)).figure
    yield "memory", plot_memory(plan.probe.memory).figure
    yield "throughput", plot_throughput(plan.probe.throughput_profile()).figure


def test_no_two_labels_overlap(plan):
    for name, fig in _all_figures(plan):
        assert _overlaps(fig) == [], name


def test_memory_axis_is_not_dominated_by_the_budget(plan):
    memory = plan.probe.memory
    ax = plot_memory(memory)
    low, high = ax.get_ylim()
    assert ax.get_yscale() == "log"
    peaks = [p.peak_bytes for p in memory.points if p.peak_bytes is not None]
    assert low < min(peaks) and max(peaks) < high
    assert low < memory.budget_bytes < high  # the budget is still drawn
    # The measured points span a real part of the height, not a sliver at the bottom.
    share = (math.log(max(peaks)) - math.log(min(peaks))) / (math.log(high) - math.log(low))
    assert share > 0.3
    assert any(t.get_text().strip() == f"max B={memory.max_batch_size}" for t in ax.texts)


def test_one_wide_error_bar_does_not_flatten_the_throughput_curve(plan):
    profile = plan.probe.throughput_profile()
    points = list(profile.points)
    wide = points[5]
    points[5] = dataclasses.replace(wide, samples_per_s_high=wide.samples_per_s * 50)
    ax = plot_throughput(dataclasses.replace(profile, points=tuple(points)))
    medians = [p.samples_per_s for p in points]
    low, high = ax.get_ylim()
    assert low <= min(medians) and max(medians) < high <= 1.5 * max(medians)
    arrows = [line for line in ax.lines if line.get_marker() == "^"]
    assert [list(line.get_xdata()) for line in arrows] == [[wide.batch_size]]


def test_coinciding_picks_get_one_label(plan):
    assert plan.efficient.batch_size == plan.recommended.batch_size
    texts = [t.get_text() for t in plot_time_to_target(plan).texts]
    assert sum("fastest = efficient" in t for t in texts) == 1
    assert not any(t.startswith(("fastest\n", "efficient\n")) for t in texts)
    two = [t.get_text() for t in plot_time_to_target(_efficient_elsewhere(plan)).texts]
    assert sum(t.startswith(("fastest\n", "efficient\n")) for t in two) == 2


def test_legends_sit_outside_the_data(plan):
    for name, fig in _all_figures(plan):
        FigureCanvasAgg(fig).draw()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            assert not legend.get_window_extent().overlaps(ax.get_window_extent()), name


@pytest.mark.parametrize(
    ("limits", "labelled"),
    [((30, 90), ["30", "40", "50", "60", "70", "80", "90"]),  # under a decade: every minor tick
     ((30, 1500), ["50", "200", "500"]),  # two decades: 2x and 5x only
     ((1e-3, 1e3), [])],  # six decades: the majors alone
)  # fmt: skip
def test_minor_log_labels_thin_out_with_the_range(limits, labelled):
    from matplotlib.figure import Figure

    from batchlab.report.axes import plain_log_axis

    ax = Figure().subplots()
    ax.set_yscale("log")
    ax.set_ylim(*limits)
    plain_log_axis(ax.yaxis)
    FigureCanvasAgg(ax.figure).draw()
    low, high = limits
    minor = [t.get_text() for t in ax.yaxis.get_minorticklabels()
             if low <= float(t.get_position()[1]) <= high]  # fmt: skip
    assert [t for t in minor if t] == labelled
