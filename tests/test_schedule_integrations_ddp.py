"""Rank agreement: under DDP rank 0 decides each step's phase and every rank follows it.

Two gloo processes on CPU are given deliberately different schedules (a different phase 1,
as two ranks reading different plan files, or counting differently, would have). Every
step, both must train the same batch, accumulation and lr, the phase rank 0's schedule
says, and together see every example once per epoch. Without the broadcast in
`ScheduleSampler._decide` rank 1 follows its own schedule and this test fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import free_port

from batchlab.core.schedule import BatchSchedule, SchedulePhase

N = 60
STEPS = 12


def _schedule(rank: int) -> BatchSchedule:
    """Rank 0: 8 (4 x 1 a replica) from step 1, 12 (2 x 3) from step 5, 20 (10 x 1) from
    step 9. Rank 1 sees another phase 1: 16 (4 x 2) from step 7, at another lr."""
    if rank == 0:
        phases = [(0, 8, 4, 0.1), (4, 12, 2, 0.2), (8, 20, 10, 0.3)]
    else:
        phases = [(0, 8, 4, 0.1), (6, 16, 4, 0.25), (8, 20, 10, 0.3)]
    return BatchSchedule(
        tuple(SchedulePhase(s, b, m, -(-b // m), lr) for s, b, m, lr in phases), unit="step"
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    from conftest import end_ddp_worker, start_ddp_worker
    from torch.nn.parallel import DistributedDataParallel as DDP

    from batchlab.integrations.schedule import ScheduleSampler

    # a timeout, so a disagreement that desynchronises the collectives fails, not hangs
    start_ddp_worker(rank, world, port, timeout_s=60)
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(1, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.linspace(-1, 1, N).unsqueeze(1)
    sampler = ScheduleSampler(N, _schedule(rank), seed=0, num_replicas=world, rank=rank)
    record = []
    for _ in range(STEPS):
        setting, micro = sampler.next_step()
        for group in optimizer.param_groups:
            group["lr"] = setting.lr
        for i, idx in enumerate(micro):
            last = i == len(micro) - 1
            with model.no_sync() if not last else torch.enable_grad():
                (model(x[idx]) - 1).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        record.append(
            {
                "step": setting.step,
                "phase": setting.phase,
                "batch": setting.batch_size,
                "accumulation": setting.accumulation_steps,
                "lr": optimizer.param_groups[0]["lr"],
                "micro": [len(m) for m in micro],
                "indices": [i for m in micro for i in m],
                "epoch": sampler.epoch,
            }
        )
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    model = None
    end_ddp_worker()


@pytest.mark.slow
def test_every_rank_follows_rank_0s_phase_at_every_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    settings = [[{k: v for k, v in s.items() if k != "indices"} for s in rank] for rank in ranks]
    assert settings[0] == settings[1]  # the same batch, accumulation and lr every step
    # ...and it is rank 0's schedule: per replica 4 x 1, then 2 x 3 (the epoch of 60 ends
    # in step 7 with 4 left: one micro-batch of 2 each), then 10 x 1 from step 9 (epoch 1
    # ends in step 11 with 8 left: 4 each).
    got = [(s["step"], s["batch"], s["micro"], s["lr"]) for s in settings[0]]
    assert got == (
        [(s, 8, [4], 0.1) for s in range(1, 5)]
        + [(5, 12, [2, 2, 2], 0.2), (6, 12, [2, 2, 2], 0.2), (7, 12, [2], 0.2)]
        + [(8, 12, [2, 2, 2], 0.2)]
        + [(9, 20, [10], 0.3), (10, 20, [10], 0.3), (11, 20, [4], 0.3), (12, 20, [10], 0.3)]
    )
    # The ranks split each step's batch: together they see each epoch exactly once.
    for first, last in ((1, 7), (8, 11)):
        seen = [
            i for rank in ranks for s in rank if first <= s["step"] <= last for i in s["indices"]
        ]
        assert sorted(seen) == list(range(N)), (first, last)
