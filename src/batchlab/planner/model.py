"""`build_plan`: measurements in, a plan out (the predicted critical batch, the candidates,
the recommendations, the warnings).

Nothing here measures. `build_plan` takes what the probes and the noise measurement found
and applies the pure models of `batchlab.core` and the choice of `planner.decide`; tests
feed it known answers.
"""

from __future__ import annotations

import math

from batchlab.core.lr import TRAIN_LR_RULES, scale_lr
from batchlab.core.optim import default_lr_rule
from batchlab.errors import ConfigError
from batchlab.measure.noise_run import NoiseRun
from batchlab.measure.probe import BATCHNORM_MIN_BATCH, ProbeResult
from batchlab.planner.decide import (
    NoiseEstimate,
    candidates_for,
    recommend_efficient,
    recommend_fastest,
    untrusted_warning,
)
from batchlab.planner.noise_path import NoiseOutlook, correlation_factor, noise_outlook
from batchlab.planner.plan_types import Candidate, Measurements, Plan, Recommendation
from batchlab.planner.timing import step_seconds, timed_points
from batchlab.planner.trust import (
    PlanWarning,
    contention_warning,
    loss_fall_warning,
    probe_warnings,
)


def predicted_critical_batch(
    m: Measurements, target: str | None = None
) -> tuple[float, tuple[float, float], str, NoiseOutlook]:
    """The plan's predicted critical batch, its interval, its description and the outlook.

    It is B_bar, the S_min-weighted mean of the fitted B_noise(L) = exp(a) L^b over the
    training-loss path from the start of training to the target (`planner.noise_path`):
    S(B) = S_min (1 + B_bar/B) then holds for the whole path, so it is the B_crit a sweep
    fits. One early B_simple would be 3-5x lower: B_simple grows as the loss falls.
    """
    if not any(p.b_simple and p.b_simple > 0 and p.train_loss for p in m.noise):
        raise ConfigError(
            "no usable B_simple was measured (|G|^2 estimate <= 0 at every point); "
            "measure the noise over more steps (a larger `noise_budget`)",
            param="noise_budget",
        )
    batch = m.noise_batch_size or m.reference_batch_size
    outlook = noise_outlook(
        m.noise,
        batch_size=batch,
        reference_steps=m.reference_examples / batch,
        target=target,
        target_step=m.noise_target_step,
        target_evals=m.target_evals,
        correlation=correlation_factor(m.noise_every, m.noise_window),
    )
    t = outlook.trajectory
    lo, hi = t.loss_range
    metric = "Adam-preconditioned " if m.noise_preconditioned else ""
    source = (
        f"S_min-weighted mean of {metric}B_noise(L) = {math.exp(t.log_scale):.3g} "
        f"L^{t.exponent:.2f} "
        f"({t.kind} fit to {t.num_points} points, loss {hi:.3g} -> {lo:.3g}) over the loss "
        f"path to {outlook.target_loss:.3g}, ending at {outlook.path_end}"
    )
    return outlook.critical_batch, outlook.critical_batch_interval, source, outlook


def build_plan(
    m: Measurements,
    *,
    lr_rule: str | None = None,
    b_simple: float | None = None,
    reference_seconds_to_target: float | None = None,
    target: str | None = None,
    plan_seconds: float = 0.0,
    command: str = "",
    partial: bool = False,
    probe: ProbeResult | None = None,
    noise: NoiseRun | None = None,
) -> Plan:
    """Turn measurements into the fastest and the efficient recommendation, with reasons.

    The noise scale is the predicted critical batch (`predicted_critical_batch`: B_noise
    fitted against the loss and averaged over the path to `target`), or `b_simple` as given.
    The fastest batch is kept only if its predicted gain clears its own interval; otherwise
    the plan says "keep B0".
    """
    outlook = None
    if b_simple is None:
        b_noise, interval, source, outlook = predicted_critical_batch(m, target)
    else:
        b_noise, interval, source = b_simple, (b_simple, b_simple), "given"
    noise_est = NoiseEstimate(b_noise, interval, None if outlook is None else outlook.end_step)
    rule = lr_rule or default_lr_rule(m.optimizer)
    _, _, ref_step_s = step_seconds(m, m.reference_batch_size)
    candidates = candidates_for(m, noise_est, ref_step_s)
    recommended, verdict, keep = recommend_fastest(m, candidates, noise_est, rule, ref_step_s)
    efficient = recommend_efficient(m, noise_est, rule, ref_step_s)
    alternatives = {
        r: scale_lr(
            m.reference_lr, m.reference_batch_size, recommended.batch_size, r, b_simple=b_noise
        )
        for r in TRAIN_LR_RULES
    }
    predicted_seconds = (
        reference_seconds_to_target / recommended.predicted_speedup
        if reference_seconds_to_target is not None
        else None
    )
    warnings = plan_warnings(m, recommended, efficient, candidates)
    untrusted = untrusted_warning(m, candidates, recommended)
    if untrusted is not None:
        warnings.append(untrusted)
    if outlook is not None and outlook.extrapolated:
        warnings.append(_extrapolation_warning(outlook))
    if probe is not None:
        warnings.extend(probe_warnings(probe))
    if m.head_to_head is not None:  # what the head-to-head timing itself found wrong
        warnings.extend(PlanWarning("head-to-head", w) for w in m.head_to_head.warnings)
    return Plan(
        task=m.task,
        device=m.device,
        reference={"batch_size": m.reference_batch_size, "lr": m.reference_lr},
        recommended=recommended,
        efficient=efficient,
        max_batch_size=m.max_batch_size,
        knee_batch_size=m.knee_batch_size,
        b_simple=b_noise,
        b_simple_source=source,
        b_simple_trajectory=m.noise,
        candidates=tuple(candidates),
        lr_alternatives=alternatives,
        warnings=tuple(warnings),
        measurements=m,
        plan_seconds=plan_seconds,
        plan_steps=m.probe_steps + m.noise_steps,
        predicted_seconds_to_target=predicted_seconds,
        reference_seconds_to_target=reference_seconds_to_target,
        target=target,
        command=command,
        partial=partial,
        probe=probe,
        noise=noise,
        b_simple_interval=interval,
        noise_outlook=outlook,
        verdict=verdict,
        keep_reference=keep,
        cost=plan_cost(m),
    )


def plan_cost(m: Measurements) -> dict[str, float]:
    """The noise phase's training examples next to the whole reference training's."""
    cost = {
        "noise_examples": float(m.noise_examples),
        "reference_examples": float(m.reference_examples),
        "noise_fraction": m.noise_examples / m.reference_examples,
        "probe_steps": float(m.probe_steps),
    }
    if m.noise_budget is not None:
        cost["noise_budget"] = float(m.noise_budget)
    return cost


def _extrapolation_warning(outlook: NoiseOutlook) -> PlanWarning:
    lo, _ = outlook.trajectory.loss_range
    return PlanWarning(
        "noise-extrapolated",
        f"the path to the target goes past the noise phase (to step {outlook.end_step:.0f}, "
        f"loss {outlook.target_loss:.3g}; lowest measured {lo:.3g}): B_noise there is "
        "extrapolated from the fit; a larger `noise_budget` measures more of it",
    )


def plan_warnings(
    m: Measurements,
    recommended: Recommendation,
    efficient: Recommendation,
    candidates: list[Candidate],
) -> list[PlanWarning]:
    out = []
    for rec in {recommended.micro_batch_size, efficient.micro_batch_size}:
        if m.has_batchnorm and rec < BATCHNORM_MIN_BATCH:
            out.append(
                PlanWarning(
                    "batchnorm-small-batch",
                    f"the model has BatchNorm and the per-device batch is {rec} < 8: "
                    "its batch statistics are noisy (meaningless at 1); consider GroupNorm",
                )
            )
            break
    if recommended.batch_size > 0.1 * m.num_train:
        out.append(
            PlanWarning(
                "large-batch-regime",
                f"recommended B={recommended.batch_size} is more than 10% of the "
                f"{m.num_train} training examples: the large-batch regime of Keskar et al. "
                "2016, expect a generalization gap; check with `batchlab sweep`",
            )
        )
    loss_warning = loss_fall_warning(m.noise)
    if loss_warning is not None:
        out.append(loss_warning)
    if not m.noise_reliable:
        out.append(
            PlanWarning(
                "unreliable-noise",
                f"the B_simple estimate is unreliable ({m.noise_reason or 'wide interval'}): "
                "the predicted critical batch has a wide interval and the verdict says how "
                "the plan chose under it; measure over more steps (a larger "
                "`noise_budget`) to narrow it",
            )
        )
    contention = contention_warning(timed_points(m))  # the ladder and the head-to-head
    if contention is not None:
        out.append(contention)
    tp = sorted(m.throughput, key=lambda p: p.batch_size)
    # Only when memory is the limit: at the training-set size there is nothing to gain.
    memory_bound = m.max_batch_size < m.num_train
    if memory_bound and len(tp) >= 2 and tp[-1].batch_size >= m.max_batch_size * 0.9:
        gain = tp[-1].samples_per_s / tp[-2].samples_per_s
        if gain > 1.05:
            out.append(
                PlanWarning(
                    "throughput-rising-at-max",
                    f"throughput still rises at the memory max ({gain:.2f}x over the last "
                    "step of the ladder): gradient accumulation makes the batch bigger, "
                    "not faster; more memory (or AMP) would",
                )
            )
    if m.memory_predicted_only:
        out.append(
            PlanWarning(
                "predicted-memory",
                "the memory max is a prediction for a target device, not verified by a run",
            )
        )
    return out
