"""Does the plan's LR check catch the linear rule past B_crit? MNIST-1D, SGD + momentum 0.9.

From the folklore reference (B0=32, lr0=0.02; `benchmarks/mnist1d_sgd.py`) the linear rule
gives 0.64 at B=1024 and 1.28 at B=2048, past the 0.16-0.32 plateau the field notes report.
For each task and batch this script
1. runs the plan's check (`batchlab.planner.lr_check.probe_lr`, as `batchlab plan` calls it
   for the reference run's length: 200 epochs at B), and
2. trains every LR the check tried for the full reference length (200 epochs at B, with the
   plan's warm-up for that LR), so the check's short-probe verdict can be compared with
   what the whole run reaches (final training loss over the last 5% of steps, val accuracy).

    PYTHONPATH=src python benchmarks/lr_check.py [--batches 1024,2048] [--seeds 0]

`--from-noise-end` starts the probes where `batchlab plan` starts them: where its noise
phase (5% of the reference training at B0, `measure_noise` as the planner runs it) ended.
Without it they start from initialisation (sections 1-2 of lr_check.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from batchlab.core.lr import scale_lr, warmup_steps_for
from batchlab.measure.noise_run import measure_noise
from batchlab.measure.state import KeepRunEnd, RunEnd
from batchlab.planner.lr_check import probe_lr
from batchlab.planner.measure import DEFAULT_NOISE_BUDGET, POINTS_PER_NOISE_RUN, noise_phase_steps
from batchlab.train import train

sys.path.insert(0, str(Path(__file__).parent))
from mnist1d_sgd import mnist1d_cnn_sgd, mnist1d_mlp_sgd  # noqa: E402

TASKS = {"mlp": mnist1d_mlp_sgd, "cnn": mnist1d_cnn_sgd}


def full_run(task, batch: int, lr: float, seed: int) -> tuple[float | None, float, int]:
    """(tail-mean training loss over the last 5% of steps or None, val acc, warm-up steps)."""
    total = (task.epochs or 1) * math.ceil(task.num_train / batch)
    warmup = warmup_steps_for(lr / task.lr, total)
    h = train(task, batch, lr, warmup_steps=warmup, seed=seed, eval_every=total)
    tail = h.train_loss[-max(1, total // 20) :]
    loss = None if h.diverged or not all(map(math.isfinite, tail)) else sum(tail) / len(tail)
    return loss, h.final.get("val_acc", float("nan")), warmup


def noise_end(task, seed: int) -> RunEnd:
    """Where the plan's noise phase ends (its budget, every, seed; no target)."""
    steps = noise_phase_steps(task, DEFAULT_NOISE_BUDGET)
    kept = KeepRunEnd()
    measure_noise(
        task, steps=steps, every=max(1, steps // POINTS_PER_NOISE_RUN), seed=seed,
        callbacks=[kept], preconditioned=True,
    )  # fmt: skip
    return kept.end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mlp,cnn")
    parser.add_argument("--batches", default="1024,2048")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--no-full", action="store_true", help="the check only")
    parser.add_argument(
        "--from-noise-end", action="store_true", help="probe from where the noise phase ended"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
    for name in args.tasks.split(","):
        task = TASKS[name]()
        seeds = list(map(int, args.seeds.split(",")))
        starts = {s: noise_end(task, s) if args.from_noise_end else None for s in seeds}
        for batch in map(int, args.batches.split(",")):
            rule_lr = scale_lr(task.lr, task.batch_size, batch, "linear")
            planned = (task.epochs or 1) * math.ceil(task.num_train / batch)
            for seed in seeds:
                check = probe_lr(
                    task, micro_batch_size=batch, accumulation_steps=1, rule_lr=rule_lr,
                    rule="linear", planned_steps=planned,
                    warmup_steps=warmup_steps_for(rule_lr / task.lr, planned), seed=seed,
                    start=starts[seed],
                )  # fmt: skip
                print(
                    f"\n{task.name} B={batch} seed={seed}: {check.summary} "
                    f"({check.examples} examples, {check.seconds:.1f} s)",
                    flush=True,
                )
                for t in sorted(check.trials, key=lambda t: t.lr):
                    probe = "diverged" if t.tail_loss is None else f"{t.tail_loss:.3f}"
                    row = f"  lr {t.lr:<6.3g} probe loss {probe:>8} {t.outcome:<8}"
                    if not args.no_full:
                        t0 = time.perf_counter()
                        loss, acc, warmup = full_run(task, batch, t.lr, seed)
                        full = "diverged" if loss is None else f"{loss:.3f}"
                        row += (
                            f" | full run ({planned} steps, warm-up {warmup}): train loss "
                            f"{full:>8}, val acc {acc:.3f} ({time.perf_counter() - t0:.0f} s)"
                        )
                    mark = " <- chosen" if t.lr == check.chosen_lr else ""
                    print(row + mark + (" (rule)" if t.factor == 1.0 else ""), flush=True)


if __name__ == "__main__":
    main()
