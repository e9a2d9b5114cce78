"""The plan's LR check: known answers on a quadratic whose stability bound is known.

Full-batch gradient descent on L(w) = 0.5 * mean((x.w - y)^2) has the Hessian X^T X / n;
we build X so that it is diag(4, 1, 0.5, 0.25). Along eigenvalue lam the error shrinks by
|1 - lr * lam| per step, so any lr > 2 / lam_max = 0.5 diverges, and below that the larger
lr trains the slow directions faster (Goh 2017, "Why momentum really works", sec. 1).
"""

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import batchlab.planner.measure as plan_measure
from batchlab.core.lr_choice import (
    LrCheck,
    LrTrial,
    choose,
    decide,
    next_factor,
    probe_steps,
    summarize_trial,
)
from batchlab.errors import ConfigError
from batchlab.measure.state import KeepRunEnd, RunEnd, StartFrom
from batchlab.planner import Plan, build_plan
from batchlab.planner.lr_check import apply_lr_check, probe_lr
from batchlab.task import Task

N, EIGENVALUES = 64, (4.0, 1.0, 0.5, 0.25)  # the stability bound is 2 / 4 = 0.5


def quadratic_task(model=None) -> Task:
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N, len(EIGENVALUES), generator=g))
    x = math.sqrt(N) * q * torch.tensor(EIGENVALUES).sqrt()  # X^T X / N = diag(EIGENVALUES)
    y = x @ torch.ones(len(EIGENVALUES))

    def loss(m: nn.Module, batch) -> torch.Tensor:
        xb, yb = batch
        return 0.5 * F.mse_loss(m(xb).squeeze(-1), yb)

    return Task(
        name="quadratic",
        model=model or (lambda: nn.Linear(len(EIGENVALUES), 1, bias=False)),
        train_data=TensorDataset(x, y),
        loss=loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.1,
        batch_size=8,
        epochs=1,
    )


def check_at(rule_lr: float, **kw) -> LrCheck:
    """The probe at the full batch, as the plan runs it: 2 micro-batches of 32."""
    kw = {"planned_steps": 10, **kw}
    return probe_lr(
        quadratic_task(), micro_batch_size=32, accumulation_steps=2, rule_lr=rule_lr,
        rule="linear", device="cpu", **kw,
    )  # fmt: skip


def test_hessian_of_the_synthetic_task_is_as_built():
    x, _ = quadratic_task().train_data.tensors
    assert torch.allclose(x.T @ x / N, torch.diag(torch.tensor(EIGENVALUES)), atol=1e-4)


def test_a_diverging_rule_lr_is_lowered_below_the_stability_bound():
    check = check_at(0.8)  # > 2 / lam_max = 0.5
    assert check.action == "lowered"
    assert check.chosen_lr == pytest.approx(0.4)  # the largest stable LR of the grid
    assert sorted(check.tried_lrs) == pytest.approx([0.2, 0.4, 0.8])  # x2 skipped, one step down
    x1 = next(t for t in check.trials if t.factor == 1.0)
    assert x1.outcome == "diverged" and x1.tail_loss > x1.head_loss  # x |1 - 3.2|^2 a step
    assert check.verdict.startswith("lowered from 0.8 (diverged: loss rose from")
    assert "to 0.4 (the smallest tried)" not in check.verdict and "to 0.4" in check.verdict


def test_a_stable_rule_lr_is_kept():
    check = check_at(0.3)
    assert check.action == "kept" and check.chosen_lr == pytest.approx(0.3)
    assert sorted(check.tried_lrs) == pytest.approx([0.15, 0.3, 0.6])
    outcomes = [t.outcome for t in sorted(check.trials, key=lambda t: t.lr)]
    assert outcomes == ["trained", "trained", "diverged"]
    assert check.verdict.startswith("kept the rule's 0.3")


def test_a_larger_lr_is_taken_only_when_clearly_better_and_searched_further_up():
    check = check_at(0.05)  # far below the bound 0.5: each doubling trains the slow
    # directions faster, so the walk goes up while the largest LR tried wins clearly:
    # x2, x4, x8 (MAX_STEPS_UP = 2 doublings past x2), the largest stable LR of the grid.
    assert check.action == "raised" and check.chosen_lr == pytest.approx(0.4)
    assert sorted(check.tried_lrs) == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.4])


def test_nonfinite_losses_count_as_diverged_and_nothing_trained_is_said():
    check = check_at(1e6, max_steps_down=1, steps=8)
    assert all(t.tail_loss is None and t.diverged_step is not None for t in check.trials)
    assert sorted(check.tried_lrs) == pytest.approx([2.5e5, 5e5, 1e6])
    assert check.action == "none-trained" and check.chosen_lr == pytest.approx(2.5e5)
    assert check.verdict.startswith("every probed LR diverged")


def test_budget_is_respected_and_stated():
    check = check_at(0.3, planned_steps=10)
    assert check.steps_per_lr == probe_steps(10) == 40  # the floor on a short run
    assert all(t.steps == 40 and t.examples == 40 * N for t in check.trials)
    assert check.examples == len(check.trials) * 40 * N
    assert check.reference_examples == N  # one epoch of 64
    assert check.fraction_of_reference == pytest.approx(check.examples / N)
    assert check.warmup_steps == 0 and check.tail_steps == 10
    assert check.started_from == "initialisation" and "40 steps from initialisation" in (
        check.summary
    )
    assert probe_steps(100_000) == 250  # 0.25% of a long run per LR (past 16,000 steps)
    assert check_at(0.3, steps=6).steps_per_lr == 6
    with pytest.raises(ConfigError, match="at least 4 probe steps") as err:
        check_at(0.3, steps=3)
    assert err.value.param == "steps"


def test_the_probe_leaves_no_trace():
    """Global RNGs are untouched; a factory that hands out one live model gets it back."""
    net = nn.Linear(len(EIGENVALUES), 1, bias=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    check = probe_lr(
        quadratic_task(model=lambda: net), micro_batch_size=64, accumulation_steps=1,
        rule_lr=0.3, rule="linear", planned_steps=10, device="cpu",
    )  # fmt: skip
    assert len(check.trials) == 3  # the probes did train `net`
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == py_rng
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_rng, strict=True))


def heavy_ball_losses(w0, buffer, lr, steps, momentum=0.9):
    """The loss before each of `steps` full-batch heavy-ball steps on the quadratic from
    weights `w0` and momentum buffer `buffer`, in float64 (PyTorch's SGD: b <- mu b + g,
    w <- w - lr b)."""
    x, y = (t.double() for t in quadratic_task().train_data.tensors)
    w, b, out = w0.double().reshape(-1), buffer.double().reshape(-1), []
    for _ in range(steps):
        r = x @ w - y
        out.append(float(0.5 * (r**2).mean()))
        b = momentum * b + x.T @ r / N
        w = w - lr * b
    return out


def test_probes_continue_from_the_given_weights_and_optimizer_state():
    """Every probed LR starts from the same `RunEnd`: its weights and its momentum buffer.

    Full-batch steps make each probe's loss log exact: it must follow heavy ball from
    (w0, buffer), which a start from initialisation, a fresh buffer, or a buffer that one
    probe left changed for the next would all miss."""
    task = dataclasses.replace(
        quadratic_task(), optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)
    )
    w0, buffer = torch.tensor([[2.0, -1.0, 0.5, 3.0]]), torch.tensor([[0.3, -0.2, 0.1, 0.4]])
    end = RunEnd({"weight": w0.clone()}, {0: {"momentum_buffer": buffer.clone()}}, 9, 8)
    check = probe_lr(
        task, micro_batch_size=32, accumulation_steps=2, rule_lr=0.05, rule="linear",
        planned_steps=10, steps=8, device="cpu", start=end,
    )  # fmt: skip
    assert len(check.trials) >= 3
    for t in check.trials:
        losses = heavy_ball_losses(w0, buffer, t.lr, 8)
        assert t.head_loss == pytest.approx(sum(losses[:2]) / 2, rel=1e-4)
        assert t.tail_loss == pytest.approx(sum(losses[-2:]) / 2, rel=1e-4)
    assert check.started_from == "where the noise phase ended (step 9 at B=8)"
    assert "8 steps from where the noise phase ended (step 9 at B=8)" in check.summary
    assert torch.equal(end.weights["weight"], w0)  # the start is left as it was
    assert torch.equal(end.optimizer_state[0]["momentum_buffer"], buffer)


def test_the_run_end_is_kept_and_a_run_started_from_it_continues_there():
    from batchlab.train import train

    task = quadratic_task()
    kept = KeepRunEnd()
    first = train(task, 64, 0.1, max_steps=5, device="cpu", callbacks=[kept])
    end = kept.end
    assert (end.step, end.batch_size) == (5, 64) and end.optimizer_state == {}  # plain SGD
    x, y = task.train_data.tensors
    at_end = float(0.5 * ((x @ end.weights["weight"].reshape(-1) - y) ** 2).mean())
    assert first.train_loss[-1] > at_end  # the loss before step 5; the end is after it
    again = train(task, 64, 0.1, max_steps=1, device="cpu", seed=3, callbacks=[StartFrom(end)])
    assert again.train_loss[0] == pytest.approx(at_end, rel=1e-5)


def test_the_check_probes_from_the_start_it_is_given(monkeypatch):
    import batchlab.planner.lr_check as lr_check

    plan, end, seen = _plan(), object(), {}

    def probe(task, **kw):
        seen.update(kw)
        return _lowered(plan)

    monkeypatch.setattr(lr_check, "probe_lr", probe)
    checked = lr_check.check_recommended_lr(quadratic_task(), plan, "cpu", start=end)
    assert seen["start"] is end and checked.lr_check == _lowered(plan)


def test_the_plans_noise_phase_hands_its_end_to_the_lr_check(monkeypatch):
    """`plan` measures the noise phase with a `KeepRunEnd` and passes that end on."""
    from batchlab.measure.probe import ProbeSettings

    monkeypatch.setattr(plan_measure, "run_probe", lambda *a, **k: None)
    task = quadratic_task()
    busy = {phase: [] for phase in plan_measure.BUSY_PHASES}
    measured = plan_measure._measure(
        task, ProbeSettings(device="cpu"), noise_steps=4, target=None, progress=None, busy=busy
    )
    end = measured["end"]
    assert isinstance(end, RunEnd) and end.step == measured["noise"].steps == 4
    assert end.batch_size == task.batch_size and set(end.weights) == {"weight"}


def trial(factor, loss, se=0.001, head=2.0, spread=0.1):
    return LrTrial(0.1 * factor, factor, head, (head - spread, head + spread), loss, se, 10, 100)


def test_choice_keeps_the_rule_within_the_noise_and_lowers_when_clearly_worse():
    noisy = [trial(1.0, 1.0, se=0.1), trial(0.5, 0.9, se=0.1)]
    assert choose(noisy).factor == 1.0  # 0.1 apart, within 2 * sqrt(2) * 0.1
    assert next_factor(noisy) == 2.0  # x1 is the choice, so x2 is worth a try
    clear = [trial(1.0, 1.0), trial(0.5, 0.9)]
    assert choose(clear).factor == 0.5
    assert next_factor(clear) == 0.25  # the choice sits at the small edge: one step down
    lower = [*clear, trial(0.25, 0.895)]  # within 2% of 0.895: keep the one nearer the rule
    assert choose(lower).factor == 0.5 and next_factor(lower) is None
    lr, action, verdict = decide(lower, 0.1)
    assert (lr, action) == (pytest.approx(0.05), "lowered")
    assert verdict == "lowered from 0.1 (clearly higher loss, 1) to 0.05 (tried 0.025, 0.05, 0.1)"


def test_a_blow_up_inside_the_first_window_counts_as_diverged():
    """From a trained start (loss 0.3) the rule's LR jumps to chance (2.3) within the first
    window, so that window's range holds the tail: the rise above the first step's loss,
    not the range, says it diverged; the same log from a plateau at chance is `stalled`."""
    blew_up = summarize_trial(1.0, 0.64, [0.3, 2.4, 2.3, 2.3, 2.31, 2.3, 2.3, 2.31], steps=8,
                              examples=8, tail_steps=2)  # fmt: skip
    assert blew_up.head_range == (0.3, 2.4) and blew_up.tail_loss == pytest.approx(2.305)
    assert blew_up.start_loss == 0.3 and blew_up.outcome == "diverged"
    plateau = summarize_trial(1.0, 0.64, [2.3, 2.4, 2.3, 2.3, 2.31, 2.3, 2.3, 2.31], steps=8,
                              examples=8, tail_steps=2)  # fmt: skip
    assert plateau.outcome == "stalled"
    smaller = summarize_trial(0.5, 0.64, [0.3, 0.29, 0.28, 0.27, 0.26, 0.25, 0.24, 0.23],
                              steps=8, examples=8, tail_steps=2)  # fmt: skip
    lr, action, verdict = decide([blew_up, smaller], 0.64)
    assert (lr, action) == (pytest.approx(0.32), "lowered")
    assert verdict.startswith("lowered from 0.64 (diverged: loss rose from 0.3 to 2.3)")
    assert next_factor([blew_up]) == 0.5  # every LR tried diverged: look lower


def test_a_short_probe_that_moves_nothing_keeps_the_rule_and_says_so():
    """Tiny batches, few steps: no LR changes the loss beyond its noise; lowering would be
    a guess, so the rule's LR stays, marked unverified."""
    flat = [trial(1.0, 2.0, se=0.05), trial(0.5, 2.05, se=0.05)]
    assert {t.outcome for t in flat} == {"stalled"} and next_factor(flat) is None
    lr, action, verdict = decide(flat, 0.1)
    assert (lr, action) == (0.1, "kept") and "unverified" in verdict
    blew_up = [trial(1.0, 3.0), *flat[1:]]  # x1 diverged, x0.5 stalled: the largest calm one
    assert next_factor(blew_up) is None
    assert decide(blew_up, 0.1)[:2] == (pytest.approx(0.05), "lowered")


def test_lr_check_json_round_trip_keeps_diverged_losses():
    check = check_at(0.8, steps=6)
    with_none = dataclasses.replace(
        check, trials=(*check.trials, LrTrial(1.6, 2.0, 2.0, (1.5, 2.5), None, None, 3, 192, 3))
    )
    assert LrCheck.from_json(with_none.to_json()) == with_none


def _plan() -> Plan:
    from test_plan_model import measurements

    return build_plan(measurements(), b_simple=300.0)


def _lowered(plan: Plan) -> LrCheck:
    rec = plan.recommended
    trials = (trial(1.0, 2.5, head=2.3), trial(0.5, 1.0, head=2.3), trial(0.25, 1.2, head=2.3))
    trials = tuple(dataclasses.replace(t, lr=rec.lr * t.factor) for t in trials)
    lr, action, verdict = decide(trials, rec.lr)
    return LrCheck(
        rec.batch_size, rec.micro_batch_size, rec.accumulation_steps, rec.lr_rule, rec.lr, lr,
        action, verdict, trials, 20, 5, 5, 3 * 20 * rec.batch_size, 10 * 100_000,
    )  # fmt: skip


def test_the_plan_recommends_the_checked_lr_with_its_reason():
    plan = _plan()
    check = _lowered(plan)
    checked = apply_lr_check(plan, check)
    assert checked.lr_check == check and check.action == "lowered"
    assert checked.recommended.lr == pytest.approx(plan.recommended.lr / 2)
    assert checked.recommended.reasons["lr_check"] == check.summary
    assert "diverged: loss rose" in check.summary and "of the reference training" in check.summary
    # The warm-up follows the checked LR: 16x the reference -> 5% of 1954 planned steps.
    assert checked.recommended.warmup_steps == math.ceil(0.05 * 10 * math.ceil(100_000 / 512))
    assert Plan.from_json(checked.to_json()) == checked
    kept = dataclasses.replace(check, chosen_lr=plan.recommended.lr, action="kept")
    assert apply_lr_check(plan, kept).recommended.lr == plan.recommended.lr


def test_a_plan_saved_before_the_lr_check_still_loads(tmp_path):
    data = _plan().to_dict()
    del data["lr_check"]
    path = tmp_path / "old.json"
    path.write_text(Plan.from_dict(data).to_json())
    assert "lr_check" in path.read_text()  # written anew; now strip it as an old file would be
    path.write_text(__import__("json").dumps(data))
    assert Plan.load(path).lr_check is None


def test_plan_runs_the_check_unless_told_not_to(monkeypatch):
    from test_plan_model import measurements

    calls, end = [], object()
    measured = {"probe": None, "noise": None, "end": end}
    monkeypatch.setattr(plan_measure, "_measure", lambda *a, **k: measured)
    monkeypatch.setattr(plan_measure, "measurements_from", lambda *a: measurements())
    monkeypatch.setattr(
        plan_measure,
        "check_recommended_lr",
        lambda task, plan, *a, **k: calls.append((plan, k["start"])) or plan,
    )
    task = quadratic_task()
    # a 64-example task: the whole training may go to the (faked) noise phase
    # force: the synthetic noise phase's loss is flat, which `plan` would refuse
    assert plan_measure.plan(task, check_lr=False, noise_budget=1.0, force=True).lr_check is None
    assert not calls
    plan_measure.plan(task, noise_budget=1.0, force=True)
    assert len(calls) == 1 and calls[0][1] is end  # the probes start where the noise phase ended


def test_cli_flag_line_and_report_table(monkeypatch, capsys, tmp_path):
    from batchlab.cli import main
    from batchlab.report.plan_report import plan_page

    plan = _plan()
    where = "where the noise phase ended (step 5 at B=32)"
    checked = apply_lr_check(plan, dataclasses.replace(_lowered(plan), started_from=where))
    seen = {}
    monkeypatch.setattr(
        "batchlab.cli.plan_cmd.make_plan", lambda *a, **k: seen.update(k) or checked
    )
    assert main(["plan", "digits-mlp", "--no-lr-check"]) == 0
    assert seen["check_lr"] is False
    assert main(["plan", "digits-mlp"]) == 0 and seen["check_lr"] is True
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"LR check at B={checked.lr_check.batch_size}: lowered from" in out
    assert f"20 steps from {where}" in out
    html = plan_page(checked).render()
    assert f"at B={checked.lr_check.batch_size} (1 x 512) from {where}" in html
    assert "Learning-rate check" in html and html.count("<tr") >= 3 + len(plan.candidates)
    assert "diverged" in html and "chosen" in html
    assert "Learning-rate check" not in plan_page(plan).render()


def test_ctrl_c_during_the_check_keeps_what_was_measured(monkeypatch):
    from test_plan_model import measurements

    measured = {"probe": None, "noise": "noise run", "end": None}
    monkeypatch.setattr(plan_measure, "_measure", lambda *a, **k: measured)
    monkeypatch.setattr(plan_measure, "measurements_from", lambda *a: measurements())

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_measure, "check_recommended_lr", interrupted)
    with pytest.raises(plan_measure.PlanInterrupted) as info:
        plan_measure.plan(quadratic_task(), noise_budget=1.0, force=True)
    assert info.value.phase == "the LR check" and info.value.measured == measured
