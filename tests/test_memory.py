"""Memory: sizes, the one OOM test, the memory model, the batch search, leaving no trace."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from conftest import tiny_task
from torch import nn
from torch.utils.data import TensorDataset

import batchlab
from batchlab.data import Batcher
from batchlab.errors import ConfigError, DeviceError, MemoryBudgetError
from batchlab.measure.batch_search import StepPeak, find_max_batch_size
from batchlab.measure.cpu_replay import replay_peak_bytes
from batchlab.measure.memory import probe_memory
from batchlab.measure.memory_fit import MemoryPoint, fit_memory_model
from batchlab.measure.oom import is_oom_error
from batchlab.measure.sizes import parse_size
from batchlab.measure.state import live_tensor_bytes, preserve_training_state
from batchlab.measure.step_memory import measure_step_memory
from batchlab.step import TrainStep
from batchlab.tasks.common import cross_entropy_loss

CPU = torch.device("cpu")


# --- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * 1024**3),
        ("512MB", 512 * 1000**2),
        ("512 mib", 512 * 1024**2),
        ("1.5e9", 1_500_000_000),
        ("2g", 2 * 1024**3),
        ("300k", 300 * 1024),
        ("100", 100),
        (4096, 4096),
        ("1TB", 10**12),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "GB", "-1GB", "0", "1.2.3MB", "six GiB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text, what="memory budget")
    assert "memory budget: expected" in str(info.value)
    assert "6GiB" in str(info.value)  # the message shows what a good value looks like


# --- the one OOM test --------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
        RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"),
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if"),
        MemoryError(),
    ],
)
def test_is_oom_error_true(exc):
    assert is_oom_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x8)"),
        ValueError("out of memory"),  # not a RuntimeError: a user's own ValueError
        KeyError("x"),
        RuntimeError(),
    ],
)
def test_is_oom_error_false(exc):
    assert not is_oom_error(exc)


# --- the memory model on a synthetic linear allocator -----------------------------------


def linear_allocator(fixed: int = 1000, per_sample: int = 100, *, oom_above=None, exc=None):
    """A fake training step: peak = fixed + per_sample * B, OOM above a threshold."""
    calls: list[int] = []

    def run_step(b: int) -> int:
        calls.append(b)
        if oom_above is not None and b > oom_above:
            raise exc or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 MiB")
        return fixed + per_sample * b

    run_step.calls = calls
    return run_step


def test_fit_memory_model_recovers_the_line_exactly():
    run = linear_allocator(fixed=12_345, per_sample=678)
    points = [MemoryPoint(b, run(b), fits=True) for b in (2, 8, 32, 100)]
    model = fit_memory_model(points)
    assert model.fixed_bytes == pytest.approx(12_345)
    assert model.bytes_per_sample == pytest.approx(678)
    assert model.kind == "linear" and model.max_residual == pytest.approx(0, abs=1e-12)
    assert model.max_batch_size(12_345 + 678 * 50) == pytest.approx(50)


def test_fit_memory_model_flags_a_bent_line():
    # The optimizer's temporaries dominate at small B, activations at large B.
    def peak(b):
        return max(50_000, 1_000 + 400 * b)

    points = [MemoryPoint(b, peak(b), fits=True) for b in (2, 8, 32, 512)]
    assert fit_memory_model(points).kind == "piecewise"


def test_search_linear_allocator_exact_sequence():
    run = linear_allocator()
    search = find_max_batch_size(run, usable_bytes=90_000, limit=4000)
    # warm-up, the ladder, then straight to the line's answer (1000 + 100 B <= 90000).
    assert run.calls == [4, 4, 32, 890]
    assert search.tried == (4, 4, 32, 890)
    assert search.max_batch_size == 890 and search.verified
    assert search.model.bytes_per_sample == pytest.approx(100)
    assert search.model.fixed_bytes == pytest.approx(1000)


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 MiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total)"),
    ],
)
def test_search_backs_off_after_fake_oom_exact_sequence(exc):
    # The device OOMs above 500 although the line predicts 890 fits (fragmentation):
    # bisect between the last good and the failed size (geometrically while the bracket
    # spans more than 2x), for at most 6 steps after the ladder.
    run = linear_allocator(oom_above=500, exc=exc)
    search = find_max_batch_size(run, usable_bytes=90_000, limit=4000)
    assert run.calls == [4, 4, 32, 890, 168, 386, 586, 486, 536]
    assert search.max_batch_size == 486  # within 3% of the true 500, never above it
    oom_sizes = [p.batch_size for p in search.points if p.oom]
    assert oom_sizes == [890, 586, 536]


def test_search_oom_in_the_ladder_and_the_warm_up():
    run = linear_allocator(oom_above=5)
    search = find_max_batch_size(run, usable_bytes=90_000, limit=4000)
    # 32 OOMs in the ladder: bisect between 4 and 32 (geometric), then 4 and 11.
    assert run.calls == [4, 4, 32, 11, 6, 5]
    assert search.max_batch_size == 5

    run = linear_allocator(oom_above=1)
    search = find_max_batch_size(run, usable_bytes=90_000, limit=4000, fit_batch_sizes=(4, 16))
    assert run.calls == [4, 2, 1, 1]  # the warm-up halves until a step runs
    assert search.max_batch_size == 1


def test_search_non_oom_error_propagates():
    run = linear_allocator(oom_above=10, exc=RuntimeError("mat1 and mat2 shapes cannot be"))
    with pytest.raises(RuntimeError, match="shapes"):
        find_max_batch_size(run, usable_bytes=90_000, limit=4000)


def test_search_caps_at_the_limit():
    run = linear_allocator()
    search = find_max_batch_size(run, usable_bytes=90_000, limit=100)
    assert run.calls == [4, 4, 32, 100]
    assert search.max_batch_size == 100 and search.predicted_batch_size == pytest.approx(890)


def test_search_convex_curve_matches_exhaustive_truth():
    # Two regimes, like a real step: a flat optimizer phase, then activations that grow
    # faster above B=300 (a different kernel). Chord and extrapolation bracket the limit.
    def curve(b):
        return max(50_000 + 10 * b, 1_000 + 100 * b + (0 if b < 300 else 50 * (b - 300)))

    calls = []

    def run(b):
        calls.append(b)
        return curve(b)

    usable = 900_000
    truth = max(b for b in range(1, 40_001) if curve(b) <= usable)
    search = find_max_batch_size(run, usable_bytes=usable, limit=40_000)
    assert search.max_batch_size == truth == 6093
    # the ladder sees only the flat phase, so the first jump goes to the limit
    assert calls == [4, 4, 32, 40_000, 5753, 6093]


def test_search_jagged_curve_reports_a_sensible_line():
    # A 30 kB jump at B=500 (a kernel switching algorithm): the limit is 499, and the
    # line through the points on either side of it would have a negative intercept.
    def curve(b):
        return 1000 + 100 * b + (30_000 if b >= 500 else 0)

    search = find_max_batch_size(curve, usable_bytes=60_000, limit=4000)
    assert 480 <= search.max_batch_size <= 499
    assert search.model.fixed_bytes >= 0 and search.model.bytes_per_sample > 0


def test_search_predict_only_runs_only_the_ladder():
    run = linear_allocator()
    search = find_max_batch_size(run, usable_bytes=90_000, limit=4000, predict_only=True)
    assert run.calls == [4, 4, 32]
    assert search.max_batch_size == 890 and not search.verified


def test_search_too_slow_returns_the_unverified_prediction():
    run = linear_allocator()
    search = find_max_batch_size(run, usable_bytes=90_000, limit=4000, too_slow=lambda b: b > 100)
    assert run.calls == [4, 4, 32]
    assert search.max_batch_size == 890 and not search.verified


def test_budget_below_the_model_alone():
    run = linear_allocator(fixed=10_000, per_sample=100)
    with pytest.raises(MemoryBudgetError) as info:
        find_max_batch_size(run, usable_bytes=5_000, limit=4000)
    assert "model alone needs about 9.77 KiB" in str(info.value)
    assert run.calls == [4, 4, 2, 1]


def test_batch_one_does_not_fit():
    run = linear_allocator(oom_above=0)
    with pytest.raises(MemoryBudgetError, match="batch size 1 does not fit: .* ran out of memory"):
        find_max_batch_size(run, usable_bytes=90_000, limit=4000)
    assert run.calls == [4, 2, 1]


def test_step_peak_tuple_keeps_reserved_bytes():
    search = find_max_batch_size(
        lambda b: StepPeak(1000 + 100 * b, 2048 * b), usable_bytes=90_000, limit=4000
    )
    assert [p.reserved_bytes for p in search.points] == [4 * 2048, 32 * 2048, 890 * 2048]


# --- CPU profiler replay -----------------------------------------------------------------


def test_replay_peak_bytes_is_exact_for_known_allocations():
    def work():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        b = torch.empty(2000, dtype=torch.float32)  # 8000 B: 12000 held
        del a  # 8000 held
        c = torch.empty(500, dtype=torch.float64)  # 4000 B: 12000 held again
        return b, c

    peak, seconds = replay_peak_bytes(work)
    assert peak == 12_000
    assert seconds >= 0


def test_replay_prints_nothing(capfd):
    replay_peak_bytes(lambda: torch.ones(10) * 2)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no USDT lines, no allocator warning


def wide_task(n: int = 2048, hidden: int = 64) -> batchlab.Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, 0] > 0).long()

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    return batchlab.Task(
        name="wide",
        model=model,
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x[:256], y[:256]),
        loss=cross_entropy_loss,
        optimizer=lambda params, lr: torch.optim.Adam(params, lr=lr),
        lr=1e-3,
        batch_size=32,
    )


def make_step(task: batchlab.Task) -> TrainStep:
    model = task.model()
    optimizer = task.optimizer(model.parameters(), task.lr)
    batcher = Batcher(task.train_data, CPU)
    return TrainStep(model, optimizer, task.loss, batcher, micro_batch_size=10**6, device=CPU)


def test_cpu_step_memory_is_linear_in_batch_size():
    step = make_step(wide_task())
    step(torch.arange(4))  # warm-up: optimizer state
    peaks = {b: measure_step_memory(step, torch.arange(b)).peak_bytes for b in (512, 1024, 2048)}
    # Above the optimizer phase the peak grows by the same bytes per sample.
    assert peaks[2048] - peaks[1024] == pytest.approx(2 * (peaks[1024] - peaks[512]), rel=0.01)
    # At least the hidden activations (64 floats) and the inputs (16 floats) per sample.
    assert (peaks[2048] - peaks[1024]) / 1024 >= (64 + 16) * 4


# --- probe_memory on a real task --------------------------------------------------------


def exhaustive_max(task: batchlab.Task, usable: int) -> int:
    """The largest B whose measured peak fits, by bisection on the measured peak."""
    torch.manual_seed(0)
    step = make_step(task)
    order = torch.randperm(task.num_train, generator=torch.Generator().manual_seed(0))
    step(order[:2])
    lo, hi = 1, task.num_train + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure_step_memory(step, order[:mid]).peak_bytes <= usable:
            lo = mid
        else:
            hi = mid
    return lo


def test_probe_memory_finds_the_true_max_in_few_steps():
    task = wide_task()
    probe = probe_memory(task, device="cpu", memory_budget="600KiB", margin=0.1)
    assert probe.verified and not probe.predicted_only and not probe.capped_by_dataset
    assert probe.usable_bytes == int(600 * 1024 * 0.9)
    truth = exhaustive_max(task, probe.usable_bytes)
    assert truth * 0.97 <= probe.max_batch_size <= truth
    assert probe.probe_steps == len(probe.tried) <= 6
    assert probe.eval_peak_bytes is not None and probe.eval_peak_bytes < probe.usable_bytes
    assert probe.budget_source == "`memory_budget` 600 KiB"  # a parameter, not a flag
    # JSON round trip
    assert batchlab.MemoryProbe.from_json(probe.to_json()) == probe


def test_probe_memory_caps_at_the_dataset_and_says_so():
    probe = probe_memory(tiny_task(n=64), device="cpu", memory_budget="1GiB")
    assert probe.max_batch_size == 64 and probe.capped_by_dataset
    assert any("capped at the training set size (64 examples)" in w for w in probe.warnings)


def test_probe_memory_default_cpu_budget_is_labelled():
    probe = probe_memory(tiny_task(n=64), device="cpu")
    assert "half the available system RAM" in probe.budget_source
    assert probe.budget_bytes > 0


def test_probe_memory_target_memory_is_prediction_only():
    probe = probe_memory(wide_task(), device="cpu", target_memory="400KiB")
    assert probe.predicted_only and not probe.verified
    assert probe.probe_steps == 3  # warm-up and the ladder, nothing verified
    assert "prediction only" in probe.budget_source


@pytest.mark.parametrize(
    ("kwargs", "error", "message", "param"),
    [
        (
            {"memory_budget": "12XB"},
            ConfigError,
            r"memory budget: expected a number .*12XB",
            "memory_budget",
        ),
        (
            {"memory_budget": "1GiB", "target_memory": "2GiB"},
            ConfigError,
            "expected one of `memory_budget` .* or `target_memory` .* got both",
            "target_memory",
        ),
        (
            {"margin": 1.5},
            ConfigError,
            r"margin: expected a fraction of the budget in \[0, 1\)",
            "margin",
        ),
        (
            {"memory_budget": "4KiB"},
            MemoryBudgetError,
            "the model alone needs about .* give a larger `memory_budget`, a smaller `margin`",
            "memory_budget",
        ),
    ],
)
def test_probe_memory_bad_input(kwargs, error, message, param):
    with pytest.raises(error) as info:
        probe_memory(wide_task(), device="cpu", **kwargs)
    assert info.match(message)
    assert "--" not in str(info.value)  # library errors name parameters, never CLI flags
    assert info.value.param == param


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_probe_memory_cuda_unavailable():
    with pytest.raises(DeviceError) as info:
        probe_memory(wide_task(), device="cuda", memory_budget="1GiB")
    assert "CUDA is not available" in str(info.value)


# --- leave no trace ----------------------------------------------------------------------


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.head(self.drop(self.body(x)))


def snapshot(model, optimizer):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
        copy.deepcopy(optimizer.state_dict()),  # a deep copy: Adam updates `step` in place
    )


def assert_same(before, after):
    state0, grads0, modes0, opt0 = before
    state1, grads1, modes1, opt1 = after
    assert state0.keys() == state1.keys()
    for k in state0:
        assert torch.equal(state0[k], state1[k]), k
    assert len(grads0) == len(grads1)
    for g0, g1 in zip(grads0, grads1, strict=True):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert torch.equal(g0, g1)
    assert modes0 == modes1
    assert opt0["param_groups"] == opt1["param_groups"]
    assert opt0["state"].keys() == opt1["state"].keys()
    for i in opt0["state"]:
        for k, v in opt0["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt1["state"][i][k])), (i, k)


def used_model():
    """A BatchNorm model with Adam state, live grads, and one submodule in eval mode."""
    torch.manual_seed(0)
    task = wide_task()
    model = BNNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batcher = Batcher(task.train_data, CPU)
    step = TrainStep(model, optimizer, task.loss, batcher, micro_batch_size=10**6, device=CPU)
    for _ in range(3):
        step(torch.randint(0, task.num_train, (16,)))
    loss = task.loss(model, batcher(torch.arange(8)))
    loss.backward()  # grads present, as between two steps of a user's loop
    model.drop.eval()
    return task, model, optimizer, batcher


def rng_fingerprint():
    return (torch.rand(3), random.random(), np.random.rand())


def test_preserve_training_state_restores_everything_after_an_oom():
    task, model, optimizer, batcher = used_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler_before = scaler.state_dict()
    before = snapshot(model, optimizer)
    rng_state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    bytes_before = live_tensor_bytes()

    def oom_loss(m, batch):
        if len(batch[0]) > 100:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 MiB")
        return task.loss(m, batch)

    step = TrainStep(model, optimizer, oom_loss, batcher, micro_batch_size=10**6, device=CPU)
    with pytest.raises(torch.OutOfMemoryError):
        with preserve_training_state(model, optimizer, scaler):
            model.train()
            torch.rand(100)  # consume RNG
            random.random()
            np.random.rand()
            scaler.scale(torch.ones(()))  # lazily creates the scale...
            scaler.update(new_scale=2.0)  # ... which the probe then changes
            step(torch.arange(64))
            step(torch.arange(128))  # raises
    assert live_tensor_bytes() == bytes_before  # before the checks below allocate
    assert_same(before, snapshot(model, optimizer))
    assert scaler.state_dict() == scaler_before and scaler._scale is None
    expected = rng_fingerprint_from(rng_state)
    got = rng_fingerprint()
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def rng_fingerprint_from(state):
    now = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])
    fingerprint = rng_fingerprint()
    torch.set_rng_state(now[0])
    random.setstate(now[1])
    np.random.set_state(now[2])
    return fingerprint


def test_search_on_a_live_model_with_fake_oom_leaves_no_trace():
    task, model, optimizer, batcher = used_model()
    before = snapshot(model, optimizer)
    rng_before = torch.get_rng_state()
    bytes_before = live_tensor_bytes()

    def oom_loss(m, batch):  # the device "runs out" above 300 examples
        if len(batch[0]) > 300:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return task.loss(m, batch)

    step = TrainStep(model, optimizer, oom_loss, batcher, micro_batch_size=1, device=CPU)

    def run_step(b):
        step.micro_batch_size = b
        return measure_step_memory(step, torch.arange(b))

    with preserve_training_state(model, optimizer):
        search = find_max_batch_size(run_step, usable_bytes=50 * 2**20, limit=task.num_train)
    # The limit (2048) OOMs, then geometric bisection closes in on the fake 300.
    assert search.tried == (4, 4, 32, 2048, 256, 724, 430, 343, 299)
    assert search.max_batch_size == 299
    assert_same(before, snapshot(model, optimizer))
    assert torch.equal(torch.get_rng_state(), rng_before)
    step = run_step = None  # drop our own references before counting bytes
    assert live_tensor_bytes() == bytes_before


def test_probe_memory_leaves_rng_and_memory_untouched():
    task = wide_task()
    probe_memory(task, device="cpu", memory_budget="600KiB")  # warm caches and lazy init
    rng_before = torch.get_rng_state()
    bytes_before = live_tensor_bytes()
    probe_memory(task, device="cpu", memory_budget="600KiB")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert live_tensor_bytes() == bytes_before


def test_probe_memory_is_deterministic_per_seed():
    a = probe_memory(wide_task(), device="cpu", memory_budget="600KiB", seed=3)
    b = probe_memory(wide_task(), device="cpu", memory_budget="600KiB", seed=3)
    assert a.tried == b.tried and a.points == b.points


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probe_verifies_and_restores_device_memory():
    task = wide_task()
    probe_memory(task, device="cuda", memory_budget="64MiB")  # cuBLAS workspaces stay
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    probe = probe_memory(task, device="cuda", memory_budget="64MiB")
    assert probe.verified and probe.max_batch_size >= 1
    assert all(p.reserved_bytes is not None for p in probe.points if not p.oom)
    assert torch.cuda.memory_allocated() == allocated


def _fake_cuda_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))


def test_cuda_budget_counts_what_the_process_already_holds(monkeypatch):
    """An explicit budget is the whole device's: tensors already held stay while training.

    The probe measures its steps above the baseline, so without this a probe run after other
    work overshoots by what that work still holds (seen on an H200: a batch that died at
    step 2 of a fresh run).
    """
    from batchlab.measure.budget import resolve_budget
    from batchlab.measure.step_memory import DeviceBaseline

    _fake_cuda_free(monkeypatch, 10 * 2**30)
    cuda = torch.device("cuda")
    held = DeviceBaseline(allocated=300 * 2**20, reserved=400 * 2**20)
    budget, source, predict_only, warnings = resolve_budget(cuda, "1GiB", None, held)
    assert budget == 2**30 - 300 * 2**20
    assert "300 MiB this process already holds" in source and not predict_only
    assert warnings == []
    # A fresh process holds nothing: the budget is taken as given.
    assert resolve_budget(cuda, "1GiB", None, DeviceBaseline())[0] == 2**30
    # The CPU has no device-wide allocator to share: unchanged.
    assert resolve_budget(torch.device("cpu"), "1GiB", None, held)[0] == 2**30


def test_cuda_budget_above_the_free_memory_uses_the_free_memory(monkeypatch):
    from batchlab.measure.budget import resolve_budget
    from batchlab.measure.step_memory import DeviceBaseline

    _fake_cuda_free(monkeypatch, 2**30)
    held = DeviceBaseline(allocated=2**20, reserved=2**20)
    budget, source, _, warnings = resolve_budget(torch.device("cuda"), "8GiB", None, held)
    assert budget == 2**30 and source.startswith("free memory")
    assert "more than the free device memory" in warnings[0]


def test_cuda_budget_below_what_the_process_holds_is_one_clear_error(monkeypatch):
    from batchlab.measure.budget import resolve_budget
    from batchlab.measure.step_memory import DeviceBaseline

    _fake_cuda_free(monkeypatch, 10 * 2**30)
    with pytest.raises(ConfigError, match="already holds") as info:
        resolve_budget(torch.device("cuda"), "100MiB", None, DeviceBaseline(2**30, 2**30))
    assert info.value.param == "memory_budget"
