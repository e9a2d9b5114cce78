"""The bookkeeping of one training run, kept by the training loop (`batchlab.loop`).

A `RunRecorder` keeps the loss log (read back to the host lazily: on CUDA that read is a
sync), the evaluations, training vs evaluation wall-clock, the target and divergence, and
turns it all into a `History` at the end. The loop and its batch policy only decide what to
train on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from batchlab.callbacks import RunState, TrainCallback, evaluate
from batchlab.data import Batcher
from batchlab.history import Evaluation, History
from batchlab.target import Target


class RunRecorder:
    """Records one run into its `History`.

    Args:
        clock: seconds as a float, `time.perf_counter` by default; tests pass a fake one to
            check the training/evaluation time split exactly.
    """

    def __init__(
        self,
        state: RunState,
        *,
        amp: bool,
        target: Target | None,
        callbacks: Sequence[TrainCallback],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.state = state
        self.clock = clock
        self.amp = amp
        self.target = target
        self.callbacks = callbacks
        task = state.task
        self.val_batcher = (
            Batcher(task.val_data, state.device, task.collate_fn)
            if task.val_data is not None
            else None
        )
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.evals: list[Evaluation] = []
        self._pending: list[torch.Tensor] = []
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self._started: float | None = None
        self.hit: Evaluation | None = None
        self.diverged_step: int | None = None

    # -- clock: training time excludes evaluation ---------------------------------------
    def _sync(self) -> None:
        if self.state.device.type == "cuda":
            torch.cuda.synchronize(self.state.device)

    def start_clock(self) -> None:
        self._started = self.clock()

    def stop_clock(self) -> None:
        if self._started is not None:
            self._sync()
            self.train_seconds += self.clock() - self._started
            self._started = None

    # -- steps --------------------------------------------------------------------------
    def record_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Log a finished optimizer step; its loss stays on the device until `flush`."""
        self._pending.append(loss)
        self.steps.append(step)
        self.lrs.append(lr)

    def flush(self) -> int | None:
        """Read pending losses back; on the first non-finite one, record and return its step."""
        if not self._pending:
            return None
        pending, self._pending = self._pending, []
        values = [pending[0].item()] if len(pending) == 1 else torch.stack(pending).tolist()
        first = len(self.losses)
        self.losses.extend(values)
        self.state.last_loss = values[-1]
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                self.diverged_step = self.steps[first + offset]
                return self.diverged_step
        return None

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self) -> Evaluation:
        """Evaluate now (clock paused), tell the callbacks, check the target."""
        running = self._started is not None
        self.stop_clock()
        state = self.state
        t0 = self.clock()
        val_loss, metrics = (None, {})
        if self.val_batcher is not None:
            val_loss, metrics = evaluate(
                state.model, self.val_batcher, state.task, device=state.device, amp=self.amp
            )
        self.eval_seconds += self.clock() - t0
        ev = Evaluation(
            step=state.step,
            examples=state.examples,
            epoch=state.examples / state.task.num_train,
            train_seconds=self.train_seconds,
            val_loss=val_loss,
            metrics=metrics,
        )
        self.evals.append(ev)
        for cb in self.callbacks:
            cb.on_eval(state, ev)
        if self.target is not None:
            if len(self.evals) == 1:
                self.target.check_available(list(metrics))
            if self.hit is None and self.target.reached(val_loss, metrics):
                self.hit = ev
        if running:
            self.start_clock()
        return ev

    @property
    def done(self) -> bool:
        return self.hit is not None or self.diverged_step is not None

    # -- the result ---------------------------------------------------------------------
    def history(
        self,
        *,
        batch_size: int,
        accumulation_steps: int,
        effective_batch_size: int,
        lr: float,
        lr_rule: str,
        warmup_steps: int,
        seed: int,
        final: dict[str, float] | None = None,
        extras: dict[str, Any] | None = None,
    ) -> History:
        self.stop_clock()
        self.flush()
        state, hit, last = self.state, self.hit, self.evals[-1]
        summary: dict[str, float] = {"steps": state.step, "examples": state.examples}
        if last.val_loss is not None:
            summary["val_loss"] = last.val_loss
            summary.update({f"val_{k}": v for k, v in last.metrics.items()})
        window = [v for v in self.losses[-10:] if math.isfinite(v)]
        if window:
            summary["train_loss"] = sum(window) / len(window)
        with torch.no_grad():
            summary["param_norm"] = float(
                torch.sqrt(sum((p.detach().float() ** 2).sum() for p in state.model.parameters()))
            )
        summary.update(final or {})
        return History(
            task=state.task.name,
            batch_size=batch_size,
            accumulation_steps=accumulation_steps,
            effective_batch_size=effective_batch_size,
            lr=lr,
            lr_rule=lr_rule,
            warmup_steps=warmup_steps,
            seed=seed,
            device=str(state.device),
            amp=self.amp,
            num_train=state.task.num_train,
            steps=tuple(self.steps),
            train_loss=tuple(self.losses),
            lrs=tuple(self.lrs),
            evals=tuple(self.evals),
            total_steps=state.step,
            total_examples=state.examples,
            epochs=state.examples / state.task.num_train,
            train_seconds=self.train_seconds,
            eval_seconds=self.eval_seconds,
            target=None if self.target is None else str(self.target),
            steps_to_target=None if hit is None else hit.step,
            examples_to_target=None if hit is None else hit.examples,
            seconds_to_target=None if hit is None else hit.train_seconds,
            diverged=self.diverged_step is not None,
            diverged_step=self.diverged_step,
            final=summary,
            extras={**state.extras, **(extras or {})},
        )
