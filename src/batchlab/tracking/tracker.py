"""B_simple during training, nearly for free: the two-batch estimator on accumulation
micro-batches (or DDP replicas), smoothed over steps.

Each optimizer step that accumulates k >= 2 micro-batches gives one unbiased sample of
tr(Σ) and |G|^2 (McCandlish et al. 2018, appendix A.1): the micro-batch gradients are the
small batches, their weighted mean (the step's gradient) the big batch. A micro-batch's
gradient is normally lost in `.grad`, which accumulates; the tracker instead moves each
micro-batch's fresh gradient into its own running sum (the addition autograd would have
done) and takes its norm, so the only extra work is one norm pass per micro-batch
(`tracking.grad_norms.MicroBatchNorms`, the one collector). The step's gradient, and so training, is bitwise unchanged.

The samples are averaged with an exponential moving average, numerator and denominator
separately and bias-corrected (appendix A.1: the ratio of unbiased averages, never the
average of ratios), and B_simple is their ratio. Each sample is weighted by the inverse of
the big batch's |G_big|^2 known before it (`tracking.moments`): without that, the early,
large |G|^2 of a fast-falling loss dominated the average and the estimate lagged the exact
value 2-6x (issue 11). The interval treats the steps inside the averaging window as
independent samples of one (tr, |G|^2): Fieller's interval on the weighted means. It
reflects sampling noise, not the drift of B_simple along training.

Three ways to feed it:
- `batchlab.train(..., track_noise=True)` or `callbacks=[GradientNoiseScaleTracker()]`;
  points land in `History.extras["noise"]`;
- a plain loop: `tracker.after_backward(model, micro_size)` after each micro-batch's
  backward (each micro loss scaled by its share of the step's examples), then
  `tracker.end_step(model)` before `optimizer.step()`;
- DDP: `tracker.attach_ddp(ddp_model)` once, `tracker.ddp_end_step(ddp_model, local_batch)`
  after each backward: each replica's local gradient norm is taken in a comm hook, before
  the all-reduce (`tracking.ddp`, the one DDP path; `detach_ddp` stops it). Training code
  uses it through `batchlab.integrations.ddp.DDPNoiseScale`.

A step of one micro-batch has nothing to contrast: in `batchlab.train` the tracker splits
every `split_every`-th step in two halves (the same update, as the adaptive engine does);
in a plain loop its `reason` says what to change. The Lightning and Hugging Face
integrations feed it through the plain-loop API; every monitor reads like it
(`tracking.readout`). `state_dict()` /
`load_state_dict()` carry the estimate across a resumed run.
`batchlab.measure.noise_run.measure_noise` uses it to record B_simple along a training run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from batchlab.callbacks import RunState, TrainCallback
from batchlab.core.checks import check_batch_size
from batchlab.core.noise_scale import (
    DEFAULT_CONFIDENCE,
    MAX_CI_RATIO,
    NoiseScale,
    batch_variance_factor,
    build_noise_scale,
    solve_two_batch,
)
from batchlab.errors import ConfigError, NoiseEstimateError
from batchlab.tracking.ddp import ReplicaNorms
from batchlab.tracking.grad_norms import MicroBatchNorms, adam_preconditioner
from batchlab.tracking.moments import DEFAULT_BETA, WeightedMoments
from batchlab.tracking.pending import PendingStep, squared_sums
from batchlab.tracking.readout import NoiseReadout, single_micro_reason


class GradientNoiseScaleTracker(NoiseReadout, TrainCallback):
    """Smoothed B_simple from micro-batch (or replica) gradients during training.

    Args:
        beta: EMA decay per optimizer step (0.95: a window of about 20 steps; 1.0: the
            plain mean over all steps, for a model whose weights do not change).
        every: record a point every this many steps, and at the last (engine use; `points`).
        num_examples: training-set size N for the finite-population correction (the engine
            fills it in); None treats batches as drawn with replacement.
        preconditioned: also track B_simple of Adam-preconditioned gradients g/(sqrt(v)+eps)
            (needs an Adam-like optimizer; costs a few more passes per micro-batch).
        all_micro: measure every micro-batch's gradient (k small-batch samples per step),
            or only the first one (a norm less per micro-batch; unbiased, but tr(Σ) is
            about 3x noisier on MNIST-1D, so the default is all).
        on_nonfinite: `raise` (a NoiseEstimateError naming the step) or `skip` (drop the
            sample and remember the step in `nonfinite_step`). Steps an AMP GradScaler
            skips for overflow are always dropped.
        key: name in `RunState.extras` / `History.extras` for the points.
        weighting: how each micro-batch's loss was scaled: `size` (by its share n_i/n of
            the step's examples, as `batchlab.train` does) or `equal` (by 1/k, as Lightning
            and the Hugging Face Trainer do). Equal weighting with unequal sizes makes the
            big batch's variance tr(Σ)/(k b_h), b_h the harmonic mean of the sizes.
        split_every: in `batchlab.train`, while a step is one micro-batch, run every this
            many steps as two half micro-batches (the same update up to batch-dependent
            layers such as BatchNorm; 0: never). `track_noise=True` sets it.
    """

    def __init__(
        self,
        *,
        beta: float = DEFAULT_BETA,
        every: int = 10,
        num_examples: int | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
        max_ci_ratio: float = MAX_CI_RATIO,
        preconditioned: bool = False,
        all_micro: bool = True,
        on_nonfinite: str = "raise",
        key: str = "noise",
        weighting: str = "size",
        split_every: int = 0,
    ) -> None:
        if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ConfigError(f"beta: expected a number in [0, 1], got {beta!r}; pass e.g. 0.95")
        check_batch_size(every, what="every")
        if on_nonfinite not in ("raise", "skip"):
            raise ConfigError(f"on_nonfinite: expected raise or skip, got {on_nonfinite!r}")
        if weighting not in ("size", "equal"):
            raise ConfigError(f"weighting: expected size or equal, got {weighting!r}")
        self.beta = float(beta)
        self.every = every
        self.num_examples = num_examples
        self.confidence = confidence
        self.max_ci_ratio = max_ci_ratio
        self.preconditioned = preconditioned
        self.all_micro = all_micro
        self.on_nonfinite = on_nonfinite
        self.key = key
        self.weighting = weighting
        if not isinstance(split_every, int) or split_every < 0:
            raise ConfigError(f"split_every: expected an int >= 0, got {split_every!r}")
        self.split_every = split_every
        self.unmeasurable: str | None = None  # why no sample can come (set by its feeders)
        self.single_micro_steps = 0  # steps that had one micro-batch: nothing to contrast
        self._full_micro = 0  # the engine's micro-batch size when splitting (0: not)
        self.points: list[dict[str, Any]] = []
        self._samples: list[tuple[int, float, float]] = []
        self.nonfinite_step: int | None = None
        self.skipped_steps = 0
        self._moments = WeightedMoments(self.beta)
        self._pre_moments = WeightedMoments(self.beta)
        self._examples = 0
        self._small_total = 0.0
        self._pending: list[PendingStep] = []
        self._params: list[nn.Parameter] = []
        self._bound: nn.Module | None = None
        self._norms = MicroBatchNorms([], all_micro)
        self._micro_sizes: list[int] = []
        self._precond: list[torch.Tensor] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._steps = 0
        self._state: RunState | None = None
        self._prev_hook = None
        self._replicas = ReplicaNorms()

    # -- plain-loop API ---------------------------------------------------------------------

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Track `model`'s trainable parameters (done for you by the other entry points)."""
        self._bound = model
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise NoiseEstimateError(
                "expected a model with trainable parameters (requires_grad=True), got none; "
                "unfreeze at least one parameter"
            )
        self._norms = MicroBatchNorms(self._params, self.all_micro)
        self._optimizer = optimizer

    def after_backward(self, model: nn.Module, micro_size: int, *, last: bool = False) -> None:
        """Call after each micro-batch's backward (loss scaled as `weighting` says).

        Between calls `.grad` holds only the latest micro-batch's gradient (the tracker
        keeps the running sum); `last=True` or `end_step` puts the step's sum back, so
        flag the last micro-batch or call `end_step` before clipping, AMP unscaling or
        `optimizer.step()`. With `all_micro=False`, `.grad` is never touched.
        """
        if model is not self._bound:
            self.bind(model, self._optimizer)
        self._micro(micro_size, last)

    def end_step(
        self,
        model: nn.Module | None = None,
        *,
        loss_scale: float = 1.0,
        num_micro: int | None = None,
    ) -> None:
        """Call after the last micro-batch's backward, before `optimizer.step()`.

        `num_micro`: micro-batches the whole step will have, when this ends the measurement
        early (`weighting="equal"` only): the big batch is then the micro-batches recorded
        so far, read from `.grad` now, before the others are added (the Hugging Face
        Trainer clips before any callback sees its last micro-batch).
        """
        if model is not None and model is not self._bound:
            raise ConfigError("end_step: expected the model given to after_backward")
        if num_micro is not None and self.weighting != "equal":
            raise ConfigError(
                "end_step: num_micro needs weighting='equal' (micro losses scaled by 1/k), "
                f"got weighting={self.weighting!r}"
            )
        self._steps += 1
        self._finish_step(self._steps, loss_scale, num_micro)

    def update(
        self,
        small_sq: Sequence[float],
        small_sizes: Sequence[int],
        big_sq: float,
        big_size: int,
        *,
        step: int | None = None,
    ) -> None:
        """Add one sample from squared norms you measured yourself.

        `small_sq[i]` is |G_i|^2 of the mean gradient of small batch i (size
        `small_sizes[i]`), `big_sq` the |G|^2 of the mean gradient over `big_size` examples.
        """
        self._steps += 1
        step = step if step is not None else self._steps
        small = [float(q) for q in small_sq]
        if not all(math.isfinite(v) for v in (*small, float(big_sq))):
            if self.on_nonfinite == "raise":
                raise NoiseEstimateError(
                    f"non-finite gradient norm at step {step}: the loss diverged or the data "
                    "has inf/nan; lower the learning rate or check the inputs"
                )
            self.nonfinite_step = self.nonfinite_step or step
            self.skipped_steps += 1
            return
        self._add_sample(step, small, list(small_sizes), float(big_sq), big_size)

    # -- DDP --------------------------------------------------------------------------------

    def attach_ddp(self, ddp_model: nn.Module, process_group: Any = None) -> None:
        """Take each replica's local gradient norm in a comm hook, before the all-reduce.

        Replaces DDP's default all-reduce hook with the same all-reduce plus one norm per
        bucket (`tracking.ddp.LocalNormHook`). Call `ddp_end_step` after each
        synchronizing backward. Attaching again to the same model is a no-op; attaching
        to another model while attached, or to a model another tracker holds, is an error.
        """
        if self._replicas.attach(ddp_model, self, process_group):
            self.bind(ddp_model)

    def detach_ddp(self) -> None:
        """Stop measuring (the hook stays as DDP's plain all-reduce: DDP cannot remove one).

        The estimate so far is kept; a no-op when not attached."""
        self._replicas.detach(self)

    @property
    def ddp_model(self) -> nn.Module | None:
        """The DDP model attached to (None: not attached)."""
        return self._replicas.model

    @property
    def ddp_synced(self) -> bool:
        """Whether a synchronizing backward went through the hook since `ddp_end_step`."""
        return self._replicas.synced

    def ddp_end_step(
        self, ddp_model: nn.Module, local_batch_size: int, *, loss_scale: float = 1.0
    ) -> None:
        """After a synchronizing backward: local norms (averaged over replicas) vs `.grad`."""
        self._steps += 1
        self._pending.append(
            self._replicas.pending_step(
                ddp_model, self._params, self._steps, local_batch_size, loss_scale
            )
        )

    # -- reading ----------------------------------------------------------------------------

    @property
    def samples(self) -> list[tuple[int, float, float]]:
        """(step, tr(Σ) estimate, |G|^2 estimate) of every step counted so far."""
        self._flush()
        return self._samples

    def noise_scale(self) -> NoiseScale:
        """The smoothed estimate with its interval, reliability verdict and reason."""
        self._flush()
        pre = None
        if self._pre_moments.count:
            pre = self._result(self._pre_moments)
        result = self._result(self._moments, preconditioned=pre)
        if self._moments.count == 0 and (self.unmeasurable or self.single_micro_steps):
            reason = self.unmeasurable or single_micro_reason(self.single_micro_steps)
            result = replace(result, reason=reason)
        return result

    def _result(self, moments: WeightedMoments, **extra: Any) -> NoiseScale:
        trace, grad_sq, cov, dof = moments.estimate()
        count = max(moments.count, 1)
        return build_noise_scale(
            trace,
            grad_sq,
            cov,
            dof,
            num_examples=self._examples,
            method="two-batch",
            confidence=self.confidence,
            max_ci_ratio=self.max_ci_ratio,
            small_batch=self._small_total / count if moments.count else None,
            big_batch=self._examples / count if moments.count else None,
            dataset_size=self.num_examples,
            **extra,
        )

    # -- saving and resuming ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The estimate so far, as plain floats, ints and lists (torch's convention).

        Round-trips through `torch.save` / `torch.load(..., weights_only=True)`; a tracker
        that loads it continues with exactly the estimates this one would have given.
        Call it between optimizer steps (not between the micro-batches of one).
        """
        if self._micro_sizes:
            raise ConfigError(
                "state_dict: expected to be called between optimizer steps, got one in "
                f"progress ({len(self._micro_sizes)} micro-batches recorded); call it after "
                "end_step"
            )
        self._flush()
        return {
            "moments": self._moments.state_dict(),
            "pre_moments": self._pre_moments.state_dict(),
            "steps": self._steps,
            "examples": self._examples,
            "small_total": self._small_total,
            "num_examples": self.num_examples,
            "samples": [list(s) for s in self._samples],
            "points": [dict(p) for p in self.points],
            "nonfinite_step": self.nonfinite_step,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved (the settings come from the constructor)."""
        self._moments.load_state_dict(state["moments"])
        self._pre_moments.load_state_dict(state["pre_moments"])
        self._steps = int(state["steps"])
        self._examples = state["examples"]
        self._small_total = float(state["small_total"])
        if state["num_examples"] is not None:
            self.num_examples = int(state["num_examples"])
        self._samples = [(int(s[0]), float(s[1]), float(s[2])) for s in state["samples"]]
        self.points[:] = [dict(p) for p in state["points"]]  # the engine shares this list
        self.nonfinite_step = state["nonfinite_step"]
        self.skipped_steps = int(state["skipped_steps"])
        self._pending = []

    # -- engine callback --------------------------------------------------------------------

    def on_start(self, state: RunState) -> None:
        if self.weighting != "size":
            raise ConfigError(
                "GradientNoiseScaleTracker in batchlab.train: expected weighting='size' (the "
                f"engine scales each micro loss by its share of the step), got "
                f"{self.weighting!r}; leave weighting at its default"
            )
        self._state = state
        if self.num_examples is None:
            self.num_examples = state.task.num_train
        self.bind(state.model, state.optimizer)
        full = state.step_fn.micro_batch_size
        if self.split_every and full >= state.effective_batch_size >= 2:
            self._full_micro = full  # one micro-batch a step: split some steps in two
            self._split_next(state)
        self._prev_hook = state.step_fn.micro_hook
        state.step_fn.micro_hook = self._engine_micro_hook
        state.extras[self.key] = self.points

    def _engine_micro_hook(self, index: int, num_micro: int, micro_size: int) -> None:
        if self._prev_hook is not None:
            self._prev_hook(index, num_micro, micro_size)
        if num_micro < 2:  # nothing to contrast: no work at all
            self.single_micro_steps += 1
            return
        last = index == num_micro - 1
        self._micro(micro_size, last)
        if last:
            scaler = self._state.step_fn.scaler
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
            self._finish_step(self._state.step + 1, scale)

    def _split_next(self, state: RunState) -> None:
        """Set the micro-batch size of the next step: half of it every `split_every`-th."""
        split = (state.step + 1) % self.split_every == 0
        half = (state.effective_batch_size + 1) // 2
        state.step_fn.micro_batch_size = half if split else self._full_micro

    def on_step(self, state: RunState) -> None:
        if self._full_micro:
            self._split_next(state)
        if state.step % self.every == 0 or state.step == state.total_steps:
            self._record(state)

    def on_end(self, state: RunState) -> None:
        if not self.points or self.points[-1]["step"] != state.step:
            self._record(state)
        if self._full_micro:
            state.step_fn.micro_batch_size, self._full_micro = self._full_micro, 0
        state.step_fn.micro_hook = self._prev_hook
        if self.nonfinite_step is not None:
            state.extras[f"{self.key}_nonfinite_step"] = self.nonfinite_step

    def _record(self, state: RunState) -> None:
        est = self.noise_scale()
        self.points.append(
            {
                "step": state.step,
                "examples": state.examples,
                "b_simple": est.b_simple,
                "b_simple_ci": list(est.b_simple_ci),
                "trace_sigma": est.trace_sigma,
                "grad_norm_sq": est.grad_norm_sq,
                "reliable": est.reliable,
                **_preconditioned_fields(est.preconditioned),
            }
        )

    # -- the work ---------------------------------------------------------------------------

    def _micro(self, micro_size: int, last: bool) -> None:
        index = len(self._micro_sizes)
        if index == 0 and self.preconditioned:
            self._precond = adam_preconditioner(self._optimizer, self._params)
        self._norms.micro(index, last, self._precond)
        self._micro_sizes.append(micro_size)

    def _finish_step(self, step: int, scale: float, num_micro: int | None = None) -> None:
        sizes, self._micro_sizes = self._micro_sizes, []
        norms = self._norms
        norms.restore()  # `.grad` holds the step's gradient again, whatever happens next
        if len(sizes) == 1:
            self.single_micro_steps += 1
        if len(sizes) >= 2:
            big, pre_big = norms.total()
            measured = sizes if self.all_micro else sizes[:1]
            weights, big_weight, big_size = self._weights(sizes, len(measured), num_micro)
            self._pending.append(
                PendingStep(
                    step,
                    norms.sq,
                    weights,
                    measured,
                    big,
                    big_size,
                    scale,
                    norms.pre_sq if pre_big is not None else None,
                    pre_big,
                    big_weight,
                )
            )
        norms.sq, norms.pre_sq = [], []
        self._precond = None

    def _weights(
        self, sizes: list[int], measured: int, num_micro: int | None
    ) -> tuple[list[float], float, float]:
        """(weight of each measured micro-batch, of the recorded ones together, big size)."""
        if self.weighting == "size":  # acc = sum_i (n_i / n) g_i over all n examples
            total = sum(sizes)
            return [n / total for n in sizes[:measured]], 1.0, total
        # acc = (1/k) sum_i g_i: the mean of the m recorded is acc * k / m, and its
        # variance tr(Σ) / (m b_h) with b_h the harmonic mean of their sizes.
        k = len(sizes) if num_micro is None else num_micro
        if k < len(sizes):
            raise ConfigError(
                f"end_step: expected num_micro >= the {len(sizes)} micro-batches recorded, got {k}"
            )
        harmonic = len(sizes) / sum(1.0 / n for n in sizes)
        return [1.0 / k] * measured, len(sizes) / k, len(sizes) * harmonic

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        sums = squared_sums(pending)
        for item in pending:
            scale2 = item.scale * item.scale
            small = [next(sums) / (scale2 * w * w) for w in item.weights]
            big_scale2 = scale2 * item.big_weight**2
            big = next(sums) / big_scale2
            pre_small = pre_big = None
            if item.pre_small_sq is not None:
                pre_small = [next(sums) / (scale2 * w * w) for w in item.weights]
                pre_big = next(sums) / big_scale2
            big_size = item.big_size
            if not all(math.isfinite(v) for v in (*small, big)):
                if item.scale != 1.0:  # an AMP overflow step: the scaler skips it too
                    self.skipped_steps += 1
                    continue
                if self.on_nonfinite == "raise":
                    raise NoiseEstimateError(
                        f"non-finite gradient at step {item.step}: the loss diverged or the "
                        "data has inf/nan; lower the learning rate or check the inputs"
                    )
                self.nonfinite_step = self.nonfinite_step or item.step
                self.skipped_steps += 1
                continue
            self._add_sample(item.step, small, item.sizes, big, big_size)
            if pre_small is not None and all(math.isfinite(v) for v in (*pre_small, pre_big)):
                trace, grad_sq = self._solve(pre_small, item.sizes, pre_big, big_size)
                self._pre_moments.add(trace, grad_sq, scale=pre_big)

    def _solve(
        self, small: list[float], sizes: list[int], big: float, big_size: int
    ) -> tuple[float, float]:
        w_small = sum(batch_variance_factor(n, self.num_examples) for n in sizes) / len(sizes)
        w_big = batch_variance_factor(big_size, self.num_examples)
        return solve_two_batch(sum(small) / len(small), w_small, big, w_big)

    def _add_sample(
        self, step: int, small: list[float], sizes: list[int], big: float, big_size: int
    ) -> None:
        # Compare variances, not sizes: with equal weighting and unequal micro-batches the
        # big batch's effective size (k times the harmonic mean) can be below the largest.
        if len(sizes) / sum(1.0 / n for n in sizes) >= big_size:
            raise ConfigError(
                f"tracker: expected small batches smaller than the big batch ({big_size}), "
                f"got sizes {sizes}; accumulate at least 2 micro-batches"
            )
        trace, grad_sq = self._solve(small, sizes, big, big_size)
        self._moments.add(trace, grad_sq, scale=big)  # |G_big|^2 weights the later samples
        self._samples.append((step, trace, grad_sq))
        self._examples += big_size
        self._small_total += sum(sizes) / len(sizes)


def _preconditioned_fields(pre: NoiseScale | None) -> dict[str, Any]:
    """A point's Adam-preconditioned estimate, when the optimizer had second moments."""
    if pre is None:
        return {}
    return {
        "b_simple_preconditioned": pre.b_simple,
        "b_simple_preconditioned_ci": list(pre.b_simple_ci),
        "preconditioned_reliable": pre.reliable,
    }
