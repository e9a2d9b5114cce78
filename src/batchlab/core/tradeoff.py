"""The large-batch trade-off: steps and examples to a target against batch size.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): with the noise scale
B_noise, reaching a target takes S(B) = S_min (1 + B_noise/B) steps and
E(B) = E_min (1 + B/B_noise) examples. Pure formulas with their sources.
"""

from __future__ import annotations

import math

from batchlab.errors import ConfigError


def steps_factor(batch_size: float, b_noise: float) -> float:
    """S(B) / S_min = 1 + B_noise / B (McCandlish et al. 2018, eq. 2.11)."""
    return 1.0 + b_noise / batch_size


def examples_factor(batch_size: float, b_noise: float) -> float:
    """E(B) / E_min = 1 + B / B_noise (McCandlish et al. 2018, eq. 2.11)."""
    return 1.0 + batch_size / b_noise


def relative_steps(batch_size: float, reference_batch_size: float, b_noise: float) -> float:
    """S(B) / S(B0) = (1 + B_noise/B) / (1 + B_noise/B0): no S_min needed."""
    return steps_factor(batch_size, b_noise) / steps_factor(reference_batch_size, b_noise)


def predicted_speedup(
    batch_size: float,
    reference_batch_size: float,
    b_noise: float,
    step_seconds: float,
    reference_step_seconds: float,
) -> float:
    """speedup(B) = [S(B0) t(B0)] / [S(B) t(B)], with S from McCandlish et al. 2018.

    `step_seconds` is the wall time of one optimizer step at effective batch B (including
    accumulation). A value above 1 means B reaches the target sooner than B0.
    """
    return (steps_factor(reference_batch_size, b_noise) * reference_step_seconds) / (
        steps_factor(batch_size, b_noise) * step_seconds
    )


def efficient_batch_size(b_noise: float, *, max_batch_size: int | None = None) -> int:
    """B ~= B_crit ~= B_noise: steps are 2 S_min and examples 2 E_min (McCandlish et al. 2018).

    The balanced choice when compute costs money: any larger batch buys fewer than half
    the steps it adds in examples.
    """
    if not b_noise > 0 or not math.isfinite(b_noise):
        raise ConfigError(f"expected a positive, finite B_noise, got {b_noise!r}")
    b = max(1, round(b_noise))
    return min(b, max_batch_size) if max_batch_size else b


def speedup_interval(
    batch_size: float,
    reference_batch_size: float,
    b_noise_interval: tuple[float, float],
    step_s_interval: tuple[float, float],
    reference_step_s_interval: tuple[float, float],
) -> tuple[float, float]:
    """The range of `predicted_speedup` over the intervals of B_noise and both step times.

    The speedup is monotone in each of the three, so its extremes lie at the corners.
    A gain whose low end is at or below 1 is not a gain the measurements can tell apart
    from none.
    """
    values = [
        predicted_speedup(batch_size, reference_batch_size, bn, t, t0)
        for bn in b_noise_interval
        for t in step_s_interval
        for t0 in reference_step_s_interval
    ]
    return min(values), max(values)


def worst_case_regrets(
    step_s: dict[int, float], b_noise_interval: tuple[float, float], *, points: int = 33
) -> dict[int, float]:
    """Each batch's worst ratio of time to target over the best batch's, across B_noise.

    Time to target at B is proportional to S(B) x t(B) = S_min (1 + B_noise/B) t(B). For
    each B_noise in the interval (log-spaced, ends included; 0 and infinity are their
    limits: the step time alone, and the time per example) the best batch is the one with
    the least time; a batch's regret there is its time over that least. Its worst case is
    the largest regret over the interval: the minimax-regret choice is the batch whose
    worst case is smallest. When B_noise is uncertain, keeping the reference batch is not
    the safe choice by itself: a small B0 can be the worst bet when B_noise may be large.
    """
    if not step_s:
        raise ConfigError("worst_case_regrets: expected at least one batch size, got none")
    bad = {b: t for b, t in step_s.items() if not (b > 0 and math.isfinite(t) and t > 0)}
    if bad or not all(math.isfinite(x) or x == math.inf for x in b_noise_interval):
        raise ConfigError(
            "worst_case_regrets: expected positive batch sizes with finite step times > 0 "
            f"and a B_noise interval of numbers, got step times {bad or '(fine)'} and "
            f"interval {b_noise_interval}"
        )
    batches = list(step_s)
    # 1000x beyond the batch sizes, a ratio is within 0.1% of its limit at 0 or infinity.
    lo = max(b_noise_interval[0], 1e-3 * min(batches))
    hi = max(min(b_noise_interval[1], 1e3 * max(batches)), lo)
    grid = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)] if hi > lo else [lo]
    worst = dict.fromkeys(batches, 1.0)
    for b_noise in grid:
        times = {b: steps_factor(b, b_noise) * step_s[b] for b in batches}
        best = min(times.values())
        for b in batches:
            worst[b] = max(worst[b], times[b] / best)
    return worst
