"""The plan's batch-size schedule: B(t) rising with the predicted B_noise(t).

`recommend_schedule(plan)` follows the plan's loss path (`planner.noise_path`), stretch by
stretch, with the plan's own models: the fitted B_noise(L) trajectory, the shared step-time
model through the measured points (the throughput ladder and the head-to-head timing) (memory-clamped: a batch above the memory max
runs as micro-batches with accumulation, `core.batching.split`) and eq. 2.11 of McCandlish
et al. 2018. In each stretch it picks, among the plan's trusted candidate batches (the
same ones the fixed recommendation chooses from), the batch that minimises
(1 + B_noise/B) t(B) (`core.schedule.rising_batches`), never lower than before; equal
neighbours merge into phases. A rising schedule is kept only when it is predicted clearly
faster than the best fixed batch; otherwise the schedule is the fixed recommendation.

Each phase's LR is coupled to its batch: by default with the plan's fixed-batch rule
(linear for SGD-like, sqrt for Adam-like optimizers) times the LR check's correction;
`lr_coupling="adascale"` uses the AdaScale gain r = (B/B0) E(B) at the phase's B_noise
(Johnson et al. 2020), sqrt(r) for Adam-like ones (`core.lr.lr_from_gain`). On the
built-in tasks the AdaScale LR was 1.2-1.5x slower to the target
(benchmarks/results/schedule_vs_fixed.md): B_simple underestimates the critical batch, so
the gain r comes out too small.

Phases start at examples seen (predicted), which do not depend on the batch the way
steps do. The predicted gain over the best fixed batch comes with the range it takes over
the B_noise fit's confidence region (`NoiseTrajectory.ellipse`), with both choices held.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

from batchlab.core.lr import adascale_gain, check_lr_rule, lr_from_gain, scale_lr
from batchlab.core.optim import default_lr_rule
from batchlab.core.schedule import (
    BatchSchedule,
    ScheduleForecast,
    SchedulePhase,
    path_cost,
    rising_batches,
)
from batchlab.core.trajectory import (
    NoiseTrajectory,
    min_steps_along_path,
    path_critical_batch,
)
from batchlab.planner.decide import untrusted_reason
from batchlab.planner.plan_types import Candidate, Plan

LR_COUPLINGS = {
    "rule": "the plan's fixed-batch lr rule at the phase's batch, times the LR check's "
    "correction (what the fixed recommendation would use there)",
    "adascale": "lr0 x the AdaScale gain r (SGD-like) or sqrt(r) (Adam-like) at the phase's "
    "B_noise (Johnson et al. 2020)",
}


MIN_GAIN = 1.05  # a rising schedule must be predicted at least this much faster
LADDER_STEP = 1.25  # neighbouring batches of a schedule differ at least this much


def with_schedule(plan: Plan, *, lr_coupling: str = "rule") -> Plan:
    """`plan` with its `schedule` filled in (None when the plan has no fitted trajectory,
    e.g. a B_simple given by hand)."""
    return dataclasses.replace(plan, schedule=recommend_schedule(plan, lr_coupling=lr_coupling))


def schedule_ladder(plan: Plan) -> dict[int, Candidate]:
    """The candidates the fixed recommendation may pick (B0 always), by batch size, thinned
    so that no two are within `LADDER_STEP` of each other (B0 kept first): a phase change
    must be worth its switch, not a step from 98 to 100."""
    m, b0 = plan.measurements, plan.measurements.reference_batch_size
    trusted = {
        c.batch_size: c
        for c in plan.candidates
        if c.batch_size == b0 or untrusted_reason(m, c) is None
    }
    kept = [b0] if b0 in trusted else []
    for b in sorted(trusted):
        if all(max(b, k) / min(b, k) >= LADDER_STEP for k in kept):
            kept.append(b)
    return {b: trusted[b] for b in sorted(kept)}


def _path(plan: Plan, trajectory: NoiseTrajectory) -> tuple[list[float], list[float]]:
    """(dS_min, B_noise) of each stretch of the plan's loss path under `trajectory`."""
    outlook, m = plan.noise_outlook, plan.measurements
    assert outlook is not None
    measured_at = m.noise_batch_size or m.reference_batch_size
    losses = outlook.path_losses
    d = min_steps_along_path(trajectory, losses, outlook.path_steps, measured_at)
    return d, [trajectory.b_noise(loss) for loss in losses]


def recommend_schedule(
    plan: Plan, *, lr_coupling: str = "rule", min_gain: float | None = MIN_GAIN
) -> ScheduleForecast | None:
    """The fastest rising schedule along the plan's path, its LRs and its predictions.

    A rising schedule is kept only when its predicted gain over the best fixed batch is at
    least `MIN_GAIN` and its interval excludes no gain; otherwise the schedule is the
    plan's fixed recommendation as one phase (a switch that buys nothing is a risk: each
    new batch needs its LR to be right).

    lr_coupling: `rule` (the default: the plan's fixed-batch rule at each phase's batch,
        times the LR check's correction) or `adascale` (the AdaScale gain at the phase's
        B_noise). `rule` is the default because it was measured faster
        (benchmarks/results/schedule_vs_fixed.md: the AdaScale LR is lower, as B_simple
        underestimates the critical batch).
    min_gain: the predicted gain a rising schedule needs; None keeps it whatever it gains.
    """
    check_lr_rule(lr_coupling, tuple(LR_COUPLINGS), what="`lr_coupling`")
    outlook, m = plan.noise_outlook, plan.measurements
    ladder = schedule_ladder(plan)
    if outlook is None or not ladder:
        return None
    seconds = lambda b: ladder[int(b)].step_s  # noqa: E731
    sizes = sorted(ladder)
    d, b_noises = _path(plan, outlook.trajectory)
    fixed = {b: path_cost([b] * len(d), d, b_noises, seconds).seconds for b in sizes}
    best_fixed = min(fixed, key=lambda b: (fixed[b], b))
    batches = rising_batches(b_noises, sizes, seconds)
    gain = fixed[best_fixed] / path_cost(batches, d, b_noises, seconds).seconds
    interval = _gain_interval(plan, batches, best_fixed, seconds)
    clear = gain >= (min_gain or 0) and (interval is None or interval[0] > 1.0)
    rising = min_gain is None or clear
    if not rising:
        keep = plan.recommended.batch_size
        batches = [keep if keep in ladder else best_fixed] * len(d)
    cost = path_cost(batches, d, b_noises, seconds)
    rule = (
        default_lr_rule(m.optimizer, adaptive=True)
        if lr_coupling == "adascale"
        else plan.recommended.lr_rule
    )
    phases, starts, phase_noise = _phases(plan, batches, d, b_noises, cost.stretch_steps, rule)
    path = " -> ".join(str(p.batch_size) for p in phases)
    span = f" (interval {interval[0]:.2f}-{interval[1]:.2f}x)" if interval else ""
    why = (
        f"B {path}: in each stretch of the loss path to {outlook.target_loss:.3g} the "
        f"candidate with the least (1 + B_noise/B) t(B) (McCandlish et al. 2018 eq. 2.11), "
        f"never lower than before; B_noise {b_noises[0]:.0f} -> {b_noises[-1]:.0f}"
        if rising
        else f"one phase, the fixed recommendation B={batches[0]}: a rising schedule is "
        f"predicted only {gain:.2f}x faster than the best fixed batch{span}, not a clear "
        f"gain (>= {MIN_GAIN:.2f}x, interval above 1)"
    )
    final_gain = fixed[best_fixed] / cost.seconds
    return ScheduleForecast(
        schedule=BatchSchedule(tuple(phases), unit="examples"),
        phase_steps=tuple(starts),
        phase_b_noise=tuple(phase_noise),
        predicted_seconds=cost.seconds,
        predicted_steps=cost.steps,
        predicted_examples=cost.examples,
        best_fixed_batch_size=best_fixed,
        best_fixed_seconds=fixed[best_fixed],
        predicted_gain=final_gain,
        predicted_gain_interval=interval if rising else None,
        lr_rule=rule,
        path_steps=tuple(itertools.accumulate(cost.stretch_steps)),
        path_b_noise=tuple(b_noises),
        path_batches=tuple(batches),
        reasons={
            "batch": why,
            "lr": f"{rule}: {LR_COUPLINGS[lr_coupling]}",
            "gain": (
                f"predicted {final_gain:.2f}x faster than the best fixed batch B={best_fixed} "
                f"({fixed[best_fixed]:.3g} s vs {cost.seconds:.3g} s to the path's end)"
            ),
        },
    )


def _lr_check_factor(plan: Plan) -> float:
    """The LR check's correction of the rule's LR at the recommended batch (1: none)."""
    check = plan.lr_check
    if check is None or not check.rule_lr > 0 or not check.chosen_lr > 0:
        return 1.0
    return check.chosen_lr / check.rule_lr


def _phases(
    plan: Plan,
    batches: Sequence[int],
    min_steps: Sequence[float],
    b_noises: Sequence[float],
    stretch_steps: Sequence[float],
    rule: str,
) -> tuple[list[SchedulePhase], list[float], list[float]]:
    """Equal neighbouring stretches merged into phases: each phase's start (examples and
    predicted steps), batch, micro-batch x accumulation, B_noise and coupled LR."""
    m, ladder = plan.measurements, schedule_ladder(plan)
    b0, lr0 = m.reference_batch_size, m.reference_lr
    phases: list[SchedulePhase] = []
    starts: list[float] = []
    noise: list[float] = []
    examples = steps = 0.0
    i = 0
    while i < len(batches):
        j = i
        while j + 1 < len(batches) and batches[j + 1] == batches[i]:
            j += 1
        b = batches[i]
        bn = path_critical_batch(min_steps[i : j + 1], b_noises[i : j + 1])
        start = round(examples)
        if not phases or start > phases[-1].start:
            c = ladder[b]
            if rule in ("adascale", "sqrt-adascale"):
                lr = lr_from_gain(lr0, adascale_gain(b, b0, bn), rule)
            else:  # the fixed rule (`adascale` as a fixed rule uses the path's B_bar)
                lr = scale_lr(lr0, b0, b, rule, b_simple=plan.b_simple) * _lr_check_factor(plan)
            phases.append(SchedulePhase(start, b, c.micro_batch_size, c.accumulation_steps, lr))
            starts.append(steps)
            noise.append(bn)
        for k in range(i, j + 1):
            steps += stretch_steps[k]
            examples += stretch_steps[k] * batches[k]
        i = j + 1
    return phases, starts, noise


def _gain_interval(
    plan: Plan, batches: Sequence[int], best_fixed: int, seconds: object
) -> tuple[float, float] | None:
    """The gain's range over the B_noise fit's confidence region, both choices held."""
    outlook = plan.noise_outlook
    assert outlook is not None
    t = outlook.trajectory
    if not (t.var_log_scale > 0 or t.var_exponent > 0):
        return None
    gains = []
    for a, b in t.ellipse():
        d, b_noises = _path(plan, t.with_params(a, b))
        fixed = path_cost([best_fixed] * len(d), d, b_noises, seconds).seconds  # type: ignore[arg-type]
        gains.append(fixed / path_cost(batches, d, b_noises, seconds).seconds)  # type: ignore[arg-type]
    if not all(math.isfinite(g) for g in gains):
        return None
    return min(gains), max(gains)
