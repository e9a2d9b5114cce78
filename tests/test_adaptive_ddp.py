"""DDP: two gloo processes on CPU under torchrun make the same decisions, step for step."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_every_rank_makes_the_same_decision(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "examples" / "torchrun_example.py"),
            "--tiny",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads((tmp_path / f"decisions_rank{r}.json").read_text()) for r in (0, 1)]
    assert logs[0] == logs[1]
    decisions = logs[0]
    steps = int(re.search(r"^(\d+) steps; B_simple now", proc.stdout, re.M).group(1))
    assert len(decisions) == 1 + steps // 10  # start + one every 10 steps
    # two epochs (every example once on one rank or the other), each validated on rank 0
    assert re.findall(r"^epoch (\d+): val_loss", proc.stdout, re.M) == ["0", "1"]
    # The replicas' gradients gave a noise estimate from the first decision on...
    assert all(d["b_simple"] is not None and d["b_simple"] > 0 for d in decisions[1:])
    # ...and the batch is split over both ranks.
    assert all(
        d["batch_size"] == d["micro_batch_size"] * d["accumulation_steps"] * 2 for d in decisions
    )
