"""Sharpness measures checked against exact computations, and the leave-no-trace contract."""

import gc
import itertools
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchlab.errors import ConfigError
from batchlab.measure.sharpness import (
    Sharpness,
    epsilon_sharpness,
    fixed_subset,
    hessian_top_eigenvalue,
)
from batchlab.tasks.common import cross_entropy_loss


def mse_loss(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean()


def regression_data(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 2.0, 0.5], dtype=torch.float64
    )
    y = x @ torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    return x, y


def tiny_mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return model, TensorDataset(x, y)


def exact_hessian(model, dataset, loss):
    """The full Hessian of the mean loss, by brute force over flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batch = dataset.tensors

    class Wrapped(nn.Module):
        def __init__(self, params):
            super().__init__()
            self.params = params

        def forward(self, x):
            return torch.func.functional_call(model, self.params, (x,))

    def f(theta):
        parts = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes, strict=True)]
        return loss(Wrapped(dict(zip(names, parts, strict=True))), batch)

    return torch.autograd.functional.hessian(f, flat)


def test_top_eigenvalue_matches_the_exact_hessian_of_a_linear_model():
    x, y = regression_data()
    model = nn.Linear(3, 1, bias=False).double()
    dataset = TensorDataset(x, y)
    # MSE of a linear model: H = 2/n X^T X exactly, whatever the weights.
    exact = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()
    result = hessian_top_eigenvalue(
        model, dataset, mse_loss, max_iterations=200, tol=1e-10, chunk_size=7
    )
    assert result.value == pytest.approx(exact, rel=1e-6)
    assert result.converged and result.method == "hessian_top_eigenvalue"


def test_top_eigenvalue_matches_brute_force_on_a_nonlinear_net():
    model, dataset = tiny_mlp_problem()
    eig = torch.linalg.eigvalsh(exact_hessian(model, dataset, cross_entropy_loss))
    dominant = eig[eig.abs().argmax()].item()  # power iteration finds the largest |lambda|
    result = hessian_top_eigenvalue(
        model, dataset, cross_entropy_loss, max_iterations=500, tol=1e-9
    )
    assert result.value == pytest.approx(dominant, rel=1e-4)


def test_epsilon_sharpness_is_bounded_by_the_exact_box_maximum():
    """A convex quadratic attains its max over the box at a vertex: enumerate all 8."""
    x, y = regression_data()
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():  # start at the least-squares minimum, where the gradient is zero
        model.weight.copy_(torch.linalg.lstsq(x, y.unsqueeze(1)).solution.T)
    dataset = TensorDataset(x, y)
    eps = 1e-2
    w = model.weight.detach().reshape(-1)
    box = eps * (w.abs() + 1)

    def f(weights):
        return ((x @ weights - y) ** 2).mean().item()

    f0 = f(w)
    vertex_values = [
        f(w + torch.tensor(signs, dtype=torch.float64) * box)
        for signs in itertools.product((-1, 1), repeat=3)
    ]
    exact = 100 * (max(vertex_values) - f0) / (1 + f0)
    lowest_vertex = 100 * (min(vertex_values) - f0) / (1 + f0)
    result = epsilon_sharpness(model, dataset, mse_loss, epsilon=eps, max_iterations=50)
    assert result.method == "epsilon_sharpness" and result.epsilon == eps
    assert result.value <= exact * (1 + 1e-6)
    assert result.value >= lowest_vertex * 0.999  # it reached the boundary of the box
    assert result.loss == pytest.approx(f0)


@pytest.mark.parametrize("measure", [hessian_top_eigenvalue, epsilon_sharpness])
def test_a_measurement_leaves_no_trace(measure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(50, 3)
    y = torch.randint(0, 3, (50,))
    dataset = TensorDataset(x, y)
    model.train()
    cross_entropy_loss(model, (x, y)).backward()  # leave some gradients to preserve
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    tensors_before = _live_tensor_bytes()

    result = measure(model, dataset, cross_entropy_loss, num_examples=40)

    assert isinstance(result, Sharpness) and math.isfinite(result.value)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    del result
    gc.collect()
    assert _live_tensor_bytes() <= tensors_before


def _live_tensor_bytes() -> int:
    """Bytes of all distinct CPU tensor storages the garbage collector can reach."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on some torch objects warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        if True:
            ptr = obj.untyped_storage().data_ptr()
            if ptr and ptr not in seen:
                seen.add(ptr)
                total += obj.untyped_storage().nbytes()
    return total


def test_the_subset_is_fixed_and_the_method_is_named():
    model, dataset = tiny_mlp_problem()
    a = hessian_top_eigenvalue(model, dataset, cross_entropy_loss, num_examples=12, seed=3)
    b = hessian_top_eigenvalue(model, dataset, cross_entropy_loss, num_examples=12, seed=3)
    assert a.value == b.value and a.num_examples == 12
    assert "power iteration" in a.description and "Hessian-vector" in a.description
    assert len(fixed_subset(dataset, 12, seed=3)) == 12
    assert list(fixed_subset(dataset, 12, seed=3).indices) == list(
        fixed_subset(dataset, 12, seed=3).indices
    )
    assert Sharpness.from_json(a.to_json()) == a


def test_bad_input_is_a_clear_error():
    model, dataset = tiny_mlp_problem()
    with pytest.raises(ConfigError) as info:
        hessian_top_eigenvalue(model, dataset, cross_entropy_loss, num_examples=0)
    assert "expected a positive integer" in str(info.value)
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ConfigError) as info:
        hessian_top_eigenvalue(frozen, dataset, cross_entropy_loss)
    assert "trainable parameters" in str(info.value)
    with pytest.raises(ConfigError) as info:
        epsilon_sharpness(model, dataset, cross_entropy_loss, epsilon=0)
    assert "epsilon" in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_returns_to_its_level():
    model, dataset = tiny_mlp_problem()
    model = model.float().cuda()
    x, y = dataset.tensors
    dataset = TensorDataset(x.float(), y)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for measure in (hessian_top_eigenvalue, epsilon_sharpness):
        result = measure(model, dataset, cross_entropy_loss)
        assert math.isfinite(result.value)
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start
