"""batchlab: what batch size and learning rate should I train with? Answered from measurements."""

import importlib.metadata

from batchlab.adaptive import AdaptiveBatchSize, ResizableBatchSampler, train_adaptive
from batchlab.callbacks import TrainCallback, evaluate
from batchlab.core.batching import BatchArithmetic, calc
from batchlab.core.lr import adascale_gain, scale_lr
from batchlab.core.noise_scale import NoiseScale
from batchlab.core.schedule import BatchSchedule, SchedulePhase
from batchlab.errors import BatchlabError
from batchlab.history import Evaluation, History
from batchlab.measure.memory import MemoryProbe, probe_memory
from batchlab.measure.noise import gradient_noise_scale
from batchlab.measure.noise_run import NoiseRun, measure_noise
from batchlab.measure.probe import ProbeResult, probe
from batchlab.measure.run_stats import DistanceFromInit, GradNormTracker
from batchlab.measure.sharpness import Sharpness, epsilon_sharpness, hessian_top_eigenvalue
from batchlab.measure.sizes import parse_size
from batchlab.measure.throughput import ThroughputProfile, profile_throughput
from batchlab.planner import Plan, PlanInterrupted, PlanRefused, build_plan, plan
from batchlab.sweep import (
    StepsFit,
    SweepAnalysis,
    SweepSpec,
    analyze_sweep,
    fit_steps_to_target,
    load_sweep,
    make_sweep_spec,
    run_sweep,
)
from batchlab.task import Task
from batchlab.tasks import load_task
from batchlab.tracking import GradientNoiseScaleTracker
from batchlab.train import train

__all__ = [
    "AdaptiveBatchSize",
    "BatchArithmetic",
    "BatchSchedule",
    "BatchlabError",
    "DistanceFromInit",
    "Evaluation",
    "GradNormTracker",
    "GradientNoiseScaleTracker",
    "History",
    "MemoryProbe",
    "NoiseRun",
    "NoiseScale",
    "Plan",
    "PlanInterrupted",
    "PlanRefused",
    "ProbeResult",
    "ResizableBatchSampler",
    "SchedulePhase",
    "Sharpness",
    "StepsFit",
    "SweepAnalysis",
    "SweepSpec",
    "Task",
    "ThroughputProfile",
    "TrainCallback",
    "adascale_gain",
    "analyze_sweep",
    "build_plan",
    "calc",
    "epsilon_sharpness",
    "evaluate",
    "fit_steps_to_target",
    "gradient_noise_scale",
    "hessian_top_eigenvalue",
    "load_sweep",
    "load_task",
    "make_sweep_spec",
    "measure_noise",
    "parse_size",
    "plan",
    "probe",
    "probe_memory",
    "profile_throughput",
    "run_sweep",
    "scale_lr",
    "train",
    "train_adaptive",
]
__version__ = importlib.metadata.version("batchlab")
