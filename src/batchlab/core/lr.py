"""The learning-rate rules: one vocabulary, the AdaScale gain, efficiency and `scale_lr`.

Every rule derives the LR at batch B from a known-good reference `(B0, lr0)`. Which rules a
caller accepts depends on what it knows: a fixed-batch run knows B only, the adaptive
controller also knows B_simple at every decision, and a sweep can tune the LR itself.
"""

from __future__ import annotations

import math

from batchlab.core.checks import check_lr, check_positive
from batchlab.core.tradeoff import relative_steps
from batchlab.errors import ConfigError

# name -> what it does (also the help text).
LR_RULES: dict[str, str] = {
    "none": "keep lr0",
    "linear": "lr0 * B/B0 (Goyal et al. 2017), for SGD-like optimizers",
    "sqrt": "lr0 * sqrt(B/B0) (Hoffer et al. 2017), for Adam-like optimizers",
    "adascale": "lr0 * r, the AdaScale gain (Johnson et al. 2020); needs B_simple",
    "sqrt-adascale": "lr0 * sqrt(r), AdaScale for Adam-like optimizers (AdaptDL's AdamScale)",
    "auto": "the optimizer family's default rule (see batchlab.core.optim)",
    "tuned": "auto's LR times 0.5, 1 and 2, the best kept (sweeps only)",
}
# Which names each context accepts.
TRAIN_LR_RULES = ("none", "linear", "sqrt", "adascale")  # `train` and `scale_lr`
PLAN_LR_RULES = ("linear", "sqrt", "adascale")  # `plan` (None: auto)
SWEEP_LR_RULES = ("auto", "none", "linear", "sqrt", "adascale", "tuned")
# or (lr0, gain) -> lr; linear and sqrt: the fixed rules at the current batch (a plan's coupling)
ADAPTIVE_LR_RULES = ("auto", "adascale", "sqrt-adascale", "linear", "sqrt", "none")


def check_lr_rule(rule: object, accepted: tuple[str, ...], *, what: str = "lr_rule") -> str:
    """Return `rule` if `accepted` has it, else a ConfigError listing the accepted names."""
    if not isinstance(rule, str) or rule not in accepted:
        raise ConfigError(f"{what}: expected one of {', '.join(accepted)}, got {rule!r}")
    return rule


def efficiency(batch_size: float, reference_batch_size: float, b_simple: float) -> float:
    """E(B) = (B_simple + B0) / (B_simple + B) (McCandlish et al. 2018, eq. 2.11 in B0 units).

    One example at batch B is worth E(B) examples at B0: (B0/B) S(B0)/S(B), with the step
    counts of `core.tradeoff` (the one copy of eq. 2.11).
    """
    return reference_batch_size / (
        batch_size * relative_steps(batch_size, reference_batch_size, b_simple)
    )


def adascale_gain(batch_size: float, reference_batch_size: float, b_simple: float) -> float:
    """AdaScale gain r (Johnson et al. 2020) in noise-scale terms.

    r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2) with S = B/B0, sigma^2 = tr(Sigma)/B0 and
    mu^2 = |G|^2, which is r = (B/B0) * E(B) = (B/B0) * (B_simple + B0) / (B_simple + B).
    1 <= r <= S: the number of B0-steps one step at B is worth.
    """
    if b_simple <= 0 or not math.isfinite(b_simple):
        raise ConfigError(f"AdaScale needs a positive finite B_simple, got {b_simple!r}")
    scale = batch_size / reference_batch_size
    return scale * efficiency(batch_size, reference_batch_size, b_simple)


def lr_from_gain(lr: float, gain: float, rule: str) -> float:
    """The adaptive rules: lr * r (`adascale`), lr * sqrt(r) (`sqrt-adascale`), lr (`none`)."""
    if rule == "adascale":
        return lr * gain
    if rule == "sqrt-adascale":
        return lr * math.sqrt(gain)
    if rule == "none":
        return lr
    raise ConfigError(
        f"lr_rule: expected one of adascale, sqrt-adascale, none for a gain, got {rule!r}"
    )


def scale_lr(
    lr: float,
    reference_batch_size: int,
    batch_size: int,
    rule: str,
    *,
    b_simple: float | None = None,
) -> float:
    """The learning rate for `batch_size`, from a known-good `(reference_batch_size, lr)`.

    The fixed-batch rules (`TRAIN_LR_RULES`):
    - `none`: unchanged.
    - `linear`: lr * B/B0 (Goyal et al. 2017), for SGD-like optimizers.
    - `sqrt`: lr * sqrt(B/B0) (Hoffer et al. 2017), for Adam-like optimizers.
    - `adascale`: lr * r, the AdaScale gain, which needs `b_simple`.
    """
    check_lr_rule(rule, TRAIN_LR_RULES)
    check_lr(lr, what="`lr`")
    check_positive(reference_batch_size, what="`reference_batch_size`")
    check_positive(batch_size, what="`batch_size`")
    ratio = batch_size / reference_batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "adascale":
        if b_simple is None:
            raise ConfigError(
                "lr_rule 'adascale' needs a measured B_simple; measure it (batchlab noise) "
                "and pass b_simple, or use lr_rule='linear' or 'sqrt'"
            )
        return lr_from_gain(lr, adascale_gain(batch_size, reference_batch_size, b_simple), rule)
    return lr  # "none"


def warmup_steps_for(lr_factor: float, total_steps: int, *, fraction: float = 0.05) -> int:
    """Gradual linear warm-up when the LR grows by more than 2x (Goyal et al. 2017).

    Goyal et al. warmed up over 5 of 90 epochs (~5%) for large factors; we warm up over
    the same fraction of the planned steps, and not at all for factors <= 2.
    """
    if lr_factor <= 2.0:
        return 0
    return max(1, math.ceil(fraction * total_steps))
