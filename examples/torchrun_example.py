"""Adaptive batch size under DDP: torchrun, gloo on CPU (NCCL on GPUs works the same way).

    torchrun --standalone --nproc_per_node=2 examples/torchrun_example.py --tiny
    torchrun --standalone --nproc_per_node=2 examples/torchrun_example.py --epochs 10

Every replica's local gradient is a small-batch sample for the noise scale (read by a DDP
communication hook before the all-reduce), rank 0 decides the next batch and the others
adopt its decision, so all ranks always run the same batch size. Each epoch is one pass
over the training set, cut from one shared permutation (every replica its slice of each
global batch); rank 0 validates at each epoch's end.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import batchlab
from batchlab.adaptive import AdaptiveBatchSize, ResizableBatchSampler
from batchlab.integrations.ddp import DDPNoiseScale, decide_and_broadcast
from batchlab.measure.distributed import shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="two epochs of dots (CI smoke run)")
    parser.add_argument("--out", type=Path, help="write each rank's decision log here")
    args = parser.parse_args()
    epochs = 2 if args.tiny else args.epochs
    task_name = "dots" if args.tiny else args.task

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)

    task = batchlab.load_task(task_name)
    ddp = DistributedDataParallel(task.model())
    optimizer = task.optimizer(ddp.parameters(), task.lr)
    controller = AdaptiveBatchSize(
        task.batch_size, task.lr, optimizer=optimizer, world_size=world, interval=10, threshold=0.02
    )
    noise = DDPNoiseScale(ddp, local_batch_size=controller.micro_batch_size)
    sampler = ResizableBatchSampler(
        task.train_data, controller.micro_batch_size, seed=0, num_replicas=world, rank=rank
    )

    step = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        while sampler.remaining:
            step += 1
            m, k = controller.micro_batch_size, controller.accumulation_steps
            indices = sampler.take(m * k)  # this replica's share of the step (short at the end)
            micro = [indices[i : i + m] for i in range(0, len(indices), m)]
            optimizer.zero_grad(set_to_none=True)
            for i, idx in enumerate(micro):
                batch = task.train_data[idx]
                scale = len(idx) / len(indices)  # each micro loss by its share of the step
                start = time.perf_counter()
                if i < len(micro) - 1:
                    with ddp.no_sync():  # accumulate locally; all-reduce on the last micro-batch
                        (task.loss(ddp, batch) * scale).backward()
                else:
                    (task.loss(ddp, batch) * scale).backward()
                controller.throughput.observe_micro(len(idx), time.perf_counter() - start)
            noise.local_batch_size = len(indices)
            noise.end_step()
            start = time.perf_counter()
            optimizer.step()
            controller.throughput.observe_optimizer(time.perf_counter() - start)
            controller.record_step(len(indices) * world)
            if controller.due(step):
                decision = decide_and_broadcast(controller, step, noise.b_simple)
                for group in optimizer.param_groups:
                    group["lr"] = decision.lr
        if rank == 0:
            with torch.no_grad():
                val_loss = float(task.loss(ddp.module, task.val_data[:]))
            print(f"epoch {epoch}: val_loss {val_loss:.4f}")

    log = [d.to_dict() for d in controller.decisions]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"decisions_rank{rank}.json").write_text(json.dumps(log, indent=1))
    if rank == 0:
        for d in log:
            print(
                f"step {d['step']:4d}  B={d['batch_size']:4d} ({d['micro_batch_size']} x "
                f"{d['accumulation_steps']} x {world} ranks)  lr={d['lr']:.4g}  "
                f"B_simple={d['b_simple'] or float('nan'):.0f}  {d['action']}"
            )
    # Release DDP (its reducer holds the process group) before leaving the group, then wait
    # for every rank: gloo aborts a rank whose peer tears down while it still talks.
    if rank == 0:
        ns = noise.noise_scale()  # the same on every rank
        now = "-" if ns.b_simple is None else f"{ns.b_simple:.0f}"
        print(
            f"{step} steps; B_simple now {now} [{ns.b_simple_ci[0]:.0f}, {ns.b_simple_ci[1]:.0f}]"
        )
        if not ns.reliable:
            print(f"  unreliable: {ns.reason}")
    del noise, ddp, optimizer
    gc.collect()
    shutdown()


if __name__ == "__main__":
    main()
