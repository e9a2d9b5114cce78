"""Peak memory of one real training step (or one evaluation pass), on CUDA or the CPU.

- CUDA: `torch.cuda.max_memory_allocated` around the step (and reserved memory, reported).
- CPU: a replay of the profiler's `[memory]` events (`replay_peak_bytes`), plus the bytes
  alive when the step starts (parameters, buffers, optimizer state).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchlab.data import Batcher
from batchlab.measure.batch_search import StepPeak
from batchlab.measure.cpu_replay import persistent_bytes, replay_peak_bytes
from batchlab.step import TrainStep, autocast_context


@dataclass
class DeviceBaseline:
    """CUDA memory already allocated and reserved before a probe; its steps count above it."""

    allocated: int = 0
    reserved: int = 0


def device_baseline(device: torch.device) -> DeviceBaseline:
    """The baseline of `device` now (zero off CUDA)."""
    if device.type != "cuda":
        return DeviceBaseline()
    torch.cuda.synchronize(device)
    return DeviceBaseline(torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def measure_step_memory(
    step: TrainStep, indices: torch.Tensor, *, baseline: DeviceBaseline | None = None
) -> StepPeak:
    """Run `step(indices)` once and return its peak memory (bytes above `baseline` on CUDA).

    Gradients are dropped first, as `TrainStep` does at the start of every step, so the
    previous step's gradients are not counted twice.
    """
    device = step.device
    step.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        baseline = baseline or DeviceBaseline()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step(indices)
        torch.cuda.synchronize(device)
        return StepPeak(
            torch.cuda.max_memory_allocated(device) - baseline.allocated,
            torch.cuda.max_memory_reserved(device) - baseline.reserved,
            time.perf_counter() - start,
        )
    held = persistent_bytes(step.model, step.optimizer)
    peak, seconds = replay_peak_bytes(lambda: step(indices))
    return StepPeak(held + peak, None, seconds)


def measure_eval_memory(
    model: torch.nn.Module,
    loss_fn: Callable,
    batcher: Batcher,
    indices: torch.Tensor,
    *,
    device: torch.device,
    amp: bool,
    baseline: DeviceBaseline | None = None,
) -> int:
    """Peak bytes of one evaluation forward pass (`eval()`, `no_grad`) at `len(indices)`."""
    was_training = model.training
    model.eval()

    def forward() -> None:
        with torch.no_grad(), autocast_context(device, amp):
            loss_fn(model, batcher(indices))

    try:
        if device.type == "cuda":
            baseline = baseline or DeviceBaseline()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            forward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - baseline.allocated
        return persistent_bytes(model, None) + replay_peak_bytes(forward)[0]
    finally:
        model.train(was_training)
