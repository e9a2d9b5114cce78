"""The tracker's estimator: a bias-corrected EMA of per-step (tr(Σ), |G|^2) samples,
each weighted by the inverse of the gradient's scale just before it.

Why the scale weights. A ratio of averages, sum u_s tr_s / sum u_s |G_s|^2, is a
|G_s|^2-weighted average of the per-step B_s = tr_s / |G_s|^2. Early in training |G|^2 can
fall 10% a step (a tiny GPT-2: 40x over its first 30 steps), faster than a 20-step EMA
forgets (beta = 0.95), so the average of |G|^2 was dominated by the first, large values and
B_simple lagged 2-6x behind the exact value at the same weights (median 3.4x after the first
10% of training; `benchmarks/results/noise_tracking.md`, issue 11). Dividing each sample by
a scale known *before* it (a short EMA of the big batch's |G_big|^2 = |G|^2 + tr(Σ)/B_big,
always > 0) makes the ratio an evenly u-weighted average of the B_s wherever B_simple is
below B_big (there |G_big|^2 follows |G|^2); well above it |G_big|^2 ~ tr(Σ)/B_big and the
weights change little. The weights are predictable (they do not depend on the sample they
weight), so each weighted average stays unbiased and the interval below stays honest: it
uses the weights actually applied. With beta = 1 (fixed weights, nothing drifts) the plain
mean is kept. What is left is the window's own lag: a 20-step average of a value that grows
9% a step sits near 0.4x of it.

Kept apart from the measurement (the gradient norms), as nanoGNS does, so that its state is a
handful of floats that `state_dict()` can save and a resumed run can load.
"""

from __future__ import annotations

import math
from typing import Any

from batchlab.errors import ConfigError

DEFAULT_BETA = 0.95  # EMA decay per step: an averaging window of about 20 steps
SCALE_BETA = 0.5  # EMA decay of the scale |G_big|^2 that weights the samples: 1-2 steps


class WeightedMoments:
    """Bias-corrected, scale-weighted EMA of per-step (tr, |G|^2) samples and their moments.

    Sample s gets weight u_s = (1 - beta) beta^(t-s) / c_s, with c_s the scale: an EMA
    (decay SCALE_BETA) of the `scale` values given with the samples before s (the first
    sample uses its own). The estimate is the weighted mean with normalized weights
    u_s / sum(u). Tracking sum(u^2) too gives the variance of that mean (sum(w^2) times the
    weighted sample covariance) and the effective sample size 1 / sum(w^2). beta = 1 is the
    plain running mean, unweighted.
    """

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.count = 0
        self.weight = 0.0  # sum u
        self.weight_sq = 0.0  # sum u^2
        self.sums = [0.0] * 5  # x, y, xx, yy, xy
        self.scale: float | None = None  # EMA of the samples' scales so far

    def add(self, x: float, y: float, scale: float | None = None) -> None:
        """Add one sample; `scale` (> 0, e.g. the big batch's |G_big|^2) weights later ones."""
        values = (x, y, x * x, y * y, x * y)
        b = self.beta
        if b >= 1.0:
            self.sums = [s + v for s, v in zip(self.sums, values, strict=True)]
            self.weight += 1.0
            self.weight_sq += 1.0
        else:
            u = (1 - b) / self._weight_scale(scale)
            self.sums = [b * s + u * v for s, v in zip(self.sums, values, strict=True)]
            self.weight = b * self.weight + u
            self.weight_sq = b * b * self.weight_sq + u * u
        self.count += 1

    def _weight_scale(self, scale: float | None) -> float:
        """The scale known before this sample (then fold this sample's scale in)."""
        if scale is None or not math.isfinite(scale) or scale <= 0.0:
            return self.scale if self.scale is not None else 1.0
        if self.scale is None and self.count > 0:
            # The sums so far came with unit weights (a state saved before the scale weights,
            # or samples given without a scale): put them in this scale's units, which keeps
            # their means and effective size, so the new samples do not drown in them.
            self.sums = [v / scale for v in self.sums]
            self.weight /= scale
            self.weight_sq /= scale * scale
        before = self.scale if self.scale is not None else scale
        self.scale = (
            scale if self.scale is None else (SCALE_BETA * self.scale + (1 - SCALE_BETA) * scale)
        )
        return before

    def estimate(self) -> tuple[float, float, list[list[float]] | None, float]:
        """(mean x, mean y, covariance of the means, degrees of freedom)."""
        if self.count == 0:
            return math.nan, math.nan, None, 0.0
        mx, my, mxx, myy, mxy = (s / self.weight for s in self.sums)
        w2 = self.weight_sq / self.weight**2  # sum of squared normalized weights
        if self.count < 2 or w2 >= 1.0:
            return mx, my, None, 0.0
        scale = w2 / (1.0 - w2)
        vxx = max(mxx - mx * mx, 0.0) * scale
        vyy = max(myy - my * my, 0.0) * scale
        vxy = (mxy - mx * my) * scale
        return mx, my, [[vxx, vxy], [vxy, vyy]], 1.0 / w2 - 1.0

    def state_dict(self) -> dict[str, Any]:
        """Plain floats and ints: loads with `torch.load(..., weights_only=True)`."""
        return {
            "beta": self.beta,
            "count": self.count,
            "weight": self.weight,
            "weight_sq": self.weight_sq,
            "sums": list(self.sums),
            "scale": self.scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["beta"]) != self.beta:
            raise ConfigError(
                f"load_state_dict: expected a state saved with beta={self.beta}, got "
                f"beta={state['beta']}; build the tracker with the saved beta"
            )
        self.count = int(state["count"])
        self.weight = float(state["weight"])
        self.weight_sq = float(state["weight_sq"])
        self.sums = [float(v) for v in state["sums"]]
        scale = state.get("scale")  # absent in states saved before the scale weights
        self.scale = None if scale is None else float(scale)
