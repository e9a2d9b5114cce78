"""The one gradient-norm collector: each accumulation micro-batch's gradient norm, nearly free.

Used by `GradientNoiseScaleTracker` (the engine, plain loops) and, through it, by the
Lightning and Hugging Face integrations. `adam_preconditioner` reads an Adam-like
optimizer's second moments for the preconditioned noise scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

# Preconditioner weights are capped at this multiple of their tensor's median weight. Adam's
# 1/(sqrt(v)+eps) reaches 6e4x the median on mnist1d-mlp (weights that almost never see a
# gradient); one example touching such a coordinate made the exact full-data preconditioned
# B_simple jump 300-3000x for one step, and the live EMA carried the jump for 100 steps. At a
# cap of 10 the exact values lose those jumps and change by < 1% elsewhere (3 and 100 alike):
# benchmarks/results/noise_tracking.md, "Adam-preconditioned".
PRECONDITIONER_CAP = 10.0
# The median is taken over at most this many evenly strided entries of a tensor.
MEDIAN_SAMPLE = 1 << 16


class MicroBatchNorms:
    """Norms of each micro-batch's contribution to `.grad`, and of the step's total.

    The trick that makes it nearly free: after each micro-batch's backward, the collector
    takes the fresh gradients out of `.grad` and adds them into its own running sum, then
    leaves `.grad` empty. The next backward then writes its gradient into a fresh tensor
    (autograd hands it over without a copy) instead of adding it in place, so `.grad` holds
    exactly that micro-batch's contribution. Folding it into the running sum is the same
    addition autograd would have done, in the same order (the step's gradient is bitwise
    unchanged); the only extra work is one norm per micro-batch. After the last one (or at
    `restore`) the sum goes back into `.grad`.

    With `all_micro=False` only the first micro-batch is measured and `.grad` is never
    touched (read-only: safe where a framework reads `.grad` at moments no hook sees).

    Norms stay on the device as per-parameter 0-d tensors until the tracker flushes them.
    (An earlier second collector diffed snapshots of `.grad`: one gradient-sized copy and
    float32 rounding in every difference; this one needs neither.)
    """

    def __init__(self, params: list[nn.Parameter], all_micro: bool) -> None:
        self.params = params
        self.all_micro = all_micro
        self.sq: list[list[torch.Tensor]] = []  # per micro-batch: per-parameter norms
        self.pre_sq: list[list[torch.Tensor]] = []
        self.running: list[torch.Tensor | None] = [None] * len(params)
        self.pre: list[torch.Tensor] | None = None

    def micro(self, index: int, last: bool, precond: list[torch.Tensor] | None) -> None:
        """Measure micro-batch `index` (0-based) now in `.grad`; `last` puts the sum back."""
        if index == 0:
            self.pre = precond
        elif not self.all_micro:
            return  # only the first micro-batch is measured; autograd accumulates as usual
        grads = [p.grad for p in self.params]
        self.sq.append(self._norms(grads, None))
        if self.pre is not None:
            self.pre_sq.append(self._norms(grads, self.pre))
        if not self.all_micro:
            return
        self._fold(index, grads)
        if last:
            for p, r in zip(self.params, self.running, strict=True):
                p.grad = r
            self.running = [None] * len(self.params)
        else:
            for p in self.params:
                p.grad = None

    def _fold(self, index: int, grads: list[torch.Tensor | None]) -> None:
        """Add this micro-batch's gradients into the running sum, as autograd would."""
        running = self.running
        if index == 0:
            running[:] = grads
            return
        if all(r is not None and not r.is_sparse for r in running) and all(
            g is not None and not g.is_sparse for g in grads
        ):
            torch._foreach_add_(running, grads)
            return
        for j, (r, g) in enumerate(zip(running, grads, strict=True)):
            if g is None:
                continue
            if r is None:
                running[j] = g
            else:
                running[j] = r.add_(g) if not r.is_sparse else r + g

    def restore(self) -> None:
        """Put the running sum back into `.grad` (when the last micro-batch was not flagged)."""
        if any(r is not None for r in self.running):
            for p, r in zip(self.params, self.running, strict=True):
                if r is not None:
                    p.grad = r
            self.running = [None] * len(self.params)

    def total(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per-parameter norms of the step's gradient (and of its preconditioned form)."""
        self.restore()
        grads = [p.grad for p in self.params]
        pre = self._norms(grads, self.pre) if self.pre is not None else None
        return self._norms(grads, None), pre

    @staticmethod
    def _norms(
        grads: list[torch.Tensor | None], precond: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        pairs = [(g, d) for g, d in zip(grads, precond or [None] * len(grads), strict=True)
                 if g is not None]  # fmt: skip
        live, weights = [], []
        for g, d in pairs:
            if g.is_sparse:  # an embedding's rows: weight each stored row by its own row
                g = g.coalesce()
                d = None if d is None else d[tuple(g.indices())]
                g = g.values()
            live.append(g)
            weights.append(d)
        if precond is not None:
            live = _foreach_mul(live, weights)
        return _foreach_norm(live)


def _foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch._foreach_norm(tensors)) if tensors else []


def _foreach_mul(tensors: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch._foreach_mul(tensors, weights)) if tensors else []


def adam_preconditioner(
    optimizer: torch.optim.Optimizer | None, params: Sequence[nn.Parameter]
) -> list[torch.Tensor] | None:
    """1/(sqrt(v_hat)+eps) per parameter from an Adam-like optimizer's state, else None.

    Each tensor's weights are capped at `PRECONDITIONER_CAP` times its median weight: the
    coordinates Adam has (almost) never seen a gradient for would otherwise dominate the
    noise scale whenever one example touches them.
    Detected from the state itself (`exp_avg_sq`, `step`), whatever the optimizer's class or
    how it was chosen: AdaptDL only applies its preconditioned noise scale on one code path.
    None before the first step (no second moment yet) or for other optimizers.
    """
    if optimizer is None:
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: list[torch.Tensor | None] = []
    for p in params:
        state, group = optimizer.state.get(p, {}), group_of.get(id(p))
        if group is None or "exp_avg_sq" not in state or "step" not in state:
            out.append(None)  # never stepped by this optimizer (unused, or not in it)
            continue
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = float(state["step"])
        beta2 = group.get("betas", (0.9, 0.999))[1]
        v_hat = v / (1 - beta2**step) if step > 0 else v
        out.append(_capped(1.0 / (v_hat.sqrt() + group.get("eps", 1e-8)), v_hat > 0))
    if all(w is None for w in out):
        return None
    # A parameter Adam has not stepped (its gradient is None in practice) is left unweighted
    # rather than turning the whole model's preconditioned metric off.
    return [torch.ones_like(p) if w is None else w for p, w in zip(params, out, strict=True)]


def _capped(weights: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """`weights` clamped at PRECONDITIONER_CAP x the median weight of the coordinates Adam
    has seen a gradient for (`seen`; an embedding table whose rows are mostly unseen would
    otherwise have the median 1/eps). The median is over a strided sample whose stride is
    coprime with the last dimension (a stride that divides the row length reads only a few
    columns). No host sync: unseen coordinates become NaN and `nanmedian` skips them."""
    flat, seen_flat = weights.reshape(-1), seen.reshape(-1)
    if flat.numel() == 0:
        return weights
    stride = max(1, flat.numel() // MEDIAN_SAMPLE)
    row = weights.shape[-1] if weights.ndim > 1 else 1
    while stride > 1 and math.gcd(stride, row) != 1:
        stride += 1
    sample = torch.where(seen_flat[::stride], flat[::stride], torch.nan)
    cap = torch.nan_to_num(sample.nanmedian() * PRECONDITIONER_CAP, nan=math.inf)
    return torch.minimum(weights, cap)
