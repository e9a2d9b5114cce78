"""Adaptive batch size during training: goodput controller, resizable sampler, engine."""

from batchlab.adaptive.controller import AdaptiveBatchSize, Decision
from batchlab.adaptive.engine import train_adaptive
from batchlab.adaptive.noise_source import FixedNoise, NoiseSource
from batchlab.adaptive.sampler import ResizableBatchSampler
from batchlab.adaptive.throughput_model import FixedThroughput, ThroughputModel
from batchlab.adaptive.trajectory_noise import TrajectoryNoise
from batchlab.core.lr import efficiency
from batchlab.core.step_time import StepTimeModel

__all__ = [
    "AdaptiveBatchSize",
    "Decision",
    "FixedNoise",
    "FixedThroughput",
    "NoiseSource",
    "ResizableBatchSampler",
    "StepTimeModel",
    "ThroughputModel",
    "TrajectoryNoise",
    "efficiency",
    "train_adaptive",
]
