"""The tracker's estimator: a bias-corrected EMA of per-step (tr(Σ), |G|^2) samples.

Kept apart from the measurement (the gradient norms), as nanoGNS does, so that its state is a
handful of floats that `state_dict()` can save and a resumed run can load.
"""

from __future__ import annotations

import math
from typing import Any

from batchlab.errors import ConfigError

DEFAULT_BETA = 0.95  # EMA decay per step: an averaging window of about 20 steps


class WeightedMoments:
    """Bias-corrected EMA of per-step (tr, |G|^2) samples and of their second moments.

    With weights u_s = (1 - beta) beta^(t-s), the bias-corrected EMA is the weighted mean
    with normalized weights u_s / sum(u). Tracking sum(u^2) too gives the variance of that
    mean (sum(w^2) times the reliability-weighted sample covariance) and the effective
    sample size 1 / sum(w^2). beta = 1 is the plain running mean.
    """

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.count = 0
        self.weight = 0.0  # sum u
        self.weight_sq = 0.0  # sum u^2
        self.sums = [0.0] * 5  # x, y, xx, yy, xy

    def add(self, x: float, y: float) -> None:
        values = (x, y, x * x, y * y, x * y)
        b = self.beta
        if b >= 1.0:
            self.sums = [s + v for s, v in zip(self.sums, values, strict=True)]
            self.weight += 1.0
            self.weight_sq += 1.0
        else:
            self.sums = [b * s + (1 - b) * v for s, v in zip(self.sums, values, strict=True)]
            self.weight = b * self.weight + (1 - b)
            self.weight_sq = b * b * self.weight_sq + (1 - b) ** 2
        self.count += 1

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
