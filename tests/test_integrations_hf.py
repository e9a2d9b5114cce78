"""Hugging Face Trainer: accumulation grows when the noise says so; the monitor degrades.

Fails on the code before issue 13: `AdaptiveAccumulation` chose by goodput, which never
favours more accumulation at a fixed micro-batch (57 of 57 decisions were `keep`), and
`NoiseScaleCallback` raised (with a wrong hint to set max_grad_norm=0 when it was 0).
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from torch import nn

from batchlab.errors import NoiseEstimateError
from batchlab.tracking.readout import NoiseScaleWarning

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("accelerate") is None,
    reason="transformers is not installed",
)


class Regression(nn.Module):
    """A linear model whose micro-steps take `micro_seconds` each, as in a real model, where
    the forward/backward dominates a step (a bare 8-weight model would be all overhead,
    and accumulation would then raise throughput by itself)."""

    def __init__(self, micro_seconds: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 1)
        self.micro_seconds = micro_seconds

    def forward(self, x, labels=None):
        if self.micro_seconds:
            time.sleep(self.micro_seconds)
        out = self.net(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def noisy_regression(n: int, noise: float) -> list[dict[str, torch.Tensor]]:
    """y = x.w + noise: near the optimum |G|^2 -> 0 and B_noise is in the hundreds."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.linspace(-1, 1, 8) + noise * torch.randn(n, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def windows():
    """A callback that records each optimizer step's [micro-batches run, accumulation,
    whether it was the epoch's last]."""
    from transformers import TrainerCallback

    class Windows(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[list] = []
            self._count = self._k = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._count, self._k = 0, args.gradient_accumulation_steps

        def on_substep_end(self, args, state, control, **kwargs):
            self._count += 1

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append([self._count + 1, self._k, False])

        def on_epoch_end(self, args, state, control, **kwargs):
            self.steps[-1][2] = True

    return Windows()


def train(tmp_path, data, callbacks, micro_seconds: float = 0.0, **overrides):
    from transformers import Trainer, TrainingArguments

    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        num_train_epochs=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    trainer = Trainer(
        Regression(micro_seconds),
        TrainingArguments(**settings),
        train_dataset=data,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def test_accumulation_grows_when_b_noise_is_high(tmp_path):
    from batchlab.integrations.transformers import AdaptiveAccumulation, NoiseScaleCallback

    noise = NoiseScaleCallback()
    adaptive = AdaptiveAccumulation(noise, interval=5)
    record = windows()
    # the default max_grad_norm=1.0: the callback reads the first two micro-steps
    # Goodput never grew here (the micro-steps dominate the step time); the noise must.
    train(
        tmp_path, noisy_regression(480, noise=3.0), [record, noise, adaptive],
        micro_seconds=0.002,
    )  # fmt: skip
    grown = [accum for _, accum in adaptive.applied]
    assert grown and grown[0] > 3 and grown == sorted(grown)  # it grew, never shrank
    # Each switch landed at the first step the Trainer allows, mid-epoch too, and no window
    # was cut: every step ran its accumulation's micro-batches (fewer only at an epoch's end).
    assert all(n == k or last for n, k, last in record.steps), record.steps
    assert len(adaptive.applied) > len([s for s in record.steps if s[2]])  # not only epochs
    switches = [d for d in adaptive.decisions if d.action == "switch"]
    # it grew toward the efficient batch B ~= B_noise, never past it
    assert switches and all(d.batch_size <= round(d.b_simple) for d in switches)
    assert all(d.accumulation_steps <= 16 for d in adaptive.decisions)
    # the learning rate follows the (square root, AdamW) AdaScale gain of the bigger batch
    assert switches[-1].lr > adaptive.decisions[0].lr


@pytest.mark.parametrize(
    ("accumulation", "max_grad_norm", "says", "never"),
    [
        (1, 0.0, "gradient_accumulation_steps >= 2, got 1", "max_grad_norm=0"),
        (1, 1.0, "gradient_accumulation_steps >= 3 (3: max_grad_norm=1.0", None),
        (2, 1.0, "raise it to 3 or more, or set max_grad_norm=0", None),
    ],
)
def test_monitor_warns_with_the_right_fix_and_training_goes_on(
    tmp_path, accumulation, max_grad_norm, says, never
):
    from batchlab.integrations.transformers import NoiseScaleCallback

    noise = NoiseScaleCallback()
    data = noisy_regression(48, noise=1.0)
    with pytest.warns(NoiseScaleWarning) as caught:
        trainer = train(
            tmp_path,
            data,
            [noise],
            gradient_accumulation_steps=accumulation,
            max_grad_norm=max_grad_norm,
            num_train_epochs=1,
        )
    messages = [str(w.message) for w in caught if w.category is NoiseScaleWarning]
    assert len(messages) == 1 and says in messages[0], messages
    assert never is None or never not in messages[0]
    assert trainer.state.global_step == 12 // accumulation  # trained the whole epoch
    assert noise.b_simple is None and says in noise.noise_scale().reason

    with pytest.raises(NoiseEstimateError, match="nothing to contrast|raise it to 3"):
        train(
            tmp_path,
            data,
            [NoiseScaleCallback(strict=True)],
            gradient_accumulation_steps=accumulation,
            max_grad_norm=max_grad_norm,
            num_train_epochs=1,
        )
