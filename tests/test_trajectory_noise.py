"""`TrajectoryNoise`: the adaptive controller's B_noise from the plan's trajectory model."""

import math

import pytest
from conftest import tiny_task

import batchlab
from batchlab.adaptive import TrajectoryNoise
from batchlab.core.trajectory import fit_noise_trajectory
from batchlab.measure.noise_run import NoisePoint


def truth(loss: float) -> float:
    return 60.0 * loss**-1.5


def test_a_prior_on_the_power_law_gives_its_value_at_the_current_loss():
    prior = [
        NoisePoint(10 * i, 320 * i, loss, truth(loss), (truth(loss) / 1.3, truth(loss) * 1.3), True)
        for i, loss in enumerate([2.0, 1.5, 1.0, 0.7, 0.5], start=1)
    ]
    source = TrajectoryNoise(prior=prior)
    assert len(source.points) == 5
    source.current_loss = 0.3  # extrapolated along the fitted line
    assert source.b_simple(0) == pytest.approx(truth(0.3))
    # An online point off the line moves the fit: it is corrected, not replaced.
    source.add_point(0.4, 4 * truth(0.4), (3 * truth(0.4), 5 * truth(0.4)))
    fit = fit_noise_trajectory(*zip(*source.points, strict=True))
    assert source.b_simple(0) == pytest.approx(fit.b_noise(0.3))
    assert source.b_simple(0) > truth(0.3)


def test_without_points_it_answers_the_trackers_value():
    source = TrajectoryNoise()
    assert source.b_simple(0) is None  # nothing measured yet


def test_train_adaptive_decides_from_the_fitted_trajectory():
    source = TrajectoryNoise(record_every=4)
    h = batchlab.train_adaptive(
        tiny_task(256), b_simple=source, interval=4, max_steps=40, device="cpu", seed=0
    )
    assert source.points and source.current_loss is not None
    last = h.extras["adaptive"]["decisions"][-1]
    assert last["b_simple"] is not None and math.isfinite(last["b_simple"])
