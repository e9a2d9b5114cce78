"""`batchlab sweep` and `batchlab report` end to end, the backend contract, and bad input."""

import html
import json
import re
import shlex

import pytest
import torch
from test_plan_model import known_plan

from batchlab.cli import main
from batchlab.step import TrainStep
from batchlab.sweep.build import SGD_OVER_ADAM_LR, make_sweep_spec
from batchlab.sweep.runner import LocalBackend, RayBackend, RunContext, execute_run, run_sweep
from batchlab.sweep.store import SweepStore

FAST = ["--max-steps", "12", "--repeats", "1", "--jobs", "1"]

# digits-mlp's reference is B0=32, lr0=0.05: the plan trains 128 as 2 x 64, and 64.
PLAN = known_plan(
    recommended=(128, 64, 2, 0.2, 2, 2.4, 1.55),
    efficient=(64, 64, 1, 0.1, 0, 1.7, 2.1),
    candidates=((32, 3.2, 0.001, 1.0), (64, 2.1, 0.0012, 1.7), (128, 1.55, 0.0018, 2.4)),
    b_simple=70.0,
)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def without_timing(record):
    data = record.to_dict()
    data.pop("seconds")
    data.pop("worker")
    h = data["history"]
    for key in ("train_seconds", "eval_seconds", "seconds_to_target"):
        h.pop(key)
    for ev in h["evals"]:
        ev.pop("train_seconds")
    return data


def test_sweep_runs_stores_reports_and_resumes(capsys, tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", "digits-mlp", "--batch-sizes", "16,64,256", *FAST, "--out", out]
    args += ["--sharpness", "hessian,epsilon"]
    code, stdout, _ = run_cli(capsys, *args, "--json", tmp_path / "r.json")
    assert code == 0
    assert "batchlab sweep digits-mlp: 3 runs" in stdout
    assert "target val_acc>=" in stdout and "(auto)" in stdout
    assert f"report: {out / 'report.html'}" in stdout
    for name in ("sweep.json", "results.jsonl", "report.html"):
        assert (out / name).is_file()
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    record = json.loads(lines[0])
    for key in ("history", "train_loss", "sharpness", "seconds"):
        assert key in record
    assert record["history"]["extras"]["distance_from_init"]["values"]
    assert record["sharpness"]["hessian_top_eigenvalue"]["method"] == "hessian_top_eigenvalue"
    assert "Keskar" in record["sharpness"]["epsilon_sharpness"]["description"]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["sweep"]["runs_done"] == 3 and data["analysis"]["groups"][0]["points"]

    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and "0 runs" in stdout and "3 already done" in stdout
    assert "resuming: 3 of 3 runs" in err
    assert len((out / "results.jsonl").read_text().splitlines()) == 3

    code, _, err = run_cli(
        capsys, "sweep", "digits-mlp", "--batch-sizes", "16,64", *FAST, "--out", out
    )
    assert code == 2
    assert (
        err.count("\n") == 1
        and "holds a different sweep (differs in: batch_sizes, runs, sharpness)" in err
    )


def test_report_rebuilds_from_the_store_alone(capsys, tmp_path, monkeypatch):
    out = tmp_path / "sw"
    assert (
        run_cli(capsys, "sweep", "digits-mlp", "--batch-sizes", "16,64,256", *FAST, "--out", out)[0]
        == 0
    )
    (out / "report.html").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("report must not train")

    monkeypatch.setattr(TrainStep, "__call__", no_training)  # every optimizer step
    code, stdout, _ = run_cli(capsys, "report", out)
    assert code == 0 and "report.html" in stdout
    html = (out / "report.html").read_text()
    for text in (
        "batchlab sweep: digits-mlp",
        "Steps and examples to target",
        "data:image/png;base64,",
        "batchlab report",
    ):
        assert text in html
    assert html.count("<img") >= 10

    code, _, _ = run_cli(capsys, "report", out, "--out", tmp_path / "elsewhere")
    assert code == 0 and (tmp_path / "elsewhere" / "report.html").is_file()


def test_report_says_what_it_expected(capsys, tmp_path):
    code, _, err = run_cli(capsys, "report", tmp_path)
    assert code == 2 and "expected a sweep directory (with sweep.json) or a plan .json file" in err
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"recommended": PLAN.recommended.to_dict()}))
    code, _, err = run_cli(capsys, "report", plan)  # the plan branch: not a whole plan
    assert code == 2 and "is not a plan" in err and err.count("\n") == 1


def test_from_plan_adds_the_plans_batches_and_compares_speedups(capsys, tmp_path):
    plan = PLAN.save(tmp_path / "plan.json")
    out = tmp_path / "sw"
    code, stdout, _ = run_cli(
        capsys,
        "sweep",
        "digits-mlp",
        "--batch-sizes",
        "32,64",
        "--max-steps",
        "30",
        "--repeats",
        "1",
        "--jobs",
        "1",
        "--target",
        "val_acc>=0.5",
        "--from-plan",
        plan,
        "--out",
        out,
        "--json",
        "-",
    )
    assert code == 0
    data = json.loads(stdout)
    spec = SweepStore(out).read_spec()
    plan_runs = [r for r in spec.runs if r.source.startswith("plan:")]
    assert {
        (r.source, r.batch_size, r.micro_batch_size, r.accumulation_steps, r.lr, r.warmup_steps)
        for r in plan_runs
    } == {
        ("plan:reference", 32, 32, 1, 0.05, 0),
        ("plan:recommended", 128, 64, 2, 0.2, 2),
        ("plan:efficient", 64, 64, 1, 0.1, 0),
    }
    assert spec.b_simple == 70.0
    rows = {(r["role"], r["batch_size"]): r for r in data["analysis"]["plan"]}
    assert rows[("recommended", 128)]["predicted_speedup"] == 2.4
    assert rows[("reference", 32)]["measured_steps_ratio"] == pytest.approx(1.0)
    assert rows[("recommended", 128)]["predicted_steps_ratio"] == pytest.approx(3.2 / 1.55)
    page = (out / "report.html").read_text()
    assert "Plan check" in page and "B_simple (measured)" in page

    # The report's Reproduce command makes exactly this sweep: run again, it resumes.
    commands = re.search(r'<pre class="cmd">(.*?)</pre>', page, re.S).group(1)
    sweep_command, report_command = html.unescape(commands).splitlines()
    assert f"--from-plan {plan}" in sweep_command and report_command == f"batchlab report {out}"
    code, stdout, _ = run_cli(capsys, *shlex.split(sweep_command)[1:], "--jobs", "1")
    assert code == 0 and "0 runs in" in stdout and f"({len(spec.runs)} already done" in stdout


def test_a_diverging_lr_is_recorded_and_the_sweep_goes_on(capsys, tmp_path):
    out = tmp_path / "sw"
    code, stdout, _ = run_cli(
        capsys,
        "sweep",
        "digits-mlp",
        "--batch-sizes",
        "16,32",
        "--lr",
        "1e10",
        "--lr-rule",
        "none",
        *FAST,
        "--out",
        out,
    )
    assert code == 0
    records = SweepStore(out).read().records
    assert [r.status for r in records] == ["diverged", "diverged"]
    assert all(r.history.diverged_step is not None for r in records)
    assert "diverged in 1 of 1 repeats" in stdout


def test_the_same_seed_gives_identical_results_on_cpu(tmp_path):
    spec = make_sweep_spec(
        "digits-mlp",
        batch_sizes="16,64",
        max_steps=10,
        sharpness_examples=64,
        sharpness="hessian,epsilon",
    )
    a = run_sweep(spec, tmp_path / "a")
    b = run_sweep(spec, tmp_path / "b")
    assert a.runs_done == b.runs_done == 2
    ra, rb = SweepStore(tmp_path / "a").read().records, SweepStore(tmp_path / "b").read().records
    assert [without_timing(r) for r in ra] == [without_timing(r) for r in rb]
    other = make_sweep_spec(
        "digits-mlp", batch_sizes="16,64", max_steps=10, sharpness_examples=64, seed=1
    )
    run_sweep(other, tmp_path / "c")
    rc = SweepStore(tmp_path / "c").read().records
    assert (
        without_timing(rc[0])["history"]["train_loss"]
        != without_timing(ra[0])["history"]["train_loss"]
    )


def _ray_available():
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = [
    pytest.param(lambda: LocalBackend(jobs=1), id="local-1"),
    pytest.param(lambda: LocalBackend(jobs=2), id="local-2", marks=pytest.mark.slow),
    pytest.param(
        lambda: RayBackend(threads=1, num_cpus=2),
        id="ray",
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(not _ray_available(), reason="ray is not installed"),
        ],
    ),
]


@pytest.mark.parametrize("make_backend", BACKENDS)
def test_every_backend_runs_each_run_once_with_the_same_results(make_backend, tmp_path):
    """The backend contract: every run once, results as in-process (up to float threading)."""
    spec = make_sweep_spec(
        "digits-mlp", batch_sizes="16,64,128", max_steps=8, sharpness_examples=64
    )
    backend = make_backend()
    result = run_sweep(spec, tmp_path, backend=backend)
    assert result.runs_done == 3 and result.failed == 0
    records = {r.run_id: r for r in SweepStore(tmp_path).read().records}
    assert sorted(records) == sorted(r.run_id for r in spec.runs)
    context = RunContext.from_spec(spec)
    for run in spec.runs:
        expected = execute_run(spec.task_ref, run, context)
        got = records[run.run_id]
        assert got.history.total_steps == expected.history.total_steps
        assert torch.allclose(
            torch.tensor(got.history.train_loss),
            torch.tensor(expected.history.train_loss),
            rtol=1e-4,
        )
        assert got.train_loss == pytest.approx(expected.train_loss, rel=1e-4)


def test_local_backend_sets_threads_so_workers_times_threads_fit_the_cores():
    assert LocalBackend(jobs=2, cores=2).threads == 1
    assert LocalBackend(jobs=1, cores=8).threads == 8
    assert LocalBackend(jobs=3, cores=8).threads == 2
    assert LocalBackend(jobs=16, cores=2).threads == 1


def test_optimizer_swap_and_lr_rules_in_the_spec():
    spec = make_sweep_spec("dots", batch_sizes="32,128", optimizers="sgd,adam", max_steps=5)
    by = {(r.optimizer, r.batch_size): r for r in spec.runs}
    # dots is an Adam task (lr 1e-2 at B0=32): Adam scales by sqrt, SGD by linear from 10x.
    assert by[("adam", 128)].lr == pytest.approx(1e-2 * 2)
    assert by[("sgd", 32)].lr == pytest.approx(1e-2 * SGD_OVER_ADAM_LR)
    assert by[("sgd", 128)].lr == pytest.approx(1e-2 * SGD_OVER_ADAM_LR * 4)
    assert by[("sgd", 128)].warmup_steps == 1  # LR x4 > 2: Goyal et al.'s gradual warm-up
    tuned = make_sweep_spec("dots", batch_sizes="32", lr_rule="tuned", max_steps=5)
    assert sorted(r.lr for r in tuned.runs) == pytest.approx([5e-3, 1e-2, 2e-2])
    ada = make_sweep_spec(
        "dots", batch_sizes="32,256", lr_rule="adascale", b_simple=64.0, max_steps=5
    )
    # AdaScale gain r = (B/B0)(B_simple + B0)/(B_simple + B) (Johnson et al. 2020), B0 = 32
    assert [r.lr for r in ada.runs] == pytest.approx([1e-2, 1e-2 * 8 * 96 / 320])
    assert ada.runs[1].lr_rule == "adascale" and ada.b_simple == 64.0
    default = make_sweep_spec("digits-mlp")
    assert default.batch_sizes == (8, 16, 32, 64, 128, 256, 512, 1024)
    assert default.epochs == 30 and min(r.max_steps for r in default.runs) == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--lr-rule", "cubic"],
            "lr rule: expected one of auto, none, linear, sqrt, adascale, tuned, got 'cubic'",
        ),
        (["--optimizer", "lion"], "optimizer: expected a comma-separated list of task, sgd, adam"),
        (["--batch-sizes", "a,b"], "expected comma-separated integers like 32,64,128"),
        (["--batch-sizes", "16,4096"], "batch sizes [4096] are larger than the training set"),
        (["--lr-rule", "adascale"], "--lr-rule 'adascale' needs B_simple: pass a --from-plan"),
        (["--epochs", "2"], "give --epochs or --max-steps, not both"),
        (["--target", "val_f1>=0.5"], "val_f1, which this task does not report"),
        (["--backend", "slurm"], "backend: expected one of local, ray, got 'slurm'"),
        (["--from-plan", "missing.json"], "plan file 'missing.json' does not exist"),
        (
            ["--sharpness", "trace"],
            "sharpness: expected a comma-separated list of hessian, epsilon",
        ),
    ],
)
def test_bad_input_is_one_clear_line(capsys, tmp_path, args, message):
    code, _, err = run_cli(
        capsys,
        "sweep",
        "digits-mlp",
        "--max-steps",
        "3",
        "--jobs",
        "1",
        "--out",
        tmp_path / "s",
        *args,
    )
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_sweep_adaptive_runs_next_to_the_fixed_batches(tmp_path, capsys):
    """`--adaptive` adds one train_adaptive run per repeat; it stays out of the S(B) fit."""
    from batchlab.cli import main

    out = tmp_path / "s"
    args = ["sweep", "dots", "--batch-sizes", "32,64", "--max-steps", "60", "--repeats", "1"]
    args += ["--sharpness", "none", "--jobs", "1", "--adaptive", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "adaptive (batch 32" in printed
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    adaptive = [r for r in lines if r["spec"]["source"] == "adaptive"]
    assert len(adaptive) == 1 and len(lines) == 3
    assert "decisions" in adaptive[0]["history"]["extras"]["adaptive"]
    spec = json.loads((out / "sweep.json").read_text())
    assert spec["adaptive"] is True
    assert "Adaptive vs fixed batch sizes" in (out / "report.html").read_text()


def test_sweep_progress_total_grows_with_extension_waves(tmp_path):
    """A tuned grid adds runs after its first wave: the bar must not read 36/36 at 40%."""
    from types import SimpleNamespace

    from batchlab.cli.sweep_cmd import SweepProgress
    from batchlab.sweep.store import StoreContents

    progress = SweepProgress("dots", tmp_path)
    progress.on_start(3, 3, StoreContents((), (), 0))
    record = SimpleNamespace(run_id="r", status="ok")
    progress.on_record(record, 3, 3)
    progress.on_record(record, 4, 5)  # the second wave brought 2 more
    task = progress.progress.tasks[0]
    progress.stop()
    assert (task.completed, task.total) == (4, 5)
