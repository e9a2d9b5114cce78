"""B_simple estimators against exact, brute-force Σ and G on a finite dataset."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchlab.core.noise_scale import (
    NoiseScale,
    batch_variance_factor,
    build_noise_scale,
    expected_batch_grad_sq,
    ratio_interval,
    t_quantile,
    two_batch_estimate,
)
from batchlab.errors import BatchlabError, ConfigError, NoiseEstimateError, TaskError
from batchlab.measure.noise import ESTIMATORS, gradient_noise_scale
from batchlab.measure.state import live_tensor_bytes

N = 96  # examples; small enough that batches cover a large share of the data


def bce(model, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def make_problem(n: int = N, seed: int = 0):
    """Noisy logistic regression: a linear model, a finite dataset, exact gradients."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = ((x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + torch.randn(n, generator=g)) > 0).float()
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    return model, TensorDataset(x, y)


def per_example_grads(model, dataset) -> torch.Tensor:
    """(N, P) matrix of per-example gradients, one backward each."""
    params = list(model.parameters())
    rows = []
    for i in range(len(dataset)):
        x, y = dataset[i]
        grads = torch.autograd.grad(bce(model, (x[None], y[None])), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def exact(matrix: torch.Tensor) -> tuple[float, float]:
    """(tr Σ, |G|^2) with Σ the population covariance of the N per-example gradients."""
    mean = matrix.mean(0)
    return float((matrix - mean).square().sum(1).mean()), float(mean.square().sum())


@pytest.fixture(scope="module")
def problem():
    model, data = make_problem()
    trace, grad_sq = exact(per_example_grads(model, data))
    return model, data, trace, grad_sq


# --- the arithmetic ------------------------------------------------------------------------


def test_variance_factor_with_and_without_replacement():
    assert batch_variance_factor(8) == 1 / 8
    assert batch_variance_factor(8, 96) == pytest.approx((96 - 8) / (8 * 95))
    assert batch_variance_factor(96, 96) == 0.0  # the whole dataset: no noise left


def test_two_batch_estimate_is_the_papers_formula():
    small_sq, big_sq, b, big = 3.0, 1.2, 8, 64
    trace, grad_sq = two_batch_estimate(small_sq, b, big_sq, big)
    assert grad_sq == pytest.approx((big * big_sq - b * small_sq) / (big - b))
    assert trace == pytest.approx((small_sq - big_sq) / (1 / b - 1 / big))


def test_expected_batch_grad_sq_holds_empirically(problem):
    """E|G_B|^2 = |G|^2 + tr(Σ) w(B): 1/B with replacement, finite-population w/o."""
    model, data, trace, grad_sq = problem
    matrix = per_example_grads(model, data)
    g = torch.Generator().manual_seed(0)
    draws = 20000
    for b in (2, 8, 32):
        with_repl = matrix[torch.randint(0, N, (draws, b), generator=g)].mean(1)
        without = matrix[torch.rand(draws, N, generator=g).argsort(1)[:, :b]].mean(1)
        for sample, population in ((with_repl, None), (without, N)):
            sq = sample.square().sum(1)
            se = float(sq.std()) / math.sqrt(draws)
            expected = expected_batch_grad_sq(grad_sq, trace, b, population)
            assert abs(float(sq.mean()) - expected) < 4 * se
        # The two sampling schemes are distinguishable at this size: the check has teeth.
        if b == 32:
            sq = without.square().sum(1)
            se = float(sq.std()) / math.sqrt(draws)
            assert abs(float(sq.mean()) - expected_batch_grad_sq(grad_sq, trace, b)) > 8 * se


def test_fieller_interval_bounded_and_unbounded():
    cov = [[0.04, 0.0], [0.0, 0.0001]]
    low, high = ratio_interval(2.0, 0.2, cov, 1.96)
    assert low < 10.0 < high
    # Each end solves (tr - B g)^2 = q^2 Var(tr - B g).
    for end in (low, high):
        assert (2.0 - end * 0.2) ** 2 == pytest.approx(1.96**2 * (0.04 + end**2 * 0.0001))
    # |G|^2 within noise of 0: no upper bound, but still a lower one.
    low, high = ratio_interval(2.0, 0.2, [[0.04, 0.0], [0.0, 0.04]], 1.96)
    assert math.isinf(high) and 0 < low < 10


def test_reliability_verdicts():
    tight = [[1e-4, 0.0], [0.0, 1e-6]]
    ok = build_noise_scale(2.0, 0.2, tight, 30, num_examples=64, method="two-batch")
    assert ok.reliable and ok.reason is None and ok.b_simple == pytest.approx(10.0)
    negative = build_noise_scale(2.0, -0.1, tight, 30, num_examples=64, method="two-batch")
    assert not negative.reliable and negative.b_simple is None
    assert negative.reason.startswith("|G|^2 estimate <= 0")
    loose = [[1.0, 0.0], [0.0, 0.004]]
    wide = build_noise_scale(2.0, 0.2, loose, 30, num_examples=64, method="two-batch")
    assert not wide.reliable and wide.reason.startswith("interval too wide")
    few = build_noise_scale(2.0, 0.2, None, 0, num_examples=64, method="two-batch")
    assert not few.reliable and "too few samples" in few.reason


def test_json_round_trip_keeps_an_unbounded_interval():
    result = build_noise_scale(
        2.0, 0.05, [[0.04, 0.0], [0.0, 0.01]], 10, num_examples=64, method="per-example"
    )
    assert math.isinf(result.b_simple_ci[1])
    assert '"b_simple_ci": [\n' in result.to_json() and "null" in result.to_json()
    assert NoiseScale.from_json(result.to_json()) == result


# --- the estimators: one contract ------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_contract_interval_covers_the_exact_value(problem, method):
    model, data, trace, grad_sq = problem
    truth = trace / grad_sq
    covered = 0
    for seed in range(40):
        r = gradient_noise_scale(
            model, data, bce, batch_size=8, num_batches=8, method=method, seed=seed
        )
        covered += r.b_simple_ci[0] <= truth <= r.b_simple_ci[1]
        assert r.method == method and r.num_examples == 64 and r.dataset_size == N
        assert r.confidence == 0.95
    assert covered >= 34  # nominal 95%: at least 85% of 40 intervals


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_contract_unbiased_over_seeds(problem, method):
    """Both parts are unbiased for the exact tr(Σ) and |G|^2 (finite-population form)."""
    model, data, trace, grad_sq = problem
    runs = [
        gradient_noise_scale(model, data, bce, batch_size=8, num_batches=8, method=method, seed=s)
        for s in range(200)
    ]
    for values, truth in (
        ([r.trace_sigma for r in runs], trace),
        ([r.grad_norm_sq for r in runs], grad_sq),
    ):
        se = statistics.stdev(values) / math.sqrt(len(values))
        assert abs(statistics.mean(values) - truth) < 4 * se, (statistics.mean(values), truth, se)


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_contract_leaves_no_trace(problem, method):
    model, data, _, _ = problem
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 1))
    model.eval()
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    base = live_tensor_bytes()
    gradient_noise_scale(model, data, bce, batch_size=8, num_batches=4, method=method)
    assert live_tensor_bytes() == base
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5))
    assert model[0].bias.grad is None and model[3].weight.grad is None
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_contract_bad_input(problem, method):
    model, data, _, _ = problem

    def run(**kw):
        net, loss = kw.pop("model", model), kw.pop("loss", bce)
        args = dict(batch_size=8, num_batches=4, method=method) | kw
        with pytest.raises(BatchlabError) as err:
            gradient_noise_scale(net, data, loss, **args)
        return str(err.value)

    assert "at least 4" in run(num_batches=2)
    assert "at most the 96 examples" in run(num_batches=13)
    per_example_losses = lambda m, b: F.binary_cross_entropy_with_logits(  # noqa: E731
        m(b[0]).squeeze(-1), b[1], reduction="none"
    )
    assert "scalar" in run(loss=per_example_losses)
    frozen = nn.Linear(4, 1).requires_grad_(False)
    assert "trainable parameters" in run(model=frozen)
    assert "method" in run(method="three-batch")


def test_two_batch_needs_two_examples_per_batch(problem):
    model, data, _, _ = problem
    with pytest.raises(ConfigError) as err:
        gradient_noise_scale(model, data, bce, batch_size=1, num_batches=8)
    assert str(err.value).startswith("two-batch: expected batch_size >= 2, got 1")


def test_non_finite_gradient_names_the_batch(problem):
    model, data, _, _ = problem
    x, y = data.tensors
    poisoned = x.clone()
    poisoned[5] = float("nan")
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    batch = int((order == 5).nonzero()) // 8 + 1
    with pytest.raises(NoiseEstimateError) as err:
        gradient_noise_scale(model, TensorDataset(poisoned, y), bce, batch_size=8, num_batches=12)
    assert f"non-finite gradient in measurement batch {batch} of 12" in str(err.value)


def test_non_scalar_loss_is_a_task_error(problem):
    model, data, _, _ = problem
    with pytest.raises(TaskError):
        gradient_noise_scale(
            model, data, lambda m, b: m(b[0]), batch_size=8, num_batches=4, method="per-example"
        )


# --- the pooled estimate and its interval, recomputed by hand ---------------------------------


def _batches(seed: int, b: int, m: int) -> list[torch.Tensor]:
    order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    return list(order[: b * m].split(b))


def _pooled(matrix, batches, scale=None):
    """(tr, |G|^2) with each batch a small batch and all of them the big batch."""
    rows = matrix if scale is None else matrix * scale
    b, n = len(batches[0]), sum(len(i) for i in batches)
    small = statistics.mean(float(rows[i].mean(0).square().sum()) for i in batches)
    big = float(rows[torch.cat(batches)].mean(0).square().sum())
    return two_batch_estimate(small, b, big, n, N)


def test_pooled_estimate_and_jackknife_interval_by_hand(problem):
    model, data, _, _ = problem
    matrix = per_example_grads(model, data)
    seed, b, m = 3, 8, 5
    batches = _batches(seed, b, m)
    r = gradient_noise_scale(model, data, bce, batch_size=b, num_batches=m, seed=seed)
    trace, grad_sq = _pooled(matrix, batches)
    assert (r.trace_sigma, r.grad_norm_sq) == pytest.approx((trace, grad_sq), rel=1e-4)
    leave_out = [_pooled(matrix, batches[:i] + batches[i + 1 :]) for i in range(m)]
    mean = [statistics.mean(v[k] for v in leave_out) for k in range(2)]
    cov = [
        [
            (m - 1) / m * sum((v[j] - mean[j]) * (v[k] - mean[k]) for v in leave_out)
            for k in range(2)
        ]
        for j in range(2)
    ]
    expected = ratio_interval(trace, grad_sq, cov, t_quantile(0.95, m - 1))
    assert r.b_simple_ci == pytest.approx(expected, rel=1e-3)


def test_per_example_is_the_pooled_formula_with_batches_of_one(problem):
    model, data, _, _ = problem
    matrix = per_example_grads(model, data)
    batches = _batches(1, 8, 6)
    r = gradient_noise_scale(
        model, data, bce, batch_size=8, num_batches=6, method="per-example", seed=1
    )
    examples = [i.reshape(1) for i in torch.cat(batches)]
    assert (r.trace_sigma, r.grad_norm_sq) == pytest.approx(_pooled(matrix, examples), rel=1e-4)
    assert r.small_batch == 1 and r.big_batch == 48


def test_adam_preconditioned_variant(problem):
    model, data, _, _ = problem
    model = nn.Linear(4, 1)
    model.load_state_dict(problem[0].state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert (
        gradient_noise_scale(
            model, data, bce, batch_size=8, num_batches=5, optimizer=sgd
        ).preconditioned
        is None
    )
    adam = torch.optim.Adam(model.parameters(), lr=0.0)  # lr 0: the weights stay put
    assert (
        gradient_noise_scale(
            model, data, bce, batch_size=8, num_batches=5, optimizer=adam
        ).preconditioned
        is None
    )  # no second moments before the first step
    bce(model, data[:32]).backward()
    adam.step()
    adam.zero_grad()
    r = gradient_noise_scale(model, data, bce, batch_size=8, num_batches=5, optimizer=adam)
    v = torch.cat([adam.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    scale = 1 / ((v / (1 - 0.999)).sqrt() + 1e-8)
    expected = _pooled(per_example_grads(model, data).float(), _batches(0, 8, 5), scale)
    pre = r.preconditioned
    assert (pre.trace_sigma, pre.grad_norm_sq) == pytest.approx(expected, rel=1e-3)
    assert pre.b_simple != pytest.approx(r.b_simple, rel=0.01)


def test_batchnorm_buffers_are_restored_by_two_batch(problem):
    _, data, _, _ = problem
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradient_noise_scale(model, data, bce, batch_size=8, num_batches=4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(NoiseEstimateError):
        gradient_noise_scale(model, data, bce, batch_size=8, num_batches=4, method="per-example")


def test_explicit_device_measures_a_copy(problem):
    model, data, _, _ = problem
    auto = gradient_noise_scale(model, data, bce, batch_size=8, num_batches=4)
    cpu = gradient_noise_scale(model, data, bce, batch_size=8, num_batches=4, device="cpu")
    assert cpu == auto


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measurement_matches_cpu_and_frees_memory(problem):
    model, data, _, _ = problem
    cpu = gradient_noise_scale(model, data, bce, batch_size=8, num_batches=6)
    cuda_model = nn.Linear(4, 1).cuda()
    cuda_model.load_state_dict(model.state_dict())
    base = torch.cuda.memory_allocated()
    rng = torch.cuda.get_rng_state_all()
    gpu = gradient_noise_scale(cuda_model, data, bce, batch_size=8, num_batches=6)
    assert torch.cuda.memory_allocated() == base
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), rng, strict=True))
    assert gpu.b_simple == pytest.approx(cpu.b_simple, rel=1e-3)
