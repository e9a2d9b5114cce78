"""The leading candidates timed head to head, after the noise phase told which sizes decide.

The throughput ladder is timed before the plan knows B_noise, so it spreads its budget over
10-12 sizes, 5 short windows each. Which batch wins is then often a question of a few
percent between two neighbours (mnist1d-cnn: B=512 predicted 7-11% faster than 256), and
the ratio of their ladder medians moved 1.42-1.77x between identical plans on the 2-core
VM, so the choice flipped (issue 14: the same command gave different batches). Tuners
spend their budget where the decision is (successive halving, Jamieson & Talwalkar
2016): here, the candidates predicted within `BAND` of the fastest and B0 are timed again,
interleaved, with `WINDOWS` windows each; over the sizes they cover their times replace
the ladder's (`planner.timing.timed_points`). The same two sizes then moved 1.41-1.50x.
"""

from __future__ import annotations

import dataclasses

from batchlab.measure.distributed import rank_device
from batchlab.measure.memory import ProgressFn
from batchlab.measure.probe import ProbeSettings
from batchlab.measure.throughput import ThroughputProfile, profile_throughput
from batchlab.planner.decide import untrusted_reason
from batchlab.planner.plan_types import Measurements, Plan
from batchlab.task import Task

WINDOWS = 15  # timed windows per size: the median's error shrinks as 1/sqrt(windows)
BAND = 1.25  # candidates predicted within this factor of the fastest's time compete
MAX_CONTENDERS = 4  # besides B0
BUDGET_SHARE = 0.6  # of the ladder's time budget (`throughput_seconds`)


def contenders(plan: Plan) -> list[int]:
    """The batch sizes worth timing head to head, sorted: B0 and up to `MAX_CONTENDERS`
    candidates predicted within `BAND` of the fastest candidate's time, among those the
    plan may recommend (`planner.decide.untrusted_reason`) that run as one micro-batch.
    Empty when nothing but B0 competes."""
    m = plan.measurements
    b0 = m.reference_batch_size
    pool = [
        c
        for c in plan.candidates
        if c.batch_size != b0 and c.accumulation_steps == 1 and untrusted_reason(m, c) is None
    ]
    if not pool:
        return []
    best = max(c.predicted_speedup for c in plan.candidates if c in pool or c.batch_size == b0)
    near = [c for c in pool if c.predicted_speedup * BAND >= best]
    near = sorted(near, key=lambda c: -c.predicted_speedup)[:MAX_CONTENDERS]
    if not near:
        return []
    return sorted({b0, *(c.batch_size for c in near)})


def time_head_to_head(
    task: Task, plan: Plan, settings: ProbeSettings, progress: ProgressFn | None = None
) -> Measurements:
    """The plan's measurements with its `contenders` timed head to head (`head_to_head`),
    or unchanged when fewer than two sizes compete. The steps count as probe steps.

    Timed as the ladder is (`measure.throughput.profile_throughput`: a fresh model, the
    thread-contention check, interleaved windows), nothing of the caller's state is touched.
    """
    m = plan.measurements
    sizes = [b for b in contenders(plan) if b <= min(m.max_batch_size, task.num_train)]
    if len(sizes) < 2:
        return m
    profile: ThroughputProfile = profile_throughput(
        task,
        batch_sizes=sizes,
        device=rank_device(settings.device),
        amp=settings.amp,
        seed=settings.seed,
        windows=WINDOWS,
        time_budget=BUDGET_SHARE * settings.throughput_seconds,
        check_alignment=False,
        progress=None if progress is None else _relabelled(progress),
    )
    return dataclasses.replace(m, head_to_head=profile, probe_steps=m.probe_steps + profile.steps)


def _relabelled(progress: ProgressFn) -> ProgressFn:
    """`progress` with the ladder's phase name replaced by this step's."""

    def report(phase: str, done: float, total: float | None) -> None:
        progress("head-to-head", done, total)

    return report
