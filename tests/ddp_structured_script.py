"""Channel pruning under 2-process CPU DDP; every rank writes rank{N}.json (see _ddp.py).

The gradient criterion scores channels from each rank's own batches (all-reduced gradients);
the masks of all coupled parameters are broadcast from rank 0, so both ranks must hold the
same masks, and the pruned entries must stay zero under DDP's gradient averaging.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import finish_distributed
from _models import DigitsDataModule
from _resnet import TinyResNet

from lightning_fairprune import IterativePruning


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    model = TinyResNet(optimizer="sgd")
    pruning = IterativePruning(
        0.5, structure="channel", criterion="gradient", num_rounds=2, start=1,
        example_input=torch.zeros(1, 1, 8, 8),
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[pruning],
        max_epochs=3,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(out_dir),
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, n=240))
    named = dict(model.named_parameters())
    result = {
        "rank": trainer.global_rank,
        "masks": {k: _hash(m) for k, m in pruning.masks.items()},
        "sparsity": pruning.current_sparsity,
        "rounds": pruning.rounds_done,
        "pruned_nonzero": sum(int((named[k][~m] != 0).sum()) for k, m in pruning.masks.items()),
        "weights": _hash(torch.cat([p.detach().flatten() for p in model.parameters()])),
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    finish_distributed()
