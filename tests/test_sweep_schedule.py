"""The geometric evaluation schedule (batchlab.core.evals): known answers and its bound."""

import pytest

from batchlab.core.evals import (
    GEOMETRIC_RESOLUTION,
    eval_due,
    eval_steps,
    geometric_spacing,
)
from batchlab.sweep.build import make_sweep_spec


def test_spacing_doubles_every_octave_from_32():
    assert [geometric_spacing(t) for t in (1, 31, 32, 63, 64, 127, 128, 255, 256, 4095, 4096)] == [
        1, 1, 2, 2, 4, 4, 8, 8, 16, 128, 256,
    ]  # fmt: skip


def test_exact_evaluation_steps_of_a_short_run():
    assert eval_steps(140, "geometric") == (
        *range(0, 32), *range(32, 64, 2), *range(64, 128, 4), 128, 136, 140,
    )  # fmt: skip
    assert eval_steps(10, 4) == (0, 4, 8, 10)  # a fixed spacing, and the last step


def test_every_step_below_32_is_evaluated():
    assert all(eval_due(t, "geometric") for t in range(1, 32))
    assert not eval_due(33, "geometric") and eval_due(33, "geometric", total_steps=33)


def test_gap_after_every_evaluation_is_at_most_a_sixteenth_of_its_step():
    steps = eval_steps(200_000, "geometric")
    gaps = [(b - a) / a for a, b in zip(steps[1:], steps[2:], strict=False) if a >= 32]
    assert max(gaps) == GEOMETRIC_RESOLUTION == 0.0625


def test_a_crossing_anywhere_is_read_within_six_and_a_quarter_percent():
    """The guarantee that matters: for a target first met at step s, the first evaluation
    at or after s overshoots it by at most 6.25% (and not at all below 32)."""
    steps = eval_steps(20_000, "geometric")
    worst, i = 0.0, 0
    for s in range(1, 19_000):
        while steps[i] < s:
            i += 1
        if s < 32:
            assert steps[i] == s
        worst = max(worst, (steps[i] - s) / s)
    assert worst <= GEOMETRIC_RESOLUTION
    assert worst > 0.06  # the bound is tight, so the test could notice a looser schedule


def test_evaluation_count_grows_with_log_steps():
    """31 below 32, then 16 per doubling: the cost of the resolution."""
    assert len(eval_steps(32, "geometric")) == 33
    assert len(eval_steps(4096, "geometric")) == 33 + 16 * 7


def test_sweep_runs_use_the_geometric_schedule():
    spec = make_sweep_spec("digits-mlp", batch_sizes="16,64", max_steps=6, sharpness="none")
    assert {r.eval_every for r in spec.runs} == {"geometric"}
    assert spec == type(spec).from_json(spec.to_json())


@pytest.mark.parametrize("bad", [0, "every", None])
def test_unknown_schedules_are_refused(bad):
    from batchlab.core.evals import check_eval_every
    from batchlab.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        check_eval_every(bad)
    assert "got" in str(info.value) and info.value.param == "eval_every"
