"""Files handed to `plan --reference-run`, `report` and `sweep --from-plan` are checked:
against their schema (every field, with its type) and against the task and target they
claim. Each bad file is one `ConfigError` (one line, exit 2 on the CLI), never a traceback
and never a silently wrong prediction."""

import dataclasses
import json

import pytest
from test_plan_model import measurements

from batchlab import train
from batchlab.cli import main
from batchlab.errors import ConfigError
from batchlab.planner import build_plan
from batchlab.planner.measure import _reference_seconds
from batchlab.planner.reference import load_reference_run
from batchlab.tasks import load_task

TARGET = "val_loss<=100"  # reached at the first evaluation


@pytest.fixture(scope="module")
def dots():
    return load_task("dots")


@pytest.fixture(scope="module")
def reference(dots):
    return train(dots, dots.batch_size, max_steps=3, eval_every=1, target=TARGET, device="cpu")


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


BAD_FILES = [
    ("missing", None, "does not exist"),
    ("empty", "", "is empty"),
    ("truncated", '{"task": "dots", "batch_size": 3', "is not valid JSON"),
    ("foreign", '{"name": "not a run"}', "is not a training History (it lacks task, batch_size"),
    ("list", "[1, 2, 3]", "holds a JSON list, expected an object"),
    ("directory", "<dir>", "is a directory, expected a JSON file"),
    ("binary", b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "is not text (binary data)"),
]


def _write(tmp_path, kind, content):
    path = tmp_path / f"{kind}.json"
    if content == "<dir>":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize(("kind", "content", "message"), BAD_FILES)
def test_a_bad_reference_run_file_is_one_clear_error(tmp_path, kind, content, message):
    path = _write(tmp_path, kind, content)
    with pytest.raises(ConfigError) as info:
        load_reference_run(path)
    text = str(info.value)
    assert f"reference run {str(path)!r} {message}" in text and "\n" not in text
    assert info.value.param == "reference_run"


@pytest.mark.parametrize(("kind", "content", "message"), BAD_FILES)
def test_plan_reference_run_on_the_cli_is_one_line_and_exit_2(
    capsys, tmp_path, kind, content, message
):
    path = _write(tmp_path, kind, content)
    code, out, err = run_cli(capsys, "plan", "dots", "--reference-run", path, "--device", "cpu")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""


def test_a_reference_run_with_a_wrong_typed_field_is_refused(tmp_path, reference):
    data = reference.to_dict()
    data["evals"][0]["metrics"] = ["acc", 1.0]
    data["seconds_to_target"] = "soon"
    path = tmp_path / "typed.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_reference_run(path)
    assert "does not match this version's History" in str(info.value)
    assert "evals.metrics: expected a JSON object, got list" in str(info.value)


def test_a_good_reference_run_gives_its_seconds_to_target(tmp_path, dots, reference):
    path = reference.save(tmp_path / "ref.json")
    assert reference.seconds_to_target is not None
    assert _reference_seconds(path, dots, TARGET) == reference.seconds_to_target
    # The same target, written differently, is the same target.
    assert _reference_seconds(path, dots, "val_loss <= 100.0") == reference.seconds_to_target
    assert _reference_seconds(None, dots, TARGET) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "digits-mlp"}, "its task 'digits-mlp', this plan's is 'dots'"),
        ({"num_train": 500}, "its training-set size 500, this plan's is 2000"),
        ({"effective_batch_size": 7}, "its effective batch size 7, this plan's is"),
        ({"target": "val_acc>=0.9"}, "its target 'val_acc>=0.9', this plan's is 'val_loss<=100'"),
        ({"seconds_to_target": None, "steps_to_target": None}, "never reached its target"),
    ],
)
def test_a_reference_run_of_another_task_or_target_is_refused(
    tmp_path, dots, reference, change, message
):
    path = dataclasses.replace(reference, **change).save(tmp_path / "ref.json")
    with pytest.raises(ConfigError) as info:
        _reference_seconds(path, dots, TARGET)
    assert message in str(info.value) and "\n" not in str(info.value)
    # A History object passed in Python is checked the same way.
    with pytest.raises(ConfigError, match="reference run"):
        _reference_seconds(dataclasses.replace(reference, **change), dots, TARGET)


def test_plan_cli_refuses_a_reference_run_of_another_target(capsys, tmp_path, reference):
    path = reference.save(tmp_path / "ref.json")
    code, _, err = run_cli(
        capsys,
        "plan",
        "dots",
        "--reference-run",
        path,
        "--target",
        "val_acc>=0.5",
        "--device",
        "cpu",
    )
    assert code == 2 and err.count("\n") == 1
    assert "its target 'val_loss<=100', this plan's is 'val_acc>=0.5'" in err


# -- plan files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_dict():
    return build_plan(measurements(), b_simple=300.0).to_dict()


def _set(data, path, value):
    data = json.loads(json.dumps(data))
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return data


WRONG_PLANS = [
    ("recommended.batch_size", "64", "Plan.recommended.batch_size: expected int, got str '64'"),
    ("recommended.lr", [0.1], "Plan.recommended.lr: expected float, got list"),
    ("b_simple", "big", "Plan.b_simple: expected float, got str 'big'"),
    ("recommended", [1, 2], "expected a JSON object for Recommendation, got list"),
    ("candidates", 5, "int"),
    ("warnings", "none", "warnings: expected a JSON object for PlanWarning, got str"),
    ("measurements.num_train", 2.5, "Plan.measurements.num_train: expected int, got float"),
    ("reference", [32, 0.1], "expected a JSON object, got list"),
    ("max_batch_size", True, "Plan.max_batch_size: expected int, got bool"),
    ("recommended.batch_size", KeyError, "missing 1 required positional argument: 'batch_size'"),
    ("measurements.throughput", KeyError, "'throughput'"),
]


@pytest.mark.parametrize(("path", "value", "message"), WRONG_PLANS)
def test_report_on_a_plan_with_wrong_or_missing_fields_is_one_line(
    capsys, tmp_path, plan_dict, path, value, message
):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(_set(plan_dict, path, value)))
    code, _, err = run_cli(capsys, "report", plan_file, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert "does not match this version's plan schema" in err and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("path", "value", "message"), WRONG_PLANS[:4])
def test_sweep_from_plan_with_wrong_types_is_one_line(
    capsys, tmp_path, plan_dict, path, value, message
):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(_set(plan_dict, path, value)))
    code, _, err = run_cli(
        capsys, "sweep", "digits-mlp", "--max-steps", "3", "--from-plan", plan_file,
        "--out", tmp_path / "s",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "does not match this version's plan schema" in err and message in err, err
    assert not (tmp_path / "s" / "results.jsonl").exists()


def test_report_on_a_plan_without_top_level_fields_names_them(capsys, tmp_path, plan_dict):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(
        json.dumps(_set(_set(plan_dict, "recommended", KeyError), "b_simple", KeyError))
    )
    code, _, err = run_cli(capsys, "report", plan_file)
    assert code == 2 and "is not a plan" in err and "lacks recommended, b_simple" in err
