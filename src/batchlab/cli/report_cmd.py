"""`batchlab report PATH`: rebuild a report from saved results, without measuring anything.

PATH is either a sweep directory (it holds `sweep.json`) or a `.json` result file such as
`batchlab plan --json`'s. Each kind has one branch below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from batchlab.cli.common import OutOpt, check_output_paths, console_for
from batchlab.cli.sweep_cmd import reproduce_commands
from batchlab.errors import ConfigError
from batchlab.report.sweep_report import REPORT_FILE, build_sweep_report
from batchlab.sweep.store import SPEC_FILE, SweepStore


def report(
    path: Annotated[Path, typer.Argument(help="A sweep directory, or a plan .json file.")],
    out: OutOpt = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="Sweeps: compare batches at this target instead (runs must not have stopped earlier).",
        ),
    ] = None,
) -> None:
    """Rebuild DIR/report.html from a sweep directory (or a plan JSON) with no training."""
    check_output_paths(out=out)
    console = console_for(None)
    if path.is_dir() and (path / SPEC_FILE).is_file():
        written = _sweep_report(path, out, target)
    elif path.suffix == ".json" and path.is_file():
        if target is not None:
            raise ConfigError(
                "`target` would be ignored: it applies to sweep directories, not plan files",
                param="target",
            )
        written = _plan_report(path, out)
    else:
        raise ConfigError(
            f"expected a sweep directory (with {SPEC_FILE}) or a plan .json file, got {str(path)!r}; "
            "make one with `batchlab sweep TASK --out DIR` or `batchlab plan --json PATH`"
        )
    console.print(f"report: {written}", soft_wrap=True)


def _sweep_report(directory: Path, out: Path | None, target: str | None) -> Path:
    reproduce = reproduce_commands(SweepStore(directory).read_spec(), directory)
    written = build_sweep_report(directory, target=target, reproduce=reproduce)
    if out is not None and out.resolve() != directory.resolve():
        out.mkdir(parents=True, exist_ok=True)
        moved = out / REPORT_FILE
        moved.write_bytes(written.read_bytes())
        written.unlink()
        return moved
    return written


def _plan_report(path: Path, out: Path | None) -> Path:
    """The plan branch: `batchlab report plan.json --out DIR`, no re-measuring."""
    from batchlab.planner.plan_types import Plan
    from batchlab.report.plan_report import write_plan_report

    return write_plan_report(Plan.load(path), out if out is not None else path.parent)
