"""What a sweep runs: one `RunSpec` per training run, all of them in one `SweepSpec`.

The spec is plain data, built once by `batchlab.sweep.build.make_sweep_spec` and saved as
`DIR/sweep.json`. Everything a run needs is written out in it (batch, micro-batch,
optimizer, peak LR, warm-up, budget, seed), so a report can be rebuilt from the directory
alone and a resumed sweep can check that it is asked for the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchlab.core.optim import optimizer_family
from batchlab.errors import ConfigError
from batchlab.planner.plan_types import Candidate, Plan, Recommendation
from batchlab.results import JsonResult
from batchlab.task import Task

SPEC_FORMAT = 1
OPTIMIZERS = ("task", "sgd", "adam")
# "hessian": top Hessian eigenvalue (cheap, any device). "epsilon": Keskar et al.'s
# epsilon-sharpness, an L-BFGS-B search over all weights on the CPU: fine for small models.
SHARPNESS_MEASURES = ("hessian", "epsilon")
# lr_rule="tuned" widens its grid (x0.5, 1, 2) by a factor 2 past an edge where the best LR
# sits, at most this many times per side (so x1/8 to x8): `batchlab.sweep.extend`.
TUNED_LR_EXTENSIONS = 2
TUNED_LR_EXTENSION_FACTOR = 2.0


def lr_grid_limits(grid: tuple[float, ...]) -> tuple[float, float]:
    """The lowest and highest LR multipliers a tuned sweep may reach from `grid`."""
    reach = TUNED_LR_EXTENSION_FACTOR**TUNED_LR_EXTENSIONS
    return min(grid) / reach, max(grid) * reach


@dataclass(frozen=True)
class RunSpec(JsonResult):
    """One training run of a sweep, fully resolved."""

    run_id: str  # unique in its sweep; the key of the results store
    source: str  # "ladder", or "plan:<role>" for the batches of a plan
    batch_size: int  # effective batch: examples per optimizer step
    micro_batch_size: int
    accumulation_steps: int
    optimizer: str  # "task" (the task's own), "sgd" (momentum 0.9) or "adam"
    optimizer_family: str  # "sgd" or "adam": which LR rule fits it
    lr: float  # peak learning rate the run uses
    lr_rule: str  # how `lr` was chosen: none, linear, sqrt, adascale or plan
    lr_multiplier: float  # the lr_rule="tuned" grid factor (1.0 otherwise)
    reference_lr: float  # LR at the task's reference batch for this optimizer
    warmup_steps: int
    max_steps: int  # optimizer-step budget
    eval_every: int | str  # steps between evaluations, or "geometric" (batchlab.core.evals)
    repeat: int
    seed: int


@dataclass(frozen=True)
class PlanInfo(JsonResult):
    """What a sweep takes from a plan: the batches it trains and the predictions it checks.

    The fields are the plan's own types, copied from a `Plan` (see `from_plan`) so that
    `sweep.json` alone rebuilds the report. `path` is the file the plan was read from
    (None when it was passed as an object).
    """

    path: str | None
    reference_batch_size: int
    reference_lr: float
    recommended: Recommendation
    efficient: Recommendation
    candidates: tuple[Candidate, ...]
    b_simple: float
    max_batch_size: int

    @classmethod
    def from_plan(cls, plan: Plan, path: str | Path | None = None) -> PlanInfo:
        return cls(
            path=None if path is None else str(path),
            reference_batch_size=int(plan.reference["batch_size"]),
            reference_lr=float(plan.reference["lr"]),
            recommended=plan.recommended,
            efficient=plan.efficient,
            candidates=plan.candidates,
            b_simple=plan.b_simple,
            max_batch_size=plan.max_batch_size,
        )

    def batches(self) -> dict[str, Recommendation]:
        """The plan's batches a sweep trains, by role. The reference is B0 at lr0 with no
        warm-up: every predicted speedup of the plan is relative to it."""
        b0 = self.reference_batch_size
        reference = Recommendation(
            batch_size=b0,
            micro_batch_size=b0,
            accumulation_steps=1,
            lr=self.reference_lr,
            lr_rule="none",
            warmup_steps=0,
            predicted_speedup=1.0,
            steps_factor=1.0,
            step_s=next((c.step_s for c in self.candidates if c.batch_size == b0), math.nan),
        )
        return {
            "reference": reference,
            "recommended": self.recommended,
            "efficient": self.efficient,
        }


@dataclass(frozen=True)
class SweepSpec(JsonResult):
    """Everything a sweep runs, saved as `DIR/sweep.json`. Two sweeps are the same sweep
    exactly when their specs are equal."""

    task: str  # name shown in reports
    task_ref: str  # what workers load: a built-in name or an absolute path.py:function
    num_train: int
    reference_batch_size: int
    reference_lr: float  # for the task's own optimizer (the task's lr or the `lr` given)
    task_optimizer_family: str
    batch_sizes: tuple[int, ...]
    optimizers: tuple[str, ...]
    lr_rule: str
    lr_grid: tuple[float, ...]
    epochs: float | None
    max_steps: int | None
    min_steps: int
    target: str | None  # runs stop there when given
    repeats: int
    seed: int
    device: str
    sharpness_examples: int
    b_simple: float | None
    plan: PlanInfo | None
    runs: tuple[RunSpec, ...]
    format: int = SPEC_FORMAT
    sharpness: tuple[str, ...] = ("hessian",)  # measured at the end of each run
    adaptive: bool = False  # also run `train_adaptive` from the reference batch

    def differences(self, other: SweepSpec) -> list[str]:
        """Names of the top-level fields that differ (runs last, as it follows the rest)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if mine[k] != theirs.get(k)]


def task_optimizer_family(task: Task, lr_rule: str = "auto") -> str:
    """`sgd` or `adam`: the family of the task's optimizer, from the one table in
    `batchlab.core.optim` (the planner and the adaptive controller read it too).

    An optimizer the table does not know is an error only when the family must pick the
    rule (`auto`, `tuned`); with an explicit `lr_rule` it only labels the runs, and counts
    as `sgd` as it always did here.
    """
    probe = task.optimizer([torch.zeros(1, 1, requires_grad=True)], task.lr)
    try:
        return optimizer_family(probe)
    except ConfigError:
        if lr_rule in ("auto", "tuned"):
            raise
        return "sgd"


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """The optimizers a sweep's `optimizers` option swaps in: SGD with momentum 0.9, or Adam."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ConfigError(f"optimizer: expected sgd or adam, got {name!r}")
