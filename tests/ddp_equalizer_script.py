"""DDP (2 CPU processes, gloo) run of GroupEqualizer; every rank writes ``rank{N}.json``.

Usage: ``python ddp_equalizer_script.py OUT_DIR`` (see ``tests/_ddp.py``). Each rank records the
per-group loss sums and counts of its own batches so that the test can replay the dual steps on
the union of both ranks' data.
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

from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.losses import GroupEqualizedLoss

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


def main(out_dir: Path) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    model = DDPEqualizedCNN()
    equalizer = GroupEqualizer(dual_lr=DUAL_LR, every_n_steps=EVERY_N_STEPS)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[equalizer],
        default_root_dir=str(out_dir),
    )
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
    main(Path(sys.argv[1]))
    finish_distributed()
