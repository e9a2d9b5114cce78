"""The CLI: real output, JSON, and one clean line for every bad input."""

import json
import subprocess
import sys

import pytest

from batchlab.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_calc_textbook_json(capsys):
    code, out, _ = run_cli(
        capsys, "calc", "--samples", "1024", "--batch-size", "8", "--epochs", "10", "--json", "-"
    )
    assert code == 0
    data = json.loads(out)
    assert data["iterations_per_epoch"] == 128 and data["total_iterations"] == 1280
    for key in ("optimizer_steps_per_epoch", "effective_batch_size", "samples_per_epoch"):
        assert key in data


def test_calc_table(capsys):
    code, out, _ = run_cli(capsys, "calc", "--samples", "1000", "--batch-size", "64", "--drop-last")
    assert code == 0 and "iterations_per_epoch" in out and "15" in out


def test_tasks_lists_builtins(capsys):
    code, out, _ = run_cli(capsys, "tasks", "--json", "-")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["tasks"]}
    assert set(rows) == {"mnist1d-cnn", "mnist1d-mlp", "digits-mlp", "charlm", "dots"}
    assert rows["mnist1d-cnn"]["train"] == 4000 and rows["mnist1d-cnn"]["batch_size"] == 100


def test_train_json_and_summary(capsys, tmp_path):
    path = tmp_path / "h.json"
    code, out, _ = run_cli(
        capsys,
        "train",
        "dots",
        "--max-steps",
        "20",
        "--target",
        "val_acc>=0.99",
        "--json",
        str(path),
    )
    assert code == 0
    assert "val acc (final / best)" in out and "not reached" in out
    data = json.loads(path.read_text())
    assert data["total_steps"] == 20 and data["task"] == "dots"


BAD = [
    (["train", "dots", "--batch-size", "0"], "expected a positive integer, got 0"),
    (["train", "dots", "--batch-size", "-4"], "expected a positive integer, got -4"),
    (["train", "dots", "--batch-size", "2.5"], "--batch-size"),
    (["train", "dots", "--batch-size", "5000"], "larger than the training set"),
    (["train", "dots", "--lr", "0"], "expected a positive number"),
    (["train", "dots", "--lr", "-0.1"], "expected a positive number"),
    (["train", "nosuch.py:make"], "does not exist"),
    (["train", "mnist2d"], "expected a built-in name (mnist1d-cnn"),
    (["train", "dots", "--target", "accuracy>0.9"], "expected METRIC OP VALUE"),
    (["train", "dots", "--target", "val_f1>=0.9"], "available: val_loss, val_acc"),
    (["calc", "--samples", "10", "--batch-size", "0"], "expected a positive integer"),
    (["train", "dots", "--nonsense"], "No such option"),
]


@pytest.mark.parametrize("args, match", BAD)
def test_bad_input_is_one_line_exit_2(capsys, args, match):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("batchlab: error: ")
    assert match in err
    assert "Traceback" not in err + out


def test_non_scalar_loss_from_task_file(capsys, tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\nimport batchlab\n"
        "def make():\n"
        "    d = TensorDataset(torch.randn(16, 3), torch.randn(16, 2))\n"
        "    return batchlab.Task(name='b', model=lambda: nn.Linear(3, 2), train_data=d,\n"
        "        loss=lambda m, b: (m(b[0]) - b[1]) ** 2,\n"
        "        optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), lr=0.1, batch_size=4)\n"
    )
    code, _, err = run_cli(capsys, "train", f"{path}:make", "--max-steps", "2")
    assert code == 2 and "must return a scalar tensor" in err and err.count("\n") == 1


def test_console_script_exit_code_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "batchlab", "train", "dots", "--batch-size", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("batchlab: error:")


def test_library_errors_name_parameters_and_the_cli_shows_flags(capsys):
    # The library's message names `memory_budget` and `target_memory`; the CLI prints the
    # flags the user typed, through the one rewrite in cli/common.py.
    code, _, err = run_cli(
        capsys, "probe", "dots", "--device", "cpu", "--memory-budget", "1GiB",
        "--target-memory", "2GiB",
    )  # fmt: skip
    assert code == 2
    assert err == (
        "batchlab: error: expected one of --memory-budget (verify on this device) or "
        "--target-memory (predict for another device), got both; drop one\n"
    )


def test_with_flags_maps_parameters_of_the_running_command_only():
    import typer

    from batchlab.cli import app
    from batchlab.cli.common import with_flags

    probe = typer.main.get_command(app).commands["probe"]
    text = "give `memory_budget`, `effective_batch_size` or `throughput_seconds`; `no_such`"
    assert with_flags(text, probe) == (
        "give --memory-budget, --effective-batch or --time-budget; `no_such`"
    )
    plan = typer.main.get_command(app).commands["plan"]
    assert with_flags("`throughput_seconds`", plan) == "--throughput-seconds"
    assert with_flags("`memory_budget`", None) == "`memory_budget`"  # no command running
