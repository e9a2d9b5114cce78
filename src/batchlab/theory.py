"""Pure functions: batch arithmetic, learning-rate rules and the large-batch trade-off.

Nothing here measures anything; every function is a formula with its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchlab.core.checks import check_batch_size
from batchlab.errors import ConfigError
from batchlab.results import JsonResult

LR_RULES = ("none", "linear", "sqrt", "adascale")


@dataclass(frozen=True)
class BatchArithmetic(JsonResult):
    """How many iterations and optimizer steps a run takes (what `batchlab calc` prints)."""

    samples: int
    batch_size: int
    epochs: int
    accumulation_steps: int
    world_size: int
    drop_last: bool
    iterations_per_epoch: int  # micro-batches each rank runs per epoch
    total_iterations: int
    optimizer_steps_per_epoch: int
    total_optimizer_steps: int
    effective_batch_size: int  # batch_size * accumulation_steps * world_size
    samples_per_epoch: int  # examples actually processed per epoch, all ranks together
    last_batch_size: int  # size of each rank's final micro-batch of an epoch


def calc(
    samples: int,
    batch_size: int,
    epochs: int = 1,
    *,
    accumulation_steps: int = 1,
    world_size: int = 1,
    drop_last: bool = False,
) -> BatchArithmetic:
    """Batch, iteration and epoch arithmetic.

    Each of `world_size` ranks gets `ceil(samples / world_size)` examples per epoch (as
    `DistributedSampler` pads), or `floor(...)` with `drop_last`. A rank's final partial
    micro-batch is kept, or dropped with `drop_last`. A partial accumulation window at
    the end of an epoch still makes an optimizer step (as Lightning and HF Trainer do).

    >>> calc(1024, 8, 10).total_iterations
    1280
    """
    check_batch_size(samples, what="samples")
    check_batch_size(batch_size, what="batch size")
    check_batch_size(epochs, what="epochs")
    check_batch_size(accumulation_steps, what="accumulation steps")
    check_batch_size(world_size, what="world size")
    if drop_last:
        per_rank = samples // world_size
        iterations = per_rank // batch_size
        last = batch_size if iterations else 0
        processed = iterations * batch_size * world_size
    else:
        per_rank = math.ceil(samples / world_size)
        iterations = math.ceil(per_rank / batch_size)
        last = per_rank - (iterations - 1) * batch_size
        processed = per_rank * world_size
    if iterations == 0:
        raise ConfigError(
            f"with --drop-last, batch size {batch_size} x world size {world_size} is larger "
            f"than the {samples} samples, so an epoch has no iterations; use a smaller batch"
        )
    steps = (
        iterations // accumulation_steps
        if drop_last
        else math.ceil(iterations / accumulation_steps)
    )
    return BatchArithmetic(
        samples=samples,
        batch_size=batch_size,
        epochs=epochs,
        accumulation_steps=accumulation_steps,
        world_size=world_size,
        drop_last=drop_last,
        iterations_per_epoch=iterations,
        total_iterations=iterations * epochs,
        optimizer_steps_per_epoch=steps,
        total_optimizer_steps=steps * epochs,
        effective_batch_size=batch_size * accumulation_steps * world_size,
        samples_per_epoch=processed,
        last_batch_size=last,
    )


def adascale_gain(batch_size: float, reference_batch_size: float, b_simple: float) -> float:
    """AdaScale gain r (Johnson et al. 2020) in noise-scale terms.

    r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2) with S = B/B0, sigma^2 = tr(Sigma)/B0 and
    mu^2 = |G|^2, which is r = (B/B0) * (B_simple + B0) / (B_simple + B). 1 <= r <= S.
    """
    scale = batch_size / reference_batch_size
    if b_simple <= 0 or not math.isfinite(b_simple):
        raise ConfigError(f"AdaScale needs a positive finite B_simple, got {b_simple!r}")
    return scale * (b_simple + reference_batch_size) / (b_simple + batch_size)


def scale_lr(
    lr: float,
    reference_batch_size: int,
    batch_size: int,
    rule: str,
    *,
    b_simple: float | None = None,
) -> float:
    """The learning rate for `batch_size`, from a known-good `(reference_batch_size, lr)`.

    - `none`: unchanged.
    - `linear`: lr * B/B0 (Goyal et al. 2017), for SGD-like optimizers.
    - `sqrt`: lr * sqrt(B/B0) (Hoffer et al. 2017), for Adam-like optimizers.
    - `adascale`: lr * r, the AdaScale gain, which needs `b_simple`.
    """
    ratio = batch_size / reference_batch_size
    if rule == "none":
        return lr
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "adascale":
        if b_simple is None:
            raise ConfigError(
                "lr rule 'adascale' needs a measured B_simple; run `batchlab noise` "
                "or use --lr-rule linear/sqrt"
            )
        return lr * adascale_gain(batch_size, reference_batch_size, b_simple)
    raise ConfigError(f"lr rule: expected one of {', '.join(LR_RULES)}, got {rule!r}")


def steps_factor(batch_size: float, b_noise: float) -> float:
    """S(B) / S_min = 1 + B_noise / B (McCandlish et al. 2018, eq. 2.11)."""
    return 1.0 + b_noise / batch_size


def examples_factor(batch_size: float, b_noise: float) -> float:
    """E(B) / E_min = 1 + B / B_noise (McCandlish et al. 2018, eq. 2.11)."""
    return 1.0 + batch_size / b_noise


def relative_steps(batch_size: float, reference_batch_size: float, b_noise: float) -> float:
    """S(B) / S(B0) = (1 + B_noise/B) / (1 + B_noise/B0): no S_min needed."""
    return steps_factor(batch_size, b_noise) / steps_factor(reference_batch_size, b_noise)


def predicted_speedup(
    batch_size: float,
    reference_batch_size: float,
    b_noise: float,
    step_seconds: float,
    reference_step_seconds: float,
) -> float:
    """speedup(B) = [S(B0) t(B0)] / [S(B) t(B)], with S from McCandlish et al. 2018.

    `step_seconds` is the wall time of one optimizer step at effective batch B (including
    accumulation). A value above 1 means B reaches the target sooner than B0.
    """
    return (steps_factor(reference_batch_size, b_noise) * reference_step_seconds) / (
        steps_factor(batch_size, b_noise) * step_seconds
    )


def interpolate_step_seconds(
    batch_sizes: list[int] | tuple[int, ...],
    step_seconds: list[float] | tuple[float, ...],
    batch_size: float,
) -> float:
    """Seconds per step at `batch_size`, interpolated linearly in log-log space.

    Step time is close to a power law in B between measured points, so log-log is the
    natural scale. Outside the measured range we extrapolate conservatively: above the
    largest point throughput stays at its last measured value (t grows in proportion to
    B); below the smallest point a step takes no less time than the smallest measured.
    """
    import numpy as np

    if len(batch_sizes) != len(step_seconds) or not batch_sizes:
        raise ConfigError("expected matching, non-empty batch sizes and step times")
    order = np.argsort(batch_sizes)
    xs = np.log(np.asarray(batch_sizes, dtype=float)[order])
    ys = np.log(np.asarray(step_seconds, dtype=float)[order])
    x = math.log(batch_size)
    if x >= xs[-1]:
        return float(math.exp(ys[-1] + (x - xs[-1])))
    if x <= xs[0]:
        return float(math.exp(ys[0]))
    return float(math.exp(np.interp(x, xs, ys)))


def monotone_step_seconds(
    batch_sizes: list[int] | tuple[int, ...], step_seconds: list[float] | tuple[float, ...]
) -> list[float]:
    """Measured step times made non-decreasing in B by isotonic regression (in log time).

    A bigger batch does at least the work of a smaller one, so a step cannot get faster
    as B grows; a measured dip is timing noise (15-40% on shared machines). Pooling the
    violators keeps one noisy point from deciding the plan. Returned in input order.
    """
    import numpy as np
    from sklearn.isotonic import IsotonicRegression

    xs = np.log(np.asarray(batch_sizes, dtype=float))
    ys = np.log(np.asarray(step_seconds, dtype=float))
    fitted = IsotonicRegression(increasing=True).fit_transform(xs, ys)
    return [float(v) for v in np.exp(fitted)]


def efficient_batch_size(b_noise: float, *, max_batch_size: int | None = None) -> int:
    """B ~= B_crit ~= B_noise: steps are 2 S_min and examples 2 E_min (McCandlish et al. 2018).

    The balanced choice when compute costs money: any larger batch buys fewer than half
    the steps it adds in examples.
    """
    if not b_noise > 0 or not math.isfinite(b_noise):
        raise ConfigError(f"expected a positive, finite B_noise, got {b_noise!r}")
    b = max(1, round(b_noise))
    return min(b, max_batch_size) if max_batch_size else b


def warmup_steps_for(lr_factor: float, total_steps: int, *, fraction: float = 0.05) -> int:
    """Gradual linear warm-up when the LR grows by more than 2x (Goyal et al. 2017).

    Goyal et al. warmed up over 5 of 90 epochs (~5%) for large factors; we warm up over
    the same fraction of the planned steps, and not at all for factors <= 2.
    """
    if lr_factor <= 2.0:
        return 0
    return max(1, math.ceil(fraction * total_steps))
