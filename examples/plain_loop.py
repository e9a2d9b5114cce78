"""Adaptive batch size in a plain PyTorch loop: a resizable sampler and a controller.

    python examples/plain_loop.py --tiny
    python examples/plain_loop.py --task mnist1d-mlp --epochs 10

The loop runs each step as micro-batches (at least two, so their gradients give the noise
scale for free), times them for the throughput model, and asks the controller every
`interval` steps for the next (micro-batch, accumulation) and learning rate. An epoch ends
when the sampler has handed out every training example once; the loop validates then.
"""

from __future__ import annotations

import argparse
import time

import torch

import batchlab
from batchlab.adaptive import AdaptiveBatchSize, ResizableBatchSampler
from batchlab.adaptive.noise_source import smoothed_noise_estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a few seconds (CI smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    task = batchlab.load_task("dots" if args.tiny else args.task)
    epochs = 3 if args.tiny else args.epochs

    model = task.model()
    optimizer = task.optimizer(model.parameters(), task.lr)
    # Start at the task's reference batch, as two micro-batches of half of it.
    controller = AdaptiveBatchSize(
        task.batch_size,
        task.lr,
        optimizer=optimizer,
        interval=10,
        fixed_accumulation_steps=2,
        max_batch_size=len(task.train_data) // 4,
    )
    # Each micro loss is scaled by its share of the step's examples (the tracker's default
    # weighting). The tracker reads each micro-batch's gradient norm after its backward; the
    # step's gradient stays exactly the same.
    noise = smoothed_noise_estimate(num_examples=len(task.train_data))
    tracker = noise.tracker
    sampler = ResizableBatchSampler(task.train_data, controller.micro_batch_size, seed=0)

    step = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        while sampler.remaining:
            step += 1
            m, k = controller.micro_batch_size, controller.accumulation_steps
            indices = sampler.take(m * k)  # the step's batch (short at an epoch's end)
            micro = [indices[i : i + m] for i in range(0, len(indices), m)]
            optimizer.zero_grad(set_to_none=True)
            for i, idx in enumerate(micro):
                start = time.perf_counter()
                (task.loss(model, task.train_data[idx]) * len(idx) / len(indices)).backward()
                controller.throughput.observe_micro(len(idx), time.perf_counter() - start)
                tracker.after_backward(model, len(idx), last=i == len(micro) - 1)
            tracker.end_step(model)
            start = time.perf_counter()
            optimizer.step()
            controller.throughput.observe_optimizer(time.perf_counter() - start)
            controller.record_step(len(indices))
            if controller.due(step):
                d = controller.decide(step, noise.b_simple())
                for group in optimizer.param_groups:
                    group["lr"] = d.lr
                b = "-" if d.b_simple is None else f"{d.b_simple:.0f}"
                print(
                    f"step {step:4d}  B={d.batch_size:4d}  lr={d.lr:.4g}  B_simple={b}  {d.action}"
                )
        model.eval()
        with torch.no_grad():
            val_loss = float(task.loss(model, task.val_data[:]))
        model.train()
        print(f"epoch {epoch}: val_loss {val_loss:.4f}")
    print(
        f"{step} steps; progress: {controller.reference_epochs(len(task.train_data)):.2f} reference epochs"
    )


if __name__ == "__main__":
    main()
