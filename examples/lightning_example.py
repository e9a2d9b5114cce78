"""Lightning: log B_simple and let the batch size grow with it.

python examples/lightning_example.py --tiny
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import batchlab
from batchlab.adaptive import ResizableBatchSampler
from batchlab.integrations.lightning import AdaptiveBatchSize, NoiseScaleMonitor


class TaskModule(pl.LightningModule):
    """Any batchlab Task as a LightningModule: its model, loss and optimizer."""

    def __init__(self, task: batchlab.Task) -> None:
        super().__init__()
        self.task = task
        self.model = task.model()

    def training_step(self, batch, batch_idx):
        loss = self.task.loss(self.model, batch)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return self.task.optimizer(self.parameters(), self.task.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a few seconds (CI smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    task = batchlab.load_task("dots" if args.tiny else args.task)
    epochs = 2 if args.tiny else args.epochs

    # Accumulation 2 over half the reference batch: the same update as the reference
    # batch, and two micro-batches per step for the noise scale.
    sampler = ResizableBatchSampler(task.train_data, task.batch_size // 2, seed=0)
    loader = DataLoader(task.train_data, batch_sampler=sampler)
    monitor = NoiseScaleMonitor()
    adaptive = AdaptiveBatchSize(sampler, monitor, interval=10)
    logdir = Path(tempfile.mkdtemp(prefix="batchlab-lightning-"))
    trainer = pl.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=2,
        callbacks=[monitor, adaptive],
        logger=CSVLogger(logdir, name="adaptive"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(TaskModule(task), loader)

    for d in adaptive.decisions:
        b = "-" if d.b_simple is None else f"{d.b_simple:.0f}"
        print(
            f"step {d.step:4d}  B={d.batch_size:4d} ({d.micro_batch_size} x "
            f"{d.accumulation_steps})  lr={d.lr:.4g}  B_simple={b}  {d.action}"
        )
    rows = list(csv.DictReader(open(next(logdir.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("b_simple")]
    print(f"{len(logged)} B_simple values in the logger, last {float(logged[-1]['b_simple']):.0f}")


if __name__ == "__main__":
    main()
