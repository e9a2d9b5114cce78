"""A batch-size schedule: a short list of phases, and the pure math that plans one.

B_noise grows as the loss falls (McCandlish et al. 2018, fig. 8; 226 -> 645 between steps
100 and 800 on mnist1d-mlp), so no fixed batch is right for a whole run: small batches
waste fewer examples early, large ones take fewer steps late. Batch-size warm-up pays in
practice (Merrill et al. 2025: 43% fewer steps on OLMo-1B; Gray et al. 2024: a noise-guided
schedule saved 18% of the time).

A `BatchSchedule` says, for each phase, from which optimizer step or how many examples seen
on it applies, its batch (micro-batch x accumulation) and its learning rate. The loop runs
it through `batchlab.loop.ScheduledBatch`; the planner (`batchlab.planner.schedule`) makes
one from the fitted B_noise trajectory with the functions below.

The planning model is McCandlish et al. eq. 2.11 applied stretch by stretch along the loss
path (`batchlab.core.trajectory`): a stretch that needs dS_min steps at B -> infinity takes
dS_min (1 + B_noise/B) steps at batch B, each costing t(B) seconds. The time of a run is
the sum over stretches, so the fastest schedule picks, in each stretch, the batch that
minimises (1 + B_noise/B) t(B): it rises with B_noise, because t(B) grows with B.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from batchlab.core.tradeoff import steps_factor
from batchlab.errors import ConfigError
from batchlab.results import JsonResult

SCHEDULE_UNITS = ("step", "examples")  # what a phase's `start` counts


@dataclass(frozen=True)
class SchedulePhase(JsonResult):
    """One phase: it applies once `start` optimizer steps (or examples) are done.

    `micro_batch_size` x `accumulation_steps` covers `batch_size` (the last micro-batch may
    be shorter: `accumulation_steps = ceil(batch_size / micro_batch_size)`).
    """

    start: int
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    lr: float


@dataclass(frozen=True)
class BatchSchedule(JsonResult):
    """The phases, first one starting at 0, starts strictly increasing in `unit`.

    Checked when built (also from JSON): a bad schedule is one `ConfigError` line naming
    the phase and the field, with `param="schedule"`.
    """

    phases: tuple[SchedulePhase, ...]
    unit: str = "examples"

    def __post_init__(self) -> None:
        check_schedule(self)

    def phase_index(self, steps_done: int, examples_done: int) -> int:
        """The phase that applies to the next step, after `steps_done` steps and
        `examples_done` examples."""
        done = steps_done if self.unit == "step" else examples_done
        index = 0
        for i, phase in enumerate(self.phases):
            if phase.start <= done:
                index = i
        return index


def _problem(phases: Sequence[object], unit: object) -> str | None:
    """What is wrong with a schedule's fields, in words, or None."""
    if unit not in SCHEDULE_UNITS:
        return f"expected `unit` one of {', '.join(SCHEDULE_UNITS)}, got {unit!r}"
    if not isinstance(phases, (tuple, list)) or not phases:
        return f"expected one or more phases, got {phases!r}"
    previous = -1
    for i, p in enumerate(phases, start=1):
        if not isinstance(p, SchedulePhase):
            return f"phase {i}: expected a phase object, got {type(p).__name__}"
        for name in ("start", "batch_size", "micro_batch_size", "accumulation_steps"):
            value = getattr(p, name)
            low = 0 if name == "start" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "an integer >= 0" if low == 0 else "a positive integer"
                return f"phase {i}: expected `{name}` {kind}, got {value!r}"
        lr = p.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
            return f"phase {i}: expected `lr` a positive finite number, got {lr!r}"
        if p.accumulation_steps != math.ceil(p.batch_size / p.micro_batch_size):
            return (
                f"phase {i}: expected `accumulation_steps` = ceil(batch_size / "
                f"micro_batch_size) = {math.ceil(p.batch_size / p.micro_batch_size)}, got "
                f"{p.accumulation_steps}"
            )
        if i == 1 and p.start != 0:
            return f"phase 1: expected `start` 0 (the schedule covers the run), got {p.start}"
        if p.start <= previous:
            return (
                f"phase {i}: expected `start` above the previous phase's {previous}, got {p.start}"
            )
        previous = p.start
    return None


def check_schedule(schedule: BatchSchedule) -> None:
    """Raise one `ConfigError` line (param `schedule`) if `schedule` is malformed."""
    problem = _problem(schedule.phases, schedule.unit)
    if problem is not None:
        raise ConfigError(
            f"`schedule`: {problem}; make one with `batchlab plan` or fix the file",
            param="schedule",
        )


def schedule_run_steps(
    schedule: BatchSchedule, num_train: int, epochs: float, max_steps: int | None = None
) -> int:
    """Optimizer steps to see `epochs` x `num_train` examples under `schedule`.

    Every epoch is one permutation walked in order, so a step never crosses an epoch's
    end: the last step of an epoch is short (as at a fixed batch).
    """
    if not math.isfinite(epochs) and max_steps is None:
        raise ConfigError("schedule run length: expected finite `epochs` or `max_steps`")
    budget = epochs * num_train
    steps = examples = 0
    while examples < budget and (max_steps is None or steps < max_steps):
        phase = schedule.phases[schedule.phase_index(steps, examples)]
        left_in_epoch = num_train - examples % num_train
        examples += min(phase.batch_size, left_in_epoch)
        steps += 1
    return steps


# --- planning along the loss path --------------------------------------------------------


def fastest_batch(
    b_noise: float, batch_sizes: Sequence[int], step_seconds: Callable[[int], float]
) -> int:
    """The batch that minimises seconds per S_min step, (1 + B_noise/B) t(B) (eq. 2.11);
    the smaller batch on a tie."""
    return min(batch_sizes, key=lambda b: (steps_factor(b, b_noise) * step_seconds(b), b))


def rising_batches(
    b_noises: Sequence[float], batch_sizes: Sequence[int], step_seconds: Callable[[int], float]
) -> list[int]:
    """Each stretch's fastest batch, never below an earlier stretch's (B only rises, as
    B_noise does along the path; a dip from a noisy B_noise would only add a switch)."""
    out: list[int] = []
    for bn in b_noises:
        b = fastest_batch(bn, batch_sizes, step_seconds)
        out.append(max(b, out[-1]) if out else b)
    return out


@dataclass(frozen=True)
class PathCost:
    """Predicted steps, examples and seconds of a run along a loss path."""

    steps: float
    examples: float
    seconds: float
    stretch_steps: tuple[float, ...] = field(default=())  # steps of each stretch


def path_cost(
    batches: Sequence[float],
    min_steps: Sequence[float],
    b_noises: Sequence[float],
    step_seconds: Callable[[float], float],
) -> PathCost:
    """Steps dS_min (1 + B_noise/B), examples B x steps and seconds t(B) x steps, summed
    over the stretches (McCandlish et al. 2018 eq. 2.11 applied piecewise)."""
    steps = [d * steps_factor(b, bn) for b, d, bn in zip(batches, min_steps, b_noises, strict=True)]
    return PathCost(
        steps=sum(steps),
        examples=sum(s * b for s, b in zip(steps, batches, strict=True)),
        seconds=sum(s * step_seconds(b) for s, b in zip(steps, batches, strict=True)),
        stretch_steps=tuple(steps),
    )


@dataclass(frozen=True)
class ScheduleForecast(JsonResult):
    """A planned schedule with what the model predicts for it (`batchlab plan` makes it).

    Predictions run to the end of the plan's loss path (the target, or the end of the
    reference training). `predicted_gain` is the best fixed batch's predicted time over the
    schedule's, both along the same path and step-time model; its interval spans the
    B_noise fit's confidence region (None when the fit gives none).
    """

    schedule: BatchSchedule
    phase_steps: tuple[float, ...]  # predicted optimizer step each phase starts after
    phase_b_noise: tuple[float, ...]  # S_min-weighted B_noise over each phase's stretches
    predicted_seconds: float
    predicted_steps: float
    predicted_examples: float
    best_fixed_batch_size: int
    best_fixed_seconds: float
    predicted_gain: float
    predicted_gain_interval: tuple[float, float] | None = None
    lr_rule: str = ""
    reasons: dict[str, str] = field(default_factory=dict)
    # Along the path, stretch by stretch: the schedule's cumulative steps at the stretch's
    # end, the predicted B_noise and the batch (what the report draws).
    path_steps: tuple[float, ...] = ()
    path_b_noise: tuple[float, ...] = ()
    path_batches: tuple[int, ...] = ()
