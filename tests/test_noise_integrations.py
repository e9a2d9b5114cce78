"""The integrations feed the one tracker without changing training: same weights, bit for bit."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import quiet_trainer
from torch import nn


def missing(name: str) -> bool:
    return importlib.util.find_spec(name) is None


class _Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g)
    y = x[:, 0] - 2 * x[:, 1] + torch.randn(n, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _hf_train(tmp_path, n: int, max_grad_norm: float, callbacks: list) -> nn.Module:
    from transformers import Trainer, TrainingArguments

    model = _Regression()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        max_grad_norm=max_grad_norm,
        num_train_epochs=2,
        learning_rate=0.05,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    Trainer(model, args, train_dataset=_data(n), callbacks=callbacks).train()
    return model


@pytest.mark.skipif(missing("transformers"), reason="transformers is not installed")
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
@pytest.mark.parametrize("n", [52, 56])  # 13 or 14 micro-steps an epoch: a short last step
def test_hf_callback_leaves_training_unchanged(tmp_path, n, max_grad_norm):
    from batchlab.integrations.transformers import NoiseScaleCallback

    plain = _hf_train(tmp_path, n, max_grad_norm, [])
    noise = NoiseScaleCallback()
    tracked = _hf_train(tmp_path, n, max_grad_norm, [noise])
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(noise.tracker.samples) >= 6  # 4 full steps an epoch, 2 epochs


def _lightning_train(callbacks: list, *, clip: float | None) -> nn.Module:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _Regression()

        def training_step(self, batch, batch_idx):
            return self.model(**batch)["loss"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    module = Module()
    loader = DataLoader(_data(52), batch_size=4, shuffle=False)  # 13 batches: a short window
    trainer = quiet_trainer(callbacks, epochs=2, accumulate_grad_batches=3, gradient_clip_val=clip)
    trainer.fit(module, loader)
    return module


@pytest.mark.skipif(missing("lightning"), reason="lightning is not installed")
@pytest.mark.parametrize("clip", [None, 0.5])
def test_lightning_monitor_leaves_training_unchanged(clip):
    from batchlab.integrations.lightning import NoiseScaleMonitor

    plain = _lightning_train([], clip=clip)
    monitor = NoiseScaleMonitor()
    tracked = _lightning_train([monitor], clip=clip)
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(monitor.tracker.samples) == 8  # 4 windows of 3 an epoch (the short one: 1)
