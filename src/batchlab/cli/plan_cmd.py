"""`batchlab plan`: what batch size, learning rate, warm-up and accumulation to train with."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
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
from batchlab.measure.sizes import format_bytes
from batchlab.planner import PartialPlan, Plan, PlanInterrupted
from batchlab.planner import plan as make_plan
from batchlab.planner.measure import DEFAULT_NOISE_BUDGET, DEFAULT_THROUGHPUT_SECONDS

PHASES = {
    "memory": "memory probe",
    "throughput": "throughput ladder",
    "noise": "noise scale",
    "head-to-head": "head-to-head timing",
}


class PhaseProgress:
    """One progress bar per measuring phase, on stderr."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:<18}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:.0f} steps"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bars: dict[str, int] = {}

    def __call__(self, phase: str, done: float, total: float | None) -> None:
        if phase not in self.bars:
            self.bars[phase] = self.progress.add_task(PHASES.get(phase, phase), total=total)
        self.progress.update(self.bars[phase], completed=done, total=total)

    def __enter__(self) -> PhaseProgress:
        if self.progress.console.is_terminal:  # a live bar cannot redraw in a pipe or log
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


# Long only in its signature: typer reads one annotated parameter per flag from here.
def plan(
    ctx: typer.Context,
    task: TaskArg = DEFAULT,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help="Memory to plan within, e.g. 6GiB (default: free)."),
    ] = None,
    target_memory: Annotated[
        str | None,
        typer.Option("--target-memory", help="Plan for a device you do not have, e.g. 24GiB."),
    ] = None,
    margin: Annotated[float, typer.Option("--margin", help="Fraction of memory kept free.")] = 0.1,
    amp: Annotated[bool, typer.Option("--amp", help="Measure with mixed precision.")] = False,
    noise_budget: Annotated[
        float,
        typer.Option(
            "--noise-budget",
            help="Most the noise phase may train, as a fraction of the reference training "
            "(epochs x N examples).",
        ),
    ] = DEFAULT_NOISE_BUDGET,
    noise_steps: Annotated[
        int | None,
        typer.Option("--noise-steps", help="Cap on the noise phase's steps (default: budget)."),
    ] = None,
    throughput_seconds: Annotated[
        float,
        typer.Option(
            "--throughput-seconds",
            help="Rough time budget of the throughput ladder; the head-to-head timing of the "
            "leading candidates takes 60% of it again.",
        ),
    ] = DEFAULT_THROUGHPUT_SECONDS,
    lr_rule: Annotated[
        str | None,
        typer.Option("--lr-rule", help="linear, sqrt or adascale (default: by optimizer type)."),
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", help="Training target, e.g. 'val_acc>=0.9'.")
    ] = None,
    reference_run: Annotated[
        Path | None,
        typer.Option(
            "--reference-run",
            help="History JSON of a reference run (batchlab train --target ... --json); "
            "adds absolute seconds to target.",
        ),
    ] = None,
    lr_check: Annotated[
        bool,
        typer.Option(
            "--lr-check/--no-lr-check",
            help="Probe the recommended LR (x0.5, x1, x2) at the recommended batch for a few "
            "steps and lower it where the rule's does not train.",
        ),
    ] = True,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Recommend even when the noise phase's loss did not fall or its B_simple "
            "is unreliable (the plan's warnings say why not to trust it).",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    out: OutOpt = None,
) -> int:
    """Measure memory, throughput and the gradient noise scale; recommend what to train with.

    The JSON is written before the report. Ctrl-C saves what was measured (a partial plan)
    to --json, else to OUT/plan_partial.json, else to ./batchlab-plan-partial.json.
    """
    check_output_paths(json_path, out)
    console = console_for(json_path)
    command = "batchlab plan " + shlex.join(sys.argv[2:]) if len(sys.argv) > 1 else ""
    try:
        with PhaseProgress() as progress:
            result = make_plan(
                task,
                device=device,
                memory_budget=memory_budget,
                target_memory=target_memory,
                margin=margin,
                amp=amp,
                noise_budget=noise_budget,
                noise_steps=noise_steps,
                throughput_seconds=throughput_seconds,
                lr_rule=lr_rule,
                target=target,
                reference_run=reference_run,
                seed=seed,
                command=command,
                progress=progress,
                check_lr=lr_check,
                force=force,
            )
    except PlanInterrupted as exc:
        partial = PartialPlan(exc.phase, exc.measured.get("probe"), exc.measured.get("noise"))
        print_partial(console, partial)
        saved = partial_path(json_path, out)
        write_json(partial.to_dict(), saved, console)  # `main` says where it went
        return 130
    print_plan(console, result, ctx.command)
    write_json(result, json_path, console)
    if out is not None:
        from batchlab.report.plan_report import write_plan_report

        path = save_plot(lambda directory: write_plan_report(result, directory), out)
        console.print(f"report: [bold]{path}[/bold]")
    return 0


def partial_path(json_path: Path | None, out: Path | None) -> Path:
    """Where an interrupted plan keeps what it measured: never nowhere."""
    if json_path is not None:
        return json_path
    if out is not None:
        return out / "plan_partial.json"
    return Path("batchlab-plan-partial.json")


def print_partial(console: Console, partial: PartialPlan) -> None:
    console.print(f"[yellow]Interrupted during {partial.phase}: this plan is PARTIAL.[/yellow]")
    if partial.probe is not None:
        p = partial.probe
        console.print(
            f"measured so far: max batch {p.max_batch_size}, throughput knee {p.knee_batch_size}"
        )
    else:
        console.print("nothing was measured yet")


def print_plan(console: Console, plan: Plan, command: Any | None = None) -> None:
    """The plan as the CLI shows it; `command` (typer's) turns parameter names into flags."""
    ref = plan.reference
    b0 = int(ref["batch_size"])
    console.print(
        f"[bold]batchlab plan {plan.task}[/bold]  ({plan.device}, {plan.plan_seconds:.1f} s, "
        f"{plan.plan_steps} training steps)"
    )
    for title, rec in (
        ("Recommended (fastest)", plan.recommended),
        ("Efficient (B ~ B_noise)", plan.efficient),
    ):
        summary = Table(box=box.ROUNDED, show_header=False, title=title, title_justify="left")
        summary.add_column(style="bold")
        summary.add_column()
        summary.add_column(style="dim")
        summary.add_row("batch size", str(rec.batch_size), rec.reasons.get("batch_size", ""))
        summary.add_row("learning rate", f"{rec.lr:.4g} ({rec.lr_rule})", rec.reasons.get("lr", ""))
        summary.add_row("warm-up", f"{rec.warmup_steps} steps", rec.reasons.get("warmup", ""))
        summary.add_row(
            "accumulation",
            f"{rec.accumulation_steps} x {rec.micro_batch_size}",
            rec.reasons.get("accumulation", ""),
        )
        summary.add_row(
            "predicted",
            f"{rec.predicted_speedup:.2f}x vs B={b0}",
            f"steps x{rec.steps_factor:.2f}, {rec.step_s * 1e3:.2f} ms/step",
        )
        console.print(summary)
    print_verdict(console, plan)
    m = plan.measurements
    budget = format_bytes(m.budget_bytes) if m.budget_bytes else "-"
    console.print(
        f"measured: max batch [bold]{plan.max_batch_size}[/bold] (budget {budget}, "
        f"margin {m.margin:.0%}), throughput knee [bold]{plan.knee_batch_size}[/bold], "
        f"predicted critical batch [bold]{plan.b_simple:.0f}[/bold]{_interval(plan)}"
    )
    print_noise_outlook(console, plan)
    if plan.predicted_seconds_to_target is not None:
        console.print(
            f"time to {plan.target}: reference {plan.reference_seconds_to_target:.1f} s -> "
            f"predicted [bold]{plan.predicted_seconds_to_target:.1f} s[/bold]"
        )
    console.print(_candidates_table(plan, b0))
    print_schedule(console, plan)
    alts = ", ".join(f"{k} {v:.4g}" for k, v in plan.lr_alternatives.items())
    console.print(f"LR at B={plan.recommended.batch_size} under each rule: {alts}")
    if plan.lr_check is not None:
        console.print(f"LR check at B={plan.lr_check.batch_size}: {plan.lr_check.summary}")
    for w in plan.warnings:
        message = escape(with_flags(w.message, command))
        console.print(f"[yellow]warning[/yellow] ({w.code}): {message}")
    if plan.partial:
        console.print("[yellow]This plan is PARTIAL.[/yellow]")


def print_schedule(console: Console, plan: Plan) -> None:
    """The recommended schedule: its phases, predictions and how `train` runs it."""
    fc = plan.schedule
    if fc is None:
        return
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"Schedule (B rising with B_noise; lr {fc.lr_rule})",
        title_justify="left",
    )
    for col in ("from examples", "~ step", "batch", "micro x accum", "lr", "B_noise"):
        table.add_column(col, justify="right")
    for p, step, bn in zip(fc.schedule.phases, fc.phase_steps, fc.phase_b_noise, strict=True):
        table.add_row(
            str(p.start), f"{step:.0f}", str(p.batch_size),
            f"{p.micro_batch_size} x {p.accumulation_steps}", f"{p.lr:.4g}", f"{bn:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"  why: {fc.reasons.get('batch', '')}")
    gi = fc.predicted_gain_interval
    span = f" (interval {gi[0]:.2f}-{gi[1]:.2f}x)" if gi else ""
    console.print(
        f"  predicted: {fc.predicted_seconds:.3g} s, {fc.predicted_steps:.0f} steps, "
        f"{fc.predicted_examples:.0f} examples to the path's end; [bold]"
        f"{fc.predicted_gain:.2f}x[/bold] faster than the best fixed batch "
        f"B={fc.best_fixed_batch_size}{span}. Run it: batchlab train {plan.task} "
        "--schedule PLAN.json"
    )


def _candidates_table(plan: Plan, b0: int) -> Table:
    """Every candidate batch: micro x accum, steps and step time, speedup and marks."""
    table = Table(
        box=box.SIMPLE_HEAD, title="Candidates", title_justify="left", pad_edge=False,
        collapse_padding=True,
    )  # fmt: skip
    for col in ("batch", "micro x accum", "steps vs B0", "ms/step", "speedup", "interval"):
        table.add_column(col, justify="right")
    # One mark per line: at 80 columns or in a pipe, "reference interpolated" ended in "…".
    table.add_column("", justify="left", no_wrap=True, min_width=len("extrapolated"))
    for c in plan.candidates:
        marks = []
        if c.batch_size == b0:
            marks.append("reference")
        if c.batch_size == plan.recommended.batch_size:
            marks.append("[green]fastest[/green]")
        if c.batch_size == plan.efficient.batch_size:
            marks.append("[cyan]efficient[/cyan]")
        if c.timing == "extrapolated":
            marks.append("[yellow]extrapolated[/yellow]")
        elif c.timing == "head-to-head":
            marks.append("head-to-head")
        elif c.timing == "interpolated":
            marks.append("[dim]interpolated[/dim]")
        style = "bold" if c.batch_size == plan.recommended.batch_size else None
        table.add_row(
            str(c.batch_size),
            f"{c.micro_batch_size} x {c.accumulation_steps}",
            f"{c.steps_factor:.2f}",
            f"{c.step_s * 1e3:.2f}",
            f"{c.predicted_speedup:.2f}x",
            _span(c.speedup_low, c.speedup_high),
            "\n".join(marks),
            style=style,
        )
    return table


def _span(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{low:.2f}-{high:.2f}x"


def _interval(plan: Plan) -> str:
    if plan.b_simple_interval is None:
        return ""
    lo, hi = plan.b_simple_interval
    return f" (interval {lo:.0f}-{hi:.0f})"


def print_verdict(console: Console, plan: Plan) -> None:
    """The plain-words verdict: keep B0, or what to use and the gain's interval."""
    if plan.verdict:
        color = "yellow" if plan.keep_reference else "green"
        console.print(f"[bold {color}]Verdict:[/bold {color}] {plan.verdict}")


def print_noise_outlook(console: Console, plan: Plan) -> None:
    """The measured points, the fitted trajectory, the value at the target and the cost."""
    o = plan.noise_outlook
    if o is None:
        console.print(f"B_noise: {plan.b_simple_source}")
        return
    console.print(f"B_noise: {plan.b_simple_source}")
    t = o.trajectory
    lo, hi = o.b_noise_at_target_interval
    console.print(
        f"  trajectory log B = {t.log_scale:.2f} {t.exponent:+.2f} log L (1/alpha_B = "
        f"{-t.exponent:.2f}); at the target (loss {o.target_loss:.3g}, step {o.end_step:.0f}): "
        f"B_noise {o.b_noise_at_target:.0f} ({lo:.0f}-{hi:.0f})"
        + (" [extrapolated]" if o.extrapolated else "")
    )
    pts = [p for p in plan.b_simple_trajectory if p.b_simple is not None and p.train_loss]
    shown = pts[:: max(1, len(pts) // 8)]
    console.print(
        "  measured (step: loss -> B_simple): "
        + ", ".join(f"{p.step}: {p.train_loss:.3g} -> {p.b_simple:.0f}" for p in shown)
    )
    c = plan.cost
    if c:
        console.print(
            f"  cost: noise phase {c['noise_examples']:.0f} examples = "
            f"{c['noise_fraction']:.1%} of the reference training's {c['reference_examples']:.0f}"
        )
