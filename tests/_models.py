"""Small real-data models shared by the tests (scikit-learn's bundled 8x8 digits).

Not a test module. Kept tiny so that a `Trainer.fit` takes well under a second.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(
    n: int | None = None, seed: int = 0, minority: dict[int, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x, y): digits images as float (N, 1, 8, 8) in [0, 1] and int64 labels.

    Args:
        n: keep the first ``n`` samples after a seeded shuffle (all if None).
        seed: shuffle seed.
        minority: class -> fraction of its samples to keep (makes an imbalanced set).
    """
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    if minority:
        keep = torch.ones(len(y), dtype=torch.bool)
        for cls, frac in minority.items():
            idx = (y == cls).nonzero().flatten()
            drop = idx[round(frac * len(idx)) :]
            keep[drop] = False
        x, y = x[keep], y[keep]
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y


class DigitsDataModule(pl.LightningDataModule):
    """Digits split 80/20 into train/val; optional per-sample group attribute."""

    def __init__(
        self,
        batch_size: int = 64,
        n: int | None = 600,
        seed: int = 0,
        with_groups: bool = False,
        minority: dict[int, float] | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.n = n
        self.seed = seed
        self.with_groups = with_groups
        self.minority = minority
        self.shuffle = shuffle

    def setup(self, stage: str | None = None) -> None:
        x, y = digits_tensors(self.n, self.seed, self.minority)
        split = int(0.8 * len(y))
        tensors = [x, y]
        if self.with_groups:
            # protected attribute: "thick strokes" = mean pixel intensity above the median
            ink = x.flatten(1).mean(1)
            tensors.append((ink > ink.median()).long())
        self.train_set = TensorDataset(*(t[:split] for t in tensors))
        self.val_set = TensorDataset(*(t[split:] for t in tensors))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, generator=g
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class SmallCNN(pl.LightningModule):
    """Conv(1->8) Conv(8->16) Linear(256->32) Linear(32->10) on 8x8 digits (about 10k weights)."""

    def __init__(
        self,
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return self.classifier(torch.relu(self.fc(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        raise ValueError(hp.optimizer)


def quiet_trainer_kwargs(tmp_path) -> dict:
    """Trainer settings for fast, quiet CPU tests."""
    return dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        deterministic=True,
    )


class CaptureLogger(Logger):
    """A Lightning logger that keeps every `log_metrics` call."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._save_dir = save_dir
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> str:
        return "0"

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))
