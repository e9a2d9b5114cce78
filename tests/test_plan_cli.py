"""`batchlab plan` end to end on a small task, the report, and its bad inputs."""

import json

import pytest

import batchlab.planner.measure as plan_measure
from batchlab.cli import main
from batchlab.planner import Plan

FAST = ["--memory-budget", "256MiB", "--noise-steps", "30", "--throughput-seconds", "1"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    code = main(["plan", "digits-mlp", *FAST, "--json", str(out / "plan.json"), "--out", str(out)])
    assert code == 0
    return out


def test_plan_json_has_the_documented_fields(planned):
    data = json.loads((planned / "plan.json").read_text())
    rec = data["recommended"]
    for key in (
        "batch_size",
        "micro_batch_size",
        "accumulation_steps",
        "lr",
        "lr_rule",
        "warmup_steps",
        "predicted_speedup",
    ):
        assert key in rec and key in data["efficient"]
    assert data["reference"] == {"batch_size": 32, "lr": 0.05}
    assert rec["lr_rule"] == "linear"  # digits-mlp trains with SGD
    assert data["max_batch_size"] >= 1 and data["b_simple"] > 0
    assert len(data["b_simple_trajectory"]) >= 2
    assert data["plan_seconds"] > 0 and data["plan_steps"] > 30
    ref = next(c for c in data["candidates"] if c["batch_size"] == 32)
    assert ref["predicted_speedup"] == pytest.approx(1.0)
    assert Plan.from_dict(data).to_dict() == data


def test_plan_report_embeds_the_plots(planned):
    html = (planned / "report.html").read_text()
    assert html.count("<img") >= 4 and "data:image/png;base64," in html
    assert "batchlab plan: digits-mlp" in html and "Candidates" in html


def test_report_rebuilds_from_json_without_measuring(planned, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("report must not measure")

    monkeypatch.setattr(plan_measure, "run_probe", boom)
    monkeypatch.setattr(plan_measure, "measure_noise", boom)
    code = main(["report", str(planned / "plan.json"), "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "report.html").read_text().count("<img") >= 4


def test_plan_terminal_output(capsys, monkeypatch, planned):
    plan = Plan.load(planned / "plan.json")
    monkeypatch.setattr("batchlab.cli.plan_cmd.make_plan", lambda *a, **k: plan)
    code = main(["plan", "digits-mlp"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Recommended (fastest)" in out and "Efficient (B ~ B_noise)" in out
    assert f"{plan.recommended.batch_size}" in out and "Candidates" in out and "reference" in out
    assert "Verdict:" in out and "predicted critical batch" in out and "cost: noise phase" in out


def test_keep_b0_in_plain_words_in_terminal_json_and_report(capsys, monkeypatch, planned, tmp_path):
    """A plan whose best gain lies inside its interval says "keep B0" everywhere it is shown."""
    import dataclasses

    plan = Plan.load(planned / "plan.json")
    keep = dataclasses.replace(
        plan, verdict="keep B0=32: the best predicted gain lies within its interval (test)",
        keep_reference=True,
    )  # fmt: skip
    monkeypatch.setattr("batchlab.cli.plan_cmd.make_plan", lambda *a, **k: keep)
    code = main(["plan", "digits-mlp", "--json", str(tmp_path / "p.json"), "--out", str(tmp_path)])
    assert code == 0
    assert "within its interval (test)" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["verdict"].startswith("keep B0")
    assert "within its interval (test)" in (tmp_path / "report.html").read_text()


def test_interrupted_plan_prints_what_it_measured(capsys, monkeypatch, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_measure, "measure_noise", interrupted)
    path = tmp_path / "partial.json"
    code = main(["plan", "dots", *FAST, "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 130
    assert "PARTIAL" in out and "max batch" in out
    data = json.loads(path.read_text())
    assert (
        data["partial"] is True and data["probe"]["max_batch_size"] >= 1 and data["noise"] is None
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["--target", "val_f1>=0.9"], "available: val_loss, val_acc"),
        (["--memory-budget", "12XB"], "12XB"),
        (["--noise-steps", "0"], "expected a positive integer"),
        (["--lr-rule", "cubic"], "cubic"),
    ],
)
def test_plan_bad_input(capsys, args, match):
    code = main(["plan", "dots", *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1


def test_report_of_a_non_plan_json(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}')
    code = main(["report", str(path)])
    assert code == 2 and "is not a plan" in capsys.readouterr().err
