"""Run IterativePruning under 2-process CPU DDP; every rank writes rank{N}.json (see _ddp.py).

Three pruning callbacks on disjoint parameters in one fit:

* ``random`` on the conv layers (seeded scores),
* ``gradient`` on ``fc.weight`` (each rank sees different batches; gradients all-reduced),
* ``rank_dependent`` on the classifier: a user criterion whose scores differ per process on
  purpose, so only the broadcast from rank 0 can make the masks agree.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import finish_distributed
from _models import DigitsDataModule, SmallCNN

from lightning_fairprune.callbacks.pruning import IterativePruning


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


LOCAL: dict[str, str] = {}


def rank_dependent(params, grads):
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    g = torch.Generator().manual_seed(1000 + rank)
    scores = {k: torch.rand(p.shape, generator=g) for k, p in params.items()}
    LOCAL["scores"] = _hash(torch.cat([s.flatten() for s in scores.values()]))
    return scores


def main(out_dir: Path) -> None:
    pl.seed_everything(0, workers=True)
    model = SmallCNN()
    callbacks = {
        "random": IterativePruning(
            0.5, criterion="random", include_names=["features.0.*"], start=1, seed=7
        ),
        "worst_group": IterativePruning(
            0.4, criterion="worst_group", include_names=["features.2.*"], start=1
        ),
        "gradient": IterativePruning(
            0.6, criterion="gradient", include_names=["fc.*"], start=1, gradient_batches=2
        ),
        "rank_dependent": IterativePruning(
            0.3,
            criterion=rank_dependent,
            prune_classifier=True,
            include_names=["classifier.weight"],
            start=1,
        ),
    }
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=list(callbacks.values()),
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, n=240))
    result: dict = {"rank": trainer.global_rank, "local_scores": LOCAL.get("scores")}
    pruned_nonzero = 0
    named = dict(model.named_parameters())
    for key, cb in callbacks.items():
        result[key] = {
            "hashes": {k: _hash(m) for k, m in cb.masks.items()},
            "sparsity": cb.current_sparsity,
            "rounds": cb.rounds_done,
        }
        for k, m in cb.masks.items():
            pruned_nonzero += int((named[k][~m] != 0).sum())
    result["pruned_nonzero"] = pruned_nonzero
    result["weights_hash"] = _hash(torch.cat([p.flatten() for p in model.parameters()]))
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    finish_distributed()
