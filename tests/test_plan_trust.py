"""Issue 14, item 7: no confident answer from bad data.

A plan built on a truncated or noisy ladder, on a noise phase whose loss did not fall, or
on timings under contention says so, or refuses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_task
from test_plan_model import measurements

import batchlab
from batchlab.cli import main
from batchlab.errors import BatchlabError
from batchlab.measure.noise_run import NoisePoint
from batchlab.measure.probe import ProbeResult
from batchlab.measure.throughput import ThroughputPoint, profile_throughput, timing_contention
from batchlab.planner import Plan, PlanRefused, build_plan
from batchlab.planner.trust import loss_fall, loss_fall_warning


def fake_probe(*warnings: str) -> ProbeResult:
    """A probe result with the given warnings; only its warnings matter to these tests."""
    return ProbeResult(
        task="synthetic", device="cpu", world_size=1, max_batch_size=512, knee_batch_size=512,
        knee_fraction=0.9, aligned_knee_batch_size=512, peak_samples_per_s=1e4, memory=None,
        throughput=(), alignment=(), accumulation=None, probe_steps=0, throughput_steps=0,
        predicted_only=False, local_max_batch_size=512, seconds=0.0, warnings=tuple(warnings),
    )  # fmt: skip


def test_plan_passes_on_every_probe_warning():
    probe = fake_probe(
        "throughput measured up to B=64: timing B=128 and above would take more than the 1s budget",
        "timing is noisy: at B=64 the windows range over 21032% of the median",
    )
    plan = build_plan(measurements(), b_simple=200.0, probe=probe)
    messages = [w.message for w in plan.warnings if w.code == "probe"]
    assert messages == list(probe.warnings)
    assert [w["message"] for w in plan.to_dict()["warnings"] if w["code"] == "probe"] == messages


def test_plan_without_probe_warnings_adds_none():
    plan = build_plan(measurements(), b_simple=200.0, probe=fake_probe())
    assert not [w for w in plan.warnings if w.code == "probe"]


RANDOM_LABELS_TASK = '''
import torch, torch.nn.functional as F
from torch.utils.data import TensorDataset
import batchlab


def make() -> batchlab.Task:
    """The README's "your own task" example: its labels are random, so nothing is learnt."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 20, generator=g), torch.randint(0, 4, (2048,), generator=g)
    return batchlab.Task(
        name="random-labels",
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
        ),
        train_data=TensorDataset(x[:1600], y[:1600]),
        val_data=TensorDataset(x[1600:], y[1600:]),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        metrics=lambda model, batch: {"acc": (model(batch[0]).argmax(-1) == batch[1]).float().mean()},
        optimizer=lambda params, lr: torch.optim.AdamW(params, lr=lr),
        lr=1e-3,
        batch_size=64,
    )
'''
# Small and fast: a 64 MiB budget, half a second of timing, the noise phase capped at 25 steps.
FAST = dict(memory_budget="64MiB", throughput_seconds=0.5, noise_budget=1.0, noise_steps=25)
FAST_FLAGS = ["--memory-budget", "64MiB", "--throughput-seconds", "0.5", "--noise-budget", "1",
              "--noise-steps", "25", "--no-lr-check"]  # fmt: skip


@pytest.fixture(scope="module")
def random_task(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("task") / "random_labels.py"
    path.write_text(RANDOM_LABELS_TASK)
    return f"{path}:make"


def test_loss_fall_on_known_points():
    def points(*losses):
        return tuple(
            NoisePoint(i, i, loss, 100.0, (50.0, 200.0), True) for i, loss in enumerate(losses)
        )

    assert loss_fall(points(2.0, 2.0, 1.0, 1.0, 1.0, 1.0)) == pytest.approx(0.5)
    assert loss_fall(points(1.0, 1.0)) is None  # too few to tell
    assert loss_fall_warning(points(2.0, 1.9, 1.5, 1.2, 1.1, 1.0)) is None  # fell 1 - 1.05/1.95
    flat = loss_fall_warning(points(1.40, 1.38, 1.41, 1.39, 1.40, 1.39))
    assert flat is not None and flat.code == "loss-not-falling" and "0.4%" in flat.message


def test_plan_refuses_a_task_whose_loss_does_not_fall(random_task):
    with pytest.raises(PlanRefused, match="loss fell") as info:
        batchlab.plan(random_task, check_lr=False, **FAST)
    assert isinstance(info.value, BatchlabError) and info.value.param == "force"
    assert "\n" not in str(info.value)


def test_forced_plan_says_why_it_should_not_be_trusted(random_task):
    plan = batchlab.plan(random_task, check_lr=False, force=True, **FAST)
    codes = {w.code for w in plan.warnings}
    assert "loss-not-falling" in codes


def test_cli_refuses_in_one_line_and_force_overrides(random_task, tmp_path, capsys):
    assert main(["plan", random_task, *FAST_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and "Traceback" not in err
    out = tmp_path / "plan.json"
    assert main(["plan", random_task, *FAST_FLAGS, "--force", "--json", str(out)]) == 0
    assert "loss-not-falling" in {w.code for w in Plan.load(out).warnings}


class ContendedDevice:
    """A `StepTimer` on a shared device: 1 ms + 2 us/sample a step, but every third call
    is slowed 300x by other processes (issue 14 saw 100-500x under load 6 on 2 cores)."""

    def __init__(self, slowdown: float = 300.0) -> None:
        self.slowdown = slowdown
        self.calls = 0
        self.steps = 0
        self.now = 0.0

    def run(self, batch_size: int, count: int) -> float:
        self.calls += 1
        self.steps += count
        seconds = (1e-3 + 2e-6 * batch_size) * count
        if self.calls % 3 == 0:
            seconds *= self.slowdown
        self.now += seconds
        return seconds

    def clock(self) -> float:
        return self.now


def contended_profile(slowdown: float):
    return profile_throughput(
        tiny_task(n=1024), device="cpu", max_batch_size=256, check_alignment=False,
        time_budget=1e6, timer=ContendedDevice(slowdown),
    )  # fmt: skip


def test_contended_timings_are_flagged_and_the_plan_warns():
    profile = contended_profile(300.0)
    assert profile.contention and timing_contention(profile.points) is not None
    plan = build_plan(measurements(throughput=profile.points), b_simple=200.0)
    contention = [w for w in plan.warnings if w.code == "timing-contention"]
    assert len(contention) == 1 and "set_num_threads(1)" in contention[0].message


class ThreadContendedDevice(ContendedDevice):
    """Contended only with several intra-op threads, as a busy 2-core CPU is."""

    def run(self, batch_size: int, count: int) -> float:
        self.threads_seen = getattr(self, "threads_seen", set()) | {torch.get_num_threads()}
        self.slowdown = 300.0 if torch.get_num_threads() > 1 else 1.0
        return super().run(batch_size, count)


def test_contended_timings_are_retimed_with_one_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", _fake_threads.get)
    monkeypatch.setattr(torch, "set_num_threads", _fake_threads.set)
    _fake_threads.n = 2
    device = ThreadContendedDevice()
    profile = profile_throughput(
        tiny_task(n=1024), device="cpu", max_batch_size=256, check_alignment=False,
        time_budget=1e6, timer=device,
    )  # fmt: skip
    assert device.threads_seen == {1, 2}
    assert not profile.contention
    assert any("re-timed with 1 thread" in w for w in profile.warnings)
    assert _fake_threads.n == 2  # the caller's thread count is back
    # Quiet with 2 threads: timed once, nothing said.
    quiet = ContendedDevice(slowdown=1.0)
    profile = profile_throughput(
        tiny_task(n=1024), device="cpu", max_batch_size=256, check_alignment=False,
        time_budget=1e6, timer=quiet,
    )  # fmt: skip
    assert not any("re-timed" in w for w in profile.warnings)
    assert quiet.steps == profile.steps  # one ladder, not two


class _FakeThreads:
    """torch's thread count, faked: the test must not change the real one."""

    n = 2

    def get(self) -> int:
        return self.n

    def set(self, n: int) -> None:
        self.n = n


_fake_threads = _FakeThreads()


def test_quiet_timings_are_not_flagged():
    profile = contended_profile(1.0)
    assert not profile.contention
    plan = build_plan(measurements(throughput=profile.points), b_simple=200.0)
    assert "timing-contention" not in {w.code for w in plan.warnings}


def test_a_ladder_far_slower_per_sample_at_large_batches_is_contended():
    def point(b, rate):
        return ThroughputPoint(b, rate, b / rate, 0.1, rate, rate, 5, 3)

    assert timing_contention([point(8, 1000.0), point(64, 900.0)]) is None
    assert "5x fewer" in timing_contention([point(8, 1000.0), point(64, 200.0)])


def test_candidates_beyond_the_ladder_say_extrapolated_in_table_and_report():
    from rich.console import Console

    from batchlab.cli.plan_cmd import print_plan
    from batchlab.report.plan_report import plan_page

    plan = build_plan(measurements(ladder=(8, 16, 32, 64)), b_simple=200.0)
    timing = {c.batch_size: c.timing for c in plan.candidates}
    assert timing[32] == "measured" and timing[4] == "extrapolated"  # below the ladder
    assert timing[128] == timing[512] == "extrapolated"  # above it, micro-batch 128 / 512
    between = build_plan(measurements(ladder=(8, 64)), b_simple=200.0)
    assert {c.batch_size: c.timing for c in between.candidates}[32] == "interpolated"
    assert Plan.from_json(plan.to_json()).candidates == plan.candidates
    console = Console(width=200, record=True)
    print_plan(console, plan)
    rows = [line for line in console.export_text().splitlines() if line.strip().startswith("512 ")]
    assert rows and "extrapolated" in rows[0]
    assert "extrapolated" in plan_page(plan).render()


def test_never_recommends_a_batch_timed_only_by_extrapolation():
    # A ladder truncated at 64 (as under contention) with the memory max at 512: whatever
    # the critical batch, the recommendation is a batch whose step time was measured or
    # read between measured points. (The conservative step-time model already keeps an
    # extrapolated batch from looking faster; this guards the invariant.)
    for b_simple in (0.5, 50.0, 1e6):
        for step_s in (lambda b: 0.01, lambda b: 1e-3 * b + 1e-4):
            m = measurements(ladder=(8, 16, 32, 64), max_batch=512, step_s=step_s)
            plan = build_plan(m, b_simple=b_simple)
            chosen = {c.batch_size: c for c in plan.candidates}[plan.recommended.batch_size]
            assert chosen.timing != "extrapolated" or chosen.batch_size == 32  # 32 is B0


def test_never_recommends_a_batchnorm_micro_batch_its_own_warning_rejects():
    # Step time linear in B and a tiny critical batch: B=2 would be predicted fastest.
    over = dict(step_s=lambda b: 1e-3 * b, ladder=(2, 4, 8, 16, 32, 64), max_batch=64)
    plain = build_plan(measurements(**over), b_simple=0.5)
    assert plain.recommended.batch_size == 2
    bn = build_plan(measurements(**over, has_batchnorm=True), b_simple=0.5)
    assert bn.recommended.micro_batch_size >= 8 and bn.efficient.micro_batch_size >= 8
    assert "batchnorm-small-batch" not in {w.code for w in bn.warnings}
    assert "faster-batch-untrusted" in {w.code for w in bn.warnings}


def test_plan_table_fits_80_columns_and_warnings_name_flags():
    """At 80 columns (a pipe, a small terminal) no candidate mark ends in "…", and the
    warnings name the CLI's flags (`--noise-budget`), not the Python parameters."""
    import typer
    from rich.console import Console

    from batchlab.cli import app
    from batchlab.cli.plan_cmd import print_plan

    plan = build_plan(measurements(ladder=(8, 16, 32, 64)), b_simple=200.0)
    assert any("`noise_budget`" in w.message for w in plan.warnings)
    console = Console(width=80, record=True)
    print_plan(console, plan, typer.main.get_command(app).commands["plan"])
    text = console.export_text()
    assert "…" not in text
    assert "extrapolated" in text and "efficient" in text and "reference" in text
    assert "--noise-budget" in text and "`noise_budget`" not in text


def test_ctrl_c_during_the_noise_phase_keeps_its_points():
    """Interrupting `plan` in the noise phase keeps the B_simple points measured so far."""
    from batchlab.planner import PlanInterrupted

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "noise" and done == 30:
            raise KeyboardInterrupt

    task = dataclasses.replace(tiny_task(n=512), epochs=100)  # a noise budget of 320 steps
    with pytest.raises(PlanInterrupted) as info:
        batchlab.plan(
            task, device="cpu", throughput_seconds=0.5, progress=progress,
            check_lr=False,
        )  # fmt: skip
    assert info.value.phase == "the noise measurement"
    noise = info.value.measured["noise"]
    assert noise is not None and noise.steps == 30
    assert noise.points and all(p.step <= 30 for p in noise.points)
    assert all(p.train_loss is not None for p in noise.points)


def test_one_thread_cpu_windows_count_the_steps_own_work_not_waiting():
    """With one torch thread a window reads the thread's CPU time: a step that waits (as
    for a core another process holds) is not charged for the wait; with more threads it
    is wall time."""
    import time as _time

    from batchlab.measure.step_timing import TrainStepTimer
    from batchlab.step import build_step

    task = tiny_task(n=64)
    waiting = dataclasses.replace(
        task, loss=lambda model, batch: (_time.sleep(0.02), task.loss(model, batch))[1]
    )
    step = build_step(waiting, torch.device("cpu"), lr=0.1, micro_batch_size=8)
    timer = TrainStepTimer(step, torch.arange(64))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert timer.run(8, 3) < 0.03  # 60 ms of sleeping, not counted
        torch.set_num_threads(2)
        assert timer.run(8, 3) >= 0.06
    finally:
        torch.set_num_threads(threads)
