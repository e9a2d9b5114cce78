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
    steps = int(re.search(r"^(\d+) steps; progress", out, re.M).group(1))
    assert [r[0] for r in rows] == list(range(10, steps + 1, 10)), out  # every 10 steps
    for _, batch, _, _, lr, b_simple, action in rows:
        # B_simple is measured from the micro-batch gradients of every step: finite, > 0.
        assert batch >= 1 and 0 < lr < 1 and b_simple is not None and 0 < b_simple < 1e6
        assert action in ("explore", "switch", "keep")
    # three epochs, each validated once it has seen every example
    assert re.findall(r"^epoch (\d+): val_loss [\d.]+$", out, re.M) == ["0", "1", "2"], out
    progress = float(re.search(r"progress: ([\d.]+) reference epochs$", out, re.M).group(1))
    # A step of B >= B0 is worth B E(B) = B (B_simple + B0) / (B_simple + B) <= B
    # reference examples: 3 epochs of examples are at most 3 reference epochs.
    assert 0 < progress <= 3.0 + 1e-9, progress


def check_lightning(out: str) -> None:
    rows = decisions(out)
    assert [r[0] for r in rows][:2] == [0, 10] and len(rows) >= 3, out
    assert rows[0][5] is None and rows[0][6] == "start"  # nothing measured before step 1
    for _, batch, micro, accum, lr, b_simple, _ in rows[1:]:
        assert micro * accum == batch and lr > 0 and b_simple is not None and b_simple > 0
    # a resizing batch, yet every epoch saw each example once and was validated (issue 13)
    epochs = re.findall(
        r"^epoch (\d+): (\d+) examples seen \((each once|NOT each once)\)", out, re.M
    )
    assert [int(e) for e, _, _ in epochs] == [0, 1, 2, 3], out
    assert all(n == "2000" and once == "each once" for _, n, once in epochs), out
    assert re.search(r"^4 epochs of 4, 4 validation runs, \d+ steps$", out, re.M), out
    assert len({r[1] for r in rows}) >= 2, out  # the batch size did change
    count, last = re.search(
        r"^(\d+) B_simple values in the logger, last (\d+);", out, re.M
    ).groups()
    assert int(count) >= 10 and int(last) > 0


def check_hf_trainer(out: str) -> None:
    losses = [float(v) for v in re.findall(r"'loss': '?([\d.]+)'?", out)]
    assert len(losses) >= 5 and losses[-1] < 0.9 * losses[0], out  # it learned
    count, last = re.search(r"^(\d+) log entries with b_simple; last: (\d+)$", out, re.M).groups()
    # B_simple is logged with the losses once an estimate exists (never a stale value)
    assert int(count) >= len(losses) // 2 and int(last) > 0
    assert re.search(r"^3 evaluations, eval_loss [\d.]+ -> [\d.]+ -> [\d.]+$", out, re.M), out
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
