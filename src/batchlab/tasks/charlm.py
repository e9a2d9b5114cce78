"""A small causal transformer, character level, on the Python standard library's own source.

The corpus is built the same way on every machine: the `.py` files at the top of this
interpreter's stdlib directory, in sorted order, concatenated up to `CORPUS_BYTES`.
The last 10% is held out. Validation loss is in nats per character.
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchlab.task import Task

CORPUS_BYTES = 2_000_000
BLOCK = 64  # context length in characters
VOCAB = 128  # ASCII; anything else becomes '?'
VAL_WINDOWS = 512  # cap evaluation cost: 32k held-out characters


def stdlib_corpus(max_bytes: int = CORPUS_BYTES) -> bytes:
    """Deterministic text: stdlib `.py` files in name order, up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


@functools.lru_cache(maxsize=1)
def charlm_tensors():
    raw = torch.frombuffer(bytearray(stdlib_corpus()), dtype=torch.uint8).long()
    tokens = torch.where(raw < VOCAB, raw, torch.full_like(raw, ord("?")))
    split = int(0.9 * len(tokens))

    def windows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = (len(t) - 1) // BLOCK
        x = t[: n * BLOCK].view(n, BLOCK)
        y = t[1 : n * BLOCK + 1].view(n, BLOCK)
        return x.contiguous(), y.contiguous()

    x, y = windows(tokens[:split])
    x_val, y_val = windows(tokens[split:])
    return x, y, x_val[:VAL_WINDOWS], y_val[:VAL_WINDOWS]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(BLOCK, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.blocks(self.tok(idx) + self.pos(pos))
        return self.head(self.ln(h))


def next_char_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def char_accuracy(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"acc": (model(x).argmax(-1) == y).float().mean()}


def adamw(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def charlm() -> Task:
    x, y, x_val, y_val = charlm_tensors()
    return Task(
        name="charlm",
        model=CharTransformer,
        train_data=TensorDataset(x, y),
        val_data=TensorDataset(x_val, y_val),
        loss=next_char_loss,
        metrics=char_accuracy,
        optimizer=adamw,
        lr=3e-3,
        batch_size=32,
        epochs=1,
        description="char-level transformer (2 layers, d=64) on stdlib source; loss in nats/char",
    )
