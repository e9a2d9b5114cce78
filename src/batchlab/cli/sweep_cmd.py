"""`batchlab sweep`: train a task at many batch sizes, store every run, fit S(B), report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from batchlab.cli.common import (
    DEFAULT,
    DeviceOpt,
    JsonOpt,
    SeedOpt,
    TaskArg,
    check_output_paths,
    console_for,
    keep,
    refuse_unused,
    with_flags,
    write_json,
)
from batchlab.core.checks import check_epochs
from batchlab.core.lr import SWEEP_LR_RULES
from batchlab.report.numbers import format_interval, format_number
from batchlab.report.sweep_report import REPORT_FILE, write_sweep_report
from batchlab.sweep.analysis import SweepAnalysis, analyze_sweep
from batchlab.sweep.build import DEFAULT_MIN_STEPS, make_sweep_spec
from batchlab.sweep.groups import GroupAnalysis
from batchlab.sweep.runner import default_jobs, run_sweep
from batchlab.sweep.spec import SweepSpec
from batchlab.sweep.store import RunRecord, StoreContents, SweepStore

# The options, one alias each, so the command's signature reads as a list of names.
OutDirOpt = Annotated[
    Path,
    typer.Option(
        "--out", help="Sweep directory: sweep.json, results.jsonl, report.html.", file_okay=False
    ),
]
BatchSizesOpt = Annotated[
    str | None,
    typer.Option(
        "--batch-sizes",
        help="Comma-separated effective batch sizes (default: 8, 16, ... up to the training-set size).",
    ),
]
LrRuleOpt = Annotated[
    str,
    typer.Option(
        "--lr-rule",
        help=f"{'|'.join(SWEEP_LR_RULES)}: LR at each B from the task's (B0, lr0). auto = linear for SGD, sqrt for Adam; tuned = auto x {{0.5, 1, 2}}, widened by factors of 2 (up to x1/8, x8) while the best sits at an edge; best kept.",
    ),
]
OptimizersOpt = Annotated[
    str,
    typer.Option(
        "--optimizer",
        help="task, sgd, adam, or a list (sgd,adam). SGD has momentum 0.9; on an Adam task its LR is 10x Adam's.",
    ),
]
EpochsOpt = Annotated[
    float | None, typer.Option("--epochs", help="Epochs per run (default: the task's, at most 30).")
]
MaxStepsOpt = Annotated[
    int | None, typer.Option("--max-steps", help="Optimizer steps per run (instead of --epochs).")
]
MinStepsOpt = Annotated[
    int,
    typer.Option(
        "--min-steps",
        help="With --epochs: at least this many steps per run, so big batches get enough updates.",
    ),
]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target",
        help="e.g. 'val_acc>=0.6'; runs stop there. Default: train the whole budget, then compare at 95% of the median best val acc.",
    ),
]
MAX_REPEATS = 100  # 100k repeats wrote a 44 MB spec and started 100k runs without a word
RepeatsOpt = Annotated[
    int,
    typer.Option(
        "--repeats",
        min=1,
        max=MAX_REPEATS,
        help=f"Seeds per setting, 1 to {MAX_REPEATS} (>= 2 gives a bootstrap interval over "
        "repeats).",
    ),
]
JobsOpt = Annotated[
    int | None,
    typer.Option("--jobs", help="Parallel runs (default: one per CPU core; 1 on CUDA)."),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="local (worker processes) or ray (a Ray cluster; pip install 'batchlab\\[ray]').",
    ),
]
PlanOpt = Annotated[
    Path | None,
    typer.Option(
        "--from-plan",
        help="A `batchlab plan --json` file: add its batches with their planned LRs.",
        dir_okay=False,
    ),
]
BSimpleOpt = Annotated[
    float | None,
    typer.Option(
        "--b-simple",
        help="Measured B_simple, for --lr-rule adascale (or take it from --from-plan).",
    ),
]
LrOpt = Annotated[
    float | None,
    typer.Option("--lr", help="LR at the task's reference batch (default: the task's)."),
]
SharpnessOpt = Annotated[
    str,
    typer.Option(
        "--sharpness",
        help="Measured at the end of each run: hessian (top eigenvalue), epsilon (Keskar's, CPU, small models), both, or none.",
    ),
]
AdaptiveOpt = Annotated[
    bool,
    typer.Option(
        "--adaptive", help="Also train with an adaptive batch size, next to the fixed ones."
    ),
]
RetryFailedOpt = Annotated[
    bool,
    typer.Option(
        "--retry-failed/--no-retry-failed",
        help="On resume, run again the runs recorded as failed (a dead worker, an error).",
    ),
]
ReportOpt = Annotated[
    bool, typer.Option("--report/--no-report", help="Write DIR/report.html at the end.")
]


# Long only in its signature: typer reads one annotated parameter per flag from here.
def sweep(
    ctx: typer.Context,
    out_dir: OutDirOpt,
    task: TaskArg = DEFAULT,
    batch_sizes: BatchSizesOpt = None,
    lr_rule: LrRuleOpt = "auto",
    optimizers: OptimizersOpt = "task",
    epochs: EpochsOpt = None,
    max_steps: MaxStepsOpt = None,
    min_steps: MinStepsOpt = DEFAULT_MIN_STEPS,
    target: TargetOpt = None,
    repeats: RepeatsOpt = 2,
    jobs: JobsOpt = None,
    backend: BackendOpt = "local",
    plan: PlanOpt = None,
    b_simple: BSimpleOpt = None,
    lr: LrOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    sharpness: SharpnessOpt = "hessian",
    adaptive: AdaptiveOpt = False,
    report: ReportOpt = True,
    json_path: JsonOpt = None,
    retry_failed: RetryFailedOpt = True,
) -> None:
    """Train TASK at many batch sizes and measure what batch size really does.

    Re-running the same command resumes; `batchlab report DIR` rebuilds the report.
    Ctrl-C keeps every finished run.
    """
    if max_steps is not None:
        refuse_unused(ctx, {"min_steps": "it applies to `epochs` runs, not `max_steps`"})
    if epochs is not None:
        check_epochs(epochs)
    check_output_paths(json_path, out_dir)
    console = console_for(json_path)
    spec = make_sweep_spec(
        task,
        batch_sizes=batch_sizes,
        lr_rule=lr_rule,
        optimizers=optimizers,
        epochs=epochs,
        max_steps=max_steps,
        min_steps=min_steps,
        target=target,
        repeats=repeats,
        seed=seed,
        lr=lr,
        device=device,
        plan=plan,
        b_simple=b_simple,
        sharpness=sharpness,
        adaptive=adaptive,
    )
    n_jobs = jobs if jobs is not None else default_jobs(device, len(spec.runs))
    progress = SweepProgress(spec.task, out_dir)
    keep(lambda: _kept_runs(out_dir))
    try:
        result = run_sweep(
            spec,
            out_dir,
            jobs=n_jobs,
            backend=backend,
            on_start=progress.on_start,
            on_record=progress.on_record,
            retry_failed=retry_failed,
        )
    finally:
        progress.stop()
    contents = SweepStore(out_dir).read()
    analysis = analyze_sweep(spec, contents.records, store_warnings=contents.warnings)
    if report:
        write_sweep_report(
            spec, contents.records, analysis, out_dir, reproduce=reproduce_commands(spec, out_dir)
        )
    console.print(
        f"[bold]batchlab sweep {spec.task}[/bold]: {result.runs_done} runs in {result.wall_seconds:.0f}s "
        f"({result.runs_skipped} already done; jobs {n_jobs}, backend {backend})"
    )
    print_summary(console, analysis, ctx.command)
    if report:
        console.print(f"report: {Path(out_dir) / REPORT_FILE}", soft_wrap=True)
    write_json({"sweep": result.to_dict(), "analysis": analysis.to_dict()}, json_path, console)


def _kept_runs(out_dir: Path) -> str:
    """What Ctrl-C leaves: the finished runs, and how to go on."""
    try:
        done = len(SweepStore(out_dir).read().records)
    except Exception:  # the store is for the next run to judge; say where it is
        return f"the finished runs in {out_dir}; run the same command again to resume"
    return f"{done} finished runs in {out_dir}; run the same command again to resume"


class SweepProgress:
    """A progress bar over the runs still to do, on stderr, with the store's warnings."""

    def __init__(self, task: str, out: Path) -> None:
        self.task, self.out = task, out
        self.stderr = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]sweep {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[last]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.stderr,
            transient=True,
        )
        self.bar = None

    def on_start(self, todo: int, total: int, contents: StoreContents) -> None:
        for warning in contents.warnings:
            self.stderr.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        if todo < total:
            self.stderr.print(f"resuming: {total - todo} of {total} runs already in {self.out}")
        self.progress.start()
        self.bar = self.progress.add_task(self.task, total=todo, last="")

    def on_record(self, record: RunRecord, done: int, todo: int) -> None:
        status = "" if record.status == "ok" else f" [red]{record.status}[/red]"
        # `todo` grows when a tuned grid's extension wave is added: the bar's total follows.
        self.progress.update(self.bar, completed=done, total=todo, last=f"{record.run_id}{status}")

    def stop(self) -> None:
        if self.bar is not None:
            self.progress.stop()


def sweep_command(spec: SweepSpec, out_dir: str | Path) -> str:
    """The `batchlab sweep` command line that makes `spec` (and resumes it in `out_dir`)."""
    parts = ["batchlab", "sweep", spec.task_ref]
    parts += ["--batch-sizes", ",".join(str(b) for b in spec.batch_sizes)]
    parts += ["--lr-rule", spec.lr_rule, "--optimizer", ",".join(spec.optimizers)]
    if spec.max_steps is not None:
        parts += ["--max-steps", str(spec.max_steps)]
    else:
        parts += ["--epochs", f"{spec.epochs:g}", "--min-steps", str(spec.min_steps)]
    if spec.target:
        parts += ["--target", f"'{spec.target}'"]
    parts += ["--repeats", str(spec.repeats), "--seed", str(spec.seed)]
    if tuple(spec.sharpness) != ("hessian",):
        parts += ["--sharpness", ",".join(spec.sharpness) or "none"]
    if spec.adaptive:
        parts += ["--adaptive"]
    parts += ["--lr", f"{spec.reference_lr:g}"]
    if spec.device != "auto":
        parts += ["--device", spec.device]
    if spec.plan is not None and spec.plan.path is not None:
        parts += ["--from-plan", spec.plan.path]
    elif spec.b_simple is not None:
        parts += ["--b-simple", f"{spec.b_simple:g}"]
    parts += ["--out", str(out_dir)]
    return " ".join(parts)


def reproduce_commands(spec: SweepSpec, out_dir: str | Path) -> list[str]:
    """What the report's Reproduce section shows: the sweep, then the report alone."""
    return [sweep_command(spec, out_dir), f"batchlab report {out_dir}"]


def _group_table(group: GroupAnalysis, analysis: SweepAnalysis) -> Table:
    auto = " (auto)" if analysis.target_auto else ""
    table = Table(
        title=f"{group.label}, target {analysis.target}{auto}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    for col in ("B", "lr", "hit", "steps", "s→tgt", "s/ep", "min loss", "acc", "gap", "λmax"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in group.points:
        gap = p.gap_acc if p.gap_acc is not None else p.gap_loss
        table.add_row(
            str(p.batch_size),
            format_number(p.lr, 2),
            f"{p.reached}/{p.repeats}" + (f" {p.diverged}div" if p.diverged else ""),
            format_number(p.median_steps_to_target),
            format_number(p.median_seconds_to_target, 2),
            format_number(p.seconds_per_epoch, 2),
            format_number(p.min_val_loss),
            format_number(p.final_val_acc),
            "-" if gap is None else f"{gap:.3f}",
            format_number(p.sharpness),
        )
    return table


def print_summary(console: Console, analysis: SweepAnalysis, command: Any | None = None) -> None:
    """One table per group, then the fit, the plan check, the adaptive runs and the warnings."""
    for group in analysis.groups:
        console.print(_group_table(group, analysis))
        fit = group.fit
        if fit is not None:
            console.print(
                f"  S(B) = S_min (1 + B_crit/B): [bold]B_crit = {format_number(fit.b_crit)}[/bold] "
                f"({format_interval(fit.b_crit_ci) or 'no interval'}), "
                f"S_min = {format_number(fit.s_min)}, R^2 = {fit.r2:.3f}"
            )
    if analysis.b_simple:
        console.print(f"  B_simple (measured, from the plan) = {format_number(analysis.b_simple)}")
    for row in analysis.plan:
        console.print(
            f"  plan {row.role} B={row.batch_size}: predicted speedup "
            f"{format_number(row.predicted_speedup)}, measured {format_number(row.measured_speedup)}"
        )
    a = analysis.adaptive
    if a is not None:
        path = " -> ".join(str(b) for b in a.batch_path) or "-"
        console.print(
            f"  adaptive (batch {path}): reached {a.reached}/{a.runs}, "
            f"{format_number(a.median_steps_to_target)} steps, "
            f"{format_number(a.median_seconds_to_target, 2)} s to target; "
            f"best fixed B={a.best_fixed_batch_size}: "
            f"{format_number(a.best_fixed_seconds_to_target, 2)} s, "
            f"reference: {format_number(a.reference_seconds_to_target, 2)} s"
        )
    for warning in analysis.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(with_flags(warning, command))}")
