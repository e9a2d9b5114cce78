"""Adaptive batch size during training: goodput controller, resizable sampler, engine."""

from batchlab.adaptive.controller import AdaptiveBatchSize, Decision, efficiency
from batchlab.adaptive.sampler import ResizableBatchSampler
from batchlab.adaptive.throughput_model import ThroughputFit, ThroughputModel

__all__ = [
    "AdaptiveBatchSize",
    "Decision",
    "ResizableBatchSampler",
    "ThroughputFit",
    "ThroughputModel",
    "efficiency",
]
