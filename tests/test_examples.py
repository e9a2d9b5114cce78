"""Every example runs with --tiny (Lightning / transformers ones skip without the library)."""

from __future__ import annotations

import importlib.util
import os
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


def test_plain_loop():
    out = run_example("plain_loop.py")
    assert "step   80" in out and "reference epochs" in out


@pytest.mark.skipif(missing("lightning"), reason="lightning is not installed")
def test_lightning_example():
    out = run_example("lightning_example.py")
    assert "B_simple values in the logger" in out and "start" in out


@pytest.mark.skipif(
    missing("transformers") or missing("accelerate"), reason="transformers is not installed"
)
def test_hf_trainer_example():
    out = run_example("hf_trainer_example.py")
    assert "log entries with b_simple" in out and "last decision" in out
