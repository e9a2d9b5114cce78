"""What a sweep runs: one `RunSpec` per training run, all of them in one `SweepSpec`.

The spec is built once from the user's options and saved as `DIR/sweep.json`. Everything a
run needs is written out in it (batch, micro-batch, optimizer, peak LR, warm-up, budget,
seed), so a report can be rebuilt from the directory alone and a resumed sweep can check
that it is asked for the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchlab.core.checks import check_batch_size, check_lr
from batchlab.core.lr import SWEEP_LR_RULES, scale_lr, warmup_steps_for
from batchlab.core.optim import family_lr_rule, optimizer_family
from batchlab.errors import ConfigError
from batchlab.results import JsonResult
from batchlab.target import target_for_task
from batchlab.task import Task
from batchlab.tasks import load_task

SPEC_FORMAT = 1
OPTIMIZERS = ("task", "sgd", "adam")
# `--lr-rule tuned`: a small grid around the rule's LR, best by steps-to-target, as
# McCandlish et al. 2018 and Shallue et al. 2018 tuned the LR at every batch size.
TUNED_LR_GRID = (0.5, 1.0, 2.0)
# SGD with momentum 0.9 on a task tuned for Adam (or the reverse) needs its own reference
# LR. We use a fixed ratio: SGD's LR is 10x Adam's (e.g. Adam 1e-3 <-> SGD 1e-2), the
# usual rule of thumb for small nets; pass --lr to move both.
SGD_OVER_ADAM_LR = 10.0
DEFAULT_EPOCHS = 30  # capped by the task's own reference epochs
DEFAULT_MIN_STEPS = 200  # so big batches get enough updates to reach a target at all
LADDER_START = 8
EVALS_PER_RUN = 50
SHARPNESS_EXAMPLES = 1024
# "hessian": top Hessian eigenvalue (cheap, any device). "epsilon": Keskar et al.'s
# epsilon-sharpness, an L-BFGS-B search over all weights on the CPU: fine for small models.
SHARPNESS_MEASURES = ("hessian", "epsilon")


@dataclass(frozen=True)
class RunSpec(JsonResult):
    """One training run of a sweep, fully resolved."""

    run_id: str  # unique in its sweep; the key of the results store
    source: str  # "ladder", or "plan:<role>" for batches added by --from-plan
    batch_size: int  # effective batch: examples per optimizer step
    micro_batch_size: int
    accumulation_steps: int
    optimizer: str  # "task" (the task's own), "sgd" (momentum 0.9) or "adam"
    optimizer_family: str  # "sgd" or "adam": which LR rule fits it
    lr: float  # peak learning rate the run uses
    lr_rule: str  # how `lr` was chosen: none, linear, sqrt, adascale or plan
    lr_multiplier: float  # the --lr-rule tuned grid factor (1.0 otherwise)
    reference_lr: float  # LR at the task's reference batch for this optimizer
    warmup_steps: int
    max_steps: int  # optimizer-step budget
    eval_every: int
    repeat: int
    seed: int


@dataclass(frozen=True)
class PlanPoint(JsonResult):
    """A batch size `batchlab plan` chose, with its planned LR and predicted speedup."""

    role: str  # reference, recommended or efficient
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    lr: float
    lr_rule: str
    warmup_steps: int
    predicted_speedup: float | None
    steps_factor: float | None = None  # the plan's S(B) / S(B0)


@dataclass(frozen=True)
class PlanCandidate(JsonResult):
    """One row of the plan's candidate table."""

    batch_size: int
    steps_factor: float | None
    step_s: float | None
    predicted_speedup: float | None


@dataclass(frozen=True)
class PlanInfo(JsonResult):
    """The parts of a plan JSON a sweep checks against measurement."""

    path: str
    points: tuple[PlanPoint, ...]
    candidates: tuple[PlanCandidate, ...] = ()
    b_simple: float | None = None
    max_batch_size: int | None = None


@dataclass(frozen=True)
class SweepSpec(JsonResult):
    """Everything a sweep runs, saved as `DIR/sweep.json`. Two sweeps are the same sweep
    exactly when their specs are equal."""

    task: str  # name shown in reports
    task_ref: str  # what workers load: a built-in name or an absolute path.py:function
    num_train: int
    reference_batch_size: int
    reference_lr: float  # for the task's own optimizer (the task's lr or --lr)
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

    def reproduce_command(self, out_dir: str | Path) -> str:
        """The `batchlab sweep` command line that gives this spec."""
        parts = ["batchlab", "sweep", self.task_ref]
        parts += ["--batch-sizes", ",".join(str(b) for b in self.batch_sizes)]
        parts += ["--lr-rule", self.lr_rule, "--optimizer", ",".join(self.optimizers)]
        if self.max_steps is not None:
            parts += ["--max-steps", str(self.max_steps)]
        else:
            parts += ["--epochs", f"{self.epochs:g}", "--min-steps", str(self.min_steps)]
        if self.target:
            parts += ["--target", f"'{self.target}'"]
        parts += ["--repeats", str(self.repeats), "--seed", str(self.seed)]
        if tuple(self.sharpness) != ("hessian",):
            parts += ["--sharpness", ",".join(self.sharpness) or "none"]
        if self.adaptive:
            parts += ["--adaptive"]
        parts += ["--lr", f"{self.reference_lr:g}"]
        if self.device != "auto":
            parts += ["--device", self.device]
        if self.plan is not None:
            parts += ["--from-plan", self.plan.path]
        elif self.b_simple is not None:
            parts += ["--b-simple", f"{self.b_simple:g}"]
        parts += ["--out", str(out_dir)]
        return " ".join(parts)


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
            f"got {text!r}; e.g. --optimizer sgd,adam"
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
    """The optimizers `--optimizer` swaps in: SGD with momentum 0.9, or Adam."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ConfigError(f"optimizer: expected sgd or adam, got {name!r}")


def load_plan(path: str | Path) -> PlanInfo:
    """Read the fields a sweep needs from a `batchlab plan --json` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--from-plan: {str(path)!r} does not exist; write it with `batchlab plan --json PATH`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--from-plan: {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None

    def need(obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict) or obj.get(key) is None:
            raise ConfigError(
                f"--from-plan: expected `{where}{key}` in {str(path)!r} (a `batchlab plan --json` "
                "file), but it is missing"
            )
        return obj[key]

    points = []
    ref = need(data, "reference", "")
    ref_b = check_batch_size(
        need(ref, "batch_size", "reference."), what="plan reference.batch_size"
    )
    points.append(
        PlanPoint(
            "reference", ref_b, ref_b, 1, check_lr(need(ref, "lr", "reference.")), "none", 0, 1.0
        )
    )
    for role in ("recommended", "efficient"):
        entry = need(data, role, "")
        b = check_batch_size(need(entry, "batch_size", f"{role}."), what=f"plan {role}.batch_size")
        micro = entry.get("micro_batch_size") or b
        accum = entry.get("accumulation_steps") or 1
        if micro * accum != b:
            raise ConfigError(
                f"--from-plan: {role} has micro_batch_size {micro} x accumulation_steps {accum} "
                f"!= batch_size {b}; fix the plan file"
            )
        speedup = entry.get("predicted_speedup")
        points.append(
            PlanPoint(
                role,
                b,
                check_batch_size(micro, what=f"plan {role}.micro_batch_size"),
                check_batch_size(accum, what=f"plan {role}.accumulation_steps"),
                check_lr(need(entry, "lr", f"{role}.")),
                str(entry.get("lr_rule") or "plan"),
                int(entry.get("warmup_steps") or 0),
                None if speedup is None else float(speedup),
                entry.get("steps_factor"),
            )
        )
    candidates = tuple(
        PlanCandidate(
            int(c["batch_size"]),
            c.get("steps_factor"),
            c.get("step_s"),
            c.get("predicted_speedup"),
        )
        for c in data.get("candidates") or []
        if isinstance(c, dict) and c.get("batch_size")
    )
    b_simple = data.get("b_simple")
    if isinstance(b_simple, dict):  # a NoiseScale result rather than the bare value
        b_simple = b_simple.get("b_simple")
    max_b = data.get("max_batch_size")
    return PlanInfo(
        path=str(path),
        points=tuple(points),
        candidates=candidates,
        b_simple=None if b_simple is None else float(b_simple),
        max_batch_size=None if max_b is None else int(max_b),
    )


@dataclass(frozen=True)
class _Budget:
    max_steps: int
    eval_every: int


def _budget(
    num_train: int, batch: int, epochs: float | None, max_steps: int | None, min_steps: int
) -> _Budget:
    if max_steps is not None:
        total = max_steps
    else:
        total = max(math.ceil(epochs * math.ceil(num_train / batch)), min_steps)
    return _Budget(total, max(1, total // EVALS_PER_RUN))


def _family_lr(reference_lr: float, task_family: str, family: str) -> float:
    if family == task_family:
        return reference_lr
    return reference_lr * SGD_OVER_ADAM_LR if family == "sgd" else reference_lr / SGD_OVER_ADAM_LR


@dataclass
class _Builder:
    """Accumulates run specs with unique ids."""

    runs: list[RunSpec] = field(default_factory=list)

    def add(self, **kw: Any) -> None:
        mult = kw["lr_multiplier"]
        tag = "" if mult == 1.0 else f"-x{mult:g}"
        kw["run_id"] = (
            f"{kw['source'].replace(':', '-')}-{kw['optimizer']}-b{kw['batch_size']:05d}"
            f"{tag}-r{kw['repeat']}"
        )
        self.runs.append(RunSpec(**kw))


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
    plan: str | Path | PlanInfo | None = None,
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
        plan: a `batchlab plan --json` file; its reference, recommended and efficient
            batches are added with their planned LRs.
        adaptive: also run `batchlab.adaptive.train_adaptive` (the task's optimizer, from
            the reference batch and LR, the reference batch's step budget) once per repeat,
            to compare with the fixed batch sizes. Its runs are not part of the S(B) fit.
    """
    t = load_task(task)
    if isinstance(task, str):
        task_ref = task
        name, sep, func = task.rpartition(":")
        if sep and name.endswith(".py"):
            task_ref = f"{Path(name).resolve()}:{func}"
    else:
        task_ref = t.name
    if lr_rule not in SWEEP_LR_RULES:
        raise ConfigError(f"lr rule: expected one of {', '.join(SWEEP_LR_RULES)}, got {lr_rule!r}")
    check_batch_size(repeats, what="repeats")
    if epochs is not None and max_steps is not None:
        raise ConfigError("give --epochs or --max-steps, not both")
    if max_steps is not None:
        check_batch_size(max_steps, what="max steps")
    if epochs is None and max_steps is None:
        epochs = float(min(t.epochs or DEFAULT_EPOCHS, DEFAULT_EPOCHS))
    if epochs is not None and not (isinstance(epochs, (int, float)) and epochs > 0):
        raise ConfigError(f"epochs: expected a positive number, got {epochs!r}")
    if not isinstance(min_steps, int) or min_steps < 0:
        raise ConfigError(f"min steps: expected an integer >= 0, got {min_steps!r}")
    tgt = target_for_task(target, t, check_metrics=True)
    check_batch_size(sharpness_examples, what="sharpness examples")
    measures = parse_sharpness(sharpness)

    plan_info = plan if isinstance(plan, PlanInfo) or plan is None else load_plan(plan)
    if plan_info is not None and b_simple is None:
        b_simple = plan_info.b_simple
    if lr_rule == "adascale" and b_simple is None:
        raise ConfigError(
            "lr rule 'adascale' needs B_simple: pass --from-plan plan.json (from `batchlab plan "
            "--json`) or --b-simple VALUE, or use --lr-rule auto/linear/sqrt"
        )
    if b_simple is not None and not (b_simple > 0 and math.isfinite(b_simple)):
        raise ConfigError(f"B_simple: expected a positive number, got {b_simple!r}")

    if batch_sizes is None:
        sizes = default_ladder(t.num_train, plan_info.max_batch_size if plan_info else None)
    else:
        sizes = parse_batch_sizes(batch_sizes)
    too_big = [b for b in sizes if b > t.num_train]
    if too_big:
        raise ConfigError(
            f"batch sizes {too_big} are larger than the training set of {t.name!r} "
            f"({t.num_train} examples); use at most {t.num_train}"
        )
    opts = parse_optimizers(optimizers)
    reference_lr = check_lr(t.lr if lr is None else lr, what="--lr")
    task_family = task_optimizer_family(t, lr_rule)

    builder = _Builder()
    for repeat in range(repeats):
        run_seed = seed + repeat
        for opt in opts:
            family = task_family if opt == "task" else opt
            ref_lr = _family_lr(reference_lr, task_family, family)
            rule = lr_rule
            if lr_rule in ("auto", "tuned"):
                rule = family_lr_rule(family)
            grid = TUNED_LR_GRID if lr_rule == "tuned" else (1.0,)
            for b in sizes:
                budget = _budget(t.num_train, b, epochs, max_steps, min_steps)
                base = scale_lr(ref_lr, t.batch_size, b, rule, b_simple=b_simple)
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
                        warmup_steps=warmup_steps_for(peak / ref_lr, budget.max_steps),
                        max_steps=budget.max_steps,
                        eval_every=budget.eval_every,
                        repeat=repeat,
                        seed=run_seed,
                    )
        if plan_info is not None:
            for point in _dedupe_plan_points(plan_info.points):
                if point.batch_size > t.num_train:
                    raise ConfigError(
                        f"the plan's {point.role} batch {point.batch_size} is larger than the "
                        f"training set ({t.num_train}); was the plan made for task {t.name!r}?"
                    )
                budget = _budget(t.num_train, point.batch_size, epochs, max_steps, min_steps)
                builder.add(
                    source=f"plan:{point.role}",
                    batch_size=point.batch_size,
                    micro_batch_size=point.micro_batch_size,
                    accumulation_steps=point.accumulation_steps,
                    optimizer="task",
                    optimizer_family=task_family,
                    lr=point.lr,
                    lr_rule="plan",
                    lr_multiplier=1.0,
                    reference_lr=reference_lr,
                    warmup_steps=point.warmup_steps,
                    max_steps=budget.max_steps,
                    eval_every=budget.eval_every,
                    repeat=repeat,
                    seed=run_seed,
                )
        if adaptive:
            budget = _budget(t.num_train, t.batch_size, epochs, max_steps, min_steps)
            builder.add(
                source="adaptive",
                batch_size=t.batch_size,  # where it starts; History records the path
                micro_batch_size=t.batch_size,
                accumulation_steps=1,
                optimizer="task",
                optimizer_family=task_family,
                lr=reference_lr,
                lr_rule="adaptive",
                lr_multiplier=1.0,
                reference_lr=reference_lr,
                warmup_steps=0,
                max_steps=budget.max_steps,
                eval_every=budget.eval_every,
                repeat=repeat,
                seed=run_seed,
            )
    return SweepSpec(
        task=t.name,
        task_ref=task_ref,
        num_train=t.num_train,
        reference_batch_size=t.batch_size,
        reference_lr=reference_lr,
        task_optimizer_family=task_family,
        batch_sizes=sizes,
        optimizers=opts,
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
        b_simple=b_simple,
        plan=plan_info,
        runs=tuple(builder.runs),
        sharpness=measures,
        adaptive=adaptive,
    )


def _dedupe_plan_points(points: tuple[PlanPoint, ...]) -> list[PlanPoint]:
    """Recommended and efficient are often the same batch: train it once, under both names."""
    merged: dict[tuple, PlanPoint] = {}
    for p in points:
        key = (p.batch_size, p.micro_batch_size, p.accumulation_steps, p.lr, p.warmup_steps)
        if key in merged:
            old = merged[key]
            merged[key] = dataclasses.replace(old, role=f"{old.role}+{p.role}")
        else:
            merged[key] = p
    return list(merged.values())
