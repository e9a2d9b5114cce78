"""The results store: `DIR/sweep.json` (the spec) and `DIR/results.jsonl` (one line per run).

`results.jsonl` is append-only. Each finished run is one JSON line, written with a single
`write` and then flushed and fsynced, so a crash can only ever cut the *last* line. Such a
truncated line is detected, reported and ignored when reading; the writer cuts it off before
appending, so the file never holds a half line followed by a whole one.

Only the sweep's parent process writes (workers return records to it), and a sweep holds
an OS lock on `DIR/sweep.lock` for its whole life (`SweepStore.lock`), so no two writers ever
race on the files: a second sweep on the same directory is refused, and a run is never run
or recorded twice. The one exception is deliberate: a `failed` run is retried on resume, and
its new record supersedes the failed one.

A line that is not a whole, well-typed run record (cut off, foreign, a field of the wrong
type) is skipped with a warning, so one bad line never blocks a resume or a report.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.errors import SweepError
from batchlab.history import History
from batchlab.results import JsonResult, type_problems
from batchlab.sweep.spec import RunSpec, SweepSpec

SPEC_FILE = "sweep.json"
RESULTS_FILE = "results.jsonl"
LOCK_FILE = "sweep.lock"
RUN_STATUSES = ("ok", "diverged", "failed")


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
        self.lock_path = self.directory / LOCK_FILE

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
        try:
            with open(tmp, "w") as f:
                f.write(spec.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # e.g. a full disk: leave nothing half-written behind
            tmp.unlink(missing_ok=True)
            raise SweepError(
                f"cannot write {self.spec_path} ({exc.strerror}); free space or pass another "
                "`out_dir`",
                param="out_dir",
            ) from None
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
        position: dict[str, int] = {}  # run_id -> index in records
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            record, problem = _parse_record(raw)
            if record is None:
                warnings.append(
                    f"{RESULTS_FILE} line {number} is not a run record ({problem}); ignored"
                )
                continue
            index = position.get(record.run_id)
            if index is None:
                position[record.run_id] = len(records)
                records.append(record)
            elif records[index].status == "failed":
                records[index] = record  # a retry of a failed run supersedes it
            else:
                warnings.append(
                    f"{RESULTS_FILE} line {number} repeats run {record.run_id}; kept the first"
                )
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
        """Append one record as one line: a single write, then flush and fsync.

        A write that fails part-way (a full disk) is cut back off before the `OSError`
        propagates, so the file holds only whole lines; were even that to fail, the reader
        ignores the partial line and the next sweep cuts it (`cut_truncated_tail`).
        """
        line = (json.dumps(record.to_dict(), separators=(",", ":")) + "\n").encode()
        fd = os.open(self.results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:  # os.write may write less than asked for very large lines
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)

    # -- ownership ----------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Own this directory while the block runs: an OS lock on `sweep.lock`.

        `fcntl.flock` is released by the kernel when the process dies, even by `kill -9`,
        so a killed sweep never leaves a stale lock behind; the file itself stays (deleting
        it would let a second sweep lock a fresh file while a waiter holds the old one).
        A second sweep gets a `SweepError` naming the owner's pid.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SweepError(
                f"cannot use {str(self.directory)!r} as a sweep directory ({exc.strerror}); "
                "pass another `out_dir`",
                param="out_dir",
            ) from None
        try:
            _flock_or_refuse(fd, self.directory)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the lock


def _parse_record(raw: bytes) -> tuple[RunRecord | None, str]:
    """One results line as a record, or None and what is wrong with it."""
    try:
        record = RunRecord.from_dict(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, type(exc).__name__
    except (TypeError, KeyError, ValueError, AttributeError) as exc:  # a field's wrong shape
        return None, f"{type(exc).__name__}: {str(exc)[:120]}"
    problems = type_problems(record, limit=1)
    if not problems and record.status not in RUN_STATUSES:
        problems = [f"status: expected one of {', '.join(RUN_STATUSES)}, got {record.status!r}"]
    return (None, problems[0]) if problems else (record, "")


def _flock_or_refuse(fd: int, directory: Path) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    owner = "unknown"
    for _ in range(20):  # the owner writes its pid just after it locks
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            owner = text
            break
        time.sleep(0.05)
    raise SweepError(
        f"another sweep (pid {owner}) owns {directory}; wait for it or use another `out_dir`",
        param="out_dir",
    )


def load_sweep(directory: str | Path) -> tuple[SweepSpec, StoreContents]:
    """The spec and the records of a sweep directory, read-only."""
    store = SweepStore(directory)
    return store.read_spec(), store.read()
