"""What makes a plan untrustworthy, found in its measurements (issue 14, item 7).

A confident answer from bad data is worse than none: these warnings pass on what the
probe saw, flag contended timings and a noise phase whose loss did not fall, and
`REFUSING_WARNINGS` are those for which `batchlab.plan` refuses unless forced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.measure.noise_run import NoisePoint
from batchlab.measure.probe import ProbeResult
from batchlab.measure.throughput import ThroughputPoint, timing_contention
from batchlab.results import JsonResult

# The noise phase's training loss must fall by this fraction (mean of its last third of
# points against its first third) before the plan trusts it: B_noise is fitted against the
# loss (`planner.noise_path`), and on a flat loss (random labels, a broken task, an LR far
# too low) that fit and every prediction built on it mean nothing.
MIN_LOSS_FALL = 0.05
# Warnings that make `batchlab.plan` refuse to recommend unless `force=True`. An unreliable
# B_simple alone does not: its interval is then wide (often unbounded above), and the plan
# takes the batch that is the safest bet over all of it (`planner.decide.recommend_fastest`), saying so.
REFUSING_WARNINGS = ("loss-not-falling",)


@dataclass(frozen=True)
class PlanWarning(JsonResult):
    code: str
    message: str


def probe_warnings(probe: ProbeResult) -> list[PlanWarning]:
    """The probe's own warnings, passed on: a plan built on a truncated or noisy ladder
    must say so where the user reads the plan (console, JSON and report), not only in
    `batchlab probe`'s output. Issue 14: a loaded CPU gave "timing truncated" and "timing
    noise 21032%" in the probe and "No warnings." in the plan."""
    return [PlanWarning("probe", w) for w in probe.warnings]


def contention_warning(points: Sequence[ThroughputPoint]) -> PlanWarning | None:
    """`timing-contention` when the ladder's timings look contended (`timing_contention`)."""
    contention = timing_contention(points)
    if contention is None:
        return None
    return PlanWarning(
        "timing-contention",
        f"the step times look contended: {contention}; other processes compete "
        "for the device, so every predicted speed-up is unreliable; plan again on "
        "a quiet machine (on a busy CPU, OMP_NUM_THREADS=1 or torch.set_num_threads(1))",
    )


def loss_fall(points: tuple[NoisePoint, ...]) -> float | None:
    """The noise phase's relative loss fall: 1 - mean(last third) / mean(first third) of
    its points' training losses; None with fewer than 3 points that have a loss."""
    losses = [p.train_loss for p in points if p.train_loss is not None]
    if len(losses) < 3:
        return None
    third = len(losses) // 3
    first = sum(losses[:third]) / third
    last = sum(losses[-third:]) / third
    return 1.0 - last / first if first > 0 else None


def loss_fall_warning(points: tuple[NoisePoint, ...]) -> PlanWarning | None:
    """A warning when the noise phase's loss did not fall by `MIN_LOSS_FALL` (or there
    were too few points to tell): then nothing the plan predicts can be trusted."""
    fall = loss_fall(points)
    if fall is not None and fall >= MIN_LOSS_FALL:
        return None
    said = (
        f"only {sum(p.train_loss is not None for p in points)} noise points had a loss"
        if fall is None
        else f"the training loss fell {fall:.1%} over the noise phase (< {MIN_LOSS_FALL:.0%})"
    )
    return PlanWarning(
        "loss-not-falling",
        f"{said}: the task may not learn (random labels? LR too low?) and B_noise fitted "
        "against the loss means nothing; check the task, or measure longer (a larger "
        "`noise_budget`)",
    )
