"""Summarise `batchlab plan` JSONs: the noise trajectory against a sweep's B_crit (issue 11).

Usage:
    python benchmarks/plan_trajectory.py NAME=plan.json[:SWEEP_B_CRIT] ...

For each plan: the measured points (every few), the fitted trajectory, the predicted
critical batch (the S_min-weighted mean B_noise over the path) with its interval, two
alternatives for comparison (B_noise at the target; the mean weighted by steps at B0
instead of S_min), the old single number (mean of the last half of the first 200 steps'
points) and, when given, the ratio to the sweep's B_crit.
"""

from __future__ import annotations

import sys

from batchlab.core.trajectory import min_steps_along_path
from batchlab.planner import Plan


def old_single_number(plan: Plan) -> float | None:
    """What the plan used before: the mean of the last half of the points up to step 200."""
    values = [p.b_simple for p in plan.b_simple_trajectory if p.b_simple and p.step <= 200]
    late = values[len(values) // 2 :]
    return sum(late) / len(late) if late else None


def summarise(name: str, plan: Plan, sweep: float | None) -> list[str]:
    o = plan.noise_outlook
    t = o.trajectory
    batch = plan.measurements.noise_batch_size or plan.reference["batch_size"]
    bn = [t.b_noise(v) for v in o.path_losses]
    d_ref = [s - p for s, p in zip(o.path_steps, (0.0, *o.path_steps[:-1]), strict=True)]
    step_weighted = sum(d * b for d, b in zip(d_ref, bn, strict=True)) / sum(d_ref)
    d_min = min_steps_along_path(t, o.path_losses, o.path_steps, batch)
    assert (
        abs(sum(d * b for d, b in zip(d_min, bn, strict=True)) / sum(d_min) - plan.b_simple) < 1e-6
    )
    pts = [p for p in plan.b_simple_trajectory if p.b_simple and p.train_loss]
    shown = pts[:: max(1, len(pts) // 8)] + (
        [pts[-1]] if pts[-1] not in pts[:: max(1, len(pts) // 8)] else []
    )
    lo, hi = plan.b_simple_interval
    old = old_single_number(plan)
    c = plan.cost
    lines = [
        f"## {name}",
        "",
        "- measured (step: train loss -> B_simple): "
        + ", ".join(f"{p.step}: {p.train_loss:.3g} -> {p.b_simple:.0f}" for p in shown),
        f"- fit ({t.kind}, {t.num_points} points, loss {t.loss_range[1]:.3g} -> "
        f"{t.loss_range[0]:.3g}): log B = {t.log_scale:.2f} {t.exponent:+.2f} log L "
        f"(exponent 95% +-{t.quantile * t.var_exponent**0.5:.2f}; scatter x{t.scatter:.2f}, "
        f"correlation x{t.correlation:.1f})",
        f"- path end: {o.path_end}; target loss {o.target_loss:.3g} at step {o.end_step:.0f}"
        + (" (extrapolated)" if o.extrapolated else ""),
        f"- B_noise at the target: {o.b_noise_at_target:.0f} "
        f"({o.b_noise_at_target_interval[0]:.0f}-{o.b_noise_at_target_interval[1]:.0f})",
        f"- **predicted critical batch (S_min-weighted): {plan.b_simple:.0f} ({lo:.0f}-{hi:.0f})**",
        f"- for comparison: weighted by steps at B0: {step_weighted:.0f}; old single number "
        f"(late half of the first 200 steps): {old:.0f}"
        if old
        else "",
        f"- verdict: {plan.verdict}",
        f"- cost: noise phase {c['noise_examples']:.0f} examples = {c['noise_fraction']:.1%} of "
        f"the reference training's {c['reference_examples']:.0f}; plan {plan.plan_seconds:.0f} s",
    ]
    if sweep:
        ratio = sweep / plan.b_simple
        lines.append(
            f"- sweep B_crit {sweep:g}: predicted is {ratio:.2f}x below"
            if ratio >= 1
            else f"- sweep B_crit {sweep:g}: predicted is {1 / ratio:.2f}x above"
        )
    return [line for line in lines if line] + [""]


def main(argv: list[str]) -> None:
    for arg in argv:
        name, rest = arg.rsplit("=", 1)
        path, _, sweep = rest.partition(":")
        print("\n".join(summarise(name, Plan.load(path), float(sweep) if sweep else None)))


if __name__ == "__main__":
    main(sys.argv[1:])
