"""`batchlab probe`: what fits in memory and what runs fastest, with a two-panel PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchlab.cli.common import (
    DEFAULT,
    DeviceOpt,
    JsonOpt,
    OutOpt,
    SeedOpt,
    TaskArg,
    check_output_paths,
    console_for,
    save_plot,
    with_flags,
    write_json,
)
from batchlab.measure import distributed
from batchlab.measure.memory import DEFAULT_MARGIN
from batchlab.measure.probe import ProbeResult, ProbeSettings, run_probe
from batchlab.measure.sizes import format_bytes
from batchlab.measure.throughput import TIME_BUDGET_SECONDS


class _ProbeProgress:
    """Progress bars on stderr: memory steps (open-ended), then throughput windows."""

    def __init__(self, enabled: bool) -> None:
        console = Console(stderr=True)
        # Only on a terminal: in logs and pipes a progress bar is noise.
        enabled = enabled and console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )
        self.bars: dict[str, int] = {}

    def __enter__(self) -> _ProbeProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, phase: str, done: float, total: float | None) -> None:
        if phase not in self.bars:
            label = "memory: training steps" if phase == "memory" else f"{phase}: timed windows"
            self.bars[phase] = self.progress.add_task(label, total=total)
        self.progress.update(self.bars[phase], completed=done, total=total)


def probe(
    ctx: typer.Context,
    task: TaskArg = DEFAULT,
    device: DeviceOpt = "auto",
    memory_budget: Annotated[
        str | None,
        typer.Option(
            "--memory-budget",
            help="Memory to fit in, e.g. 6GiB or 512MB (default: free GPU memory; on CPU, "
            "half the available RAM). Verified by running the step.",
        ),
    ] = None,
    target_memory: Annotated[
        str | None,
        typer.Option(
            "--target-memory",
            help="Plan for a device you do not have, e.g. 24GiB (prediction only).",
        ),
    ] = None,
    margin: Annotated[
        float, typer.Option("--margin", help="Fraction of the budget kept free.")
    ] = DEFAULT_MARGIN,
    amp: Annotated[bool, typer.Option("--amp", help="Measure with mixed precision.")] = False,
    effective_batch: Annotated[
        int | None,
        typer.Option(
            "--effective-batch",
            help="Plan gradient accumulation for this batch (default: the task's reference "
            "batch, if it does not fit).",
        ),
    ] = None,
    time_budget: Annotated[
        float,
        typer.Option("--time-budget", help="Seconds to spend timing throughput (roughly)."),
    ] = TIME_BUDGET_SECONDS,
    json_path: JsonOpt = None,
    out: OutOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Largest batch that fits, samples/s against batch size, the knee, and a plot.

    The JSON is written before the plot; Ctrl-C keeps nothing.
    """
    check_output_paths(json_path, out)
    created_group = distributed.init_from_env(device)
    try:
        lead = distributed.rank() == 0
        console = console_for(json_path)
        with _ProbeProgress(enabled=lead) as progress:
            result = run_probe(
                task,
                ProbeSettings(device, memory_budget, target_memory, margin, amp, seed, time_budget),
                effective_batch_size=effective_batch,
                progress=progress,
            )
        if not lead:
            return
        console.print(summary_table(result, ctx.command))
        console.print(throughput_table(result))
        for warning in result.warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(with_flags(warning, ctx.command))}")
        write_json(result, json_path, console)
        if out is not None:
            from batchlab.report.probe_plots import save_probe_figure

            path = save_plot(
                lambda p: save_probe_figure(result, p), Path(out) / f"probe_{result.task}.png"
            )
            console.print(f"[dim]plot written to {path}[/dim]")
    finally:
        if created_group:
            distributed.shutdown()


def _steps_line(result: ProbeResult) -> str:
    m = result.memory
    labels = []
    points = iter(m.points)
    first = True
    for b in m.tried:
        if first:
            labels.append(f"{b} (warm-up)")
            first = False
            continue
        p = next(points)
        mark = "" if p.fits else (" OOM" if p.oom else " over")
        labels.append(f"{b}{mark}")
    return f"{m.probe_steps}: B = " + ", ".join(labels)


def summary_table(result: ProbeResult, command: Any | None = None) -> Table:
    m = result.memory
    title = f"batchlab probe {result.task} ({result.device}"
    title += f", {result.world_size} ranks)" if result.world_size > 1 else ")"
    table = Table(title=title, title_justify="left", show_header=False, box=box.SIMPLE)
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "memory budget",
        f"{format_bytes(m.budget_bytes)}: {with_flags(m.budget_source, command)}\n"
        f"usable {format_bytes(m.usable_bytes)} (margin {m.margin:.0%})",
    )
    table.add_row(
        "memory per step",
        f"{format_bytes(m.fixed_bytes)} + {format_bytes(m.bytes_per_sample)} x B "
        f"({m.fit} fit over {len([p for p in m.points if p.peak_bytes is not None])} points)",
    )
    if m.predicted_only:
        status = "[yellow]predicted for the target memory, not run[/yellow]"
    elif not m.verified:
        status = "[yellow]predicted, not run (too slow to verify)[/yellow]"
    else:
        status = "verified: ran for real"
        if m.eval_peak_bytes is not None:
            status += f"; eval pass peaks at {format_bytes(m.eval_peak_bytes)}"
    cap = " (the whole training set)" if m.capped_by_dataset else ""
    table.add_row("max batch size", f"[bold green]{result.max_batch_size}[/bold green]{cap}")
    table.add_row("", status)
    if result.local_max_batch_size != result.max_batch_size:
        table.add_row("this rank alone", str(result.local_max_batch_size))
    table.add_row("probe steps", _steps_line(result))
    table.add_row(
        "knee",
        f"[bold green]{result.knee_batch_size}[/bold green]: smallest B reaching "
        f"{result.knee_fraction:.0%} of the peak {result.peak_samples_per_s:,.0f} samples/s",
    )
    for finding in result.alignment:
        rule = finding.rule.replace("_", " ")
        color = "green" if finding.confirmed else "dim"
        table.add_row(f"alignment ({rule})", f"[{color}]{finding.note}[/{color}]")
    if result.aligned_knee_batch_size != result.knee_batch_size:
        table.add_row("rounded knee", str(result.aligned_knee_batch_size))
    if result.accumulation is not None:
        table.add_row("accumulation", result.accumulation.note)
    table.add_row("cost", f"{result.throughput_steps} timing steps, {result.seconds:.1f}s total")
    return table


def throughput_table(result: ProbeResult) -> Table:
    table = Table(title="throughput", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("B", justify="right")
    table.add_column("samples/s", justify="right")
    table.add_column("ms/step", justify="right")
    table.add_column("spread", justify="right")
    table.add_column("")
    for p in result.throughput:
        marks = []
        if p.batch_size == result.knee_batch_size:
            marks.append("knee")
        if p.batch_size == result.max_batch_size:
            marks.append("max")
        table.add_row(
            str(p.batch_size),
            f"{p.samples_per_s:,.0f}",
            f"{p.step_s * 1000:.3g}",
            f"{p.spread:.0%}",
            ", ".join(marks),
        )
    return table
