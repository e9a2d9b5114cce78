"""The plan's choice among candidate batches: predicted time to target, its interval, the
ties the timing cannot break, the safest bet when the gain is uncertain, and the batches
the plan's own warnings reject. Pure decision logic over `Measurements`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchlab.core.lr import scale_lr, warmup_steps_for
from batchlab.core.tradeoff import (
    efficient_batch_size,
    predicted_speedup,
    relative_steps,
    speedup_interval,
    worst_case_regrets,
)
from batchlab.measure.probe import BATCHNORM_MIN_BATCH
from batchlab.planner.plan_types import Candidate, Measurements, Recommendation
from batchlab.planner.timing import (
    contended_near,
    head_to_head_sizes,
    step_interval,
    step_seconds,
    timed_points,
)
from batchlab.planner.trust import PlanWarning

# With an uncertain gain, leave B0 only for a batch whose worst case over the B_noise
# interval is clearly better: B0's worst case must exceed it by this factor.
ROBUST_TOLERANCE = 1.1
# Among timing ties, the safest bet over the B_noise interval needs an interval: over one
# value (a B_noise given as a number) it is the fastest, which follows timing jitter, so
# below this spread (hi / lo) the smallest of the ties is taken.
SPREAD_FOR_SAFEST = 1.25
# Ties whose worst cases lie within this factor of the safest's are equally safe, and the
# one predicted fastest of them is taken. Rebuilt on 45 recorded plans (15 per task, each
# with its head-to-head timing; plan_stability.md), the rules gave the same batch in:
# the safest alone 14/15 (mnist1d-cnn), 14/15 (mnist1d-mlp); the smallest of the equally
# safe 13/15, 15/15; the largest 15/15, 10/15; the fastest of them 15/15, 14/15; digits-mlp
# 15/15 under all. One process timed B=512 10% slow against 256 (mnist1d-cnn), which only
# a rule leaning to the larger batch survives; on mnist1d-mlp B=512 and 1024 are about as
# safe, and there a lean to the larger flips with the band of ties.
SAFEST_TOLERANCE = 1.05


@dataclass(frozen=True)
class NoiseEstimate:
    """The predicted critical batch and its interval, as the decisions use them."""

    value: float
    interval: tuple[float, float]
    # Steps at B0 along the path the plan follows (to the target when one is known, else
    # the reference training's end): a warm-up is a fraction of the run it warms up.
    path_steps: float | None = None


def _speedup_range(
    m: Measurements, batch_size: int, step_s: float, noise: NoiseEstimate, ref_step_s: float
) -> tuple[float, float]:
    b0 = m.reference_batch_size
    return speedup_interval(
        batch_size,
        b0,
        noise.interval,
        step_interval(m, batch_size, step_s),
        step_interval(m, b0, ref_step_s),
    )


def _recommend(
    m: Measurements,
    batch_size: int,
    noise: NoiseEstimate,
    rule: str,
    reference_step_s: float,
    reasons: dict[str, str],
) -> Recommendation:
    b_noise = noise.value
    micro, accum, step_s = step_seconds(m, batch_size)
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


def candidates_for(m: Measurements, noise: NoiseEstimate, ref_step_s: float) -> list[Candidate]:
    """Every candidate batch with its predicted steps, step time and speedup over B0."""
    candidates = []
    measured = {p.batch_size for p in timed_points(m)}
    head_to_head = head_to_head_sizes(m)
    low_b, high_b = min(measured, default=0), max(measured, default=0)
    for b in candidate_batch_sizes(m, noise.value):
        micro, accum, step_s = step_seconds(m, b)
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
                head_to_head=b in head_to_head,
            )
        )
    return candidates


def recommend_fastest(
    m: Measurements, candidates: list[Candidate], noise: NoiseEstimate, rule: str, ref_step_s: float
) -> tuple[Recommendation, str, bool]:
    """The candidate with the least predicted time to target, unless its gain lies within
    its own interval: then `_recommend_uncertain` (the safest bet over the B_noise
    interval, or B0, and the verdict says which).

    Candidates the timing cannot tell apart are one choice, made the same way every run:
    of those whose predicted time lies within the timing uncertainty of the fastest
    (`_timing_ties`) and whose own gain is clear, the safest bet over the B_noise interval
    (the least worst-case regret, `core.tradeoff.worst_case_regrets`; the smaller batch
    where equal), and the verdict names the others. An argmax over near-ties flips with a
    few percent of timing jitter (issue 14: two identical plans gave B=64 and B=128), and
    so did the smallest of them, the rule before: on mnist1d-cnn B=512 is predicted 5-11%
    faster than 256, about the timing uncertainty, so 256 fell in or out of the band
    (3 of 5 plans alike). Over the B_noise interval (490-1270) B=512 is never worse than
    256 at those step times, so the safest bet is 512 wherever the band lands. Of ties
    about as safe as the safest (within `SAFEST_TOLERANCE`), the one predicted fastest.

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
    # A clear gain: of the batches as fast within the timing uncertainty and themselves a
    # clear gain (B0 never is: the best's range would then include no gain), the safest.
    ties = [c for c in _timing_ties(m, pool, best) if c.speedup_low > 1.0]
    regrets = worst_case_regrets({c.batch_size: c.step_s for c in pool}, noise.interval)
    lo, hi = noise.interval
    wide = hi > SPREAD_FOR_SAFEST * lo
    if wide:
        safest = min(regrets[c.batch_size] for c in ties)
        chosen = max(
            (c for c in ties if regrets[c.batch_size] <= SAFEST_TOLERANCE * safest),
            key=lambda c: (c.predicted_speedup, -c.batch_size),
        )
    else:  # over a point the safest bet is the fastest, which follows the jitter
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
        safety = (regrets[chosen.batch_size], noise.interval) if wide else (None, None)
        note = _tie_note(ties, best, chosen, *safety)
        reason, verdict = f"{reason}; {note}", f"{verdict}; {note}"
    rec = _recommend(m, chosen.batch_size, noise, rule, ref_step_s, {"batch_size": reason})
    return rec, verdict, False


def _recommend_uncertain(
    m: Measurements,
    pool: list[Candidate],
    best: Candidate,
    noise: NoiseEstimate,
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
    fast, slow = step_interval(m, c.batch_size, c.step_s)
    return c.steps_factor * fast, c.steps_factor * slow


def _timing_ties(m: Measurements, pool: list[Candidate], best: Candidate) -> list[Candidate]:
    """The candidates whose predicted time the timing cannot tell from the best's: their
    time ranges (`_time_range`) overlap the best's. Always includes `best`."""
    _, best_slow = _time_range(m, best)
    return [c for c in pool if c is best or _time_range(m, c)[0] <= best_slow]


def _tie_note(
    ties: list[Candidate],
    best: Candidate,
    chosen: Candidate,
    regret: float | None = None,
    interval: tuple[float, float] | None = None,
) -> str:
    """What the verdict says about candidates the timing could not tell apart: the safest
    of them over the B_noise interval (`regret`, `interval`), or the smallest."""
    sizes = ", ".join(str(c.batch_size) for c in sorted(ties, key=lambda c: c.batch_size))
    head = (
        f"B={sizes} are predicted within the timing uncertainty of the fastest "
        f"(B={best.batch_size}, {best.predicted_speedup:.2f}x): "
    )
    if regret is None or interval is None:
        return head + "the smallest of them is taken, the fewest examples to the target"
    lo, hi = interval
    return head + (
        f"B={chosen.batch_size} is the fastest of the safest of them, at worst "
        f"{regret:.2f}x the best batch's time over B_noise {lo:.3g}-{hi:.3g}"
    )


def _robust_beats_b0(
    m: Measurements, pool: dict[int, float], robust: int, noise: NoiseEstimate, ref_step_s: float
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
    if contended_near(m, robust) or contended_near(m, b0):
        _, times[robust] = step_interval(m, robust, pool[robust])
        times[b0], _ = step_interval(m, b0, ref_step_s)
    regrets = worst_case_regrets(times, noise.interval)
    return regrets[b0] > ROBUST_TOLERANCE * regrets[robust]


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


def recommend_efficient(
    m: Measurements, noise: NoiseEstimate, rule: str, ref_step_s: float
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
