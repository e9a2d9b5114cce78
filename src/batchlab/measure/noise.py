"""The gradient noise scale B_simple: the batch size above which bigger batches stop paying.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv 1812.06162), section 2.2: with G the true gradient and Σ the covariance of the
per-example gradients,

    B_simple = tr(Σ) / |G|^2.

What "true" means here. batchlab measures on the training set of N examples: G is the
full-training-set gradient and Σ = (1/N) sum_i (g_i - G)(g_i - G)^T, the covariance of the N
per-example gradients (the brute-force tests compute exactly these). Batches are drawn
without replacement, as training draws them, so a batch of B distinct examples has

    E|G_B|^2 = |G|^2 + tr(Σ) w(B),    w(B) = (N - B) / (B (N - 1))

(the finite-population correction; with replacement, or as N -> inf, w(B) = 1/B, the paper's
`|G|^2 + tr(Σ)/B`). The two-batch estimator (paper, appendix A.1) solves the two equations
for a small and a big batch; with w in place of 1/B it stays exactly unbiased on finite data:

    tr(Σ) ~ (|G_small|^2 - |G_big|^2) / (w_small - w_big)
    |G|^2 ~ (w_small |G_big|^2 - w_big |G_small|^2) / (w_small - w_big)

Both are unbiased; their ratio is not, so averages are taken of each part separately and
divided at the end (appendix A.1).

`gradient_noise_scale` draws `num_batches` disjoint batches. The small-batch norms are those
of each batch (two-batch) or of each example (per-example: exact per-example norms, the same
formula with a small batch of 1). The big batch is all drawn examples pooled, which makes the
|G|^2 part far less noisy than pairing batches two by two. The interval comes from a
delete-a-block jackknife over batches for the covariance of (tr(Σ), |G|^2), turned into an
interval for their ratio with Fieller's theorem (Fieller 1954), which honestly says
"unbounded" when |G|^2 is not distinguishable from 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from batchlab.core.checks import check_batch_size
from batchlab.core.noise_scale import (
    DEFAULT_CONFIDENCE,
    MAX_CI_RATIO,
    NoiseScale,
    batch_variance_factor,
    build_noise_scale,
    solve_two_batch,
)
from batchlab.data import Batcher
from batchlab.errors import ConfigError, NoiseEstimateError
from batchlab.measure.per_example import PerExampleGradNorms, check_per_example_model
from batchlab.measure.state import preserve_training_state
from batchlab.step import check_scalar_loss, resolve_device
from batchlab.task import LossFn
from batchlab.tracking.grad_norms import adam_preconditioner

MIN_BATCHES = 4  # fewer leaves the jackknife with too few degrees of freedom for an interval
MAX_BLOCKS = 32  # jackknife blocks: each holds one gradient-sized buffer


# --- pooling and the jackknife -----------------------------------------------------------


class _Pool:
    """Sums of example gradients per jackknife block, and the small-batch squared norms."""

    def __init__(
        self, num_blocks: int, numel: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.sums = torch.zeros(num_blocks, numel, device=device, dtype=dtype)
        self.sizes = [0] * num_blocks
        self.small_sq: list[list[float]] = [[] for _ in range(num_blocks)]

    def add(self, block: int, mean_grad: torch.Tensor, size: int, small_sq: list[float]) -> None:
        self.sums[block].add_(mean_grad, alpha=float(size))
        self.sizes[block] += size
        self.small_sq[block].extend(small_sq)

    def estimate(
        self, small_batch: int, dataset_size: int | None
    ) -> tuple[float, float, list, int]:
        """(tr, |G|^2, jackknife covariance, blocks) with all drawn examples as the big batch."""
        gram = (self.sums.double() @ self.sums.double().T).cpu()
        total_sq = float(gram.sum())
        cross = gram.sum(1).tolist()
        n = sum(self.sizes)
        w_small = batch_variance_factor(small_batch, dataset_size)
        all_small = [q for block in self.small_sq for q in block]
        point = solve_two_batch(
            sum(all_small) / len(all_small),
            w_small,
            total_sq / n**2,
            batch_variance_factor(n, dataset_size),
        )
        blocks = len(self.sizes)
        leave_out = []
        for i in range(blocks):
            n_rest = n - self.sizes[i]
            rest_sq = total_sq - 2 * cross[i] + float(gram[i, i])
            smalls = len(all_small) - len(self.small_sq[i])
            small_mean = (sum(all_small) - sum(self.small_sq[i])) / smalls
            leave_out.append(
                solve_two_batch(
                    small_mean,
                    w_small,
                    rest_sq / n_rest**2,
                    batch_variance_factor(n_rest, dataset_size),
                )
            )
        mean = [sum(v[k] for v in leave_out) / blocks for k in range(2)]
        cov = [
            [
                (blocks - 1) / blocks * sum((v[j] - mean[j]) * (v[k] - mean[k]) for v in leave_out)
                for k in range(2)
            ]
            for j in range(2)
        ]
        return point[0], point[1], cov, blocks


# --- the estimators ----------------------------------------------------------------------


class NoiseEstimator(Protocol):
    """One way to get small-batch gradient norms from a batch.

    `batch_stats` returns the squared norms of the small-batch gradients inside the batch,
    the size of those small batches, the batch-mean gradient (per parameter) and the loss.
    The pooled two-batch arithmetic, the jackknife and the interval are shared.
    """

    method: str

    def small_batch(self, batch_size: int) -> int: ...

    def check(self, model: nn.Module, batch_size: int) -> None: ...

    def batch_stats(
        self, model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, batch: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]: ...


class TwoBatchEstimator:
    """Small batch = each drawn batch; big batch = all drawn batches pooled (appendix A.1)."""

    method = "two-batch"

    def small_batch(self, batch_size: int) -> int:
        return batch_size

    def check(self, model: nn.Module, batch_size: int) -> None:
        if batch_size < 2:
            raise ConfigError(
                f"two-batch: expected batch_size >= 2, got {batch_size}; a batch of 1 is the "
                "per-example method (method='per-example')"
            )

    def batch_stats(self, model, params, loss_fn, batch):
        loss = check_scalar_loss(loss_fn(model, batch))
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        sq = sum(g.double().square().sum() for g in grads if g is not None)
        return torch.as_tensor(sq).reshape(1), grads, loss.detach()


class PerExampleEstimator:
    """Small batch = one example: exact per-example norms (`per_example.py`)."""

    method = "per-example"

    def __init__(self) -> None:
        self._norms: PerExampleGradNorms | None = None

    def small_batch(self, batch_size: int) -> int:
        return 1

    def check(self, model: nn.Module, batch_size: int) -> None:
        check_per_example_model(model)

    def batch_stats(self, model, params, loss_fn, batch):
        if self._norms is None or self._norms.model is not model:
            self._norms = PerExampleGradNorms(model, loss_fn, params)
        return self._norms(batch)


ESTIMATORS: dict[str, type] = {
    TwoBatchEstimator.method: TwoBatchEstimator,
    PerExampleEstimator.method: PerExampleEstimator,
}


def _flatten(
    grads: Sequence[torch.Tensor | None], params: Sequence[nn.Parameter], dtype: torch.dtype
) -> torch.Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).detach().to(dtype).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


# --- the measurement ---------------------------------------------------------------------


def gradient_noise_scale(
    model: nn.Module,
    dataset: Dataset,
    loss: LossFn,
    *,
    batch_size: int,
    num_batches: int,
    method: str = "two-batch",
    seed: int = 0,
    device: str | torch.device = "auto",
    collate_fn: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    max_ci_ratio: float = MAX_CI_RATIO,
) -> NoiseScale:
    """Measure B_simple = tr(Σ)/|G|^2 at the model's current weights, in training mode.

    Draws `num_batches` disjoint batches of `batch_size` (without replacement; seeded by
    `seed`, not the global RNG) and pools them (see the module docstring). Leaves weights,
    buffers, `.grad`, train/eval mode and the RNG exactly as it found them.

    Args:
        loss: `loss(model, batch)`, the scalar batch mean (the Task contract).
        batch_size: examples per batch; the two-batch method's small batch (>= 2).
        num_batches: batches to draw (>= 4, for the jackknife interval). Together at most
            the dataset: batch_size * num_batches <= len(dataset).
        method: `two-batch` (one backward per batch) or `per-example` (exact per-example
            norms; the reference, about 2-3x a backward).
        device: `auto` (where the model is), or a device to measure on (a copy of the model
            is moved there; the original is not touched).
        optimizer: an Adam-like optimizer whose second moments precondition the gradients
            for `NoiseScale.preconditioned` (two-batch only).
        confidence: level of `b_simple_ci`.
        max_ci_ratio: high/low of the interval above which the estimate is unreliable.

    Memory: min(num_batches, 32) gradient-sized buffers for the jackknife.
    """
    estimator = _check_settings(model, dataset, method, batch_size, num_batches, confidence)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NoiseEstimateError(
            "expected a model with trainable parameters (requires_grad=True), got none; "
            "unfreeze at least one parameter"
        )
    precond = adam_preconditioner(optimizer, params) if method == "two-batch" else None

    here = _model_device(model)
    dev = here if device == "auto" else resolve_device(device)
    # Temporaries die with this call (no reference cycles), so skip the gc.collect() pass.
    with preserve_training_state(model, free_memory=False):
        target = model
        if dev != here:  # measure a copy; the caller's model stays where it is
            target = copy.deepcopy(model).to(dev)
            params = [p for p in target.parameters() if p.requires_grad]
            precond = None if precond is None else [d.to(dev) for d in precond]
        target.train()
        result = _measure(
            estimator,
            target,
            params,
            dataset,
            loss,
            Batcher(dataset, dev, collate_fn),
            batch_size=batch_size,
            num_batches=num_batches,
            seed=seed,
            precond=precond,
            confidence=confidence,
            max_ci_ratio=max_ci_ratio,
        )
        del target
    return result


def _check_settings(
    model: nn.Module,
    dataset: Dataset,
    method: str,
    batch_size: int,
    num_batches: int,
    confidence: float,
) -> NoiseEstimator:
    """Validate `gradient_noise_scale`'s settings; returns the estimator for `method`."""
    if method not in ESTIMATORS:
        raise ConfigError(f"method: expected one of {', '.join(ESTIMATORS)}, got {method!r}")
    estimator: NoiseEstimator = ESTIMATORS[method]()
    check_batch_size(batch_size)
    estimator.check(model, batch_size)
    if (
        isinstance(num_batches, bool)
        or not isinstance(num_batches, int)
        or num_batches < MIN_BATCHES
    ):
        raise ConfigError(
            f"num_batches: expected at least {MIN_BATCHES} for a confidence interval "
            f"(jackknife over batches), got {num_batches!r}; pass e.g. 16"
        )
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    size = len(dataset)
    if batch_size * num_batches > size:
        raise ConfigError(
            f"batch_size * num_batches: expected at most the {size} examples of the dataset "
            f"(batches are disjoint), got {batch_size} * {num_batches} = "
            f"{batch_size * num_batches}; use num_batches <= {size // batch_size}"
        )
    return estimator


def _measure(
    estimator: NoiseEstimator,
    model: nn.Module,
    params: list[nn.Parameter],
    dataset: Dataset,
    loss: LossFn,
    batcher: Batcher,
    *,
    batch_size: int,
    num_batches: int,
    seed: int,
    precond: list[torch.Tensor] | None,
    confidence: float,
    max_ci_ratio: float,
) -> NoiseScale:
    size = len(dataset)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    batches = order[: batch_size * num_batches].split(batch_size)
    blocks = min(num_batches, MAX_BLOCKS)
    numel = sum(p.numel() for p in params)
    dev = params[0].device
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    pool = _Pool(blocks, numel, dev, dtype)
    pre_pool = _Pool(blocks, numel, dev, dtype) if precond is not None else None
    pre_flat = None
    if precond is not None:
        pre_flat = torch.cat([d.to(dtype).reshape(-1) for d in precond])
    for index, idx in enumerate(batches):
        small_sq, grads, _ = estimator.batch_stats(model, params, loss, batcher(idx))
        values = small_sq.double().tolist()
        if not all(math.isfinite(v) for v in values):
            raise NoiseEstimateError(
                f"non-finite gradient in measurement batch {index + 1} of {num_batches} "
                f"(seed {seed}): the loss or model gives inf/nan at these weights; check the "
                "data and the learning rate that led here"
            )
        block = index * blocks // num_batches
        flat = _flatten(grads, params, dtype)
        pool.add(block, flat, len(idx), values)
        if pre_pool is not None:
            flat = flat * pre_flat
            pre_pool.add(block, flat, len(idx), [float(flat.double().square().sum())])
        del grads, flat
    small = estimator.small_batch(batch_size)
    extra = dict(small_batch=small, big_batch=batch_size * num_batches, dataset_size=size)
    common = dict(
        num_examples=batch_size * num_batches,
        method=estimator.method,
        confidence=confidence,
        max_ci_ratio=max_ci_ratio,
        **extra,
    )
    pre = None
    if pre_pool is not None:
        trace, grad_sq, cov, dof = pre_pool.estimate(small, size)
        pre = build_noise_scale(trace, grad_sq, cov, dof - 1, **common)
    trace, grad_sq, cov, dof = pool.estimate(small, size)
    return build_noise_scale(trace, grad_sq, cov, dof - 1, preconditioned=pre, **common)
