"""Which remedy protects the worst group on *your* data? Train the recipes over N seeds, compare.

One command trains every recipe of `RECIPES` (plain fine-tuning, static inverse-frequency group
weights, the group-equalized Lagrangian: all with magnitude pruning in rounds) for N seeds on
real digits with two minority classes, then compares them with
`lightning_fairprune.report.compare_recipes`: worst-group accuracy at matched accuracy, paired
by seed, against the plain recipe, with confidence intervals and Bonferroni-corrected Wilcoxon
p-values, and the Pareto curves with CI bands over seeds::

    python examples/compare_recipes.py --seeds 5 --out examples/out/compare   # minutes (2 cores)
    python examples/compare_recipes.py --fast                                 # seconds (smoke)
    python examples/compare_recipes.py --data mnist --seeds 10                # 5,000 MNIST digits

The same comparison from the command line, on the run directories this writes::

    fairprune-report compare --recipe plain OUT/plain/seed_* --recipe weighted \\
        OUT/weighted/seed_* --recipe equalized OUT/equalized/seed_* --baseline plain \\
        --metric worst_group_accuracy --at accuracy --out OUT/compare

**Your own model and data.** Replace `make_data` (a LightningDataModule whose batches are
``(x, y)``: the groups are the classes, or ``(x, y, g)`` with a protected attribute and
``num_groups``) and `make_network` (any ``nn.Module`` returning logits); `RecipeModule` wraps
them with the recipe's loss. A recipe is a loss factory (from the training group counts) and
the callbacks it needs; add one by adding an entry to `RECIPES`.

Every run writes its `FairnessMonitor` history to ``OUT/<recipe>/seed_<i>/`` (run ``i`` of
every recipe uses seed ``i``: same data split, same initialization, so the runs are paired).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from fairprune_examples import DEMO_MINORITY, MNISTDigitsDataModule, SklearnDigitsDataModule
from torch import Tensor, nn

from lightning_fairprune import (
    FairnessMonitor,
    GroupEqualizedLoss,
    GroupEqualizer,
    GroupWeightedLoss,
    IterativePruning,
    inverse_frequency_weights,
)
from lightning_fairprune.report import compare_recipes, write_comparison


@dataclass
class Recipe:
    """A training recipe: its loss (built from the training group counts) and its callbacks.

    ``loss(counts)`` returns the criterion ``fn(logits, targets, groups)`` (a group loss
    module), or ``None`` for plain cross-entropy; ``callbacks()`` the extra callbacks (e.g. the
    `GroupEqualizer` that drives a group loss).
    """

    loss: Callable[[Tensor], nn.Module | None]
    callbacks: Callable[[], list[pl.Callback]] = field(default=list)
    about: str = ""


#: The candidates, compared with the first one ("plain"). Each runs magnitude pruning in rounds;
#: the group losses start with the first round (`GroupEqualizer(start_after_pruning=True)`), so
#: seed i of every recipe prunes the same dense model and the recipes differ only in how they
#: fine-tune (drop ``start_after_pruning`` to apply a loss throughout the fit).
RECIPES: dict[str, Recipe] = {
    "plain": Recipe(lambda counts: None, about="cross-entropy"),
    "weighted": Recipe(
        lambda counts: GroupWeightedLoss(inverse_frequency_weights(counts)),
        lambda: [GroupEqualizer(start_after_pruning=True)],
        about="GroupWeightedLoss(inverse_frequency_weights) from the first round on",
    ),
    "equalized": Recipe(
        lambda counts: GroupEqualizedLoss(len(counts), constraint="signed"),
        lambda: [GroupEqualizer(dual_lr=0.01, start_after_pruning=True)],
        about="GroupEqualizedLoss(signed), dual step 0.01, from the first round on",
    ),
    # Add more recipes here, e.g. the constrained excess-accuracy-gap loss (Hashemizadeh et al.,
    # ICLR 2024; issue 21 item 1) once it lands:
    # "constrained_gap": Recipe(lambda counts: <its loss>(num_groups=len(counts), ...),
    #                           lambda: [GroupEqualizer(...)], about="constrained gaps"),
}


class RecipeModule(pl.LightningModule):
    """Any classifier ``network`` trained with a recipe's ``criterion`` (None: cross-entropy)."""

    def __init__(self, network: nn.Module, criterion: nn.Module | None, lr: float) -> None:
        super().__init__()
        self.network = network
        self.criterion = criterion  # a submodule: its multipliers are checkpointed
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        groups = batch[2] if len(batch) > 2 else y
        logits = self(x)
        if self.criterion is None:
            return nn.functional.cross_entropy(logits, y)
        return self.criterion(logits, y, groups)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def make_data(name: str, seed: int, batch_size: int) -> pl.LightningDataModule:
    """Digits with minority classes 3 and 8 (15 % of their training images kept)."""
    module = MNISTDigitsDataModule if name == "mnist" else SklearnDigitsDataModule
    return module(minority=DEMO_MINORITY, seed=seed, batch_size=batch_size)


def make_network(name: str) -> nn.Module:
    """A small MLP over the flattened image (8x8 digits or 28x28 MNIST)."""
    side = 28 if name == "mnist" else 8
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))  # fmt: skip


def train_run(label: str, recipe: Recipe, seed: int, args: argparse.Namespace) -> Path:
    """Train one recipe with one seed; return its run directory (holding its history)."""
    run_dir = Path(args.out) / label / f"seed_{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # one history per run directory
    run_dir.mkdir(parents=True)
    pl.seed_everything(seed, workers=True, verbose=False)
    data = make_data(args.data, seed, args.batch_size)
    data.setup("fit")
    counts = torch.bincount(data.train_set.tensors[1], minlength=10).double()
    model = RecipeModule(make_network(args.data), recipe.loss(counts), lr=args.lr)
    pruning = IterativePruning(args.sparsity, num_rounds=args.rounds, start=args.dense_epochs)
    monitor = FairnessMonitor(every_n_epochs=1, num_probes=0, gradient_norms=False,
                              predict_excess_loss=False, log=False)  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=args.dense_epochs + args.rounds + args.finetune_epochs,
        callbacks=[pruning, monitor, *recipe.callbacks()],
        default_root_dir=str(run_dir),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return run_dir  # the history is under it (fairprune/version_0/ with logger=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every recipe for every seed, compare them, write the table and the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="examples/out/compare", help="output directory")
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per recipe (paired)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--rounds", type=int, default=4, help="pruning rounds, one per epoch")
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fast", action="store_true", help="tiny: 2 seeds, a few epochs")
    args = parser.parse_args(argv)
    if args.fast:
        args.seeds, args.rounds, args.dense_epochs, args.finetune_epochs = 2, 2, 4, 1
        args.batch_size, args.lr = 128, 0.2
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banner

    run_dirs: dict[str, list[Path]] = {label: [] for label in args.recipes}
    for label in args.recipes:
        print(f"{label}: {RECIPES[label].about}, {args.seeds} seeds", flush=True)
        for seed in range(args.seeds):
            run_dirs[label].append(train_run(label, RECIPES[label], seed, args))

    baseline = args.recipes[0]
    comparison = None
    for at, level in (("accuracy", None), ("accuracy", "per_seed"), ("sparsity", None)):
        try:  # one accuracy level for all runs, else one per seed, else equal sparsity
            comparison = compare_recipes(run_dirs, "worst_group_accuracy", baseline, at, level)
            break
        except ValueError as err:
            print(f"\nNot compared at {at} (level={level!r}): {err}")
    assert comparison is not None
    written = write_comparison(comparison, Path(args.out) / "compare")
    print()
    print(comparison.table())
    print(f"\nTable and figures: {', '.join(str(p) for p in written)}")
    return {"comparison": comparison, "run_dirs": run_dirs, "written": written}


if __name__ == "__main__":
    main()
