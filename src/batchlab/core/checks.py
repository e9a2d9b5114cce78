"""Input validators shared by every layer: one wording for one mistake."""

from __future__ import annotations

from typing import Any

from batchlab.errors import ConfigError


def check_batch_size(value: Any, *, what: str = "batch size") -> int:
    """Return `value` as a positive int, or raise a ConfigError that says how to fix it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: expected a positive integer, got {value!r}; pass e.g. 32")
    return value


def check_lr(value: Any, *, what: str = "learning rate") -> float:
    """Return `value` as a positive float, or raise a ConfigError."""
    try:
        lr = float(value)
    except (TypeError, ValueError):
        lr = float("nan")
    if not lr > 0 or lr == float("inf"):
        raise ConfigError(f"{what}: expected a positive number, got {value!r}; pass e.g. 0.01")
    return lr


def check_warmup_steps(value: Any) -> int:
    """Return `value` as warm-up steps (an int >= 0), or raise a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"warmup steps: expected an integer >= 0, got {value!r}")
    return value
