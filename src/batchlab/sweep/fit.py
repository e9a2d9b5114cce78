"""The steps-to-target fit S(B) and Shallue et al.'s regimes. Pure numbers, no runs.

The central fit is McCandlish et al. 2018's steps-to-target curve (eq. 2.11):

    S(B) = S_min (1 + B_crit / B)        E(B) = B S(B) = E_min (1 + B / B_crit),

with E_min = S_min B_crit. It is fitted by least squares on log S (each repeat one point),
with a bootstrap interval over repeats. Shallue et al. 2018 describe three regimes of the
curve: perfect scaling (doubling B halves the steps), diminishing returns, and maximal data
parallelism (more B buys no fewer steps); `regime()` draws the borders from the fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from batchlab.errors import ConfigError
from batchlab.results import JsonResult

# A regime border: the batch where one efficiency falls to this level. 0.8 puts the borders
# at B_crit/4 (examples 80% as efficient as at B -> 0) and 4 B_crit (steps within 80% of S_min).
REGIME_EFFICIENCY = 0.8
PERFECT, DIMINISHING, MAXIMAL = "perfect scaling", "diminishing returns", "maximal data parallelism"


@dataclass(frozen=True)
class StepsFit(JsonResult):
    """S(B) = S_min (1 + B_crit/B) fitted to steps-to-target (McCandlish et al. 2018)."""

    s_min: float
    b_crit: float
    e_min: float  # S_min * B_crit
    r2: float  # of log S
    s_min_ci: tuple[float, float] | None
    b_crit_ci: tuple[float, float] | None
    ci_method: str  # "bootstrap over repeats", "bootstrap over batch sizes" or "none"
    num_points: int
    batch_sizes: tuple[int, ...]
    at_bound: bool  # B_crit hit the search range: the data does not pin it down

    def steps(self, batch_size: float) -> float:
        return self.s_min * (1.0 + self.b_crit / batch_size)

    def examples(self, batch_size: float) -> float:
        return self.e_min * (1.0 + batch_size / self.b_crit)


def _profile_fit(
    log_b: np.ndarray, log_s: np.ndarray, lo: float, hi: float
) -> tuple[float, float, float]:
    """Least squares of log S = log S_min + log(1 + B_crit/B) over u = log B_crit in [lo, hi].

    For fixed B_crit the best log S_min is the mean residual, so only u is searched: a grid
    then a bounded refinement. Returns (log S_min, u, sum of squared residuals).
    """
    from scipy.optimize import minimize_scalar

    def ssr_for(u: np.ndarray) -> np.ndarray:
        shape = np.log1p(np.exp(u[:, None] - log_b[None, :]))  # log(1 + B_crit/B)
        resid = log_s[None, :] - shape
        centered = resid - resid.mean(axis=1, keepdims=True)
        return (centered**2).sum(axis=1)

    grid = np.linspace(lo, hi, 241)
    ssr = ssr_for(grid)
    i = int(np.argmin(ssr))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    res = minimize_scalar(
        lambda u: float(ssr_for(np.array([u]))[0]),
        bounds=(a, b),
        method="bounded",
        options={"xatol": 1e-6},
    )
    u = float(res.x) if res.fun <= ssr[i] else float(grid[i])
    log_s_min = float(np.mean(log_s - np.log1p(np.exp(u - log_b))))
    return log_s_min, u, float(ssr_for(np.array([u]))[0])


def fit_steps_to_target(
    batch_sizes: Sequence[float],
    steps: Sequence[float],
    *,
    n_boot: int = 500,
    seed: int = 0,
    bound_factor: float = 100.0,
) -> StepsFit:
    """Fit S(B) = S_min (1 + B_crit/B) by least squares on log S; bootstrap the interval.

    Each (batch size, steps) pair is one observation: pass every repeat. The interval is a
    95% percentile bootstrap, resampling repeats within each batch size when some batch
    has two or more, else resampling batch sizes. B_crit is searched within
    [min B / bound_factor, max B * bound_factor]; `at_bound` says when it ended on an edge.
    """
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ConfigError("fit: expected equal-length sequences of batch sizes and steps")
    if np.any(b <= 0) or np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ConfigError("fit: expected positive, finite batch sizes and steps")
    distinct = np.unique(b)
    if len(distinct) < 3:
        raise ConfigError(
            f"fit: expected steps at >= 3 different batch sizes, got {len(distinct)}; "
            "add batch sizes or use a target more of them reach"
        )
    log_b, log_s = np.log(b), np.log(s)
    lo, hi = math.log(distinct[0] / bound_factor), math.log(distinct[-1] * bound_factor)
    log_s_min, u, ssr = _profile_fit(log_b, log_s, lo, hi)
    sst = float(((log_s - log_s.mean()) ** 2).sum())
    r2 = 1.0 - ssr / sst if sst > 0 else math.nan
    at_bound = min(u - lo, hi - u) < 1e-3 * (hi - lo)

    groups = [np.flatnonzero(b == value) for value in distinct]
    by_repeats = any(len(g) >= 2 for g in groups)
    rng = np.random.default_rng(seed)
    samples: list[tuple[float, float]] = []
    for _ in range(n_boot):
        if by_repeats:
            idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        else:
            idx = rng.choice(len(b), size=len(b), replace=True)
            if len(np.unique(b[idx])) < 3:
                continue
        ls, uu, _ = _profile_fit(log_b[idx], log_s[idx], lo, hi)
        samples.append((math.exp(ls), math.exp(uu)))
    s_ci = b_ci = None
    method = "none"
    if len(samples) >= 20:
        arr = np.array(samples)
        s_ci = (float(np.percentile(arr[:, 0], 2.5)), float(np.percentile(arr[:, 0], 97.5)))
        b_ci = (float(np.percentile(arr[:, 1], 2.5)), float(np.percentile(arr[:, 1], 97.5)))
        method = "bootstrap over repeats" if by_repeats else "bootstrap over batch sizes"
    s_min, b_crit = math.exp(log_s_min), math.exp(u)
    return StepsFit(
        s_min=s_min,
        b_crit=b_crit,
        e_min=s_min * b_crit,
        r2=r2,
        s_min_ci=s_ci,
        b_crit_ci=b_ci,
        ci_method=method,
        num_points=len(b),
        batch_sizes=tuple(int(v) for v in distinct),
        at_bound=bool(at_bound),
    )


def regime(batch_size: float, b_crit: float, efficiency: float = REGIME_EFFICIENCY) -> str:
    """Shallue et al. 2018's regime of `batch_size` under the fitted curve.

    Perfect scaling while examples stay >= `efficiency` as useful as at B -> 0, i.e.
    E_min/E(B) = 1/(1 + B/B_crit) >= eff; maximal data parallelism once steps are within
    `efficiency` of the floor, S_min/S(B) = 1/(1 + B_crit/B) >= eff; in between,
    diminishing returns. With eff = 0.8 the borders are B_crit/4 and 4 B_crit.
    """
    k = 1.0 / efficiency - 1.0
    if batch_size <= b_crit * k:
        return PERFECT
    if batch_size >= b_crit / k:
        return MAXIMAL
    return DIMINISHING


def regime_borders(b_crit: float, efficiency: float = REGIME_EFFICIENCY) -> tuple[float, float]:
    k = 1.0 / efficiency - 1.0
    return b_crit * k, b_crit / k
