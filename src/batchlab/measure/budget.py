"""The memory budget: how many bytes a probe may fill, and where that number came from.

Given (`memory_budget`), planned for another device (`target_memory`, a prediction only),
or read from the device: the free CUDA memory, or half the available system RAM on the
CPU (MemAvailable in /proc/meminfo).
"""

from __future__ import annotations

import contextlib
import os

import torch

from batchlab.errors import ConfigError
from batchlab.measure.sizes import format_bytes, parse_size
from batchlab.measure.step_memory import DeviceBaseline


def check_budget(
    memory_budget: str | int | float | None, target_memory: str | int | float | None
) -> tuple[int | None, int | None]:
    """(memory_budget, target_memory) in bytes; at most one of them may be given."""
    if memory_budget is not None and target_memory is not None:
        raise ConfigError(
            "expected one of `memory_budget` (verify on this device) or `target_memory` "
            "(predict for another device), got both; drop one",
            param="target_memory",
        )
    if target_memory is not None:
        return None, parse_size(target_memory, what="target memory", param="target_memory")
    if memory_budget is not None:
        return parse_size(memory_budget, what="memory budget", param="memory_budget"), None
    return None, None


def resolve_budget(
    device: torch.device,
    memory_budget: str | int | float | None,
    target_memory: str | int | float | None,
    baseline: DeviceBaseline,
) -> tuple[int, str, bool, list[str]]:
    """(budget bytes, where it came from, prediction only?, warnings).

    The source names the parameter in backticks (`` `memory_budget` 600 KiB ``), the
    convention of `batchlab.errors`, so that the CLI can show its flag instead.
    """
    budget, target = check_budget(memory_budget, target_memory)
    warnings: list[str] = []
    if target is not None:
        return target, f"target memory {format_bytes(target)} (prediction only)", True, warnings
    available, available_source = _available_bytes(device, baseline)
    if budget is None:
        return available, available_source, False, warnings
    source = f"`memory_budget` {format_bytes(budget)}"
    if device.type != "cuda":
        return budget, source, False, warnings
    if budget > available + baseline.allocated:
        warnings.append(
            f"memory budget {format_bytes(budget)} is more than the free device memory "
            f"({format_bytes(available)}); using the free memory"
        )
        return available, available_source, False, warnings
    if baseline.allocated >= budget:
        raise ConfigError(
            f"memory budget {format_bytes(budget)}: expected more than the "
            f"{format_bytes(baseline.allocated)} this process already holds on {device}; "
            "give a larger `memory_budget` or free that memory first",
            param="memory_budget",
        )
    if baseline.allocated:
        # Tensors this process already holds on the device stay there while it trains, and
        # the probe measures its steps above them: they count against the budget. (On an
        # H200, charlm probed under a 1 GiB cap after other work picked a batch that a
        # fresh 200-step run could not hold: benchmarks/results/gpu_h200.md.)
        held = format_bytes(baseline.allocated)
        return (
            budget - baseline.allocated,
            f"{source} less {held} this process already holds on {device}",
            False,
            warnings,
        )
    return budget, source, False, warnings


def _available_bytes(device: torch.device, baseline: DeviceBaseline) -> tuple[int, str]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Memory this process has cached but not allocated is usable too.
        return free + baseline.reserved - baseline.allocated, f"free memory on {device}"
    available = _system_available_bytes()
    if available is None:
        raise ConfigError(
            "cannot read the available system RAM here; give `memory_budget`, e.g. 4GiB",
            param="memory_budget",
        )
    # Half, so that a probe can never starve the machine (there is no OOM on the CPU,
    # only swapping and the kernel's OOM killer).
    source = "half the available system RAM (CPU default; set `memory_budget`)"
    return available // 2, source


def _system_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (free plus reclaimable cache), else free pages."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def check_margin(margin: float) -> float:
    """`margin` as a float in [0, 1): the fraction of the budget kept free."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ConfigError(
            f"margin: expected a fraction of the budget in [0, 1), got {margin!r}; e.g. 0.1",
            param="margin",
        )
    return float(margin)
