"""Measurements on the user's hardware and model: memory, throughput, noise."""

from batchlab.measure.memory import MemoryProbe, is_oom_error, parse_size, probe_memory
from batchlab.measure.probe import ProbeResult, probe
from batchlab.measure.state import preserve_training_state
from batchlab.measure.throughput import ThroughputProfile, profile_throughput

__all__ = [
    "MemoryProbe",
    "ProbeResult",
    "ThroughputProfile",
    "is_oom_error",
    "parse_size",
    "preserve_training_state",
    "probe",
    "probe_memory",
    "profile_throughput",
]
