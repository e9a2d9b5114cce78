"""The leading candidates timed head to head: which sizes, and how their times enter the plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_task
from test_plan_stability import B_NOISE, cpu_step_s, ladder, plan_for

from batchlab.core.step_time import with_head_to_head
from batchlab.measure.probe import ProbeSettings
from batchlab.measure.throughput import ThroughputPoint, ThroughputProfile
from batchlab.planner import Plan, build_plan
from batchlab.planner.head_to_head import WINDOWS, contenders, time_head_to_head
from batchlab.planner.timing import step_time_model, timed_points


def profile(step_s, sizes, spread: float = 0.02) -> ThroughputProfile:
    """A head-to-head timing whose medians are `step_s(b)`, windows spread +-`spread`."""
    points = []
    for b in sizes:
        rate = b / step_s(b)
        points.append(
            ThroughputPoint(b, rate, step_s(b), 2 * spread, rate / (1 + spread),
                            rate * (1 + spread), WINDOWS, 10)
        )  # fmt: skip
    return ThroughputProfile("cpu", False, tuple(points), sizes[-1], 0.9, 1.0, (), sizes[-1], 0, 0)


def plan_with_h2h(plan: Plan, step_s) -> Plan:
    m = dataclasses.replace(plan.measurements, head_to_head=profile(step_s, contenders(plan)))
    return build_plan(m, b_simple=B_NOISE, lr_rule="linear")


def test_contenders_are_b0_and_the_candidates_near_the_fastest():
    """B_noise 400, step time 1 ms x (1 + B/512): B=400 and 512 are the fastest, 256 is 8%
    and 1024 17% slower (within 1.25x), 128 45% slower (out); B0=32 is always timed."""
    plan = plan_for(ladder(cpu_step_s))
    assert contenders(plan) == [32, 256, 400, 512, 1024]


def test_no_contest_when_only_b0_is_near():
    """Step time growing as B^2 from B0 on: every larger batch is over 2x slower to the
    target, none within reach of B0, so nothing is timed again."""
    plan = plan_for(ladder(lambda b: 1e-3 * (max(b, 32) / 32) ** 2))
    assert plan.recommended.batch_size == 32
    assert contenders(plan) == []


def test_head_to_head_times_replace_the_ladder_over_their_range():
    """Inside [min, max] of the head-to-head sizes only its points count; outside, the
    ladder keeps its shape, scaled to meet the nearest end (here 2x: a slower moment)."""
    plan = plan_for(ladder(cpu_step_s))
    slower = lambda b: 2 * cpu_step_s(b)  # noqa: E731
    m = dataclasses.replace(plan.measurements, head_to_head=profile(slower, [32, 256, 512, 1024]))
    sizes = [p.batch_size for p in timed_points(m)]
    assert sizes == [8, 16, 32, 256, 512, 1024]  # 64 and 128 lie inside: dropped
    model = step_time_model(m)
    for b in (8, 16, 32, 256, 1024):
        assert model.step_seconds(b) == pytest.approx(2 * cpu_step_s(b), rel=1e-9)


def test_the_head_to_head_decides_a_near_tie_the_ladder_could_not():
    """On the ladder B=256 and 512 lie within the timing uncertainty (the rule takes the
    smaller, 256). Timed head to head with 15 tight windows, 512 is clearly faster (step
    times of 256 and up as measured, 1.3x between 256 and 512): the plan takes 512, and
    its candidates say how they were timed."""
    base = plan_for(ladder(cpu_step_s))
    assert base.recommended.batch_size == 256
    assert "within the timing uncertainty" in base.verdict
    h2h = lambda b: 1e-3 * (1 + b / 512) * (0.87 if b == 512 else 1.0)  # noqa: E731
    plan = plan_with_h2h(base, h2h)
    assert plan.recommended.batch_size == 512
    timing = {c.batch_size: c.timing for c in plan.candidates}
    assert timing[512] == timing[256] == timing[32] == "head-to-head"
    assert timing[128] == "interpolated" and timing[8] == "measured"
    rec_512 = next(c for c in plan.candidates if c.batch_size == 512)
    assert rec_512.step_s < 0.9 * cpu_step_s(512)  # the head-to-head's time, not the ladder's


def test_head_to_head_round_trips_through_the_plan_file(tmp_path):
    plan = plan_with_h2h(plan_for(ladder(cpu_step_s)), cpu_step_s)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.measurements.head_to_head == plan.measurements.head_to_head
    assert again.recommended == plan.recommended


def test_time_head_to_head_times_the_contenders_and_leaves_no_trace():
    """On a real task: the contenders, and only they, are timed with `WINDOWS` windows
    (fewer when the budget runs out, never under the minimum); the RNG is untouched."""
    task = tiny_task(n=512)
    settings = ProbeSettings(device="cpu", throughput_seconds=1.0)
    m = plan_for(ladder(cpu_step_s)).measurements
    m = dataclasses.replace(m, num_train=512, reference_batch_size=8, max_batch_size=512)
    plan = build_plan(m, b_simple=64, lr_rule="linear")
    sizes = contenders(plan)
    assert len(sizes) >= 2 and sizes[0] == 8
    rng = torch.get_rng_state()
    timed = time_head_to_head(task, plan, settings)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [p.batch_size for p in timed.head_to_head.points] == sizes
    assert all(3 <= p.windows <= WINDOWS for p in timed.head_to_head.points)
    assert timed.probe_steps > m.probe_steps
    assert timed.throughput == m.throughput  # the ladder is kept as it was


def test_outer_ladder_segments_meet_the_head_to_head_ends_and_never_cross_them():
    """Known answer: ladder 1, 3.5, 3, 4, 5 ms at B=8..128 (x2; the dip at 32 is noise, so
    the monotone fit reads sqrt(3.5 x 3) ms at 16 and 32), head-to-head 3 ms at B=32 and
    3.3 ms at 64. Below 32 the ladder is scaled to meet 3 ms there, and B=16, scaled above
    it, is clipped to it; above 64 it is scaled by 3.3/4. The head-to-head's own times come
    through as measured: ladder noise cannot move B0's time."""
    ladder = [(8, 1e-3), (16, 3.5e-3), (32, 3e-3), (64, 4e-3), (128, 5e-3)]
    merged = dict(with_head_to_head(ladder, [(32, 3e-3), (64, 3.3e-3)]))
    assert merged[32] == 3e-3 and merged[64] == 3.3e-3
    below = 3e-3 / (3.5e-3 * 3e-3) ** 0.5
    assert merged[8] == pytest.approx(1e-3 * below)
    assert merged[16] == pytest.approx(3e-3)  # 3.5 ms x 0.93 = 3.24 ms, clipped
    assert merged[128] == pytest.approx(5e-3 * 3.3 / 4)
    assert with_head_to_head(ladder, [(32, 3e-3)]) == ladder  # one size decides nothing


def test_a_head_to_head_of_one_size_changes_nothing():
    """When the timing kept only one size (the rest over budget), the plan is the ladder's
    and no candidate is labelled head-to-head."""
    base = plan_for(ladder(cpu_step_s))
    m = dataclasses.replace(base.measurements, head_to_head=profile(lambda b: 9.0, [32]))
    plan = build_plan(m, b_simple=B_NOISE, lr_rule="linear")
    assert plan.candidates == base.candidates
    assert "head-to-head" not in {c.timing for c in plan.candidates}


def test_a_contended_head_to_head_warns():
    """Windows 9x apart in the head-to-head: `timing-contention`, though the ladder is clean."""
    base = plan_for(ladder(cpu_step_s))
    assert "timing-contention" not in {w.code for w in base.warnings}
    contended = profile(cpu_step_s, contenders(base), spread=2.0)
    m = dataclasses.replace(base.measurements, head_to_head=contended)
    plan = build_plan(m, b_simple=B_NOISE, lr_rule="linear")
    assert "timing-contention" in {w.code for w in plan.warnings}


def test_adaptive_start_prices_batches_as_the_plan_did(tmp_path):
    """`--adaptive --schedule plan.json` starts from the plan's step-time model: the same
    merged points, read from the Plan object and from its JSON file."""
    from batchlab.adaptive.plan_start import plan_start
    from batchlab.planner.schedule import with_schedule

    h2h = lambda b: 1e-3 * (1 + b / 512) * (0.87 if b >= 400 else 1.0)  # noqa: E731
    base = plan_for(ladder(cpu_step_s))
    m = dataclasses.replace(base.measurements, head_to_head=profile(h2h, contenders(base)))
    plan = with_schedule(build_plan(m, lr_rule="linear"))  # from the noise points
    assert plan.measurements.head_to_head is not None
    plan.save(tmp_path / "plan.json")
    model = step_time_model(plan.measurements)
    ladder_only = step_time_model(dataclasses.replace(plan.measurements, head_to_head=None))
    assert model.step_seconds(512) < 0.9 * ladder_only.step_seconds(512)
    for start in (plan_start(plan), plan_start(tmp_path / "plan.json")):
        for b in (8, 32, 256, 512, 1024):
            assert start.step_time.step_seconds(b) == pytest.approx(model.step_seconds(b))
