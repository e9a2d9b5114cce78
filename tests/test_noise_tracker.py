"""GradientNoiseScaleTracker: exact micro-batch norms, EMA arithmetic, engine and DDP use."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import free_port
from torch import nn
from torch.utils.data import TensorDataset

import batchlab
from batchlab.core.noise_scale import (
    build_noise_scale,
    ratio_interval,
    t_quantile,
    two_batch_estimate,
)
from batchlab.data import epoch_chunks
from batchlab.errors import ConfigError, NoiseEstimateError
from batchlab.history import History
from batchlab.measure.noise import gradient_noise_scale
from batchlab.measure.noise_run import NoiseRun, measure_noise
from batchlab.tracking import GradientNoiseScaleTracker
from batchlab.tracking.grad_norms import PRECONDITIONER_CAP, adam_preconditioner

N = 256


def frozen_sgd(params, lr):
    """lr 0: the weights never move, so every step measures the same point."""
    return torch.optim.SGD(params, lr=0.0)


def make_task(optimizer=frozen_sgd, *, n: int = N, poison: int | None = None) -> batchlab.Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] - x[:, 1] + 0.7 * torch.randn(n, generator=g) > 0).long()
    if poison is not None:
        x = x.clone()
        x[poison] = float("nan")

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))

    def loss(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    return batchlab.Task(
        name="tiny-noise",
        model=model,
        train_data=TensorDataset(x, y),
        loss=loss,
        optimizer=optimizer,
        lr=0.05,
        batch_size=32,
    )


def initial_model(task: batchlab.Task, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # what the engine does before building the model
    return task.model()


def micro_sq_norms(model, task, indices, micro):
    """|g_i|^2 of each micro-batch's mean gradient and |G|^2 of the step's, by autograd."""
    params = list(model.parameters())
    x, y = task.train_data.tensors

    def sq(idx):
        grads = torch.autograd.grad(task.loss(model, (x[idx], y[idx])), params)
        return sum(float(g.double().square().sum()) for g in grads)

    return [sq(i) for i in indices.split(micro)], sq(indices)


def expected_samples(task, steps, *, all_micro=True, seed=0):
    model = initial_model(task, seed)
    chunks = epoch_chunks(N, 32, torch.Generator().manual_seed(seed))
    out = []
    for indices in chunks[:steps]:
        small, big = micro_sq_norms(model, task, indices, 8)
        small = small if all_micro else small[:1]
        out.append(two_batch_estimate(statistics.mean(small), 8, big, 32, N))
    return out


@pytest.mark.parametrize("all_micro", [True, False])
def test_engine_micro_batch_norms_are_exact(all_micro):
    task = make_task()
    tracker = GradientNoiseScaleTracker(all_micro=all_micro, num_examples=N)
    batchlab.train(task, 8, accumulation_steps=4, max_steps=6, callbacks=[tracker])
    expected = expected_samples(task, 6, all_micro=all_micro)
    assert [s[0] for s in tracker.samples] == [1, 2, 3, 4, 5, 6]
    for (_, trace, grad_sq), (e_trace, e_grad_sq) in zip(tracker.samples, expected, strict=True):
        assert (trace, grad_sq) == pytest.approx((e_trace, e_grad_sq), rel=1e-4, abs=1e-7)


def test_accumulation_with_the_tracker_is_bit_identical():
    """Gradient accumulation must stay exactly one big batch, tracker or not."""
    task = make_task(lambda params, lr: torch.optim.Adam(params, lr=lr))
    plain = batchlab.train(task, 8, accumulation_steps=4, max_steps=20)
    tracked = batchlab.train(task, 8, accumulation_steps=4, max_steps=20, track_noise=True)
    assert tracked.train_loss == plain.train_loss
    assert tracked.final["param_norm"] == plain.final["param_norm"]
    assert [p["step"] for p in tracked.extras["noise"]] == [10, 20]  # every 10 steps
    assert "noise" not in plain.extras


def test_tracker_agrees_with_the_standalone_estimator_at_the_same_weights():
    task = make_task()
    tracker = GradientNoiseScaleTracker(beta=1.0, num_examples=N)  # fixed weights: plain mean
    batchlab.train(task, 8, accumulation_steps=4, max_steps=240, callbacks=[tracker])
    tracked = tracker.noise_scale()
    model = initial_model(task)
    standalone = gradient_noise_scale(
        model, task.train_data, task.loss, batch_size=8, num_batches=32
    )
    x, y = task.train_data.tensors
    rows = []
    for i in range(N):
        grads = torch.autograd.grad(
            task.loss(model, (x[i : i + 1], y[i : i + 1])), list(model.parameters())
        )
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    matrix = torch.stack(rows)
    mean = matrix.mean(0)
    truth = float((matrix - mean).square().sum(1).mean() / mean.square().sum())
    for result in (tracked, standalone):
        low, high = result.b_simple_ci
        assert low <= truth <= high
        assert result.reliable
    assert standalone.b_simple_ci[0] <= tracked.b_simple <= standalone.b_simple_ci[1]
    assert tracked.b_simple_ci[0] <= standalone.b_simple <= tracked.b_simple_ci[1]
    assert tracked.num_examples == 240 * 32 and tracked.small_batch == 8


def test_ema_is_the_bias_corrected_weighted_mean_with_its_covariance():
    g = torch.Generator().manual_seed(0)
    samples = [
        (
            2.0 + float(torch.randn((), generator=g)),
            0.2 + 0.05 * float(torch.randn((), generator=g)),
        )
        for _ in range(30)
    ]
    beta = 0.9
    tracker = GradientNoiseScaleTracker(beta=beta)
    for trace, grad_sq in samples:
        # Feed squared norms that solve to exactly (trace, grad_sq): small 4 and big 16.
        small = grad_sq + trace / 4
        big = grad_sq + trace / 16
        tracker.update([small], [4], big, 16)
    # Each sample is weighted by the scale |G_big|^2 known before it: an EMA (decay 1/2)
    # of the earlier big-batch norms, the first sample's own for the first.
    bigs = [g + t / 16 for t, g in samples]
    scales = [bigs[0]]
    for b in bigs[:-1]:
        scales.append(b if len(scales) == 1 else 0.5 * scales[-1] + 0.5 * b)
    weights = [beta ** (len(samples) - 1 - i) / scales[i] for i in range(len(samples))]
    total = sum(weights)
    w = [x / total for x in weights]
    mt = sum(wi * s[0] for wi, s in zip(w, samples, strict=True))
    mg = sum(wi * s[1] for wi, s in zip(w, samples, strict=True))
    result = tracker.noise_scale()
    assert (result.trace_sigma, result.grad_norm_sq) == pytest.approx((mt, mg), rel=1e-9)
    assert result.b_simple == pytest.approx(mt / mg)
    w2 = sum(x * x for x in w)

    def cov(a, b, ma, mb):
        return (
            w2
            / (1 - w2)
            * sum(wi * (s[a] - ma) * (s[b] - mb) for wi, s in zip(w, samples, strict=True))
        )

    matrix = [[cov(0, 0, mt, mt), cov(0, 1, mt, mg)], [cov(1, 0, mg, mt), cov(1, 1, mg, mg)]]
    expected = ratio_interval(mt, mg, matrix, t_quantile(0.95, 1 / w2 - 1))
    assert result.b_simple_ci == pytest.approx(expected, rel=1e-6)
    plain = GradientNoiseScaleTracker(beta=1.0)
    for trace, grad_sq in samples:
        plain.update([grad_sq + trace / 4], [4], grad_sq + trace / 16, 16)
    assert plain.noise_scale().trace_sigma == pytest.approx(statistics.mean(s[0] for s in samples))


def test_plain_loop_api_and_loss_scale_match_the_engine():
    task = make_task()
    engine = GradientNoiseScaleTracker(num_examples=N)
    batchlab.train(task, 8, accumulation_steps=4, max_steps=4, callbacks=[engine])
    model = initial_model(task)
    x, y = task.train_data.tensors
    loop = GradientNoiseScaleTracker(num_examples=N)
    for indices in epoch_chunks(N, 32, torch.Generator().manual_seed(0))[:4]:
        for p in model.parameters():
            p.grad = None
        for idx in indices.split(8):
            # A GradScaler-style scaled loss: the tracker divides the scale back out.
            (task.loss(model, (x[idx], y[idx])) * len(idx) / 32 * 1024.0).backward()
            loop.after_backward(model, len(idx))
        loop.end_step(model, loss_scale=1024.0)
    assert loop.noise_scale().trace_sigma == pytest.approx(
        engine.noise_scale().trace_sigma, rel=1e-5
    )
    flat = [v for s in loop.samples for v in s[1:]]
    assert flat == pytest.approx([v for s in engine.samples for v in s[1:]], rel=1e-4)


def test_plain_loop_single_micro_batch_keeps_the_gradient():
    model = nn.Linear(3, 2)
    tracker = GradientNoiseScaleTracker()
    model(torch.randn(4, 3)).square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    tracker.after_backward(model, 4)
    tracker.end_step(model)
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected, strict=True))
    assert tracker.samples == []  # one micro-batch: nothing to contrast


def test_sparse_embedding_gradients():
    """nn.Embedding(sparse=True): sparse micro-batch gradients are summed and measured too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    x = torch.randint(0, 20, (16, 3))
    y = torch.randint(0, 2, (16,))
    tracker = GradientNoiseScaleTracker(num_examples=100)
    for idx in torch.arange(16).split(4):
        (F.cross_entropy(model(x[idx]), y[idx]) / 4).backward()
        tracker.after_backward(model, 4)
    tracker.end_step(model)
    grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in model.parameters()]
    ref = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(12, 2))
    ref.load_state_dict(model.state_dict())

    def sq(idx):
        g = torch.autograd.grad(F.cross_entropy(ref(x[idx]), y[idx]), list(ref.parameters()))
        return sum(float(t.double().square().sum()) for t in g)

    small = statistics.mean(sq(i) for i in torch.arange(16).split(4))
    expected = two_batch_estimate(small, 4, sq(torch.arange(16)), 16, 100)
    assert tracker.samples[0][1:] == pytest.approx(expected, rel=1e-4)
    full = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    assert all(torch.allclose(g, f, atol=1e-6) for g, f in zip(grads, full, strict=True))


def test_track_noise_records_into_history():
    task = make_task(lambda params, lr: torch.optim.SGD(params, lr=lr))
    history = batchlab.train(task, 8, accumulation_steps=4, max_steps=14, track_noise=True)
    points = history.extras["noise"]
    assert [p["step"] for p in points] == [10, 14]
    assert set(points[-1]) >= {"step", "examples", "b_simple", "b_simple_ci", "reliable"}
    assert points[-1]["examples"] == 14 * 32
    again = History.from_json(history.to_json())
    assert again.extras["noise"][-1]["b_simple"] == pytest.approx(points[-1]["b_simple"])


def test_existing_micro_hook_is_chained_and_restored():
    task = make_task()
    calls = []

    class Other(batchlab.TrainCallback):
        def on_start(self, state):
            state.step_fn.micro_hook = lambda i, k, n: calls.append(i)
            self.step_fn = state.step_fn

    other, tracker = Other(), GradientNoiseScaleTracker()
    batchlab.train(task, 8, accumulation_steps=4, max_steps=2, callbacks=[other, tracker])
    assert calls == [0, 1, 2, 3] * 2
    assert len(tracker.samples) == 2
    assert other.step_fn.micro_hook is not None and other.step_fn.micro_hook.__name__ == "<lambda>"


def test_preconditioned_uses_adams_second_moments():
    task = make_task(lambda params, lr: torch.optim.Adam(params, lr=0.0))
    model = initial_model(task)
    opt = task.optimizer(model.parameters(), 0.0)
    x, y = task.train_data.tensors
    chunks = epoch_chunks(N, 32, torch.Generator().manual_seed(0))
    tracker = GradientNoiseScaleTracker(preconditioned=True, num_examples=N)
    tracker.bind(model, opt)
    for step, indices in enumerate(chunks[:2]):
        opt.zero_grad(set_to_none=True)
        if step == 1:
            v = [opt.state[p]["exp_avg_sq"] / (1 - 0.999) for p in model.parameters()]
            scale = [1 / (vi.sqrt() + 1e-8) for vi in v]
            scale = [s.clamp(max=float(s.median()) * PRECONDITIONER_CAP) for s in scale]

            def pre_sq(idx, scale=scale):
                grads = torch.autograd.grad(
                    task.loss(model, (x[idx], y[idx])), list(model.parameters())
                )
                return sum(
                    float((g * s).double().square().sum())
                    for g, s in zip(grads, scale, strict=True)
                )

            small = statistics.mean(pre_sq(i) for i in indices.split(8))
            expected = two_batch_estimate(small, 8, pre_sq(indices), 32, N)
        for idx in indices.split(8):
            (task.loss(model, (x[idx], y[idx])) / 4).backward()
            tracker.after_backward(model, 8)
        tracker.end_step(model)
        opt.step()
    pre = tracker.noise_scale().preconditioned
    assert pre is not None
    assert (pre.trace_sigma, pre.grad_norm_sq) == pytest.approx(expected, rel=1e-4)


def test_preconditioner_caps_coordinates_adam_has_not_seen():
    """A coordinate with v = 0 gets at most PRECONDITIONER_CAP x its tensor's median weight:
    uncapped, 1/eps = 1e8 would make that one coordinate the whole noise scale."""
    weight = nn.Parameter(torch.ones(4, 8))
    opt = torch.optim.Adam([weight], lr=0.1)
    grad = torch.ones(4, 8)
    grad[0, 0] = 0.0  # this coordinate never sees a gradient: v = 0
    weight.grad = grad
    opt.step()
    (pre,) = adam_preconditioner(opt, [weight])
    seen = 1 / (1.0 + 1e-8)  # v_hat = 1 after bias correction
    assert pre[1:].flatten().tolist() == pytest.approx([seen] * 24)
    assert float(pre[0, 0]) == pytest.approx(PRECONDITIONER_CAP * seen)
    assert 1 / (opt.state[weight]["exp_avg_sq"][0, 0].sqrt() + 1e-8) > 1e7  # what it was


def test_preconditioner_median_is_over_seen_rows_of_a_mostly_unseen_embedding():
    """3 of 1000 rows seen: over all entries the median would be 1/eps and cap nothing."""
    emb = nn.Embedding(1000, 8)
    opt = torch.optim.Adam(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    (pre,) = adam_preconditioner(opt, list(emb.parameters()))
    assert float(pre[1:4].max()) == pytest.approx(1.0, rel=1e-3)
    assert float(pre.max()) == pytest.approx(PRECONDITIONER_CAP, rel=1e-3)


def test_preconditioned_tracking_of_sparse_adam_weights_each_stored_row():
    emb = nn.Embedding(50, 4, sparse=True)
    opt = torch.optim.SparseAdam(list(emb.parameters()), lr=0.1)
    tracker = GradientNoiseScaleTracker(preconditioned=True, num_examples=1000)
    tracker.bind(emb, opt)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        for idx in (torch.tensor([step, 7]), torch.tensor([9, 7])):
            (emb(idx).sum() / 2).backward()
            tracker.after_backward(emb, 2)
        tracker.end_step(emb)
        opt.step()
    assert tracker.noise_scale().preconditioned is not None


def test_a_parameter_adam_never_stepped_leaves_the_preconditioned_metric_on():
    used, unused = nn.Linear(4, 2), nn.Linear(4, 2)
    opt = torch.optim.Adam([*used.parameters(), *unused.parameters()], lr=0.1)
    used(torch.randn(3, 4)).sum().backward()
    opt.step()
    weights = adam_preconditioner(opt, [*used.parameters(), *unused.parameters()])
    assert weights is not None
    assert all(float(w.min()) == 1.0 == float(w.max()) for w in weights[2:])


def test_non_finite_gradient_names_the_step():
    task = make_task(poison=7)
    chunks = epoch_chunks(N, 32, torch.Generator().manual_seed(0))
    step = next(i + 1 for i, c in enumerate(chunks) if 7 in c.tolist())
    with pytest.raises(NoiseEstimateError) as err:
        measure_noise(task, steps=step + 2, every=1)
    assert f"step {step}" in str(err.value)
    tracker = GradientNoiseScaleTracker()
    with pytest.raises(NoiseEstimateError) as err:
        tracker.update([float("nan")], [4], 1.0, 16, step=12)
    assert "non-finite gradient norm at step 12" in str(err.value)
    skipping = GradientNoiseScaleTracker(on_nonfinite="skip")
    skipping.update([float("inf")], [4], 1.0, 16, step=3)
    assert skipping.nonfinite_step == 3 and skipping.samples == []


def test_bad_settings():
    with pytest.raises(ConfigError):
        GradientNoiseScaleTracker(beta=1.5)
    with pytest.raises(ConfigError):
        GradientNoiseScaleTracker(on_nonfinite="ignore")
    with pytest.raises(ConfigError) as err:
        GradientNoiseScaleTracker().update([1.0], [16], 0.5, 16)
    assert "smaller than the big batch" in str(err.value)
    with pytest.raises(NoiseEstimateError):
        GradientNoiseScaleTracker().bind(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ConfigError) as err:
        GradientNoiseScaleTracker(weighting="tokens")
    assert "weighting: expected size or equal" in str(err.value)
    with pytest.raises(ConfigError) as err:
        batchlab.train(
            make_task(),
            8,
            accumulation_steps=4,
            max_steps=1,
            callbacks=[GradientNoiseScaleTracker(weighting="equal")],
        )
    assert "expected weighting='size'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        measure_noise(make_task(), steps=4, micro_batches=5)
    assert "divisor" in str(err.value)
    with pytest.raises(ConfigError) as err:
        measure_noise(make_task(n=100), steps=4, method="per-example")
    assert "fewer than 4 disjoint batches of its reference batch 32" in str(err.value)


def test_too_few_steps_is_unreliable_not_garbage():
    tracker = GradientNoiseScaleTracker()
    assert tracker.noise_scale().b_simple is None
    tracker.update([1.0], [4], 0.5, 16)
    result = tracker.noise_scale()
    assert not result.reliable and "too few samples" in result.reason


@pytest.mark.parametrize("method", ["two-batch", "per-example"])
def test_measure_noise_records_points_and_round_trips(method):
    task = make_task(lambda params, lr: torch.optim.SGD(params, lr=lr))
    run = measure_noise(task, steps=12, every=5, method=method)
    assert [p.step for p in run.points] == [5, 10, 12]
    assert [p.examples for p in run.points] == [160, 320, 384]
    assert all(p.train_loss is not None and p.train_loss > 0 for p in run.points)
    assert run.method == method and run.batch_size == 32
    assert run.micro_batch_size == (8 if method == "two-batch" else 1)
    assert run.final.b_simple == run.points[-1].b_simple
    data = run.to_dict()
    assert set(data) >= {"points", "final"}
    assert set(data["points"][0]) >= {"step", "examples", "train_loss", "b_simple", "b_simple_ci"}
    assert NoiseRun.from_json(run.to_json()) == run


def _tracked_adam_steps(tracker, steps, *, state=None):
    """Plain-loop Adam steps from the same start; yields the tracker's estimate after each."""
    task = make_task(lambda params, lr: torch.optim.Adam(params, lr=lr))
    model, opt = state or (initial_model(task), None)
    opt = opt or task.optimizer(model.parameters(), task.lr)
    tracker.bind(model, opt)
    x, y = task.train_data.tensors
    for indices in steps:
        opt.zero_grad(set_to_none=True)
        for i, idx in enumerate(indices.split(8)):
            (task.loss(model, (x[idx], y[idx])) * len(idx) / len(indices)).backward()
            tracker.after_backward(model, len(idx), last=i == 3)
        tracker.end_step(model)
        opt.step()
        yield tracker.noise_scale(), (model, opt)


def test_state_dict_resumes_with_exactly_the_same_estimates(tmp_path):
    chunks = epoch_chunks(N, 32, torch.Generator().manual_seed(0))[:8]

    def make():
        return GradientNoiseScaleTracker(num_examples=N, preconditioned=True, beta=0.8)

    through = [est for est, _ in _tracked_adam_steps(make(), chunks)]
    first = make()
    state = list(_tracked_adam_steps(first, chunks[:5]))[-1][1]  # the model and Adam
    torch.save(first.state_dict(), tmp_path / "tracker.pt")
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    after = [est for est, _ in _tracked_adam_steps(resumed, chunks[5:], state=state)]
    assert after == through[5:]  # bit for bit, the preconditioned estimate included
    assert after[-1].preconditioned is not None and after[-1].num_examples == 8 * 32
    assert resumed.samples == _samples_of(chunks)  # steps 1-5 saved, 6-8 measured after


def _samples_of(chunks):
    tracker = GradientNoiseScaleTracker(num_examples=N, preconditioned=True, beta=0.8)
    for _ in _tracked_adam_steps(tracker, chunks):
        pass
    return tracker.samples


@pytest.mark.parametrize("all_micro", [True, False])
def test_equal_weighting_ended_before_the_last_micro_batch(all_micro):
    """The Hugging Face path with clipping: losses / k, the big batch read before the last."""
    task = make_task()
    model = initial_model(task)
    x, y = task.train_data.tensors
    indices = epoch_chunks(N, 24, torch.Generator().manual_seed(0))[0]
    small, big = micro_sq_norms(model, task, indices[:16], 8)
    tracker = GradientNoiseScaleTracker(num_examples=N, weighting="equal", all_micro=all_micro)
    for i, idx in enumerate(indices.split(8)):
        (task.loss(model, (x[idx], y[idx])) / 3).backward()
        if i < 2:
            tracker.after_backward(model, 8, last=i == 1)
        if i == 1:
            tracker.end_step(model, num_micro=3)
    small = small if all_micro else small[:1]
    expected = two_batch_estimate(statistics.mean(small), 8, big, 16, N)
    assert tracker.samples[0][1:] == pytest.approx(expected, rel=1e-5)
    full = torch.autograd.grad(task.loss(model, (x[indices], y[indices])), [*model.parameters()])
    assert all(
        torch.allclose(p.grad, f, atol=1e-7) for p, f in zip(model.parameters(), full, strict=True)
    )


def test_state_dict_refuses_another_beta_and_a_step_in_progress():
    tracker = GradientNoiseScaleTracker(beta=0.9)
    tracker.update([1.0], [4], 0.5, 16)
    state = tracker.state_dict()
    with pytest.raises(ConfigError) as err:
        GradientNoiseScaleTracker(beta=0.95).load_state_dict(state)
    assert "beta=0.9" in str(err.value)
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    tracker.after_backward(model, 4)
    with pytest.raises(ConfigError) as err:
        tracker.state_dict()
    assert "between optimizer steps" in str(err.value)


# --- DDP -------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    from conftest import end_ddp_worker, start_ddp_worker
    from torch.nn.parallel import DistributedDataParallel as DDP

    start_ddp_worker(rank, world, port)
    task = make_task()
    model = DDP(initial_model(task))
    tracker = GradientNoiseScaleTracker(num_examples=N)
    tracker.attach_ddp(model)
    x, y = task.train_data.tensors
    for indices in epoch_chunks(N, 32, torch.Generator().manual_seed(0))[:3]:
        local = indices.split(16)[rank]
        model.zero_grad(set_to_none=True)
        task.loss(model, (x[local], y[local])).backward()
        tracker.ddp_end_step(model, 16)
    if rank == 0:
        torch.save([s[1:] for s in tracker.samples], out)
    del tracker, model  # release DDP (and the hook's state) before the group goes
    end_ddp_worker()  # gloo aborts a process torn down while its peer is still talking


@pytest.mark.slow
def test_ddp_replicas_are_the_small_batches(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "samples.pt")
    mp.spawn(_ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    task = make_task()
    model = initial_model(task)
    expected = []
    for indices in epoch_chunks(N, 32, torch.Generator().manual_seed(0))[:3]:
        small, big = micro_sq_norms(model, task, indices, 16)
        expected.append(two_batch_estimate(statistics.mean(small), 16, big, 32, N))
    assert [v for s in got for v in s] == pytest.approx([v for s in expected for v in s], rel=1e-4)


def test_build_noise_scale_is_shared():
    """The tracker and the standalone estimator return the same result type and verdicts."""
    direct = build_noise_scale(2.0, 0.2, None, 0, num_examples=1, method="two-batch")
    assert type(direct) is type(GradientNoiseScaleTracker().noise_scale())
    assert math.isinf(direct.b_simple_ci[1])


def test_a_state_saved_before_the_scale_weights_does_not_drown_new_samples():
    from batchlab.tracking.moments import WeightedMoments

    old = WeightedMoments(0.95)
    for _ in range(50):
        old.add(10.0, 1.0)  # unit weights, as states saved before the scale weights were
    state = old.state_dict()
    del state["scale"]
    resumed = WeightedMoments(0.95)
    resumed.load_state_dict(state)
    for _ in range(100):  # B_simple moves from 10 to 1000, at a gradient scale of 1e4
        resumed.add(1000.0, 1.0, scale=1e4)
    mx, my, _, _ = resumed.estimate()
    # After 100 steps the old history weighs about 0.95**100 ~ 0.6%: the ratio is ~994 (it
    # read ~28 when the old unit-weight sums outweighed the new 1/1e4-weighted samples).
    assert 980 < mx / my <= 1000
