"""What `--adaptive --schedule plan.json` takes from a plan: where to start, and its models.

A plan's schedule is the fastest batch, min (1 + B_noise/B) t(B) (McCandlish et al. 2018
eq. 2.11), at its fitted B_noise(L) along the loss path it predicts, with each phase's LR
coupled to its batch by the plan's rule. The adaptive run starts at the first phase (its
batch and LR), fits the same trajectory model to the plan's noise points plus its own
(`TrajectoryNoise`), prices batches with the plan's step-time model until it has timed its
own steps, and couples the LR to the batch the way the plan did; so it follows
the plan where the run goes as predicted and corrects it where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchlab.core.schedule import BatchSchedule, ScheduleForecast
from batchlab.core.step_time import StepTimeModel, fit_step_time, with_head_to_head
from batchlab.errors import ConfigError
from batchlab.measure.noise_run import NoisePoint
from batchlab.results import FieldError, read_json_object
from batchlab.train import load_schedule

REMAKE = "make one with `batchlab plan TASK --json plan.json`"


@dataclass(frozen=True)
class PlanStart:
    """A schedule to start from, the plan's noise points (the trajectory's prior; empty for
    a bare schedule), the plan's LR coupling (None: unknown, keep the adaptive rule) and its
    step-time model (None: time the run's own steps from the start)."""

    schedule: BatchSchedule
    noise: tuple[NoisePoint, ...] = ()
    lr_rule: str | None = None
    step_time: StepTimeModel | None = None  # through the plan's throughput ladder
    preconditioned: bool = False  # the noise points are Adam-preconditioned B_simple

    def why(self) -> str:
        """The start in words, for the first decision's reason."""
        first, n = self.schedule.phases[0], len(self.schedule.phases)
        rule = f", lr rule {self.lr_rule}" if self.lr_rule else ""
        return f"the plan's phase 1 of {n}, lr {first.lr:.4g}{rule}"


def plan_start(source: object) -> PlanStart:
    """A `PlanStart` from a plan file or a schedule's JSON (a path), a `BatchSchedule`, a
    `ScheduleForecast` (a plan's `schedule`) or a `Plan` (its schedule and noise points)."""
    if isinstance(source, BatchSchedule):
        return PlanStart(source)
    if isinstance(source, ScheduleForecast):
        return PlanStart(source.schedule, lr_rule=source.lr_rule or None)
    forecast = getattr(source, "schedule", None)
    if isinstance(forecast, ScheduleForecast):  # a Plan (the planner is a layer above)
        measurements = getattr(source, "measurements", None)
        noise = tuple(getattr(measurements, "noise", ()) or ())
        ladder = [(p.batch_size, p.step_s) for p in getattr(measurements, "throughput", ())]
        h2h = getattr(getattr(measurements, "head_to_head", None), "points", ())
        ladder = with_head_to_head(ladder, [(p.batch_size, p.step_s) for p in h2h])
        pre = bool(getattr(measurements, "noise_preconditioned", False))
        return PlanStart(
            forecast.schedule, noise, forecast.lr_rule or None, _step_time(ladder), pre
        )
    if forecast is None and hasattr(source, "measurements"):
        raise ConfigError(
            f"`schedule`: the plan has no schedule (a plan made from measured noise has one); "
            f"{REMAKE}",
            param="schedule",
        )
    if not isinstance(source, (str, Path)):
        raise ConfigError(
            "`schedule`: expected a plan file, a schedule's JSON, a BatchSchedule or a Plan, "
            f"got {type(source).__name__}; {REMAKE}",
            param="schedule",
        )
    schedule = load_schedule(source)
    data = read_json_object(source, "plan file", REMAKE, param="schedule")
    if "phases" in data:  # a schedule's own JSON: no noise points, no coupling
        return PlanStart(schedule)
    rule = data["schedule"].get("lr_rule") or None
    measured = data.get("measurements") or {}
    ladder = _timed(measured.get("throughput"))
    h2h = _timed((measured.get("head_to_head") or {}).get("points"))
    ladder = with_head_to_head(ladder, h2h)
    pre = (data.get("measurements") or {}).get("noise_preconditioned") is True
    return PlanStart(schedule, _noise_points(source, data), rule, _step_time(ladder), pre)


def _timed(points: object) -> list[tuple[int, float]]:
    """`(batch_size, step_s)` of a plan file's timed points that are well formed."""
    out = []
    for p in points if isinstance(points, list) else ():
        b, t = (p.get("batch_size"), p.get("step_s")) if isinstance(p, dict) else (None, None)
        if isinstance(b, int) and b > 0 and isinstance(t, (int, float)) and t > 0:
            out.append((b, float(t)))
    return out


def _step_time(ladder: list[tuple[int, float]]) -> StepTimeModel | None:
    """The plan's step-time model through its timed points (one micro-batch a step; the
    ladder with the head-to-head in its place, `core.step_time.with_head_to_head`), as the
    planner builds it (`planner.timing.step_time_model`); None without usable points."""
    return fit_step_time([(b, 1, t) for b, t in ladder]) if ladder else None


def _noise_points(path: str | Path, data: dict) -> tuple[NoisePoint, ...]:
    """The plan file's `measurements.noise`, checked."""
    measurements = data.get("measurements")
    points = measurements.get("noise") if isinstance(measurements, dict) else None
    if not isinstance(points, list):
        raise ConfigError(
            f"plan file {str(path)!r}: expected `measurements.noise` (a list of points), got "
            f"{type(points).__name__}; {REMAKE}",
            param="schedule",
        )
    try:
        return tuple(NoisePoint.from_dict(p) for p in points)
    except (FieldError, TypeError) as exc:
        raise ConfigError(
            f"plan file {str(path)!r}: `measurements.noise` {exc}; {REMAKE}", param="schedule"
        ) from None
