"""Exact per-example gradient norms, mostly without materializing per-example gradients.

For a layer `y = x W^T + b`, the gradient of example i is `sum_t d_it x_it^T` (d: the
gradient w.r.t. the output, t: positions in a sequence or image). Its squared norm is

    |grad_i W|^2 = sum_{t,s} (x_it . x_is) (d_it . d_is)     (the Gram trick)

which for one position (plain 2-D input) is `|x_i|^2 |d_i|^2`: Goodfellow 2015,
"Efficient Per-Example Gradient Computations"; Gray et al. 2023, "Efficient and Approximate
Per-Example Gradient Norms for Gradient Noise Scale" (CerebrasResearch/nanoGNS). For long
sequences the gradient itself, `d_i^T x_i`, is cheaper, and we pick whichever costs fewer
flops. Convolutions become the same sum after `unfold`; embeddings add `d_it` into the rows
of the tokens they saw; LayerNorm/RMSNorm gradients are `sum_t d_it * xhat_it`.

Every other trainable parameter (a layer type not listed, a module called twice, weights
tied between modules, or a module whose input is not batch-first, like a positional
embedding called with `arange(T)`) falls back to `torch.func.vmap(grad(...))` over the
examples, for those parameters only.

A probe decides which modules qualify: it runs the loss at two small sub-batch sizes and
keeps a module only if its input's first dimension follows the batch size both times and it
is called exactly once.

The per-example gradient here is that of the per-example loss `loss(model, batch_of_one)`;
the batch loss must be the mean of those (the Task contract), so
`batch gradient == mean of per-example gradients`. BatchNorm in training mode breaks this
(examples interact through batch statistics) and is refused.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from batchlab.errors import NoiseEstimateError, TaskError
from batchlab.step import check_scalar_loss
from batchlab.task import LossFn

# Per-example gradients of the vmap fallback are materialized: n * numel floats at a time.
VMAP_CHUNK_FLOATS = 1 << 26

_NormFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def batch_size_of(batch: Any) -> int:
    """The shared first dimension of every tensor in `batch`; a TaskError if there is none."""
    leaves = [x for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor) and x.ndim > 0]
    sizes = {int(x.shape[0]) for x in leaves}
    if len(sizes) != 1:
        shapes = [tuple(x.shape) for x in leaves]
        raise TaskError(
            "per-example gradients need every tensor in the batch to have the examples as its "
            f"first dimension; got shapes {shapes}"
        )
    return sizes.pop()


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for the norm arithmetic, float64 kept as is."""
    return t if t.dtype == torch.float64 else t.float()


def _slice(batch: Any, size: int) -> Any:
    return tree_map(lambda x: x[:size] if isinstance(x, torch.Tensor) and x.ndim > 0 else x, batch)


# --- per-layer norms. x: the module input, d: gradient w.r.t. its output (both batch-first) ---


def _sum_outer_sq(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """|sum_t d_t x_t^T|^2 per example, for x (n, T, a) and d (n, T, b)."""
    n, t, a = x.shape
    b = d.shape[-1]
    if t == 1:
        return x.square().sum((1, 2)) * d.square().sum((1, 2))
    if t * (a + b) <= a * b:  # Gram trick: n T^2 (a + b) flops instead of n T a b
        return ((x @ x.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
    return torch.bmm(d.transpose(1, 2), x).square().sum((1, 2))


def _linear_norms(mod: nn.Linear, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    n = x.shape[0]
    x = x.reshape(n, -1, x.shape[-1])
    d = d.reshape(n, -1, d.shape[-1])
    out = {"weight": _sum_outer_sq(x, d)}
    if mod.bias is not None:
        out["bias"] = d.sum(1).square().sum(1)
    return out


def _conv_geometry(mod: nn.Module) -> tuple[tuple[int, ...], ...] | None:
    """(kernel, dilation, padding, stride) as 2-D tuples, or None if unfold cannot express it."""
    if mod.groups != 1 or mod.padding_mode != "zeros":
        return None
    kernel, dilation, stride = mod.kernel_size, mod.dilation, mod.stride
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            padding = (0,) * len(kernel)
        else:  # "same": fine when the padding is symmetric
            totals = [dl * (k - 1) for dl, k in zip(dilation, kernel, strict=True)]
            if any(tot % 2 for tot in totals):
                return None
            padding = tuple(tot // 2 for tot in totals)
    else:
        padding = tuple(mod.padding)
    if isinstance(mod, nn.Conv1d):
        return (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
    return tuple(kernel), tuple(dilation), padding, tuple(stride)


def _conv_norms(mod: nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    kernel, dilation, padding, stride = _conv_geometry(mod)
    n = x.shape[0]
    if isinstance(mod, nn.Conv1d):
        x = x.unsqueeze(2)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    d = d.reshape(n, d.shape[1], -1).transpose(1, 2)  # (n, positions, C_out)
    out = {"weight": _sum_outer_sq(patches.transpose(1, 2), d)}
    if mod.bias is not None:
        out["bias"] = d.sum(1).square().sum(1)
    return out


def _embedding_norms(
    mod: nn.Embedding, idx: torch.Tensor, d: torch.Tensor
) -> dict[str, torch.Tensor]:
    n = idx.shape[0]
    idx = idx.reshape(n, -1)
    d = d.reshape(n, idx.shape[1], -1)
    if mod.padding_idx is not None:  # that row never receives a gradient
        d = d * (idx != mod.padding_idx).unsqueeze(-1)
    t, vocab, dim = idx.shape[1], mod.num_embeddings, d.shape[-1]
    if vocab <= t * t and n * vocab * dim <= VMAP_CHUNK_FLOATS:
        # Scatter each example's rows into its own copy of the table: n (T + V) D flops.
        rows = (idx + torch.arange(n, device=idx.device).unsqueeze(1) * vocab).reshape(-1)
        table = torch.zeros(n * vocab, dim, device=d.device, dtype=d.dtype)
        table.index_add_(0, rows, d.reshape(-1, dim))
        return {"weight": table.view(n, -1).square().sum(1)}
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(d.dtype)  # tokens sharing a row
    return {"weight": (same * (d @ d.transpose(1, 2))).sum((1, 2))}


def _norm_layer_norms(mod: nn.Module, x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    shape = tuple(mod.normalized_shape)
    if isinstance(mod, nn.LayerNorm):
        xhat = F.layer_norm(x, shape, eps=mod.eps)
    else:  # RMSNorm
        eps = mod.eps if mod.eps is not None else torch.finfo(x.dtype).eps
        dims = tuple(range(-len(shape), 0))
        xhat = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    n, size = x.shape[0], int(torch.tensor(shape).prod())
    d = d.reshape(n, -1, size)
    out = {}
    if getattr(mod, "weight", None) is not None:
        out["weight"] = (d * xhat.reshape(n, -1, size)).sum(1).square().sum(1)
    if getattr(mod, "bias", None) is not None:
        out["bias"] = d.sum(1).square().sum(1)
    return out


def _norm_fn(mod: nn.Module) -> _NormFn | None:
    """The per-example norm function for a module, or None when it needs the fallback."""
    if type(mod) is nn.Linear:
        return _linear_norms
    if type(mod) in (nn.Conv1d, nn.Conv2d) and _conv_geometry(mod) is not None:
        return _conv_norms
    if type(mod) is nn.Embedding and mod.max_norm is None and not mod.scale_grad_by_freq:
        return _embedding_norms
    if type(mod) is nn.LayerNorm or (hasattr(nn, "RMSNorm") and type(mod) is nn.RMSNorm):
        return _norm_layer_norms
    return None


class _Functional:
    """Stands in for the model inside vmap: same attributes, parameters swapped in."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor]) -> None:
        self._module = module
        self._params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._module, self._params, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def check_per_example_model(model: nn.Module) -> None:
    """Refuse models whose examples interact in training mode (BatchNorm)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            raise NoiseEstimateError(
                f"per-example gradients are undefined for {name or 'the model'} "
                f"({type(mod).__name__} in training mode: examples interact through batch "
                "statistics); use method='two-batch'"
            )


class PerExampleGradNorms:
    """Squared norms of per-example gradients and the batch gradient, in one pass.

    Build it once per model (the first call probes which modules the layer trick covers),
    then call it on batches: `sq_norms, grads, loss = norms(batch)`. `sq_norms[i]` is
    `|grad of loss(model, example i)|^2` over `params`; `grads` is the batch-mean gradient.
    Hooks live only for the duration of a call.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: Sequence[nn.Parameter]) -> None:
        check_per_example_model(model)
        self.model = model
        self.loss_fn = loss_fn
        self.params = list(params)
        self.hooked: dict[nn.Module, tuple[_NormFn, list[str]]] = {}
        self.fallback: dict[str, nn.Parameter] = {}
        self.strategy: str | None = None  # "hooks" (+ vmap for the fallback) or "vmap"
        self._names: list[str] = []
        self._planned = False

    # -- planning ---------------------------------------------------------------------------

    def _plan(self, batch: Any, n: int) -> None:
        trainable = {id(p) for p in self.params}
        owners: dict[int, set[nn.Module]] = {}
        for mod in self.model.modules():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), set()).add(mod)
        candidates = {
            mod: fn
            for mod in self.model.modules()
            if (fn := _norm_fn(mod)) is not None
            and any(id(p) in trainable for p in mod.parameters(recurse=False))
        }
        if candidates:
            sizes = (1, 2) if n == 2 else (2, 3)
            batched = {mod: True for mod in candidates}
            for size in sizes:
                calls = self._probe(candidates, _slice(batch, size))
                for mod in candidates:
                    seen = calls.get(mod, [])
                    if len(seen) != 1 or seen[0] != size:
                        batched[mod] = False
            hooked = [mod for mod in candidates if batched[mod]]
        else:
            hooked = []
        covered: set[int] = set()
        self.hooked = {}
        for mod in hooked:
            names = [
                name
                for name, p in mod.named_parameters(recurse=False)
                if id(p) in trainable and owners[id(p)] == {mod}
            ]
            if names:
                self.hooked[mod] = (candidates[mod], names)
                covered.update(id(getattr(mod, name)) for name in names)
        names_of = {id(p): name for name, p in self.model.named_parameters()}
        self.fallback = {names_of[id(p)]: p for p in self.params if id(p) not in covered}
        self._names = [names_of[id(p)] for p in self.params]
        self.strategy = None if self.fallback else "hooks"
        self._planned = True

    def _probe(self, modules: dict[nn.Module, _NormFn], batch: Any) -> dict[nn.Module, list]:
        calls: dict[nn.Module, list] = {}

        def record(mod: nn.Module, args: tuple, output: Any) -> None:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            ok = (
                first is not None
                and first.ndim >= 1
                and isinstance(output, torch.Tensor)
                and output.ndim >= 1
                and output.shape[0] == first.shape[0]
            )
            calls.setdefault(mod, []).append(int(first.shape[0]) if ok else -1)

        handles = [m.register_forward_hook(record) for m in modules]
        try:
            with torch.no_grad():
                self.loss_fn(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        return calls

    # -- measuring --------------------------------------------------------------------------

    def __call__(self, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        n = batch_size_of(batch)
        if n >= 2 and not self._planned:
            self._plan(batch, n)
        if n < 2 or self.strategy == "hooks":
            return self._hooks_pass(batch, n)
        if self.strategy == "vmap":
            return self._vmap_pass(batch, n)
        # Parameters the hooks cannot cover need a vmapped forward and backward through the
        # whole model anyway (e.g. a positional embedding at the bottom of a transformer).
        # Then vmapping every parameter can be cheaper than hooks + vmap: both are exact,
        # so time each once on this batch and keep the faster.
        timings = {}
        for strategy, run in (("hooks", self._hooks_pass), ("vmap", self._vmap_pass)):
            start = time.perf_counter()
            result = run(batch, n)
            _sync(result[0])
            timings[strategy] = time.perf_counter() - start
        self.strategy = min(timings, key=timings.get)
        return result

    def _hooks_pass(
        self, batch: Any, n: int
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        if n == 1:  # the batch gradient is the example's gradient
            loss = check_scalar_loss(self.loss_fn(self.model, batch))
            grads = list(torch.autograd.grad(loss, self.params, allow_unused=True))
            with torch.no_grad():
                sq = sum(_wide(g).square().sum() for g in grads if g is not None)
            return torch.as_tensor(sq, device=loss.device).reshape(1), grads, loss.detach()
        contributions: list[torch.Tensor] = []

        def forward_hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            if x.shape[0] != n or not output.requires_grad:
                raise NoiseEstimateError(
                    f"per-example: {type(mod).__name__} saw a first dimension of {x.shape[0]}, "
                    f"expected the batch size {n}; the model's call pattern changed between "
                    "batches, use method='two-batch'"
                )
            fn, names = self.hooked[mod]
            x = _wide(x) if x.is_floating_point() else x

            def backward_hook(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    parts = fn(mod, x, _wide(grad.detach()))
                    contributions.extend(parts[name] for name in names)

            output.register_hook(backward_hook)

        handles = [mod.register_forward_hook(forward_hook) for mod in self.hooked]
        try:
            loss = check_scalar_loss(self.loss_fn(self.model, batch))
            grads = list(torch.autograd.grad(loss, self.params, allow_unused=True))
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            sq = torch.zeros(n, device=loss.device, dtype=_wide(loss).dtype)
            if contributions:
                # Output gradients are those of the batch mean: 1/n of each example's own.
                sq = torch.stack(contributions).sum(0) * float(n * n)
            if self.fallback:
                sq = sq + self._vmap_sq_norms(batch, n)
        return sq, grads, loss.detach()

    def _vmap_sq_norms(self, batch: Any, n: int) -> torch.Tensor:
        grads, _ = self._vmap_grads(batch, n, self.fallback)
        return sum(_wide(g).reshape(n, -1).square().sum(1) for g in grads.values())

    def _vmap_pass(
        self, batch: Any, n: int
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        """Every parameter through vmap: norms, mean gradient and mean loss at once."""
        named = dict(zip(self._names, self.params, strict=True))
        grads, losses = self._vmap_grads(batch, n, named)
        sq = sum(_wide(g).reshape(n, -1).square().sum(1) for g in grads.values())
        mean = [grads[name].mean(0).to(p.dtype) for name, p in named.items()]
        return sq, mean, losses.mean()

    def _vmap_grads(
        self, batch: Any, n: int, params: dict[str, nn.Parameter]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-example gradients (n, *shape) of `params`, and the per-example losses."""
        values = {name: p.detach() for name, p in params.items()}
        loss_fn, model = self.loss_fn, self.model

        def example_loss(params: dict[str, torch.Tensor], example: Any) -> torch.Tensor:
            one = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example)
            return loss_fn(_Functional(model, params), one)

        in_dims = tree_map(
            lambda x: 0 if isinstance(x, torch.Tensor) and x.ndim > 0 else None, batch
        )
        numel = sum(v.numel() for v in values.values())
        chunk = max(1, min(n, VMAP_CHUNK_FLOATS // max(1, numel)))
        per_example = torch.func.vmap(
            torch.func.grad_and_value(example_loss),
            in_dims=(None, in_dims),
            randomness="different",
            chunk_size=chunk if chunk < n else None,
        )
        with warnings.catch_warnings(), torch.no_grad():
            # functorch warns when an op (e.g. CPU flash attention) has no batching rule.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return per_example(values, batch)


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def per_example_grad_norms(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: Sequence[nn.Parameter] | None = None
) -> torch.Tensor:
    """`|grad of loss(model, example i)|^2` for each example i of `batch` (shape `(n,)`).

    One-shot convenience over `PerExampleGradNorms` (which caches its plan across batches).
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return PerExampleGradNorms(model, loss_fn, params)(batch)[0]
