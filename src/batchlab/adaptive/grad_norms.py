"""Per-micro-batch gradient norms during gradient accumulation, for the noise estimate.

During accumulation `.grad` holds a running weighted sum of the micro-batch gradients. The
gradient of micro-batch i is the change it made, divided by its weight:

    g_i = (acc_i - acc_{i-1}) / w_i

Keeping one copy of the previous sum gives every |g_i|^2, and after the last micro-batch
|acc|^2 is the squared norm of the whole batch's gradient. Those two numbers are what the
two-batch noise estimator needs (small = micro-batch, big = the whole step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# Called at the end of a step with (mean |g_micro|^2, B_small, |G_step|^2, B_big).
NormsCallback = Callable[[float, float, float, float], None]


def grads_of(params: Iterable[nn.Parameter]) -> list[torch.Tensor | None]:
    return [p.grad for p in params]


class MicroBatchGradNorms:
    """Collects |g_i|^2 over one accumulation window and reports them at its end.

    Call `after_backward(size)` after every micro-batch's backward and `end_step()` after
    the last one, before the optimizer step. It reports `(mean |g_i|^2, B_small, |acc|^2,
    B_big)` to `on_norms` when the window had two or more micro-batches. With unequal sizes
    E mean|g_i|^2 = |G|^2 + tr(Sigma) * mean(1/b_i), so B_small is the harmonic mean of the
    sizes and the two-batch formulas stay unbiased.

    Args:
        params: the parameters whose `.grad` accumulates.
        on_norms: receives the four numbers.
        weighting: how the training loop scaled each micro-batch loss: `size` (by
            b_i / sum b, as `batchlab.step.TrainStep` does) or `equal` (by 1/k, as
            Lightning and the Hugging Face Trainer do).
    """

    def __init__(
        self, params: Iterable[nn.Parameter], on_norms: NormsCallback, weighting: str = "size"
    ) -> None:
        if weighting not in ("size", "equal"):
            raise ValueError(f"weighting: expected 'size' or 'equal', got {weighting!r}")
        self.params = [p for p in params if p.requires_grad]
        self.on_norms = on_norms
        self.weighting = weighting
        self._prev: list[torch.Tensor | None] | None = None
        self._sq: list[torch.Tensor] = []  # |acc_i - acc_{i-1}|^2, before un-weighting
        self._sizes: list[int] = []

    @torch.no_grad()
    def after_backward(self, size: int) -> None:
        prev = self._prev
        total = None
        for j, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            delta = g if prev is None or prev[j] is None else g - prev[j]
            sq = delta.pow(2).sum()
            total = sq if total is None else total + sq
        if total is None:
            return
        self._sq.append(total)
        self._sizes.append(size)
        self._prev = [
            None if p.grad is None else p.grad.detach().float().clone() for p in self.params
        ]

    def reset(self) -> None:
        self._prev, self._sq, self._sizes = None, [], []

    @torch.no_grad()
    def end_step(self, num_micro: int | None = None) -> None:
        """Report the window's norms and reset.

        `num_micro`: micro-batches in the whole step, when the last ones were not recorded
        (the Hugging Face Trainer clips gradients before any hook sees the last one). The
        big batch is then the recorded micro-batches, read from the snapshot after the last
        recorded one, so clipping or unscaling after it does not matter.
        """
        sizes, deltas, acc = self._sizes, self._sq, self._prev
        self.reset()
        recorded = len(sizes)
        num_micro = recorded if num_micro is None else num_micro
        if recorded < 2 or acc is None or num_micro < recorded:
            return  # fewer than two micro-batches: no small/big pair
        if self.weighting == "size":
            # TrainStep: acc_m = sum_i (b_i / T) g_i, T the whole step's examples, which
            # are all recorded (TrainStep always reports every micro-batch).
            total = sum(sizes)
            weights = [b / total for b in sizes]
            rescale = 1.0
        else:
            # acc_m = (1/k) sum_{i<=m} g_i; the mean of the m recorded is acc_m * k / m.
            weights = [1.0 / num_micro] * recorded
            rescale = num_micro / recorded
        small = sum(float(d) / (w * w) for d, w in zip(deltas, weights, strict=True)) / recorded
        big = rescale**2 * sum(float(a.pow(2).sum()) for a in acc if a is not None)
        b_small = recorded / sum(1.0 / b for b in sizes)
        # Size weighting: acc is the mean over all examples, B_big = sum b_i. Equal weighting:
        # the mean of m micro-gradients, E|.|^2 = |G|^2 + tr(Sigma) / (m * b_small).
        b_big = sum(sizes) if self.weighting == "size" else recorded * b_small
        self.on_norms(small, b_small, big, b_big)
