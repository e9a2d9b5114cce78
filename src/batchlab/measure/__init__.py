"""Measurements on the user's hardware and model: memory, throughput, noise."""

from batchlab.core.noise_scale import NoiseScale
from batchlab.measure.memory import MemoryProbe, probe_memory
from batchlab.measure.noise import gradient_noise_scale
from batchlab.measure.noise_run import NoiseRun, measure_noise
from batchlab.measure.oom import is_oom_error
from batchlab.measure.per_example import per_example_grad_norms
from batchlab.measure.probe import ProbeResult, probe
from batchlab.measure.sizes import parse_size
from batchlab.measure.state import preserve_training_state
from batchlab.measure.throughput import ThroughputProfile, profile_throughput
from batchlab.tracking import GradientNoiseScaleTracker

__all__ = [
    "GradientNoiseScaleTracker",
    "MemoryProbe",
    "NoiseRun",
    "NoiseScale",
    "ProbeResult",
    "ThroughputProfile",
    "gradient_noise_scale",
    "is_oom_error",
    "measure_noise",
    "parse_size",
    "per_example_grad_norms",
    "preserve_training_state",
    "probe",
    "probe_memory",
    "profile_throughput",
]
