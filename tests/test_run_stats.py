"""Distance from init and gradient norm callbacks, checked against a hand-written loop."""

import math

import pytest
import torch
from conftest import tiny_task

import batchlab
from batchlab.callbacks import TrainCallback
from batchlab.measure.run_stats import DistanceFromInit, GradNormTracker, log_spaced_steps


class Recorder(TrainCallback):
    """Records the exact values by brute force at every step."""

    def __init__(self):
        self.distance = {}
        self.grad_norms = []

    def on_start(self, state):
        self.init = [p.detach().clone() for p in state.model.parameters()]

    def on_step(self, state):
        params = list(state.model.parameters())
        flat = torch.cat(
            [(p.detach() - p0).reshape(-1) for p, p0 in zip(params, self.init, strict=True)]
        )
        self.distance[state.step] = flat.norm().item()
        self.grad_norms.append(torch.cat([p.grad.reshape(-1) for p in params]).norm().item())


def test_callbacks_match_brute_force_and_land_in_history_extras():
    task = tiny_task(n=96)
    recorder = Recorder()
    history = batchlab.train(
        task,
        8,
        max_steps=30,
        callbacks=[recorder, DistanceFromInit(points=10), GradNormTracker(points=10)],
    )
    dist = history.extras["distance_from_init"]
    assert dist["steps"][0] == 0 and dist["values"][0] == 0.0
    assert dist["steps"][-1] == 30
    for step, value in zip(dist["steps"][1:], dist["values"][1:], strict=True):
        assert value == pytest.approx(recorder.distance[step], rel=1e-5)
    assert dist["final"] == pytest.approx(recorder.distance[30], rel=1e-5)
    grad = history.extras["grad_norm"]
    assert grad["count"] == 30
    assert grad["mean"] == pytest.approx(sum(recorder.grad_norms) / 30, rel=1e-5)
    assert grad["mean_sq"] == pytest.approx(sum(g * g for g in recorder.grad_norms) / 30, rel=1e-5)
    assert batchlab.History.from_json(history.to_json()).extras == history.extras


def test_gradient_norm_falls_with_batch_size():
    """E|g_B|^2 = |G|^2 + tr(Sigma)/B: at the same (initial) weights, bigger B, smaller norm."""
    task = tiny_task(n=256)
    norms = {}
    for b in (4, 64):
        h = batchlab.train(task, b, max_steps=1, callbacks=[GradNormTracker()], seed=0)
        norms[b] = h.extras["grad_norm"]["mean"]
    assert norms[4] > norms[64]


def test_log_spaced_steps():
    steps = log_spaced_steps(1000, 10)
    assert min(steps) == 1 and max(steps) == 1000 and len(steps) <= 11
    assert sorted(steps)[:3] == [1, 2, 5]
    assert log_spaced_steps(1, 10) == {1}


def test_diverged_runs_keep_finite_statistics():
    task = tiny_task(n=64, lr=1e38)  # tanh saturates, so only an absurd LR overflows
    h = batchlab.train(task, 8, max_steps=40, callbacks=[GradNormTracker(), DistanceFromInit()])
    assert h.diverged
    assert h.extras["grad_norm"]["count"] <= h.total_steps < 40
    assert math.isfinite(h.extras["grad_norm"]["mean"])
    assert h.extras["distance_from_init"]["steps"][-1] == h.total_steps
