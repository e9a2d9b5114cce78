"""`batchlab train`: one training run through the engine, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from batchlab.cli.common import (
    DEFAULT,
    DeviceOpt,
    JsonOpt,
    ProgressBar,
    SeedOpt,
    TaskArg,
    check_output_paths,
    console_for,
    fmt,
    refuse_unused,
    write_json,
)
from batchlab.core.checks import check_epochs
from batchlab.history import History
from batchlab.tasks import load_task
from batchlab.train import train as run_training

BatchSizeOpt = Annotated[
    int | None,
    typer.Option("--batch-size", help="Micro-batch size (default: the task's reference)."),
]
LrOpt = Annotated[
    float | None, typer.Option("--lr", help="LR at the reference batch (default: the task's).")
]
EpochsOpt = Annotated[float | None, typer.Option("--epochs", help="Epochs to train.")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps.")]
LrRuleOpt = Annotated[
    str, typer.Option("--lr-rule", help="none, linear or sqrt: scale LR from the reference.")
]
WarmupOpt = Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up.")]
AccumulationOpt = Annotated[
    int, typer.Option("--accumulation-steps", help="Micro-batches per optimizer step.")
]
AmpOpt = Annotated[bool, typer.Option("--amp", help="Mixed precision (bf16/fp16).")]
TargetOpt = Annotated[
    str | None, typer.Option("--target", help="Stop when reached, e.g. 'val_acc>=0.9'.")
]
AdaptiveOpt = Annotated[
    bool,
    typer.Option(
        "--adaptive",
        help="Adapt batch size and LR to the measured B_noise and step times (with "
        "--schedule: start from the plan's schedule and trajectory, corrected online).",
    ),
]
MemoryCapOpt = Annotated[
    int | None,
    typer.Option("--memory-cap", help="With --adaptive: largest micro-batch that fits."),
]
ScheduleOpt = Annotated[
    Path | None,
    typer.Option(
        "--schedule",
        help="Run a batch-size schedule: a plan's JSON (`batchlab plan --json`) or a "
        "schedule's; with --adaptive, start from it and correct it online.",
    ),
]
BSimpleOpt = Annotated[
    float | None,
    typer.Option("--b-simple", help="With --adaptive: use this noise scale, not a measured one."),
]


def train(
    ctx: typer.Context,
    task: TaskArg = DEFAULT,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    epochs: EpochsOpt = None,
    max_steps: MaxStepsOpt = None,
    lr_rule: LrRuleOpt = "none",
    warmup_steps: WarmupOpt = 0,
    accumulation_steps: AccumulationOpt = 1,
    amp: AmpOpt = False,
    target: TargetOpt = None,
    adaptive: AdaptiveOpt = False,
    memory_cap: MemoryCapOpt = None,
    b_simple: BSimpleOpt = None,
    schedule: ScheduleOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
) -> None:
    """Train TASK once and print a summary (time, steps and examples to target).

    Nothing is saved until the run ends: Ctrl-C keeps nothing. Use --json to save the
    History.
    """
    if adaptive:
        refuse_unused(
            ctx,
            {
                "batch_size": "`adaptive` picks the batch itself (cap it with `memory_cap`)",
                "accumulation_steps": "`adaptive` picks the accumulation itself",
            },
        )
    else:
        why = "it needs `adaptive`"
        refuse_unused(ctx, {"memory_cap": why, "b_simple": why})
    if schedule is not None and adaptive:
        refuse_unused(ctx, {"lr": "`schedule` sets the starting lr (its first phase's)"})
    elif schedule is not None:
        why = "`schedule` sets each phase's batch, micro-batch and lr"
        refuse_unused(ctx, {k: why for k in ("batch_size", "accumulation_steps", "lr", "lr_rule")})
    if epochs is not None:
        check_epochs(epochs)
    check_output_paths(json_path)
    console = console_for(json_path)
    t = load_task(task)
    bs = t.batch_size if batch_size is None else batch_size
    if adaptive:
        from batchlab.adaptive import train_adaptive

        history = train_adaptive(
            t,
            lr=lr,
            epochs=epochs,
            max_steps=max_steps,
            warmup_steps=warmup_steps,
            lr_rule="auto" if lr_rule == "none" else lr_rule,  # adascale, sqrt-adascale
            memory_cap=memory_cap,
            b_simple=b_simple,
            amp=amp,
            device=device,
            seed=seed,
            target=target,
            schedule=schedule,
            callbacks=[ProgressBar(f"{t.name} adaptive")],
        )
        bs, accumulation_steps = history.batch_size, history.accumulation_steps
    elif schedule is not None:
        history = run_training(
            t,
            epochs=epochs,
            max_steps=max_steps,
            warmup_steps=warmup_steps,
            amp=amp,
            device=device,
            seed=seed,
            target=target,
            schedule=schedule,
            callbacks=[ProgressBar(f"{t.name} schedule")],
        )
        bs, accumulation_steps = history.batch_size, history.accumulation_steps
    else:
        history = run_training(
            t,
            bs,
            lr,
            epochs=epochs,
            max_steps=max_steps,
            lr_rule=lr_rule,
            warmup_steps=warmup_steps,
            accumulation_steps=accumulation_steps,
            amp=amp,
            device=device,
            seed=seed,
            target=target,
            callbacks=[ProgressBar(f"{t.name} B={bs * accumulation_steps}")],
        )
    console.print(summary_table(t.name, history, bs, accumulation_steps, warmup_steps, adaptive))
    write_json(history, json_path, console)


def summary_table(
    name: str,
    history: History,
    micro_batch_size: int,
    accumulation_steps: int,
    warmup_steps: int,
    adaptive: bool,
) -> Table:
    """The run at a glance: batch, LR, time, the final and best evaluation, the target."""
    table = Table(title=f"batchlab train {name}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "batch",
        f"{history.effective_batch_size} ({micro_batch_size} x {accumulation_steps} accum)",
    )
    if adaptive:
        decisions = history.extras["adaptive"]["decisions"]
        path = [d["batch_size"] for d in decisions]
        path = [b for i, b in enumerate(path) if i == 0 or b != path[i - 1]]
        table.add_row("adaptive batch path", " -> ".join(map(str, path)))
        table.add_row("adaptive start", decisions[0].get("reason", ""))
        last = decisions[-1]
        table.add_row(f"last decision (step {last['step']})", last.get("reason", ""))
    if "schedule" in history.extras:
        log = history.extras["schedule"]
        for run in log["phases_run"]:
            p = log["phases"][run["phase"]]
            table.add_row(
                f"phase {run['phase'] + 1}",
                f"B={p['batch_size']} ({p['micro_batch_size']} x {p['accumulation_steps']}), "
                f"lr {p['lr']:.4g}, from step {run['step']} ({run['examples']} examples)",
            )
    table.add_row("lr", f"{history.lr:.4g} (rule {history.lr_rule}, warm-up {warmup_steps})")
    table.add_row("device", history.device)
    table.add_row("steps / epochs", f"{history.total_steps} / {history.epochs:.2f}")
    last = history.evals[-1]
    table.add_row("val loss (final / best)", f"{fmt(last.val_loss)} / {fmt(history.best_val_loss)}")
    for k, v in last.metrics.items():
        best = max(e.metrics.get(k, float("-inf")) for e in history.evals)
        table.add_row(f"val {k} (final / best)", f"{fmt(v)} / {fmt(best)}")
    table.add_row(
        "time",
        f"{history.train_seconds:.1f}s train + {history.eval_seconds:.1f}s eval "
        f"({history.seconds_per_epoch:.2f}s/epoch)",
    )
    if history.target is not None:
        if history.reached_target:
            table.add_row(
                f"target {history.target}",
                f"reached at step {history.steps_to_target} "
                f"({history.examples_to_target} examples, {history.seconds_to_target:.1f}s)",
            )
        else:
            table.add_row(f"target {history.target}", "[yellow]not reached[/yellow]")
    if history.diverged:
        table.add_row("diverged", f"[red]non-finite loss at step {history.diverged_step}[/red]")
    return table
