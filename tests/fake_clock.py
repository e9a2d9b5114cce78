"""A clock tests move by hand, and a callback that makes every run's time known exactly.

Injected as `run_training(..., clock=clock)`: the loop, its recorder and the adaptive step
timer read it instead of `time.perf_counter`, so their arithmetic can be checked exactly.
"""

from __future__ import annotations

import batchlab


class FakeClock:
    """Seconds that move only by `advance`. Costs are powers of two: sums stay exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StepCosts(batchlab.TrainCallback):
    """Each forward of b examples costs `alpha + beta * b`, each optimizer step `gamma`.

    Keeps the totals apart for training and evaluation (the model's mode says which), and
    the training total at each evaluation.
    """

    def __init__(self, clock: FakeClock, alpha: float, beta: float, gamma: float) -> None:
        self.clock, self.alpha, self.beta, self.gamma = clock, alpha, beta, gamma
        self.train = 0.0
        self.eval = 0.0
        self.train_at_eval: list[float] = []

    def on_start(self, state) -> None:
        state.model.register_forward_pre_hook(self._forward)
        state.optimizer.register_step_post_hook(self._optimizer_step)

    def on_eval(self, state, evaluation) -> None:
        self.train_at_eval.append(self.train)

    def _forward(self, module, args) -> None:
        cost = self.alpha + self.beta * args[0].shape[0]
        self.clock.advance(cost)
        if module.training:
            self.train += cost
        else:
            self.eval += cost

    def _optimizer_step(self, optimizer, args, kwargs) -> None:
        self.clock.advance(self.gamma)
        self.train += self.gamma
