"""The `batchlab` command line: a thin typer layer over the library.

`main(argv) -> int` maps every mistake to one line on stderr: exit code 2 for bad input
(options, files, the user's own task code), 130 for Ctrl-C (with what was kept and where),
1 for an internal error. `--debug` or BATCHLAB_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import sys
import sysconfig
import threading
import traceback
from pathlib import Path
from types import TracebackType

import typer

from batchlab.cli.calc_cmd import calc
from batchlab.cli.common import KEPT, with_flags
from batchlab.cli.noise_cmd import noise
from batchlab.cli.plan_cmd import plan
from batchlab.cli.probe_cmd import probe
from batchlab.cli.report_cmd import report
from batchlab.cli.sweep_cmd import sweep
from batchlab.cli.tasks_cmd import tasks
from batchlab.cli.train_cmd import train
from batchlab.errors import BatchlabError

DEBUG_ENV = "BATCHLAB_DEBUG"

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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"batchlab {importlib.metadata.version('batchlab')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Show the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help=f"Show the traceback of an error (or set {DEBUG_ENV}=1)."
    ),
) -> None:
    """What batch size and learning rate should I train with? Answered from measurements."""


def _error(message: str, exc: BaseException | None = None, debug: bool = False) -> None:
    """The one line on stderr; with `debug`, the traceback first."""
    if debug and exc is not None:
        traceback.print_exception(exc, file=sys.stderr)
    line = " ".join(message.split())  # one line, whatever the message holds
    sys.stderr.write(f"batchlab: error: {line}\n")
    sys.stderr.flush()


def _split_debug(args: list[str]) -> tuple[list[str], bool]:
    """`--debug` may come anywhere before `--`; it is taken out before typer parses."""
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    kept = [a for i, a in enumerate(args) if not (i < end and a == "--debug")]
    return kept, debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    args, debug = _split_debug(sys.argv[1:] if argv is None else list(argv))
    if not args:
        args = ["--help"]
    command = typer.main.get_command(app)
    KEPT.clear()
    interrupted = _InterruptFlag()
    try:
        with interrupted:
            result = command.main(args=args, prog_name="batchlab", standalone_mode=False)
    except typer.Exit as exc:  # --help, --version
        return exc.exit_code
    except typer.TyperException as exc:  # usage errors: bad option values, unknown options
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _error(f"{exc.format_message()}{where}", exc, debug)
        return 2
    except (typer.Abort, KeyboardInterrupt) as exc:
        _error(_interrupted_line(), exc, debug)
        return 130
    except BatchlabError as exc:
        subcommand = getattr(command, "commands", {}).get(args[0])
        _error(with_flags(str(exc), subcommand), exc, debug)
        return 2
    except Exception as exc:  # the user's task code, a file system refusal, or a bug
        return _unexpected(exc, args, debug)
    if interrupted.seen:  # typer turns Ctrl-C into a silent exit code 130
        _error(_interrupted_line())
        return 130
    return result if isinstance(result, int) else 0


class _InterruptFlag:
    """Notes a Ctrl-C (SIGINT) while a command runs, then raises KeyboardInterrupt as usual.

    typer catches the KeyboardInterrupt and returns 130 without a word; the flag lets
    `main` say what was kept and where. Only in the main thread, where signals arrive.
    """

    def __init__(self) -> None:
        self.seen = False
        self._previous: object = None

    def _handler(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]


def _interrupted_line() -> str:
    kept = [note() if callable(note) else note for note in KEPT]
    if not kept:
        return "interrupted; nothing was saved"
    return "interrupted; kept " + "; ".join(kept)


def _unexpected(exc: Exception, args: list[str], debug: bool) -> int:
    """One line for an exception that is not a BatchlabError; 2 if the user's code raised it."""
    what = (
        f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    )
    hint = "" if debug else f"; rerun with --debug (or {DEBUG_ENV}=1) for the traceback"
    frame = _user_frame(exc.__traceback__)
    if frame is not None:
        task = next((a for a in args if ".py:" in a), None)
        where = f"{frame.name}() at {Path(frame.filename).name}:{frame.lineno}"
        source = f"task {task}: " if task else ""
        _error(
            f"{source}the task code raised {what} in {where}; fix the task code{hint}", exc, debug
        )
        return 2
    if isinstance(exc, OSError) and exc.filename is not None:
        _error(f"cannot use {str(exc.filename)!r}: {exc.strerror or exc}{hint}", exc, debug)
        return 2
    _error(f"internal error: {what}{hint}, and please report it", exc, debug)
    return 1


def _library_dirs() -> tuple[str, ...]:
    """Where code that is not the user's lives: batchlab itself and the Python install."""
    paths = sysconfig.get_paths()
    package = Path(__file__).resolve().parents[1]  # src/batchlab
    dirs = {str(package), sys.prefix, sys.base_prefix}
    dirs |= {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


def _user_frame(tb: TracebackType | None) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback in a file outside batchlab and the Python install."""
    library = _library_dirs()
    found = None
    for frame in traceback.extract_tb(tb):
        name = frame.filename
        if name.startswith("<"):
            continue
        if not os.path.realpath(name).startswith(library):
            found = frame
    return found


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
