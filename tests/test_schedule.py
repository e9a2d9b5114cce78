"""The batch-size schedule: its JSON round trip and checks, and running it through the loop
with exact epochs (`batchlab.core.schedule`, `batchlab.loop.ScheduledBatch`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_task

import batchlab
from batchlab.core.schedule import (
    BatchSchedule,
    SchedulePhase,
    fastest_batch,
    path_cost,
    rising_batches,
    schedule_run_steps,
)
from batchlab.errors import ConfigError
from batchlab.loop import ScheduledBatch, run_training
from batchlab.train import load_schedule

TWO_PHASES = BatchSchedule(
    (SchedulePhase(0, 8, 8, 1, 0.1), SchedulePhase(40, 16, 8, 2, 0.14)), unit="examples"
)


def _strip_timing(history: batchlab.History) -> dict:
    data = history.to_dict()
    for key in ("train_seconds", "eval_seconds", "seconds_to_target"):
        data.pop(key)
    for ev in data["evals"]:
        ev.pop("train_seconds")
    return data


def test_schedule_json_round_trip(tmp_path):
    assert BatchSchedule.from_json(TWO_PHASES.to_json()) == TWO_PHASES
    path = TWO_PHASES.save(tmp_path / "schedule.json")
    assert load_schedule(path) == TWO_PHASES
    # A plan file carries it as plan["schedule"]["schedule"]; `train --schedule` reads that.
    plan_like = {"task": "tiny", "schedule": {"schedule": TWO_PHASES.to_dict(), "gain": 1.2}}
    (tmp_path / "plan.json").write_text(json.dumps(plan_like))
    assert load_schedule(tmp_path / "plan.json") == TWO_PHASES


def _phase(**change):
    fields = dict(start=0, batch_size=8, micro_batch_size=8, accumulation_steps=1, lr=0.1)
    return {**fields, **change}


@pytest.mark.parametrize(
    "phases, unit, match",
    [
        ([], "examples", "expected one or more phases"),
        ([_phase()], "epochs", "expected `unit` one of step, examples, got 'epochs'"),
        ([_phase(start=5)], "step", "phase 1: expected `start` 0"),
        ([_phase(), _phase(start=0)], "step", "phase 2: expected `start` above the previous"),
        ([_phase(batch_size=0)], "step", "phase 1: expected `batch_size` a positive integer"),
        ([_phase(batch_size=8.0)], "step", "expected `batch_size` a positive integer, got 8.0"),
        ([_phase(lr=0)], "step", "phase 1: expected `lr` a positive finite number, got 0"),
        ([_phase(batch_size=20, accumulation_steps=2)], "step", r"ceil\(batch_size / micro"),
    ],
)
def test_bad_schedule_is_one_line(phases, unit, match):
    with pytest.raises(ConfigError, match=match) as info:
        BatchSchedule.from_dict({"phases": phases, "unit": unit})
    assert "\n" not in str(info.value) and info.value.param == "schedule"


def test_bad_schedule_files(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"task": "tiny", "schedule": None}))
    with pytest.raises(ConfigError, match="has no schedule"):
        load_schedule(tmp_path / "plan.json")
    (tmp_path / "bad.json").write_text(json.dumps({"phases": [{"start": 0}], "unit": "step"}))
    with pytest.raises(ConfigError, match="bad.json.*phases"):
        load_schedule(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_schedule(tmp_path / "missing.json")


def test_run_steps_known_answer():
    # 64 examples: 5 steps of 8 (40 examples), then 16s: 56, 64 (short: 8), 80, 96, 112, 128.
    assert schedule_run_steps(TWO_PHASES, 64, 2) == 5 + 2 + 4
    assert schedule_run_steps(TWO_PHASES, 64, 2, max_steps=6) == 6


class _Recording(ScheduledBatch):
    """Keeps each step's examples, to check the epochs."""

    def run_step(self, state, plan):
        self.seen.append(plan.indices.tolist())
        return super().run_step(state, plan)


@pytest.mark.parametrize("unit, starts", [("step", (0, 3, 7)), ("examples", (0, 20, 100))])
def test_every_example_once_per_epoch_across_phase_changes(unit, starts):
    """Phases switch mid-epoch (also to a batch that does not divide N): no example is
    skipped or repeated within an epoch, and each epoch ends at exactly N examples."""
    task = tiny_task(60)
    phases = (
        SchedulePhase(starts[0], 8, 8, 1, 0.1),
        SchedulePhase(starts[1], 12, 6, 2, 0.12),
        SchedulePhase(starts[2], 25, 10, 3, 0.15),
    )
    schedule = BatchSchedule(phases, unit=unit)
    total = schedule_run_steps(schedule, task.num_train, 3)
    policy = _Recording(schedule, total_steps=total, eval_every=4, seed=1)
    policy.seen = []
    history = run_training(task, policy, device=torch.device("cpu"), seed=1)
    flat = [i for step in policy.seen for i in step]
    assert len(flat) == 3 * task.num_train == history.total_examples
    for epoch in range(3):
        assert sorted(flat[epoch * 60 : (epoch + 1) * 60]) == list(range(60))
    # No step crosses an epoch's end, and every phase ran at its batch.
    ends = [sum(map(len, policy.seen[: k + 1])) for k in range(len(policy.seen))]
    assert {60, 120, 180} <= set(ends)
    assert {len(s) for s in policy.seen} >= {8, 12, 25}
    assert [p["phase"] for p in history.extras["schedule"]["phases_run"]] == [0, 1, 2]


def test_phases_start_where_the_schedule_says_and_history_round_trips():
    task = tiny_task(64)
    history = batchlab.train(task, schedule=TWO_PHASES, epochs=2, seed=0, device="cpu")
    run = history.extras["schedule"]["phases_run"]
    # Phase 2 starts once 40 examples are done: after 5 steps of 8.
    assert run == [{"phase": 0, "step": 1, "examples": 0}, {"phase": 1, "step": 6, "examples": 40}]
    assert history.lrs[:5] == (0.1,) * 5 and set(history.lrs[5:]) == {0.14}
    assert history.total_examples == 128 and history.total_steps == 11
    assert history.effective_batch_size == 16 and history.lr_rule == "schedule"
    assert batchlab.History.from_json(history.to_json()) == history
    assert (
        BatchSchedule.from_dict(
            {k: v for k, v in history.extras["schedule"].items() if k != "phases_run"}
        )
        == TWO_PHASES
    )


def test_one_phase_schedule_trains_exactly_as_a_fixed_batch():
    task = tiny_task(64)
    fixed = batchlab.train(task, 8, 0.1, accumulation_steps=2, epochs=3, seed=2)
    one = BatchSchedule((SchedulePhase(0, 16, 8, 2, 0.1),))
    scheduled = batchlab.train(task, schedule=one, epochs=3, seed=2)
    a, b = _strip_timing(fixed), _strip_timing(scheduled)
    for data in (a, b):
        for key in ("lr_rule", "extras", "batch_size", "accumulation_steps"):
            data.pop(key)
    assert a == b


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 8}, "expected no `batch_size` with it"),
        ({"lr": 0.1, "lr_rule": "sqrt"}, "expected no `lr`, `lr_rule` with it"),
    ],
)
def test_train_refuses_fixed_settings_with_a_schedule(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        batchlab.train(tiny_task(), schedule=TWO_PHASES, **kwargs)


def test_train_refuses_a_phase_larger_than_the_data():
    big = BatchSchedule((SchedulePhase(0, 100, 100, 1, 0.1),))
    with pytest.raises(ConfigError, match="phase batch 100 is larger than the training set"):
        batchlab.train(tiny_task(64), schedule=big)


def test_train_needs_a_batch_or_a_schedule():
    with pytest.raises(ConfigError, match="expected a `batch_size` \\(or a `schedule`\\)"):
        batchlab.train(tiny_task())


# --- planning ----------------------------------------------------------------------------


def test_fastest_batch_rises_with_b_noise():
    """t(B) = 1 + B/100 s: seconds per S_min step (1 + Bn/B)(1 + B/100) is least at
    B = sqrt(100 Bn), so Bn = 25, 100, 400 pick 50, 100, 200 from a factor-2 ladder."""
    ladder = [12, 25, 50, 100, 200, 400, 800]
    seconds = lambda b: 1 + b / 100  # noqa: E731
    assert [fastest_batch(bn, ladder, seconds) for bn in (25, 100, 400)] == [50, 100, 200]
    # A dip in B_noise does not lower the batch.
    assert rising_batches([25, 400, 100], ladder, seconds) == [50, 200, 200]


def test_path_cost_is_eq_2_11_summed():
    cost = path_cost([10, 20], [5.0, 2.0], [10.0, 40.0], lambda b: b / 10)
    assert cost.steps == pytest.approx(5 * 2 + 2 * 3)
    assert cost.examples == pytest.approx(10 * 10 + 6 * 20)
    assert cost.seconds == pytest.approx(10 * 1 + 6 * 2)
    assert math.isclose(sum(cost.stretch_steps), cost.steps)


def test_cli_train_schedule_runs_and_saves_the_phases(capsys, tmp_path):
    from batchlab.cli import main

    schedule = BatchSchedule(
        (SchedulePhase(0, 32, 32, 1, 0.01), SchedulePhase(640, 64, 32, 2, 0.014)), unit="examples"
    )
    path = schedule.save(tmp_path / "schedule.json")
    out_json = tmp_path / "history.json"
    code = main(["train", "dots", "--schedule", str(path), "--max-steps", "30",
                 "--device", "cpu", "--json", str(out_json)])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "phase 2" in out and "B=64 (32 x 2), lr 0.014" in out
    history = batchlab.History.load(out_json)
    assert history.extras["schedule"]["phases_run"][1] == {"phase": 1, "step": 21, "examples": 640}


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--batch-size", "8"], "--batch-size would be ignored: --schedule sets"),
        (["--adaptive", "--lr", "0.1"], "--lr would be ignored: --schedule sets the starting"),
    ],
)
def test_cli_train_schedule_refuses_conflicting_flags(capsys, tmp_path, extra, match):
    from batchlab.cli import main

    path = TWO_PHASES.save(tmp_path / "schedule.json")
    code = main(["train", "dots", "--schedule", str(path), *extra])
    _, err = capsys.readouterr()
    assert code == 2 and match in err and err.count("\n") == 1
