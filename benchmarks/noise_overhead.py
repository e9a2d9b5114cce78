"""What measuring the gradient noise scale costs, as ratios measured side by side.

1. Tracker overhead: one training step of the engine's `TrainStep` at the task's reference
   batch, split into 4 accumulation micro-batches, with a `GradientNoiseScaleTracker` hooked
   in vs. without (the same step otherwise). Goal <= 1.03x. For reference, AdaptDL users
   report 2.6x (adaptdl issue #120). Also the `all_micro=False` variant (only the first
   micro-batch's norm: no gradient copy, a noisier tr(Σ)).
2. Per-example mode: `PerExampleGradNorms` (exact per-example norms plus the batch gradient)
   vs. one plain forward + backward at the same batch. Goal <= 3x. Naive
   `torch.func.vmap(grad)` over all parameters is timed beside it for scale.

Arms are interleaved step by step (A B C, A B C, ... with the order rotated each round), so
machine noise hits them alike; each ratio is the median over rounds of the per-round ratio,
with its interquartile range.

    .venv/bin/python benchmarks/noise_overhead.py [--seconds 20] [--tasks ...] [--device auto]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

import batchlab
from batchlab.callbacks import RunState
from batchlab.data import Batcher, epoch_chunks
from batchlab.measure.per_example import PerExampleGradNorms
from batchlab.step import TrainStep, resolve_device
from batchlab.tasks import BUILTIN_TASKS
from batchlab.tracking import GradientNoiseScaleTracker

MICRO_BATCHES = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def interleave(arms: dict, rounds_max: int, seconds: float, device: torch.device) -> dict:
    """Time each arm once per round, order rotated; return per-arm lists of seconds."""
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < rounds_max and (time.perf_counter() - start < seconds or r < 20):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            arms[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        r += 1
    return times


def ratios(times: dict, base: str, warmup: int) -> dict[str, tuple[float, float, float]]:
    out = {}
    for name, values in times.items():
        paired = [v / b for v, b in zip(values[warmup:], times[base][warmup:], strict=True)]
        out[name] = _quantiles(paired)
    return out


def tracker_overhead(task: batchlab.Task, device: torch.device, seconds: float) -> dict:
    micro = task.batch_size // MICRO_BATCHES
    batcher = Batcher(task.train_data, device, task.collate_fn)
    chunks = [
        c
        for c in epoch_chunks(task.num_train, task.batch_size, torch.Generator().manual_seed(0))
        if len(c) == task.batch_size
    ]

    def arm(tracker: GradientNoiseScaleTracker | None):
        torch.manual_seed(0)
        model = task.model().to(device)
        optimizer = task.optimizer(model.parameters(), task.lr)
        step_fn = TrainStep(
            model, optimizer, task.loss, batcher, micro_batch_size=micro, device=device
        )
        state = RunState(task, model, optimizer, step_fn, device, 10**9, 1, task.batch_size)
        if tracker is not None:
            tracker.on_start(state)
        counter = [0]

        def step() -> None:
            indices = chunks[counter[0] % len(chunks)]
            counter[0] += 1
            loss = step_fn(indices)
            if device.type == "cpu":
                loss.item()  # the engine reads the loss every step on CPU
            state.step += 1
            state.examples += len(indices)
            if tracker is not None:
                tracker.on_step(state)  # records a point every 10 steps, as in training

        return step

    arms = {
        "no tracker": arm(None),
        "tracker": arm(GradientNoiseScaleTracker(num_examples=task.num_train)),
        "tracker, first micro only": arm(
            GradientNoiseScaleTracker(num_examples=task.num_train, all_micro=False)
        ),
    }
    times = interleave(arms, 3000, seconds, device)
    base = statistics.median(times["no tracker"][10:])
    return {
        "step_ms": base * 1e3,
        "rounds": len(times["no tracker"]),
        **ratios(times, "no tracker", 10),
    }


def per_example_cost(
    task: batchlab.Task, batch_size: int, device: torch.device, seconds: float
) -> dict:
    torch.manual_seed(0)
    model = task.model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = Batcher(task.train_data, device, task.collate_fn)(torch.arange(batch_size))
    norms = PerExampleGradNorms(model, task.loss, params)
    names = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def plain() -> None:
        torch.autograd.grad(task.loss(model, batch), params)

    def one_example_loss(values, x, y):
        def call(inputs):
            return torch.func.functional_call(model, values, (inputs,))

        class Proxy:
            __call__ = staticmethod(call)

        return task.loss(Proxy(), (x.unsqueeze(0), y.unsqueeze(0)))

    naive = torch.func.vmap(torch.func.grad(one_example_loss), in_dims=(None, 0, 0))
    detached = {n: p.detach() for n, p in names.items()}

    def vmap_all() -> None:
        with torch.no_grad():
            naive(detached, *batch)

    arms = {"plain backward": plain, "per-example": lambda: norms(batch), "naive vmap": vmap_all}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        times = interleave(arms, 2000, seconds, device)
    base = statistics.median(times["plain backward"][5:])
    fallback = ", ".join(norms.fallback) or "-"
    return {
        "backward_ms": base * 1e3,
        "rounds": len(times["plain backward"]),
        "fallback": fallback,
        **ratios(times, "plain backward", 5),
    }


def fmt(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.3f}x ({q[0]:.2f}-{q[2]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per task and part")
    parser.add_argument("--tasks", default=",".join(BUILTIN_TASKS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # two cores shared with other jobs: keep timings steady
    names = args.tasks.split(",")
    print(
        f"torch {torch.__version__}, {device}, {platform.processor() or platform.machine()}, "
        f"threads {torch.get_num_threads()}"
    )
    print()
    print("## 1. Tracker overhead (accumulation, 4 micro-batches; median ratio, IQR)")
    print()
    print("| task | batch | step | tracker / none | first micro only / none | rounds |")
    print("|---|---|---|---|---|---|")
    for name in names:
        task = batchlab.load_task(name)
        r = tracker_overhead(task, device, args.seconds)
        print(
            f"| {name} | {task.batch_size} = {MICRO_BATCHES} x {task.batch_size // MICRO_BATCHES}"
            f" | {r['step_ms']:.2f} ms | {fmt(r['tracker'])} "
            f"| {fmt(r['tracker, first micro only'])} | {r['rounds']} |",
            flush=True,
        )
    print()
    print("## 2. Per-example norms vs. one plain backward (median ratio, IQR)")
    print()
    print(
        "| task | batch | backward | per-example / backward | naive vmap / backward "
        "| vmap fallback params | rounds |"
    )
    print("|---|---|---|---|---|---|---|")
    cases = [(n, batchlab.load_task(n).batch_size) for n in names]
    if "mnist1d-mlp" in names:
        cases.append(("mnist1d-mlp", 256))
    for name, batch_size in cases:
        task = batchlab.load_task(name)
        r = per_example_cost(task, batch_size, device, args.seconds)
        print(
            f"| {name} | {batch_size} | {r['backward_ms']:.2f} ms | {fmt(r['per-example'])} "
            f"| {fmt(r['naive vmap'])} | {r['fallback']} | {r['rounds']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
