"""Adaptive batch size under DDP: torchrun, gloo on CPU (NCCL on GPUs works the same way).

    torchrun --standalone --nproc_per_node=2 examples/torchrun_example.py --tiny

Every replica's local gradient is a small-batch sample for the noise scale (read by a DDP
communication hook before the all-reduce), rank 0 decides the next batch and the others
adopt its decision, so all ranks always run the same batch size.
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
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tiny", action="store_true", help="a few dozen steps (CI smoke run)")
    parser.add_argument("--out", type=Path, help="write each rank's decision log here")
    args = parser.parse_args()
    steps = 60 if args.tiny else args.steps
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

    def next_batch():
        indices = sampler.take(controller.micro_batch_size)
        if indices is None:  # end of an epoch: the next take() starts the next one
            indices = sampler.take(controller.micro_batch_size)
        return task.train_data[indices]

    for step in range(1, steps + 1):
        accum = controller.accumulation_steps
        optimizer.zero_grad(set_to_none=True)
        for i in range(accum):
            batch = next_batch()
            start = time.perf_counter()
            if i < accum - 1:
                with ddp.no_sync():  # accumulate locally; all-reduce on the last micro-batch
                    (task.loss(ddp, batch) / accum).backward()
            else:
                (task.loss(ddp, batch) / accum).backward()
            controller.throughput.observe_micro(len(batch[0]), time.perf_counter() - start)
        noise.end_step()
        start = time.perf_counter()
        optimizer.step()
        controller.throughput.observe_optimizer(time.perf_counter() - start)
        controller.record_step(controller.batch_size)
        if controller.due(step):
            decision = decide_and_broadcast(controller, step, noise.b_simple)
            for group in optimizer.param_groups:
                group["lr"] = decision.lr
            noise.local_batch_size = decision.micro_batch_size * decision.accumulation_steps

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
    del noise, ddp, optimizer
    gc.collect()
    shutdown()


if __name__ == "__main__":
    main()
