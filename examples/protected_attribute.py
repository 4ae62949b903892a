"""Prune a classifier of real tabular data and watch a protected attribute, named groups included.

Data: scikit-lego's Toronto arrests data (`sklego.datasets.load_arrests`, 5,226 rows, shipped
inside the scikit-lego wheel: no download). Target: ``released`` (binary). Protected
attributes: ``colour`` (White, Black) and ``sex`` (Male, Female), measured as the four
intersectional groups ``colour × sex`` ("colour=Black & sex=Female" has about 100 rows).

What it shows:

* `IterativePruning` with a cubic schedule spread over the run (no ``num_rounds``), after a
  third of the epochs of dense training: the dense reference is a trained model;
* `FairnessMonitor` on dict batches with two group keys and value names: per-group accuracy,
  TPR, FPR and selection rate with Wilson intervals, demographic parity and equalized odds,
  measured after every epoch's validation;
* `ModelCheckpoint(monitor="fairprune/worst_group_accuracy")`: the kept checkpoint is the epoch
  whose worst group did best;
* optionally (``--equalize``) the group-equalized loss on the same groups;
* W&B in offline mode (``--wandb``) and a CSV logger, without an account.

Run::

    python examples/protected_attribute.py --out examples/out/arrests
    python examples/protected_attribute.py --fast --wandb   # a quick look, W&B offline
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_fairprune import (
    FairnessMonitor,
    GroupEqualizedLoss,
    GroupEqualizer,
    IterativePruning,
)

COLOURS = ["White", "Black"]
SEXES = ["Male", "Female"]


def load_data(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Features, target and protected attributes of the arrests data, split 70/30."""
    from sklego.datasets import load_arrests

    df = load_arrests(as_frame=True)
    yes = {"Yes": 1.0, "No": 0.0}
    years = sorted(df["year"].unique())
    features = [
        torch.tensor(((df["age"] - df["age"].mean()) / df["age"].std()).to_numpy()),
        torch.tensor(((df["checks"] - df["checks"].mean()) / df["checks"].std()).to_numpy()),
        torch.tensor(df["employed"].map(yes).to_numpy()),
        torch.tensor(df["citizen"].map(yes).to_numpy()),
        *(torch.tensor((df["year"] == year).to_numpy()).double() for year in years),
    ]
    x = torch.stack(features, dim=1).float()
    y = torch.tensor(df["released"].map(yes).to_numpy()).long()
    colour = torch.tensor(df["colour"].map({c: i for i, c in enumerate(COLOURS)}).to_numpy())
    sex = torch.tensor(df["sex"].map({s: i for i, s in enumerate(SEXES)}).to_numpy())
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.7 * len(y))
    parts = {"train": perm[:split], "val": perm[split:]}
    return {
        name: {"x": x[idx], "y": y[idx], "colour": colour[idx].long(), "sex": sex[idx].long()}
        for name, idx in parts.items()
    }


class DictDataset(Dataset):
    """Rows of a dict of equal-length tensors, as dicts (batches collate to dicts)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["y"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class ArrestsModel(pl.LightningModule):
    """A small MLP with class-balanced cross-entropy (83 % of the rows are "released": without
    the class weights it predicts "released" for everyone); with ``equalize`` the loss is
    group-equalized over colour × sex."""

    def __init__(
        self,
        num_features: int,
        class_weight: torch.Tensor,
        equalize: bool = False,
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight.float())
        self.net = nn.Sequential(
            nn.Linear(num_features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
        )
        self.lr = lr
        self.fair_loss = GroupEqualizedLoss(num_groups=4, weight=class_weight) if equalize else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["x"])
        if self.fair_loss is None:
            loss = nn.functional.cross_entropy(logits, batch["y"], weight=self.class_weight)
        else:  # the same product ids as the monitor's groups: colour * 2 + sex
            loss = self.fair_loss(logits, batch["y"], batch["colour"] * 2 + batch["sex"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["x"])
        self.log("val_loss", nn.functional.cross_entropy(logits, batch["y"]))
        self.log("val_acc", (logits.argmax(1) == batch["y"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, prune and monitor; return the monitor, the checkpoint callback and the trainer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/out/arrests", help="output directory")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--equalize", action="store_true", help="group-equalized loss")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline)")
    parser.add_argument("--fast", action="store_true", help="a quick run (a few epochs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = 4 if args.fast else args.epochs
    out = Path(args.out)
    pl.seed_everything(args.seed, workers=True)

    data = load_data(args.seed)
    train = DataLoader(DictDataset(data["train"]), batch_size=128, shuffle=True)
    val = DataLoader(DictDataset(data["val"]), batch_size=512)
    counts = torch.bincount(data["train"]["y"], minlength=2).float()
    class_weight = counts.sum() / (2 * counts)  # inverse class frequency
    model = ArrestsModel(data["train"]["x"].shape[1], class_weight, equalize=args.equalize)

    # rounds from epoch `start` (the dense epochs before it train the reference model) to the
    # last quarter of the run, which fine-tunes
    start = max(1, epochs // 3)
    pruning = IterativePruning(args.sparsity, schedule="cubic", start=start, prune_classifier=True)
    monitor = FairnessMonitor(
        group_key=["colour", "sex"],
        num_groups=[2, 2],
        group_names={"colour": COLOURS, "sex": SEXES},
        every_n_epochs=1,
        num_probes=4,
    )
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        monitor="fairprune/worst_group_accuracy",
        mode="max",
        filename="{epoch}-worst_group_accuracy={fairprune/worst_group_accuracy:.3f}",
        auto_insert_metric_name=False,
    )
    callbacks: list[pl.Callback] = [pruning, monitor, checkpoint]
    if args.equalize:
        names = monitor.data.names_for(monitor.data.num_groups)  # the monitor's group names
        callbacks.append(GroupEqualizer(dual_lr=0.01, start_after_pruning=True, group_names=names))
    loggers: list[Any] = [CSVLogger(str(out), name="csv")]
    if args.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        from lightning.pytorch.loggers import WandbLogger

        loggers.insert(0, WandbLogger(save_dir=str(out), project="fairprune-arrests"))
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=loggers,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()

    final = monitor.history[-1]
    print(f"\nSparsity {final['sparsity']:.3f}, accuracy {final['accuracy']:.3f}")
    print(f"{'group':<28} {'n':>5} {'accuracy':>18} {'TPR':>7} {'FPR':>7} {'selected':>9}")
    for g, name in enumerate(final["group_names"]):
        lo, hi = final["group_accuracy_ci"][g]
        cells = [final[k][g] for k in ("tpr", "fpr", "selection_rate")]
        text = " ".join(f"{c:7.3f}" if c is not None else f"{'n/a':>7}" for c in cells)
        print(f"{name:<28} {final['support'][g]:>5} "
              f"{final['group_accuracy'][g]:.3f} [{lo:.3f}, {hi:.3f}] {text}")  # fmt: skip
    fairness = final["fairness"]
    print(f"demographic parity difference {fairness['demographic_parity_difference']:.3f}, "
          f"equalized odds difference {fairness['equalized_odds_difference']:.3f}")  # fmt: skip
    print(f"Best checkpoint by worst-group accuracy: {checkpoint.best_model_path}")
    print(f"History: {monitor.history_file}")
    return {"monitor": monitor, "checkpoint": checkpoint, "trainer": trainer, "pruning": pruning}


if __name__ == "__main__":
    main()
