"""`train_adaptive`: the loop behind `batchlab train --adaptive`."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import tiny_task
from fake_clock import FakeClock, StepCosts
from torch.utils.data import TensorDataset

from batchlab import History, Task
from batchlab.adaptive import train_adaptive
from batchlab.adaptive.controller import efficiency
from batchlab.adaptive.engine import AdaptiveBatch
from batchlab.adaptive.noise_source import FixedNoise
from batchlab.adaptive.throughput_model import ThroughputModel
from batchlab.callbacks import TrainCallback
from batchlab.core.step_time import StepTimeModel
from batchlab.errors import BatchlabError, ConfigError, NoiseEstimateError
from batchlab.loop import run_training


def run(b_simple=1e5, n=512, **kwargs) -> History:
    task = tiny_task(n)
    kwargs.setdefault("epochs", 3)
    kwargs.setdefault("interval", 4)
    return train_adaptive(task, b_simple=b_simple, device="cpu", seed=0, **kwargs)


def segments(history: History) -> list[tuple[int, int]]:
    """(first step, batch size) of each run of equal per-step batch sizes."""
    sizes = history.extras["adaptive"]["batch_sizes"]
    out = []
    for step, size in zip(history.steps, sizes, strict=True):
        if not out or out[-1][1] != size:
            out.append((step, size))
    return out


def test_batch_grows_with_large_noise_and_switches_only_at_decisions():
    h = run(b_simple=1e5)
    log = h.extras["adaptive"]["decisions"]
    assert [d["step"] for d in log[1:]] == list(range(4, h.total_steps + 1, 4))[: len(log) - 1]
    assert log[-1]["batch_size"] > 8 and h.effective_batch_size == log[-1]["batch_size"]
    switch_steps = {d["step"] + 1 for d in log if d["action"] in ("switch", "explore")}
    sizes = h.extras["adaptive"]["batch_sizes"]
    epoch_ends = set()
    seen = 0
    for step, size in zip(h.steps, sizes, strict=True):
        seen += size
        if seen % 512 == 0:
            epoch_ends.add(step)
    for step, _size in segments(h)[1:]:
        # a new size starts right after a decision, or after an epoch's short last step
        assert step in switch_steps or (step - 1) in epoch_ends or step in epoch_ends


def test_small_noise_keeps_the_reference_batch():
    """B_noise 1e-3: every step counts as one example's worth, so the cheapest step wins.
    With a given step-time model (a larger batch costs more) that is B0 in every decision;
    with measured CPU times, flat below B~64, one loaded CI run explored B=16."""
    h = run(b_simple=1e-3, throughput=StepTimeModel(alpha=1e-3, beta=1e-5))
    assert set(h.extras["adaptive"]["batch_sizes"]) == {8}
    assert {d["batch_size"] for d in h.extras["adaptive"]["decisions"]} == {8}


def test_lr_follows_adascale_gain_for_sgd():
    h = run(b_simple=40.0, warmup_steps=0)
    decisions = h.extras["adaptive"]["decisions"]
    by_step = {d["step"]: d for d in decisions}
    current = decisions[0]
    for step, lr in zip(h.steps, h.lrs, strict=True):
        if step - 1 in by_step:
            current = by_step[step - 1]
        batch = current["batch_size"]
        b_simple = current["b_simple"]
        gain = 1.0 if b_simple is None else batch / 8 * efficiency(batch, 8, b_simple)
        assert lr == pytest.approx(0.1 * gain)
    assert max(h.lrs) > 0.1


def test_progress_is_counted_in_reference_epochs():
    h = run(b_simple=20.0, epochs=2)
    log = h.extras["adaptive"]
    assert 2.0 <= log["reference_epochs"] < 2.0 + log["batch_sizes"][-1] / 512
    assert h.epochs > log["reference_epochs"]  # bigger batches: more passes for the same progress
    assert h.evals[-1].step == h.total_steps


def test_memory_cap_uses_accumulation_and_never_exceeds_cap():
    seen = []

    class Spy(TrainCallback):
        def on_start(self, state):
            state.step_fn.micro_hook = lambda i, k, size: seen.append((k, size))

    h = run(b_simple=1e5, memory_cap=12, callbacks=[Spy()])
    assert max(size for _, size in seen) <= 12
    assert max(k for k, _ in seen) >= 2
    assert all(d["micro_batch_size"] <= 12 for d in h.extras["adaptive"]["decisions"])
    # The spy's hook kept running under the engine's timer: one call per micro-batch.
    assert len(seen) >= h.total_steps


def test_deterministic_json_round_trip_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fit = StepTimeModel(alpha=1e-3, beta=1e-5, gamma=1e-4)
    a = run(b_simple=lambda step: 10.0 + step, throughput=fit)
    assert torch.equal(torch.get_rng_state(), before)
    b = run(b_simple=lambda step: 10.0 + step, throughput=fit)
    assert a.train_loss == b.train_loss
    assert a.extras["adaptive"]["batch_sizes"] == b.extras["adaptive"]["batch_sizes"]
    assert len(set(a.extras["adaptive"]["batch_sizes"])) > 1
    again = History.from_json(a.to_json())
    assert again.extras["adaptive"]["decisions"] == a.extras["adaptive"]["decisions"]


def test_target_stops_the_run_and_max_steps_bounds_it():
    h = run(b_simple=100.0, epochs=20, target="val_acc>=0.6")
    assert h.reached_target and h.steps_to_target == h.total_steps
    assert h.final["reference_epochs"] < 20
    assert run(b_simple=100.0, max_steps=7).total_steps == 7


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"memory_cap": 4}, ConfigError, "memory cap"),
        ({"b_simple": -3.0}, NoiseEstimateError, "positive finite"),
        ({"max_batch_size": 10_000}, ConfigError, "larger than the training set"),
        ({"lr_rule": "cubic"}, ConfigError, "expected one of auto"),
    ],
)
def test_bad_input_is_one_clear_line(kwargs, error, text):
    with pytest.raises(error) as info:
        run(**kwargs)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_unknown_optimizer_asks_for_a_rule():
    class Mystery(torch.optim.Optimizer):  # no name, base class or `betas` the table knows
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])

    task = tiny_task(64, optimizer=lambda params, lr: Mystery(params, lr=lr))
    with pytest.raises(BatchlabError) as info:
        train_adaptive(task, b_simple=10.0, device="cpu")
    assert "Mystery" in str(info.value) and "lr_rule=" in str(info.value)
    h = train_adaptive(task, b_simple=10.0, device="cpu", lr_rule="adascale", epochs=1)
    assert math.isfinite(h.train_loss[-1])


# ------------------------------------------------------------------ noise from micro-batches
def exact_b_simple(x, y, w):
    """tr(Sigma) / |G|^2 from per-example gradients of 0.5 * (x.w - y)^2, by brute force."""
    per_example = (x @ w - y)[:, None] * x  # d/dw of 0.5 (x.w - y)^2
    g = per_example.mean(0)
    trace = ((per_example - g) ** 2).sum(1).mean()
    return float(trace / g.pow(2).sum())


@pytest.mark.parametrize(
    "sizes, weighting",
    [((8, 8, 8, 8), "size"), ((10, 10, 5), "size"), ((6, 6), "equal"), ((8, 4, 4), "equal")],
)
def test_micro_batch_norms_estimate_the_exact_noise_scale(sizes, weighting):
    from batchlab.adaptive.noise_source import smoothed_noise_estimate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64) + torch.randn(
        64, generator=g, dtype=torch.float64
    )
    w = torch.nn.Parameter(torch.tensor([0.8, -1.5, 0.0, 0.3, 2.0], dtype=torch.float64))
    exact = exact_b_simple(x, y, w.detach())
    estimate = smoothed_noise_estimate(decay=0.999, weighting=weighting)
    holder = torch.nn.Module()
    holder.w = w
    total = sum(sizes)
    for _ in range(1500):
        w.grad = None
        for i, b in enumerate(sizes):  # with replacement: E|g_b|^2 = |G|^2 + tr(Sigma)/b
            idx = torch.randint(0, 64, (b,), generator=g)
            loss = 0.5 * ((x[idx] @ w - y[idx]) ** 2).mean()
            weight = b / total if weighting == "size" else 1 / len(sizes)
            (loss * weight).backward()
            estimate.tracker.after_backward(holder, b, last=i == len(sizes) - 1)
        estimate.tracker.end_step(holder)
    assert estimate.b_simple() == pytest.approx(exact, rel=0.15)


def test_micro_batch_norms_without_the_last_micro_batch():
    """The HF Trainer path: the last of k micro-batches is clipped before a hook sees it."""
    from batchlab.adaptive.noise_source import smoothed_noise_estimate

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = torch.randn(64, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    exact = exact_b_simple(x, y, w.detach())
    # What NoiseScaleCallback does with clipping on: read-only (all_micro=False), the first
    # micro-batch is the small batch and the first two the big one, read before the third.
    # One small sample a step instead of two: a plain mean (fixed weights) over more steps.
    estimate = smoothed_noise_estimate(decay=1.0, weighting="equal", all_micro=False)
    holder = torch.nn.Module()
    holder.w = w
    for _ in range(4000):
        w.grad = None
        for i in range(3):
            idx = torch.randint(0, 64, (8,), generator=g)
            (0.5 * ((x[idx] @ w - y[idx]) ** 2).mean() / 3).backward()
            if i < 2:
                estimate.tracker.after_backward(holder, 8)
            if i == 1:
                estimate.tracker.end_step(holder, num_micro=3)
        w.grad.mul_(0.01)  # clipping the whole step must not matter
    assert estimate.b_simple() == pytest.approx(exact, rel=0.15)


def linear_regression_task(n: int = 512) -> tuple[Task, float]:
    """A task whose weights barely move (lr 1e-9), so its B_simple is a known constant.

    Returns the task and the exact B_simple at its (fixed) initial weights.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.5 * torch.randn(n, generator=g)
    w0 = torch.tensor([[0.8, -1.5, 0.0, 0.3, 2.0]])

    def model() -> torch.nn.Module:
        linear = torch.nn.Linear(5, 1, bias=False)
        with torch.no_grad():
            linear.weight.copy_(w0)
        return linear

    def loss(m, batch):
        xb, yb = batch
        return 0.5 * ((m(xb)[:, 0] - yb) ** 2).mean()

    task = Task(
        name="linear",
        model=model,
        train_data=TensorDataset(x, y),
        loss=loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=1e-9,
        batch_size=16,
        epochs=3,
    )
    return task, exact_b_simple(x.double(), y.double(), w0[0].double())


def test_engine_measures_noise_without_help():
    """b_simple=None: split steps feed the tracker; its estimate matches the exact value.

    The step-time model is given, so the batches the controller picks, and with them the
    steps the tracker sees, do not follow the machine's timing: with measured step times
    the run took B=32, 64 or 128 from run to run, and one CI run read 4.53 here."""
    task, exact = linear_regression_task()
    fixed = StepTimeModel(alpha=1e-3, beta=1e-5)  # a CPU-like line: B grows to 32
    h = train_adaptive(task, interval=8, device="cpu", seed=0, throughput=fixed)
    values = [d["b_simple"] for d in h.extras["adaptive"]["decisions"][1:]]
    assert len(values) >= 8 and all(v is not None for v in values)
    assert exact == pytest.approx(6.48, abs=0.01)  # small against B0=16: a real test of E(B)
    # The EMA over ~20 split steps: within 30% of the exact value at the end of the run.
    assert statistics.median(values[-4:]) == pytest.approx(exact, rel=0.3)


# ------------------------------------------------------------------ an injected clock
def test_step_timer_recovers_a_known_step_time_model():
    """A fake clock where a micro-batch of b costs alpha + beta*b and a step gamma: the
    throughput model fed by the engine's timer must find exactly those three numbers."""
    alpha, beta, gamma = 2.0**-7, 2.0**-12, 2.0**-9
    clock = FakeClock()
    costs = StepCosts(clock, alpha, beta, gamma)
    policy = AdaptiveBatch(
        base_lr=0.1,
        noise=FixedNoise(1e5),
        throughput=ThroughputModel(),
        epochs=3,
        eval_every_examples=64,
        memory_cap=12,
        interval=4,
    )
    h = run_training(
        tiny_task(512), policy, device=torch.device("cpu"), clock=clock, callbacks=[costs]
    )
    fit = h.extras["adaptive"]["throughput_fit"]
    assert len(fit["micro_batch_sizes"]) >= 2
    assert (fit["alpha"], fit["beta"], fit["gamma"]) == pytest.approx(
        (alpha, beta, gamma), rel=1e-9
    )
    assert h.train_seconds == pytest.approx(costs.train, rel=1e-12)
    assert h.eval_seconds == pytest.approx(costs.eval, rel=1e-12)
