"""Input validators shared by every layer: one wording for one mistake."""

from __future__ import annotations

import math
from typing import Any

from batchlab.errors import ConfigError

# torch.manual_seed takes a 64-bit seed; a negative one or a 23-digit one is a mistake.
MAX_SEED = 2**63 - 1


def check_batch_size(value: Any, *, what: str = "batch size") -> int:
    """Return `value` as a positive int, or raise a ConfigError that says how to fix it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: expected a positive integer, got {value!r}; pass e.g. 32")
    return value


def check_lr(value: Any, *, what: str = "learning rate") -> float:
    """Return `value` as a positive float, or raise a ConfigError."""
    try:
        lr = float(value)
    except (TypeError, ValueError, OverflowError):
        lr = float("nan")
    if not lr > 0 or lr == float("inf"):
        raise ConfigError(f"{what}: expected a positive number, got {value!r}; pass e.g. 0.01")
    return lr


def check_warmup_steps(value: Any) -> int:
    """Return `value` as warm-up steps (an int >= 0), or raise a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"warmup steps: expected an integer >= 0, got {value!r}")
    return value


def check_epochs(value: Any, *, what: str = "`epochs`") -> float:
    """Return `value` as a finite positive number of epochs, or raise a ConfigError.

    NaN compares false with everything, so `epochs <= 0` alone lets it through; an infinite
    run never ends. Both are mistakes, so both are refused here.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{what}: expected a finite positive number, got {value!r}; pass e.g. 3",
            param="epochs",
        )
    return float(value)


def check_seed(value: Any) -> int:
    """Return `value` as a seed torch accepts (an int in [0, 2**63 - 1]), or raise a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        shown = repr(value) if len(repr(value)) <= 24 else f"{repr(value)[:20]}..."
        raise ConfigError(
            f"`seed`: expected an integer from 0 to 2**63-1, got {shown}; pass e.g. 0",
            param="seed",
        )
    return value


def check_positive(value: Any, *, what: str, param: str | None = None) -> float:
    """Return `value` as a finite positive float, or raise a ConfigError naming `what`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}: expected a finite positive number, got {value!r}", param=param)
    return float(value)
