"""A sweep survives one bad event: a second sweep, a dead worker, a full disk, bad lines,
failed runs. After each, every run is recorded exactly once (a retried failure supersedes)."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchlab.cli import main
from batchlab.errors import SweepError
from batchlab.sweep.build import make_sweep_spec
from batchlab.sweep.pool import dead_worker_record, run_isolated
from batchlab.sweep.runner import RunContext, execute_run, run_sweep
from batchlab.sweep.store import LOCK_FILE, RESULTS_FILE, RunRecord, SweepStore, load_sweep

KILLER = str(Path(__file__).parent / "fault_tasks.py") + ":killer"


@pytest.fixture(scope="module")
def spec():
    return make_sweep_spec(
        "digits-mlp", batch_sizes="16,64,256", max_steps=4, sharpness="none", repeats=1
    )


@pytest.fixture(scope="module")
def records(spec):
    context = RunContext.from_spec(spec)
    return [execute_run(spec.task_ref, run, context) for run in spec.runs]


class CountingBackend:
    """Runs in-process and remembers which runs it was given."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def run(self, task, runs, context):
        for run in runs:
            self.calls.append(run.run_id)
            yield execute_run(task, run, context)


def _ids(path):
    lines = [x for x in (Path(path) / RESULTS_FILE).read_bytes().split(b"\n") if x]
    return [json.loads(x)["run_id"] for x in lines]


# -- one owner per sweep directory --------------------------------------------------------


def test_a_second_sweep_on_a_held_directory_is_refused_with_the_owners_pid(tmp_path, spec):
    backend = CountingBackend()
    with SweepStore(tmp_path).lock():
        with pytest.raises(SweepError) as info:
            run_sweep(spec, tmp_path, backend=backend)
    message = str(info.value)
    assert f"another sweep (pid {os.getpid()}) owns {tmp_path}" in message
    assert "wait for it or use another `out_dir`" in message and info.value.param == "out_dir"
    assert backend.calls == [] and not (tmp_path / "sweep.json").exists()
    run_sweep(spec, tmp_path, backend=backend)  # released: the lock dies with its holder
    assert sorted(backend.calls) == sorted(r.run_id for r in spec.runs)


SWEEP_ARGS = ["digits-mlp", "--batch-sizes", "16,32,64", "--max-steps", "30"]
SWEEP_ARGS += ["--repeats", "2", "--sharpness", "none", "--jobs", "1", "--no-report"]


def _start_sweep(out, args=SWEEP_ARGS):
    cmd = [sys.executable, "-m", "batchlab", "sweep", *args, "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_two_concurrent_sweeps_never_run_or_record_a_run_twice(tmp_path):
    expected = sorted(
        r.run_id
        for r in make_sweep_spec(
            "digits-mlp", batch_sizes="16,32,64", max_steps=30, repeats=2, sharpness="none"
        ).runs
    )
    # Started together: one owns the directory, the other is refused (or, if the first
    # finished before it looked, finds nothing left to do).
    together = tmp_path / "together"
    first, second = _start_sweep(together), _start_sweep(together)
    outcomes = [(p.wait(timeout=300), p.stderr.read().decode()) for p in (first, second)]
    assert sorted(code for code, _ in outcomes) in ([0, 0], [0, 2]), outcomes
    for code, err in outcomes:
        if code == 2:
            assert err.count("\n") == 1 and "another sweep (pid " in err, err
            assert "wait for it or use another --out" in err and "Traceback" not in err
    assert sorted(_ids(together)) == expected

    # Started apart: the second starts while the first is mid-way, and must be refused. The
    # first gets far more work than the second needs to start (importing torch takes seconds),
    # so the race is real on a quiet machine and on a busy one.
    long_args = [*SWEEP_ARGS]
    long_args[long_args.index("--max-steps") + 1] = "400"
    long_args[long_args.index("--repeats") + 1] = "4"
    long_expected = sorted(
        r.run_id
        for r in make_sweep_spec(
            "digits-mlp", batch_sizes="16,32,64", max_steps=400, repeats=4, sharpness="none"
        ).runs
    )
    apart = tmp_path / "apart"
    first = _start_sweep(apart, long_args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        (apart / RESULTS_FILE).exists() and (apart / RESULTS_FILE).stat().st_size
    ):
        time.sleep(0.05)
    second = _start_sweep(apart, long_args)
    second_code, second_err = second.wait(timeout=120), second.stderr.read().decode()
    assert first.poll() is None, "the first sweep finished too soon to be raced"
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    owner = (apart / LOCK_FILE).read_text().strip()
    assert second_code == 2 and f"another sweep (pid {owner}) owns" in second_err, second_err
    assert sorted(_ids(apart)) == long_expected


# -- a dead worker --------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_worker_fails_its_run_with_the_reason_and_the_sweep_goes_on(tmp_path):
    spec = make_sweep_spec(KILLER, batch_sizes="8,24,32,48", max_steps=3, sharpness="none")
    result = run_sweep(spec, tmp_path, jobs=2)
    records = {r.spec.batch_size: r for r in load_sweep(tmp_path)[1].records}
    assert sorted(_ids(tmp_path)) == sorted(r.run_id for r in spec.runs)  # each once
    assert {b: r.status for b, r in records.items()} == {
        8: "ok",
        24: "failed",
        32: "ok",
        48: "ok",
    }
    assert result.failed == 1 and result.runs_done == 4
    error = records[24].error
    assert error.startswith("WorkerDied: the process running this run died (killed by signal")
    assert "SIGKILL" in error and "too much memory" in error


def test_a_worker_that_exits_137_is_a_failed_run_not_a_crash(monkeypatch):
    monkeypatch.setenv("BATCHLAB_TEST_DEATH", "exit")
    spec = make_sweep_spec(KILLER, batch_sizes="24", max_steps=2, sharpness="none", repeats=1)
    record = run_isolated(execute_run, KILLER, spec.runs[0], RunContext.from_spec(spec))
    assert record.status == "failed" and "(exit code 137)" in record.error
    assert RunRecord.from_json(record.to_json()) == record
    assert "(killed by signal SIGKILL)" in dead_worker_record(spec.runs[0], -9).error


# -- a full disk ------------------------------------------------------------------------


def test_a_full_disk_gives_one_line_keeps_the_stored_runs_and_resumes_cleanly(
    tmp_path, spec, monkeypatch
):
    real_write = os.write
    appended = []

    def write_until_full(fd, data):
        results = tmp_path / RESULTS_FILE
        if not results.exists() or os.fstat(fd).st_ino != results.stat().st_ino:
            return real_write(fd, data)
        appended.append(len(data))
        if len(appended) < 2:
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))  # half a line reaches the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write_until_full)
    with pytest.raises(SweepError) as info:
        run_sweep(spec, tmp_path, backend=CountingBackend())
    monkeypatch.undo()
    message = str(info.value)
    assert "No space left on device" in message and "\n" not in message
    assert "the runs stored so far (1) are kept" in message
    data = (tmp_path / RESULTS_FILE).read_bytes()
    assert data.endswith(b"\n") and _ids(tmp_path) == [spec.runs[0].run_id]  # no half line

    second = CountingBackend()
    result = run_sweep(spec, tmp_path, backend=second)
    assert second.calls == [r.run_id for r in spec.runs[1:]] and result.store_warnings == ()
    assert _ids(tmp_path) == [r.run_id for r in spec.runs]


def test_a_full_disk_while_writing_the_spec_leaves_nothing_half_written(
    tmp_path, spec, monkeypatch
):
    import builtins

    real_open = builtins.open

    def open_on_a_full_disk(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if str(file).endswith(".json.tmp"):
            handle.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return handle

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    with pytest.raises(SweepError, match="No space left on device"):
        run_sweep(spec, tmp_path, backend=CountingBackend())
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    assert run_sweep(spec, tmp_path, backend=CountingBackend()).runs_done == len(spec.runs)


# -- bad lines ----------------------------------------------------------------------------


def _wrong(record, path, value):
    """The record's dict with the field at `path` (dotted) set to `value`."""
    data = record.to_dict()
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    target[last] = value
    return data


WRONG_TYPES = [
    ("history", [1, 2]),
    ("history", "a history"),
    ("spec", "16"),
    ("spec.batch_size", "16"),
    ("spec.lr", [0.1]),
    ("status", 5),
    ("status", "finished"),
    ("run_id", 7),
    ("train_loss", "low"),
    ("train_metrics", [0.9]),
    ("history.train_loss", "abc"),
    ("history.evals", {"step": 1}),
    ("seconds", {"total": "fast"}),
]


@pytest.mark.parametrize(("path", "value"), WRONG_TYPES)
def test_a_wrong_typed_record_is_skipped_with_a_warning(tmp_path, spec, records, path, value):
    store = SweepStore(tmp_path)
    store.prepare(spec)
    store.append(records[0])
    with open(tmp_path / RESULTS_FILE, "a") as f:
        f.write(json.dumps(_wrong(records[1], path, value)) + "\n")
    store.append(records[2])
    contents = store.read()
    assert [r.run_id for r in contents.records] == [records[0].run_id, records[2].run_id]
    assert len(contents.warnings) == 1
    assert contents.warnings[0].startswith(f"{RESULTS_FILE} line 2 is not a run record (")


def test_wrong_typed_and_truncated_lines_block_neither_resume_nor_report(
    tmp_path, spec, records, capsys
):
    store = SweepStore(tmp_path)
    store.prepare(spec)
    lines = [
        records[0].to_json(indent=None),
        json.dumps(_wrong(records[1], "history", [1])),  # valid JSON, wrong type
        records[1].to_json(indent=None)[:-40],  # truncated, in the middle of the file
        "[1, 2]",
        "17",
        records[2].to_json(indent=None)[:300],  # truncated last line
    ]
    (tmp_path / RESULTS_FILE).write_text("\n".join(lines))

    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    backend = CountingBackend()
    result = run_sweep(spec, tmp_path, backend=backend)
    assert backend.calls == [records[1].run_id, records[2].run_id]
    assert (
        len(result.store_warnings) == 5
        and "truncated line (300 bytes" in (result.store_warnings[-1])
    )
    contents = store.read()
    assert sorted(r.run_id for r in contents.records) == sorted(r.run_id for r in records)
    assert len(contents.warnings) == 4  # the bad middle lines stay, ignored; the tail is cut


# -- failed runs are retried ------------------------------------------------------------


def _failed(record):
    return RunRecord(run_id=record.run_id, spec=record.spec, status="failed", error="X: boom")


def test_failed_runs_are_retried_on_resume_and_the_retry_supersedes(tmp_path, spec, records):
    store = SweepStore(tmp_path)
    store.prepare(spec)
    for record in (records[0], _failed(records[1]), records[2]):
        store.append(record)

    kept = CountingBackend()
    result = run_sweep(spec, tmp_path, backend=kept, retry_failed=False)
    assert kept.calls == [] and result.runs_retried == 0
    assert store.read().records[1].status == "failed"

    retry = CountingBackend()
    result = run_sweep(spec, tmp_path, backend=retry)
    assert retry.calls == [records[1].run_id]
    assert result.runs_retried == 1 and result.runs_skipped == 2 and result.runs_done == 1
    contents = store.read()
    assert [r.run_id for r in contents.records] == [r.run_id for r in records]
    assert [r.status for r in contents.records] == ["ok", "ok", "ok"]
    assert contents.warnings == ()
    assert run_sweep(spec, tmp_path, backend=CountingBackend()).runs_done == 0


def test_no_retry_failed_on_the_cli_keeps_failed_runs(capsys, tmp_path, spec, records):
    store = SweepStore(tmp_path)
    store.prepare(spec)
    for record in (records[0], _failed(records[1]), records[2]):
        store.append(record)
    args = ["sweep", "digits-mlp", "--batch-sizes", "16,64,256", "--max-steps", "4"]
    args += ["--repeats", "1", "--sharpness", "none", "--jobs", "1", "--no-report"]
    args += ["--out", str(tmp_path), "--no-retry-failed"]
    assert main(args) == 0
    assert "0 runs in" in capsys.readouterr().out
    assert [r.status for r in store.read().records] == ["ok", "failed", "ok"]
