"""One model of each idea: planner, sweep and adaptive controller agree, via batchlab.core.

For every optimizer class in `torch.optim`, the three give the same family and the same
LR rule; for a grid of batches and memory caps, the same split. Then known answers for the
shared split and step-time model.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_task
from test_plan_model import measurements

from batchlab.adaptive import AdaptiveBatchSize, ThroughputModel
from batchlab.core.batching import split
from batchlab.core.lr import (
    ADAPTIVE_LR_RULES,
    LR_RULES,
    PLAN_LR_RULES,
    SWEEP_LR_RULES,
    TRAIN_LR_RULES,
    adascale_gain,
    efficiency,
    lr_from_gain,
    scale_lr,
)
from batchlab.core.optim import (
    DEFAULT_LR_RULES,
    OPTIMIZER_FAMILIES,
    default_lr_rule,
    optimizer_family,
)
from batchlab.core.step_time import StepTimeModel, fit_step_time
from batchlab.errors import ConfigError
from batchlab.measure.throughput import plan_accumulation
from batchlab.planner import build_plan
from batchlab.planner.measure import _task_optimizer
from batchlab.planner.timing import step_seconds
from batchlab.sweep.build import make_sweep_spec
from batchlab.sweep.spec import task_optimizer_family


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


# Every optimizer torch ships: its namespace and every subclass loaded by now (a class a
# later torch adds must get a row in the family table, or this list grows and fails).
TORCH_OPTIMIZERS = sorted(
    {
        obj
        for obj in vars(torch.optim).values()
        if isinstance(obj, type)
        and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
    }
    | {c for c in _subclasses(torch.optim.Optimizer) if c.__module__.startswith("torch.optim")},
    key=lambda c: c.__name__,
)
RULE_FAMILY = {"linear": "sgd", "sqrt": "adam", "adascale": "sgd", "sqrt-adascale": "adam"}


def _task_for(cls: type):
    def make(params, lr):
        params = list(params)
        if cls.__name__ == "Muon":  # Muon takes matrices only
            params = [p for p in params if p.ndim == 2]
        return cls(params, lr=lr)

    return tiny_task(64, optimizer=make)


class _Mystery(torch.optim.Optimizer):
    """An optimizer no table knows: no known name or base class, no `betas`."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})


def test_torch_ships_the_optimizers_we_expect():
    names = {c.__name__ for c in TORCH_OPTIMIZERS}
    assert {"SGD", "Adam", "AdamW", "LBFGS", "Rprop", "Adafactor"} <= names


@pytest.mark.parametrize("cls", TORCH_OPTIMIZERS, ids=lambda c: c.__name__)
def test_planner_sweep_and_controller_agree_on_family_and_rule(cls):
    assert cls.__name__ in OPTIMIZER_FAMILIES, f"add {cls.__name__} to the family table"
    family = OPTIMIZER_FAMILIES[cls.__name__]
    task = _task_for(cls)

    # Planner: from the saved name (build_plan) and from the instance (plan()).
    plan = build_plan(measurements(optimizer=cls.__name__), b_simple=300.0)
    planner_rule = plan.recommended.lr_rule
    assert default_lr_rule(_task_optimizer(task)) == planner_rule
    # Sweep: the task's family and the auto rule of its runs.
    spec = make_sweep_spec(task, batch_sizes="8,32", max_steps=5, sharpness="none")
    sweep_rules = {run.lr_rule for run in spec.runs}
    # Controller: from the class and from the instance.
    by_class = AdaptiveBatchSize(8, 0.1, optimizer=cls).lr_rule
    by_instance = AdaptiveBatchSize(8, 0.1, optimizer=_task_optimizer(task)).lr_rule

    assert RULE_FAMILY[planner_rule] == family
    assert task_optimizer_family(task) == spec.task_optimizer_family == family
    assert sweep_rules == {planner_rule} == {DEFAULT_LR_RULES[family]["fixed"]}
    assert by_class == by_instance == DEFAULT_LR_RULES[family]["adaptive"]
    assert RULE_FAMILY[by_class] == family


@pytest.mark.parametrize("cap", [None, 1, 7, 64, 512])
@pytest.mark.parametrize("batch", [1, 8, 33, 100, 512, 1000, 2048, 4097])
def test_planner_probe_and_controller_split_alike(batch, cap):
    expected = split(batch, cap)
    m = measurements(max_batch=cap or 10**6)
    assert step_seconds(m, batch)[:2] == expected
    plan = plan_accumulation(batch, cap or 10**6)
    assert (plan.micro_batch_size, plan.accumulation_steps) == expected
    c = AdaptiveBatchSize(1, 0.1, optimizer="SGD", max_micro_batch_size=cap, max_batch_size=8192)
    assert c._split(batch) == expected


@pytest.mark.parametrize(
    "batch, cap, world, fixed, expected",
    [
        (2048, 512, 1, {}, (512, 4)),
        (1000, 512, 1, {}, (500, 2)),  # even micro-batches, not 512 + 488
        (1001, 300, 1, {}, (251, 4)),
        (200, 300, 1, {}, (200, 1)),
        (33, None, 2, {}, (17, 1)),  # each replica rounds up
        (1000, 64, 4, {}, (63, 4)),
        (100, 40, 1, {"fixed_micro": 16}, (16, 7)),  # the cap does not apply
        (100, 40, 1, {"fixed_accumulation": 3}, (34, 3)),
    ],
)
def test_split_known_answers(batch, cap, world, fixed, expected):
    assert split(batch, cap, world, **fixed) == expected


def test_split_rejects_nonsense():
    with pytest.raises(ConfigError, match="fixed_micro and fixed_accumulation"):
        split(64, None, fixed_micro=8, fixed_accumulation=2)
    with pytest.raises(ConfigError, match="cap: expected a positive integer, got 0"):
        split(64, 0)


# ------------------------------------------------------------------ optimizer families
def test_lamb_is_adam_like_and_lars_sgd_like_everywhere():
    assert optimizer_family("LAMB") == optimizer_family("Lamb") == "adam"
    assert optimizer_family("LARS") == "sgd"
    assert build_plan(measurements(optimizer="LAMB"), b_simple=300.0).recommended.lr_rule == "sqrt"
    assert AdaptiveBatchSize(8, 0.1, optimizer="LAMB").lr_rule == "sqrt-adascale"


def test_family_unwraps_wrappers_and_reads_base_classes_and_betas():
    params = [torch.zeros(2, requires_grad=True)]

    class Wrapper:  # Accelerate/Lightning keep the real optimizer in `.optimizer`
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert optimizer_family(Wrapper(Wrapper(torch.optim.Adam(params)))) == "adam"

    class MySGD(torch.optim.SGD):  # an unknown name, a known base class
        pass

    assert optimizer_family(MySGD) == optimizer_family(MySGD(params, lr=0.1)) == "sgd"

    class Betas(torch.optim.Optimizer):  # unknown, but Adam's `betas` signature
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999)):
            super().__init__(params, {"lr": lr, "betas": betas})

    assert optimizer_family(Betas) == optimizer_family(Betas(params)) == "adam"


def test_unknown_optimizer_error_names_lr_rule_for_each_context():
    class Mystery(torch.optim.Optimizer):
        pass

    with pytest.raises(ConfigError) as fixed:
        default_lr_rule(Mystery)
    with pytest.raises(ConfigError) as adaptive:
        default_lr_rule("Mystery", adaptive=True)
    assert "got Mystery" in str(fixed.value) and "lr_rule='linear'" in str(fixed.value)
    assert "lr_rule='adascale'" in str(adaptive.value)
    assert "lr_rule='sqrt-adascale'" in str(adaptive.value)


def test_unknown_optimizer_in_a_sweep_needs_a_rule_only_for_auto():
    task = tiny_task(64, optimizer=lambda params, lr: _Mystery(params, lr))
    with pytest.raises(ConfigError, match="got _Mystery; pass lr_rule='linear'"):
        make_sweep_spec(task, batch_sizes="8", max_steps=5, sharpness="none")
    spec = make_sweep_spec(task, batch_sizes="8,32", max_steps=5, sharpness="none", lr_rule="none")
    assert spec.task_optimizer_family == "sgd" and {r.lr for r in spec.runs} == {0.1}


# ------------------------------------------------------------------ LR vocabulary
def test_every_context_uses_the_one_vocabulary():
    for rules in (TRAIN_LR_RULES, PLAN_LR_RULES, SWEEP_LR_RULES, ADAPTIVE_LR_RULES):
        assert set(rules) <= set(LR_RULES)
    used = {r for family in DEFAULT_LR_RULES.values() for r in family.values()}
    assert used <= set(LR_RULES)
    with pytest.raises(ConfigError, match="lr_rule: expected one of"):
        scale_lr(0.1, 32, 64, "cubic")


@pytest.mark.parametrize("rule", ["adascale", "sqrt-adascale", "none"])
def test_controller_lr_is_the_core_rule(rule):
    c = AdaptiveBatchSize(32, 0.1, lr_rule=rule)
    for batch in (32, 100, 1024):
        expected = lr_from_gain(0.1, adascale_gain(batch, 32, 200.0), rule)
        if rule != "sqrt-adascale":  # the fixed-batch formula gives the same LR
            assert scale_lr(0.1, 32, batch, rule, b_simple=200.0) == pytest.approx(expected)
        assert c.lr_for(batch, 200.0) == pytest.approx(expected)
        assert c.gain(batch, 200.0) == pytest.approx(adascale_gain(batch, 32, 200.0))
        assert c.efficiency(batch, 200.0) == pytest.approx(efficiency(batch, 32, 200.0))
    assert lr_from_gain(0.1, 4.0, "sqrt-adascale") == pytest.approx(0.2)


# ------------------------------------------------------------------ step-time model
def test_fit_recovers_alpha_beta_gamma_from_step_times():
    alpha, beta, gamma = 0.01, 2e-4, 0.05
    points = [(m, k, k * (alpha + beta * m) + gamma) for m in (16, 32, 64, 128) for k in (1, 2, 4)]
    model = fit_step_time(points)
    assert model.gamma == pytest.approx(gamma)
    assert model.alpha == pytest.approx(alpha) and model.beta == pytest.approx(beta)
    for m, k, seconds in points:
        assert model.step_seconds(m, k) == pytest.approx(seconds)
    # One accumulation count everywhere: gamma cannot be told apart, so it is folded in.
    flat = fit_step_time([(m, 1, alpha + beta * m + gamma) for m in (16, 32, 64)])
    assert flat.gamma == 0.0
    assert flat.step_seconds(32) == pytest.approx(alpha + beta * 32 + gamma)


def test_isotonic_fit_pools_a_dip():
    model = fit_step_time([(8, 1, 0.001), (16, 1, 0.004), (32, 1, 0.001), (64, 1, 0.008)])
    assert model.micro_seconds_fitted == pytest.approx((0.001, 0.002, 0.002, 0.008))
    assert all(
        a <= b
        for a, b in zip(model.micro_seconds_fitted, model.micro_seconds_fitted[1:], strict=False)
    )
    assert model.step_seconds(24) == pytest.approx(0.002)  # flat between pooled points


def test_extrapolation_rules():
    points = [(8, 1, 0.001), (32, 1, 0.002), (128, 1, 0.008)]
    model = fit_step_time(points)  # conservative
    assert model.step_seconds(16) == pytest.approx(0.001 * 2**0.5)  # log-log between points
    assert model.step_seconds(512) == pytest.approx(0.032)  # throughput constant above
    assert model.step_seconds(2) == pytest.approx(0.001)  # no faster below
    line = fit_step_time(points, extrapolation="line")
    assert line.step_seconds(16) == model.step_seconds(16)  # same model between points
    assert line.step_seconds(256) == pytest.approx(0.008 + line.beta * 128)
    assert line.step_seconds(256) < model.step_seconds(256)
    assert line.step_seconds(4) == pytest.approx(max(line.alpha, 0.001 - line.beta * 4))
    with pytest.raises(ConfigError, match="extrapolation: expected one of"):
        fit_step_time(points, extrapolation="cubic")


def test_planner_and_controller_read_the_same_model():
    """Same timings in: the planner's step time and the controller's agree where measured."""
    times = {16: 0.004, 32: 0.006, 64: 0.011}
    m = measurements(ladder=tuple(times), step_s=times.__getitem__, max_batch=64)
    collector = ThroughputModel()
    for b, seconds in times.items():
        collector.observe_micro(b, seconds)
    collector.observe_optimizer(0.0)
    fit = collector.fit()
    assert isinstance(fit, StepTimeModel)
    for b in (16, 24, 32, 48, 64, 128):
        micro, accum, planned = step_seconds(m, b)
        assert fit.step_seconds(micro, accum) == pytest.approx(planned)
    assert math.isclose(
        fit.micro_seconds(24),
        fit_step_time(list(zip(times, [1] * 3, times.values(), strict=True))).micro_seconds(24),
    )
