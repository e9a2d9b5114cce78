"""Training callbacks that record how the weights move: distance from init and gradient norm.

Both write into `state.extras`, so their numbers land in `History.extras`:

    history = batchlab.train(task, 64, callbacks=[DistanceFromInit(), GradNormTracker()])
    history.extras["distance_from_init"]["values"]   # |theta_t - theta_0| at logged steps
    history.extras["grad_norm"]["mean"]               # mean |g_B| over the run

Values are logged at geometrically spaced steps (1, 2, 3, 5, 8, ...): Hoffer et al. 2017
found |theta_t - theta_0| grows like log t, which a log-spaced grid shows evenly.
"""

from __future__ import annotations

import math

import torch

from batchlab.callbacks import RunState, TrainCallback


def log_spaced_steps(total_steps: int, points: int) -> set[int]:
    """About `points` distinct steps from 1 to `total_steps`, spaced evenly in log(step)."""
    if total_steps < 1:
        return set()
    points = max(2, points)
    ratio = total_steps ** (1 / (points - 1)) if total_steps > 1 else 1.0
    steps = {min(total_steps, max(1, round(ratio**i))) for i in range(points)}
    steps.add(total_steps)
    return steps


def _params(state: RunState) -> list[torch.Tensor]:
    return [p for p in state.model.parameters() if p.requires_grad]


class DistanceFromInit(TrainCallback):
    """Records |theta_t - theta_0|_2, the Euclidean distance of all trainable weights from
    their initial values (Hoffer et al. 2017, "Train longer, generalize better", sec. 4).

    Writes `extras["distance_from_init"] = {"steps": [...], "values": [...], "final": x}`.
    The initial weights are copied once (one extra copy of the model's parameters).
    """

    def __init__(self, points: int = 40) -> None:
        self.points = points
        self._init: list[torch.Tensor] = []
        self._at: set[int] = set()
        self._steps: list[int] = []
        self._values: list[torch.Tensor] = []

    def _distance(self, state: RunState) -> torch.Tensor:
        with torch.no_grad():
            diffs = [
                (p.detach().float() - p0).norm()
                for p, p0 in zip(_params(state), self._init, strict=True)
            ]
            return torch.linalg.vector_norm(torch.stack(diffs))

    def on_start(self, state: RunState) -> None:
        self._init = [p.detach().float().clone() for p in _params(state)]
        self._at = log_spaced_steps(state.total_steps, self.points)
        self._steps, self._values = [0], [torch.zeros((), device=state.device)]

    def on_step(self, state: RunState) -> None:
        if state.step in self._at:
            self._steps.append(state.step)
            self._values.append(self._distance(state))  # stays on the device: no sync

    def on_end(self, state: RunState) -> None:
        if self._steps[-1] != state.step:
            self._steps.append(state.step)
            self._values.append(self._distance(state))
        values = [float(v) for v in torch.stack(self._values).tolist()]
        state.extras["distance_from_init"] = {
            "steps": list(self._steps),
            "values": values,
            "final": values[-1],
        }
        self._init = []  # free the copy


class GradNormTracker(TrainCallback):
    """Records |g_B|_2, the norm of the mini-batch gradient each optimizer step used.

    Its expectation falls with the batch size: E|g_B|^2 = |G|^2 + tr(Sigma)/B (McCandlish
    et al. 2018, eq. A.1), so the mean over a run is a direct view of gradient noise.
    Steps whose gradient is not finite (an fp16 overflow the scaler skipped) are left out.

    Writes `extras["grad_norm"] = {"mean", "mean_sq", "count", "steps", "values"}`.
    """

    def __init__(self, points: int = 40) -> None:
        self.points = points
        self._at: set[int] = set()
        self._sum = self._sum_sq = self._count = None
        self._steps: list[int] = []
        self._values: list[torch.Tensor] = []

    def on_start(self, state: RunState) -> None:
        zero = torch.zeros((), device=state.device, dtype=torch.float64)
        self._sum, self._sum_sq, self._count = zero.clone(), zero.clone(), zero.clone()
        self._at = log_spaced_steps(state.total_steps, self.points)
        self._steps, self._values = [], []

    def on_step(self, state: RunState) -> None:
        grads = [p.grad for p in _params(state) if p.grad is not None]
        if not grads:
            return
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).double()
            finite = torch.isfinite(norm)
            safe = torch.where(finite, norm, torch.zeros_like(norm))
            # Accumulated on the device: reading it back every step would force a CUDA sync.
            self._sum += safe
            self._sum_sq += safe * safe
            self._count += finite.double()
        if state.step in self._at:
            self._steps.append(state.step)
            self._values.append(norm)

    def on_end(self, state: RunState) -> None:
        count = float(self._count)
        values = [float(v) for v in torch.stack(self._values).tolist()] if self._values else []
        state.extras["grad_norm"] = {
            "mean": float(self._sum) / count if count else math.nan,
            "mean_sq": float(self._sum_sq) / count if count else math.nan,
            "count": int(count),
            "steps": list(self._steps),
            "values": values,
        }
