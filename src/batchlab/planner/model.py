"""The plan's data and its pure decision logic: measurements in, recommendations out.

Nothing here measures. `build_plan` takes what the probes and the noise measurement found
and applies the pure models of `batchlab.core`; tests feed it known answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from batchlab.core.batching import split
from batchlab.core.lr import TRAIN_LR_RULES, scale_lr, warmup_steps_for
from batchlab.core.lr_choice import LrCheck
from batchlab.core.optim import default_lr_rule
from batchlab.core.schedule import ScheduleForecast
from batchlab.core.step_time import StepTimeModel, fit_step_time, median_step_interval
from batchlab.core.tradeoff import (
    efficient_batch_size,
    predicted_speedup,
    relative_steps,
    speedup_interval,
    worst_case_regrets,
)
from batchlab.errors import ConfigError
from batchlab.measure.memory_fit import MemoryPoint
from batchlab.measure.noise_run import NoisePoint, NoiseRun
from batchlab.measure.probe import BATCHNORM_MIN_BATCH, ProbeResult
from batchlab.measure.throughput import CONTENTION_WINDOW_RATIO, ThroughputPoint
from batchlab.planner.noise_path import NoiseOutlook, correlation_factor, noise_outlook
from batchlab.planner.plan_file import check_plan_fields
from batchlab.planner.trust import (
    PlanWarning,
    contention_warning,
    loss_fall_warning,
    probe_warnings,
)
from batchlab.results import JsonResult, read_json_object, type_problems

# With an uncertain gain, leave B0 only for a batch whose worst case over the B_noise
# interval is clearly better: B0's worst case must exceed it by this factor.
ROBUST_TOLERANCE = 1.1


@dataclass(frozen=True)
class Measurements(JsonResult):
    """Everything the plan is built from; saved inside the plan so reports need no re-run."""

    task: str
    device: str
    num_train: int
    reference_batch_size: int
    reference_lr: float
    optimizer: str
    has_batchnorm: bool
    reference_epochs: int | None
    max_batch_size: int
    memory_predicted_only: bool
    fixed_bytes: float
    bytes_per_sample: float
    budget_bytes: float | None
    margin: float
    memory_points: tuple[MemoryPoint, ...]  # the probe's points that ran (peak_bytes known)
    throughput: tuple[ThroughputPoint, ...]
    knee_batch_size: int
    aligned_multiple: int | None  # round to this multiple only where the probe showed it pays
    noise: tuple[NoisePoint, ...]
    noise_reliable: bool = True
    noise_reason: str | None = None
    probe_steps: int = 0
    noise_steps: int = 0
    # The noise phase: its batch (0: the reference), how far apart its points are and how
    # many steps each averages (the tracker's EMA window), where it reached the target, the
    # target metric at its evaluations, and its budget (fraction of the reference training).
    noise_batch_size: int = 0
    noise_every: int = 1
    noise_window: float = 1.0
    noise_target_step: int | None = None
    target_evals: tuple[tuple[int, float], ...] = ()
    noise_budget: float | None = None
    # The noise points are B_simple of Adam-preconditioned gradients (`measure_noise`).
    noise_preconditioned: bool = False

    @property
    def reference_examples(self) -> int:
        """Examples of the whole reference training: task epochs x N."""
        return (self.reference_epochs or 1) * self.num_train

    @property
    def noise_examples(self) -> int:
        return self.noise_steps * (self.noise_batch_size or self.reference_batch_size)


@dataclass(frozen=True)
class Recommendation(JsonResult):
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    lr: float
    lr_rule: str
    warmup_steps: int
    predicted_speedup: float
    steps_factor: float  # S(B) / S(B0)
    step_s: float
    reasons: dict[str, str] = field(default_factory=dict)
    # From the interval of the predicted critical batch and the timing spread of the ladder.
    predicted_speedup_interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class Candidate(JsonResult):
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    steps_factor: float  # S(B) / S(B0)
    step_s: float
    predicted_speedup: float
    relative_time: float  # 1 / predicted_speedup
    measured: bool  # B was on the measured throughput ladder
    speedup_low: float | None = None  # interval of predicted_speedup
    speedup_high: float | None = None
    # The micro-batch lies outside the measured ladder: its step time is extrapolated by
    # the step-time model, not read between two measured points.
    extrapolated: bool = False

    @property
    def timing(self) -> str:
        """How its step time was found, as the CLI table and the report label it:
        "measured", "interpolated" (between ladder points) or "extrapolated" (beyond)."""
        if self.extrapolated:
            return "extrapolated"
        return "measured" if self.measured else "interpolated"


@dataclass(frozen=True)
class Plan(JsonResult):
    """What to train with, and why. `batchlab plan` prints it; `batchlab report` draws it."""

    task: str
    device: str
    reference: dict[str, float]  # {"batch_size": B0, "lr": lr0}
    recommended: Recommendation
    efficient: Recommendation
    max_batch_size: int
    knee_batch_size: int
    b_simple: float  # the predicted critical batch B_bar (see `noise_outlook`), or as given
    b_simple_source: str
    b_simple_trajectory: tuple[NoisePoint, ...]
    candidates: tuple[Candidate, ...]
    lr_alternatives: dict[str, float]  # lr for the recommended batch under each rule
    warnings: tuple[PlanWarning, ...]
    measurements: Measurements
    plan_seconds: float = 0.0
    plan_steps: int = 0
    predicted_seconds_to_target: float | None = None
    reference_seconds_to_target: float | None = None
    target: str | None = None
    command: str = ""
    partial: bool = False
    # The full measurements behind the plan, so `batchlab report plan.json` can redraw
    # every figure without measuring again. None for plans built from synthetic inputs.
    probe: ProbeResult | None = None
    noise: NoiseRun | None = None
    b_simple_interval: tuple[float, float] | None = None
    noise_outlook: NoiseOutlook | None = None
    # "keep B0" in plain words when the best gain is inside its interval, else what to use.
    verdict: str = ""
    keep_reference: bool = False
    # What the plan cost in training examples, next to the reference training's.
    cost: dict[str, float] = field(default_factory=dict)
    # The recommended LR probed at the recommended batch (`batchlab.planner.lr_check`);
    # None when the check was skipped (`check_lr=False`) or for plans saved before it.
    lr_check: LrCheck | None = None
    schedule: ScheduleForecast | None = None  # B(t) along the path (`planner.schedule`)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan saved by `Plan.save` (what `batchlab plan` writes as JSON).

        Every reader of a plan file goes through here, so a missing, empty, cut-off or
        foreign file, or one with a field of the wrong type, gets one clear `ConfigError`
        that names the file and what is wrong.
        """
        remake = "make the plan again with `batchlab plan` (save its JSON) or `Plan.save`"
        data = read_json_object(path, "plan file", remake)
        check_plan_fields(data, path, Plan)
        try:
            plan = cls.from_dict(data)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:  # a field's shape
            raise ConfigError(
                f"plan file {str(path)!r} does not match this version's plan schema ({exc}); "
                "make the plan again with `batchlab plan`"
            ) from None
        problems = type_problems(plan)
        if problems:
            raise ConfigError(
                f"plan file {str(path)!r} does not match this version's plan schema "
                f"({'; '.join(problems)}); make the plan again with `batchlab plan`"
            )
        return plan


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


def candidate_batch_sizes(m: Measurements, b_noise: float) -> list[int]:
    """The measured ladder, powers of two, B0 and ~B_noise, capped at the training set."""
    sizes = {p.batch_size for p in m.throughput}
    sizes |= {2**k for k in range(0, 30) if 2**k <= m.num_train}
    sizes.add(m.reference_batch_size)
    sizes.add(max(1, round(b_noise)))
    if m.aligned_multiple:
        sizes = {
            max(m.aligned_multiple, m.aligned_multiple * round(b / m.aligned_multiple))
            if b >= m.aligned_multiple
            else b
            for b in sizes
        }
        sizes.add(m.reference_batch_size)
    return sorted(b for b in sizes if 1 <= b <= m.num_train)


def step_time_model(m: Measurements) -> StepTimeModel:
    """The shared step-time model through the measured ladder (one micro-batch a step, so
    the per-step cost is folded into the micro-batch time), extrapolated conservatively."""
    return fit_step_time([(p.batch_size, 1, p.step_s) for p in m.throughput])


def _step_seconds(m: Measurements, batch_size: int) -> tuple[int, int, float]:
    """`(micro, accumulation, seconds per optimizer step)` at B within the memory max."""
    micro, accum = split(batch_size, m.max_batch_size)
    return micro, accum, step_time_model(m).step_seconds(micro, accum)


def _step_interval(m: Measurements, batch_size: int, step_s: float) -> tuple[float, float]:
    """The step time's range, from the timing of the nearest measured ladder point, as a
    ratio applied to `step_s`: the uncertainty of its median
    (`core.step_time.median_step_interval`), or, where its windows ranged over more than
    `CONTENTION_WINDOW_RATIO` (contended: a few windows stalled, not noise a median
    averages out), the whole range of its windows.

    Not the window range everywhere: the fastest and slowest of 3-5 windows are the most
    volatile numbers of a ladder, and a gain interval or tie read from them flips between
    identical plans (benchmarks/results/plan_stability.md)."""
    p = _timed_point_near(m, batch_size)
    if p is None:
        return step_s, step_s
    fast, slow = median_step_interval(
        p.step_s, p.samples_per_s, p.samples_per_s_low, p.samples_per_s_high,
        1 if _contended(p) else p.windows,
    )  # fmt: skip
    return step_s * fast / p.step_s, step_s * slow / p.step_s


@dataclass(frozen=True)
class _Noise:
    """The predicted critical batch and its interval, as the decisions use them."""

    value: float
    interval: tuple[float, float]
    # Steps at B0 along the path the plan follows (to the target when one is known, else
    # the reference training's end): a warm-up is a fraction of the run it warms up.
    path_steps: float | None = None


def _speedup_range(
    m: Measurements, batch_size: int, step_s: float, noise: _Noise, ref_step_s: float
) -> tuple[float, float]:
    b0 = m.reference_batch_size
    return speedup_interval(
        batch_size,
        b0,
        noise.interval,
        _step_interval(m, batch_size, step_s),
        _step_interval(m, b0, ref_step_s),
    )


def _recommend(
    m: Measurements,
    batch_size: int,
    noise: _Noise,
    rule: str,
    reference_step_s: float,
    reasons: dict[str, str],
) -> Recommendation:
    b_noise = noise.value
    micro, accum, step_s = _step_seconds(m, batch_size)
    lr = scale_lr(m.reference_lr, m.reference_batch_size, batch_size, rule, b_simple=b_noise)
    if noise.path_steps:  # the predicted steps to the end of the path, at this batch
        factor = relative_steps(batch_size, m.reference_batch_size, b_noise)
        total_steps = max(1, math.ceil(noise.path_steps * factor))
        planned = "steps predicted for the run"
    else:
        total_steps = (m.reference_epochs or 1) * math.ceil(m.num_train / batch_size)
        planned = "planned steps"
    warmup = warmup_steps_for(lr / m.reference_lr, total_steps)
    reasons = dict(reasons)
    reasons["lr"] = (
        f"{rule} rule from the reference (B0={m.reference_batch_size}, lr={m.reference_lr:g}) "
        f"for {m.optimizer}: x{lr / m.reference_lr:.3g}"
    )
    reasons["warmup"] = (
        f"LR grows {lr / m.reference_lr:.2g}x > 2x: linear warm-up over 5% of the "
        f"{total_steps} {planned} (Goyal et al. 2017)"
        if warmup
        else f"LR grows {lr / m.reference_lr:.2g}x <= 2x: no warm-up needed"
    )
    reasons["accumulation"] = (
        f"{batch_size} > memory max {m.max_batch_size}: {accum} micro-batches of {micro}"
        if accum > 1
        else f"fits in memory (max {m.max_batch_size}): no accumulation"
    )
    return Recommendation(
        batch_size=batch_size,
        micro_batch_size=micro,
        accumulation_steps=accum,
        lr=lr,
        lr_rule=rule,
        warmup_steps=warmup,
        predicted_speedup=predicted_speedup(
            batch_size, m.reference_batch_size, b_noise, step_s, reference_step_s
        ),
        steps_factor=relative_steps(batch_size, m.reference_batch_size, b_noise),
        step_s=step_s,
        reasons=reasons,
        predicted_speedup_interval=_speedup_range(m, batch_size, step_s, noise, reference_step_s),
    )


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
    noise_est = _Noise(b_noise, interval, None if outlook is None else outlook.end_step)
    rule = lr_rule or default_lr_rule(m.optimizer)
    _, _, ref_step_s = _step_seconds(m, m.reference_batch_size)
    candidates = _candidates(m, noise_est, ref_step_s)
    recommended, verdict, keep = _recommend_fastest(m, candidates, noise_est, rule, ref_step_s)
    efficient = _recommend_efficient(m, noise_est, rule, ref_step_s)
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


def _candidates(m: Measurements, noise: _Noise, ref_step_s: float) -> list[Candidate]:
    """Every candidate batch with its predicted steps, step time and speedup over B0."""
    candidates = []
    measured = {p.batch_size for p in m.throughput}
    low_b, high_b = min(measured, default=0), max(measured, default=0)
    for b in candidate_batch_sizes(m, noise.value):
        micro, accum, step_s = _step_seconds(m, b)
        speedup = predicted_speedup(b, m.reference_batch_size, noise.value, step_s, ref_step_s)
        low, high = _speedup_range(m, b, step_s, noise, ref_step_s)
        candidates.append(
            Candidate(
                batch_size=b,
                micro_batch_size=micro,
                accumulation_steps=accum,
                steps_factor=relative_steps(b, m.reference_batch_size, noise.value),
                step_s=step_s,
                predicted_speedup=speedup,
                relative_time=1.0 / speedup,
                measured=b in measured,
                speedup_low=low,
                speedup_high=high,
                extrapolated=b not in measured and not low_b <= micro <= high_b,
            )
        )
    return candidates


def _recommend_fastest(
    m: Measurements, candidates: list[Candidate], noise: _Noise, rule: str, ref_step_s: float
) -> tuple[Recommendation, str, bool]:
    """The candidate with the least predicted time to target, unless its gain lies within
    its own interval: then `_recommend_uncertain` (the safest bet over the B_noise
    interval, or B0, and the verdict says which).

    Candidates the timing cannot tell apart are one choice, made the same way every run:
    of those whose predicted time lies within the timing uncertainty of the fastest
    (`_timing_ties`) and whose own gain is clear, the smallest batch (the fewest examples
    to the target: the noise model's own preference), and the verdict names the others.
    An argmax over near-ties flips with a few percent of timing jitter (issue 14: two
    identical plans gave B=64 and B=128).

    Only candidates the plan's own warnings do not reject compete (`untrusted_reason`):
    a batch whose step time is extrapolated past the ladder, or a BatchNorm micro-batch
    under 8, is never the recommendation; `untrusted_warning` names a faster one left out.
    """
    b0 = m.reference_batch_size
    trusted = [c for c in candidates if c.batch_size == b0 or untrusted_reason(m, c) is None]
    pool = trusted or candidates
    best = max(pool, key=lambda c: (c.predicted_speedup, -c.batch_size))
    if best.batch_size == b0 or best.speedup_low <= 1.0:
        return _recommend_uncertain(m, pool, best, noise, rule, ref_step_s)
    # A clear gain: the smallest batch that is as fast within the timing uncertainty and
    # itself a clear gain (B0 never is: the best's range would then include no gain).
    ties = [c for c in _timing_ties(m, pool, best) if c.speedup_low > 1.0]
    chosen = min(ties, key=lambda c: c.batch_size)
    span = f"{chosen.speedup_low:.2f}-{chosen.speedup_high:.2f}x"
    reason = (
        f"minimum predicted time to target among {len(candidates)} candidates: "
        f"{chosen.predicted_speedup:.2f}x the reference B0={b0} (interval {span}; "
        f"steps x{chosen.steps_factor:.2f}, step time x{chosen.step_s / ref_step_s:.2f})"
    )
    verdict = (
        f"use B={chosen.batch_size}: predicted {chosen.predicted_speedup:.2f}x faster to the "
        f"target than B0={b0} (interval {span})"
    )
    if len(ties) > 1:
        note = _tie_note(ties, best, chosen)
        reason, verdict = f"{reason}; {note}", f"{verdict}; {note}"
    rec = _recommend(m, chosen.batch_size, noise, rule, ref_step_s, {"batch_size": reason})
    return rec, verdict, False


def _recommend_uncertain(
    m: Measurements,
    pool: list[Candidate],
    best: Candidate,
    noise: _Noise,
    rule: str,
    ref_step_s: float,
) -> tuple[Recommendation, str, bool]:
    """The gain is uncertain. B0 is the safe answer only if it is a safe bet across the
    B_noise interval: a small B0 can be the worst one when B_noise may be large (dots from
    B0=32: B0 up to 9.5x the best, B=256 at most 1.75x)."""
    b0 = m.reference_batch_size
    step_times = {c.batch_size: c.step_s for c in pool}
    regrets = worst_case_regrets(step_times, noise.interval)
    robust = min(regrets, key=lambda b: (regrets[b], b))
    lo, hi = noise.interval
    if robust != b0 and _robust_beats_b0(m, step_times, robust, noise, ref_step_s):
        verdict = (
            f"use B={robust}: the gain is uncertain (B_noise {lo:.3g}-{hi:.3g}), and "
            f"B={robust} is the safest bet: at worst {regrets[robust]:.2f}x the best "
            f"batch's time over that interval, where B0={b0} could be {regrets[b0]:.2f}x"
        )
        rec = _recommend(m, robust, noise, rule, ref_step_s, {"batch_size": verdict})
        return rec, verdict, False
    span = f"{best.speedup_low:.2f}-{best.speedup_high:.2f}x"
    verdict = (
        f"keep B0={b0}: the reference batch is predicted fastest"
        if best.batch_size == b0
        else f"keep B0={b0}: the best predicted gain, {best.predicted_speedup:.2f}x at "
        f"B={best.batch_size}, lies within its interval ({span}), which includes no gain"
    )
    rec = _recommend(m, b0, noise, rule, ref_step_s, {"batch_size": verdict})
    return rec, verdict, True


def _time_range(m: Measurements, c: Candidate) -> tuple[float, float]:
    """The candidate's predicted time to target (relative: S(B)/S(B0) x step seconds) at
    the fast and slow ends of its step time's uncertainty, B_noise at its value."""
    fast, slow = _step_interval(m, c.batch_size, c.step_s)
    return c.steps_factor * fast, c.steps_factor * slow


def _timing_ties(m: Measurements, pool: list[Candidate], best: Candidate) -> list[Candidate]:
    """The candidates whose predicted time the timing cannot tell from the best's: their
    time ranges (`_time_range`) overlap the best's. Always includes `best`."""
    _, best_slow = _time_range(m, best)
    return [c for c in pool if c is best or _time_range(m, c)[0] <= best_slow]


def _tie_note(ties: list[Candidate], best: Candidate, chosen: Candidate) -> str:
    """What the verdict says about candidates the timing could not tell apart."""
    sizes = ", ".join(str(c.batch_size) for c in sorted(ties, key=lambda c: c.batch_size))
    return (
        f"B={sizes} are predicted within the timing uncertainty of the fastest "
        f"(B={best.batch_size}, {best.predicted_speedup:.2f}x): the smallest of them is "
        "taken, the fewest examples to the target"
    )


def _robust_beats_b0(
    m: Measurements, pool: dict[int, float], robust: int, noise: _Noise, ref_step_s: float
) -> bool:
    """Whether `robust` is clearly the safer bet than B0: B0's worst case over the B_noise
    interval more than `ROBUST_TOLERANCE` times its, on the median step times. Where the
    timing of either is contended (windows over `CONTENTION_WINDOW_RATIO` apart), the
    whole spread goes in B0's favour (robust at its slowest window, B0 at its fastest):
    timings too noisy to tell the two apart keep B0.

    Not the window ranges everywhere: they are the most volatile statistic of a ladder.
    On mnist1d-cnn (B0=100) their extremes put this ratio at 0.79-1.25 over seven plans
    with the same noise phase, on both sides of 1.1, where the medians gave 1.23-1.67
    (benchmarks/results/plan_stability.md)."""
    b0 = m.reference_batch_size
    times = dict(pool)
    if _contended_near(m, robust) or _contended_near(m, b0):
        _, times[robust] = _step_interval(m, robust, pool[robust])
        times[b0], _ = _step_interval(m, b0, ref_step_s)
    regrets = worst_case_regrets(times, noise.interval)
    return regrets[b0] > ROBUST_TOLERANCE * regrets[robust]


def _timed_point_near(m: Measurements, batch_size: int) -> ThroughputPoint | None:
    """The ladder point nearest `batch_size` (in log B) with a timing range, or None."""
    points = [p for p in m.throughput if p.samples_per_s_low > 0 and p.samples_per_s_high > 0]
    if not points:
        return None
    return min(points, key=lambda p: abs(math.log(p.batch_size / batch_size)))


def _contended(p: ThroughputPoint) -> bool:
    """Whether the point's windows were over `CONTENTION_WINDOW_RATIO` apart (stalls, not
    noise a median averages out)."""
    return p.samples_per_s_high > CONTENTION_WINDOW_RATIO * p.samples_per_s_low


def _contended_near(m: Measurements, batch_size: int) -> bool:
    """Whether the ladder point nearest `batch_size` was contended (`_contended`)."""
    p = _timed_point_near(m, batch_size)
    return p is not None and _contended(p)


def untrusted_reason(m: Measurements, c: Candidate) -> str | None:
    """Why the plan must not recommend candidate `c`, or None: its step time extrapolated
    beyond the measured ladder (issue 14: B=64 was recommended from extrapolated times),
    or a BatchNorm micro-batch under `BATCHNORM_MIN_BATCH` (its own warning rejects it)."""
    if c.extrapolated:
        return "its step time is extrapolated beyond the measured throughput ladder"
    if m.has_batchnorm and c.micro_batch_size < BATCHNORM_MIN_BATCH:
        return (
            f"the model has BatchNorm and its micro-batch {c.micro_batch_size} is under "
            f"{BATCHNORM_MIN_BATCH}"
        )
    return None


def untrusted_warning(
    m: Measurements, candidates: list[Candidate], recommended: Recommendation
) -> PlanWarning | None:
    """A warning naming a candidate predicted faster than the recommendation but left out."""
    left_out = [
        c
        for c in candidates
        if c.predicted_speedup > recommended.predicted_speedup
        and c.batch_size != m.reference_batch_size
        and untrusted_reason(m, c) is not None
    ]
    if not left_out:
        return None
    best = max(left_out, key=lambda c: c.predicted_speedup)
    return PlanWarning(
        "faster-batch-untrusted",
        f"B={best.batch_size} is predicted {best.predicted_speedup:.2f}x but not recommended: "
        f"{untrusted_reason(m, best)}; time more sizes (a larger `throughput_seconds`) to "
        "measure it",
    )


def _recommend_efficient(
    m: Measurements, noise: _Noise, rule: str, ref_step_s: float
) -> Recommendation:
    """B ~ B_noise, within the training set and on the aligned multiple where it pays."""
    eff_b = min(efficient_batch_size(noise.value), m.num_train)
    if m.has_batchnorm:  # its own BatchNorm warning would reject a smaller micro-batch
        eff_b = min(max(eff_b, BATCHNORM_MIN_BATCH), m.num_train)
    if m.aligned_multiple and eff_b >= m.aligned_multiple:
        eff_b = m.aligned_multiple * round(eff_b / m.aligned_multiple)
    reason = (
        f"B ~ B_noise = {noise.value:.0f}: 2x the minimum steps and 2x the minimum "
        "examples (McCandlish et al. 2018), the balanced choice when compute costs money"
    )
    return _recommend(m, eff_b, noise, rule, ref_step_s, {"batch_size": reason})


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
    contention = contention_warning(m.throughput)
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
