"""The one place that decides "this step did not fit in memory"."""

from __future__ import annotations

import torch

_OOM_MESSAGES = (
    "out of memory",  # CUDA, MPS, XPU: "CUDA out of memory. Tried to allocate ..."
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    # cuDNN reports a failed workspace allocation this way (Lightning and Accelerate agree)
    "cudnn error: cudnn_status_not_supported.",
    "can't allocate memory",  # CPU: "DefaultCPUAllocator: can't allocate memory"
)


def is_oom_error(exc: BaseException) -> bool:
    """True if `exc` means "this step did not fit in memory". The one place that decides."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError) and exc.args:
        message = str(exc.args[0]).lower()
        return any(m in message for m in _OOM_MESSAGES)
    return False
