"""The results store: `DIR/sweep.json` (the spec) and `DIR/results.jsonl` (one line per run).

`results.jsonl` is append-only. Each finished run is one JSON line, written with a single
`write` and then flushed and fsynced, so a crash can only ever cut the *last* line. Such a
truncated line is detected, reported and ignored when reading; the writer cuts it off before
appending, so the file never holds a half line followed by a whole one.

Only the sweep's parent process writes (workers return records to it), so no two writers
ever race on the file, and a run is recorded at most once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.errors import SweepError
from batchlab.history import History
from batchlab.results import JsonResult
from batchlab.sweep.spec import RunSpec, SweepSpec

SPEC_FILE = "sweep.json"
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class RunRecord(JsonResult):
    """What one finished run measured. One line of `results.jsonl`.

    `history.extras` holds the per-run measurements taken during training:
    `distance_from_init` and `grad_norm` (see `batchlab.measure.run_stats`).
    """

    run_id: str
    spec: RunSpec
    status: str  # "ok", "diverged" (non-finite loss) or "failed" (the run raised)
    history: History | None = None
    train_loss: float | None = None  # final loss over the full training set
    train_metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"acc": 0.99}
    sharpness: dict[str, Any] = field(default_factory=dict)  # name -> Sharpness dict
    seconds: dict[str, float] = field(default_factory=dict)  # wall time, by phase
    error: str | None = None
    worker: str = ""  # host:pid that ran it


@dataclass(frozen=True)
class StoreContents:
    """What `SweepStore.read` found."""

    records: tuple[RunRecord, ...]
    warnings: tuple[str, ...]
    truncated_bytes: int  # size of a cut-off last line (0 when the file is whole)

    @property
    def run_ids(self) -> set[str]:
        return {r.run_id for r in self.records}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SweepStore:
    """The files of one sweep directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.spec_path = self.directory / SPEC_FILE
        self.results_path = self.directory / RESULTS_FILE

    # -- the spec ---------------------------------------------------------------------

    def read_spec(self) -> SweepSpec:
        if not self.spec_path.is_file():
            raise SweepError(
                f"expected a sweep directory with {SPEC_FILE}, got {str(self.directory)!r}; "
                "create one with `run_sweep` (the `batchlab sweep` command)"
            )
        try:
            return SweepSpec.from_json(self.spec_path.read_text())
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise SweepError(
                f"{self.spec_path} is not a sweep spec this version can read ({exc}); "
                "use a new `out_dir`"
            ) from None

    def prepare(self, spec: SweepSpec) -> bool:
        """Create the directory for `spec`, or check it holds the same sweep.

        Returns True when the directory already held this sweep (a resume). A different
        spec is refused: mixing two sweeps in one store would make its numbers meaningless.
        """
        if self.spec_path.exists():
            existing = self.read_spec()
            if existing != spec:
                diff = ", ".join(existing.differences(spec))
                raise SweepError(
                    f"{self.directory} holds a different sweep (differs in: {diff}); re-run the "
                    f"command that made it (see {SPEC_FILE}) to resume, or pass a new `out_dir`"
                )
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.results_path.exists() and self.results_path.stat().st_size > 0:
            raise SweepError(
                f"{self.results_path} exists but {SPEC_FILE} does not; this is not a sweep "
                "directory batchlab made. Pass a new `out_dir`"
            )
        tmp = self.spec_path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            f.write(spec.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.spec_path)  # atomic: sweep.json is either absent or whole
        self.results_path.touch()
        _fsync_dir(self.directory)
        return False

    # -- the results ------------------------------------------------------------------

    def read(self) -> StoreContents:
        """Every complete record, in the order written. Never modifies the files."""
        if not self.results_path.exists():
            return StoreContents((), (), 0)
        data = self.results_path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        warnings: list[str] = []
        records: list[RunRecord] = []
        seen: set[str] = set()
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                record = RunRecord.from_dict(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as exc:
                warnings.append(
                    f"{RESULTS_FILE} line {number} is not a run record ({type(exc).__name__}); ignored"
                )
                continue
            if record.run_id in seen:
                warnings.append(
                    f"{RESULTS_FILE} line {number} repeats run {record.run_id}; kept the first"
                )
                continue
            seen.add(record.run_id)
            records.append(record)
        if tail:
            warnings.append(
                f"{RESULTS_FILE} ends in a truncated line ({len(tail)} bytes, a run killed while "
                "it was being written); ignored, and that run will be redone"
            )
        return StoreContents(tuple(records), tuple(warnings), len(tail))

    def cut_truncated_tail(self) -> int:
        """Drop a partial last line so appends start on a fresh line. Returns bytes cut."""
        if not self.results_path.exists():
            return 0
        with open(self.results_path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            # Walk back to the last newline; a whole file ends with one.
            pos, chunk = size, 4096
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                block = f.read(pos - start)
                idx = block.rfind(b"\n")
                if idx >= 0:
                    keep = start + idx + 1
                    break
                pos = start
            else:
                keep = 0
            if keep == size:
                return 0
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            return size - keep

    def append(self, record: RunRecord) -> None:
        """Append one record as one line: a single write, then flush and fsync."""
        line = (json.dumps(record.to_dict(), separators=(",", ":")) + "\n").encode()
        fd = os.open(self.results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:  # os.write may write less than asked for very large lines
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)


def load_sweep(directory: str | Path) -> tuple[SweepSpec, StoreContents]:
    """The spec and the records of a sweep directory, read-only."""
    store = SweepStore(directory)
    return store.read_spec(), store.read()
