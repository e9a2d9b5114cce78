"""B_noise along the run (issue 11): the trajectory fit, the path integral, the verdict, the budget.

Known answers: a power law recovered from synthetic points (and covered by its interval),
the integral of (1 + B_noise/B) dS_min in closed form for a constant and a power-law path,
"keep B0" when the gain lies inside its interval, the noise phase within its budget.
"""

import dataclasses
import math
import random

import pytest
from test_plan_model import measurements

from batchlab.core.tradeoff import relative_steps, speedup_interval, worst_case_regrets
from batchlab.core.trajectory import (
    critical_batch_with_interval,
    crossing_step,
    extend_loss_path,
    fit_noise_trajectory,
    min_steps_along_path,
    path_critical_batch,
    steps_along_path,
)
from batchlab.errors import ConfigError
from batchlab.measure.noise_run import NoisePoint
from batchlab.planner import build_plan
from batchlab.planner.measure import noise_phase_steps
from batchlab.tasks import load_task

SCALE, EXPONENT = 60.0, -1.5  # B_noise = 60 L^-1.5: 60 at L = 1, ~480 at L = 0.25


def truth(loss: float) -> float:
    return SCALE * loss**EXPONENT


def synthetic(seed: int, n: int = 30, sigma: float = 0.25):
    """Points on the true law with log-normal scatter of `sigma` and matching 95% intervals."""
    rng = random.Random(seed)
    losses = [2.0 * (0.1 / 2.0) ** (i / (n - 1)) for i in range(n)]
    values = [truth(loss) * math.exp(rng.gauss(0, sigma)) for loss in losses]
    half = 1.959964 * sigma
    cis = [(v * math.exp(-half), v * math.exp(half)) for v in values]
    return losses, values, cis


def test_fit_recovers_an_exact_power_law():
    losses = [2.0, 1.0, 0.5, 0.25, 0.125]
    values = [truth(v) for v in losses]
    fit = fit_noise_trajectory(losses, values, [(v / 2, v * 2) for v in values])
    assert fit.kind == "power-law"
    assert fit.exponent == pytest.approx(EXPONENT)
    assert math.exp(fit.log_scale) == pytest.approx(SCALE)
    assert fit.b_noise(0.3) == pytest.approx(truth(0.3))


def test_fit_interval_covers_the_truth_on_noisy_points():
    """Over 200 synthetic draws the 95% intervals of the exponent and of B_noise at the end
    cover the truth about 95% of the time (at least 88% here), and one draw is close."""
    hit_exp = hit_end = 0
    for seed in range(200):
        losses, values, cis = synthetic(seed)
        fit = fit_noise_trajectory(losses, values, cis)
        half = fit.quantile * math.sqrt(fit.var_exponent)
        hit_exp += abs(fit.exponent - EXPONENT) <= half
        lo, hi = fit.interval(0.1)
        hit_end += lo <= truth(0.1) <= hi
    assert hit_exp >= 176 and hit_end >= 176
    fit = fit_noise_trajectory(*synthetic(0))
    assert fit.exponent == pytest.approx(EXPONENT, abs=0.25)


def test_scatter_beyond_the_intervals_widens_the_fit():
    losses, values, _ = synthetic(1, sigma=0.5)
    narrow = [(v * 0.9, v * 1.1) for v in values]  # intervals that claim far too much
    fit = fit_noise_trajectory(losses, values, narrow)
    assert fit.scatter > 5
    assert fit.quantile * math.sqrt(fit.var_exponent) > 0.1


def test_too_few_points_or_no_loss_spread_give_a_constant_fit():
    fit = fit_noise_trajectory([1.0, 1.0, 1.0], [100.0, 400.0, 200.0], [(50, 800)] * 3)
    assert fit.kind == "constant" and fit.exponent == 0
    assert fit.b_noise(0.1) == pytest.approx(200.0)  # the geometric mean, equal weights
    with pytest.raises(ConfigError, match="noise_budget"):
        fit_noise_trajectory([1.0], [-3.0], [(0, math.inf)])


def test_integral_of_a_constant_b_noise_is_the_closed_form():
    d = [3.0, 5.0, 2.0]
    for b in (8, 32, 100, 4096):
        assert steps_along_path(b, d, [250.0] * 3) == pytest.approx(10 * (1 + 250 / b))
        ratio = steps_along_path(b, d, [250.0] * 3) / steps_along_path(32, d, [250.0] * 3)
        assert ratio == pytest.approx(relative_steps(b, 32, 250.0))
    assert path_critical_batch(d, [250.0] * 3) == pytest.approx(250.0)


def test_integral_along_a_power_law_path_matches_its_closed_form():
    """L(s) = L0 exp(-k s) over S_min = S, B_noise = c L^b: the S_min-weighted mean is
    c L0^b (exp(-k b S) - 1) / (-k b S); S(B) = S (1 + B_bar/B) for every B."""
    l0, k, big_s, n = 2.0, 0.002, 1000.0, 20_000
    ds = big_s / n
    losses = [l0 * math.exp(-k * (i + 0.5) * ds) for i in range(n)]
    b_noises = [truth(v) for v in losses]
    closed = SCALE * l0**EXPONENT * (math.exp(-k * EXPONENT * big_s) - 1) / (-k * EXPONENT * big_s)
    bar = path_critical_batch([ds] * n, b_noises)
    assert bar == pytest.approx(closed, rel=1e-6)
    assert steps_along_path(64, [ds] * n, b_noises) == pytest.approx(big_s * (1 + closed / 64))


def test_measured_steps_convert_to_s_min_and_back():
    """A path measured at B_m: dS_min = dS / (1 + B_noise/B_m), so S(B_m) gives back the steps."""
    fit = fit_noise_trajectory([2.0, 1.0, 0.5, 0.25], [truth(v) for v in (2.0, 1.0, 0.5, 0.25)],
                               [(1, 1e4)] * 4)  # fmt: skip
    losses, steps = [1.5, 0.8, 0.4, 0.3], [100, 250, 600, 1000]
    d = min_steps_along_path(fit, losses, steps, 100)
    assert d[0] == pytest.approx(100 / (1 + truth(1.5) / 100))
    assert steps_along_path(100, d, [truth(v) for v in losses]) == pytest.approx(1000)
    bar, (lo, hi) = critical_batch_with_interval(fit, losses, steps, 100)
    assert bar == pytest.approx(path_critical_batch(d, [truth(v) for v in losses]))
    assert lo <= bar <= hi


def test_extrapolation_follows_the_power_law_and_its_floor():
    steps = [10, 20, 40, 80, 160]
    losses = [2.0 * (s / 10) ** -0.5 for s in steps]
    more_s, more_l = extend_loss_path(steps, losses, 640, min_loss=0.1)
    assert more_s[-1] == 640
    mid = math.sqrt(more_s[-2] * 640)
    assert more_l[-1] == pytest.approx(2.0 * (mid / 10) ** -0.5, rel=1e-6)
    _, floored = extend_loss_path(steps, losses, 640, min_loss=0.45)
    assert min(floored) == 0.45
    assert crossing_step([100, 200, 400], [0.5, 0.6, 0.7], 0.8, higher_is_better=True) == (
        pytest.approx(800)
    )
    assert crossing_step([100, 200, 400], [0.7, 0.6, 0.5], 0.8, higher_is_better=True) is None


def noisy_measurements(spread: float, **over):
    """Noise points on B = 60 L^-1.5 along a falling loss, and a ladder whose timing windows
    spread by `spread` (samples/s low..high = median / (1 + spread) .. median (1 + spread))."""
    losses = [2.0 * 0.8**i for i in range(10)]
    noise = tuple(
        NoisePoint(20 * (i + 1), 640 * (i + 1), loss, truth(loss),
                   (truth(loss) / 1.3, truth(loss) * 1.3), True)
        for i, loss in enumerate(losses)
    )  # fmt: skip
    base = measurements(noise_steps=200)
    throughput = tuple(
        dataclasses.replace(p, samples_per_s_low=p.samples_per_s / (1 + spread),
                            samples_per_s_high=p.samples_per_s * (1 + spread))
        for p in base.throughput
    )  # fmt: skip
    return dataclasses.replace(base, noise=noise, throughput=throughput, **over)


def test_plan_uses_the_path_critical_batch():
    m = noisy_measurements(0.0, reference_epochs=1, num_train=6400)  # the path ends at step 200
    plan = build_plan(m)
    fit = plan.noise_outlook.trajectory
    assert fit.exponent == pytest.approx(EXPONENT)
    losses = [p.train_loss for p in m.noise]
    d = min_steps_along_path(fit, losses, [p.step for p in m.noise], 32)
    assert plan.b_simple == pytest.approx(path_critical_batch(d, [truth(v) for v in losses]))
    assert not plan.noise_outlook.extrapolated
    assert "S_min-weighted mean" in plan.b_simple_source
    lo, hi = plan.b_simple_interval
    assert lo <= plan.b_simple <= hi
    assert plan.cost["noise_examples"] == 200 * 32 and plan.cost["noise_fraction"] == 1.0


def test_keep_b0_when_the_gain_is_inside_its_interval():
    """Same predicted gain; a wide timing spread puts 1 inside its interval: keep B0."""
    sure = build_plan(noisy_measurements(0.0), lr_rule="linear")
    assert not sure.keep_reference and sure.verdict.startswith("use B=")
    best = max(sure.candidates, key=lambda c: c.predicted_speedup)
    assert sure.recommended.batch_size == best.batch_size
    assert best.speedup_low > 1
    unsure = build_plan(noisy_measurements(best.predicted_speedup), lr_rule="linear")
    assert unsure.keep_reference
    assert unsure.verdict.startswith("keep B0=32") and "within its interval" in unsure.verdict
    assert unsure.recommended.batch_size == 32
    low, high = unsure.recommended.predicted_speedup_interval
    assert low <= 1.0 <= high


def test_speedup_interval_spans_the_corners():
    lo, hi = speedup_interval(256, 32, (100, 400), (0.9, 1.1), (0.9, 1.1))
    assert lo == pytest.approx((1 + 100 / 32) * 0.9 / ((1 + 100 / 256) * 1.1))
    assert hi == pytest.approx((1 + 400 / 32) * 1.1 / ((1 + 400 / 256) * 0.9))


def test_noise_phase_respects_its_budget():
    task = load_task("mnist1d-mlp")  # 200 epochs x 4000 examples, B0 = 100
    steps = noise_phase_steps(task, 0.05)
    assert steps == 400 and steps * task.batch_size <= 0.05 * 200 * 4000
    assert noise_phase_steps(task, 0.05, noise_steps=30) == 30
    assert noise_phase_steps(task, 0.01) * 100 <= 0.01 * 800_000
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="noise_budget") as info:
            noise_phase_steps(task, bad)
        assert info.value.param == "noise_budget"


def test_folklore_b0_finds_a_batch_ten_times_larger():
    """B0 = 32, B_noise rising along the path to ~320 on average, and a step time
    t(B) = t0 (1 + B/320): time ~ (1 + B_bar/B)(1 + B/320) is least at B = sqrt(320 B_bar)
    ~ 10 B0. The plan must find it, and say so."""
    losses = [2.0 * 0.75**i for i in range(12)]
    scale = 320 / 1.6  # B_noise = 200 L^-1, so ~320 over this path
    noise = tuple(
        NoisePoint(50 * (i + 1), 1600 * (i + 1), loss, scale / loss,
                   (scale / loss / 1.2, scale / loss * 1.2), True)
        for i, loss in enumerate(losses)
    )  # fmt: skip
    m = measurements(
        step_s=lambda b: 0.01 * (1 + b / 320),
        ladder=(8, 16, 32, 64, 128, 256, 512, 1024),
        max_batch=1024,
        noise=(1.0,),
        noise_steps=600,
        reference_epochs=1,
        num_train=600 * 32,  # the path ends where the noise phase did
    )
    plan = build_plan(dataclasses.replace(m, noise=noise), lr_rule="linear")
    assert 200 <= plan.b_simple <= 500
    assert 256 <= plan.recommended.batch_size <= 512
    assert plan.verdict.startswith("use B=") and not plan.keep_reference


def test_uncertain_b_noise_prefers_the_safest_batch_to_a_small_b0():
    """B_noise known only within 100x either way, timings exact: B0=32 is not "safe".

    The plan takes the batch whose worst case over the B_noise interval is least
    (minimax regret) when B0's worst case is clearly larger: dots from B0=32 kept B0
    (the gain 0.34-8.29x "includes no gain") while the exhaustive sweep's best batch was
    16x larger.
    """
    # Step time grows past B=256, as on a CPU: the best batch depends on B_noise.
    ladder = measurements(step_s=lambda b: 1e-3 * (1 + b / 256)).throughput
    m = dataclasses.replace(noisy_measurements(0.0), throughput=ladder)
    wide = tuple(
        dataclasses.replace(p, b_simple_ci=(p.b_simple / 100, p.b_simple * 100)) for p in m.noise
    )
    plan = build_plan(dataclasses.replace(m, noise=wide), lr_rule="linear")
    lo, hi = plan.b_simple_interval
    assert hi / lo > 100
    best = max(plan.candidates, key=lambda c: c.predicted_speedup)
    assert best.speedup_low <= 1.0  # the gain alone cannot be told from none
    assert not plan.keep_reference and "safest bet" in plan.verdict
    chosen = plan.recommended.batch_size
    assert chosen != 32
    pool = {c.batch_size: c.step_s for c in plan.candidates if not c.extrapolated}
    regrets = worst_case_regrets(pool, plan.b_simple_interval)
    assert regrets[chosen] == min(regrets.values())
    assert regrets[32] > 1.1 * regrets[chosen]


def test_worst_case_regrets_known_answer():
    # Two batches: B=1 at 1 s a step, B=100 at 2 s. B_noise -> 0: every batch needs S_min
    # steps, so B=100 is 2x slower; B_noise -> infinity: time per example, B=1 is 50x.
    regrets = worst_case_regrets({1: 1.0, 100: 2.0}, (0.0, math.inf))
    assert regrets[100] == pytest.approx(2.0, rel=1e-3)
    assert regrets[1] == pytest.approx(50.0, rel=1e-2)
    # A point interval: the regret is the plain ratio to the best there.
    at_100 = worst_case_regrets({1: 1.0, 100: 2.0}, (100.0, 100.0))
    assert at_100 == {1: pytest.approx(101 / 4), 100: 1.0}


def test_plan_says_when_its_noise_points_are_adam_preconditioned():
    plain = build_plan(noisy_measurements(0.0))
    pre = build_plan(noisy_measurements(0.0, noise_preconditioned=True))
    assert "Adam-preconditioned B_noise" in pre.b_simple_source
    assert "preconditioned" not in plain.b_simple_source
    assert pre.b_simple == plain.b_simple  # the same points: only the label differs


def test_warmup_is_a_fraction_of_the_steps_predicted_to_the_target():
    """Goyal et al.'s 5% of the run being warmed up: of the predicted steps to the target,
    not of the reference training's whole length (on mnist1d-mlp from B0=32 a 160-step
    warm-up, 5% of 200 epochs at B=256, took most of a 250-step run to the target)."""
    m = noisy_measurements(0.0, reference_epochs=100)
    plan = build_plan(m, lr_rule="linear")
    rec = plan.recommended
    assert rec.lr / m.reference_lr > 2  # a warm-up is due
    path = plan.noise_outlook.end_step
    expected = math.ceil(0.05 * math.ceil(path * relative_steps(rec.batch_size, 32, plan.b_simple)))
    assert rec.warmup_steps == expected
    assert "steps predicted for the run" in rec.reasons["warmup"]


def test_timings_too_noisy_to_tell_batches_apart_keep_b0():
    """The same wide B_noise interval, but step times whose windows range over ~400x: the
    safer-bet switch must hold with the timing spread in B0's favour, so B0 stays."""
    ladder = measurements(step_s=lambda b: 1e-3 * (1 + b / 256)).throughput
    noisy = tuple(
        dataclasses.replace(p, samples_per_s_low=p.samples_per_s / 21, samples_per_s_high=p.samples_per_s * 21)
        for p in ladder
    )  # fmt: skip
    m = dataclasses.replace(noisy_measurements(0.0), throughput=noisy)
    wide = tuple(
        dataclasses.replace(p, b_simple_ci=(p.b_simple / 100, p.b_simple * 100)) for p in m.noise
    )
    plan = build_plan(dataclasses.replace(m, noise=wide), lr_rule="linear")
    assert plan.keep_reference and plan.recommended.batch_size == 32
    assert "safest bet" not in plan.verdict


def test_worst_case_regrets_rejects_bad_step_times():
    for bad in ({32: 0.0}, {32: math.nan}, {0: 1.0}):
        with pytest.raises(ConfigError, match="worst_case_regrets"):
            worst_case_regrets(bad, (1.0, 2.0))
    assert worst_case_regrets({32: 1.0}, (0.0, math.inf)) == {32: 1.0}
