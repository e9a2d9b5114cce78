"""`measure_noise(task)`: B_simple along a training run at the task's reference settings.

What `batchlab noise` runs, and the planner's noise phase: train the task and record the
trajectory of B_simple against step and training loss (McCandlish et al. 2018 predict it
grows as the loss falls), with the tracker (`batchlab.tracking`) or periodic exact
per-example measurements.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchlab.callbacks import RunState, TrainCallback
from batchlab.core.checks import check_batch_size
from batchlab.core.noise_scale import DEFAULT_CONFIDENCE, NoiseScale, ci_from_json
from batchlab.errors import ConfigError, NoiseEstimateError
from batchlab.history import History
from batchlab.measure.noise import MIN_BATCHES, gradient_noise_scale
from batchlab.results import JsonResult
from batchlab.target import parse_target
from batchlab.task import Task
from batchlab.tasks import load_task
from batchlab.tracking import GradientNoiseScaleTracker
from batchlab.tracking.moments import DEFAULT_BETA

DEFAULT_STEPS = 300
DEFAULT_EVERY = 10
MICRO_BATCH_CHOICES = (4, 2, 3, 5, 6, 8)  # accumulation splits tried, in order
PER_EXAMPLE_BATCHES = 8  # batches per standalone per-example measurement


@dataclass(frozen=True)
class NoisePoint(JsonResult):
    """B_simple at one point of training; train_loss is the mean over the steps since the
    previous point."""

    step: int
    examples: int
    train_loss: float | None
    b_simple: float | None
    b_simple_ci: tuple[float, float]
    reliable: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "b_simple_ci", ci_from_json(self.b_simple_ci))


@dataclass(frozen=True)
class NoiseRun(JsonResult):
    """B_simple along a training run of a task at its reference settings (`batchlab noise`)."""

    task: str
    method: str
    steps: int
    every: int
    seed: int
    device: str
    batch_size: int  # examples per optimizer step (the task's reference batch)
    micro_batch_size: int  # the small batch of the two-batch estimator
    lr: float
    num_train: int
    beta: float  # EMA decay of the tracker (two-batch)
    points: tuple[NoisePoint, ...]
    final: NoiseScale
    train_seconds: float
    # With a `target`: the run stops where it is reached (`target_step`, None if not within
    # `steps`), and the target metric at each evaluation, for extrapolating past the end.
    target: str | None = None
    target_step: int | None = None
    target_evals: tuple[tuple[int, float], ...] = ()
    # The points (and `final`) are B_simple of Adam-preconditioned gradients (`measure_noise`).
    preconditioned: bool = False


class _PeriodicMeasurement(TrainCallback):
    """Per-example reference along training: a standalone measurement every `every` steps."""

    def __init__(self, every: int, num_batches: int, seed: int, confidence: float) -> None:
        self.every = every
        self.num_batches = num_batches
        self.seed = seed
        self.confidence = confidence
        self.results: dict[int, tuple[int, NoiseScale]] = {}  # step -> (examples, result)

    def on_step(self, state: RunState) -> None:
        if state.step % self.every == 0 or state.step == state.total_steps:
            self._measure(state)

    def on_end(self, state: RunState) -> None:
        if state.step not in self.results:
            self._measure(state)

    def _measure(self, state: RunState) -> None:
        task = state.task
        try:
            result = gradient_noise_scale(
                state.model,
                task.train_data,
                task.loss,
                batch_size=task.batch_size,
                num_batches=self.num_batches,
                method="per-example",
                seed=self.seed * 1_000_003 + state.step,
                device=state.device,
                collate_fn=task.collate_fn,
                confidence=self.confidence,
            )
        except NoiseEstimateError as exc:
            if "non-finite" not in str(exc):
                raise
            raise NoiseEstimateError(f"at training step {state.step}: {exc}") from exc
        self.results[state.step] = (state.examples, result)


def _accumulation_split(batch_size: int) -> int:
    for k in MICRO_BATCH_CHOICES:
        if batch_size % k == 0 and batch_size // k >= 1 and k <= batch_size:
            return k
    raise ConfigError(
        f"two-batch: the reference batch {batch_size} cannot be split into 2 to 8 equal "
        "micro-batches; use method='per-example'"
    )


def measure_noise(
    task: Task | str,
    *,
    steps: int = DEFAULT_STEPS,
    every: int = DEFAULT_EVERY,
    method: str = "two-batch",
    seed: int = 0,
    device: str | torch.device = "auto",
    micro_batches: int | None = None,
    beta: float = DEFAULT_BETA,
    num_batches: int = PER_EXAMPLE_BATCHES,
    confidence: float = DEFAULT_CONFIDENCE,
    target: str | None = None,
    callbacks: Sequence[TrainCallback] = (),
    preconditioned: bool = False,
) -> NoiseRun:
    """Train `task` at its reference batch and lr for `steps` steps, recording B_simple.

    Why this design: the planner runs it for a short phase (100-300 steps), so it must cost
    little more than the training itself.
    - `two-batch` (default): the reference batch is split into `micro_batches` accumulation
      micro-batches (4 when it divides, else 2, 3, 5, 6, 8), which gives exactly the same
      update as one batch, and the tracker reads their gradient norms nearly for free. The
      points are the tracker's EMA (window ~1/(1-beta) steps) at every `every`-th step.
    - `per-example`: plain steps at the reference batch, plus, every `every` steps, a
      standalone exact per-example measurement over `num_batches` batches at the current
      weights (leaving no trace, so training is unaffected). Costs about
      `num_batches * 2.5 / every` extra steps per step; it is the reference, not the
      default.

    Args:
        steps: optimizer steps to train (>= 1).
        every: record a point every this many steps (and at the last step).
        confidence: level of the B_simple intervals.
        target: e.g. `val_acc>=0.85`: evaluate every `every` steps and stop once it is
            reached (the planner's noise phase follows the path to the target, no further).
        callbacks: extra TrainCallbacks (e.g. a progress bar).
        preconditioned: for an Adam-like optimizer, the points are B_simple of the
            preconditioned gradients g/(sqrt(v)+eps), the noise scale in the geometry Adam
            steps in, with each tensor's weights capped at 10x its median
            (`tracking.grad_norms.PRECONDITIONER_CAP`); two-batch only, and the run says
            which it holds. Plain B_simple otherwise. The plan asks for it: exact full-data
            values are 1.6-2x the plain ones on mnist1d-mlp and mnist1d-cnn
            (benchmarks/preconditioned_noise.py).

    Raises NoiseEstimateError naming the step when a gradient becomes non-finite.
    """
    from batchlab.train import train

    task = load_task(task)
    check_batch_size(steps, what="steps")
    check_batch_size(every, what="every")
    if method not in ("two-batch", "per-example"):
        raise ConfigError(f"method: expected two-batch or per-example, got {method!r}")
    ref = task.batch_size
    if method == "two-batch":
        k, tracker = _two_batch_setup(task, micro_batches, beta, every, confidence)
        measurement: TrainCallback = tracker
    else:
        k = 1
        measurement = _per_example_setup(task, num_batches, every, seed, confidence)
    micro = ref // k if method == "two-batch" else 1
    t0 = time.perf_counter()
    losses = _LossLog()
    try:
        history = train(
            task,
            ref // k,
            accumulation_steps=k,
            max_steps=steps,
            eval_every=steps if target is None else every,
            target=target,
            device=device,
            seed=seed,
            callbacks=[measurement, losses, *callbacks],
        )
    except KeyboardInterrupt:  # keep the points measured so far (`batchlab plan` saves them)
        try:
            raw, final, pre = _raw_points(measurement, task, preconditioned)
        except (ValueError, NoiseEstimateError):  # nothing usable measured yet
            raise KeyboardInterrupt from None
        partial = NoiseRun(
            task=task.name, method=method, steps=losses.step, every=every, seed=seed,
            device=str(device), batch_size=ref, micro_batch_size=micro, lr=task.lr,
            num_train=task.num_train, beta=beta, points=_with_train_loss(raw, losses.by_step),
            final=final, train_seconds=time.perf_counter() - t0, preconditioned=pre,
        )  # fmt: skip
        raise NoiseInterrupted(partial) from None
    seconds = time.perf_counter() - t0
    if history.diverged:
        raise NoiseEstimateError(
            f"non-finite loss at training step {history.diverged_step} of {task.name!r} at its "
            f"reference lr {task.lr:g}; B_simple is undefined there"
        )
    raw, final, pre = _raw_points(measurement, task, preconditioned)
    points = _with_train_loss(raw, dict(zip(history.steps, history.train_loss, strict=True)))
    return NoiseRun(
        task=task.name,
        method=method,
        steps=history.total_steps,
        every=every,
        seed=seed,
        device=history.device,
        batch_size=ref,
        micro_batch_size=micro,
        lr=history.lr,
        num_train=task.num_train,
        beta=beta,
        points=points,
        final=final,
        train_seconds=seconds,
        target=history.target,
        target_step=history.steps_to_target,
        target_evals=_target_evals(history),
        preconditioned=pre,
    )


class NoiseInterrupted(KeyboardInterrupt):
    """Ctrl-C during `measure_noise`, carrying the points measured until then (`partial`).

    A KeyboardInterrupt still, so a caller that does not look for it stops as before.
    """

    def __init__(self, partial: NoiseRun) -> None:
        super().__init__(f"interrupted after {partial.steps} steps")
        self.partial = partial


class _LossLog(TrainCallback):
    """The training loss of every step it was read back at, for points measured before an
    interrupt. On CUDA the loop reads losses back every few steps and `last_loss` keeps the
    last one read in between: a new value object means a new read."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}
        self.step = 0
        self._seen: float | None = None

    def on_step(self, state: RunState) -> None:
        self.step = state.step
        if state.last_loss is not None and state.last_loss is not self._seen:
            self._seen = state.last_loss
            self.by_step[state.step] = state.last_loss


def _target_evals(history: History) -> tuple[tuple[int, float], ...]:
    """(step, value of the target's metric) at each evaluation after step 0."""
    target = parse_target(history.target)
    if target is None:
        return ()
    out = []
    for e in history.evals:
        value = e.val_loss if target.metric == "loss" else e.metrics.get(target.metric)
        if e.step > 0 and value is not None and math.isfinite(value):
            out.append((e.step, float(value)))
    return tuple(out)


def _two_batch_setup(
    task: Task, micro_batches: int | None, beta: float, every: int, confidence: float
) -> tuple[int, GradientNoiseScaleTracker]:
    """(accumulation steps, tracker) for the two-batch method."""
    ref = task.batch_size
    k = _accumulation_split(ref) if micro_batches is None else micro_batches
    check_batch_size(k, what="micro_batches")
    if k < 2 or ref % k:
        raise ConfigError(
            f"micro_batches: expected a divisor >= 2 of the reference batch {ref}, got {k}"
        )
    tracker = GradientNoiseScaleTracker(
        beta=beta,
        every=every,
        num_examples=task.num_train,
        confidence=confidence,
        preconditioned=True,
        on_nonfinite="skip",
    )
    return k, tracker


def _per_example_setup(
    task: Task, num_batches: int, every: int, seed: int, confidence: float
) -> _PeriodicMeasurement:
    check_batch_size(num_batches, what="num_batches")
    ref = task.batch_size
    # Each measurement draws disjoint batches: cap them at what the dataset holds.
    num_batches = min(num_batches, task.num_train // ref)
    if num_batches < MIN_BATCHES:
        raise ConfigError(
            f"per-example: {task.name!r} has {task.num_train} examples, fewer than "
            f"{MIN_BATCHES} disjoint batches of its reference batch {ref}; use "
            "method='two-batch'"
        )
    return _PeriodicMeasurement(every, num_batches, seed, confidence)


_RawPoint = tuple[int, int, float | None, Sequence[float], bool]


def _raw_points(
    measurement: TrainCallback, task: Task, preconditioned: bool = False
) -> tuple[list[_RawPoint], NoiseScale, bool]:
    """(step, examples, b_simple, interval, reliable) of each point, the final estimate, and
    whether they are the Adam-preconditioned ones (asked for, and measured at every point)."""
    if isinstance(measurement, GradientNoiseScaleTracker):
        tracker = measurement
        if tracker.nonfinite_step is not None:
            raise NoiseEstimateError(
                f"non-finite gradient at training step {tracker.nonfinite_step} of "
                f"{task.name!r}; lower the learning rate or check the data"
            )
        final = tracker.noise_scale()
        pre = (
            preconditioned
            and final.preconditioned is not None
            and all("b_simple_preconditioned" in p for p in tracker.points)
        )
        key = "b_simple_preconditioned" if pre else "b_simple"
        ci, ok = (f"{key}_ci", "preconditioned_reliable") if pre else ("b_simple_ci", "reliable")
        raw = [(p["step"], p["examples"], p[key], p[ci], p[ok]) for p in tracker.points]
        return raw, final.preconditioned if pre else final, pre
    results = measurement.results
    raw = [
        (s, examples, r.b_simple, r.b_simple_ci, r.reliable)
        for s, (examples, r) in sorted(results.items())
    ]
    return raw, results[max(results)][1], False


def _with_train_loss(raw: list[_RawPoint], losses: dict[int, float]) -> tuple[NoisePoint, ...]:
    """NoisePoints with the mean finite training loss over the steps since the last point."""
    points, previous = [], 0
    for step, examples, b_simple, ci, reliable in raw:
        window = [losses[s] for s in range(previous + 1, step + 1) if s in losses]
        window = [v for v in window if math.isfinite(v)]
        points.append(
            NoisePoint(
                step=step,
                examples=examples,
                train_loss=sum(window) / len(window) if window else None,
                b_simple=b_simple,
                b_simple_ci=tuple(ci),
                reliable=reliable,
            )
        )
        previous = step
    return tuple(points)
