"""`lr_rule="tuned"` widens its LR grid past an edge where the best LR sits, exactly once per
step, and a killed or resumed sweep neither loses nor repeats an extension run."""

import pytest
from test_sweep_analysis import fake_record

from batchlab.sweep.analysis import analyze_sweep
from batchlab.sweep.build import make_sweep_spec
from batchlab.sweep.extend import all_runs, lr_extensions, next_multiplier
from batchlab.sweep.runner import run_sweep
from batchlab.sweep.store import SweepStore

# Steps to target by batch and LR multiplier (None: never reached). B=16's best, x2, is at
# the top edge and x4 is worse: one extension. B=32's best keeps falling to x1/8: two
# extensions, then the limit. B=64's best, x1, is inside the grid: none.
STEPS = {
    16: {0.5: 300, 1.0: 200, 2.0: 120, 4.0: 160},
    32: {0.125: 60, 0.25: 80, 0.5: 100, 1.0: 150, 2.0: None},
    64: {0.5: 90, 1.0: 60, 2.0: 80},
}


def fake_result(run):
    return fake_record(run, reach_step=STEPS[run.batch_size][run.lr_multiplier])


class FakeBackend:
    """Returns made-up records instantly; remembers what it was asked to run, and can stop
    (as a killed sweep does) after `stop_after` runs."""

    name = "fake"

    def __init__(self, stop_after=None):
        self.calls, self.stop_after = [], stop_after

    def run(self, task, runs, context):
        for run in runs:
            if self.stop_after is not None and len(self.calls) == self.stop_after:
                raise KeyboardInterrupt
            self.calls.append(run.run_id)
            yield fake_result(run)


@pytest.fixture(scope="module")
def spec():
    return make_sweep_spec(
        "digits-mlp",
        batch_sizes="16,32,64",
        lr_rule="tuned",
        max_steps=400,
        repeats=2,
        target="val_acc>=0.8",
        sharpness="none",
    )


def test_next_multiplier_steps_past_the_edge_up_to_two_times_per_side():
    grid = (0.5, 1.0, 2.0)
    assert next_multiplier(grid, {0.5, 1.0, 2.0}, 1.0) is None
    assert next_multiplier(grid, {0.5, 1.0, 2.0}, 2.0) == 4.0
    assert next_multiplier(grid, {0.5, 1.0, 2.0, 4.0}, 4.0) == 8.0
    assert next_multiplier(grid, {0.5, 1.0, 2.0, 4.0, 8.0}, 8.0) is None
    assert next_multiplier(grid, {0.25, 0.5, 1.0, 2.0}, 0.25) == 0.125
    assert next_multiplier(grid, {0.125, 0.25, 0.5, 1.0, 2.0}, 0.125) is None


def test_an_edge_best_lr_adds_exactly_the_next_factor_for_every_repeat(spec):
    base = [fake_result(r) for r in spec.runs]
    first = lr_extensions(spec, base)
    assert sorted((r.batch_size, r.lr_multiplier, r.repeat) for r in first) == [
        (16, 4.0, 0), (16, 4.0, 1), (32, 0.25, 0), (32, 0.25, 1),
    ]  # fmt: skip
    x1 = next(r for r in spec.runs if (r.batch_size, r.lr_multiplier, r.repeat) == (16, 1.0, 1))
    x4 = next(r for r in first if (r.batch_size, r.repeat) == (16, 1))
    assert x4.lr == pytest.approx(4 * x1.lr) and x4.seed == x1.seed
    assert x4.run_id == "ladder-task-b00016-x4-r1" and x4.max_steps == x1.max_steps
    # Until both repeats of B=32 x1/4 are recorded, nothing further is added for B=32.
    one_more = base + [fake_result(r) for r in first if r.repeat == 0]
    assert lr_extensions(spec, one_more) == first
    done = base + [fake_result(r) for r in first]
    assert [r.run_id for r in lr_extensions(spec, done)] == [r.run_id for r in first] + [
        "ladder-task-b00032-x0.125-r0",
        "ladder-task-b00032-x0.125-r1",
    ]


def test_a_sweep_runs_its_extensions_once_and_the_analysis_picks_them(spec, tmp_path):
    backend = FakeBackend()
    result = run_sweep(spec, tmp_path, backend=backend)
    records = SweepStore(tmp_path).read().records
    expected = [r.run_id for r in all_runs(spec, records)]
    assert backend.calls == expected and len(set(expected)) == len(expected)
    assert len(expected) == len(spec.runs) + 6
    assert result.runs_total == result.runs_done == len(expected)
    analysis = analyze_sweep(spec, records, n_boot=0)
    picks = {p.batch_size: p.lr_multiplier for p in analysis.groups[0].points}
    assert picks == {16: 2.0, 32: 0.125, 64: 1.0}
    edge = [w for w in analysis.warnings if "edge" in w]
    assert len(edge) == 1 and "B=32" in edge[0] and "x0.125" in edge[0]
    assert not any("not finished" in w for w in analysis.warnings)


@pytest.mark.parametrize("stop_after", [10, 18, 20, 22])
def test_a_killed_sweep_resumes_without_losing_or_repeating_an_extension(
    spec, tmp_path, stop_after
):
    """Killed in the first wave, at its end, inside and at the end of the extensions."""
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path, backend=FakeBackend(stop_after=stop_after))
    first = [r.run_id for r in SweepStore(tmp_path).read().records]
    assert len(first) == stop_after
    second = FakeBackend()
    run_sweep(spec, tmp_path, backend=second)
    records = SweepStore(tmp_path).read().records
    ids = [r.run_id for r in records]
    assert len(ids) == len(set(ids)) == len(spec.runs) + 6
    assert first + second.calls == ids
    assert set(ids) == {r.run_id for r in all_runs(spec, records)}
    third = FakeBackend()
    assert run_sweep(spec, tmp_path, backend=third).runs_done == 0 and third.calls == []


def test_other_rules_are_never_extended():
    spec = make_sweep_spec("digits-mlp", batch_sizes="16,32", max_steps=400, sharpness="none")
    records = [fake_record(r, reach_step=100) for r in spec.runs]
    assert lr_extensions(spec, records) == ()


def test_a_batch_whose_runs_all_failed_is_not_extended(spec):
    records = [
        fake_record(r, status="failed") if r.batch_size == 16 else fake_result(r) for r in spec.runs
    ]
    assert {r.batch_size for r in lr_extensions(spec, records)} == {32}
