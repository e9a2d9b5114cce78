"""Every bad input gets one line on stderr and exit code 2, never a traceback (issue 14).

The table runs the CLI in-process through `batchlab.cli.main(argv)`; a few cases also run
through a real subprocess (the console script's exit code and stderr). Paths in the table:
{dir} an existing directory, {file} an existing regular file, {T:name} a task file from
TASK_FILES below (the user's own task code, each with one mistake).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchlab.cli import main

TASK_HEAD = """\
import torch
from torch import nn
from torch.utils.data import TensorDataset
import batchlab

X, Y = torch.randn(32, 3), torch.randint(0, 2, (32,))

def loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])

def acc(model, batch):
    return {"acc": (model(batch[0]).argmax(1) == batch[1]).float().mean()}

def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)

def linear():
    return nn.Linear(3, 2)

def task(**changes):
    kw = dict(name="mine", model=linear, train_data=TensorDataset(X, Y),
              val_data=TensorDataset(X, Y), loss=loss, metrics=acc, optimizer=sgd,
              lr=0.1, batch_size=8)
    kw.update(changes)
    return batchlab.Task(**kw)
"""

# name -> the body of `make()`, each one with the mistake a user makes.
TASK_FILES = {
    "raises": "raise ValueError('no data here')",
    "returns_str": "return 'mnist'",
    "model_str": "return task(model=lambda: 'resnet')",
    "no_len": "return task(train_data=iter([1, 2]))",
    "train_none": "return task(train_data=None)",
    "empty": "return task(train_data=TensorDataset(X[:0], Y[:0]))",
    "loss_raises": (
        "def bad(model, batch):\n        raise RuntimeError('shapes do not match')\n"
        "    return task(loss=bad)"
    ),
    "metrics_raise": (
        "def bad(model, batch):\n        return {'acc': 1 / 0}\n    return task(metrics=bad)"
    ),
    "metrics_list": ("def bad(model, batch):\n        return [0.5]\n    return task(metrics=bad)"),
    "loss_vector": (
        "def bad(model, batch):\n"
        "        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction='none')\n"
        "    return task(loss=bad)"
    ),
    "optimizer_str": "return task(optimizer=lambda p, lr: 'adam')",
    "model_raises": (
        "def bad():\n        return nn.Linear(3, 2, device='nowhere')\n    return task(model=bad)"
    ),
    "lr_zero": "return task(lr=0)",
    "not_callable_loss": "return task(loss=3)",
    "needs_args": "pass",
}
TASK_FILE_EXTRA = {"needs_args": "def make2(n):\n    return task()\n"}

STEPS = ["--max-steps", "2", "--device", "cpu"]
SWEEP = ["sweep", "--out", "{dir}/sweep", "dots", "--max-steps", "2", "--device", "cpu"]

CASES: list[tuple[list[str], str]] = [
    # train: numbers
    (["train", "dots", "--batch-size", "0"], "expected a positive integer, got 0"),
    (["train", "dots", "--batch-size", "-4"], "got -4"),
    (["train", "dots", "--batch-size", "2.5"], "--batch-size"),
    (["train", "dots", "--batch-size", "5000"], "larger than the training set"),
    (["train", "dots", "--lr", "0"], "expected a positive number"),
    (["train", "dots", "--lr", "-0.1"], "expected a positive number"),
    (["train", "dots", "--lr", "nan"], "expected a positive number"),
    (["train", "dots", "--lr", "inf"], "expected a positive number"),
    (["train", "dots", "--epochs", "nan"], "--epochs: expected a finite positive number"),
    (["train", "dots", "--epochs", "inf"], "--epochs: expected a finite positive number"),
    (["train", "dots", "--epochs", "0"], "--epochs"),
    (["train", "dots", "--epochs", "-1"], "--epochs"),
    (["train", "dots", "--max-steps", "0"], "max_steps"),
    (["train", "dots", "--max-steps", "-3"], "max_steps"),
    (["train", "dots", "--seed", "-1"], "--seed"),
    (["train", "dots", "--seed", "12345678901234567890123"], "--seed"),
    (["train", "dots", "--warmup-steps", "-1"], "warmup"),
    (["train", "dots", "--accumulation-steps", "0"], "accumulation"),
    (["train", "dots", "--lr-rule", "cubic"], "cubic"),
    (["train", "dots", "--target", "accuracy>0.9"], "expected METRIC OP VALUE"),
    (["train", "dots", "--target", "val_f1>=0.9"], "available: val_loss, val_acc"),
    (["train", "dots", "--device", "tpu"], "tpu"),
    (["train", "dots", "--nonsense"], "No such option"),
    # train: flags this run would ignore
    (["train", "dots", "--memory-cap", "8"], "--memory-cap would be ignored"),
    (["train", "dots", "--b-simple", "100"], "--b-simple would be ignored"),
    (["train", "dots", "--adaptive", "--accumulation-steps", "2"], "--accumulation-steps"),
    (["train", "dots", "--adaptive", "--accumulation-steps", "1"], "--accumulation-steps"),
    (["train", "dots", "--adaptive", "--batch-size", "8"], "--batch-size would be ignored"),
    # train: outputs checked before the run
    (["train", "dots", "--json", "{dir}"], "is a directory"),
    (["train", "dots", "--json", "{file}/h.json"], "which is a file"),
    # task names and task files
    (["train", "mnist2d"], "expected a built-in name (mnist1d-cnn"),
    (["train", "nosuch.py:make"], "does not exist"),
    (["train", "{file}:make"], "unknown task"),
    (["train", "{T:raises}:nothere"], "has no function 'nothere'"),
    (["train", "{T:needs_args}:make2"], "make2() raised TypeError"),
    (["train", "{T:raises}:make"], "make() raised ValueError: no data here"),
    (["train", "{T:returns_str}:make"], "returned str, expected a batchlab.Task"),
    (["train", "{T:model_str}:make", *STEPS], "`model` function"),
    (["train", "{T:no_len}:make"], "map-style dataset"),
    (["train", "{T:train_none}:make"], "got NoneType"),
    (["train", "{T:empty}:make"], "train_data is empty"),
    (["train", "{T:loss_raises}:make", *STEPS], "RuntimeError: shapes do not match in bad()"),
    (["train", "{T:metrics_raise}:make", *STEPS], "ZeroDivisionError"),
    (["train", "{T:metrics_list}:make", *STEPS], "returned list, expected a dict"),
    (["train", "{T:loss_vector}:make", *STEPS], "must return a scalar tensor"),
    (["train", "{T:optimizer_str}:make", *STEPS], "expected a torch.optim.Optimizer"),
    (["train", "{T:model_raises}:make", *STEPS], "in bad()"),
    (["train", "{T:lr_zero}:make"], "reference lr"),
    (["train", "{T:not_callable_loss}:make"], "`loss` to be callable"),
    (["noise", "{T:loss_raises}:make", "--steps", "2", "--device", "cpu"], "shapes do not"),
    (["probe", "{T:model_str}:make", "--device", "cpu"], "`model` function"),
    # calc
    (["calc", "--samples", "0", "--batch-size", "8"], "samples"),
    (["calc", "--samples", "10", "--batch-size", "0"], "expected a positive integer"),
    (["calc", "--samples", "1e26", "--batch-size", "8"], "--samples"),
    (["calc", "--samples", "abc", "--batch-size", "8"], "--samples"),
    (
        ["calc", "--samples", "10", "--batch-size", "8", "--world-size", "4", "--drop-last"],
        "no iterations",
    ),  # noqa: E501
    (["calc", "--samples", "10", "--batch-size", "8", "--epochs", "0"], "epochs"),
    (["calc", "--samples", "10", "--batch-size", "8", "--world-size", "0"], "world size"),
    (["calc", "--samples", "10", "--batch-size", "8", "--accumulation-steps", "-1"], "accum"),
    (["calc", "--batch-size", "8"], "--samples"),
    (["calc", "--samples", "10", "--batch-size", "8", "--json", "{dir}"], "is a directory"),
    # probe
    (
        ["probe", "dots", "--device", "cpu", "--memory-budget", "1GiB", "--target-memory", "2GiB"],
        "got both",
    ),  # noqa: E501
    (["probe", "dots", "--memory-budget", "lots"], "lots"),
    (["probe", "dots", "--memory-budget", "-1GiB"], "-1GiB"),
    (["probe", "dots", "--margin", "1.5"], "margin"),
    (["probe", "dots", "--margin", "nan"], "margin"),
    (["probe", "dots", "--time-budget", "0"], "time budget"),
    (["probe", "dots", "--time-budget", "nan"], "time budget"),
    (["probe", "dots", "--effective-batch", "0"], "effective"),
    (["probe", "dots", "--out", "{file}"], "--out"),
    (["probe", "dots", "--json", "{dir}"], "is a directory"),
    (["probe", "dots", "--device", "tpu"], "tpu"),
    (["probe", "dots", "--seed", "-2"], "--seed"),
    # plan
    (["plan", "dots", "--lr-rule", "cubic"], "cubic"),
    (["plan", "dots", "--noise-steps", "0"], "noise steps"),
    (["plan", "dots", "--throughput-seconds", "-1"], "time budget"),
    (["plan", "dots", "--target", "accuracy"], "expected METRIC OP VALUE"),
    (["plan", "dots", "--json", "{dir}"], "is a directory"),
    (["plan", "dots", "--json", "{file}/plan.json"], "which is a file"),
    (["plan", "dots", "--out", "{file}"], "is a file"),
    (["plan", "dots", "--out", "{file}/report"], "which is a file"),
    (["plan", "dots", "--margin", "2"], "margin"),
    (["plan", "dots", "--reference-run", "{dir}/missing.json"], "missing.json"),
    (["plan", "dots", "--reference-run", "{file}"], "{file}"),
    # noise
    (["noise", "dots", "--steps", "0"], "steps"),
    (["noise", "dots", "--every", "0"], "every"),
    (["noise", "dots", "--method", "magic"], "magic"),
    (["noise", "dots", "--json", "{dir}"], "is a directory"),
    (["noise", "dots", "--out", "{file}"], "is a file"),
    (["noise", "dots", "--seed", "-5"], "--seed"),
    # sweep
    (["sweep", "--out", "{file}", "dots"], "--out"),
    (["sweep", "dots"], "--out"),
    ([*SWEEP, "--batch-sizes", "8,x"], "batch sizes"),
    ([*SWEEP, "--batch-sizes", "0"], "0"),
    ([*SWEEP, "--lr-rule", "cubic"], "cubic"),
    ([*SWEEP, "--optimizer", "rmsprop"], "rmsprop"),
    ([*SWEEP, "--repeats", "0"], "--repeats"),
    ([*SWEEP, "--repeats", "100000"], "--repeats"),
    (["sweep", "--out", "{dir}/sweep", "dots", "--epochs", "nan"], "--epochs"),
    ([*SWEEP[:-4], "--max-steps", "0"], "max steps"),
    ([*SWEEP, "--backend", "spark"], "spark"),
    ([*SWEEP, "--from-plan", "{dir}/missing.json"], "missing.json"),
    ([*SWEEP, "--sharpness", "magic"], "magic"),
    ([*SWEEP, "--jobs", "0"], "--jobs"),
    ([*SWEEP, "--json", "{dir}"], "is a directory"),
    ([*SWEEP, "--seed", "99999999999999999999999"], "--seed"),
    # report
    (["report", "{dir}/nothing"], "expected a sweep directory"),
    (["report", "{file}"], "expected a sweep directory"),
    (["report", "{dir}/broken.json"], "not valid JSON"),
    (["report", "{dir}/list.json"], "JSON list"),
    # the top level
    (["nosuchcommand"], "No such command"),
    (["--nonsense"], "No such option"),
    (["tasks", "--json", "{dir}"], "is a directory"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_input")
    afile = root / "afile.txt"
    afile.write_text("not a directory\n")
    (root / "broken.json").write_text('{"task": "dots", "recommended": {')
    (root / "list.json").write_text("[1, 2, 3]\n")
    found = {"{dir}": str(root), "{file}": str(afile)}
    for name, body in TASK_FILES.items():
        path = root / f"task_{name}.py"
        extra = TASK_FILE_EXTRA.get(name, "")
        path.write_text(TASK_HEAD + f"\ndef make():\n    {body}\n\n" + extra)
        found[f"{{T:{name}}}"] = str(path)
    return found


def fill(args: list[str], paths: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        for key, value in paths.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def test_the_table_is_big_enough():
    assert len(CASES) >= 80
    assert len({tuple(a) for a, _ in CASES}) == len(CASES)  # no case twice


@pytest.mark.parametrize("args, match", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(capsys, paths, args, match):
    code = main(fill(args, paths))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("batchlab: error: "), err
    assert fill([match], paths)[0] in err


def test_debug_shows_the_traceback(capsys, paths, monkeypatch):
    args = fill(["train", "{T:loss_raises}:make", *STEPS], paths)
    assert main([*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "shapes do not match" in err
    assert err.splitlines()[-1].startswith("batchlab: error: ")
    monkeypatch.setenv("BATCHLAB_DEBUG", "1")
    assert main(args) == 2
    assert "Traceback" in capsys.readouterr().err


def test_user_code_errors_name_the_task_and_the_function(capsys, paths):
    args = fill(["train", "{T:loss_raises}:make", *STEPS], paths)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"task {paths['{T:loss_raises}']}:make" in err
    assert "RuntimeError: shapes do not match in bad() at task_loss_raises.py:" in err


@pytest.mark.parametrize(
    "args",
    [
        ["train", "dots", "--epochs", "nan"],
        ["train", "{T:metrics_list}:make", *STEPS],
        ["train", "{T:loss_raises}:make", *STEPS],
        ["sweep", "--out", "{file}", "dots"],
        ["calc", "--samples", "1e26", "--batch-size", "8"],
    ],
)
def test_through_a_real_process(paths, args):
    proc = subprocess.run(
        [sys.executable, "-m", "batchlab", *fill(args, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("batchlab: error:")


def test_an_internal_error_is_one_line_and_exit_1(capsys, monkeypatch):
    import batchlab.cli.calc_cmd as calc_cmd

    # A builtin that fails: no frame of the user's (or this test's) code in the traceback.
    monkeypatch.setattr(calc_cmd, "compute", {}.get)
    assert main(["calc", "--samples", "10", "--batch-size", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: TypeError" in err and "--debug" in err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("batchlab ")


def test_task_file_paths_are_real(paths):
    for key, value in paths.items():
        assert Path(value).exists(), key
    assert "def make()" in textwrap.dedent(Path(paths["{T:raises}"]).read_text())


def _api_cases(tmp: Path) -> list[tuple[str, object]]:
    """(label, a call that must raise a BatchlabError) for the library's own entry points."""
    import math

    import torch
    from conftest import tiny_task
    from torch.utils.data import TensorDataset

    import batchlab

    t = tiny_task()
    foreign = tmp / "plan.json"
    foreign.write_text('{"task": "dots", "recommended": {}}')
    (tmp / "list.json").write_text("[]")
    ok = {
        "name": "t", "model": lambda: torch.nn.Linear(4, 3), "loss": t.loss,
        "optimizer": t.optimizer, "lr": 0.1, "batch_size": 8,
    }  # fmt: skip
    return [
        ("train(epochs=nan)", lambda: batchlab.train(t, 8, epochs=math.nan)),
        ("train(epochs=inf)", lambda: batchlab.train(t, 8, epochs=math.inf)),
        ("train(seed=10**23)", lambda: batchlab.train(t, 8, max_steps=1, seed=10**23)),
        ("train(seed=-1)", lambda: batchlab.train(t, 8, max_steps=1, seed=-1)),
        ("load_task(None)", lambda: batchlab.load_task(None)),
        ("load_task(3)", lambda: batchlab.load_task(3)),
        ("Task(train_data=None)", lambda: batchlab.Task(**ok, train_data=None)),
        ("Task(train_data=iter)", lambda: batchlab.Task(**ok, train_data=iter([1]))),
        ("Task(val_data=5)", lambda: batchlab.Task(**ok, train_data=t.train_data, val_data=5)),
        ("Task(metrics=3)", lambda: batchlab.Task(**ok, train_data=t.train_data, metrics=3)),
        ("Task(name=None)", lambda: batchlab.Task(**{**ok, "name": None}, train_data=t.train_data)),
        ("History.load(plan)", lambda: batchlab.History.load(foreign)),
        ("History.load(list)", lambda: batchlab.History.load(tmp / "list.json")),
        ("History.load(dir)", lambda: batchlab.History.load(tmp)),
        ("scale_lr(B0=0)", lambda: batchlab.scale_lr(0.1, 0, 64, "linear")),
        ("scale_lr(lr=nan)", lambda: batchlab.scale_lr(math.nan, 32, 64, "linear")),
        ("calc(samples=1.5)", lambda: batchlab.calc(1.5, 8)),
        (
            "model returns str",
            lambda: batchlab.train(
                batchlab.Task(**{**ok, "model": lambda: "resnet"}, train_data=t.train_data),
                8,
                max_steps=1,
            ),
        ),
        (
            "metrics return list",
            lambda: batchlab.train(
                batchlab.Task(
                    **ok,
                    train_data=t.train_data,
                    val_data=TensorDataset(*t.train_data.tensors),
                    metrics=lambda m, b: [1.0],
                ),
                8,
                max_steps=1,
            ),
        ),
    ]


def test_api_bad_input_raises_batchlab_errors(tmp_path):
    import batchlab

    for label, call in _api_cases(tmp_path):
        with pytest.raises(batchlab.BatchlabError):
            call()
        print("ok", label)


def test_task_code_exceptions_keep_their_type_for_python_callers(tmp_path):
    # A loss that raises reaches a Python caller as itself (the probes tell OOM from other
    # errors by type); only the CLI turns it into one line.
    import torch
    from conftest import tiny_task

    import batchlab

    def bad_loss(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    t = tiny_task()
    task = batchlab.Task(
        name="t", model=t.model, train_data=t.train_data, loss=bad_loss,
        optimizer=t.optimizer, lr=0.1, batch_size=8,
    )  # fmt: skip
    with pytest.raises(torch.OutOfMemoryError):
        batchlab.train(task, 8, max_steps=1)
