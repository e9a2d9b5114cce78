"""Hugging Face Trainer: log B_simple from accumulation micro-steps, grow accumulation with it.

A tiny GPT-2 built from a config (no download) learns batchlab's charlm text, with the
Trainer's defaults for clipping (max_grad_norm=1.0) and evaluation each epoch. While B_simple
is above the batch, `AdaptiveAccumulation` grows `gradient_accumulation_steps` toward it at
the first step the Trainer allows (and the learning rate with the AdaScale gain).

    python examples/hf_trainer_example.py --tiny
    python examples/hf_trainer_example.py --examples 4096 --epochs 4
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from batchlab.integrations.transformers import AdaptiveAccumulation, NoiseScaleCallback
from batchlab.tasks.charlm import BLOCK, VOCAB, charlm_tensors


class Windows(Dataset):
    """Character windows as causal-LM examples (GPT-2 shifts the labels itself)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="batchlab-hf-") as output_dir:
        run(output_dir)  # the Trainer's output directory lives only as long as the run


def run(output_dir: str) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a few seconds (CI smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, _, x_val, _ = charlm_tensors()
    n, epochs = (192, 3) if args.tiny else (args.examples, args.epochs)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)

    noise = NoiseScaleCallback()
    adaptive = AdaptiveAccumulation(noise, interval=4 if args.tiny else 20)
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=4 if args.tiny else 8,
        # >= 3 with clipping on (the default max_grad_norm=1.0): the Trainer clips the last
        # micro-step before callbacks see it, so the first two are the measured pair
        gradient_accumulation_steps=3,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        num_train_epochs=epochs,
        eval_strategy="epoch",
        per_device_eval_batch_size=64,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Windows(x[:n]),
        eval_dataset=Windows(x_val[: max(64, n // 8)]),
        callbacks=[noise, adaptive],
    )
    trainer.train()

    logged = [h for h in trainer.state.log_history if "b_simple" in h]
    print(f"{len(logged)} log entries with b_simple; last: {logged[-1]['b_simple']:.0f}")
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    print(f"{len(evals)} evaluations, eval_loss " + " -> ".join(f"{v:.3f}" for v in evals))
    for d in adaptive.decisions:
        if d.action == "switch":
            print(
                f"step {d.step}: B_simple {d.b_simple:.0f} -> accumulation {d.accumulation_steps}"
            )
    for step, accum in adaptive.applied:
        print(f"from step {step}: gradient_accumulation_steps = {accum}")
    last = adaptive.decisions[-1]
    print(
        f"last decision: B={last.batch_size} ({last.micro_batch_size} x {last.accumulation_steps})"
    )


if __name__ == "__main__":
    main()
