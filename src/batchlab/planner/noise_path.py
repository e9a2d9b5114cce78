"""The plan's noise model: B_noise fitted against the loss, followed along the path to the target.

`noise_outlook` turns the noise phase's points (step, mean training loss, B_simple and its
interval) into a `NoiseOutlook`: the fitted trajectory (`batchlab.core.trajectory`), the
loss path from the start of training to the target, and the predicted critical batch

    B_bar = integral B_noise(L) dS_min / S_min over that path,

the S_min-weighted mean B_noise, so that S(B) = S_min (1 + B_bar/B) (McCandlish et al. 2018
eq. 2.11 applied piecewise). It is what a sweep's fit of S(B) would call B_crit.

Where the path ends, in order of preference:
1. the noise run reached the target: there (the loss path is measured all the way);
2. a target that was not reached: where its metric, extrapolated linearly in log step from
   the later half of the run's evaluations, crosses it (at most the reference epochs);
3. no target: the end of the reference training (task epochs x N / B0 steps).
Past the measured steps the loss follows a power law in steps fitted to the later half of
the run, and never falls further below the lowest measured loss than the measured losses
span (one more measured range in log L): the trajectory is only trusted that far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchlab.core.trajectory import (
    NoiseTrajectory,
    critical_batch_with_interval,
    crossing_step,
    extend_loss_path,
    fit_noise_trajectory,
)
from batchlab.measure.noise_run import NoisePoint
from batchlab.results import JsonResult
from batchlab.target import parse_target


@dataclass(frozen=True)
class NoiseOutlook(JsonResult):
    """The fitted B_noise trajectory and what it predicts along the path to the target."""

    trajectory: NoiseTrajectory
    critical_batch: float  # B_bar: S_min-weighted mean B_noise over the path
    critical_batch_interval: tuple[float, float]
    path_end: str  # how the end of the path was chosen, in words
    end_step: float  # steps at the noise run's batch to the end of the path
    target_loss: float  # mean training loss of the path's last stretch
    b_noise_at_target: float
    b_noise_at_target_interval: tuple[float, float]
    extrapolated: bool  # the path goes past the measured steps
    path_steps: tuple[float, ...]  # cumulative steps at the end of each stretch
    path_losses: tuple[float, ...]  # mean training loss of each stretch


def noise_outlook(
    points: tuple[NoisePoint, ...],
    *,
    batch_size: int,
    reference_steps: float,
    target: str | None = None,
    target_step: int | None = None,
    target_evals: tuple[tuple[int, float], ...] = (),
    correlation: float = 1.0,
) -> NoiseOutlook:
    """Fit the trajectory to `points` (measured at `batch_size`) and follow it to the end.

    reference_steps: steps of the whole reference training at `batch_size` (the path ends
        there at the latest).
    target / target_step / target_evals: the target, the step the run reached it at (None
        when it did not) and its metric at each evaluation (for case 2 above).
    correlation: covariance factor for points sharing an averaging window (>= 1).
    """
    usable = [p for p in points if p.b_simple is not None and p.train_loss is not None]
    trajectory = fit_noise_trajectory(
        [p.train_loss for p in usable],
        [p.b_simple for p in usable],
        [p.b_simple_ci for p in usable],
        correlation=correlation,
    )
    path = [(float(p.step), p.train_loss) for p in points if p.train_loss is not None]
    if target_step is not None:
        path = [(s, loss) for s, loss in path if s <= target_step]
    end_step, end = _path_end(path, reference_steps, target, target_step, target_evals)
    lo, hi = trajectory.loss_range
    steps, losses = [s for s, _ in path], [loss for _, loss in path]
    more_steps, more_losses = extend_loss_path(steps, losses, end_step, min_loss=lo * lo / hi)
    steps, losses = steps + more_steps, losses + more_losses
    b_bar, interval = critical_batch_with_interval(trajectory, losses, steps, batch_size)
    return NoiseOutlook(
        trajectory=trajectory,
        critical_batch=b_bar,
        critical_batch_interval=interval,
        path_end=end,
        end_step=steps[-1],
        target_loss=losses[-1],
        b_noise_at_target=trajectory.b_noise(losses[-1]),
        b_noise_at_target_interval=trajectory.interval(losses[-1]),
        extrapolated=bool(more_steps),
        path_steps=tuple(steps),
        path_losses=tuple(losses),
    )


def _path_end(
    path: list[tuple[float, float]],
    reference_steps: float,
    target: str | None,
    target_step: int | None,
    target_evals: tuple[tuple[int, float], ...],
) -> tuple[float, str]:
    """(last step of the path, why it ends there)."""
    last = path[-1][0]
    if target_step is not None:
        return last, f"the noise run reached {target} at step {target_step}"
    parsed = parse_target(target)
    if parsed is not None and target_evals:
        higher = parsed.op in (">=", ">")
        cross = crossing_step(
            [s for s, _ in target_evals],
            [v for _, v in target_evals],
            parsed.value,
            higher_is_better=higher,
        )
        if cross is not None and cross <= reference_steps:
            return max(cross, last), (
                f"{target} not reached in the noise run; its metric, extrapolated in log "
                f"step, crosses it near step {cross:.0f}"
            )
    reason = "no target given" if parsed is None else f"{target} not reached nor extrapolable"
    return max(reference_steps, last), (
        f"{reason}: the end of the reference training ({reference_steps:.0f} steps)"
    )


def correlation_factor(every: int, window: float) -> float:
    """Covariance factor for points `every` steps apart that each average ~`window` steps.

    An EMA over W steps read every k < W steps gives about n k / W independent points.
    """
    return max(1.0, window / every) if every > 0 and math.isfinite(window) else 1.0
