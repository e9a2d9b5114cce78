"""Sweep wall time with `--jobs 1` vs `--jobs 2`, and the bookkeeping cost per run.

One fixed small sweep (mnist1d-mlp, 6 batch sizes, a fixed step budget) is run three ways,
interleaved (A B C A B C ...) so machine noise hits all alike, each from an empty directory:
`--jobs 1` in-process with torch's default threads (one per core), `--jobs 1` with one
thread, and `--jobs 2` (two worker processes, one thread each). Reported:

- wall seconds of each, their medians and the ratio jobs1 / jobs2 (the parallel speedup,
  worker start-up included);
- bookkeeping per run: sweep wall time minus the time spent inside the runs, divided by the
  number of runs (spec, store, fsync, scheduling), plus the median cost of one fsynced
  append of a real record;
- what the per-run measurements cost beside training: full train-set evaluation and the
  two sharpness measures, as a fraction of the training seconds.

    .venv/bin/python benchmarks/sweep_jobs.py [--repeats 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from batchlab.sweep.build import make_sweep_spec
from batchlab.sweep.runner import cpu_count, run_sweep
from batchlab.sweep.store import SweepStore


def one_sweep(spec, jobs: int) -> tuple[float, list]:
    out = Path(tempfile.mkdtemp(prefix=f"sweep_jobs{jobs}_"))
    try:
        t0 = time.perf_counter()
        run_sweep(spec, out, jobs=jobs)
        wall = time.perf_counter() - t0
        return wall, list(SweepStore(out).read().records)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def append_seconds(record, n: int = 20) -> float:
    out = Path(tempfile.mkdtemp(prefix="sweep_append_"))
    try:
        store = SweepStore(out)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            store.append(record)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--task", default="mnist1d-mlp")
    args = parser.parse_args()

    spec = make_sweep_spec(args.task, batch_sizes="16,32,64,128,256,512", max_steps=args.steps)
    print(f"sweep: {args.task}, {len(spec.runs)} runs x {args.steps} steps; {cpu_count()} cores")
    configs = {
        "jobs 1 (default threads)": (1, None),
        "jobs 1 (1 thread)": (1, 1),
        "jobs 2": (2, None),
    }
    walls: dict[str, list[float]] = {name: [] for name in configs}
    overhead, records = [], []
    default_threads = torch.get_num_threads()
    for i in range(args.repeats):
        for name, (jobs, threads) in configs.items():
            torch.set_num_threads(threads or default_threads)
            wall, recs = one_sweep(spec, jobs)
            walls[name].append(wall)
            if jobs == 1 and threads == 1:
                inside = sum(r.seconds["total"] for r in recs)
                overhead.append((wall - inside) / len(recs))
                records = recs
            print(f"  repeat {i}: {name}: {wall:6.2f} s")
    torch.set_num_threads(default_threads)
    medians = {name: statistics.median(w) for name, w in walls.items()}
    for name, w in walls.items():
        spread = (max(w) - min(w)) / medians[name]
        print(f"{name}: median {medians[name]:.2f} s (spread {spread:.0%})")
    m2 = medians["jobs 2"]
    print(
        f"speedup jobs 1 (default threads) / jobs 2: {medians['jobs 1 (default threads)'] / m2:.2f}x"
    )
    print(f"speedup jobs 1 (1 thread) / jobs 2: {medians['jobs 1 (1 thread)'] / m2:.2f}x")
    print(
        f"bookkeeping per run (jobs 1, 1 thread, outside the runs): {1000 * statistics.median(overhead):.1f} ms"
    )
    print(
        f"one fsynced append of a {len(records[0].to_json(indent=None)) / 1024:.0f} KiB record: {1000 * append_seconds(records[0]):.2f} ms"
    )
    train = sum(r.seconds["train"] for r in records)
    evals = sum(r.seconds["eval"] for r in records)
    final = sum(r.seconds.get("train_eval", 0) + r.seconds.get("sharpness", 0) for r in records)
    print(
        f"per-run measurements vs training seconds: periodic val evals {evals / train:.0%}, "
        f"end-of-run train-set eval + sharpness {final / train:.0%}"
    )


if __name__ == "__main__":
    main()
