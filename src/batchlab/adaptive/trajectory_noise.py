"""B_noise for the adaptive controller from the plan's trajectory model, corrected online.

The tracker's B_simple swings 2-5x between neighbouring points (field notes), and it grows as
the loss falls. The plan fits log B_noise = a + b log L to such points
(`batchlab.core.trajectory`, Kaplan et al. 2020 sec. 5.1); `TrajectoryNoise` fits the same
line to the points measured so far in this run, optionally together with a plan's points
(the prior: a plan's `measurements.noise`), and answers the fitted B_noise at the run's
current loss. So the controller decides from the same trajectory model as the plan, and
the online points correct the plan's fit as the run goes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from batchlab.adaptive.measured_noise import MeasuredNoise
from batchlab.callbacks import RunState
from batchlab.core.trajectory import NoiseTrajectory, fit_noise_trajectory
from batchlab.measure.noise_run import NoisePoint


class TrajectoryNoise(MeasuredNoise):
    """A `NoiseSource`: the fitted B_noise(L) at the current training loss.

    Args:
        prior: (loss, B_simple, interval) points measured before, e.g. a plan's noise phase
            (`NoisePoint`s are accepted as they are); they stay in every fit.
        decay, split_every, record_every: as `MeasuredNoise`'s.
        preconditioned: the prior is Adam-preconditioned B_simple (a plan for an Adam-like
            optimizer measures that); the run's own points are then the same metric, so the
            fit never mixes the two (on mnist1d-mlp the preconditioned value is ~2x the plain).

    Until the fit has a point and a training loss was seen, it answers the tracker's own
    B_simple. With a prior, the fit starts as the plan's (the same points, the same model).
    """

    def __init__(
        self,
        prior: Sequence[NoisePoint | tuple[float, float, tuple[float, float]]] = (),
        decay: float = 0.95,
        split_every: int = 4,
        record_every: int = 20,
        preconditioned: bool = False,
    ) -> None:
        super().__init__(decay, split_every, record_every, preconditioned)
        self._key = "b_simple_preconditioned" if preconditioned else "b_simple"
        self.points: list[tuple[float, float, tuple[float, float]]] = []
        for p in prior:
            if isinstance(p, NoisePoint):
                if p.train_loss is not None and p.b_simple is not None:
                    self.add_point(p.train_loss, p.b_simple, p.b_simple_ci)
            else:
                self.add_point(*p)
        self.num_prior = len(self.points)
        self._losses: list[float] = []  # losses since the tracker's last recorded point
        self.current_loss: float | None = None

    def add_point(self, loss: float, b_simple: float, interval: tuple[float, float]) -> None:
        """One (mean training loss, B_simple, its interval) point for the fit."""
        if math.isfinite(loss) and loss > 0 and math.isfinite(b_simple) and b_simple > 0:
            self.points.append((loss, b_simple, tuple(interval)))

    def on_step(self, state: RunState) -> None:
        recorded = len(self.tracker.points)
        super().on_step(state)
        if state.last_loss is not None and math.isfinite(state.last_loss):
            self._losses.append(state.last_loss)
        if len(self.tracker.points) > recorded and self._losses:
            point = self.tracker.points[-1]
            self.current_loss = sum(self._losses) / len(self._losses)
            value = point.get(self._key)  # missing before Adam has second moments
            if value is not None:
                self.add_point(self.current_loss, value, point[f"{self._key}_ci"])
            self._losses = []

    def fit(self) -> NoiseTrajectory | None:
        """The trajectory through every point so far (prior and online); None without one."""
        if not self.points:
            return None
        return fit_noise_trajectory(
            [p[0] for p in self.points], [p[1] for p in self.points], [p[2] for p in self.points]
        )

    def loss_now(self) -> float | None:
        """The training loss the fit is read at: the mean since the tracker's last point,
        else the mean over the window that point covered."""
        if self._losses:
            return sum(self._losses) / len(self._losses)
        return self.current_loss

    def b_simple(self, step: int) -> float | None:
        fit, loss = self.fit(), self.loss_now()
        if fit is None or loss is None:
            return super().b_simple(step)
        return fit.b_noise(loss)

    def describe(self) -> str:
        """Where the last `b_simple` came from, in a few words (for a decision's reason)."""
        fit, loss = self.fit(), self.loss_now()
        if fit is None or loss is None:
            return super().describe()
        prior = f", {self.num_prior} from the plan" if self.num_prior else ""
        return (
            f"trajectory fit {math.exp(fit.log_scale):.3g} L^{fit.exponent:.2f} over "
            f"{fit.num_points} points{prior}, at loss {loss:.3g}"
        )
