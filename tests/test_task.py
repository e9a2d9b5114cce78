from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import batchlab
from batchlab.errors import ConfigError, TaskError
from batchlab.tasks import BUILTIN_TASKS


def _kwargs(**over):
    data = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    kw = dict(
        name="t",
        model=lambda: nn.Linear(2, 2),
        train_data=data,
        loss=lambda m, b: m(b[0]).sum(),
        optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr),
        lr=0.1,
        batch_size=2,
    )
    kw.update(over)
    return kw


def test_task_defaults_and_sizes():
    task = batchlab.Task(**_kwargs())
    assert (task.val_data, task.metrics, task.collate_fn, task.epochs) == (None, None, None, None)
    assert task.description == "" and dict(task.extra) == {}
    assert (task.batch_size, task.lr, task.num_train, task.num_val) == (2, 0.1, 4, 0)
    assert isinstance(task.model(), nn.Module)


def test_load_task_passes_a_task_through():
    task = batchlab.Task(**_kwargs())
    assert batchlab.load_task(task) is task


@pytest.mark.parametrize(
    "over, match",
    [
        ({"batch_size": 0}, "expected a positive integer, got 0"),
        ({"batch_size": 2.5}, "expected a positive integer, got 2.5"),
        ({"lr": 0}, "expected a positive number, got 0"),
        ({"model": 3}, "expected `model` to be callable"),
    ],
)
def test_task_rejects_bad_fields(over, match):
    with pytest.raises(batchlab.BatchlabError) as info:
        batchlab.Task(**_kwargs(**over))
    assert match in str(info.value)


def test_load_builtin_by_name():
    for name in BUILTIN_TASKS:
        task = batchlab.load_task(name)
        assert task.name == name
        assert task.num_train > 0 and task.num_val > 0


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(TaskError) as info:
        batchlab.load_task("mnist2d")
    assert "mnist1d-cnn" in str(info.value) and "charlm" in str(info.value)


TASK_FILE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
import batchlab

def make():
    data = TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    return batchlab.Task(
        name="from-file", model=lambda: nn.Linear(3, 2), train_data=data,
        loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
        optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), lr=0.1, batch_size=4)

def not_a_task():
    return 42
"""


def test_load_task_from_file(tmp_path: Path):
    path = tmp_path / "mytask.py"
    path.write_text(TASK_FILE)
    task = batchlab.load_task(f"{path}:make")
    assert task.name == "from-file" and task.num_train == 16


@pytest.mark.parametrize(
    "spec, match",
    [
        ("missing.py:make", "does not exist"),
        ("{path}:nothing", "has no function 'nothing'; functions defined there: make, not_a_task"),
        ("{path}:not_a_task", "returned int, expected a batchlab.Task"),
    ],
)
def test_load_task_file_errors(tmp_path: Path, spec, match):
    path = tmp_path / "mytask.py"
    path.write_text(TASK_FILE)
    with pytest.raises(TaskError) as info:
        batchlab.load_task(spec.format(path=path))
    assert match in str(info.value)


def test_task_file_that_fails_to_import(tmp_path: Path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(TaskError) as info:
        batchlab.load_task(f"{path}:make")
    assert "RuntimeError: boom" in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
