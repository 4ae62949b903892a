"""DDP (2 CPU processes, gloo) runs of GroupEqualizer; every rank writes ``rank{N}.json``.

Usage: ``python ddp_equalizer_script.py OUT_DIR [MODE]`` (see ``tests/_ddp.py``). MODE
``equalized`` (default): each rank records the per-group loss sums and counts of its own batches
so that the test can replay the dual steps on the union of both ranks' data. MODE ``gap``: a
`ConstrainedGapLoss` whose dense reference is measured on each rank's own shard of held-out
data at fit start; each rank records that shard's naive per-group counts and, per batch, the
groups and per-sample correctness, so that the test can replay the replay buffers and the dual
steps on the union; then a second fit with ``GroupEqualizer(heldout=True)`` on the same shards,
where each rank records its shard's naive per-class loss sums at every dual step.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _ddp import finish_distributed
from _models import DigitsDataModule, SmallCNN
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Subset

from lightning_fairprune import FairnessData
from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.losses import ConstrainedGapLoss, GroupEqualizedLoss

DUAL_LR = 0.1
EVERY_N_STEPS = 2


class DDPEqualizedCNN(SmallCNN):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.criterion = GroupEqualizedLoss(10, constraint="signed")
        self.batches: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.criterion(logits, y)
        with torch.no_grad():
            per = F.cross_entropy(logits, y, reduction="none").double()
            self.batches.append(
                {
                    "global_step": int(self.trainer.global_step),
                    "sums": torch.zeros(10, dtype=torch.float64).index_add(0, y, per).tolist(),
                    "counts": torch.zeros(10, dtype=torch.float64)
                    .index_add(0, y, torch.ones_like(per))
                    .tolist(),
                }
            )
        return loss


class DDPGapCNN(SmallCNN):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.criterion = ConstrainedGapLoss(10, tolerance=0.0, buffer_size=4)
        self.batches: list[dict] = []

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        self.batches.append(
            {
                "global_step": int(self.trainer.global_step),
                "groups": y.tolist(),
                "correct": (logits.argmax(1) == y).double().tolist(),
            }
        )
        return self.criterion(logits, y)


def _trainer(out_dir: Path, callbacks: list, max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=max_epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=callbacks,
        default_root_dir=str(out_dir),
    )


def _naive_counts(model: torch.nn.Module, loader: DataLoader) -> dict[str, list[float]]:
    """Per-class samples, correct predictions and loss sums of ``model`` (float64)."""
    seen, correct, loss = (torch.zeros(10, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            for i, c in enumerate(y.tolist()):
                seen[c] += 1
                correct[c] += float(logits[i].argmax() == c)
                loss[c] += float(F.cross_entropy(logits[i : i + 1].double(), y[i : i + 1]))
    return {"seen": seen.tolist(), "correct": correct.tolist(), "loss": loss.tolist()}


class ShardRecorder(Callback):
    """Naive per-class loss sums and counts of this rank's shard at every dual step."""

    def __init__(self) -> None:
        self.loader: DataLoader | None = None
        self.steps: list[dict[str, list[float]]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step % EVERY_N_STEPS == 0:
            pl_module.eval()
            self.steps.append(_naive_counts(pl_module, self.loader))
            pl_module.train()


def heldout_fit(out_dir: Path, shard_of) -> dict:
    pl.seed_everything(0, verbose=False)
    model = DDPEqualizedCNN()
    recorder = ShardRecorder()
    equalizer = GroupEqualizer(dual_lr=DUAL_LR, every_n_steps=EVERY_N_STEPS, log=False)
    trainer = _trainer(out_dir, [recorder, equalizer], max_epochs=1)
    dm = DigitsDataModule(batch_size=32, n=400, shuffle=False)
    dm.setup()
    recorder.loader = shard_of(dm, trainer.global_rank)  # each rank its own shard
    equalizer.data, equalizer.heldout = FairnessData(recorder.loader), True
    trainer.fit(model, dm)
    return {
        "heldout_multipliers": model.criterion.multipliers.double().tolist(),
        "heldout_steps": recorder.steps,
    }


def _shard(dm: DigitsDataModule, rank: int) -> DataLoader:
    return DataLoader(Subset(dm.val_set, range(rank, len(dm.val_set), 2)), batch_size=16)


def gap(out_dir: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = DDPGapCNN()
    dm = DigitsDataModule(batch_size=32, n=400, shuffle=False)
    dm.setup()
    equalizer = GroupEqualizer(dual_lr=0.5, every_n_steps=EVERY_N_STEPS)
    trainer = _trainer(out_dir, [equalizer], max_epochs=2)
    # each process its own held-out shard (FairnessData uses a given loader as is)
    shard = _shard(dm, trainer.global_rank)
    equalizer.data = FairnessData(shard)
    reference = _naive_counts(model, shard)
    trainer.fit(model, dm)
    trainer.save_checkpoint(out_dir / "gap.ckpt")
    record = {
        "reference_counts": reference,
        "reference": model.criterion.reference.double().tolist(),
        "multipliers": model.criterion.multipliers.double().tolist(),
        "num_dual_steps": equalizer.num_dual_steps,
        "batches": model.batches,
        "state_key": equalizer.state_key,
    }
    record.update(heldout_fit(out_dir, _shard))
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(out_dir: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = DDPEqualizedCNN()
    equalizer = GroupEqualizer(dual_lr=DUAL_LR, every_n_steps=EVERY_N_STEPS)
    trainer = _trainer(out_dir, [equalizer], max_epochs=1)
    # 400 samples -> 320 for training, 160 per rank, 5 batches of 32 per rank: dual steps after
    # optimizer steps 2 and 4, step 5's sums are pending when the checkpoint is written
    trainer.fit(model, DigitsDataModule(batch_size=32, n=400, shuffle=False))
    trainer.save_checkpoint(out_dir / "last.ckpt")  # collective: every rank calls it
    record = {
        "multipliers": model.criterion.multipliers.tolist(),
        "num_dual_steps": equalizer.num_dual_steps,
        "batches": model.batches,
        "dual_lr": DUAL_LR,
        "every_n_steps": EVERY_N_STEPS,
        "state_key": equalizer.state_key,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    {"equalized": main, "gap": gap}[sys.argv[2] if len(sys.argv) > 2 else "equalized"](
        Path(sys.argv[1])
    )
    finish_distributed()
