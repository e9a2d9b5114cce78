"""The batch-size study: run specs, the resumable results store, the runner and the fits."""

from batchlab.sweep.analysis import SweepAnalysis, analyze_sweep
from batchlab.sweep.build import make_sweep_spec
from batchlab.sweep.fit import StepsFit, fit_steps_to_target, regime
from batchlab.sweep.runner import LocalBackend, RayBackend, SweepRun, execute_run, run_sweep
from batchlab.sweep.spec import PlanInfo, RunSpec, SweepSpec
from batchlab.sweep.store import RunRecord, SweepStore, load_sweep

__all__ = [
    "LocalBackend",
    "PlanInfo",
    "RayBackend",
    "RunRecord",
    "RunSpec",
    "StepsFit",
    "SweepAnalysis",
    "SweepRun",
    "SweepSpec",
    "SweepStore",
    "analyze_sweep",
    "execute_run",
    "fit_steps_to_target",
    "load_sweep",
    "make_sweep_spec",
    "regime",
    "run_sweep",
]
