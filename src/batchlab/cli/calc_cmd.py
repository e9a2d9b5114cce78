"""`batchlab calc`: batch, iteration and epoch arithmetic."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from batchlab.cli.common import JsonOpt, check_output_paths, console_for, write_json
from batchlab.core.batching import calc as compute


def calc(
    samples: Annotated[int, typer.Option("--samples", help="Training examples.")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Micro-batch size per rank.")],
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs.")] = 1,
    accumulation_steps: Annotated[
        int, typer.Option("--accumulation-steps", help="Micro-batches per optimizer step.")
    ] = 1,
    world_size: Annotated[int, typer.Option("--world-size", help="Data-parallel ranks.")] = 1,
    drop_last: Annotated[
        bool, typer.Option("--drop-last", help="Drop each rank's final partial batch.")
    ] = False,
    json_path: JsonOpt = None,
) -> None:
    """Iterations per epoch, optimizer steps and effective batch size."""
    check_output_paths(json_path)
    console = console_for(json_path)
    result = compute(
        samples,
        batch_size,
        epochs,
        accumulation_steps=accumulation_steps,
        world_size=world_size,
        drop_last=drop_last,
    )
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name in (
        "iterations_per_epoch",
        "total_iterations",
        "optimizer_steps_per_epoch",
        "total_optimizer_steps",
        "effective_batch_size",
        "samples_per_epoch",
        "last_batch_size",
    ):
        table.add_row(name, str(getattr(result, name)))
    console.print(table)
    write_json(result, json_path, console)
