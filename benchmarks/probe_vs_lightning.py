"""Max-batch search: batchlab vs Lightning's BatchSizeFinder vs Accelerate, side by side.

For each task and memory budget, every method looks for the largest batch whose training
step fits. Reported per method: training steps spent (OOM attempts included), wall time,
the batch found against the true maximum, and whether a later 200-step run at that batch
exceeds the budget.

On a CPU there is no out-of-memory error, so Lightning's `Tuner.scale_batch_size` and
Accelerate's `find_executable_batch_size` cannot see a budget at all. Two variants are run:

- "no limit": the tools as they are on a CPU (Lightning doubles up to the dataset size);
- "simulated OOM": the training step raises `torch.OutOfMemoryError` whenever the batch
  is above the true maximum, as a device with this budget would (the exact boundary,
  so no fragmentation, which favours them).

The true maximum is found exhaustively with the measured peak (CPU profiler replay of a
full training step): bisection for the boundary, then every batch size within 10% of it
is measured, so the boundary is exact there. batchlab is run with its default 10% margin
and with margin 0 (the same target the other tools aim at).

    .venv/bin/python benchmarks/probe_vs_lightning.py [--tasks mnist1d-cnn:8MiB ...]

Needs the optional `lightning` and `accelerate` packages (skipped when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import time
import warnings
from dataclasses import dataclass

import torch

import batchlab
from batchlab.data import Batcher
from batchlab.measure.sizes import format_bytes, parse_size
from batchlab.measure.step_memory import measure_step_memory
from batchlab.step import TrainStep

CPU = torch.device("cpu")
LATER_STEPS = 200
NO_LIMIT_MAX_EXAMPLES = 4096


@dataclass
class Row:
    method: str
    steps: int | None
    seconds: float
    batch: int | None
    target: int  # the true max this method aims at (usable or hard budget)
    later_peak: int | None = None
    over_at: int | None = None
    note: str = ""


class Harness:
    """One live model + optimizer on the task, for measured steps at any batch size."""

    def __init__(self, task: batchlab.Task, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.task = task
        self.model = task.model()
        self.optimizer = task.optimizer(self.model.parameters(), task.lr)
        self.step = TrainStep(
            self.model, self.optimizer, task.loss, Batcher(task.train_data, CPU),
            micro_batch_size=1, device=CPU,
        )  # fmt: skip
        self.order = torch.randperm(task.num_train, generator=torch.Generator().manual_seed(0))
        self.cache: dict[int, int] = {}
        self.peak(2)  # warm-up: optimizer state

    def peak(self, b: int) -> int:
        if b not in self.cache:
            self.step.micro_batch_size = b
            self.cache[b] = measure_step_memory(self.step, self.order[:b]).peak_bytes
        return self.cache[b]


def true_max(h: Harness, limit_bytes: float) -> int:
    """Largest B whose measured peak fits: bisection, then every B within 10% measured."""
    n = h.task.num_train
    lo, hi = 0, n + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if h.peak(mid) <= limit_bytes:
            lo = mid
        else:
            hi = mid
    window = range(max(1, int(lo * 0.9)), min(n, int(lo * 1.1) + 1) + 1)
    fitting = [b for b in window if h.peak(b) <= limit_bytes]
    best = max(fitting, default=lo)
    above = [b for b in window if b > best and h.peak(b) <= limit_bytes]
    assert not above, f"peak not monotone near {best}: {above}"
    return best


def later_run(task: batchlab.Task, batch: int, budget: int, steps: int = LATER_STEPS):
    """Train `steps` steps at `batch`; return (highest replayed peak, step it first went over).

    Steps 1, 2, steps/2 and the last are profiled (a step's peak does not change once the
    optimizer state exists, which these samples confirm). A run that is over the budget
    at step 1 or 2 stops there: on a device with this budget it would have died.
    """
    batch = min(batch, task.num_train)
    torch.manual_seed(1)
    model = task.model()
    optimizer = task.optimizer(model.parameters(), task.lr)
    step = TrainStep(
        model, optimizer, task.loss, Batcher(task.train_data, CPU), micro_batch_size=batch,
        device=CPU,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    profiled = {1, 2, steps // 2, steps}
    worst, over_at = 0, None
    for i in range(1, steps + 1):
        idx = torch.randperm(task.num_train, generator=gen)[:batch]
        if i in profiled:
            worst = max(worst, measure_step_memory(step, idx).peak_bytes)
            if worst > budget and over_at is None:
                over_at = i
                if i <= 2:
                    break
        else:
            step(idx)
    return worst, over_at


# --- the tools -----------------------------------------------------------------------------


def run_batchlab(task, budget: int, margin: float, target: int) -> Row:
    t0 = time.perf_counter()
    probe = batchlab.probe_memory(task, device="cpu", memory_budget=budget, margin=margin)
    seconds = time.perf_counter() - t0
    return Row(
        f"batchlab (margin {margin:.0%})", probe.probe_steps, seconds, probe.max_batch_size,
        target, note="tried " + " ".join(map(str, probe.tried)),
    )  # fmt: skip


def _oom(b: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate B={b} (simulated)")


def run_lightning(
    task, mode: str, oom_above: int | None, target: int, accelerator: str = "cpu"
) -> Row:
    """Lightning's `scale_batch_size` from 2; `oom_above` simulates a device's OOM (None:
    none, or a real one on `accelerator="gpu"`, as benchmarks/probe_cuda.py runs it)."""
    import lightning as L
    from lightning.pytorch.tuner import Tuner
    from torch.utils.data import DataLoader

    class LitTask(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = task.model()
            self.batch_size = 2
            self.calls = 0

        def training_step(self, batch, batch_idx):
            self.calls += 1
            if oom_above is not None and len(batch[0]) > oom_above:
                raise _oom(len(batch[0]))
            return task.loss(self.model, batch)

        def configure_optimizers(self):
            return task.optimizer(self.model.parameters(), task.lr)

        def train_dataloader(self):
            return DataLoader(task.train_data, batch_size=self.batch_size, shuffle=True)

    lit = LitTask()
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    found = Tuner(trainer).scale_batch_size(lit, mode=mode, init_val=2)
    seconds = time.perf_counter() - t0
    variant = "no limit" if oom_above is None else "simulated OOM"
    return Row(f"Lightning {mode} ({variant})", lit.calls, seconds, found, target)


def run_accelerate(task, start: int, oom_above: int | None, target: int) -> Row:
    from accelerate.utils import find_executable_batch_size

    h_model = task.model()
    optimizer = task.optimizer(h_model.parameters(), task.lr)
    step = TrainStep(
        h_model, optimizer, task.loss, Batcher(task.train_data, CPU), micro_batch_size=1,
        device=CPU,
    )  # fmt: skip
    calls = []

    @find_executable_batch_size(starting_batch_size=start)
    def one_step(batch_size):
        calls.append(batch_size)
        if oom_above is not None and batch_size > oom_above:
            raise _oom(batch_size)
        step.micro_batch_size = batch_size
        step(torch.arange(min(batch_size, task.num_train)))
        return batch_size

    t0 = time.perf_counter()
    found = one_step()
    seconds = time.perf_counter() - t0
    variant = "no limit" if oom_above is None else "simulated OOM"
    return Row(f"Accelerate x0.9 from {start} ({variant})", len(calls), seconds, found, target)


# --- report ----------------------------------------------------------------------------


def compare(task_name: str, budget_text: str, margin: float = 0.1) -> list[Row]:
    task = batchlab.load_task(task_name)
    budget = parse_size(budget_text)
    usable = int(budget * (1 - margin))
    t0 = time.perf_counter()
    harness = Harness(task)
    true_usable = true_max(harness, usable)
    true_hard = true_max(harness, budget)
    print(
        f"\n### {task_name}, budget {format_bytes(budget)} "
        f"(usable {format_bytes(usable)} with a {margin:.0%} margin)\n\n"
        f"True max (exhaustive, measured peak): {true_usable} under the usable budget, "
        f"{true_hard} under the whole budget; {len(harness.cache)} steps measured in "
        f"{time.perf_counter() - t0:.0f}s. Training set: {task.num_train} examples.\n"
    )
    rows = [
        run_batchlab(task, budget, margin, true_usable),
        run_batchlab(task, budget, 0.0, true_hard),
    ]
    # Without a limit Lightning doubles past the training set; on a large one that is
    # tens of GiB on this machine, so it is only run on small training sets.
    unlimited = task.num_train <= NO_LIMIT_MAX_EXAMPLES
    with contextlib.suppress(ImportError):
        for mode in ("power", "binsearch"):
            if unlimited:
                rows.append(run_lightning(task, mode, None, true_hard))
            rows.append(run_lightning(task, mode, true_hard, true_hard))
    with contextlib.suppress(ImportError):
        rows.append(run_accelerate(task, 4096, None, true_hard))
        rows.append(run_accelerate(task, 4096, true_hard, true_hard))
    for row in rows:
        if row.batch is not None:
            row.later_peak, row.over_at = later_run(task, row.batch, budget)
    print(
        "| method | training steps | wall time | batch found | true max | found / true "
        f"| {LATER_STEPS}-step run: peak vs budget |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        ratio = "-" if r.batch is None else f"{r.batch / r.target:.3f}"
        if r.later_peak is None:
            later = "-"
        elif r.over_at is not None:
            later = f"{format_bytes(r.later_peak)}: **over budget at step {r.over_at} (OOM)**"
        else:
            later = f"{format_bytes(r.later_peak)}: fits all {LATER_STEPS} steps"
        print(
            f"| {r.method} | {r.steps} | {r.seconds:.2f}s | {r.batch} | {r.target} | {ratio} "
            f"| {later} |"
        )
    notes = [f"- {r.method}: {r.note}" for r in rows if r.note]
    if notes:
        print("\n" + "\n".join(notes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=["mnist1d-cnn:8MiB", "mnist1d-mlp:4MiB", "charlm:64MiB"],
        help="TASK:BUDGET pairs",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 keeps timings sane on a shared 2-core machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with contextlib.suppress(ImportError):
        import lightning  # noqa: F401  (it sets its loggers to INFO on import)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, CUDA available: {torch.cuda.is_available()}"
    )
    for spec in args.tasks:
        name, _, budget = spec.partition(":")
        compare(name, budget)


if __name__ == "__main__":
    main()
