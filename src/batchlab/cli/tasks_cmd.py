"""`batchlab tasks`: list the built-in tasks."""

from __future__ import annotations

import torch
from rich import box
from rich.table import Table

from batchlab.cli.common import JsonOpt, check_output_paths, console_for, write_json
from batchlab.tasks import BUILTIN_TASKS, DEFAULT_TASK


def tasks(json_path: JsonOpt = None) -> None:
    """List the built-in tasks: data sizes and the reference batch size and learning rate."""
    check_output_paths(json_path)
    console = console_for(json_path)
    rows = []
    for name, builtin in BUILTIN_TASKS.items():
        task = builtin.factory()
        probe_opt = task.optimizer([torch.zeros(1, requires_grad=True)], task.lr)
        rows.append(
            {
                "name": name,
                "description": builtin.summary,
                "train": task.num_train,
                "val": task.num_val,
                "batch_size": task.batch_size,
                "lr": task.lr,
                "optimizer": type(probe_opt).__name__,
                "epochs": task.epochs,
                "default": name == DEFAULT_TASK,
            }
        )
    # Fits 80 columns: only the description wraps; names and numbers never break.
    table = Table(
        title="Built-in tasks",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("task", "description", "train", "val", "batch", "lr", "optimizer", "epochs"):
        right = col in ("train", "val", "batch", "lr", "epochs")
        wraps = col == "description"
        table.add_column(
            col,
            justify="right" if right else "left",
            no_wrap=not wraps,
            overflow="fold",
            min_width=12 if wraps else None,
        )
    for r in rows:
        name = r["name"] + (" *" if r["default"] else "")
        table.add_row(
            name,
            r["description"],
            str(r["train"]),
            str(r["val"]),
            str(r["batch_size"]),
            f"{r['lr']:g}",
            r["optimizer"],
            str(r["epochs"]),
        )
    console.print(table)
    console.print("* default task. Reference batch and lr are where each task is known to train.")
    write_json({"tasks": rows}, json_path, console)
