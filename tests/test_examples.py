"""Every example runs with --tiny (Lightning / transformers ones skip without the library)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def run_example(name: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# "step   10  B=  46  lr=0.01115  B_simple=58  explore" (Lightning adds "(23 x 2)" after B)
DECISION = re.compile(
    r"^step\s+(\d+)\s+B=\s*(\d+)(?: \((\d+) x (\d+)\))?\s+lr=(\S+)\s+B_simple=(\S+)\s+(\w+)$",
    re.M,
)


def decisions(out: str) -> list[tuple[int, int, int | None, int | None, float, float | None, str]]:
    """The controller's decisions the examples print, as numbers."""
    return [
        (
            int(step),
            int(batch),
            None if micro == "" else int(micro),
            None if accum == "" else int(accum),
            float(lr),
            None if b_simple == "-" else float(b_simple),
            action,
        )
        for step, batch, micro, accum, lr, b_simple, action in DECISION.findall(out)
    ]


def check_plain_loop(out: str) -> None:
    rows = decisions(out)
    assert [r[0] for r in rows] == list(range(10, 90, 10)), out  # a decision every 10 steps
    for _, batch, _, _, lr, b_simple, action in rows:
        # B_simple is measured from the micro-batch gradients of every step: finite, > 0.
        assert batch >= 1 and 0 < lr < 1 and b_simple is not None and 0 < b_simple < 1e6
        assert action in ("explore", "switch", "keep")
    progress = float(re.search(r"^progress: ([\d.]+) reference epochs$", out, re.M).group(1))
    # A step of B is worth B E(B) = B (B_simple + B0) / (B_simple + B) reference examples,
    # between min(B, B0) and max(B, B0). Steps 1-10 run at B0 = 32, then each decision's B
    # for the next 10; dots has 2000 training examples.
    sizes = [32] + [batch for _, batch, *_ in rows[:-1]]
    low = sum(10 * min(b, 32) for b in sizes) / 2000
    high = sum(10 * max(b, 32) for b in sizes) / 2000
    assert low - 0.005 <= progress <= high + 0.005, (low, progress, high)


def check_lightning(out: str) -> None:
    rows = decisions(out)
    assert [r[0] for r in rows][:2] == [0, 10] and len(rows) >= 3, out
    assert rows[0][5] is None and rows[0][6] == "start"  # nothing measured before step 1
    for _, batch, micro, accum, lr, b_simple, _ in rows[1:]:
        assert micro * accum == batch and lr > 0 and b_simple is not None and b_simple > 0
    count, last = re.search(
        r"^(\d+) B_simple values in the logger, last (\d+)$", out, re.M
    ).groups()
    assert int(count) >= 10 and int(last) > 0


def check_hf_trainer(out: str) -> None:
    losses = [float(v) for v in re.findall(r"'loss': '?([\d.]+)'?", out)]
    assert len(losses) >= 5 and losses[-1] < 0.9 * losses[0], out  # it learned
    count, last = re.search(r"^(\d+) log entries with b_simple; last: (\d+)$", out, re.M).groups()
    assert int(count) >= len(losses) and int(last) > 0  # B_simple logged with every loss
    batch, micro, accum = re.search(
        r"^last decision: B=(\d+) \((\d+) x (\d+)\)$", out, re.M
    ).groups()
    assert int(micro) * int(accum) == int(batch)


def test_plain_loop():
    check_plain_loop(run_example("plain_loop.py"))


@pytest.mark.skipif(missing("lightning"), reason="lightning is not installed")
def test_lightning_example():
    check_lightning(run_example("lightning_example.py"))


@pytest.mark.skipif(
    missing("transformers") or missing("accelerate"), reason="transformers is not installed"
)
def test_hf_trainer_example():
    check_hf_trainer(run_example("hf_trainer_example.py"))
