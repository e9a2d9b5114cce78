"""Memory sizes: `6GiB`, `512MB`, `1.5e9` in; `1.50 GiB` out."""

from __future__ import annotations

import math
import re

from batchlab.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(
    value: str | int | float, *, what: str = "memory size", param: str | None = None
) -> int:
    """Bytes from `6GiB`, `512MB`, `1.5e9`, `300k` or a number.

    KB/MB/GB/TB are powers of 1000; KiB/MiB/GiB/TiB and the bare K/M/G/T are powers of
    1024 (as in `docker --memory 6g`). `what` starts the error message; `param` is the
    parameter the error names (`batchlab.errors.BatchlabError.param`).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 6GiB or 512MB, got {value!r}", param=param)
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"{what}: expected a number with an optional unit (B, KB, MB, GB, TB, "
                f"KiB, MiB, GiB, TiB), e.g. 6GiB or 512MB, got {value!r}",
                param=param,
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise ConfigError(
            f"{what}: expected a positive size, e.g. 6GiB, got {value!r}", param=param
        )
    return int(size)


def format_bytes(n: float | None) -> str:
    """`1.50 GiB`, `12.0 MiB`, `900 B`."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
