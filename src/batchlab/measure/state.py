"""Leave no trace: snapshot and restore everything a probe can touch.

A probe runs real training steps on a live model, so it changes the weights, the
optimizer's moments, the gradients, BatchNorm statistics, the train/eval mode, the random
number generators and the AMP loss scale. `preserve_training_state` puts all of it back,
in a `finally`, and frees the memory the probe took:

    with preserve_training_state(model, optimizer, scaler):
        for b in (8, 16, 32):
            step(indices[:b])
    # model, optimizer, .grad, modes, RNG and scaler are exactly as before

The snapshot lives on the CPU, so it does not take device memory away from the probe.

Two callbacks carry a run's end into another run without touching the first: `KeepRunEnd`
copies where a run ended (weights and optimizer moments: the planner's noise phase), and
`StartFrom` loads that into a fresh run before its first step (the LR check's probes
continue from where the noise phase ended).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchlab.callbacks import RunState, TrainCallback

__all__ = [
    "KeepRunEnd",
    "RunEnd",
    "StartFrom",
    "TrainingSnapshot",
    "live_tensor_bytes",
    "preserve_training_state",
    "release_memory",
    "snapshot_training_state",
]


def _to_cpu(value: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


@dataclass
class TrainingSnapshot:
    """Everything needed to put a model, its optimizer and the RNGs back as they were."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    model_state: dict[str, torch.Tensor]
    grads: list[torch.Tensor | None]
    modes: list[bool]
    optimizer_state: dict[str, Any] | None
    scaler_state: dict[str, Any] | None
    rng: dict[str, Any]

    def restore(self) -> None:
        """Put everything back. Parameters keep their identity (values are copied in)."""
        self.model.load_state_dict(self.model_state)
        for p, g in zip(self.model.parameters(), self.grads, strict=True):
            p.grad = None if g is None else g.to(p.device, dtype=p.dtype)
        for module, training in zip(self.model.modules(), self.modes, strict=True):
            module.training = training
        if self.optimizer is not None and self.optimizer_state is not None:
            # load_state_dict casts the state back to each parameter's device and dtype.
            self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        if self.scaler is not None and self.scaler_state:
            self.scaler.load_state_dict(
                {k: v for k, v in self.scaler_state.items() if k != "_lazy"}
            )
            if self.scaler_state.get("_lazy", False):
                # The scale is created lazily by the first `scale()`; put it back to unset.
                self.scaler._scale = self.scaler._growth_tracker = None
        _set_rng_state(self.rng)


def snapshot_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainingSnapshot:
    """Copy (to the CPU) the model, grads, modes, optimizer, AMP scaler and RNG state."""
    return TrainingSnapshot(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        model_state=_to_cpu(model.state_dict()),
        grads=[None if p.grad is None else _to_cpu(p.grad) for p in model.parameters()],
        modes=[m.training for m in model.modules()],
        optimizer_state=None if optimizer is None else _to_cpu(optimizer.state_dict()),
        scaler_state=None if scaler is None else _scaler_state(scaler),
        rng=_get_rng_state(),
    )


@contextlib.contextmanager
def preserve_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    *,
    free_memory: bool = True,
) -> Iterator[TrainingSnapshot]:
    """Run the body, then restore model/optimizer/grads/modes/scaler/RNG and free memory.

    Restoration happens in `finally`, so it also runs after an out-of-memory error or any
    other exception raised by the body.
    """
    snapshot = snapshot_training_state(model, optimizer, scaler)
    try:
        yield snapshot
    finally:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)  # drop the probe's grads before restoring
        snapshot.restore()
        if free_memory:
            release_memory()


@dataclass(frozen=True)
class RunEnd:
    """Where a training run ended: its weights and its optimizer's per-parameter state
    (`optimizer.state_dict()["state"]`: momentum buffers, Adam's moments and step count),
    copied to the CPU; `step` optimizer steps of `batch_size` examples got it there."""

    weights: dict[str, torch.Tensor]
    optimizer_state: dict[Any, Any]
    step: int
    batch_size: int


class KeepRunEnd(TrainCallback):
    """Copies where the run ended into `end` (None until the run ends)."""

    def __init__(self) -> None:
        self.end: RunEnd | None = None

    def on_end(self, state: RunState) -> None:
        self.end = RunEnd(
            weights=_to_cpu(state.model.state_dict()),
            optimizer_state=_to_cpu(state.optimizer.state_dict()["state"]),
            step=state.step,
            batch_size=state.effective_batch_size,
        )


class StartFrom(TrainCallback):
    """Continues from `end`: a fresh run of the same task takes its weights and its
    optimizer's moments, under the run's own hyper-parameters (LR, betas, weight decay).

    Put it first among a run's callbacks: the initial evaluation and every other callback
    then see these weights. Values are copied in, so the optimizer keeps pointing at the
    parameters, and `end` stays as it was for the next run started from it."""

    def __init__(self, end: RunEnd) -> None:
        self.end = end

    def on_start(self, state: RunState) -> None:
        state.model.load_state_dict(self.end.weights)
        own = state.optimizer.state_dict()
        own["state"] = _to_cpu(self.end.optimizer_state)  # a copy: steps update it in place
        state.optimizer.load_state_dict(own)


def release_memory() -> None:
    """Collect garbage (tracebacks of OOM errors hold activations) and empty CUDA's cache."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def live_tensor_bytes(device: str | torch.device = "cpu") -> int:
    """Bytes of every distinct tensor storage reachable by the garbage collector on `device`.

    A coarse but exact check for "memory is back to its level" on the CPU, where there is
    no allocator counter; on CUDA use `torch.cuda.memory_allocated` instead.
    """
    device_type = torch.device(device).type
    gc.collect()
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():  # isinstance() on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, torch.Tensor) or obj.device.type != device_type:
                    continue
                storage = obj.untyped_storage()
            except Exception:  # some objects refuse inspection (meta tensors, weakrefs...)
                continue
            key = storage.data_ptr()
            if key in seen or key == 0:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def _scaler_state(scaler: torch.amp.GradScaler) -> dict[str, Any]:
    state = _to_cpu(scaler.state_dict())
    if state:
        state["_lazy"] = getattr(scaler, "_scale", None) is None
    return state


def _get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is a dependency, but the snapshot must not need it
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
