"""A tiny residual CNN with BatchNorm and skip connections for the structured-pruning tests.

Not a test module. On scikit-learn's 8x8 digits (`_models.DigitsDataModule`); a fit of a few
batches takes well under a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from structured import Block  # the example's ResNet basic block, shared


class TinyResNet(pl.LightningModule):
    """stem conv+BN -> residual block (8) -> residual block (16, stride 2) -> Linear(16, 10)."""

    def __init__(self, optimizer: str = "adam", lr: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.optimizer, self.lr = optimizer, lr
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class WithEmbedding(pl.LightningModule):
    """An unsupported layer (Embedding) coupled to prunable channels by a residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        return self.fc(torch.relu(h + self.proj(h)).mean(1))
