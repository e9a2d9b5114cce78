"""The S(B) fit against exact answers, the regimes, and the analysis of synthetic sweeps."""

import math

import numpy as np
import pytest
from test_plan_model import known_plan

from batchlab.errors import ConfigError
from batchlab.history import Evaluation, History
from batchlab.sweep.analysis import analyze_sweep
from batchlab.sweep.build import make_sweep_spec
from batchlab.sweep.fit import (
    DIMINISHING,
    MAXIMAL,
    PERFECT,
    fit_steps_to_target,
    regime,
    regime_borders,
)
from batchlab.sweep.metrics import auto_target, first_reaching
from batchlab.sweep.spec import SweepSpec
from batchlab.sweep.store import RunRecord
from batchlab.target import parse_target

LADDER = (8, 16, 32, 64, 128, 256, 512)


def hyperbola(b, s_min, b_crit):
    return s_min * (1 + b_crit / np.asarray(b, dtype=float))


def test_fit_recovers_exact_parameters_from_noiseless_steps():
    steps = hyperbola(LADDER, 120.0, 90.0)
    fit = fit_steps_to_target(LADDER, steps, n_boot=50)
    assert fit.s_min == pytest.approx(120.0, rel=1e-5)
    assert fit.b_crit == pytest.approx(90.0, rel=1e-5)
    assert fit.e_min == pytest.approx(120.0 * 90.0, rel=1e-5)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert not fit.at_bound
    for b in LADDER:  # E(B) = B S(B) exactly
        assert fit.examples(b) == pytest.approx(b * fit.steps(b))


def test_fit_is_the_least_squares_minimum_in_log_space():
    """Brute force: a dense 2-D grid over (S_min, B_crit) finds nothing better."""
    rng = np.random.default_rng(1)
    b = np.repeat(LADDER, 2)
    s = hyperbola(b, 50.0, 200.0) * np.exp(rng.normal(0, 0.15, len(b)))
    fit = fit_steps_to_target(b, s, n_boot=0)

    def ssr(s_min, b_crit):
        return float(((np.log(s) - np.log(hyperbola(b, s_min, b_crit))) ** 2).sum())

    best_grid = min(
        ssr(sm, bc) for sm in np.geomspace(10, 200, 300) for bc in np.geomspace(10, 2000, 300)
    )
    assert ssr(fit.s_min, fit.b_crit) <= best_grid + 1e-9
    # and it is a stationary point: nudging either parameter makes it worse
    for factor in (0.99, 1.01):
        assert ssr(fit.s_min * factor, fit.b_crit) > ssr(fit.s_min, fit.b_crit)
        assert ssr(fit.s_min, fit.b_crit * factor) > ssr(fit.s_min, fit.b_crit)


def test_bootstrap_interval_over_repeats_covers_the_truth():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(10):
        b = np.repeat(LADDER, 4)
        s = hyperbola(b, 100.0, 64.0) * np.exp(rng.normal(0, 0.1, len(b)))
        fit = fit_steps_to_target(b, s, n_boot=200, seed=trial)
        assert fit.ci_method == "bootstrap over repeats"
        lo, hi = fit.b_crit_ci
        assert lo <= fit.b_crit <= hi
        covered += lo <= 64.0 <= hi
    assert covered >= 8  # a 95% interval; 10 trials


def test_single_repeat_bootstraps_over_batch_sizes():
    s = hyperbola(LADDER, 100.0, 64.0) * np.exp(
        np.random.default_rng(2).normal(0, 0.05, len(LADDER))
    )
    fit = fit_steps_to_target(LADDER, s, n_boot=100)
    assert fit.ci_method == "bootstrap over batch sizes"
    assert fit.b_crit_ci[0] < 64.0 < fit.b_crit_ci[1]


def test_unbracketed_b_crit_is_flagged():
    # Perfect scaling everywhere: S = 1e5 / B, B_crit -> infinity.
    fit = fit_steps_to_target(LADDER, [1e5 / b for b in LADDER], n_boot=0)
    assert fit.at_bound


def test_fit_needs_three_batch_sizes():
    with pytest.raises(ConfigError) as info:
        fit_steps_to_target([8, 8, 16], [10, 11, 6])
    assert ">= 3 different batch sizes, got 2" in str(info.value)
    with pytest.raises(ConfigError):
        fit_steps_to_target([8, 16, 32], [10, -1, 3])


def test_regimes_follow_the_efficiency_borders():
    left, right = regime_borders(100.0)
    assert (left, right) == pytest.approx((25.0, 400.0))
    assert regime(10, 100) == PERFECT and regime(25, 100) == PERFECT
    assert regime(100, 100) == DIMINISHING
    assert regime(400, 100) == MAXIMAL and regime(4000, 100) == MAXIMAL
    # At the borders the efficiencies are exactly 80%.
    assert 1 / (1 + left / 100) == pytest.approx(0.8)
    assert 1 / (1 + 100 / right) == pytest.approx(0.8)


# -- analysis of synthetic records -------------------------------------------------------


def fake_record(run, *, reach_step=None, status="ok", acc_final=0.9, loss_floor=0.3, sharp=1.0):
    """A record whose val accuracy crosses 0.8 at `reach_step` (evaluations every 10 steps)."""
    b = run.batch_size
    total = run.max_steps if status == "ok" else 5
    evals = []
    for step in range(0, total + 1, 10):
        reached = reach_step is not None and step >= reach_step
        acc = acc_final if reached else 0.5
        evals.append(
            Evaluation(
                step,
                step * b,
                step * b / 1000,
                step * 0.01,
                1.0 if not reached else loss_floor,
                {"acc": acc},
            )
        )
    h = History(
        task="tiny",
        batch_size=b,
        accumulation_steps=1,
        effective_batch_size=b,
        lr=run.lr,
        lr_rule="none",
        warmup_steps=0,
        seed=run.seed,
        device="cpu",
        amp=False,
        num_train=1000,
        steps=(),
        train_loss=(),
        lrs=(),
        evals=tuple(evals),
        total_steps=total,
        total_examples=total * b,
        epochs=total * b / 1000,
        train_seconds=total * 0.01,
        eval_seconds=0.0,
        diverged=status == "diverged",
        extras={"grad_norm": {"mean": 1 / math.sqrt(b)}, "distance_from_init": {"final": 2.0}},
    )
    return RunRecord(
        run.run_id,
        run,
        status,
        h,
        train_loss=0.1,
        train_metrics={"acc": 0.99},
        sharpness={"hessian_top_eigenvalue": {"value": sharp}},
    )


@pytest.fixture(scope="module")
def tuned_spec():
    return make_sweep_spec(
        "digits-mlp", batch_sizes="16,32,64,128", lr_rule="tuned", max_steps=400, repeats=2
    )


def test_tuned_keeps_the_lr_with_fewest_steps_and_the_fit_uses_it(tuned_spec):
    truth = {b: hyperbola([b], 40, 64)[0] for b in (16, 32, 64, 128)}
    records = []
    for run in tuned_spec.runs:
        base = truth[run.batch_size]
        # x1 is best; x0.5 takes twice the steps; x2 never reaches the target
        if run.lr_multiplier == 2.0:
            records.append(fake_record(run, reach_step=None))
        else:
            records.append(
                fake_record(
                    run,
                    reach_step=math.ceil(base * (2 if run.lr_multiplier == 0.5 else 1) / 10) * 10,
                )
            )
    analysis = analyze_sweep(tuned_spec, records, target="val_acc>=0.8", n_boot=50)
    (group,) = analysis.groups
    assert group.lr_rule == "tuned"
    assert [p.lr_multiplier for p in group.points] == [1.0] * 4
    assert [p.median_steps_to_target for p in group.points] == [
        math.ceil(truth[b] / 10) * 10 for b in (16, 32, 64, 128)
    ]
    assert group.fit is not None and 30 < group.fit.b_crit < 140
    assert all(p.regime for p in group.points)
    assert analysis.target == "val_acc>=0.8" and not analysis.target_auto


def test_diverged_failed_and_missing_runs_are_reported():
    spec = make_sweep_spec("digits-mlp", batch_sizes="16,32,64,128", max_steps=200)
    runs = {r.batch_size: r for r in spec.runs}
    records = [
        fake_record(runs[16], reach_step=150),
        fake_record(runs[32], reach_step=80),
        fake_record(runs[64], status="diverged"),
    ]
    analysis = analyze_sweep(spec, records, target="val_acc>=0.8", n_boot=0)
    points = {p.batch_size: p for p in analysis.groups[0].points}
    assert points[64].diverged == 1 and points[64].reached == 0
    text = " | ".join(analysis.warnings)
    assert "1 of 4 runs are not finished" in text
    assert "B=64 diverged in 1 of 1 repeats" in text
    assert "no fit: expected steps at >= 3 different batch sizes, got 2" in text
    assert analysis.groups[0].fit is None


def test_auto_target_is_reached_by_most_batches():
    spec = make_sweep_spec("digits-mlp", batch_sizes="16,32,64", max_steps=100)
    records = [
        fake_record(r, reach_step=50, acc_final=a)
        for r, a in zip(spec.runs, (0.9, 0.8, 0.6), strict=True)
    ]
    target = auto_target(records)
    assert str(target) == "val_acc>=0.76"  # floor(0.95 * median(0.9, 0.8, 0.6) * 100) / 100
    analysis = analyze_sweep(spec, records, n_boot=0)
    assert analysis.target_auto and analysis.target == "val_acc>=0.76"
    reached = {p.batch_size: p.reached for p in analysis.groups[0].points}
    assert reached == {16: 1, 32: 1, 64: 0}


def test_per_run_numbers():
    spec = make_sweep_spec("digits-mlp", batch_sizes="16,32,64", max_steps=100)
    analysis = analyze_sweep(
        spec, [fake_record(r, reach_step=40) for r in spec.runs], target="val_acc>=0.8", n_boot=0
    )
    m = analysis.runs[0]
    assert m.steps_to_target == 40 and m.examples_to_target == 40 * 16
    assert m.epochs_to_target == pytest.approx(40 * 16 / 1000)
    assert m.seconds_to_target == pytest.approx(0.4)
    assert m.gap_acc == pytest.approx(0.99 - 0.9) and m.gap_loss == pytest.approx(0.3 - 0.1)
    assert m.grad_norm == pytest.approx(0.25) and m.sharpness == 1.0
    assert m.seconds_per_epoch == pytest.approx(1.0 / 1.6)


def test_plan_comparison_puts_measured_next_to_predicted():
    plan = known_plan(
        recommended=(128, 64, 2, 0.2, 5, 2.5, 1.5),
        efficient=(64, 64, 1, 0.1, 0, 1.6, 2.0),
        candidates=((32, 3.0, 0.01, 1.0), (64, 2.0, 0.012, 1.6), (128, 1.5, 0.015, 2.5)),
        b_simple=60.0,
    )
    spec = make_sweep_spec("digits-mlp", batch_sizes="32,64", max_steps=300, plan=plan)
    reach = {32: 200, 64: 120, 128: 90}
    records = [fake_record(r, reach_step=reach[r.batch_size]) for r in spec.runs]
    analysis = analyze_sweep(spec, records, target="val_acc>=0.8", n_boot=0)
    rows = {(r.role, r.batch_size): r for r in analysis.plan}
    rec = rows[("recommended", 128)]
    # seconds to target = step * 0.01 in the fake histories
    assert rec.measured_speedup == pytest.approx(200 / 90)
    assert rec.measured_steps_ratio == pytest.approx(200 / 90)
    assert rec.predicted_speedup == 2.5
    assert rec.predicted_steps_ratio == pytest.approx(3.0 / 1.5)
    assert rows[("reference", 32)].measured_speedup == pytest.approx(1.0)
    assert ("ladder", 64) in rows and analysis.b_simple == 60.0


def test_first_reaching_uses_the_first_evaluation_that_meets_the_target():
    spec = make_sweep_spec("digits-mlp", batch_sizes="16", max_steps=100)
    record = fake_record(spec.runs[0], reach_step=35)
    assert first_reaching(record.history, parse_target("val_acc>=0.8"))[0] == 40
    assert first_reaching(record.history, parse_target("val_loss<=0.3"))[0] == 40
    assert first_reaching(record.history, parse_target("val_acc>=0.95")) is None


def test_auto_target_suits_the_weaker_optimizer():
    spec = make_sweep_spec("dots", batch_sizes="32,64,128", optimizers="sgd,adam", max_steps=100)
    accs = {"sgd": 0.9, "adam": 0.7}
    records = [fake_record(r, reach_step=50, acc_final=accs[r.optimizer]) for r in spec.runs]
    assert str(auto_target(records)) == "val_acc>=0.66"  # floor(0.95 * 0.7 * 100) / 100


def test_a_run_that_never_learned_is_flagged():
    spec = make_sweep_spec("digits-mlp", batch_sizes="16,32", max_steps=100)
    records = [fake_record(spec.runs[0], reach_step=40), fake_record(spec.runs[1], reach_step=None)]
    analysis = analyze_sweep(spec, records, target="val_acc>=0.8", n_boot=0)
    assert [p.stalled for p in analysis.groups[0].points] == [0, 1]
    assert any("B=32 did not learn in 1 of 1 repeats" in w for w in analysis.warnings)


def test_a_target_met_at_initialization_is_left_out_of_the_fit():
    spec = make_sweep_spec("digits-mlp", batch_sizes="16,32,64,128", max_steps=100)
    reach = {16: 0, 32: 60, 64: 40, 128: 30}
    records = [fake_record(r, reach_step=reach[r.batch_size]) for r in spec.runs]
    analysis = analyze_sweep(spec, records, target="val_acc>=0.8", n_boot=0)
    (group,) = analysis.groups
    assert group.fit is not None and group.fit.batch_sizes == (32, 64, 128)
    assert "already held at initialization for B=16" in group.fit_note


def test_a_plan_is_read_once_and_its_shared_batch_trained_once(tmp_path):
    """Recommended = efficient: one run per repeat under both names; a path and the Plan
    itself give the same runs."""
    plan = known_plan(
        recommended=(64, 64, 1, 0.1, 0, 1.6, 2.0),
        efficient=(64, 64, 1, 0.1, 0, 1.6, 2.0),
        candidates=((32, 3.0, 0.01, 1.0), (64, 2.0, 0.012, 1.6)),
        b_simple=60.0,
    )
    from_file = make_sweep_spec(
        "digits-mlp", batch_sizes="32", max_steps=50, repeats=2, plan=plan.save(tmp_path / "p.json")
    )
    from_object = make_sweep_spec(
        "digits-mlp", batch_sizes="32", max_steps=50, repeats=2, plan=plan
    )
    sources = sorted(r.source for r in from_file.runs if r.repeat == 0)
    assert sources == ["ladder", "plan:recommended+efficient", "plan:reference"]
    assert from_file.runs == from_object.runs and from_file.b_simple == 60.0
    assert from_file.plan.path == str(tmp_path / "p.json") and from_object.plan.path is None
    assert SweepSpec.from_json(from_file.to_json()) == from_file  # sweep.json round trip


def test_a_plan_for_a_bigger_training_set_is_refused(tmp_path):
    plan = known_plan(
        recommended=(4096, 1024, 4, 0.1, 0, 1.6, 2.0),
        efficient=(64, 64, 1, 0.1, 0, 1.6, 2.0),
        candidates=((32, 3.0, 0.01, 1.0),),
        b_simple=60.0,
    )
    with pytest.raises(ConfigError) as info:
        make_sweep_spec("digits-mlp", batch_sizes="32", max_steps=5, plan=plan)
    assert "the plan's recommended batch 4096 is larger than the training set" in str(info.value)
