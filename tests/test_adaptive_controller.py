"""The goodput controller and its throughput model, against brute-force answers."""

from __future__ import annotations

import math

import pytest
import torch

from batchlab.adaptive import AdaptiveBatchSize, Decision, ThroughputModel, efficiency
from batchlab.core.lr import adascale_gain
from batchlab.core.optim import default_lr_rule
from batchlab.errors import ConfigError


def fed_model(alpha: float, beta: float, gamma: float, sizes=(16, 32, 64)) -> ThroughputModel:
    """A throughput model fed exact timings of `alpha + beta * b` at `sizes`."""
    model = ThroughputModel()
    for b in sizes:
        for _ in range(3):
            model.observe_micro(b, alpha + beta * b)
    model.observe_optimizer(gamma)
    return model


def controller(b_simple_growth=True, **kwargs) -> AdaptiveBatchSize:
    defaults = dict(
        optimizer=torch.optim.SGD,
        throughput=fed_model(alpha=0.01, beta=1e-4, gamma=0.002),
        max_growth=1e9,
        threshold=0.05,
    )
    defaults.update(kwargs)
    return AdaptiveBatchSize(32, 0.1, **defaults)


# ------------------------------------------------------------------ throughput model
def test_throughput_model_recovers_exact_line():
    fit = fed_model(alpha=0.01, beta=2e-4, gamma=0.003).fit()
    assert fit.alpha == pytest.approx(0.01)
    assert fit.beta == pytest.approx(2e-4)
    assert fit.gamma == pytest.approx(0.003)
    # Exact at the timed sizes (16, 32, 64) and on the line beyond them; between them the
    # shared model interpolates in log-log, within 2% of the line here.
    for b in (16, 64, 100, 200):
        assert fit.step_seconds(b, 3) == pytest.approx(3 * (0.01 + 2e-4 * b) + 0.003)
    assert fit.step_seconds(50, 3) == pytest.approx(3 * (0.01 + 2e-4 * 50) + 0.003, rel=0.02)
    assert fit.samples_per_second(100, 3, world_size=2) == pytest.approx(
        600 / (3 * (0.01 + 2e-4 * 100) + 0.003)
    )


def test_throughput_model_ignores_one_slow_step():
    model = fed_model(alpha=0.01, beta=2e-4, gamma=0.0)
    model.observe_micro(32, 5.0)  # a hiccup on a shared machine
    assert model.fit().beta == pytest.approx(2e-4)


def test_throughput_model_needs_two_sizes():
    model = ThroughputModel()
    model.observe_micro(32, 0.1)
    assert not model.ready
    with pytest.raises(ConfigError) as info:
        model.fit()
    assert "two or more micro-batch sizes" in str(info.value)


def test_throughput_model_keeps_costs_positive():
    model = ThroughputModel()
    for b, t in ((8, 0.2), (16, 0.1), (32, 0.1)):  # noise: bigger looks faster
        model.observe_micro(b, t)
    fit = model.fit()
    assert fit.alpha >= 0 and fit.beta > 0


# ------------------------------------------------------------------ formulas and lr rules
@pytest.mark.parametrize("batch, b_simple", [(32, 100.0), (64, 10.0), (512, 1000.0)])
def test_gain_is_adascale_and_efficiency_formula(batch, b_simple):
    c = controller()
    assert c.efficiency(batch, b_simple) == pytest.approx((b_simple + 32) / (b_simple + batch))
    assert c.gain(batch, b_simple) == pytest.approx(adascale_gain(batch, 32, b_simple))
    assert efficiency(batch, 32, b_simple) == c.efficiency(batch, b_simple)


def test_lr_rules_by_optimizer():
    r = adascale_gain(256, 32, 200.0)
    sgd = controller(optimizer=torch.optim.SGD)
    adam = controller(optimizer=torch.optim.AdamW)
    assert sgd.lr_for(256, 200.0) == pytest.approx(0.1 * r)
    assert adam.lr_for(256, 200.0) == pytest.approx(0.1 * math.sqrt(r))
    custom = controller(lr_rule=lambda lr0, gain: lr0 * gain**0.25)
    assert custom.lr_for(256, 200.0) == pytest.approx(0.1 * r**0.25)
    assert controller(lr_rule="none").lr_for(256, 200.0) == 0.1
    assert default_lr_rule("Adam", adaptive=True) == "sqrt-adascale"


def test_unknown_optimizer_asks_for_explicit_rule():
    class Mystery(torch.optim.Optimizer):
        pass

    with pytest.raises(ConfigError) as info:
        controller(optimizer=Mystery)
    message = str(info.value)
    assert "Mystery" in message and "lr_rule=" in message and "\n" not in message


def test_memory_cap_below_reference_batch_is_an_error():
    with pytest.raises(ConfigError) as info:
        controller(max_micro_batch_size=16)
    assert "memory cap" in str(info.value) and "got 16" in str(info.value)
    # Over two replicas 16 each holds B0 = 32.
    assert controller(max_micro_batch_size=16, world_size=2).micro_batch_size == 16


# ------------------------------------------------------------------ decisions
def brute_force_best(c: AdaptiveBatchSize, b_simple: float) -> tuple[int, int]:
    fit = c.throughput.fit()
    best, best_rate = None, -1.0
    batch = float(c.min_batch_size)
    while round(batch) <= c.max_batch_size:
        b = round(batch)
        cap = c.max_micro_batch_size or b
        accum = math.ceil(b / cap)
        micro = math.ceil(b / accum)
        if accum <= c.max_accumulation_steps:
            real = micro * accum
            rate = real / fit.step_seconds(micro, accum) * (b_simple + 32) / (b_simple + real)
            if rate > best_rate:
                best, best_rate = (micro, accum), rate
        batch *= c.ladder_ratio
    return best


@pytest.mark.parametrize("b_simple", [1.0, 50.0, 400.0, 5000.0])
def test_decision_maximises_goodput_over_the_ladder(b_simple):
    c = controller(max_batch_size=4096)
    d = c.decide(50, b_simple)
    assert (d.micro_batch_size, d.accumulation_steps) == brute_force_best(c, b_simple)
    assert d.batch_size == d.micro_batch_size * d.accumulation_steps


def test_batch_grows_with_the_noise_scale():
    c = controller(max_batch_size=4096)
    sizes = [c.decide(50 * (i + 1), b).batch_size for i, b in enumerate([10, 100, 1000, 10000])]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sizes[0] == 32  # small noise: the reference batch is already the best


def test_memory_cap_is_never_exceeded_and_accumulation_makes_up():
    c = controller(max_micro_batch_size=40, max_batch_size=4096)
    d = c.decide(50, 100_000.0)
    assert d.micro_batch_size <= 40
    assert d.accumulation_steps > 1
    assert d.batch_size == brute_force_best_batch(c, 100_000.0)


def brute_force_best_batch(c, b_simple):
    micro, accum = brute_force_best(c, b_simple)
    return micro * accum


def test_hysteresis_keeps_the_batch_when_gain_is_small():
    # b_simple chosen so the best neighbour is only slightly better than B0.
    c = controller(threshold=0.5, max_batch_size=4096)
    d = c.decide(50, 60.0)
    assert d.action == "keep" and d.batch_size == 32
    assert 1.0 < d.gain < 1.5
    c2 = controller(threshold=0.0, max_batch_size=4096)
    assert c2.decide(50, 60.0).action == "switch"


def test_growth_per_decision_is_limited():
    c = controller(max_growth=2.0, max_batch_size=4096)
    d1 = c.decide(50, 1e6)
    d2 = c.decide(100, 1e6)
    assert d1.batch_size <= 64 and 64 < d2.batch_size <= 2 * d1.batch_size


def test_no_estimate_keeps_batch_and_exploration_keeps_batch_size():
    c = controller(throughput=ThroughputModel())
    c.throughput.observe_micro(32, 0.01)
    d = c.decide(50, None)
    assert d.action == "explore"
    assert (d.micro_batch_size, d.accumulation_steps, d.batch_size) == (16, 2, 32)
    ready = controller()
    assert ready.decide(50, float("nan")).action == "keep"


def test_progress_counts_reference_examples_and_log_round_trips():
    c = controller(max_batch_size=4096)
    c.decide(50, 96.0)
    c.record_step(32)
    progress = c.record_step(128)
    assert progress == pytest.approx(128 * (96 + 32) / (96 + 128))
    assert c.reference_examples == pytest.approx(32 + progress)
    assert c.reference_epochs(160) == pytest.approx((32 + progress) / 160)
    for d in c.decisions:
        assert Decision.from_json(d.to_json()) == d
    with pytest.raises(AttributeError):
        c.decisions[0].step = 3  # frozen


def test_fixed_accumulation_moves_only_the_micro_batch():
    c = controller(fixed_accumulation_steps=4, max_batch_size=4096)
    assert (c.micro_batch_size, c.accumulation_steps) == (8, 4)
    d = c.decide(50, 1e5)
    assert d.accumulation_steps == 4 and d.micro_batch_size > 8


def test_fixed_micro_batch_moves_only_accumulation_and_needs_one_timing():
    model = ThroughputModel()
    model.observe_micro(16, 0.01)
    model.observe_optimizer(0.05)  # a costly optimizer step: accumulation amortises it
    c = controller(fixed_micro_batch_size=16, throughput=model, max_batch_size=4096)
    assert (c.micro_batch_size, c.accumulation_steps) == (16, 2)
    d = c.decide(50, 1e5)
    assert d.micro_batch_size == 16 and d.accumulation_steps > 2
    with pytest.raises(ConfigError):
        controller(fixed_micro_batch_size=16, fixed_accumulation_steps=2)
