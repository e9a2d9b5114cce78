"""The gradient noise scale's arithmetic: B_simple = tr(Σ)/|G|^2 from batch gradient norms.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv 1812.06162). With G the full-training-set gradient and Σ the covariance of the N
per-example gradients, a batch of B distinct examples has

    E|G_B|^2 = |G|^2 + tr(Σ) w(B),    w(B) = (N - B) / (B (N - 1))

(1/B with replacement). Two batch sizes give two equations, solved exactly by the two-batch
estimator (appendix A.1); Fieller's theorem turns the covariance of (tr(Σ), |G|^2) into an
interval for their ratio. Pure functions and the `NoiseScale` result, shared by the
standalone measurement (`batchlab.measure.noise`) and the tracker (`batchlab.tracking`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchlab.errors import ConfigError
from batchlab.results import JsonResult

DEFAULT_CONFIDENCE = 0.95
# An interval whose high end is more than this many times its low end is "too wide".
MAX_CI_RATIO = 4.0


# --- the arithmetic ----------------------------------------------------------------------


def batch_variance_factor(batch_size: float, num_examples: int | None = None) -> float:
    """w(B) with Var(G_B) = Σ w(B): 1/B with replacement (num_examples None), else the
    finite-population factor (N - B) / (B (N - 1)) for B distinct examples of N."""
    if num_examples is None:
        return 1.0 / batch_size
    if num_examples <= 1:
        return 0.0
    return (num_examples - batch_size) / (batch_size * (num_examples - 1))


def expected_batch_grad_sq(
    grad_norm_sq: float, trace_sigma: float, batch_size: int, num_examples: int | None = None
) -> float:
    """E|G_B|^2 = |G|^2 + tr(Σ) w(B) (McCandlish et al. 2018, eq. A.1, finite-population form)."""
    return grad_norm_sq + trace_sigma * batch_variance_factor(batch_size, num_examples)


def solve_two_batch(
    small_sq: float, w_small: float, big_sq: float, w_big: float
) -> tuple[float, float]:
    """(tr(Σ), |G|^2) from E|G_small|^2 = |G|^2 + tr(Σ) w_small and the same at the big batch."""
    gap = w_small - w_big
    if gap <= 0:
        raise ConfigError(
            f"two-batch estimate: expected the small batch to be smaller than the big one "
            f"(variance factors {w_small:.4g} vs {w_big:.4g}); use more micro-batches"
        )
    trace = (small_sq - big_sq) / gap
    grad_sq = (w_small * big_sq - w_big * small_sq) / gap
    return trace, grad_sq


def two_batch_estimate(
    small_sq: float,
    small_batch: int,
    big_sq: float,
    big_batch: int,
    num_examples: int | None = None,
) -> tuple[float, float]:
    """Unbiased (tr(Σ), |G|^2) from |G_small|^2 and |G_big|^2 (McCandlish et al. 2018, A.1).

    With `num_examples` None this is the paper's formula:
    `|G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)` and
    `tr(Σ) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)`. With N given, both batches
    are taken to be distinct examples of N and the finite-population factor replaces 1/B.
    """
    return solve_two_batch(
        small_sq,
        batch_variance_factor(small_batch, num_examples),
        big_sq,
        batch_variance_factor(big_batch, num_examples),
    )


def t_quantile(confidence: float, dof: float) -> float:
    """Two-sided Student-t quantile at `confidence` with `dof` degrees of freedom."""
    # Trackers ask every few steps with a dof that settles (1/sum(w^2) - 1 of an EMA);
    # scipy's ppf costs ~0.2 ms, so cache it at a resolution far below its effect.
    return _t_quantile(round(confidence, 6), round(dof, 2))


@functools.lru_cache(maxsize=4096)
def _t_quantile(confidence: float, dof: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def ratio_interval(
    trace: float,
    grad_sq: float,
    cov: Sequence[Sequence[float]],
    quantile: float,
) -> tuple[float, float]:
    """Fieller's interval for B = tr/|G|^2, given the 2x2 covariance of (tr, |G|^2).

    The set {B : (tr - B g)^2 <= q^2 Var(tr - B g)}. It is a bounded interval only when
    |G|^2 is significantly above 0 (g^2 > q^2 Var(g)); otherwise the upper end is infinite.
    Clipped to B >= 0, since tr(Σ) >= 0 and |G|^2 >= 0.
    """
    (v_tt, v_tg), (_, v_gg) = cov
    q2 = quantile * quantile
    a = grad_sq * grad_sq - q2 * v_gg
    b = trace * grad_sq - q2 * v_tg
    c = trace * trace - q2 * v_tt
    disc = b * b - a * c
    if a > 0 and grad_sq > 0:
        root = math.sqrt(max(disc, 0.0))
        return max(0.0, (b - root) / a), max(0.0, (b + root) / a)
    # Unbounded: (-inf, r1] U [r2, inf) when a < 0 and disc > 0, else everything.
    if a < 0 and disc > 0:
        root = math.sqrt(disc)
        r1, r2 = sorted(((b - root) / a, (b + root) / a))
        return (0.0 if r1 >= 0 else max(0.0, r2)), math.inf
    return 0.0, math.inf


# --- the result --------------------------------------------------------------------------


def ci_from_json(ci: Any) -> tuple[float, float]:
    """JSON has no infinity: an unbounded end is written as null; read it back as inf."""
    low, high = ci
    return (0.0 if low is None else float(low), math.inf if high is None else float(high))


@dataclass(frozen=True)
class NoiseScale(JsonResult):
    """A measured gradient noise scale, B_simple = tr(Σ)/|G|^2 (McCandlish et al. 2018).

    Attributes:
        b_simple: the estimate; None when the |G|^2 estimate is <= 0 (the noise swamps the
            gradient at this sample size, so only a lower bound is known).
        trace_sigma: unbiased estimate of tr(Σ), per-example gradient variance.
        grad_norm_sq: unbiased estimate of |G|^2, the squared full-data gradient norm.
        b_simple_ci: (low, high) at `confidence`; high is inf (null in JSON) when unbounded.
        num_examples: examples whose gradients went into the estimate.
        method: `two-batch` or `per-example`.
        reliable: False when |G|^2 <= 0, tr(Σ) <= 0, or the interval is unbounded or wider
            than MAX_CI_RATIO (high/low); `reason` says which.
        small_batch / big_batch: the two batch sizes the estimate contrasts (per step, for
            a tracker); dataset_size: the N of the finite-population correction, if any.
        preconditioned: the same for Adam-preconditioned gradients g/(sqrt(v)+eps), when an
            Adam-like optimizer state was available (AdaptDL's "preconditioned" GNS).
    """

    b_simple: float | None
    trace_sigma: float
    grad_norm_sq: float
    b_simple_ci: tuple[float, float]
    num_examples: int
    method: str
    reliable: bool
    reason: str | None = None
    confidence: float = DEFAULT_CONFIDENCE
    small_batch: float | None = None
    big_batch: float | None = None
    dataset_size: int | None = None
    preconditioned: NoiseScale | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "b_simple_ci", ci_from_json(self.b_simple_ci))


def build_noise_scale(
    trace: float,
    grad_sq: float,
    cov: Sequence[Sequence[float]] | None,
    dof: float,
    *,
    num_examples: int,
    method: str,
    confidence: float = DEFAULT_CONFIDENCE,
    max_ci_ratio: float = MAX_CI_RATIO,
    **extra: Any,
) -> NoiseScale:
    """Point estimate, Fieller interval and the reliability verdict, in one place."""
    b_simple = trace / grad_sq if grad_sq > 0 else None
    reason = None
    if cov is None or not dof >= 1:
        ci = (0.0, math.inf)
        reason = "too few samples for an interval; measure more batches or steps"
    else:
        ci = ratio_interval(trace, grad_sq, cov, t_quantile(confidence, dof))
    if reason is not None:
        pass
    elif grad_sq <= 0:
        floor = f" (B_simple is likely above {ci[0]:.3g})" if ci[0] > 0 else ""
        reason = (
            "|G|^2 estimate <= 0: the gradient is below the noise at this sample size"
            f"{floor}; use more or bigger batches"
        )
    elif trace <= 0:
        reason = "tr(Σ) estimate <= 0: no measurable gradient noise; B_simple is near 0"
    elif math.isinf(ci[1]):
        floor = f" (B_simple >= {ci[0]:.3g})" if ci[0] > 0 else ""
        reason = (
            f"interval unbounded: |G|^2 is not significantly above 0 at {confidence:.0%}"
            f"{floor}; use more or bigger batches"
        )
    elif ci[0] <= 0 or ci[1] / ci[0] > max_ci_ratio:
        ratio = ci[1] / ci[0] if ci[0] > 0 else math.inf
        reason = (
            f"interval too wide: [{ci[0]:.3g}, {ci[1]:.3g}] spans {ratio:.3g}x "
            f"(limit {max_ci_ratio:g}x); average over more batches or steps"
        )
    return NoiseScale(
        b_simple=b_simple,
        trace_sigma=trace,
        grad_norm_sq=grad_sq,
        b_simple_ci=ci,
        num_examples=num_examples,
        method=method,
        reliable=reason is None,
        reason=reason,
        confidence=confidence,
        **extra,
    )
