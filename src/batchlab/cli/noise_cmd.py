"""`batchlab noise`: the gradient noise scale B_simple along a training run of TASK."""

from __future__ import annotations

import math
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from batchlab.cli.common import (
    DEFAULT,
    DeviceOpt,
    JsonOpt,
    OutOpt,
    ProgressBar,
    SeedOpt,
    TaskArg,
    check_output_paths,
    console_for,
    fmt,
    save_plot,
    write_json,
)
from batchlab.core.noise_scale import NoiseScale
from batchlab.measure.noise_run import DEFAULT_EVERY, DEFAULT_STEPS, measure_noise
from batchlab.tasks import load_task


def _ci(ci: tuple[float, float]) -> str:
    high = "inf" if math.isinf(ci[1]) else fmt(ci[1], 3)
    return f"[{fmt(ci[0], 3)}, {high}]"


def _summary(label: str, est: NoiseScale) -> str:
    value = "undefined" if est.b_simple is None else fmt(est.b_simple, 3)
    text = f"{label}: B_simple {value} {_ci(est.b_simple_ci)} ({est.confidence:.0%})"
    if not est.reliable:
        text += f"\n  [yellow]unreliable: {escape(str(est.reason))}[/yellow]"
    return text


def noise(
    task: TaskArg = DEFAULT,
    steps: Annotated[
        int, typer.Option("--steps", help="Optimizer steps to train at the reference settings.")
    ] = DEFAULT_STEPS,
    every: Annotated[int, typer.Option("--every", help="Record a point every K steps.")] = (
        DEFAULT_EVERY
    ),
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="two-batch (accumulation micro-batches, nearly free) or per-example (exact "
            "reference, measured every K steps).",
        ),
    ] = "two-batch",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    out: OutOpt = None,
) -> None:
    """Train TASK with its reference batch and lr; record B_simple = tr(Σ)/|G|² vs. step.

    The JSON is written before the plot; Ctrl-C keeps nothing.
    """
    check_output_paths(json_path, out)
    console = console_for(json_path)
    t = load_task(task)
    run = measure_noise(
        t,
        steps=steps,
        every=every,
        method=method,
        seed=seed,
        device=device,
        callbacks=[ProgressBar(f"{t.name} noise")],
    )
    table = Table(
        title=f"batchlab noise {t.name}: batch {run.batch_size}, lr {run.lr:g}, {run.method}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for name in ("step", "examples", "train loss", "B_simple", f"{run.final.confidence:.0%} CI"):
        table.add_column(name, justify="right")
    table.add_column("")
    for p in run.points:
        table.add_row(
            str(p.step),
            str(p.examples),
            fmt(p.train_loss),
            "-" if p.b_simple is None else fmt(p.b_simple, 3),
            _ci(p.b_simple_ci),
            "" if p.reliable else "[yellow]unreliable[/yellow]",
        )
    console.print(table)
    console.print(_summary(f"final (step {run.steps})", run.final))
    if run.final.preconditioned is not None:
        console.print(_summary("Adam-preconditioned", run.final.preconditioned))
    console.print(
        f"[dim]{run.train_seconds:.1f}s on {run.device}; reference batch {run.batch_size}"
        + (
            f" as {run.batch_size // run.micro_batch_size} micro-batches of {run.micro_batch_size}"
            if run.method == "two-batch"
            else ""
        )
        + "[/dim]"
    )
    write_json(run, json_path, console)
    if out is not None:
        from batchlab.report.noise_plots import save_noise_plot

        path = save_plot(lambda p: save_noise_plot(run, p), out / f"noise_{t.name}.png")
        console.print(f"[dim]plot written to {path}[/dim]")
