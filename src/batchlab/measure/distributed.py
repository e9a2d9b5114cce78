"""Under `torchrun`, every rank probes its own device and all ranks agree on the minimum.

A batch size that fits on one GPU may not fit on another (a neighbour process, a smaller
card), and data-parallel training needs one per-device batch for every rank, so the
agreed value is the all-reduced MIN. Lightning's BatchSizeFinder refuses DDP; this is
what it would need.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def agree_min(value: int) -> int:
    """All-reduce MIN of an integer across ranks (the value itself outside a group)."""
    if not is_distributed():
        return int(value)
    # NCCL reduces CUDA tensors only; gloo (CPU) reduces CPU tensors.
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def init_from_env(device: str = "auto") -> bool:
    """Join the process group `torchrun` describes in the environment, if not done yet.

    Returns True when this call created the group (the caller should destroy it).
    Uses NCCL when the ranks probe CUDA devices, gloo otherwise.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def rank_device(device: str) -> str:
    """`cuda` (or `auto` with CUDA) becomes this rank's `cuda:LOCAL_RANK` inside a group."""
    if not is_distributed():
        return device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{os.environ.get('LOCAL_RANK', torch.cuda.current_device())}"
    return device


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    Without the barrier a rank that finishes first tears down its gloo context while a peer
    is still talking to it, and the peer aborts ("terminate called without an active
    exception", SIGABRT).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
