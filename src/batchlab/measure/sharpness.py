"""How sharp is the minimum a run ended in? Two measures, each named in its result.

- `hessian_top_eigenvalue`: the largest-magnitude eigenvalue of the loss Hessian, by power
  iteration on Hessian-vector products (Pearlmutter 1994; computed by double backward).
  Large-batch training ends in regions with a larger top eigenvalue (Keskar et al. 2017,
  sec. 2.2 and fig. 5; Yao et al. 2018, "Hessian-based analysis of large batch training").
- `epsilon_sharpness`: Keskar et al. 2017's metric (sec. 2.2.2, eq. 4, with A = I):
  `100 * (max_{y in C} f(x + y) - f(x)) / (1 + f(x))` over the box
  `C = {|y_i| <= eps * (|x_i| + 1)}`, maximized with L-BFGS-B as in the paper.

Both use a fixed subset of the data (the same examples for every run with the same seed),
evaluate the model in eval mode, and leave no trace: the weights are never written (the
perturbed weights go through `torch.func.functional_call`), `.grad`, the train/eval mode and
the RNG state are as they were, and the autograd graph is freed before returning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from batchlab.data import Batcher
from batchlab.errors import ConfigError
from batchlab.results import JsonResult

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class Sharpness(JsonResult):
    """One sharpness measurement."""

    method: str  # "hessian_top_eigenvalue" or "epsilon_sharpness"
    value: float
    description: str  # how it was computed, in words, for reports
    num_examples: int
    iterations: int
    converged: bool
    loss: float  # mean loss over the subset at the measured weights
    epsilon: float | None = None


def fixed_subset(dataset: Dataset, num_examples: int, seed: int = 0) -> Dataset:
    """The same `num_examples` examples on every call with the same seed."""
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ConfigError(f"sharpness examples: expected a positive integer, got {num_examples!r}")
    n = len(dataset)
    if num_examples >= n:
        return dataset
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_examples]
    return Subset(dataset, order.sort().values.tolist())


class _Probe:
    """Model in eval mode, RNG forked, the subset batched once; all put back on exit."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        num_examples: int,
        chunk_size: int,
        seed: int,
        collate_fn: Callable | None,
    ) -> None:
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ConfigError("sharpness: expected a model with trainable parameters, got none")
        self.device = next(iter(self.params.values())).device
        subset = fixed_subset(dataset, num_examples, seed)
        if isinstance(subset, Subset) and collate_fn is None and hasattr(dataset, "tensors"):
            # A TensorDataset subset: index the tensors directly, no per-example Python work.
            idx = torch.as_tensor(subset.indices)
            subset = torch.utils.data.TensorDataset(*(t[idx] for t in dataset.tensors))
        self.batcher = Batcher(subset, self.device, collate_fn)
        self.total = len(subset)
        self.chunk_size = chunk_size
        self.seed = seed

    def chunks(self) -> Iterator[tuple[float, Any]]:
        for size, batch in self.batcher.sequential(self.chunk_size):
            yield size / self.total, batch

    def __enter__(self) -> _Probe:
        self.was_training = self.model.training
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()
        torch.manual_seed(self.seed)
        self.model.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
        self.rng.__exit__(None, None, None)


def hessian_top_eigenvalue(
    model: nn.Module,
    dataset: Dataset,
    loss: LossFn,
    *,
    num_examples: int = 1024,
    chunk_size: int = 256,
    max_iterations: int = 30,
    tol: float = 1e-3,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> Sharpness:
    """Top Hessian eigenvalue of the mean loss over a fixed subset, by power iteration.

    Each iteration is one Hessian-vector product H v = d/dtheta (grad L . v) (double
    backward), summed over chunks of `chunk_size` examples so memory stays bounded. Stops
    when the Rayleigh quotient changes by less than `tol` (relative). Power iteration finds
    the eigenvalue of largest magnitude; near a minimum that is the top (positive) one.
    """
    if max_iterations < 1:
        raise ConfigError(f"max iterations: expected >= 1, got {max_iterations!r}")
    with _Probe(model, dataset, num_examples, chunk_size, seed, collate_fn) as probe:
        params = list(probe.params.values())
        gen = torch.Generator().manual_seed(seed)
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
        v = _normalized(v)
        eigenvalue, previous, converged, iterations = math.nan, math.nan, False, 0
        loss_value = 0.0
        for _ in range(max_iterations):
            iterations += 1
            hv = [torch.zeros_like(p) for p in params]
            loss_value = 0.0
            for weight, batch in probe.chunks():
                value = loss(model, batch) * weight
                grads = torch.autograd.grad(value, params, create_graph=True)
                dot = sum((g * u).sum() for g, u in zip(grads, v, strict=True))
                parts = torch.autograd.grad(dot, params)
                for acc, part in zip(hv, parts, strict=True):
                    acc.add_(part.detach())
                loss_value += float(value.detach())
                del value, grads, dot, parts  # free the graph before the next chunk
            eigenvalue = float(sum((a * b).sum() for a, b in zip(v, hv, strict=True)))
            norm = math.sqrt(float(sum((h * h).sum() for h in hv)))
            if not math.isfinite(eigenvalue) or norm == 0.0:
                break
            v = [h / norm for h in hv]
            if math.isfinite(previous) and abs(eigenvalue - previous) <= tol * abs(eigenvalue):
                converged = True
                break
            previous = eigenvalue
        del v, hv
    return Sharpness(
        method="hessian_top_eigenvalue",
        value=eigenvalue,
        description=(
            "top Hessian eigenvalue: power iteration on Hessian-vector products "
            f"(double backward), {probe.total} fixed training examples"
        ),
        num_examples=probe.total,
        iterations=iterations,
        converged=converged,
        loss=loss_value,
    )


def _normalized(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((x * x).sum() for x in vectors))
    return [x / norm for x in vectors]


def epsilon_sharpness(
    model: nn.Module,
    dataset: Dataset,
    loss: LossFn,
    *,
    epsilon: float = 1e-3,
    num_examples: int = 1024,
    chunk_size: int = 1024,
    max_iterations: int = 10,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> Sharpness:
    """Keskar et al. 2017's epsilon-sharpness in the full parameter space (A = I).

    `100 * (max_{y in C} f(x + y) - f(x)) / (1 + f(x))`, C = {|y_i| <= eps (|x_i| + 1)}.
    The inner max is solved like the paper: L-BFGS-B for `max_iterations` iterations. It
    starts from a random corner-biased point of the box (a minimum has zero gradient, so
    starting at y = 0 would never move). The result is a lower bound of the true max.
    """
    from scipy.optimize import minimize

    if not epsilon > 0:
        raise ConfigError(f"epsilon: expected a positive number, got {epsilon!r}")
    with _Probe(model, dataset, num_examples, chunk_size, seed, collate_fn) as probe:
        names = list(probe.params)
        base = [probe.params[n].detach() for n in names]
        shapes = [b.shape for b in base]
        sizes = [b.numel() for b in base]
        flat0 = torch.cat([b.reshape(-1) for b in base]).double()
        box = (epsilon * (flat0.abs() + 1.0)).cpu().numpy()

        def value_and_grad(y_np) -> tuple[float, Any]:
            y = torch.as_tensor(y_np, dtype=flat0.dtype, device=flat0.device)
            leaves = [
                t.to(b.dtype).requires_grad_(True)
                for t, b in zip(_split(flat0 + y, shapes, sizes), base, strict=True)
            ]
            total, grads = 0.0, [torch.zeros_like(leaf) for leaf in leaves]
            for weight, batch in probe.chunks():
                call = _FunctionalModel(model, dict(zip(names, leaves, strict=True)))
                value = loss(call, batch) * weight
                parts = torch.autograd.grad(value, leaves)
                for acc, part in zip(grads, parts, strict=True):
                    acc.add_(part)
                total += float(value.detach())
            flat_grad = torch.cat([g.reshape(-1) for g in grads]).double().cpu().numpy()
            return total, flat_grad

        f0, _ = value_and_grad(0.0 * box)
        gen = torch.Generator().manual_seed(seed)
        start = (torch.rand(len(box), generator=gen, dtype=torch.float64) * 2 - 1).numpy() * box
        result = minimize(
            lambda y: tuple(-z for z in value_and_grad(y)),
            start,
            jac=True,
            method="L-BFGS-B",
            bounds=list(zip(-box, box, strict=True)),
            options={"maxiter": max_iterations},
        )
        f_max = max(-float(result.fun), f0)
    return Sharpness(
        method="epsilon_sharpness",
        value=100.0 * (f_max - f0) / (1.0 + f0),
        description=(
            f"Keskar et al. epsilon-sharpness, eps={epsilon:g}, full space, L-BFGS-B "
            f"{max_iterations} iterations, {probe.total} fixed training examples"
        ),
        num_examples=probe.total,
        iterations=int(result.nit),
        converged=bool(result.success),
        loss=f0,
        epsilon=epsilon,
    )


def _split(flat: torch.Tensor, shapes: list, sizes: list[int]) -> list[torch.Tensor]:
    return [part.reshape(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True)]


class _FunctionalModel(nn.Module):
    """Calls `model` with substituted parameters, so task loss functions can take it as the
    model (`loss(model, batch)` calls `model(x)`). The real model's weights are untouched."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_params", params)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._model, self._params, args, kwargs)
