"""`batchlab probe` and `batchlab.probe`: the JSON contract, the plot, warnings, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchlab
from batchlab.cli import main
from batchlab.errors import ConfigError
from batchlab.measure.probe import ProbeSettings, batchnorm_warning
from batchlab.tasks.common import cross_entropy_loss

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_probe_cli_table_json_and_png(capsys, tmp_path):
    json_path = tmp_path / "probe.json"
    code, out, err = run_cli(
        capsys,
        "probe",
        "dots",
        "--device",
        "cpu",
        "--memory-budget",
        "600KiB",
        "--time-budget",
        "1",
        "--json",
        str(json_path),
        "--out",
        str(tmp_path / "report"),
    )
    assert code == 0, err
    for text in ("batchlab probe dots (cpu)", "max batch size", "verified: ran for real", "knee"):
        assert text in out
    assert "--memory-budget 600 KiB" in out and "usable 540 KiB (margin 10%)" in out

    data = json.loads(json_path.read_text())
    for key in ("max_batch_size", "knee_batch_size", "probe_steps", "device", "throughput"):
        assert key in data
    memory = data["memory"]
    for key in ("fixed_bytes", "bytes_per_sample", "budget_bytes", "margin", "points"):
        assert key in memory
    assert memory["budget_bytes"] == 600 * 1024 and memory["margin"] == 0.1
    assert all({"batch_size", "peak_bytes"} <= set(p) for p in memory["points"])
    assert all(
        {"batch_size", "samples_per_s", "step_s", "spread"} <= set(p) for p in data["throughput"]
    )
    assert data["device"] == "cpu" and data["probe_steps"] == len(memory["tried"])
    assert 1 <= data["max_batch_size"] <= 2000
    sizes = [p["batch_size"] for p in data["throughput"]]
    assert data["knee_batch_size"] in sizes and max(sizes) <= data["max_batch_size"]
    result = batchlab.ProbeResult.from_dict(data)
    assert result.to_dict() == data

    png = tmp_path / "report" / "probe_dots.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000


def test_probe_cli_json_to_stdout_and_target_memory(capsys):
    code, out, err = run_cli(
        capsys,
        "probe",
        "dots",
        "--device",
        "cpu",
        "--target-memory",
        "2MiB",
        "--time-budget",
        "0.5",
        "--json",
        "-",
    )
    assert code == 0, err
    data = json.loads(out)  # stdout holds the JSON alone; the table went to stderr
    assert data["predicted_only"] and not data["memory"]["verified"]
    assert data["probe_steps"] == 3  # warm-up and the ladder: nothing else runs
    assert "predicted for the target memory, not run" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--memory-budget", "12XB"],
            "memory budget: expected a number with an optional unit (B, KB, MB, GB, TB, KiB, "
            "MiB, GiB, TiB), e.g. 6GiB or 512MB, got '12XB'",
        ),
        (
            ["--memory-budget", "4KiB"],
            "give a larger --memory-budget, a smaller --margin, or a smaller model",
        ),
        (["--memory-budget", "1GiB", "--target-memory", "2GiB"], "got both; drop one"),
        (["--margin", "1"], "margin: expected a fraction of the budget in [0, 1), got 1.0"),
        (["--effective-batch", "0"], "effective batch size: expected a positive integer, got 0"),
        (["--memory-budget", "1GiB", "--time-budget", "0"], "time budget: expected a positive"),
    ],
)
def test_probe_cli_bad_input_is_one_line(capsys, args, message):
    code, out, err = run_cli(capsys, "probe", "dots", "--device", "cpu", *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("batchlab: error: ")
    assert message in err


@pytest.mark.parametrize(
    ("settings", "param", "message"),
    [
        ({"memory_budget": "1GiB", "target_memory": "2GiB"}, "target_memory", "got both"),
        ({"memory_budget": "12XB"}, "memory_budget", "memory budget: expected a number"),
        ({"margin": 1.0}, "margin", r"margin: expected a fraction"),
        ({"throughput_seconds": 0}, "throughput_seconds", "time budget: expected a positive"),
    ],
)
def test_probe_settings_are_checked_before_anything_runs(settings, param, message):
    with pytest.raises(ConfigError) as info:
        ProbeSettings(**settings)
    assert info.match(message)
    assert info.value.param == param
    # the same check fails batchlab.probe before the task is even loaded
    with pytest.raises(ConfigError) as info:
        batchlab.probe("no-such-task", device="cpu", **settings)
    assert info.value.param == param


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_probe_cli_cuda_unavailable(capsys):
    code, _, err = run_cli(capsys, "probe", "dots", "--device", "cuda")
    assert code == 2 and "CUDA is not available here; use --device cpu" in err


def test_probe_cli_unknown_task(capsys):
    code, _, err = run_cli(capsys, "probe", "no-such-task")
    assert code == 2 and "unknown task 'no-such-task'" in err


class WideBN(nn.Module):
    """A convolution with BatchNorm over long signals: few weights, big activations, so a
    few examples fill a small budget."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 32, 3, padding=1),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(32, 2),
        )

    def forward(self, x):
        return self.net(x.unsqueeze(1))


def bn_task() -> batchlab.Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2048, generator=g)
    y = (x[:, 0] > 0).long()
    return batchlab.Task(
        name="widebn",
        model=WideBN,
        train_data=TensorDataset(x, y),
        loss=cross_entropy_loss,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        batch_size=64,
    )


def test_batchnorm_warning_rule():
    assert batchnorm_warning(WideBN, 4) is not None
    assert "statistics are meaningless" in batchnorm_warning(WideBN(), 1)
    assert "statistics are noisy" in batchnorm_warning(WideBN(), 7)
    assert batchnorm_warning(WideBN, 8) is None
    assert batchnorm_warning(lambda: nn.Linear(4, 2), 1) is None


def test_probe_warns_for_batchnorm_and_plans_accumulation():
    task = bn_task()
    big = batchlab.probe_memory(task, device="cpu", memory_budget="48MiB")
    # room for about 5 examples: far below the reference batch of 64
    memory_budget = int((big.fixed_bytes + 5.5 * big.bytes_per_sample) / 0.9)
    result = batchlab.probe(
        task, device="cpu", memory_budget=memory_budget, throughput_seconds=0.3,
        check_alignment=False,
    )  # fmt: skip
    assert 1 <= result.max_batch_size < 8
    assert any("has BatchNorm and the per-device batch is" in w for w in result.warnings)
    plan = result.accumulation
    assert plan is not None and plan.effective_batch_size == 64
    assert plan.micro_batch_size <= result.max_batch_size
    assert plan.micro_batch_size * plan.accumulation_steps >= 64


def test_probe_step_failure_is_a_task_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    task = batchlab.Task(
        name="flatbn",
        model=lambda: nn.Sequential(nn.Linear(16, 256), nn.BatchNorm1d(256), nn.Linear(256, 2)),
        train_data=TensorDataset(x, (x[:, 0] > 0).long()),
        loss=cross_entropy_loss,
        optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        lr=0.1,
        batch_size=8,
    )
    big = batchlab.probe_memory(task, device="cpu", memory_budget="1GiB")
    four = next(p.peak_bytes for p in big.points if p.batch_size == 4)
    # B=4 and 2 do not fit, so the search tries B=1, where BatchNorm over (N, C) fails
    with pytest.raises(batchlab.BatchlabError) as info:
        batchlab.probe_memory(task, device="cpu", memory_budget=int(four * 0.8 / 0.9))
    assert "'flatbn' at batch size 1 failed: ValueError: Expected more than 1 value" in str(
        info.value
    )
