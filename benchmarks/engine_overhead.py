"""Engine overhead: `batchlab.train` step time / a minimal hand-written loop, per built-in task.

Both run the same task, model, optimizer and batch size on the same device. The two are
interleaved (A B A B ...) and each reports the median seconds per step over its windows,
so machine noise hits both alike. Goal: ratio <= 1.10.

    .venv/bin/python benchmarks/engine_overhead.py [--steps 100] [--windows 5] [--tasks ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import batchlab
from batchlab.step import resolve_device
from batchlab.tasks import BUILTIN_TASKS


def hand_loop_seconds(task: batchlab.Task, batch_size: int, steps: int, device) -> float:
    """What a user would write: tensors on the device, index, forward, backward, step."""
    torch.manual_seed(0)
    model = task.model().to(device)
    opt = task.optimizer(model.parameters(), task.lr)
    tensors = [t.to(device) for t in task.train_data.tensors]
    n = len(tensors[0])
    perm = torch.randperm(n)
    start = time.perf_counter()
    for i in range(steps):
        lo = (i * batch_size) % (n - batch_size + 1)
        idx = perm[lo : lo + batch_size].to(device)
        batch = tuple(t[idx] for t in tensors)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        if (
            i % 1 == 0
        ):  # the engine checks the loss for NaN every step on CPU; so does a careful user
            loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def engine_seconds(task: batchlab.Task, batch_size: int, steps: int, device) -> float:
    history = batchlab.train(task, batch_size, max_steps=steps, eval_every=steps, device=device)
    return history.train_seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--tasks", default=",".join(BUILTIN_TASKS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'task':<12} {'batch':>5} {'hand ms/step':>13} {'engine ms/step':>15} {'ratio':>6}")
    for name in args.tasks.split(","):
        task = batchlab.load_task(name)
        b = task.batch_size
        hand_loop_seconds(task, b, 10, device)  # warm-up both paths
        engine_seconds(task, b, 10, device)
        hand, engine = [], []
        for _ in range(args.windows):
            hand.append(hand_loop_seconds(task, b, args.steps, device))
            engine.append(engine_seconds(task, b, args.steps, device))
        h, e = statistics.median(hand), statistics.median(engine)
        print(f"{name:<12} {b:>5} {h * 1e3:>13.3f} {e * 1e3:>15.3f} {e / h:>6.3f}")


if __name__ == "__main__":
    main()
