"""The append-only store: fsync, truncated lines, duplicates, spec mismatch, resume."""

import json
import os

import pytest

from batchlab.errors import SweepError
from batchlab.sweep.build import make_sweep_spec
from batchlab.sweep.runner import RunContext, execute_run, run_sweep
from batchlab.sweep.store import RESULTS_FILE, RunRecord, SweepStore, load_sweep


@pytest.fixture(scope="module")
def spec():
    return make_sweep_spec(
        "digits-mlp", batch_sizes="16,64,256", max_steps=6, sharpness_examples=64
    )


@pytest.fixture(scope="module")
def records(spec):
    context = RunContext.from_spec(spec)
    return [execute_run(spec.task_ref, run, context) for run in spec.runs]


def test_append_writes_one_fsynced_line_per_record(tmp_path, spec, records, monkeypatch):
    store = SweepStore(tmp_path)
    store.prepare(spec)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    for r in records:
        store.append(r)
    assert len(synced) == len(records)
    lines = (tmp_path / RESULTS_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(records) + 1
    contents = store.read()
    assert contents.records == tuple(records) and contents.warnings == ()
    assert RunRecord.from_json(records[0].to_json()) == records[0]


def test_a_truncated_last_line_is_reported_ignored_and_cut_before_appending(
    tmp_path, spec, records
):
    store = SweepStore(tmp_path)
    store.prepare(spec)
    store.append(records[0])
    store.append(records[1])
    whole = (tmp_path / RESULTS_FILE).read_bytes()
    partial = json.dumps(records[2].to_dict()).encode()[:500]
    (tmp_path / RESULTS_FILE).write_bytes(whole + partial)  # killed mid-write

    contents = store.read()
    assert [r.run_id for r in contents.records] == [records[0].run_id, records[1].run_id]
    assert contents.truncated_bytes == 500
    assert "truncated line (500 bytes" in contents.warnings[0]
    assert (tmp_path / RESULTS_FILE).read_bytes() == whole + partial  # reading changes nothing

    assert store.cut_truncated_tail() == 500
    assert (tmp_path / RESULTS_FILE).read_bytes() == whole
    store.append(records[2])
    again = store.read()
    assert again.warnings == () and len(again.records) == 3


def test_a_file_that_is_one_partial_line_is_cut_to_empty(tmp_path, spec):
    store = SweepStore(tmp_path)
    store.prepare(spec)
    (tmp_path / RESULTS_FILE).write_bytes(b'{"run_id": "ladd')
    assert store.cut_truncated_tail() == 16
    assert (tmp_path / RESULTS_FILE).read_bytes() == b""


def test_bad_and_repeated_lines_are_skipped_with_a_warning(tmp_path, spec, records):
    store = SweepStore(tmp_path)
    store.prepare(spec)
    store.append(records[0])
    with open(tmp_path / RESULTS_FILE, "ab") as f:
        f.write(b"not json\n")
    store.append(records[0])
    contents = store.read()
    assert len(contents.records) == 1
    assert any("line 2 is not a run record" in w for w in contents.warnings)
    assert any("line 3 repeats run" in w for w in contents.warnings)


def test_a_different_spec_is_refused_and_the_same_one_resumes(tmp_path, spec):
    store = SweepStore(tmp_path)
    assert store.prepare(spec) is False
    assert (
        store.prepare(
            make_sweep_spec(
                "digits-mlp", batch_sizes="16,64,256", max_steps=6, sharpness_examples=64
            )
        )
        is True
    )
    other = make_sweep_spec("digits-mlp", batch_sizes="16,64", max_steps=6, sharpness_examples=64)
    with pytest.raises(SweepError) as info:
        store.prepare(other)
    message = str(info.value)
    assert (
        "holds a different sweep" in message
        and "batch_sizes" in message
        and "new `out_dir`" in message
    )
    assert "\n" not in message


def test_results_without_a_spec_are_not_a_sweep_directory(tmp_path, spec):
    (tmp_path / RESULTS_FILE).write_text('{"x": 1}\n')
    with pytest.raises(SweepError) as info:
        SweepStore(tmp_path).prepare(spec)
    assert "not a sweep directory" in str(info.value)
    with pytest.raises(SweepError) as info:
        load_sweep(tmp_path / "nowhere")
    assert "expected a sweep directory" in str(info.value)


class CountingBackend:
    """A backend that runs in-process and remembers which runs it was given."""

    name = "counting"

    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def run(self, task, runs, context):
        for run in runs:
            if self.fail_after is not None and len(self.calls) == self.fail_after:
                raise KeyboardInterrupt  # the user stops the sweep mid-way
            self.calls.append(run.run_id)
            yield execute_run(task, run, context)


def test_resume_skips_finished_runs_and_redoes_the_cut_one(tmp_path, spec):
    first = CountingBackend(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path, backend=first)
    assert len(SweepStore(tmp_path).read().records) == 2
    # The second record was being written when the process died: only half of it is there.
    path = tmp_path / RESULTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])

    second = CountingBackend()
    result = run_sweep(spec, tmp_path, backend=second)
    ids = [r.run_id for r in spec.runs]
    assert second.calls == ids[1:]
    assert result.resumed and result.runs_skipped == 1 and result.runs_done == 2
    assert "truncated" in result.store_warnings[0]
    assert [r.run_id for r in SweepStore(tmp_path).read().records] == ids
    third = CountingBackend()
    assert run_sweep(spec, tmp_path, backend=third).runs_done == 0 and third.calls == []
