"""The plan's decision logic on synthetic measurements with known answers."""

import dataclasses
import json
import math

import pytest

from batchlab.core.batching import split
from batchlab.core.optim import default_lr_rule
from batchlab.errors import ConfigError
from batchlab.measure.memory_fit import MemoryPoint
from batchlab.measure.noise_run import NoisePoint
from batchlab.measure.throughput import ThroughputPoint
from batchlab.planner import Measurements, Plan, build_plan
from batchlab.planner.plan_types import Candidate, Recommendation


def measurements(
    *,
    step_s=lambda b: 0.01,
    ladder=(8, 16, 32, 64, 128, 256, 512),
    max_batch=512,
    num_train=100_000,
    optimizer="SGD",
    noise=(100.0, 200.0, 300.0, 300.0),
    **over,
) -> Measurements:
    m = Measurements(
        task="synthetic",
        device="cpu",
        num_train=num_train,
        reference_batch_size=32,
        reference_lr=0.1,
        optimizer=optimizer,
        has_batchnorm=False,
        reference_epochs=10,
        max_batch_size=max_batch,
        memory_predicted_only=False,
        fixed_bytes=1e6,
        bytes_per_sample=1e3,
        budget_bytes=1e6 + 1e3 * max_batch / 0.9,
        margin=0.1,
        memory_points=(MemoryPoint(8, 1_008_000, True), MemoryPoint(64, 1_064_000, True)),
        throughput=tuple(
            ThroughputPoint(b, b / step_s(b), step_s(b), 0.01, b / step_s(b), b / step_s(b), 5, 3)
            for b in ladder
        ),
        knee_batch_size=ladder[-1],
        aligned_multiple=None,
        noise=tuple(
            NoisePoint(10 * i, 320 * i, 1.0, v, (0.5 * v, math.inf), reliable=True)
            for i, v in enumerate(noise)
        ),
    )
    return dataclasses.replace(m, **over)


def known_plan(
    *,
    recommended: tuple,
    efficient: tuple,
    candidates: tuple,
    b_simple: float,
    reference: tuple = (32, 0.05),
    max_batch_size: int = 1024,
) -> Plan:
    """A whole plan with picks given outright, for the sweep's tests of plans.

    `recommended` / `efficient`: (batch, micro, accumulation, lr, warm-up, speedup, steps
    factor); `candidates`: (batch, steps factor, step seconds, speedup).
    """
    base = build_plan(measurements(), b_simple=b_simple)

    def rec(b, micro, accum, lr, warmup, speedup, factor):
        return Recommendation(b, micro, accum, lr, "linear", warmup, speedup, factor, 0.001)

    return dataclasses.replace(
        base,
        reference={"batch_size": reference[0], "lr": reference[1]},
        recommended=rec(*recommended),
        efficient=rec(*efficient),
        candidates=tuple(
            Candidate(b, b, 1, factor, step_s, speedup, 1 / speedup, True)
            for b, factor, step_s, speedup in candidates
        ),
        max_batch_size=max_batch_size,
    )


def test_speedup_is_one_at_the_reference_batch():
    plan = build_plan(measurements())
    ref = next(c for c in plan.candidates if c.batch_size == 32)
    assert ref.predicted_speedup == pytest.approx(1.0)
    assert ref.steps_factor == pytest.approx(1.0)


def test_without_a_loss_spread_the_plan_uses_a_constant_fit():
    """Every point at loss 1.0 cannot pin an exponent: the equal-weight geometric mean
    (the points' intervals are all unbounded above, so they weigh the same)."""
    plan = build_plan(measurements(noise=(10.0, 20.0, 300.0, 500.0)))
    assert plan.noise_outlook.trajectory.kind == "constant"
    assert plan.b_simple == pytest.approx((10 * 20 * 300 * 500) ** 0.25)


def test_efficient_batch_equals_b_noise_in_the_pure_model():
    plan = build_plan(measurements(), b_simple=300.0)
    assert plan.efficient.batch_size == 300
    assert plan.efficient.steps_factor == pytest.approx((1 + 300 / 300) / (1 + 300 / 32))


def test_perfect_parallelism_makes_the_largest_batch_fastest():
    """Constant step time up to the memory max: bigger is always faster until accumulation."""
    plan = build_plan(measurements(), b_simple=300.0)
    assert plan.recommended.batch_size == 512
    assert plan.recommended.accumulation_steps == 1
    expected = (1 + 300 / 32) / (1 + 300 / 512)
    assert plan.recommended.predicted_speedup == pytest.approx(expected)


def test_linear_step_time_makes_small_batches_fastest_in_wall_time():
    """t(B) proportional to B: time-to-target ~ S(B)*B = S_min (B + B_noise): smallest B wins.

    Below the measured ladder a step is assumed no faster than at its smallest point, so
    the winner is the smallest measured batch."""
    plan = build_plan(measurements(step_s=lambda b: 1e-4 * b), b_simple=300.0)
    assert plan.recommended.batch_size == 8
    assert min(c.batch_size for c in plan.candidates) < 8


def test_above_memory_max_uses_accumulation():
    assert split(2048, 512) == (512, 4)
    assert split(1000, 512) == (500, 2)
    plan = build_plan(measurements(), b_simple=1e5)
    big = next(c for c in plan.candidates if c.batch_size == 2048)
    assert (big.micro_batch_size, big.accumulation_steps) == (512, 4)
    assert big.step_s == pytest.approx(4 * 0.01)


@pytest.mark.parametrize(
    "optimizer, rule, factor",
    [("SGD", "linear", 512 / 32), ("Adam", "sqrt", (512 / 32) ** 0.5), ("AdamW", "sqrt", 4.0)],
)
def test_default_lr_rule_by_optimizer(optimizer, rule, factor):
    plan = build_plan(measurements(optimizer=optimizer), b_simple=300.0)
    assert plan.recommended.lr_rule == rule
    assert plan.recommended.lr == pytest.approx(0.1 * factor)
    assert plan.lr_alternatives["linear"] == pytest.approx(0.1 * 16)
    assert plan.lr_alternatives["sqrt"] == pytest.approx(0.1 * 4)
    assert 0.1 <= plan.lr_alternatives["adascale"] <= 0.1 * 16


def test_unknown_optimizer_needs_an_explicit_rule():
    with pytest.raises(
        ConfigError, match="got Shampoo; pass lr_rule='linear' .* or lr_rule='sqrt' .* explicitly"
    ):
        default_lr_rule("Shampoo")
    plan = build_plan(measurements(optimizer="Shampoo"), b_simple=300.0, lr_rule="linear")
    assert plan.recommended.lr_rule == "linear"


def test_warmup_when_lr_grows_more_than_2x():
    plan = build_plan(measurements(), b_simple=300.0)  # linear x16
    total = 10 * (100_000 // 512 + 1)
    assert plan.recommended.warmup_steps == pytest.approx(0.05 * total, abs=1)
    small = build_plan(
        measurements(optimizer="Adam", ladder=(8, 16, 32, 64), max_batch=64), b_simple=300.0
    )
    assert small.recommended.lr / 0.1 <= 2 and small.recommended.warmup_steps == 0


def test_warnings():
    plan = build_plan(
        measurements(num_train=2000, has_batchnorm=True, max_batch=4, ladder=(1, 2, 4)),
        b_simple=300.0,
    )
    codes = {w.code for w in plan.warnings}
    assert "batchnorm-small-batch" in codes
    assert "throughput-rising-at-max" in codes  # constant step time: throughput doubles
    large = build_plan(measurements(num_train=2000), b_simple=300.0)
    assert large.recommended.batch_size == 512
    assert "large-batch-regime" in {w.code for w in large.warnings}
    unreliable = build_plan(
        measurements(noise_reliable=False, noise_reason="|G|^2 <= 0"), b_simple=10.0
    )
    assert "unreliable-noise" in {w.code for w in unreliable.warnings}
    dataset_capped = build_plan(measurements(num_train=512), b_simple=300.0)
    assert "throughput-rising-at-max" not in {w.code for w in dataset_capped.warnings}
    quiet = build_plan(measurements(step_s=lambda b: 1e-4 * b), b_simple=300.0)
    assert not {w.code for w in quiet.warnings} & {"large-batch-regime", "throughput-rising-at-max"}


def test_no_usable_noise_is_a_clear_error():
    with pytest.raises(ConfigError, match="no usable B_simple"):
        build_plan(measurements(noise=(-1.0, -2.0)))


def test_absolute_time_from_a_reference_run():
    plan = build_plan(measurements(), b_simple=300.0, reference_seconds_to_target=100.0)
    assert plan.predicted_seconds_to_target == pytest.approx(
        100.0 / plan.recommended.predicted_speedup
    )


def test_plan_json_round_trip():
    plan = build_plan(measurements(), b_simple=300.0, command="batchlab plan x")
    again = Plan.from_json(plan.to_json())
    assert again == plan
    data = plan.to_dict()
    for key in (
        "batch_size",
        "micro_batch_size",
        "accumulation_steps",
        "lr",
        "lr_rule",
        "warmup_steps",
        "predicted_speedup",
    ):
        assert key in data["recommended"] and key in data["efficient"]
    assert data["reference"] == {"batch_size": 32, "lr": 0.1}
    for key in (
        "max_batch_size",
        "b_simple",
        "b_simple_trajectory",
        "candidates",
        "warnings",
        "plan_seconds",
    ):
        assert key in data
    assert set(data["candidates"][0]) >= {
        "batch_size",
        "steps_factor",
        "step_s",
        "predicted_speedup",
    }


def test_candidate_step_times_are_monotone_even_when_measurements_dip():
    """A step cannot get faster as B grows: a measured dip (timing noise) is pooled away."""
    times = {8: 0.0008, 16: 0.0016, 32: 0.0032, 64: 0.0005, 128: 0.0128, 256: 0.0256, 512: 0.0512}
    plan = build_plan(measurements(step_s=lambda b: times[b]), b_simple=300.0)
    steps = [c.step_s for c in sorted(plan.candidates, key=lambda c: c.batch_size)]
    assert all(a <= b * (1 + 1e-9) for a, b in zip(steps, steps[1:], strict=False))
    by_b = {c.batch_size: c for c in plan.candidates}
    assert by_b[64].step_s > times[64] and by_b[32].step_s < times[32]


def test_plan_save_load_round_trip_keeps_the_measured_points(tmp_path):
    """The plan holds the measure/ point types themselves: every measured field survives."""
    plan = build_plan(measurements(), b_simple=300.0)
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again == plan
    m = again.measurements
    assert isinstance(m.throughput[0], ThroughputPoint) and m.throughput[0].windows == 5
    assert isinstance(m.memory_points[0], MemoryPoint) and m.memory_points[0].fits
    assert isinstance(m.noise[0], NoisePoint) and m.noise[0].reliable
    assert m.noise[1].b_simple_ci == (100.0, math.inf)  # JSON null comes back as inf


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "plan file '{}' does not exist"),
        ("", "plan file '{}' is empty"),
        ('{"task": "x", "recommended": {"batch_', "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, expected an object"),
        ('{"a": 1}', "is not a plan: expected the JSON of a whole plan, but it lacks task,"),
        (
            '{"partial": true, "interrupted_during": "the noise measurement"}',
            "is a partial plan (interrupted during the noise measurement)",
        ),
    ],
)
def test_plan_load_says_what_is_wrong_with_the_file(tmp_path, text, message):
    path = tmp_path / "plan.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Plan.load(path)
    assert message.format(path) in str(info.value)


def test_plan_load_refuses_a_plan_of_another_shape(tmp_path):
    data = build_plan(measurements(), b_simple=300.0).to_dict()
    del data["measurements"]["throughput"][0]["windows"]  # e.g. an older batchlab's plan
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        Plan.load(path)
    assert "does not match this version's plan schema" in str(info.value)
    assert "windows" in str(info.value)
