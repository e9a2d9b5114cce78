"""The plan's schedule (`batchlab.planner.schedule`): known answers on synthetic measurements.

B_noise = 60 L^-1.5 along a falling loss (21 -> 430, `test_plan_trajectory`), step time
t(B) = 10 ms + 0.1 ms x B: per S_min step (1 + B_noise/B) t(B) is least near
B = sqrt(100 B_noise), so the batch must rise from ~64 to ~256 along the path.
"""

import dataclasses
import math

import pytest
from test_plan_trajectory import noisy_measurements

from batchlab.core.lr import adascale_gain, lr_from_gain, scale_lr
from batchlab.core.lr_choice import LrCheck
from batchlab.core.schedule import fastest_batch, path_cost
from batchlab.core.trajectory import min_steps_along_path
from batchlab.errors import ConfigError
from batchlab.planner import build_plan
from batchlab.planner.plan_types import Plan
from batchlab.planner.schedule import recommend_schedule, schedule_ladder, with_schedule
from batchlab.train import load_schedule


def linear_time(b):
    return 0.01 + 1e-4 * b


def _plan(**over) -> Plan:
    m = noisy_measurements(0.0, reference_epochs=1, num_train=6400, **over)
    m = dataclasses.replace(
        m,
        throughput=tuple(
            dataclasses.replace(p, step_s=linear_time(p.batch_size),
                                samples_per_s=p.batch_size / linear_time(p.batch_size))
            for p in m.throughput
        ),
    )  # fmt: skip
    return with_schedule(build_plan(m))


def test_the_batch_rises_with_b_noise_and_each_phase_is_its_stretches_fastest():
    plan = _plan()
    fc = recommend_schedule(plan, lr_coupling="adascale")
    o, m = plan.noise_outlook, plan.measurements
    ladder = {b: c.step_s for b, c in schedule_ladder(plan).items()}
    d = min_steps_along_path(o.trajectory, o.path_losses, o.path_steps, 32)
    b_noises = [o.trajectory.b_noise(v) for v in o.path_losses]
    expected = [fastest_batch(bn, sorted(ladder), ladder.__getitem__) for bn in b_noises]
    # Merged into phases (the expected sequence is already rising here).
    assert expected == sorted(expected)
    phases = [b for i, b in enumerate(expected) if i == 0 or b != expected[i - 1]]
    assert [p.batch_size for p in fc.schedule.phases] == phases
    assert len(phases) >= 3 and phases[0] < phases[-1]
    # Predictions: eq. 2.11 summed; the gain is the best fixed batch's time over ours.
    cost = path_cost(expected, d, b_noises, ladder.__getitem__)
    assert fc.predicted_seconds == pytest.approx(cost.seconds)
    assert fc.predicted_examples == pytest.approx(cost.examples)
    best = min(path_cost([b] * len(d), d, b_noises, ladder.__getitem__).seconds for b in ladder)
    assert fc.best_fixed_seconds == pytest.approx(best)
    assert fc.predicted_gain == pytest.approx(best / cost.seconds) and fc.predicted_gain > 1
    lo, hi = fc.predicted_gain_interval
    assert lo <= fc.predicted_gain <= hi
    # Phase starts: examples seen before the phase, as the path predicts them.
    starts = [p.start for p in fc.schedule.phases]
    assert starts[0] == 0 and starts == sorted(starts)
    assert m.optimizer == "SGD" and fc.lr_rule == "adascale"
    for p, bn in zip(fc.schedule.phases, fc.phase_b_noise, strict=True):
        assert p.lr == pytest.approx(
            lr_from_gain(0.1, adascale_gain(p.batch_size, 32, bn), "adascale")
        )


def test_the_ladder_is_thinned_around_b0():
    plan = _plan()
    sizes = sorted(c.batch_size for c in plan.candidates if not c.extrapolated)
    ladder = sorted(schedule_ladder(plan))
    assert 32 in ladder and set(ladder) <= set(sizes)
    assert all(b / a >= 1.25 for a, b in zip(ladder, ladder[1:], strict=False))
    # Every candidate left out is within 1.25x of one kept.
    assert all(min(max(b, k) / min(b, k) for k in ladder) < 1.25 for b in set(sizes) - set(ladder))


def test_memory_clamp_prices_accumulation_above_the_memory_max():
    """Above the memory max a batch is micro-batches x accumulation, each paying the micro-
    batch's time: with no per-step cost that never shortens the run (eq. 2.11: half the
    steps at twice the time), so the clamped schedule tops out at the memory max."""
    free, clamped = _plan(), _plan(max_batch_size=64)
    assert max(p.batch_size for p in free.schedule.schedule.phases) > 64
    for p in clamped.schedule.schedule.phases:
        assert p.micro_batch_size <= 64
        assert p.accumulation_steps == math.ceil(p.batch_size / p.micro_batch_size)
    assert clamped.schedule.schedule.phases[-1].batch_size == 64
    c128 = next(c for c in clamped.candidates if c.batch_size == 128)
    assert (c128.micro_batch_size, c128.accumulation_steps) == (64, 2)
    assert c128.step_s == pytest.approx(2 * linear_time(64))


def test_fixed_rule_coupling_uses_the_plans_rule_and_the_lr_checks_correction():
    plan = _plan()
    fc = plan.schedule  # the default coupling
    assert fc.lr_rule == plan.recommended.lr_rule == "linear"
    assert len(fc.schedule.phases) >= 3
    for p in fc.schedule.phases:
        assert p.lr == pytest.approx(scale_lr(0.1, 32, p.batch_size, "linear"))
    rec = plan.recommended
    check = LrCheck(rec.batch_size, rec.micro_batch_size, rec.accumulation_steps, "linear",
                    rec.lr, rec.lr / 2, "lowered", "lowered", (), 10, 0, 5, 100, 1000)  # fmt: skip
    halved = recommend_schedule(dataclasses.replace(plan, lr_check=check))
    for p, q in zip(fc.schedule.phases, halved.schedule.phases, strict=True):
        assert q.lr == pytest.approx(p.lr / 2)
    with pytest.raises(ConfigError, match="`lr_coupling`: expected one of rule, adascale"):
        recommend_schedule(plan, lr_coupling="seesaw")


def test_plan_with_schedule_round_trips_and_train_reads_it(tmp_path):
    plan = _plan()
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again == plan
    assert load_schedule(path) == plan.schedule.schedule


def test_a_schedule_that_buys_nothing_is_the_fixed_recommendation():
    """B_noise constant along the path: no rising schedule can gain, so it is one phase at
    the fixed recommendation, and the reason says so."""
    m = noisy_measurements(0.0, reference_epochs=1, num_train=6400)
    flat = tuple(dataclasses.replace(p, b_simple=100.0, b_simple_ci=(77.0, 130.0)) for p in m.noise)
    plan = with_schedule(build_plan(dataclasses.replace(m, noise=flat)))
    (phase,) = plan.schedule.schedule.phases
    rec = plan.recommended
    assert (phase.batch_size, phase.micro_batch_size, phase.lr) == (
        rec.batch_size,
        rec.micro_batch_size,
        pytest.approx(rec.lr),
    )
    assert "one phase, the fixed recommendation" in plan.schedule.reasons["batch"]
    assert plan.schedule.predicted_gain <= 1.0 + 1e-9


def test_a_given_b_simple_gives_no_schedule():
    m = noisy_measurements(0.0, reference_epochs=1, num_train=6400)
    assert with_schedule(build_plan(m, b_simple=100.0)).schedule is None


def test_the_report_lists_the_phases():
    from batchlab.report.plan_report import plan_page

    plan = _plan()
    html = plan_page(plan).render()
    assert "Batch-size schedule" in html
    for p in plan.schedule.schedule.phases:
        assert f"from {p.start} examples" in html
