"""Building a `SweepSpec`: the user's options checked and resolved into every run.

`make_sweep_spec` writes out the ladder (each batch size under the chosen LR rule), the
batches of a plan when one is given, and the adaptive runs, once per repeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.core.checks import check_batch_size, check_epochs, check_lr
from batchlab.core.evals import GEOMETRIC
from batchlab.core.lr import SWEEP_LR_RULES, scale_lr, warmup_steps_for
from batchlab.core.optim import family_lr_rule
from batchlab.errors import ConfigError
from batchlab.planner.plan_types import Plan, Recommendation
from batchlab.sweep.spec import (
    OPTIMIZERS,
    SHARPNESS_MEASURES,
    PlanInfo,
    RunSpec,
    SweepSpec,
    task_optimizer_family,
)
from batchlab.target import target_for_task
from batchlab.task import Task
from batchlab.tasks import load_task

# lr_rule="tuned": a small grid around the rule's LR, best by steps-to-target, as
# McCandlish et al. 2018 and Shallue et al. 2018 tuned the LR at every batch size.
TUNED_LR_GRID = (0.5, 1.0, 2.0)
# SGD with momentum 0.9 on a task tuned for Adam (or the reverse) needs its own reference
# LR. We use a fixed ratio: SGD's LR is 10x Adam's (e.g. Adam 1e-3 <-> SGD 1e-2), the
# usual rule of thumb for small nets; a given `lr` moves both.
SGD_OVER_ADAM_LR = 10.0
DEFAULT_EPOCHS = 30  # capped by the task's own reference epochs
DEFAULT_MIN_STEPS = 200  # so big batches get enough updates to reach a target at all
LADDER_START = 8
# Every run evaluates on the geometric schedule (batchlab.core.evals): every step below 32,
# then at most 6.25% apart, so steps to target are resolved to 6.25% at every batch size.
# (A fixed 50 evaluations per run resolved small batches to ~4 epochs: issue 11.)
SWEEP_EVAL_EVERY = GEOMETRIC
SHARPNESS_EXAMPLES = 1024


def default_ladder(num_train: int, max_batch_size: int | None = None) -> tuple[int, ...]:
    """Powers of two from 8 up to the memory max (when known) or the training-set size."""
    cap = min(num_train, max_batch_size) if max_batch_size else num_train
    if cap < LADDER_START:
        return (cap,)
    ladder = [LADDER_START]
    while ladder[-1] * 2 <= cap:
        ladder.append(ladder[-1] * 2)
    return tuple(ladder)


def parse_batch_sizes(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """`"32,64,128"` (or a sequence of ints) -> sorted unique positive ints."""
    if isinstance(text, str):
        items = [s.strip() for s in text.split(",") if s.strip()]
        try:
            values = [int(s) for s in items]
        except ValueError:
            raise ConfigError(
                f"batch sizes: expected comma-separated integers like 32,64,128, got {text!r}"
            ) from None
    else:
        values = list(text)
    if not values:
        raise ConfigError("batch sizes: expected at least one, got none; pass e.g. 32,64,128")
    for v in values:
        check_batch_size(v, what="each batch size")
    return tuple(sorted(set(values)))


def parse_optimizers(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = [s.strip().lower() for s in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        raise ConfigError(
            f"optimizer: expected a comma-separated list of {', '.join(OPTIMIZERS)}, "
            f"got {text!r}; e.g. 'sgd,adam'"
        )
    return tuple(dict.fromkeys(names))


def parse_sharpness(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`"hessian,epsilon"`, `"hessian"` or `"none"` -> the measures to take."""
    names = [s.strip().lower() for s in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n and n != "none"]
    bad = [n for n in names if n not in SHARPNESS_MEASURES]
    if bad:
        raise ConfigError(
            f"sharpness: expected a comma-separated list of {', '.join(SHARPNESS_MEASURES)} "
            f"(or none), got {text!r}"
        )
    return tuple(dict.fromkeys(names))


def _family_lr(reference_lr: float, task_family: str, family: str) -> float:
    if family == task_family:
        return reference_lr
    return reference_lr * SGD_OVER_ADAM_LR if family == "sgd" else reference_lr / SGD_OVER_ADAM_LR


def _rule_for(lr_rule: str, family: str) -> str:
    """The scaling rule of a ladder run: `auto` and `tuned` pick by optimizer family."""
    if lr_rule in ("auto", "tuned"):
        return family_lr_rule(family)
    return lr_rule


def run_id_for(
    source: str, optimizer: str, batch_size: int, lr_multiplier: float, repeat: int
) -> str:
    """The store key of a run, e.g. `ladder-adam-b00064-x0.5-r1` (no `-x` tag at x1)."""
    tag = "" if lr_multiplier == 1.0 else f"-x{lr_multiplier:g}"
    return f"{source.replace(':', '-')}-{optimizer}-b{batch_size:05d}{tag}-r{repeat}"


@dataclass
class _Builder:
    """Accumulates run specs with unique ids, each with its step budget."""

    num_train: int
    epochs: float | None
    max_steps: int | None
    min_steps: int
    runs: list[RunSpec] = field(default_factory=list)

    def budget(self, batch: int) -> int:
        """Optimizer steps of a run at `batch`: `max_steps`, or the epochs (>= min_steps)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(math.ceil(self.epochs * math.ceil(self.num_train / batch)), self.min_steps)

    def add(self, **kw: Any) -> None:
        total = self.budget(kw["batch_size"])
        kw["run_id"] = run_id_for(
            kw["source"], kw["optimizer"], kw["batch_size"], kw["lr_multiplier"], kw["repeat"]
        )
        self.runs.append(RunSpec(**kw, max_steps=total, eval_every=SWEEP_EVAL_EVERY))


@dataclass(frozen=True)
class _Settings:
    """The checked options that every run of the sweep shares."""

    task: Task
    sizes: tuple[int, ...]
    optimizers: tuple[str, ...]
    lr_rule: str
    reference_lr: float
    task_family: str
    b_simple: float | None
    plan: PlanInfo | None
    adaptive: bool


def make_sweep_spec(
    task: str | Task,
    *,
    batch_sizes: str | tuple[int, ...] | list[int] | None = None,
    lr_rule: str = "auto",
    optimizers: str | tuple[str, ...] | list[str] = ("task",),
    epochs: float | None = None,
    max_steps: int | None = None,
    min_steps: int = DEFAULT_MIN_STEPS,
    target: str | None = None,
    repeats: int = 1,
    seed: int = 0,
    lr: float | None = None,
    device: str = "auto",
    plan: str | Path | Plan | None = None,
    b_simple: float | None = None,
    sharpness_examples: int = SHARPNESS_EXAMPLES,
    sharpness: str | tuple[str, ...] | list[str] = ("hessian",),
    adaptive: bool = False,
) -> SweepSpec:
    """Resolve sweep options into a `SweepSpec` (every run written out).

    Args:
        batch_sizes: effective batch sizes; default: powers of two from 8 to the
            training-set size (or the plan's `max_batch_size`).
        lr_rule: `auto` (linear for SGD, sqrt for Adam), `none`, `linear` (Goyal et al.
            2017), `sqrt` (Hoffer et al. 2017), `adascale` (Johnson et al. 2020; needs
            `b_simple` or a plan) or `tuned` (the auto rule's LR times 0.5, 1 and 2; the
            analysis keeps the best by steps to target).
        optimizers: `task` (the task's own), `sgd` (momentum 0.9) and/or `adam`.
        epochs / max_steps: the budget of each run. With `epochs` (default: the task's
            reference epochs, at most 30) each run also gets at least `min_steps` steps.
        target: e.g. `val_acc>=0.6`; runs stop there. Without one, runs use their whole
            budget and the analysis picks a target every batch can be compared at.
        repeats: runs per setting, seeds `seed`, `seed + 1`, ... (the same seeds at every
            batch size, so all batch sizes start from the same initial weights).
        lr: the reference LR of the task's optimizer (default: the task's `lr`).
        plan: a `Plan`, or the path of one saved as JSON (read with `Plan.load`); its
            reference, recommended and efficient batches are added with their planned LRs.
        adaptive: also run `batchlab.adaptive.train_adaptive` (the task's optimizer, from
            the reference batch and LR, the reference batch's step budget) once per repeat,
            to compare with the fixed batch sizes. Its runs are not part of the S(B) fit.
    """
    t = load_task(task)
    epochs = _check_run_options(t, lr_rule, repeats, epochs, max_steps, min_steps)
    tgt = target_for_task(target, t, check_metrics=True)
    check_batch_size(sharpness_examples, what="sharpness examples")
    measures = parse_sharpness(sharpness)
    settings = _settings(
        t, batch_sizes, optimizers, lr_rule, lr, plan=plan, b_simple=b_simple, adaptive=adaptive
    )
    builder = _Builder(t.num_train, epochs, max_steps, min_steps)
    for repeat in range(repeats):
        _add_repeat(builder, settings, repeat, seed + repeat)
    return SweepSpec(
        task=t.name,
        task_ref=_task_ref(task, t),
        num_train=t.num_train,
        reference_batch_size=t.batch_size,
        reference_lr=settings.reference_lr,
        task_optimizer_family=settings.task_family,
        batch_sizes=settings.sizes,
        optimizers=settings.optimizers,
        lr_rule=lr_rule,
        lr_grid=TUNED_LR_GRID if lr_rule == "tuned" else (1.0,),
        epochs=None if max_steps is not None else float(epochs),
        max_steps=max_steps,
        min_steps=0 if max_steps is not None else min_steps,
        target=None if tgt is None else str(tgt),
        repeats=repeats,
        seed=seed,
        device=device,
        sharpness_examples=sharpness_examples,
        b_simple=settings.b_simple,
        plan=settings.plan,
        runs=tuple(builder.runs),
        sharpness=measures,
        adaptive=adaptive,
    )


def _task_ref(task: str | Task, t: Task) -> str:
    """What workers load: a built-in name, or a task file made absolute."""
    if not isinstance(task, str):
        return t.name
    name, sep, func = task.rpartition(":")
    if sep and name.endswith(".py"):
        return f"{Path(name).resolve()}:{func}"
    return task


def _check_run_options(
    t: Task,
    lr_rule: str,
    repeats: int,
    epochs: float | None,
    max_steps: int | None,
    min_steps: int,
) -> float | None:
    """Check the LR rule, repeats and the per-run budget; returns the epochs (the task's
    default when neither epochs nor max_steps is given)."""
    if lr_rule not in SWEEP_LR_RULES:
        raise ConfigError(
            f"lr rule: expected one of {', '.join(SWEEP_LR_RULES)}, got {lr_rule!r}",
            param="lr_rule",
        )
    check_batch_size(repeats, what="repeats")
    if epochs is not None and max_steps is not None:
        raise ConfigError("give `epochs` or `max_steps`, not both")
    if max_steps is not None:
        check_batch_size(max_steps, what="max steps")
    if epochs is None and max_steps is None:
        epochs = float(min(t.epochs or DEFAULT_EPOCHS, DEFAULT_EPOCHS))
    if epochs is not None:
        epochs = check_epochs(epochs)
    if not isinstance(min_steps, int) or min_steps < 0:
        raise ConfigError(f"min steps: expected an integer >= 0, got {min_steps!r}")
    return epochs


def _settings(
    t: Task,
    batch_sizes: str | tuple[int, ...] | list[int] | None,
    optimizers: str | tuple[str, ...] | list[str],
    lr_rule: str,
    lr: float | None,
    *,
    plan: str | Path | Plan | None,
    b_simple: float | None,
    adaptive: bool,
) -> _Settings:
    """Resolve the options every run shares: the plan and B_simple, sizes, optimizers, LR."""
    plan_info, b_simple = _resolve_plan(plan, b_simple, lr_rule)
    return _Settings(
        task=t,
        sizes=_batch_sizes(t, batch_sizes, plan_info),
        optimizers=parse_optimizers(optimizers),
        lr_rule=lr_rule,
        reference_lr=check_lr(t.lr if lr is None else lr, what="lr"),
        task_family=task_optimizer_family(t, lr_rule),
        b_simple=b_simple,
        plan=plan_info,
        adaptive=adaptive,
    )


def _resolve_plan(
    plan: str | Path | Plan | None, b_simple: float | None, lr_rule: str
) -> tuple[PlanInfo | None, float | None]:
    """The plan's part of the spec, and B_simple (given, else the plan's)."""
    if plan is None:
        info = None
    elif isinstance(plan, Plan):
        info = PlanInfo.from_plan(plan)
    else:
        info = PlanInfo.from_plan(Plan.load(plan), plan)
    if info is not None and b_simple is None:
        b_simple = info.b_simple
    if lr_rule == "adascale" and b_simple is None:
        raise ConfigError(
            "`lr_rule` 'adascale' needs B_simple: pass a `plan` (from `batchlab plan`) or "
            "`b_simple`, or use `lr_rule` auto, linear or sqrt"
        )
    if b_simple is not None and not (b_simple > 0 and math.isfinite(b_simple)):
        raise ConfigError(f"B_simple: expected a positive number, got {b_simple!r}")
    return info, b_simple


def _batch_sizes(
    t: Task, batch_sizes: str | tuple[int, ...] | list[int] | None, plan: PlanInfo | None
) -> tuple[int, ...]:
    if batch_sizes is None:
        return default_ladder(t.num_train, plan.max_batch_size if plan else None)
    sizes = parse_batch_sizes(batch_sizes)
    too_big = [b for b in sizes if b > t.num_train]
    if too_big:
        raise ConfigError(
            f"batch sizes {too_big} are larger than the training set of {t.name!r} "
            f"({t.num_train} examples); use at most {t.num_train}"
        )
    return sizes


def _add_repeat(builder: _Builder, s: _Settings, repeat: int, seed: int) -> None:
    """One repeat: the ladder of every optimizer, then the plan's batches and the adaptive run."""
    t = s.task
    for opt in s.optimizers:
        family = s.task_family if opt == "task" else opt
        ref_lr = _family_lr(s.reference_lr, s.task_family, family)
        rule = _rule_for(s.lr_rule, family)
        grid = TUNED_LR_GRID if s.lr_rule == "tuned" else (1.0,)
        for b in s.sizes:
            base = scale_lr(ref_lr, t.batch_size, b, rule, b_simple=s.b_simple)
            for mult in grid:
                peak = base * mult
                builder.add(
                    source="ladder",
                    batch_size=b,
                    micro_batch_size=b,
                    accumulation_steps=1,
                    optimizer=opt,
                    optimizer_family=family,
                    lr=peak,
                    lr_rule=rule,
                    lr_multiplier=mult,
                    reference_lr=ref_lr,
                    warmup_steps=warmup_steps_for(peak / ref_lr, builder.budget(b)),
                    repeat=repeat,
                    seed=seed,
                )
    if s.plan is not None:
        _add_plan_runs(builder, s, repeat, seed)
    if s.adaptive:
        builder.add(
            source="adaptive",
            batch_size=t.batch_size,  # where it starts; History records the path
            micro_batch_size=t.batch_size,
            accumulation_steps=1,
            optimizer="task",
            optimizer_family=s.task_family,
            lr=s.reference_lr,
            lr_rule="adaptive",
            lr_multiplier=1.0,
            reference_lr=s.reference_lr,
            warmup_steps=0,
            repeat=repeat,
            seed=seed,
        )


def _add_plan_runs(builder: _Builder, s: _Settings, repeat: int, seed: int) -> None:
    """The plan's batches with its micro-batches, LRs and warm-ups, as the plan says."""
    t = s.task
    for role, rec in _dedupe_plan_batches(s.plan):
        if rec.batch_size > t.num_train:
            raise ConfigError(
                f"the plan's {role} batch {rec.batch_size} is larger than the training set "
                f"({t.num_train}); was the plan made for task {t.name!r}?"
            )
        builder.add(
            source=f"plan:{role}",
            batch_size=rec.batch_size,
            micro_batch_size=rec.micro_batch_size,
            accumulation_steps=rec.accumulation_steps,
            optimizer="task",
            optimizer_family=s.task_family,
            lr=rec.lr,
            lr_rule="plan",
            lr_multiplier=1.0,
            reference_lr=s.reference_lr,
            warmup_steps=rec.warmup_steps,
            repeat=repeat,
            seed=seed,
        )


def _dedupe_plan_batches(plan: PlanInfo) -> list[tuple[str, Recommendation]]:
    """Recommended and efficient are often the same batch: train it once, under both names."""
    merged: dict[tuple, tuple[str, Recommendation]] = {}
    for role, rec in plan.batches().items():
        key = (
            rec.batch_size,
            rec.micro_batch_size,
            rec.accumulation_steps,
            rec.lr,
            rec.warmup_steps,
        )
        if key in merged:
            merged[key] = (f"{merged[key][0]}+{role}", merged[key][1])
        else:
            merged[key] = (role, rec)
    return list(merged.values())
