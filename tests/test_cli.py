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


def _ctrl_c(*args, **kwargs):
    """What a user's Ctrl-C does: SIGINT to this process (Python raises KeyboardInterrupt)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGINT)
    raise AssertionError("SIGINT did not interrupt")


def test_ctrl_c_in_train_says_nothing_was_kept_and_exits_130(capsys, monkeypatch):
    import batchlab.cli.train_cmd as train_cmd

    monkeypatch.setattr(train_cmd, "run_training", _ctrl_c)
    code, _, err = run_cli(capsys, "train", "dots", "--max-steps", "2")
    assert code == 130
    assert err.strip().splitlines()[-1] == "batchlab: error: interrupted; nothing was saved"


def test_ctrl_c_in_sweep_says_where_the_finished_runs_are(capsys, monkeypatch, tmp_path):
    import batchlab.cli.sweep_cmd as sweep_cmd

    monkeypatch.setattr(sweep_cmd, "run_sweep", _ctrl_c)
    out = tmp_path / "sw"
    code, _, err = run_cli(
        capsys, "sweep", "dots", "--out", str(out), "--max-steps", "2", "--batch-sizes", "8"
    )
    assert code == 130
    assert f"interrupted; kept 0 finished runs in {out}; run the same command again" in err


def test_ctrl_c_in_plan_keeps_the_partial_plan(capsys, monkeypatch, tmp_path):
    import batchlab.cli.plan_cmd as plan_cmd
    from batchlab.planner import PlanInterrupted

    def interrupted(*args, **kwargs):
        try:
            _ctrl_c()
        except KeyboardInterrupt:
            raise PlanInterrupted("the noise measurement", {"probe": None}) from None

    monkeypatch.setattr(plan_cmd, "make_plan", interrupted)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "plan", "dots")
    assert code == 130 and "PARTIAL" in out
    saved = tmp_path / "batchlab-plan-partial.json"
    assert json.loads(saved.read_text())["interrupted_during"] == "the noise measurement"
    assert "interrupted; kept the JSON in batchlab-plan-partial.json" in err


def test_a_bad_out_fails_before_any_measuring(capsys, monkeypatch, tmp_path):
    import batchlab.cli.noise_cmd as noise_cmd

    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr(noise_cmd, "measure_noise", _ctrl_c)  # must never be reached
    code, _, err = run_cli(capsys, "noise", "dots", "--out", str(afile / "plots"))
    assert code == 2 and "which is a file" in err


def test_json_is_written_before_the_plot_and_kept_when_the_plot_fails(
    capsys, monkeypatch, tmp_path
):
    import batchlab.report.noise_plots as noise_plots

    def full_disk(run, path):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(noise_plots, "save_noise_plot", full_disk)
    path = tmp_path / "noise.json"
    code, _, err = run_cli(
        capsys, "noise", "dots", "--steps", "4", "--every", "2", "--device", "cpu",
        "--json", str(path), "--out", str(tmp_path / "plots"),
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "No space left on device" in err and "the JSON was written first" in err
    assert json.loads(path.read_text())["steps"] == 4


def test_calc_is_exact_for_huge_counts(capsys):
    samples = 10**26 + 1
    code, out, _ = run_cli(
        capsys, "calc", "--samples", str(samples), "--batch-size", "3", "--world-size", "7",
        "--json", "-",
    )  # fmt: skip
    data = json.loads(out)
    per_rank = -(-samples // 7)
    assert code == 0 and data["iterations_per_epoch"] == -(-per_rank // 3)
    assert data["samples_per_epoch"] == per_rank * 7


def test_tables_fit_80_columns_without_cutting_words(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0 and "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "char transformer," in out and "epochs" in out  # wrapped, not cut


def test_help_shows_the_extras_names(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    code, out, _ = run_cli(capsys, "sweep", "--help")
    assert code == 0 and "pip install 'batchlab[ray]'" in out


def test_debug_and_version_are_in_the_top_level_help(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "--version" in out and "--debug" in out
