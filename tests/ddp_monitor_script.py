"""DDP helper for tests/test_fairness_monitor.py (run through tests/_ddp.run_ddp).

``python ddp_monitor_script.py OUT_DIR [DEVICES]`` fits SmallCNN with IterativePruning and a
FairnessMonitor on ``DEVICES`` CPU processes (default 2, strategy ddp) and writes
``rank{N}.json`` with the monitor's history into OUT_DIR. With a third argument
``empty-on-rank-1`` the monitor's fairness loader is iterable-style (no ``len``) and empty on
process 1: the fit must fail on both processes with a clear error instead of deadlocking.

The learning rate is 0, so the weights are the seeded initialization (pruned by magnitude)
whatever the number of processes: the measurements of 1 and 2 processes are comparable. The
fairness dataloader is not given to Lightning (no re-sharding); each process takes the samples
``rank::world_size`` of the same tensors, so the union of the shards is exactly the data of the
single-process run. A second monitor uses the default data (the datamodule's validation set,
which the monitor itself shards by batch index under DDP).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _ddp import finish_distributed
from _models import DigitsDataModule, SmallCNN, digits_tensors
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune.callbacks.monitor import FairnessMonitor
from lightning_fairprune.callbacks.pruning import IterativePruning


def fairness_loader(rank: int, world_size: int) -> DataLoader:
    """Samples ``rank::world_size`` of 150 digits with a thick/thin-stroke attribute."""
    x, y = digits_tensors(n=150, seed=3)
    ink = x.flatten(1).mean(1)
    g = (ink > ink.median()).long()
    idx = torch.arange(rank, len(y), world_size)
    return DataLoader(TensorDataset(x[idx], y[idx], g[idx]), batch_size=16)


class ShardedMonitor(FairnessMonitor):
    """A FairnessMonitor whose fairness loader is this process's shard."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.data.dataloader = fairness_loader(trainer.global_rank, trainer.world_size)


class _RankStream(torch.utils.data.IterableDataset):
    """Iterable-style (no ``len``) digits that only process 0 gets; process 1 gets none."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.x, self.y = digits_tensors(n=32, seed=3)

    def __iter__(self):
        if self.rank != 0:
            return iter(())
        return zip(self.x, self.y, strict=True)


class EmptyOnRankOneMonitor(FairnessMonitor):
    """A FairnessMonitor whose fairness loader is empty on process 1 and has no len()."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.data.dataloader = DataLoader(_RankStream(trainer.global_rank), batch_size=8)


def run(out_dir: str, devices: int, mode: str = "") -> dict[str, Any]:
    """Fit and return this process's result (also written to ``rank{N}.json``)."""
    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = SmallCNN(lr=0.0, weight_decay=0.0, momentum=0.0)
    if mode == "empty-on-rank-1":
        monitor = EmptyOnRankOneMonitor(num_groups=10, num_probes=0, predict_excess_loss=False)
    else:
        monitor = ShardedMonitor(num_groups=2, num_probes=3, seed=5)
    # a second monitor on the default data: the datamodule's val_dataloader() (the trainer has
    # none set up, limit_val_batches=0), which the monitor shards by batch index across ranks
    default = FairnessMonitor(num_probes=0, predict_excess_loss=False, name="default")
    pruning = IterativePruning(0.5, schedule="linear", num_rounds=2, start=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[pruning, monitor, default],
        default_root_dir=out_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, datamodule=DigitsDataModule(n=120, batch_size=8))
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "history": monitor.history,
        "default_history": default.history,
        "param_names": monitor.param_names,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    run(
        sys.argv[1],
        int(sys.argv[2]) if len(sys.argv) > 2 else 2,
        sys.argv[3] if len(sys.argv) > 3 else "",
    )
    finish_distributed()
