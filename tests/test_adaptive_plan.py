"""`--adaptive` with the plan's models: starting from a plan's schedule, and the online fit."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import tiny_task

from batchlab.adaptive import TrajectoryNoise, train_adaptive
from batchlab.adaptive.controller import AdaptiveBatchSize
from batchlab.adaptive.plan_start import plan_start
from batchlab.adaptive.throughput_model import ThroughputModel
from batchlab.core.lr import adascale_gain
from batchlab.core.schedule import BatchSchedule, SchedulePhase, fastest_batch
from batchlab.core.step_time import StepTimeModel, fit_step_time
from batchlab.errors import ConfigError

# A step costs 1 ms + 0.1 ms per example: the fixed cost makes big batches cheaper per example.
STEP_TIME = StepTimeModel(alpha=1e-3, beta=1e-4)
PLAN = BatchSchedule(
    (SchedulePhase(0, 16, 16, 1, 0.05), SchedulePhase(2000, 64, 64, 1, 0.1)), unit="examples"
)


def truth(loss: float) -> float:
    """A known trajectory: B_noise = 60 L^-1.5."""
    return 60.0 * loss**-1.5


def run_from_plan(b_simple, **kwargs):
    return train_adaptive(
        tiny_task(512), schedule=PLAN, b_simple=b_simple, throughput=STEP_TIME, interval=4,
        max_steps=40, device="cpu", seed=0, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("b_noise", [2000.0, 1.0], ids=["noise-above-plan", "noise-below-plan"])
def test_a_run_starts_at_the_plans_first_phase_and_moves_toward_the_measured_noise(b_noise):
    h = run_from_plan(b_noise)
    log = h.extras["adaptive"]
    start, *later = log["decisions"]
    assert log["batch_sizes"][:4] == [16, 16, 16, 16]  # the plan's phase 1 ...
    assert start["lr"] == pytest.approx(0.05)  # ... at its lr, not the rule's 0.1 x 16/8
    assert start["reason"] == "start at B=16 (16 x 1): the plan's phase 1 of 2, lr 0.05"
    assert log["plan_schedule"] == PLAN.to_dict()
    # Toward the batch the plan's rule picks at the measured B_noise: min (1 + B_noise/B) t(B).
    controller = AdaptiveBatchSize(8, 0.1, optimizer="SGD", max_batch_size=128, min_batch_size=8)
    sizes = [m * a for m, a in controller.candidates()]
    goal = fastest_batch(b_noise, sizes, lambda b: STEP_TIME.step_seconds(b))
    final = later[-1]["batch_size"]
    assert (goal > 16 and final > 16) or (goal < 16 and final < 16)
    assert abs(math.log(final / goal)) < abs(math.log(16 / goal))
    for d in later:  # one line each: what it used, what the plan had there, why
        assert f"B_noise {b_noise:.0f} (given;" in d["reason"] and "the plan has B=" in d["reason"]
        # The lr rule is rescaled to the plan's lr at phase 1 (0.05 where AdaScale gives
        # ~0.2), the gain taken at the same B_noise there and later: E(B) counted once.
        gain = adascale_gain(d["batch_size"], 8, b_noise)
        assert d["lr"] == pytest.approx(0.05 * gain / adascale_gain(16, 8, b_noise))


def test_an_online_fit_of_a_known_power_law_answers_its_value_at_the_current_loss():
    source = TrajectoryNoise()  # no plan: the run's own points only
    tracker = SimpleNamespace(points=[])

    def record(state):  # the tracker records one exact point every 3 steps
        if state.step % 3 == 0:
            loss = sum(losses[state.step - 3 : state.step]) / 3
            tracker.points.append({"b_simple": truth(loss), "b_simple_ci": (0.9 * truth(loss),
                                   1.1 * truth(loss))})  # fmt: skip

    tracker.on_step = record
    source.tracker = tracker
    losses = [2.0 * 0.97**k for k in range(1, 31)]
    for step, loss in enumerate(losses, start=1):
        source.on_step(SimpleNamespace(step=step, last_loss=loss))
    assert len(source.points) == 10
    fit = source.fit()
    assert fit.kind == "power-law"
    assert fit.exponent == pytest.approx(-1.5) and math.exp(fit.log_scale) == pytest.approx(60)
    assert source.b_simple(30) == pytest.approx(truth(sum(losses[27:30]) / 3))
    source.on_step(SimpleNamespace(step=31, last_loss=0.5))  # read at the newest loss
    assert source.b_simple(31) == pytest.approx(truth(0.5))
    assert source.describe().startswith("trajectory fit 60 L^-1.50 over 10 points, at loss 0.5")


def test_a_preconditioned_plan_is_followed_with_the_preconditioned_metric(tmp_path):
    """A plan for Adam measured Adam-preconditioned B_simple (~2x the plain value on
    mnist1d-mlp): the run's own points must be the same metric, never the plain one."""
    path = plan_file(tmp_path)
    data = json.loads(path.read_text())
    data["measurements"]["noise_preconditioned"] = True
    path.write_text(json.dumps(data))
    start = plan_start(path)
    assert start.preconditioned
    assert not plan_start(plan_file(tmp_path)).preconditioned
    source = TrajectoryNoise(prior=start.noise, preconditioned=start.preconditioned)
    assert source.tracker.preconditioned
    fake = SimpleNamespace(points=[])
    fake.on_step = lambda state: fake.points.append(
        {"b_simple": 1.0, "b_simple_ci": (0.5, 2.0),
         "b_simple_preconditioned": 400.0, "b_simple_preconditioned_ci": (300.0, 500.0)}
    )  # fmt: skip
    source.tracker = fake
    source.on_step(SimpleNamespace(step=1, last_loss=0.7))
    assert source.points[-1] == (0.7, 400.0, (300.0, 500.0))


LADDER = (8, 16, 32, 64, 128)  # a plan's throughput ladder, timed at 1 ms + 0.1 ms/example


def plan_file(tmp_path, *, schedule=True, lr_rule=None, scale=1.0, ladder=False):
    """A plan's JSON as far as `--adaptive --schedule` reads it: its schedule, its LR
    coupling and its noise points (on `scale` x the known trajectory)."""
    noise = [
        {"step": 10 * i, "examples": 160 * i, "train_loss": loss, "b_simple": scale * truth(loss),
         "b_simple_ci": [scale * truth(loss) / 1.3, scale * truth(loss) * 1.3], "reliable": True}
        for i, loss in enumerate([1.2, 1.1, 1.0, 0.9, 0.8], start=1)
    ]  # fmt: skip
    data = {"measurements": {"noise": noise}}
    if ladder:
        data["measurements"]["throughput"] = [
            {"batch_size": b, "step_s": STEP_TIME.step_seconds(b)} for b in LADDER
        ]
    if schedule:
        data["schedule"] = {"schedule": PLAN.to_dict(), "lr_rule": lr_rule}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def test_a_plan_file_starts_from_its_schedule_with_its_trajectory_and_lr_coupling(tmp_path):
    h = train_adaptive(
        tiny_task(512), schedule=plan_file(tmp_path, lr_rule="linear", scale=20),
        throughput=STEP_TIME, interval=4, max_steps=24, device="cpu", seed=0,
    )  # fmt: skip
    log = h.extras["adaptive"]
    assert log["noise_source"] == "TrajectoryNoise" and log["batch_sizes"][0] == 16
    assert log["lr_rule"] == "linear"
    fitted = [d for d in log["decisions"] if d["b_simple"] is not None]
    assert fitted and all(", 5 from the plan, at loss" in d["reason"] for d in fitted)
    assert {d["batch_size"] for d in log["decisions"]} != {16}  # it moved ...
    for d in log["decisions"]:  # ... with the lr coupled as the plan did: 0.05 x B/16
        assert d["lr"] == pytest.approx(0.05 * d["batch_size"] / 16)


def test_from_a_plan_the_first_decision_prices_batches_with_the_plans_step_time_model(tmp_path):
    h = train_adaptive(
        tiny_task(512), schedule=plan_file(tmp_path, ladder=True), b_simple=2000.0,
        interval=4, max_steps=8, device="cpu", seed=0,
    )  # fmt: skip
    first = h.extras["adaptive"]["decisions"][1]  # no exploring: the plan timed the ladder
    assert first["step"] == 4 and first["action"] == "switch"
    assert "t(B) from the plan's throughput ladder" in first["reason"]
    plan_model = fit_step_time([(b, 1, STEP_TIME.step_seconds(b)) for b in LADDER])
    controller = AdaptiveBatchSize(8, 0.1, optimizer="SGD", max_batch_size=128, min_batch_size=8)
    window = [m * a for m, a in controller.candidates() if 8 <= m * a <= 32]
    assert first["batch_size"] == fastest_batch(2000.0, window, plan_model.step_seconds) == 32


def test_the_plans_step_time_model_answers_until_the_run_timed_two_sizes():
    plan_model = fit_step_time([(b, 1, STEP_TIME.step_seconds(b)) for b in LADDER])
    timings = ThroughputModel(prior=plan_model)
    assert timings.ready and timings.fit() is plan_model
    for _ in range(3):
        timings.observe_micro(16, 0.5)
    assert timings.fit() is plan_model  # one size cannot pin a line
    timings.observe_micro(32, 0.75)
    assert timings.fit().micro_seconds(16) == pytest.approx(0.5)  # the run's own now
    assert timings.source == "t(B) from this run's step times"


@pytest.mark.parametrize(
    "kwargs, match, param",
    [
        ({"lr": 0.1}, "`schedule` sets the starting lr", "lr"),
        (
            {"schedule": BatchSchedule((SchedulePhase(0, 1024, 1024, 1, 0.1),))},
            "first phase batch 1024 is larger than the training set",
            "schedule",
        ),  # fmt: skip
    ],
)
def test_train_adaptive_refuses_bad_combinations_in_one_line(kwargs, match, param):
    kwargs = {"schedule": PLAN, **kwargs}
    with pytest.raises(ConfigError, match=match) as caught:
        train_adaptive(tiny_task(512), max_steps=4, device="cpu", **kwargs)
    assert caught.value.param == param and "\n" not in str(caught.value)


def test_cli_adaptive_from_a_plan_prints_where_it_started(capsys, tmp_path):
    from batchlab.cli import main

    code = main(["train", "dots", "--adaptive", "--schedule", str(plan_file(tmp_path)),
                 "--max-steps", "24", "--device", "cpu"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "adaptive start" in out and "the plan's phase 1 of 2" in out


@pytest.mark.parametrize(
    "extra, schedule, match",
    [
        (["--lr", "0.1"], True, "--lr would be ignored: --schedule sets the starting lr"),
        (["--batch-size", "8"], True, "--batch-size would be ignored: --adaptive picks"),
        ([], False, "has no schedule: expected a schedule's JSON or a plan with one"),
    ],
)
def test_cli_adaptive_schedule_bad_combinations_exit_2_in_one_line(
    capsys, tmp_path, extra, schedule, match
):
    from batchlab.cli import main

    path = plan_file(tmp_path, schedule=schedule)
    code = main(["train", "dots", "--adaptive", "--schedule", str(path), "--max-steps", "4",
                 "--device", "cpu", *extra])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 2 and match in err and err.count("\n") == 1
