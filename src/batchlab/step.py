"""One optimizer step: micro-batches, gradient accumulation, AMP. Shared by train and probes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from batchlab.data import Batcher
from batchlab.errors import DeviceError, TaskError
from batchlab.task import LossFn, Task

# Called after each micro-batch's backward with (micro_index, num_micro, micro_size).
MicroHook = Callable[[int, int, int], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r} was asked for but CUDA is not available here; "
            "use --device cpu (or auto)"
        )
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"expected a device like cpu, cuda or cuda:1, got {device!r}") from exc


def autocast_context(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (fp16 on CUDA cards without bf16); a null context when `amp` is off."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))


def amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def make_grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 has fp32's range and does not."""
    if amp and amp_dtype(device) == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def check_scalar_loss(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TaskError(
            f"loss(model, batch) must return a scalar tensor (the batch mean), got {shape}; "
            "reduce it with .mean()"
        )
    return loss


def build_step(
    task: Task, device: torch.device, *, lr: float, micro_batch_size: int, amp: bool = False
) -> TrainStep:
    """A fresh model and optimizer for `task` on `device`, in train mode, wrapped in a step.

    Seed the RNG first: the model's initial weights come from it.
    """
    model = task.model().to(device)
    model.train()
    return TrainStep(
        model,
        task.optimizer(model.parameters(), lr),
        task.loss,
        Batcher(task.train_data, device, task.collate_fn),
        micro_batch_size=micro_batch_size,
        device=device,
        amp=amp,
        scaler=make_grad_scaler(device, amp),
    )


class TrainStep:
    """A callable doing one optimizer step on the examples at `indices`.

    The indices are split into micro-batches of `micro_batch_size`; each micro-batch loss is
    weighted by its share of the examples, so k micro-batches of b give exactly the update
    of one batch of k*b (for models without batch-dependent layers).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        batcher: Batcher,
        *,
        micro_batch_size: int,
        device: torch.device,
        amp: bool = False,
        scaler: torch.amp.GradScaler | None = None,
        micro_hook: MicroHook | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.batcher = batcher
        self.micro_batch_size = micro_batch_size
        self.device = device
        self.amp = amp
        self.scaler = scaler
        self.micro_hook = micro_hook

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """Run the step; return the detached mean loss over all examples of the step."""
        self.optimizer.zero_grad(set_to_none=True)
        if len(indices) <= self.micro_batch_size:
            loss = self._backward(indices, 0, 1, 1.0)
        else:
            micro = indices.split(self.micro_batch_size)
            total = len(indices)
            loss = torch.zeros((), device=self.device)
            for i, idx in enumerate(micro):
                weight = len(idx) / total
                loss += self._backward(idx, i, len(micro), weight) * weight
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss

    def _backward(self, idx: torch.Tensor, i: int, num_micro: int, weight: float) -> torch.Tensor:
        batch = self.batcher(idx)
        with autocast_context(self.device, self.amp):
            loss = check_scalar_loss(self.loss_fn(self.model, batch))
        scaled = loss * weight if num_micro > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        if self.micro_hook is not None:
            self.micro_hook(i, num_micro, len(idx))
        return loss.detach().float()
