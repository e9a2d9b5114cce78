"""Under DDP every rank probes its own device and the ranks agree on the MIN (2 gloo ranks)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import batchlab
from batchlab.measure import distributed
from batchlab.tasks.common import cross_entropy_loss

# Each rank "has" a different amount of memory, as with a busy or smaller GPU.
BUDGETS = ("600KiB", "400KiB")


def mlp_task() -> batchlab.Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    return batchlab.Task(
        name="ddp-mlp",
        model=lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2)),
        train_data=TensorDataset(x, (x[:, 0] > 0).long()),
        loss=cross_entropy_loss,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        batch_size=32,
    )


def _rank_main(rank: int, world_size: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        result = batchlab.probe(
            mlp_task(),
            device="cpu",
            memory_budget=BUDGETS[rank],
            throughput_seconds=0.3,
            check_alignment=False,
        )
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result.to_dict(), f)
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_gloo_ranks_agree_on_the_min(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    local = [r["local_max_batch_size"] for r in results]
    assert local[0] > local[1]  # the budgets differ, so the ranks' own answers differ
    for r in results:
        assert r["world_size"] == 2
        assert r["max_batch_size"] == min(local)
        assert max(p["batch_size"] for p in r["throughput"]) <= min(local)
    assert results[0]["knee_batch_size"] == results[1]["knee_batch_size"]
    assert any("another rank fits only" in w for w in results[0]["warnings"])


def test_agree_min_outside_a_process_group_is_the_value():
    assert not distributed.is_distributed()
    assert distributed.agree_min(17) == 17
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.rank_device("auto") == "auto"
    assert distributed.init_from_env("cpu") is False  # no torchrun environment here
