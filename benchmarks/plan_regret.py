"""Plan regret: the plan's (B, LR) against an exhaustive, LR-tuned sweep (issue 11, item 7).

Ground truth is a `batchlab sweep` directory per task and optimizer, with the LR tuned at
every batch (factor-2 grid, widened at its edges) and several seeds:

    batchlab sweep TASK --lr-rule tuned --repeats 3 --target T --batch-sizes 8,...,1024 \\
        --min-steps 300 --sharpness none --no-report --out DIR

For each configuration `TASK:B0:DIR`:

1. The reference is B0 at the best LR the sweep found at B0: a user who tuned the LR at
   their folklore batch.
2. `batchlab.plan` runs from that reference with the sweep's target and its defaults.
   A refusal or a "keep B0" verdict means the user keeps B0.
3. The plan's (B, LR, warm-up) is trained with the sweep's own protocol (`execute_run`:
   the same budget, evaluation schedule, target and seeds) unless the sweep already ran it.
4. Every batch's step is timed in one interleaved replay (`replay.py`), so a time to target
   is (median steps to target over seeds) x (replayed seconds per step), and ratios share
   the machine's load.

Regret of a choice = its time to target / the best time in the sweep (best LR at each B,
best B). Also reported: the folklore choices (B0 itself; the largest batch of the sweep
with its best LR, which is generous to it) and what the plan cost.

    .venv/bin/python benchmarks/plan_regret.py dots:32:sweeps/dots_adam \\
        mnist1d-mlp:32:sweeps/mlp_adam mnist1d-mlp:100:sweeps/mlp_adam [--plans 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

import batchlab
from batchlab.planner.measure import PlanRefused
from batchlab.sweep.analysis import analyze_sweep
from batchlab.sweep.metrics import run_metrics
from batchlab.sweep.runner import RunContext, _task_for, execute_run
from batchlab.sweep.spec import RunSpec, SweepSpec
from batchlab.sweep.store import RunRecord, load_sweep
from batchlab.target import parse_target

sys.path.insert(0, str(Path(__file__).parent))
from replay import time_step_configs  # noqa: E402

LR_SNAP = 1e-3  # relative: an LR this close to a grid point is that grid point


def median_steps(steps: list[float]) -> float:
    """Median over seeds, a run that never reached the target counting as infinite."""
    return statistics.median(sorted(steps)) if steps else math.inf


@dataclass
class Truth:
    """Steps to target of every (batch, LR) the sweep ran, by seed."""

    spec: SweepSpec
    steps: dict[tuple[int, float], list[float]]
    templates: dict[int, list[RunSpec]]  # the sweep's runs at each batch, one per repeat
    records: list[RunRecord]

    def b_crit(self) -> tuple[float, tuple[float, float] | None] | None:
        """B_crit (and its interval) that `batchlab sweep` fits to the LR-tuned ladder."""
        fits = [g.fit for g in analyze_sweep(self.spec, self.records).groups if g.fit is not None]
        if not fits:
            return None
        return fits[0].b_crit, None if fits[0].b_crit_ci is None else tuple(fits[0].b_crit_ci)

    def best_lr(self, batch: int) -> float:
        grid = {lr: median_steps(s) for (b, lr), s in self.steps.items() if b == batch}
        return min(grid, key=lambda lr: (grid[lr], lr))

    def swept_steps(self, batch: int, lr: float) -> list[float] | None:
        """The sweep's own runs at (batch, lr), when lr is a grid point up to rounding.

        The plan prints LRs to 4 significant digits; retraining at 0.005657 instead of the
        grid's 0.0056569 draws a new sample of a noisy quantity (mnist1d-mlp, B=128: 416,
        384, 368 steps against the sweep's 320, 304, 368), compared with a best that is
        the minimum over the sweep's own samples.
        """
        for (b, grid_lr), steps in self.steps.items():
            if b == batch and abs(lr / grid_lr - 1) < LR_SNAP:
                return steps
        return None

    def batches(self) -> list[int]:
        return sorted({b for b, _ in self.steps})


def read_truth(directories: str) -> Truth:
    """The runs of one sweep directory, or of several (comma-separated) of the same task,
    target and protocol: e.g. the task's own B0 swept on its own, beside the ladder."""
    spec, _ = load_sweep(directories.split(",")[0])
    records = [r for d in directories.split(",") for r in load_sweep(d)[1].records]
    target = parse_target(spec.target)
    steps: dict[tuple[int, float], list[float]] = defaultdict(list)
    templates: dict[int, list[RunSpec]] = defaultdict(list)
    for record in records:
        run = record.spec
        m = run_metrics(record, target)
        reached = m.steps_to_target if m.status == "ok" else None
        steps[(run.batch_size, round(run.lr, 12))].append(
            math.inf if reached is None else float(reached)
        )
        if run.lr_multiplier == 1.0 and run.source == "ladder":
            templates[run.batch_size].append(run)
    return Truth(spec, dict(steps), dict(templates), records)


def budget(spec: SweepSpec, batch: int) -> int:
    if spec.max_steps is not None:
        return spec.max_steps
    return max(math.ceil(spec.epochs * math.ceil(spec.num_train / batch)), spec.min_steps)


def train_choice(truth: Truth, batch: int, micro: int, lr: float, warmup: int) -> list[float]:
    """Steps to target of (batch, lr, warm-up) over the sweep's seeds, by its own protocol."""
    if warmup == 0:
        swept = truth.swept_steps(batch, lr)
        if swept is not None:
            return swept
    nearest = min(truth.templates, key=lambda b: abs(math.log(b / batch)))
    context = RunContext.from_spec(truth.spec, threads=torch.get_num_threads())
    target = parse_target(truth.spec.target)
    out = []
    for template in sorted(truth.templates[nearest], key=lambda r: r.repeat):
        run = dataclasses.replace(
            template,
            run_id=f"plan-b{batch}-lr{lr:.6g}-w{warmup}-r{template.repeat}",
            source="plan:recommended",
            batch_size=batch,
            micro_batch_size=micro,
            accumulation_steps=-(-batch // micro),
            lr=lr,
            lr_rule="plan",
            lr_multiplier=1.0,
            warmup_steps=warmup,
            max_steps=budget(truth.spec, batch),
        )
        record = execute_run(truth.spec.task_ref, run, context)
        m = run_metrics(record, target)
        out.append(math.inf if m.steps_to_target is None else float(m.steps_to_target))
    return out


@dataclass
class PlanChoice:
    batch: int
    micro: int
    lr: float
    warmup: int
    verdict: str
    seconds: float
    noise_examples: float | None
    reference_examples: float | None
    lr_check: str
    critical_batch: float | None = None  # the plan's predicted B_bar, and its interval
    critical_batch_ci: tuple[float, float] | None = None


def run_plan(truth: Truth, b0: int, lr0: float, seed: int) -> PlanChoice:
    base = batchlab.load_task(truth.spec.task_ref)
    template = truth.templates[min(truth.templates)][0]
    task = dataclasses.replace(_task_for(template, base), batch_size=b0, lr=lr0)
    t0 = time.perf_counter()
    try:
        plan = batchlab.plan(task, target=truth.spec.target, device="cpu", seed=seed)
    except PlanRefused as exc:
        return PlanChoice(
            b0, b0, lr0, 0, f"refused: {exc}", time.perf_counter() - t0, None, None, ""
        )
    rec = plan.recommended
    check = plan.lr_check.summary if plan.lr_check is not None else ""
    cost = plan.cost
    choice = (b0, b0, lr0, 0) if plan.keep_reference else (
        rec.batch_size, rec.micro_batch_size, rec.lr, rec.warmup_steps
    )  # fmt: skip
    outlook = plan.noise_outlook
    return PlanChoice(
        *choice, plan.verdict, plan.plan_seconds, cost.get("noise_examples"),
        cost.get("reference_examples"), check, plan.b_simple,
        None if outlook is None else tuple(outlook.critical_batch_interval),
    )  # fmt: skip


def measure_config(task_name: str, b0: int, directory: str, plans: int) -> dict:
    """Steps to target of every choice (load-independent); timing comes after, in `timed`."""
    truth = read_truth(directory)
    if b0 not in truth.batches():
        raise SystemExit(f"B0={b0} is not a batch of the sweep in {directory}")
    lr0 = truth.best_lr(b0)
    choices = [run_plan(truth, b0, lr0, seed) for seed in range(plans)]
    return {
        "sweep_b_crit": truth.b_crit(),
        "task": task_name,
        "task_ref": truth.spec.task_ref,
        "optimizer": truth.templates[b0][0].optimizer_family,
        "run_optimizer": truth.templates[b0][0].optimizer,  # "task", "sgd" or "adam"
        "target": truth.spec.target,
        "b0": b0,
        "lr0": lr0,
        "best_lr": {b: truth.best_lr(b) for b in truth.batches()},
        "steps": {b: truth.steps[(b, truth.best_lr(b))] for b in truth.batches()},
        "plans": [
            {
                "choice": dataclasses.asdict(c),
                "steps": train_choice(truth, c.batch, c.micro, c.lr, c.warmup),
            }
            for c in choices
        ],
    }


def timed(measured: dict) -> dict:
    """Regrets from one interleaved replay of every batch's step (see `replay.py`)."""
    b0 = measured["b0"]
    steps = {int(b): s for b, s in measured["steps"].items()}  # JSON keys are strings
    best_lr = {int(b): lr for b, lr in measured["best_lr"].items()}
    choices = [PlanChoice(**p["choice"]) for p in measured["plans"]]
    configs = {(b, 1) for b in steps} | {(c.micro, -(-c.batch // c.micro)) for c in choices}
    # The optimizer the sweep ran (its state is part of a step's cost), not only the task's.
    run = argparse.Namespace(optimizer=measured.get("run_optimizer", "task"))
    task = _task_for(run, batchlab.load_task(measured["task_ref"]))
    step_s = time_step_configs(task, configs)

    def seconds(batch: int, micro: int, run_steps: list[float]) -> float:
        return median_steps(run_steps) * step_s[(micro, -(-batch // micro))]

    per_batch = {b: seconds(b, b, s) for b, s in sorted(steps.items())}
    best_b = min(per_batch, key=per_batch.get)
    best = per_batch[best_b]
    ref = choices[0].reference_examples if choices else None
    largest = max(per_batch)
    return {
        **measured,
        "best": (best_b, best_lr[best_b], best),
        "per_batch": per_batch,
        "b0_regret": per_batch[b0] / best,
        "largest": (largest, per_batch[largest] / best),
        "plans": [
            {
                "choice": c,
                "steps": p["steps"],
                "regret": seconds(c.batch, c.micro, p["steps"]) / best,
                # The batch alone: the plan's batch at the sweep's best LR there (ladder only).
                "batch_regret": per_batch[c.batch] / best if c.batch in per_batch else None,
            }
            for c, p in zip(choices, measured["plans"], strict=True)
        ],
        "reference_seconds": None if not ref else ref / b0 * step_s[(b0, 1)],
        "step_s": step_s,
    }


def fmt_steps(steps: list[float]) -> str:
    return ", ".join("never" if math.isinf(s) else f"{s:.0f}" for s in steps)


def render(results: list[dict]) -> str:
    lines = [
        "| task (optimizer) | target | B0 (LR0) | best (B, LR) | plan: B (LR, warm-up) "
        "| plan steps (seeds) | **plan regret** | its batch at the best LR | B0 regret "
        "| largest B regret |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    regrets, b0s, largests, batch_only = [], [], [], []
    for r in results:
        best_b, best_lr, _ = r["best"]
        for p in r["plans"]:
            c = p["choice"]
            regrets.append(p["regret"])
            alone = p.get("batch_regret")
            batch_only += [alone] if alone is not None else []
            lines.append(
                f"| {r['task']} ({r['optimizer']}) | {r['target']} | {r['b0']} ({r['lr0']:.3g}) "
                f"| {best_b} ({best_lr:.3g}) | {c.batch} ({c.lr:.3g}, {c.warmup}) "
                f"| {fmt_steps(p['steps'])} | **{p['regret']:.2f}** "
                f"| {'-' if alone is None else f'{alone:.2f}'} | {r['b0_regret']:.2f} "
                f"| {r['largest'][1]:.2f} (B={r['largest'][0]}) |"
            )
        b0s.append(r["b0_regret"])
        largests.append(r["largest"][1])

    def gmean(xs: list[float]) -> float:
        return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else math.nan

    lines += [
        "",
        f"Plan regret: geometric mean **{gmean(regrets):.2f}**, worst **{max(regrets):.2f}** "
        f"over {len(regrets)} plan runs (goal: <= 1.10 and <= 1.25). Folklore: B0 "
        f"{gmean(b0s):.2f} (worst {max(b0s):.2f}); largest batch {gmean(largests):.2f} "
        f"(worst {max(largests):.2f}). The plan's batch alone, at the sweep's best LR there: "
        f"{gmean(batch_only):.2f} over the {len(batch_only)} plans whose batch the sweep ran.",
        "",
        "| task | B0 | plan verdict | LR check | plan cost: examples (of the reference "
        "training's) | plan wall seconds | reference training, replayed seconds |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for r in results:
        for p in r["plans"]:
            c = p["choice"]
            share = (
                f"{c.noise_examples:.0f} ({c.noise_examples / c.reference_examples:.1%})"
                if c.noise_examples and c.reference_examples
                else "-"
            )
            ref_s = "-" if r["reference_seconds"] is None else f"{r['reference_seconds']:.1f}"
            lines.append(
                f"| {r['task']} | {r['b0']} | {c.verdict} | {c.lr_check or '-'} | {share} "
                f"| {c.seconds:.1f} | {ref_s} |"
            )
    lines += [
        "",
        "Predicted critical batch (issue 11 item 2: within 1.5x of the sweep's B_crit):",
        "",
        "| task | B0 | plan's critical batch, each plan (interval) | sweep B_crit (interval) "
        "| median plan / sweep |",
        "|---|---|---|---|---:|",
    ]
    for r in results:
        preds = [p["choice"] for p in r["plans"] if p["choice"].critical_batch is not None]
        truth = r.get("sweep_b_crit")
        if not preds or truth is None:
            continue
        each = ", ".join(
            f"{c.critical_batch:.0f}"
            + (f" ({c.critical_batch_ci[0]:.0f}-{c.critical_batch_ci[1]:.0f})"
               if c.critical_batch_ci else "")
            for c in preds
        )  # fmt: skip
        b_crit, ci = truth
        ci_s = f" ({ci[0]:.0f}-{ci[1]:.0f})" if ci else ""
        ratio = statistics.median(c.critical_batch for c in preds) / b_crit
        lines.append(f"| {r['task']} | {r['b0']} | {each} | {b_crit:.0f}{ci_s} | {ratio:.2f} |")
    lines += ["", "Time to target by batch (best LR at each, replayed seconds):", ""]
    for r in results:
        row = ", ".join(
            f"{b}: {'never' if math.isinf(s) else f'{s:.2f}'}" for b, s in r["per_batch"].items()
        )
        lines.append(f"- {r['task']} from B0={r['b0']}: {row}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", help="TASK:B0:SWEEP_DIR[,SWEEP_DIR...]")
    parser.add_argument("--plans", type=int, default=1, help="plan runs per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--save", help="write the steps measured (before timing) to this JSON")
    parser.add_argument(
        "--retime", nargs="+", help="time and report the steps saved by earlier --save runs"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.retime:
        measured = [m for path in args.retime for m in json.loads(Path(path).read_text())]
    else:
        measured = []
        for config in args.configs:
            task_name, b0, directory = config.split(":", 2)
            measured.append(measure_config(task_name, int(b0), directory, args.plans))
            print(f"measured {config} after {time.perf_counter() - t0:.0f}s", flush=True)
            if args.save:
                Path(args.save).write_text(json.dumps(measured, indent=1))
    print(render([timed(m) for m in measured]))
    print(f"\n{torch.get_num_threads()} threads, {time.perf_counter() - t0:.0f}s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
