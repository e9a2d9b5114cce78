"""What a plan is made of: its measurements, candidates, recommendations and the plan itself.

Frozen JSON results: `batchlab plan` saves a `Plan` (with the `Measurements` behind it) and
`batchlab report`, `train --schedule` and `sweep --from-plan` read it back with `Plan.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from batchlab.core.lr_choice import LrCheck
from batchlab.core.schedule import ScheduleForecast
from batchlab.errors import ConfigError
from batchlab.measure.memory_fit import MemoryPoint
from batchlab.measure.noise_run import NoisePoint, NoiseRun
from batchlab.measure.probe import ProbeResult
from batchlab.measure.throughput import ThroughputPoint, ThroughputProfile
from batchlab.planner.noise_path import NoiseOutlook
from batchlab.planner.plan_file import check_plan_fields
from batchlab.planner.trust import PlanWarning
from batchlab.results import JsonResult, read_json_object, type_problems


@dataclass(frozen=True)
class Measurements(JsonResult):
    """Everything the plan is built from; saved inside the plan so reports need no re-run."""

    task: str
    device: str
    num_train: int
    reference_batch_size: int
    reference_lr: float
    optimizer: str
    has_batchnorm: bool
    reference_epochs: int | None
    max_batch_size: int
    memory_predicted_only: bool
    fixed_bytes: float
    bytes_per_sample: float
    budget_bytes: float | None
    margin: float
    memory_points: tuple[MemoryPoint, ...]  # the probe's points that ran (peak_bytes known)
    throughput: tuple[ThroughputPoint, ...]
    knee_batch_size: int
    aligned_multiple: int | None  # round to this multiple only where the probe showed it pays
    noise: tuple[NoisePoint, ...]
    noise_reliable: bool = True
    noise_reason: str | None = None
    probe_steps: int = 0
    noise_steps: int = 0
    # The noise phase: its batch (0: the reference), how far apart its points are and how
    # many steps each averages (the tracker's EMA window), where it reached the target, the
    # target metric at its evaluations, and its budget (fraction of the reference training).
    noise_batch_size: int = 0
    noise_every: int = 1
    noise_window: float = 1.0
    noise_target_step: int | None = None
    target_evals: tuple[tuple[int, float], ...] = ()
    noise_budget: float | None = None
    # The noise points are B_simple of Adam-preconditioned gradients (`measure_noise`).
    noise_preconditioned: bool = False
    # The leading candidates and B0 timed again, interleaved with more windows, after the
    # noise phase told which sizes decide (`planner.head_to_head`); None: not timed.
    head_to_head: ThroughputProfile | None = None

    @property
    def reference_examples(self) -> int:
        """Examples of the whole reference training: task epochs x N."""
        return (self.reference_epochs or 1) * self.num_train

    @property
    def noise_examples(self) -> int:
        return self.noise_steps * (self.noise_batch_size or self.reference_batch_size)


@dataclass(frozen=True)
class Recommendation(JsonResult):
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    lr: float
    lr_rule: str
    warmup_steps: int
    predicted_speedup: float
    steps_factor: float  # S(B) / S(B0)
    step_s: float
    reasons: dict[str, str] = field(default_factory=dict)
    # From the interval of the predicted critical batch and the timing spread of the ladder.
    predicted_speedup_interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class Candidate(JsonResult):
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    steps_factor: float  # S(B) / S(B0)
    step_s: float
    predicted_speedup: float
    relative_time: float  # 1 / predicted_speedup
    measured: bool  # B is a timed point: on the ladder, or timed head to head
    speedup_low: float | None = None  # interval of predicted_speedup
    speedup_high: float | None = None
    # The micro-batch lies outside the measured ladder: its step time is extrapolated by
    # the step-time model, not read between two measured points.
    extrapolated: bool = False
    # B was timed head to head with the other leading candidates (`planner.head_to_head`).
    head_to_head: bool = False

    @property
    def timing(self) -> str:
        """How its step time was found, as the CLI table and the report label it:
        "head-to-head" (timed against the other leading candidates), "measured" (on the
        ladder), "interpolated" (between timed points) or "extrapolated" (beyond)."""
        if self.extrapolated:
            return "extrapolated"
        if self.head_to_head:
            return "head-to-head"
        return "measured" if self.measured else "interpolated"


@dataclass(frozen=True)
class Plan(JsonResult):
    """What to train with, and why. `batchlab plan` prints it; `batchlab report` draws it."""

    task: str
    device: str
    reference: dict[str, float]  # {"batch_size": B0, "lr": lr0}
    recommended: Recommendation
    efficient: Recommendation
    max_batch_size: int
    knee_batch_size: int
    b_simple: float  # the predicted critical batch B_bar (see `noise_outlook`), or as given
    b_simple_source: str
    b_simple_trajectory: tuple[NoisePoint, ...]
    candidates: tuple[Candidate, ...]
    lr_alternatives: dict[str, float]  # lr for the recommended batch under each rule
    warnings: tuple[PlanWarning, ...]
    measurements: Measurements
    plan_seconds: float = 0.0
    plan_steps: int = 0
    predicted_seconds_to_target: float | None = None
    reference_seconds_to_target: float | None = None
    target: str | None = None
    command: str = ""
    partial: bool = False
    # The full measurements behind the plan, so `batchlab report plan.json` can redraw
    # every figure without measuring again. None for plans built from synthetic inputs.
    probe: ProbeResult | None = None
    noise: NoiseRun | None = None
    b_simple_interval: tuple[float, float] | None = None
    noise_outlook: NoiseOutlook | None = None
    # "keep B0" in plain words when the best gain is inside its interval, else what to use.
    verdict: str = ""
    keep_reference: bool = False
    # What the plan cost in training examples, next to the reference training's.
    cost: dict[str, float] = field(default_factory=dict)
    # The recommended LR probed at the recommended batch (`batchlab.planner.lr_check`);
    # None when the check was skipped (`check_lr=False`) or for plans saved before it.
    lr_check: LrCheck | None = None
    schedule: ScheduleForecast | None = None  # B(t) along the path (`planner.schedule`)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan saved by `Plan.save` (what `batchlab plan` writes as JSON).

        Every reader of a plan file goes through here, so a missing, empty, cut-off or
        foreign file, or one with a field of the wrong type, gets one clear `ConfigError`
        that names the file and what is wrong.
        """
        remake = "make the plan again with `batchlab plan` (save its JSON) or `Plan.save`"
        data = read_json_object(path, "plan file", remake)
        check_plan_fields(data, path, Plan)
        try:
            plan = cls.from_dict(data)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:  # a field's shape
            raise ConfigError(
                f"plan file {str(path)!r} does not match this version's plan schema ({exc}); "
                "make the plan again with `batchlab plan`"
            ) from None
        problems = type_problems(plan)
        if problems:
            raise ConfigError(
                f"plan file {str(path)!r} does not match this version's plan schema "
                f"({'; '.join(problems)}); make the plan again with `batchlab plan`"
            )
        return plan
