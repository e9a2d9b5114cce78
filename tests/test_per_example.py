"""Per-example gradient norms: each layer trick and the vmap fallback against a plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchlab.errors import NoiseEstimateError, TaskError
from batchlab.measure import per_example
from batchlab.measure.per_example import PerExampleGradNorms, per_example_grad_norms
from batchlab.tasks.charlm import CharTransformer, next_char_loss
from batchlab.tasks.mnist1d import CNN


def brute_force_sq_norms(model, loss_fn, batch) -> torch.Tensor:
    """|grad loss(model, example i)|^2 by one backward per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch[0].shape[0]
    out = []
    for i in range(n):
        grads = torch.autograd.grad(
            loss_fn(model, tuple(t[i : i + 1] for t in batch)), params, allow_unused=True
        )
        out.append(sum(g.double().square().sum() for g in grads if g is not None))
    return torch.stack(out)


def ce_loss(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class SeqModel(nn.Module):
    """Token + positional embeddings (the latter without a batch dim), LayerNorm, MLP."""

    def __init__(self, vocab: int = 11, dim: int = 8, length: int = 5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(length, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 16)
        self.out = nn.Linear(16, vocab)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.out(F.gelu(self.fc(self.norm(h))))


class TiedModel(nn.Module):
    """Input embedding and output layer share one weight: a tied parameter."""

    def __init__(self, vocab: int = 9, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


class RawParam(nn.Module):
    """A parameter used directly (no module the trick knows) plus GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6) * 0.5)
        self.gn = nn.GroupNorm(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.gn(torch.tanh(x @ self.w)))


def _cases():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (6, 5), generator=g)
    tokens[0, :2] = 0  # padding tokens get no gradient
    tokens[1] = 3  # one token repeated: its rows add up before the norm
    return {
        "mlp-inplace-relu": (
            nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)),
            (torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)),
        ),
        "seq-embedding-layernorm": (
            SeqModel(),
            (tokens, torch.randint(0, 11, (6, 5), generator=g)),
        ),
        "conv1d-cnn": (
            CNN(),
            (torch.randn(6, 40, generator=g), torch.randint(0, 10, (6,), generator=g)),
        ),
        "conv2d-same-dilated": (
            nn.Sequential(
                nn.Conv2d(2, 3, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(2, 1)),
                nn.Flatten(),
                nn.Linear(4 * 4 * 4, 3),
            ),
            (torch.randn(6, 2, 7, 7, generator=g), torch.randint(0, 3, (6,), generator=g)),
        ),
        "tied-weights": (
            TiedModel(),
            (torch.randint(0, 9, (6, 4), generator=g), torch.randint(0, 9, (6, 4), generator=g)),
        ),
        "raw-param-groupnorm": (
            RawParam(),
            (torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)),
        ),
        "rmsnorm": (
            nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 3)),
            (torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)),
        ),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_norms_match_one_backward_per_example(name):
    torch.manual_seed(1)
    model, batch = _cases()[name]
    expected = brute_force_sq_norms(model, ce_loss, batch)
    got = per_example_grad_norms(model, ce_loss, batch)
    assert got.double() == pytest.approx(expected, rel=2e-5, abs=1e-9)


def test_batch_gradient_is_the_mean_of_the_examples():
    torch.manual_seed(0)
    model, batch = _cases()["seq-embedding-layernorm"]
    params = list(model.parameters())
    _, grads, loss = PerExampleGradNorms(model, ce_loss, params)(batch)
    expected = torch.autograd.grad(ce_loss(model, batch), params)
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-7)
    assert float(loss) == pytest.approx(float(ce_loss(model, batch).detach()))


def test_plan_hooks_batch_first_modules_and_falls_back_for_the_rest():
    torch.manual_seed(0)
    cases = _cases()
    seq, batch = cases["seq-embedding-layernorm"]
    norms = PerExampleGradNorms(seq, ce_loss, list(seq.parameters()))
    norms(batch)
    assert set(norms.fallback) == {"pos.weight"}  # called with arange(T): no batch dim
    assert {type(m) for m in norms.hooked} == {nn.Embedding, nn.LayerNorm, nn.Linear}
    tied, batch = cases["tied-weights"]
    norms = PerExampleGradNorms(tied, ce_loss, list(tied.parameters()))
    norms(batch)
    assert set(norms.fallback) == {"emb.weight"}  # shared by two modules
    raw, batch = cases["raw-param-groupnorm"]
    norms = PerExampleGradNorms(raw, ce_loss, list(raw.parameters()))
    norms(batch)
    assert set(norms.fallback) == {"w", "gn.weight", "gn.bias"}


@pytest.mark.parametrize("path", ["gram", "direct"])
def test_linear_on_sequences_both_paths(monkeypatch, path):
    """(n, T, d) inputs: the gradient is a sum of T outer products; its norm is not rank-1."""
    real = per_example._sum_outer_sq

    def forced(x, d):
        n, t, a = x.shape
        if path == "gram":
            return ((x @ x.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
        return torch.bmm(d.transpose(1, 2), x).square().sum((1, 2))

    monkeypatch.setattr(per_example, "_sum_outer_sq", forced)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))
    batch = (torch.randn(5, 7, 3), torch.randint(0, 5, (5, 7)))
    expected = brute_force_sq_norms(model, ce_loss, batch)
    assert per_example_grad_norms(model, ce_loss, batch).double() == pytest.approx(
        expected, rel=2e-5
    )
    # The rank-1 shortcut |x|^2 |d|^2 summed over positions is wrong here: make sure the
    # comparison can tell.
    monkeypatch.setattr(
        per_example,
        "_sum_outer_sq",
        lambda x, d: (x.square().sum(-1) * d.square().sum(-1)).sum(1),
    )
    wrong = per_example_grad_norms(model, ce_loss, batch).double()
    assert wrong != pytest.approx(expected, rel=1e-3)
    monkeypatch.setattr(per_example, "_sum_outer_sq", real)


@pytest.mark.parametrize("scatter", [True, False])
def test_embedding_both_paths(monkeypatch, scatter):
    monkeypatch.setattr(per_example, "VMAP_CHUNK_FLOATS", 1 << 26 if scatter else 0)
    torch.manual_seed(0)
    model, batch = _cases()["seq-embedding-layernorm"]
    expected = brute_force_sq_norms(model, ce_loss, batch)
    assert per_example_grad_norms(model, ce_loss, batch).double() == pytest.approx(
        expected, rel=2e-5
    )


def test_charlm_transformer_with_attention():
    torch.manual_seed(0)
    model = CharTransformer(dim=16, layers=1, heads=2)
    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randint(0, 128, (4, 12), generator=g),
        torch.randint(0, 128, (4, 12), generator=g),
    )
    expected = brute_force_sq_norms(model, next_char_loss, batch)
    norms = PerExampleGradNorms(model, next_char_loss, list(model.parameters()))
    got, _, _ = norms(batch)
    assert got.double() == pytest.approx(expected, rel=2e-5)
    assert set(norms.fallback) == {"pos.weight"}


@pytest.mark.parametrize("strategy", ["hooks", "vmap"])
def test_both_strategies_are_exact_when_a_fallback_is_needed(strategy):
    """With a vmap fallback, the faster of hooks+vmap and all-vmap is picked: both exact."""
    torch.manual_seed(0)
    model, batch = _cases()["seq-embedding-layernorm"]
    params = list(model.parameters())
    norms = PerExampleGradNorms(model, ce_loss, params)
    norms(batch)
    assert norms.strategy in ("hooks", "vmap")
    norms.strategy = strategy
    sq, grads, loss = norms(batch)
    assert sq.double() == pytest.approx(brute_force_sq_norms(model, ce_loss, batch), rel=2e-5)
    expected = torch.autograd.grad(ce_loss(model, batch), params)
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-6)
    assert float(loss) == pytest.approx(float(ce_loss(model, batch).detach()), rel=1e-6)


def test_a_batch_of_one_is_its_own_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batch = (torch.randn(1, 3), torch.randint(0, 2, (1,)))
    expected = brute_force_sq_norms(model, ce_loss, batch)
    assert per_example_grad_norms(model, ce_loss, batch).double() == pytest.approx(expected)


def test_hooks_are_removed_and_grads_untouched():
    torch.manual_seed(0)
    model, batch = _cases()["seq-embedding-layernorm"]
    per_example_grad_norms(model, ce_loss, batch)
    for mod in model.modules():
        assert not mod._forward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(NoiseEstimateError) as err:
        per_example_grad_norms(model, ce_loss, batch)
    assert "BatchNorm1d in training mode" in str(err.value)
    assert "method='two-batch'" in str(err.value)
    model.eval()  # running statistics: examples are independent again
    expected = brute_force_sq_norms(model, ce_loss, batch)
    assert per_example_grad_norms(model, ce_loss, batch).double() == pytest.approx(
        expected, rel=2e-5
    )


def test_batch_without_a_shared_first_dimension_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(TaskError) as err:
        per_example_grad_norms(model, ce_loss, (torch.randn(4, 3), torch.randint(0, 2, (5,))))
    assert "first dimension" in str(err.value)
