"""Lightning with a resizing batch: epochs are epochs, validation runs, monitors degrade.

Each test fails on the code before issue 13: Lightning called `set_epoch` on nothing the
sampler owned (every epoch after the first came out short or empty), counted an epoch's
batches once at the start of fit (a growing batch skipped validation, a shrinking one cut
the epoch), and the monitor raised instead of warning.
"""

from __future__ import annotations

import collections
import importlib.util
import warnings

import pytest
import torch
from conftest import quiet_trainer
from torch.utils.data import DataLoader, TensorDataset

from batchlab.adaptive import ResizableBatchSampler
from batchlab.adaptive.controller import Decision
from batchlab.errors import ConfigError, NoiseEstimateError
from batchlab.tracking.readout import NoiseScaleWarning

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning is not installed"
)
N = 120


def _module(seen: dict[int, list[int]], vals: list[tuple[int, int]]):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            seen[self.current_epoch] += batch[1].tolist()
            return (self.layer(batch[0]) - 1).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self):
            if not self.trainer.sanity_checking:
                vals.append((self.current_epoch, self.global_step))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Module()


def _data() -> TensorDataset:
    x = torch.linspace(-1, 1, N).unsqueeze(1)
    return TensorDataset(x, torch.arange(N))


def _scripted(sampler, monitor, sizes):
    """The real Lightning `AdaptiveBatchSize`, its controller's decisions scripted."""
    from batchlab.integrations.lightning import AdaptiveBatchSize

    class Scripted(AdaptiveBatchSize):
        def on_fit_start(self, trainer, pl_module):
            super().on_fit_start(trainer, pl_module)
            c, script = self.controller, iter(sizes)

            def decide(step, b_simple):
                micro = next(script, c.micro_batch_size)
                c.micro_batch_size = micro
                d = Decision(step, micro, micro, 1, c.lr, None, None, None, 1.0, "switch")
                c.decisions.append(d)
                return d

            c.decide = decide

    return Scripted(sampler, monitor, interval=3)


def test_resizing_batch_sees_every_example_once_per_epoch_and_validates():
    from batchlab.integrations.lightning import NoiseScaleMonitor

    data = _data()
    sampler = ResizableBatchSampler(data, 10, seed=0)
    # a decision every 3 steps: grow, shrink, grow, shrink... (5 epochs of 120 examples)
    sizes = [24, 5, 17, 7, 40, 3, 12, 9] * 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the monitor's own warning (accumulation 1)
        adaptive = _scripted(sampler, NoiseScaleMonitor(), sizes)
        seen: dict[int, list[int]] = collections.defaultdict(list)
        vals: list[tuple[int, int]] = []
        trainer = quiet_trainer([adaptive], epochs=5)
        trainer.fit(
            _module(seen, vals),
            DataLoader(data, batch_sampler=sampler),
            DataLoader(data, batch_size=60),
        )
    assert sorted(seen) == [0, 1, 2, 3, 4]  # max_epochs=5 means five epochs
    for epoch in range(5):
        assert sorted(seen[epoch]) == list(range(N)), epoch  # each example exactly once
    sizes_used = {d.micro_batch_size for d in adaptive.decisions}
    assert {24, 5, 40, 3} <= sizes_used  # it really grew and shrank
    assert [e for e, _ in vals] == [0, 1, 2, 3, 4]  # validation at each epoch's end
    assert trainer.current_epoch == 5


def test_float_val_check_interval_is_refused_with_the_fix():
    from batchlab.integrations.lightning import AdaptiveBatchSize, NoiseScaleMonitor

    data = _data()
    sampler = ResizableBatchSampler(data, 10, seed=0)
    monitor = NoiseScaleMonitor()
    trainer = quiet_trainer([monitor, AdaptiveBatchSize(sampler, monitor)], epochs=1)
    trainer.val_check_interval = 0.5
    with pytest.raises(ConfigError) as err:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(
                _module(collections.defaultdict(list), []), DataLoader(data, batch_sampler=sampler)
            )
    assert "an int (every N batches)" in str(err.value)


def test_monitor_warns_once_and_training_goes_on():
    from batchlab.integrations.lightning import NoiseScaleMonitor

    data = _data()
    monitor = NoiseScaleMonitor()  # accumulate_grad_batches=1: nothing to contrast
    seen: dict[int, list[int]] = collections.defaultdict(list)
    with pytest.warns(NoiseScaleWarning, match="accumulate_grad_batches>=2") as caught:
        quiet_trainer([monitor], epochs=2).fit(_module(seen, []), DataLoader(data, batch_size=20))
    assert len([w for w in caught if w.category is NoiseScaleWarning]) == 1
    assert len(seen[1]) == N  # trained both epochs
    assert monitor.b_simple is None and not monitor.reliable
    assert "more steps never help" in monitor.noise_scale().reason

    strict = NoiseScaleMonitor(strict=True)
    with pytest.raises(NoiseEstimateError) as err:
        quiet_trainer([strict], epochs=1).fit(_module(seen, []), DataLoader(data, batch_size=20))
    assert "accumulate_grad_batches>=2" in str(err.value)
