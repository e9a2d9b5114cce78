"""Max-batch search on a real GPU with real out-of-memory errors: batchlab vs Lightning vs Accelerate.

`torch.cuda.set_per_process_memory_fraction` caps the caching allocator, so a step above
the cap raises a real `torch.OutOfMemoryError` (the GPU itself has far more memory than
these small tasks could use). Every method then searches for the largest batch:

- batchlab told the cap (`memory_budget=CAP`, default 10% margin, and margin 0);
- batchlab not told (its default budget is the card's free memory, far above the cap),
  so only real OOMs can stop it: this checks the OOM back-off;
- Lightning's `Tuner.scale_batch_size` (binsearch) and Accelerate's
  `find_executable_batch_size` (from 8192), both on real OOMs.

The true maximum is found by bisection over real training steps (two steps per batch
size, so the optimizer state exists). Each search runs in a fresh process; a later run of
200 steps at each found batch, in another fresh process, tells whether a user's training
at that batch would have died.

    python benchmarks/probe_cuda.py [--tasks charlm:1GiB mnist1d-cnn:80MiB]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import batchlab
from batchlab.data import Batcher
from batchlab.measure.sizes import format_bytes, parse_size
from batchlab.step import TrainStep

sys.path.insert(0, str(Path(__file__).parent))
from probe_vs_lightning import run_lightning as lightning_search  # noqa: E402

CUDA = torch.device("cuda")
LATER_STEPS = 200


@dataclass
class Row:
    method: str
    steps: int | None
    seconds: float
    batch: int | None
    note: str = ""
    later: str = "-"


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_steps(task: batchlab.Task, batch: int, steps: int) -> tuple[bool, int, int | None]:
    """Train `steps` steps at `batch` on CUDA: (no OOM, peak allocated bytes, step that died)."""
    batch = min(batch, task.num_train)
    _free()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)
    died = None
    try:
        model = task.model().to(CUDA)
        optimizer = task.optimizer(model.parameters(), task.lr)
        step = TrainStep(
            model, optimizer, task.loss, Batcher(task.train_data, CUDA), micro_batch_size=batch,
            device=CUDA,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        for i in range(1, steps + 1):
            died = i
            step(torch.randperm(task.num_train, generator=gen)[:batch])
        torch.cuda.synchronize()
        died = None
    except torch.OutOfMemoryError:
        pass
    finally:
        model = optimizer = step = None  # noqa: F841
        _free()
    return died is None, torch.cuda.max_memory_allocated(), died


def true_max(task: batchlab.Task) -> tuple[int, int]:
    """Largest batch whose first two steps fit under the cap; and the steps spent finding it."""
    lo, hi, spent = 0, task.num_train + 1, 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, _, _ = run_steps(task, mid, 2)
        spent += 2
        lo, hi = (mid, hi) if ok else (lo, mid)
    return lo, spent


def run_batchlab(task, budget: int | None, margin: float, label: str) -> Row:
    t0 = time.perf_counter()
    probe = batchlab.probe_memory(task, device="cuda", memory_budget=budget, margin=margin)
    note = f"tried {' '.join(map(str, probe.tried))}; verified={probe.verified}"
    if probe.warnings:
        note += "; " + " / ".join(probe.warnings)
    return Row(label, probe.probe_steps, time.perf_counter() - t0, probe.max_batch_size, note)


def run_lightning(task) -> Row:
    """Lightning's binsearch, the harness of benchmarks/probe_vs_lightning.py, on real OOMs."""
    found = lightning_search(task, "binsearch", None, 0, accelerator="gpu")
    return Row("Lightning binsearch", found.steps, found.seconds, found.batch)


def run_accelerate(task, start: int = 8192) -> Row:
    from accelerate.utils import find_executable_batch_size

    calls: list[int] = []

    @find_executable_batch_size(starting_batch_size=start)
    def one_step(batch_size):
        calls.append(batch_size)
        ok, _, _ = run_steps(task, batch_size, 2)
        if not ok:
            raise torch.OutOfMemoryError("CUDA out of memory. (re-raised from a 2-step trial)")
        return batch_size

    t0 = time.perf_counter()
    found = one_step()
    return Row(f"Accelerate x0.9 from {start}", 2 * len(calls), time.perf_counter() - t0, found)


METHODS = {
    "true": "True max (bisection over real 2-step runs)",
    "batchlab10": "batchlab, told the cap (margin 10%)",
    "batchlab0": "batchlab, told the cap (margin 0)",
    "batchlab_untold": "batchlab, not told (real OOM back-off)",
    "lightning": "Lightning binsearch",
    "accelerate": "Accelerate x0.9 from 8192",
}


def one(task_name: str, cap_text: str, method: str, later_batch: int | None) -> dict:
    """One method (or one later run) in this fresh process, under the allocator cap."""
    task = batchlab.load_task(task_name)
    cap = parse_size(cap_text)
    torch.cuda.set_per_process_memory_fraction(
        cap / torch.cuda.get_device_properties(0).total_memory
    )
    if later_batch is not None:
        ok, peak, died = run_steps(task, later_batch, LATER_STEPS)
        return {"ok": ok, "peak": peak, "died": died}
    if method == "true":
        t0 = time.perf_counter()
        best, spent = true_max(task)
        return {"batch": best, "steps": spent, "seconds": time.perf_counter() - t0, "note": ""}
    run = {
        "batchlab10": lambda: run_batchlab(task, cap, 0.1, METHODS[method]),
        "batchlab0": lambda: run_batchlab(task, cap, 0.0, METHODS[method]),
        "batchlab_untold": lambda: run_batchlab(task, None, 0.1, METHODS[method]),
        "lightning": lambda: run_lightning(task),
        "accelerate": lambda: run_accelerate(task),
    }[method]
    r = run()
    return {"batch": r.batch, "steps": r.steps, "seconds": r.seconds, "note": r.note}


def in_fresh_process(*args: str) -> dict:
    """Each search and each later run gets its own process: no cache or leak carries over."""
    proc = subprocess.run(
        [sys.executable, __file__, "--one", *args], capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"batch": None, "steps": None, "seconds": 0.0, "note": proc.stderr[-300:]}
    return json.loads(lines[-1])


def compare(task_name: str, cap_text: str) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    truth = in_fresh_process(task_name, cap_text, "true")
    best = truth["batch"]
    print(
        f"\n### {task_name}, allocator capped at {format_bytes(parse_size(cap_text))} "
        f"(of {format_bytes(total)} on {torch.cuda.get_device_name()})\n\n"
        f"True max (bisection over real 2-step runs, fresh process): {best} "
        f"({truth['steps']} steps, {truth['seconds']:.0f}s).\n"
    )
    print(f"| method | steps | wall time | batch found | found / true | {LATER_STEPS}-step run |")
    print("|---|---:|---:|---:|---:|---|")
    notes = []
    for method, label in METHODS.items():
        if method == "true":
            continue
        r = in_fresh_process(task_name, cap_text, method)
        later = "-"
        if r["batch"]:
            run = in_fresh_process(task_name, cap_text, method, str(r["batch"]))
            if run.get("ok"):
                later = f"{format_bytes(run['peak'])}: fits all {LATER_STEPS} steps"
            elif "ok" in run:
                later = f"**OOM at step {run['died']}**"
            else:
                later = "error: " + run["note"]
        ratio = "-" if not r["batch"] or not best else f"{r['batch'] / best:.3f}"
        steps = "-" if r["steps"] is None else r["steps"]
        print(f"| {label} | {steps} | {r['seconds']:.2f}s | {r['batch']} | {ratio} | {later} |")
        if r["note"]:
            notes.append(f"- {label}: {r['note']}")
    print("\n".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tasks", nargs="+", default=["charlm:1GiB", "mnist1d-cnn:80MiB"], help="TASK:CAP pairs"
    )
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    warnings.filterwarnings("ignore")
    with contextlib.suppress(ImportError):
        import lightning  # noqa: F401  (it sets its loggers to INFO on import)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.one:
        task_name, cap, method, *later = args.one
        print(json.dumps(one(task_name, cap, method, int(later[0]) if later else None)))
        return
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for spec in args.tasks:
        name, _, cap = spec.partition(":")
        compare(name, cap)


if __name__ == "__main__":
    main()
