"""The `batchlab` command line: a thin typer layer over the library.

`main(argv) -> int` maps every domain error to one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from batchlab.cli.calc_cmd import calc
from batchlab.cli.common import with_flags
from batchlab.cli.noise_cmd import noise
from batchlab.cli.plan_cmd import plan
from batchlab.cli.probe_cmd import probe
from batchlab.cli.report_cmd import report
from batchlab.cli.sweep_cmd import sweep
from batchlab.cli.tasks_cmd import tasks
from batchlab.cli.train_cmd import train
from batchlab.errors import BatchlabError

app = typer.Typer(
    name="batchlab",
    help="What batch size and learning rate should I train with? Answered from measurements.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(tasks)
app.command()(train)
app.command()(calc)
app.command()(probe)
app.command()(plan)
app.command()(sweep)
app.command()(report)
app.command()(noise)


def _error(message: str) -> None:
    sys.stderr.write(f"batchlab: error: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="batchlab", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: bad option values, unknown options
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _error(f"{exc.format_message()}{where}")
        return 2
    except (typer.Abort, KeyboardInterrupt):
        _error("interrupted")
        return 130
    except BatchlabError as exc:
        subcommand = getattr(command, "commands", {}).get(args[0])
        _error(with_flags(str(exc), subcommand))
        return 2
    return result if isinstance(result, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
