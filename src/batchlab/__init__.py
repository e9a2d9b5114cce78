"""batchlab: what batch size and learning rate should I train with? Answered from measurements."""

from batchlab.errors import BatchlabError
from batchlab.history import Evaluation, History
from batchlab.measure.memory import MemoryProbe, parse_size, probe_memory
from batchlab.measure.probe import ProbeResult, probe
from batchlab.measure.throughput import ThroughputProfile, profile_throughput
from batchlab.task import Task, load_task
from batchlab.theory import BatchArithmetic, adascale_gain, calc, scale_lr
from batchlab.train import TrainCallback, evaluate, train

__all__ = [
    "BatchArithmetic",
    "BatchlabError",
    "Evaluation",
    "History",
    "MemoryProbe",
    "ProbeResult",
    "Task",
    "ThroughputProfile",
    "TrainCallback",
    "adascale_gain",
    "calc",
    "evaluate",
    "load_task",
    "parse_size",
    "probe",
    "probe_memory",
    "profile_throughput",
    "scale_lr",
    "train",
]
__version__ = "0.1.0"
