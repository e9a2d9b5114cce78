"""Lightning: log B_simple and let the batch size follow it, epoch by epoch.

    python examples/lightning_example.py --tiny
    python examples/lightning_example.py --task mnist1d-mlp --epochs 8

A `ResizableBatchSampler` feeds the training loader; `AdaptiveBatchSize` changes its
micro-batch size between optimizer steps from the goodput that `NoiseScaleMonitor`'s B_simple
and the measured step times predict. Every epoch still sees every training example once,
validation runs at each epoch's end and `max_epochs` counts real epochs: the script checks
all three and prints them.
"""

from __future__ import annotations

import argparse
import collections
import csv
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import batchlab
from batchlab.adaptive import ResizableBatchSampler
from batchlab.integrations.lightning import AdaptiveBatchSize, NoiseScaleMonitor


class IndexedData(torch.utils.data.Dataset):
    """A task's data set that also returns each example's index (to count what was seen)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return (*self.data[i], i)


class TaskModule(pl.LightningModule):
    """Any batchlab Task as a LightningModule: its model, loss, metrics and optimizer."""

    def __init__(self, task: batchlab.Task) -> None:
        super().__init__()
        self.task = task
        self.model = task.model()
        self.seen: dict[int, list[int]] = collections.defaultdict(list)
        self.val_runs: list[tuple[int, float]] = []  # (epoch, val_loss)

    def training_step(self, batch, batch_idx):
        *example, index = batch
        self.seen[self.current_epoch] += index.tolist()
        loss = self.task.loss(self.model, tuple(example))
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.task.loss(self.model, batch)
        self.log("val_loss", loss, on_epoch=True)
        return loss

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_runs.append(
                (self.current_epoch, float(self.trainer.callback_metrics["val_loss"]))
            )

    def configure_optimizers(self):
        return self.task.optimizer(self.parameters(), self.task.lr)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="batchlab-lightning-") as logdir:
        run(Path(logdir))  # the Trainer's CSV logs live only as long as the run


def run(logdir: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a few seconds (CI smoke run)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="lightning")  # its tips about workers and logs
    torch.manual_seed(0)
    task = batchlab.load_task("dots" if args.tiny else args.task)
    epochs = 4 if args.tiny else args.epochs

    # Accumulation 2 over half the reference batch: the same update as the reference
    # batch, and two micro-batches per step for the noise scale.
    train_set = IndexedData(task.train_data)
    sampler = ResizableBatchSampler(train_set, task.batch_size // 2, seed=0)
    loader = DataLoader(train_set, batch_sampler=sampler)
    val_loader = DataLoader(task.val_data, batch_size=500)
    monitor = NoiseScaleMonitor()
    adaptive = AdaptiveBatchSize(sampler, monitor, interval=10)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=2,
        callbacks=[monitor, adaptive],
        logger=CSVLogger(logdir, name="adaptive"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    module = TaskModule(task)
    trainer.fit(module, loader, val_loader)

    for d in adaptive.decisions:
        b = "-" if d.b_simple is None else f"{d.b_simple:.0f}"
        print(
            f"step {d.step:4d}  B={d.batch_size:4d} ({d.micro_batch_size} x "
            f"{d.accumulation_steps})  lr={d.lr:.4g}  B_simple={b}  {d.action}"
        )
    n = len(train_set)
    for epoch, val_loss in module.val_runs:
        seen = module.seen[epoch]
        once = sorted(seen) == list(range(n))
        print(
            f"epoch {epoch}: {len(seen)} examples seen ({'each once' if once else 'NOT each once'}), val_loss {val_loss:.4f}"
        )
    print(
        f"{trainer.current_epoch} epochs of {epochs}, {len(module.val_runs)} validation runs, {trainer.global_step} steps"
    )
    rows = list(csv.DictReader(open(next(logdir.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("b_simple")]
    ci = monitor.b_simple_ci
    print(
        f"{len(logged)} B_simple values in the logger, last {float(logged[-1]['b_simple']):.0f}; "
        f"now {monitor.b_simple:.0f} [{ci[0]:.0f}, {ci[1]:.0f}] reliable={monitor.reliable}"
    )


if __name__ == "__main__":
    main()
