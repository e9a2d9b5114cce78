"""`batchlab sweep`: train a task at many batch sizes, store every run, fit S(B), report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
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
    console_for,
    write_json,
)
from batchlab.core.lr import SWEEP_LR_RULES
from batchlab.report.sweep_report import REPORT_FILE, fmt, fmt_interval, sweep_page
from batchlab.sweep.analysis import SweepAnalysis, analyze_sweep
from batchlab.sweep.runner import default_jobs, run_sweep
from batchlab.sweep.spec import DEFAULT_MIN_STEPS, make_sweep_spec
from batchlab.sweep.store import RunRecord, SweepStore


def sweep(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Sweep directory: sweep.json, results.jsonl, report.html.",
            file_okay=False,
        ),
    ],
    task: TaskArg = DEFAULT,
    batch_sizes: Annotated[
        str | None,
        typer.Option(
            "--batch-sizes",
            help="Comma-separated effective batch sizes (default: 8, 16, ... up to the training-set size).",
        ),
    ] = None,
    lr_rule: Annotated[
        str,
        typer.Option(
            "--lr-rule",
            help=f"{'|'.join(SWEEP_LR_RULES)}: LR at each B from the task's (B0, lr0). auto = linear for SGD, sqrt for Adam; tuned = auto x {{0.5, 1, 2}}, best kept.",
        ),
    ] = "auto",
    optimizer: Annotated[
        str,
        typer.Option(
            "--optimizer",
            help="task, sgd, adam, or a list (sgd,adam). SGD has momentum 0.9; on an Adam task its LR is 10x Adam's.",
        ),
    ] = "task",
    epochs: Annotated[
        float | None,
        typer.Option("--epochs", help="Epochs per run (default: the task's, at most 30)."),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", help="Optimizer steps per run (instead of --epochs)."),
    ] = None,
    min_steps: Annotated[
        int,
        typer.Option(
            "--min-steps",
            help="With --epochs: at least this many steps per run, so big batches get enough updates.",
        ),
    ] = DEFAULT_MIN_STEPS,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="e.g. 'val_acc>=0.6'; runs stop there. Default: train the whole budget, then compare at 95% of the median best val acc.",
        ),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats", help="Seeds per setting (>= 2 gives a bootstrap interval over repeats)."
        ),
    ] = 2,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", help="Parallel runs (default: one per CPU core; 1 on CUDA)."),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="local (worker processes) or ray (a Ray cluster; pip install 'batchlab[ray]').",
        ),
    ] = "local",
    from_plan: Annotated[
        Path | None,
        typer.Option(
            "--from-plan",
            help="A `batchlab plan --json` file: add its batches with their planned LRs.",
            dir_okay=False,
        ),
    ] = None,
    b_simple: Annotated[
        float | None,
        typer.Option(
            "--b-simple",
            help="Measured B_simple, for --lr-rule adascale (or take it from --from-plan).",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="LR at the task's reference batch (default: the task's)."),
    ] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    sharpness: Annotated[
        str,
        typer.Option(
            "--sharpness",
            help="Measured at the end of each run: hessian (top eigenvalue), epsilon (Keskar's, CPU, small models), both, or none.",
        ),
    ] = "hessian",
    adaptive: Annotated[
        bool,
        typer.Option(
            "--adaptive", help="Also train with an adaptive batch size, next to the fixed ones."
        ),
    ] = False,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write DIR/report.html at the end.")
    ] = True,
    json_path: JsonOpt = None,
) -> None:
    """Train TASK at many batch sizes and measure what batch size really does.

    Re-running the same command resumes; `batchlab report DIR` rebuilds the report.
    """
    console = console_for(json_path)
    spec = make_sweep_spec(
        task,
        batch_sizes=batch_sizes,
        lr_rule=lr_rule,
        optimizers=optimizer,
        epochs=epochs,
        max_steps=max_steps,
        min_steps=min_steps,
        target=target,
        repeats=repeats,
        seed=seed,
        lr=lr,
        device=device,
        plan=from_plan,
        b_simple=b_simple,
        sharpness=sharpness,
        adaptive=adaptive,
    )
    n_jobs = jobs if jobs is not None else default_jobs(device, len(spec.runs))
    progress = Progress(
        TextColumn("[bold]sweep {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar = None

    def on_start(todo: int, total: int, contents) -> None:
        nonlocal bar
        for warning in contents.warnings:
            Console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}")
        if todo < total:
            Console(stderr=True).print(f"resuming: {total - todo} of {total} runs already in {out}")
        progress.start()
        bar = progress.add_task(spec.task, total=todo, last="")

    def on_record(record: RunRecord, done: int, todo: int) -> None:
        status = "" if record.status == "ok" else f" [red]{record.status}[/red]"
        progress.update(bar, completed=done, last=f"{record.run_id}{status}")

    try:
        result = run_sweep(
            spec, out, jobs=n_jobs, backend=backend, on_start=on_start, on_record=on_record
        )
    finally:
        if bar is not None:
            progress.stop()
    store = SweepStore(out)
    contents = store.read()
    analysis = analyze_sweep(spec, contents.records, store_warnings=contents.warnings)
    if report:
        sweep_page(spec, contents.records, analysis, out).write(Path(out) / REPORT_FILE)

    console.print(
        f"[bold]batchlab sweep {spec.task}[/bold]: {result.runs_done} runs in {result.wall_seconds:.0f}s "
        f"({result.runs_skipped} already done; jobs {n_jobs}, backend {backend})"
    )
    print_summary(console, analysis)
    if report:
        console.print(f"report: {Path(out) / REPORT_FILE}", soft_wrap=True)
    write_json({"sweep": result.to_dict(), "analysis": analysis.to_dict()}, json_path, console)


def _gap(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_summary(console: Console, analysis: SweepAnalysis) -> None:
    """One table per group, then the fit and the warnings."""
    auto = " (auto)" if analysis.target_auto else ""
    for group in analysis.groups:
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
            table.add_row(
                str(p.batch_size),
                fmt(p.lr, 2),
                f"{p.reached}/{p.repeats}" + (f" {p.diverged}div" if p.diverged else ""),
                fmt(p.median_steps_to_target),
                fmt(p.median_seconds_to_target, 2),
                fmt(p.seconds_per_epoch, 2),
                fmt(p.min_val_loss),
                fmt(p.final_val_acc),
                _gap(p.gap_acc if p.gap_acc is not None else p.gap_loss),
                fmt(p.sharpness),
            )
        console.print(table)
        fit = group.fit
        if fit is not None:
            console.print(
                f"  S(B) = S_min (1 + B_crit/B): [bold]B_crit = {fmt(fit.b_crit)}[/bold] "
                f"({fmt_interval(fit.b_crit_ci) or 'no interval'}), S_min = {fmt(fit.s_min)}, "
                f"R^2 = {fit.r2:.3f}"
            )
    if analysis.b_simple:
        console.print(f"  B_simple (measured, from the plan) = {fmt(analysis.b_simple)}")
    for row in analysis.plan:
        console.print(
            f"  plan {row.role} B={row.batch_size}: predicted speedup {fmt(row.predicted_speedup)}, "
            f"measured {fmt(row.measured_speedup)}"
        )
    a = analysis.adaptive
    if a is not None:
        path = " -> ".join(str(b) for b in a.batch_path) or "-"
        console.print(
            f"  adaptive (batch {path}): reached {a.reached}/{a.runs}, "
            f"{fmt(a.median_steps_to_target)} steps, {fmt(a.median_seconds_to_target, 2)} s to target; "
            f"best fixed B={a.best_fixed_batch_size}: {fmt(a.best_fixed_seconds_to_target, 2)} s, "
            f"reference: {fmt(a.reference_seconds_to_target, 2)} s"
        )
    for warning in analysis.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
