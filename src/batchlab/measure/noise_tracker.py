"""B_simple during training, nearly for free: the two-batch estimator on accumulation
micro-batches (or DDP replicas), smoothed over steps.

Each optimizer step that accumulates k >= 2 micro-batches gives one unbiased sample of
tr(Σ) and |G|^2 (McCandlish et al. 2018, appendix A.1): the micro-batch gradients are the
small batches, their weighted mean (the step's gradient) the big batch. A micro-batch's
gradient is normally lost in `.grad`, which accumulates; the tracker instead moves each
micro-batch's fresh gradient into its own running sum (the addition autograd would have
done) and takes its norm, so the only extra work is one norm pass per micro-batch
(`_MicroNorms`). The step's gradient, and so training, is bitwise unchanged.

The samples are averaged with an exponential moving average, numerator and denominator
separately and bias-corrected (appendix A.1: the ratio of unbiased averages, never the
average of ratios), and B_simple is their ratio. The interval treats the steps inside the
averaging window as independent samples of one (tr, |G|^2): Fieller's interval on the
EMA-weighted means. It reflects sampling noise, not the drift of B_simple along training.

Three ways to feed it:
- `batchlab.train(..., track_noise=True)` or `callbacks=[GradientNoiseScaleTracker()]`;
  points land in `History.extras["noise"]`;
- a plain loop: `tracker.after_backward(model, micro_size)` after each micro-batch's
  backward (each micro loss scaled by its share of the step's examples), then
  `tracker.end_step(model)` before `optimizer.step()`;
- DDP: `tracker.attach_ddp(ddp_model)` once, `tracker.ddp_end_step(ddp_model, local_batch)`
  after each backward: each replica's local gradient norm is taken in a comm hook, before
  the all-reduce.

`batchlab.measure.noise_run.measure_noise` uses it to record B_simple along a training run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchlab.callbacks import RunState, TrainCallback
from batchlab.core.checks import check_batch_size
from batchlab.errors import ConfigError, NoiseEstimateError
from batchlab.measure.noise import (
    DEFAULT_CONFIDENCE,
    MAX_CI_RATIO,
    NoiseScale,
    adam_preconditioner,
    batch_variance_factor,
    build_noise_scale,
    solve_two_batch,
)

DEFAULT_BETA = 0.95  # EMA decay per step: an averaging window of about 20 steps


class _WeightedMoments:
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


@dataclass
class _Pending:
    step: int
    small_sq: list[list[torch.Tensor]]  # per-parameter norms of each weighted contribution
    weights: list[float]  # each micro-batch's weight in the step's gradient
    sizes: list[int]
    big_sq: list[torch.Tensor]  # per-parameter norms of the step's gradient
    big_size: int
    scale: float  # AMP loss scale the gradients carry
    pre_small_sq: list[list[torch.Tensor]] | None = None
    pre_big_sq: list[torch.Tensor] | None = None


class GradientNoiseScaleTracker(TrainCallback):
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
    ) -> None:
        if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ConfigError(f"beta: expected a number in [0, 1], got {beta!r}; pass e.g. 0.95")
        check_batch_size(every, what="every")
        if on_nonfinite not in ("raise", "skip"):
            raise ConfigError(f"on_nonfinite: expected raise or skip, got {on_nonfinite!r}")
        self.beta = float(beta)
        self.every = every
        self.num_examples = num_examples
        self.confidence = confidence
        self.max_ci_ratio = max_ci_ratio
        self.preconditioned = preconditioned
        self.all_micro = all_micro
        self.on_nonfinite = on_nonfinite
        self.key = key
        self.points: list[dict[str, Any]] = []
        self._samples: list[tuple[int, float, float]] = []
        self.nonfinite_step: int | None = None
        self.skipped_steps = 0
        self._moments = _WeightedMoments(self.beta)
        self._pre_moments = _WeightedMoments(self.beta)
        self._examples = 0
        self._small_total = 0.0
        self._pending: list[_Pending] = []
        self._params: list[nn.Parameter] = []
        self._bound: nn.Module | None = None
        self._norms = _MicroNorms([], all_micro)
        self._micro_sizes: list[int] = []
        self._precond: list[torch.Tensor] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._steps = 0
        self._state: RunState | None = None
        self._prev_hook = None
        self._ddp_local_sq: torch.Tensor | None = None

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
        self._norms = _MicroNorms(self._params, self.all_micro)
        self._optimizer = optimizer

    def after_backward(self, model: nn.Module, micro_size: int, *, last: bool = False) -> None:
        """Call after each micro-batch's backward (loss scaled by its share of the step).

        Between calls `.grad` holds only the latest micro-batch's gradient (the tracker
        keeps the running sum); `end_step` puts the step's sum back, so call it before
        clipping or `optimizer.step()`.
        """
        if model is not self._bound:
            self.bind(model, self._optimizer)
        self._micro(micro_size, last)

    def end_step(self, model: nn.Module | None = None, *, loss_scale: float = 1.0) -> None:
        """Call after the last micro-batch's backward, before `optimizer.step()`."""
        if model is not None and model is not self._bound:
            raise ConfigError("end_step: expected the model given to after_backward")
        self._steps += 1
        self._finish_step(self._steps, loss_scale)

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
        """Register a comm hook that takes each replica's local gradient norm, then averages.

        Replaces DDP's default all-reduce hook with the same all-reduce plus one norm per
        bucket. Call `ddp_end_step` after each synchronizing backward.
        """
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.bind(ddp_model)

        # DDP checks the hook's annotations: leave them off rather than name private types.
        def hook(group, bucket):
            sq = bucket.buffer().detach().float().square().sum()
            self._ddp_local_sq = sq if self._ddp_local_sq is None else self._ddp_local_sq + sq
            return default_hooks.allreduce_hook(group, bucket)

        ddp_model.register_comm_hook(state=process_group, hook=hook)

    def ddp_end_step(
        self, ddp_model: nn.Module, local_batch_size: int, *, loss_scale: float = 1.0
    ) -> None:
        """After a synchronizing backward: local norms (averaged over replicas) vs `.grad`."""
        import torch.distributed as dist

        if self._ddp_local_sq is None:
            raise ConfigError(
                "ddp_end_step: no gradient went through the comm hook; call attach_ddp(model) "
                "before training and ddp_end_step after a backward that synchronizes"
            )
        local = self._ddp_local_sq.reshape(1).clone()
        self._ddp_local_sq = None
        dist.all_reduce(local)  # sum over replicas
        world = dist.get_world_size()
        grads = [p.grad for p in self._params if p.grad is not None]
        big = torch._foreach_norm(grads)
        self._steps += 1
        # The replicas' mean of |g_r|^2 stands for all of them: a = mean_r |g_r|^2
        # (stored as a norm, like the per-parameter norms elsewhere).
        self._pending.append(
            _Pending(
                self._steps,
                [[(local.double() / world).sqrt().reshape(())]],
                [1.0],
                [local_batch_size],
                big,
                local_batch_size * world,
                loss_scale,
            )
        )

    # -- reading ----------------------------------------------------------------------------

    @property
    def samples(self) -> list[tuple[int, float, float]]:
        """(step, tr(Σ) estimate, |G|^2 estimate) of every step counted so far."""
        self._flush()
        return self._samples

    @property
    def b_simple(self) -> float | None:
        """The smoothed B_simple now (None until |G|^2 averages above 0)."""
        return self.noise_scale().b_simple

    def noise_scale(self) -> NoiseScale:
        """The smoothed estimate with its interval and reliability verdict."""
        self._flush()
        pre = None
        if self._pre_moments.count:
            pre = self._result(self._pre_moments)
        return self._result(self._moments, preconditioned=pre)

    def _result(self, moments: _WeightedMoments, **extra: Any) -> NoiseScale:
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

    # -- engine callback --------------------------------------------------------------------

    def on_start(self, state: RunState) -> None:
        self._state = state
        if self.num_examples is None:
            self.num_examples = state.task.num_train
        self.bind(state.model, state.optimizer)
        self._prev_hook = state.step_fn.micro_hook
        state.step_fn.micro_hook = self._engine_micro_hook
        state.extras[self.key] = self.points

    def _engine_micro_hook(self, index: int, num_micro: int, micro_size: int) -> None:
        if self._prev_hook is not None:
            self._prev_hook(index, num_micro, micro_size)
        if num_micro < 2:  # nothing to contrast: no work at all
            return
        last = index == num_micro - 1
        self._micro(micro_size, last)
        if last:
            scaler = self._state.step_fn.scaler
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
            self._finish_step(self._state.step + 1, scale)

    def on_step(self, state: RunState) -> None:
        if state.step % self.every == 0 or state.step == state.total_steps:
            self._record(state)

    def on_end(self, state: RunState) -> None:
        if not self.points or self.points[-1]["step"] != state.step:
            self._record(state)
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
            }
        )

    # -- the work ---------------------------------------------------------------------------

    def _micro(self, micro_size: int, last: bool) -> None:
        index = len(self._micro_sizes)
        if index == 0 and self.preconditioned:
            self._precond = adam_preconditioner(self._optimizer, self._params)
        self._norms.micro(index, last, self._precond)
        self._micro_sizes.append(micro_size)

    def _finish_step(self, step: int, scale: float) -> None:
        sizes, self._micro_sizes = self._micro_sizes, []
        norms = self._norms
        norms.restore()  # `.grad` holds the step's gradient again, whatever happens next
        if len(sizes) >= 2:
            big, pre_big = norms.total()
            measured = sizes if self.all_micro else sizes[:1]
            total = sum(sizes)
            self._pending.append(
                _Pending(
                    step,
                    norms.sq,
                    [n / total for n in measured],
                    measured,
                    big,
                    total,
                    scale,
                    norms.pre_sq if pre_big is not None else None,
                    pre_big,
                )
            )
        norms.sq, norms.pre_sq = [], []
        self._precond = None

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        # One device-to-host copy for everything pending (a single sync on CUDA).
        groups = [parts for item in pending for parts in _parts_of(item)]
        flat = [t for parts in groups for t in parts]  # 0-d tensors
        values = torch.stack(flat).double().tolist() if flat else []
        sums, start = [], 0
        for parts in groups:  # each group: the per-parameter norms of one gradient
            sums.append(math.fsum(v * v for v in values[start : start + len(parts)]))
            start += len(parts)
        sums = iter(sums)
        for item in pending:
            scale2 = item.scale * item.scale
            small = [next(sums) / (scale2 * w * w) for w in item.weights]
            big = next(sums) / scale2
            pre_small = pre_big = None
            if item.pre_small_sq is not None:
                pre_small = [next(sums) / (scale2 * w * w) for w in item.weights]
                pre_big = next(sums) / scale2
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
                self._pre_moments.add(trace, grad_sq)

    def _solve(
        self, small: list[float], sizes: list[int], big: float, big_size: int
    ) -> tuple[float, float]:
        w_small = sum(batch_variance_factor(n, self.num_examples) for n in sizes) / len(sizes)
        w_big = batch_variance_factor(big_size, self.num_examples)
        return solve_two_batch(sum(small) / len(small), w_small, big, w_big)

    def _add_sample(
        self, step: int, small: list[float], sizes: list[int], big: float, big_size: int
    ) -> None:
        if any(n >= big_size for n in sizes):
            raise ConfigError(
                f"tracker: expected small batches smaller than the big batch ({big_size}), "
                f"got sizes {sizes}; accumulate at least 2 micro-batches"
            )
        trace, grad_sq = self._solve(small, sizes, big, big_size)
        self._moments.add(trace, grad_sq)
        self._samples.append((step, trace, grad_sq))
        self._examples += big_size
        self._small_total += sum(sizes) / len(sizes)


class _MicroNorms:
    """Norms of each micro-batch's contribution to `.grad`, and of the step's total.

    The trick that makes it nearly free: after each micro-batch's backward, the tracker
    takes the fresh gradients out of `.grad` and adds them into its own running sum, then
    leaves `.grad` empty. The next backward then writes its gradient into a fresh tensor
    (autograd hands it over without a copy) instead of adding it in place, so `.grad` holds
    exactly that micro-batch's contribution. Folding it into the running sum is the same
    addition autograd would have done, in the same order (the step's gradient is bitwise
    unchanged); the only extra work is one norm per micro-batch. After the last one the
    sum goes back into `.grad`.

    Norms stay on the device as per-parameter 0-d tensors until the tracker flushes them.
    """

    def __init__(self, params: list[nn.Parameter], all_micro: bool) -> None:
        self.params = params
        self.all_micro = all_micro
        self.sq: list[list[torch.Tensor]] = []  # per micro-batch: per-parameter norms
        self.pre_sq: list[list[torch.Tensor]] = []
        self.running: list[torch.Tensor | None] = [None] * len(params)
        self.pre: list[torch.Tensor] | None = None

    def micro(self, index: int, last: bool, precond: list[torch.Tensor] | None) -> None:
        params = self.params
        if index == 0:
            self.pre = precond
        elif not self.all_micro:
            return  # only the first micro-batch is measured; autograd accumulates as usual
        grads = [p.grad for p in params]
        live = [g for g in grads if g is not None]
        if any(g.is_sparse for g in live):
            live = [g.coalesce().values() if g.is_sparse else g for g in live]
        self.sq.append(_foreach_norm(live))
        if self.pre is not None:
            weights = [d for d, g in zip(self.pre, grads, strict=True) if g is not None]
            self.pre_sq.append(_foreach_norm(_foreach_mul(live, weights)))
        if not self.all_micro:
            return
        running = self.running
        if index == 0:
            running[:] = grads
        else:
            dense = len(live) == len(grads) and not live[0].is_sparse
            if (
                dense
                and all(r is not None for r in running)
                and not any(g.is_sparse for g in grads)
            ):
                torch._foreach_add_(running, grads)
            else:
                for j, (r, g) in enumerate(zip(running, grads, strict=True)):
                    if g is None:
                        continue
                    if r is None:
                        running[j] = g
                    else:
                        running[j] = r.add_(g) if not r.is_sparse else r + g
        if last:
            for p, r in zip(params, running, strict=True):
                p.grad = r
            self.running = [None] * len(params)
        else:
            for p in params:
                p.grad = None

    def restore(self) -> None:
        """Put the running sum back into `.grad` (when the last micro-batch was not flagged)."""
        if any(r is not None for r in self.running):
            for p, r in zip(self.params, self.running, strict=True):
                if r is not None:
                    p.grad = r
            self.running = [None] * len(self.params)

    def total(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        self.restore()
        grads = [p.grad for p in self.params]
        live = [g for g in grads if g is not None]
        if any(g.is_sparse for g in live):
            live = [g.coalesce().values() if g.is_sparse else g for g in live]
        pre = None
        if self.pre is not None:
            weights = [d for d, g in zip(self.pre, grads, strict=True) if g is not None]
            pre = _foreach_norm(_foreach_mul(live, weights))
        return _foreach_norm(live), pre


def _foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch._foreach_norm(tensors)) if tensors else []


def _foreach_mul(tensors: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch._foreach_mul(tensors, weights)) if tensors else []


def _parts_of(item: _Pending) -> list[list[torch.Tensor]]:
    out = [*item.small_sq, item.big_sq]
    if item.pre_small_sq is not None:
        out += [*item.pre_small_sq, item.pre_big_sq]
    return out
