"""batchlab: what batch size and learning rate should I train with? Answered from measurements."""

from batchlab.adaptive import AdaptiveBatchSize, ResizableBatchSampler, train_adaptive
from batchlab.errors import BatchlabError
from batchlab.history import Evaluation, History
from batchlab.measure.memory import MemoryProbe, parse_size, probe_memory
from batchlab.measure.noise import NoiseScale, gradient_noise_scale
from batchlab.measure.noise_tracker import GradientNoiseScaleTracker, NoiseRun, measure_noise
from batchlab.measure.probe import ProbeResult, probe
from batchlab.measure.throughput import ThroughputProfile, profile_throughput
from batchlab.task import Task, load_task
from batchlab.theory import BatchArithmetic, adascale_gain, calc, scale_lr
from batchlab.train import TrainCallback, evaluate, train

__all__ = [
    "AdaptiveBatchSize",
    "BatchArithmetic",
    "BatchlabError",
    "Evaluation",
    "GradientNoiseScaleTracker",
    "History",
    "MemoryProbe",
    "NoiseRun",
    "NoiseScale",
    "ProbeResult",
    "ResizableBatchSampler",
    "Task",
    "ThroughputProfile",
    "TrainCallback",
    "adascale_gain",
    "calc",
    "evaluate",
    "gradient_noise_scale",
    "load_task",
    "measure_noise",
    "parse_size",
    "probe",
    "probe_memory",
    "profile_throughput",
    "scale_lr",
    "train",
    "train_adaptive",
]
__version__ = "0.1.0"
