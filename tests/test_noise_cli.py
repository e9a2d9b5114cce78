"""`batchlab noise`: table, JSON, plot; every built-in task; one line for bad input."""

from __future__ import annotations

import json
import math

import pytest

from batchlab.cli import main
from batchlab.measure.noise_run import NoiseRun
from batchlab.tasks import BUILTIN_TASKS

TASK_FILE = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import batchlab


def tiny(batch_size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = (x[:, 0] - x[:, 1] + 0.7 * torch.randn(256, generator=g) > 0).long()
    return batchlab.Task(
        name="tiny-noise",
        model=lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)),
        train_data=TensorDataset(x, y),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.05,
        batch_size=batch_size,
    )


def prime():
    return tiny(batch_size=31)
"""


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tiny_task.py"
    path.write_text(TASK_FILE)
    return path


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_json_and_plot(capsys, task_file, tmp_path):
    out_dir = tmp_path / "report"
    json_path = tmp_path / "noise.json"
    code, out, _ = run_cli(
        capsys, "noise", f"{task_file}:tiny", "--steps", 12, "--every", 4,
        "--out", out_dir, "--json", json_path,
    )  # fmt: skip
    assert code == 0
    assert "batchlab noise tiny-noise: batch 32, lr 0.05, two-batch" in out
    assert "final (step 12): B_simple" in out
    assert "4 micro-batches of 8" in out
    data = json.loads(json_path.read_text())
    assert [p["step"] for p in data["points"]] == [4, 8, 12]
    assert [p["examples"] for p in data["points"]] == [128, 256, 384]
    for p in data["points"]:
        assert set(p) >= {"step", "examples", "train_loss", "b_simple", "b_simple_ci"}
    assert data["final"]["method"] == "two-batch"
    run = NoiseRun.from_dict(data)
    assert run.final.b_simple == run.points[-1].b_simple
    png = out_dir / "noise_tiny-noise.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_json_to_stdout_keeps_the_table_off_it(capsys, task_file):
    code, out, err = run_cli(
        capsys, "noise", f"{task_file}:tiny", "--steps", 6, "--every", 3,
        "--method", "per-example", "--json", "-",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["method"] == "per-example" and data["micro_batch_size"] == 1
    assert "final (step 6)" in err


@pytest.mark.parametrize("task", sorted(BUILTIN_TASKS))
def test_runs_on_every_builtin_task(capsys, task, tmp_path):
    code, out, _ = run_cli(
        capsys, "noise", task, "--steps", 3, "--every", 3, "--json", tmp_path / "n.json"
    )
    assert code == 0, out
    data = json.loads((tmp_path / "n.json").read_text())
    assert data["task"] == task and len(data["points"]) == 1


def test_per_example_on_the_transformer(capsys, tmp_path):
    """charlm: embeddings, LayerNorm and attention go through the per-example machinery."""
    code, out, _ = run_cli(
        capsys, "noise", "charlm", "--steps", 2, "--every", 2, "--method", "per-example",
        "--json", tmp_path / "n.json",
    )  # fmt: skip
    assert code == 0, out
    final = json.loads((tmp_path / "n.json").read_text())["final"]
    assert final["method"] == "per-example" and final["num_examples"] == 8 * 32
    assert final["trace_sigma"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "three-batch"], "method: expected two-batch or per-example"),
        (["--steps", "0"], "steps: expected a positive integer, got 0"),
        (["--every", "-1"], "every: expected a positive integer, got -1"),
    ],
)
def test_bad_input_is_one_line(capsys, task_file, args, message):
    code, out, err = run_cli(capsys, "noise", f"{task_file}:tiny", *args)
    assert code == 2
    assert err.count("\n") == 1 and message in err


def test_unsplittable_reference_batch(capsys, task_file):
    code, _, err = run_cli(capsys, "noise", f"{task_file}:prime", "--steps", 2)
    assert code == 2
    assert "reference batch 31 cannot be split" in err and "per-example" in err


def test_plot_draws_into_given_axes_and_handles_unbounded_intervals(task_file):
    from matplotlib.figure import Figure

    from batchlab.core.noise_scale import build_noise_scale
    from batchlab.measure.noise_run import NoisePoint
    from batchlab.report.noise_plots import plot_noise_run

    final = build_noise_scale(2.0, 0.05, None, 0, num_examples=64, method="two-batch")
    run = NoiseRun(
        task="t", method="two-batch", steps=20, every=10, seed=0, device="cpu",
        batch_size=32, micro_batch_size=8, lr=0.1, num_train=256, beta=0.95,
        points=(
            NoisePoint(10, 320, 1.2, 40.0, (20.0, math.inf), False),
            NoisePoint(20, 640, 0.9, None, (50.0, math.inf), False),
        ),
        final=final, train_seconds=1.0,
    )  # fmt: skip
    ax = Figure().subplots()
    assert plot_noise_run(run, ax=ax) is ax
    assert ax.get_yscale() == "log" and ax.loss_axis.get_ylabel().startswith("train loss")
    assert math.isfinite(ax.get_ylim()[1])


def test_measure_noise_can_record_the_adam_preconditioned_scale():
    """`preconditioned=True` (what `plan` asks for) records B_simple of g/(sqrt(v)+eps) at
    every point for an Adam-like optimizer, and says so; SGD has no second moment and keeps
    the plain scale, saying that too."""
    import dataclasses

    import torch
    from conftest import tiny_task

    import batchlab
    from batchlab.measure.noise_run import NoiseRun, measure_noise
    from batchlab.tracking.tracker import GradientNoiseScaleTracker

    adam = tiny_task(n=512, optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr), lr=0.01)
    adam = dataclasses.replace(adam, batch_size=32)
    plain = measure_noise(adam, steps=40, every=10, device="cpu")
    pre = measure_noise(adam, steps=40, every=10, device="cpu", preconditioned=True)
    assert not plain.preconditioned and pre.preconditioned
    assert [p.step for p in pre.points] == [p.step for p in plain.points]
    # Same training (the run is deterministic), another metric: the values differ.
    assert [p.train_loss for p in pre.points] == [p.train_loss for p in plain.points]
    assert any(a.b_simple != b.b_simple for a, b in zip(pre.points, plain.points, strict=True))
    assert pre.final == plain.final.preconditioned
    assert NoiseRun.from_json(pre.to_json()) == pre
    # The same tracker, driven by hand, records both per point.
    tracker = GradientNoiseScaleTracker(every=10, preconditioned=True)
    batchlab.train(adam, 8, accumulation_steps=4, max_steps=40, device="cpu", callbacks=[tracker])
    assert [p["b_simple_preconditioned"] for p in tracker.points] == [
        p.b_simple for p in pre.points
    ]
    sgd = dataclasses.replace(tiny_task(n=512), batch_size=32)
    assert not measure_noise(
        sgd, steps=20, every=10, device="cpu", preconditioned=True
    ).preconditioned


def test_ctrl_c_before_any_noise_point_is_a_plain_interrupt():
    """Nothing measured yet: the interrupt goes on as it was, not as a crash of its own."""
    import dataclasses

    from conftest import tiny_task

    from batchlab.callbacks import TrainCallback
    from batchlab.measure.noise_run import NoiseInterrupted, measure_noise

    class Interrupt(TrainCallback):
        def on_step(self, state) -> None:
            raise KeyboardInterrupt

    task = dataclasses.replace(tiny_task(n=512), batch_size=32)
    for method in ("per-example", "two-batch"):
        with pytest.raises(KeyboardInterrupt) as info:
            measure_noise(
                task, steps=40, every=10, device="cpu", method=method, callbacks=[Interrupt()]
            )
        assert method == "two-batch" or not isinstance(info.value, NoiseInterrupted)
