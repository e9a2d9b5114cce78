"""Kill a real `batchlab sweep` process with SIGKILL at random moments; resume; count runs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from batchlab.sweep.build import make_sweep_spec

ARGS = ["digits-mlp", "--batch-sizes", "16,32,64,128", "--max-steps", "40", "--repeats", "4"]


def _start(out, jobs):
    cmd = [sys.executable, "-m", "batchlab", "sweep", *ARGS, "--jobs", str(jobs), "--no-report"]
    cmd += ["--out", str(out)]
    # A new session, so the kill also reaches the worker processes of --jobs 2.
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _lines(path):
    return path.read_bytes().split(b"\n") if path.exists() else []


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_records_every_run_exactly_once(tmp_path):
    out = tmp_path / "sw"
    results = out / "results.jsonl"
    rng = random.Random(0)
    kills = 0
    progress = []
    for jobs in (1, 2, 1, 1):
        before = len([x for x in _lines(results) if x])
        proc = _start(out, jobs)
        deadline = time.monotonic() + 60
        # Wait until this attempt has stored a run (so every attempt makes progress), then
        # kill it at a random moment of the runs that follow.
        while proc.poll() is None and time.monotonic() < deadline:
            if len([x for x in _lines(results) if x]) > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        progress.append(len([x for x in _lines(results) if x]))
        if proc.returncode == 0:
            break  # it finished before we could kill it: the rest is the resume check
    assert kills >= 3, f"the sweep finished too soon to be killed ({progress})"
    assert progress[-1] < 16, progress  # work was left for the resume

    final = _start(out, 1)
    # Generous: this checks what is recorded, not speed, and the 2 cores may be shared
    # (on 2026-11-29, at load ~16, the resume of the last ~11 runs took over 120 s).
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err.decode()

    expected = sorted(
        r.run_id
        for r in make_sweep_spec(
            "digits-mlp", batch_sizes="16,32,64,128", max_steps=40, repeats=4
        ).runs
    )
    lines = [x for x in _lines(results) if x]
    ids = [json.loads(x)["run_id"] for x in lines]  # every line is whole JSON
    assert sorted(ids) == expected, f"runs after each kill: {progress}"
    assert results.read_bytes().endswith(b"\n")
