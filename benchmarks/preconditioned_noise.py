"""Adam-preconditioned B_simple, live (the plan's noise phase) against exact, along training.

    python benchmarks/preconditioned_noise.py TASK B0 SWEEP_DIR|- [--seed S] [--every K] [--examples N]

Trains TASK at batch B0 the way `batchlab plan`'s noise phase does (`measure_noise`, two-batch,
preconditioned) and, every K steps, computes at the same weights and with the optimizer's
second moments then, over N training examples, one by one:
- plain B_simple = tr(Sigma) / |G|^2;
- preconditioned B_simple with Adam's raw weights 1/(sqrt(v_hat)+eps);
- the same with the weights capped at PRECONDITIONER_CAP x their tensor's median (what the
  tracker uses).
SWEEP_DIR gives the LR (the sweep's best at B0) and the target; `-` uses the task's own LR.
Prints one row per checkpoint and the medians of live / exact and of preconditioned / plain.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import default_collate

import batchlab
from batchlab.callbacks import RunState, TrainCallback
from batchlab.measure.noise_run import measure_noise
from batchlab.planner.measure import noise_phase_steps
from batchlab.sweep.runner import _task_for
from batchlab.tracking.grad_norms import PRECONDITIONER_CAP, adam_preconditioner

sys.path.insert(0, str(Path(__file__).parent))
from plan_regret import read_truth  # noqa: E402


def b_simple(grads: torch.Tensor, weights: torch.Tensor | None) -> float:
    """Unbiased tr(Sigma) / |G|^2 from the n per-example gradients in the rows of `grads`."""
    g = grads if weights is None else grads * weights
    n = g.shape[0]
    mean = g.mean(0)
    trace = ((g - mean) ** 2).sum(1).mean() * n / (n - 1)
    return float(trace / (mean @ mean - trace / n))


class Exact(TrainCallback):
    def __init__(self, task: batchlab.Task, every: int, examples: int) -> None:
        self.task, self.every, self.rows = task, every, {}
        collate = task.collate_fn or default_collate
        order = torch.randperm(len(task.train_data), generator=torch.Generator().manual_seed(1))
        self.examples = [collate([task.train_data[i]]) for i in order[:examples].tolist()]

    def on_step(self, state: RunState) -> None:
        if state.step % self.every:
            return
        params = [p for p in state.model.parameters() if p.requires_grad]
        pre = adam_preconditioner(state.optimizer, params)  # capped
        grads = torch.stack([
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(self.task.loss(state.model, ex), params)])
            for ex in self.examples
        ]).double()  # fmt: skip
        row = {"plain": b_simple(grads, None)}
        if pre is not None:
            raw = [
                1 / (state.optimizer.state[p]["exp_avg_sq"] / (1 - g["betas"][1] ** float(state.optimizer.state[p]["step"]))).sqrt().add(g["eps"])
                for g in state.optimizer.param_groups for p in g["params"] if p.requires_grad
            ]  # fmt: skip
            row["raw"] = b_simple(grads, torch.cat([w.reshape(-1) for w in raw]).double())
            row["capped"] = b_simple(grads, torch.cat([w.reshape(-1) for w in pre]).double())
        self.rows[state.step] = row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("task")
    ap.add_argument("b0", type=int)
    ap.add_argument("sweep", help="sweep directory (LR and target), or - for the task's own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--examples", type=int, default=4000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    target = None
    if a.sweep == "-":
        task = dataclasses.replace(batchlab.load_task(a.task), batch_size=a.b0)
    else:
        truth = read_truth(a.sweep)
        template = truth.templates[min(truth.templates)][0]
        base = _task_for(template, batchlab.load_task(truth.spec.task_ref))
        task = dataclasses.replace(base, batch_size=a.b0, lr=truth.best_lr(a.b0))
        target = truth.spec.target
    steps = noise_phase_steps(task, 0.05)
    exact = Exact(task, a.every, min(a.examples, len(task.train_data)))
    live = measure_noise(
        task, steps=steps, every=max(1, steps // 40), target=target, seed=a.seed,
        device="cpu", preconditioned=True, callbacks=[exact],
    )  # fmt: skip
    print(f"{a.task} B0={a.b0} lr={task.lr:.3g} steps={live.steps} (target at {live.target_step})")
    print("step | loss | live | exact capped | exact raw | exact plain")
    ratios, gains = [], []
    for p in live.points:
        row = exact.rows.get(p.step)
        if row is None or "capped" not in row or p.b_simple is None:
            continue
        ratios.append(p.b_simple / row["capped"])
        gains.append(row["capped"] / row["plain"])
        print(f"{p.step} | {p.train_loss:.3f} | {p.b_simple:.0f} | {row['capped']:.0f} "
              f"| {row['raw']:.0f} | {row['plain']:.0f}")  # fmt: skip
    if ratios:
        print(f"median live / exact capped: {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} checkpoints); "
              f"median exact capped / plain: {statistics.median(gains):.2f}; cap {PRECONDITIONER_CAP:g}")  # fmt: skip


if __name__ == "__main__":
    main()
