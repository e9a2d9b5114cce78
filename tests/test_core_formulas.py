import math

import pytest

import batchlab
from batchlab.core.tradeoff import examples_factor, steps_factor
from batchlab.errors import ConfigError


def test_textbook_example():
    r = batchlab.calc(1024, 8, 10)
    assert r.iterations_per_epoch == 128 and r.total_iterations == 1280
    assert r.effective_batch_size == 8 and r.samples_per_epoch == 1024


def test_partial_last_batch_kept_or_dropped():
    kept = batchlab.calc(1000, 64, 3)
    assert kept.iterations_per_epoch == 16 and kept.last_batch_size == 1000 - 15 * 64
    assert kept.samples_per_epoch == 1000 and kept.total_iterations == 48
    dropped = batchlab.calc(1000, 64, 3, drop_last=True)
    assert dropped.iterations_per_epoch == 15 and dropped.last_batch_size == 64
    assert dropped.samples_per_epoch == 960


def test_accumulation_and_world_size():
    r = batchlab.calc(1000, 16, 2, accumulation_steps=4, world_size=2)
    # each rank: 500 examples -> 32 micro-batches (last has 4) -> 8 optimizer steps
    assert r.iterations_per_epoch == 32 and r.optimizer_steps_per_epoch == 8
    assert r.effective_batch_size == 128 and r.total_optimizer_steps == 16
    odd = batchlab.calc(1001, 16, 1, world_size=2)  # DistributedSampler pads to 501 each
    assert odd.samples_per_epoch == 1002 and odd.iterations_per_epoch == 32
    partial = batchlab.calc(100, 10, 1, accumulation_steps=3)
    assert partial.optimizer_steps_per_epoch == 4  # 10 micro-batches: 3+3+3+1
    assert (
        batchlab.calc(100, 10, 1, accumulation_steps=3, drop_last=True).optimizer_steps_per_epoch
        == 3
    )


def test_calc_rejects_nonsense():
    with pytest.raises(ConfigError, match="batch size: expected a positive integer, got 0"):
        batchlab.calc(100, 0)
    with pytest.raises(ConfigError, match="no iterations"):
        batchlab.calc(10, 16, drop_last=True)


def test_lr_rules():
    assert batchlab.scale_lr(0.1, 100, 400, "none") == 0.1
    assert batchlab.scale_lr(0.1, 100, 400, "linear") == pytest.approx(0.4)
    assert batchlab.scale_lr(0.1, 100, 400, "sqrt") == pytest.approx(0.2)
    assert batchlab.scale_lr(0.1, 100, 100, "adascale", b_simple=50) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="needs a measured B_simple"):
        batchlab.scale_lr(0.1, 100, 400, "adascale")


@pytest.mark.parametrize("b_simple", [1.0, 37.0, 1000.0, 1e6])
@pytest.mark.parametrize("batch", [100, 150, 800, 12800])
def test_adascale_gain_bounds_and_formula(b_simple, batch):
    b0 = 100
    r = batchlab.adascale_gain(batch, b0, b_simple)
    s = batch / b0
    assert 1 - 1e-12 <= r <= s + 1e-12
    # r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2), sigma^2 = tr(Sigma)/B0, mu^2 = |G|^2
    g2 = 2.0
    sigma2 = b_simple * g2 / b0
    assert r == pytest.approx((sigma2 + g2) / (sigma2 / s + g2))


def test_adascale_limits():
    assert batchlab.adascale_gain(1600, 100, 1e9) == pytest.approx(16, rel=1e-5)  # pure noise
    assert batchlab.adascale_gain(1600, 100, 1e-9) == pytest.approx(1, rel=1e-5)  # no noise


def test_steps_examples_tradeoff():
    # at B = B_noise both are twice their minimum (McCandlish et al. 2018)
    assert steps_factor(64, 64) == 2 and examples_factor(64, 64) == 2
    assert steps_factor(1e9, 64) == pytest.approx(1) and math.isclose(examples_factor(1e-9, 64), 1)


def test_speedup_is_one_at_the_reference():
    from batchlab.core.tradeoff import predicted_speedup

    assert predicted_speedup(128, 128, 500.0, 0.02, 0.02) == pytest.approx(1.0)


def test_speedup_pure_model():
    """With t(B) constant (perfect parallelism), speedup = S(B0)/S(B)."""
    from batchlab.core.tradeoff import predicted_speedup, relative_steps

    b_noise = 256.0
    s = predicted_speedup(1024, 64, b_noise, 0.01, 0.01)
    assert s == pytest.approx((1 + 256 / 64) / (1 + 256 / 1024))
    assert relative_steps(1024, 64, b_noise) == pytest.approx(1 / s)


def test_interpolate_step_seconds_log_log():
    from batchlab.core.step_time import interpolate_step_seconds

    bs, ts = [8, 32, 128], [0.001, 0.002, 0.008]
    assert interpolate_step_seconds(bs, ts, 32) == pytest.approx(0.002)
    assert interpolate_step_seconds(bs, ts, 16) == pytest.approx(0.001 * 2**0.5)
    # beyond the ladder: throughput stays at its last value; below it: no faster per step
    assert interpolate_step_seconds(bs, ts, 512) == pytest.approx(0.032)
    assert interpolate_step_seconds([8, 16], [0.002, 0.001], 64) == pytest.approx(0.004)
    assert interpolate_step_seconds(bs, ts, 2) == pytest.approx(0.001)
    assert interpolate_step_seconds([10], [0.5], 20) == pytest.approx(1.0)


def test_efficient_batch_is_b_noise_in_the_pure_model():
    from batchlab.core.tradeoff import efficient_batch_size, examples_factor, steps_factor

    for b_noise in (3.2, 57.0, 640.0):
        b = efficient_batch_size(b_noise)
        assert b == round(b_noise)
        assert steps_factor(b_noise, b_noise) == 2 and examples_factor(b_noise, b_noise) == 2
    assert efficient_batch_size(5000.0, max_batch_size=1024) == 1024
    with pytest.raises(ConfigError):
        efficient_batch_size(-1.0)


def test_warmup_only_for_large_lr_growth():
    from batchlab.core.lr import warmup_steps_for

    assert warmup_steps_for(2.0, 1000) == 0
    assert warmup_steps_for(4.0, 1000) == 50
    assert warmup_steps_for(8.0, 3) == 1


def test_monotone_step_seconds_pools_noisy_dips():
    from batchlab.core.step_time import isotonic_log_log

    clean = [0.001, 0.002, 0.004]
    assert isotonic_log_log([8, 16, 32], clean) == pytest.approx(clean)
    fitted = isotonic_log_log([8, 16, 32, 64], [0.001, 0.004, 0.001, 0.008])
    assert fitted[0] == pytest.approx(0.001) and fitted[3] == pytest.approx(0.008)
    assert fitted[1] == pytest.approx(fitted[2]) == pytest.approx(0.002)  # geometric mean
    assert all(a <= b for a, b in zip(fitted, fitted[1:], strict=False))
