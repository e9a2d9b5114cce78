"""Options and output helpers shared by every command. Each option is defined once here."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from batchlab.callbacks import RunState, TrainCallback
from batchlab.core.checks import MAX_SEED
from batchlab.errors import ConfigError, OutputError
from batchlab.history import Evaluation
from batchlab.results import JsonResult
from batchlab.tasks import DEFAULT_TASK

TaskArg = Annotated[
    str,
    typer.Argument(help="Built-in task name (see `batchlab tasks`) or path/to/file.py:function."),
]
DEFAULT = DEFAULT_TASK
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (auto picks CUDA if present).")
]
SeedOpt = Annotated[
    int,
    typer.Option(
        "--seed", min=0, max=MAX_SEED, help="Random seed (model init, shuffling), 0 to 2**63-1."
    ),
]
JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", help="Write the full result as JSON to this path ('-' for stdout)."),
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Directory for plots and reports.", file_okay=False)
]


# Library parameters whose option has another name on some command. The flag itself is
# looked up on the command being run, so one table serves every command.
PARAM_ALIASES = {"effective_batch_size": "effective_batch", "throughput_seconds": "time_budget"}
_BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def with_flags(text: str, command: Any | None) -> str:
    """`text` from the library with each `` `parameter` `` shown as `command`'s flag for it.

    Library errors, warnings and labels name parameters in backticks (see
    `batchlab.errors`); on the command line the user typed flags, so `memory_budget`
    becomes `--memory-budget`. A name the command has no option for keeps its backticks.
    `command` is the (typer/click) command being run, e.g. `ctx.command`; None leaves
    `text` as it is.
    """
    if command is None:
        return text
    flags = {}
    for param in getattr(command, "params", ()):
        long_flags = [o for o in param.opts if o.startswith("--")]
        if param.name and long_flags:  # options only: arguments have no flag
            flags[param.name] = long_flags[0]

    def flag(match: re.Match[str]) -> str:
        name = match.group(1)
        return flags.get(name) or flags.get(PARAM_ALIASES.get(name, "")) or match.group(0)

    return _BACKTICKED.sub(flag, text)


def given(ctx: typer.Context, name: str) -> bool:
    """True if the user typed option `name` (a parameter name), even at its default value."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def refuse_unused(ctx: typer.Context, unused: dict[str, str]) -> None:
    """One line for the first option the user typed that this run would silently ignore.

    `unused` maps a parameter name to why it is ignored ("needs `adaptive`"); the message
    names parameters in backticks, which `main` shows as the command's flags.
    """
    for name, why in unused.items():
        if given(ctx, name):
            raise ConfigError(f"`{name}` would be ignored: {why}", param=name)


def check_output_paths(json_path: Path | None = None, out: Path | None = None) -> None:
    """Fail now, not after minutes of measuring, if `--json` or `--out` cannot be written.

    `json_path` must be a file that can be created ('-' is stdout); `out` a directory that
    exists or can be made. Nothing is created here.
    """
    if json_path is not None and str(json_path) != "-":
        if json_path.is_dir():
            raise OutputError(f"`json_path` {str(json_path)!r} is a directory; give a file name")
        _check_creatable(json_path.parent, "json_path", json_path)
        if json_path.exists() and not os.access(json_path, os.W_OK):
            raise OutputError(f"`json_path` {str(json_path)!r} is not writable")
    if out is not None:
        if out.exists() and not out.is_dir():
            raise OutputError(f"`out` {str(out)!r} is a file, not a directory; give a directory")
        _check_creatable(out, "out", out)


def _check_creatable(directory: Path, param: str, given_path: Path) -> None:
    """`directory` exists and is writable, or can be made below a writable directory."""
    probe = directory if str(directory) else Path(".")
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(
            f"`{param}` {str(given_path)!r} is under {str(probe)!r}, which is a file; "
            "give a path in a directory",
            param=param,
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"`{param}` {str(given_path)!r}: {str(probe)!r} is not writable; give another path",
            param=param,
        )


# What a command has kept so far, for the line an interrupt prints (see `cli.main`).
KEPT: list[str | Callable[[], str]] = []


def keep(note: str | Callable[[], str]) -> None:
    """Record where finished work is, so Ctrl-C can say what was kept and where."""
    KEPT.append(note)


def console_for(json_path: Path | None) -> Console:
    """Human output goes to stdout, or to stderr when the JSON goes to stdout."""
    return Console(stderr=json_path is not None and str(json_path) == "-", highlight=False)


def write_json(result: JsonResult | dict[str, Any], path: Path | None, console: Console) -> None:
    if path is None:
        return
    data = result.to_dict() if isinstance(result, JsonResult) else result
    text = json.dumps(data, indent=2)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        keep("the JSON on stdout")
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text + "\n")
        tmp.replace(path)  # a full disk leaves the old file, never half a new one
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write the JSON to {str(path)!r}: {exc.strerror or exc}", param="json_path"
        ) from None
    keep(f"the JSON in {path}")
    console.print(f"[dim]JSON written to {path}[/dim]")


def save_plot(save: Callable[[Path], Path], path: Path) -> Path:
    """Draw a plot (or a report) to `path` with `save`.

    A refusal of the file system is one line, and the JSON, written before, is kept.
    """
    try:
        return save(path)
    except OSError as exc:
        kept = "; the JSON was written first" if KEPT else ""
        raise OutputError(
            f"cannot write {str(exc.filename or path)!r}: {exc.strerror or exc}{kept}", param="out"
        ) from None


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


class ProgressBar(TrainCallback):
    """A rich progress bar for a training run, shown on stderr."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[val]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar = None

    def on_start(self, state: RunState) -> None:
        if self.progress.console.is_terminal:  # a live bar cannot redraw in a pipe or log
            self.progress.start()
        self.bar = self.progress.add_task(
            self.description, total=state.total_steps, loss="-", val=""
        )

    def on_step(self, state: RunState) -> None:
        loss = fmt(state.last_loss)
        self.progress.update(self.bar, completed=state.step, loss=loss)

    def on_eval(self, state: RunState, evaluation: Evaluation) -> None:
        parts = [f"val_loss {fmt(evaluation.val_loss)}"]
        parts += [f"val_{k} {fmt(v)}" for k, v in evaluation.metrics.items()]
        if self.bar is not None:
            self.progress.update(self.bar, val="  ".join(parts))

    def on_end(self, state: RunState) -> None:
        if self.progress.live.is_started:
            self.progress.stop()
