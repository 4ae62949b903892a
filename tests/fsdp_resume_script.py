"""Checkpoint and resume of IterativePruning under ModelParallelStrategy (FSDP2), 2 CPU processes.

Usage: ``python fsdp_resume_script.py OUT_DIR``. For each checkpoint form (``dcp``: Lightning's
distributed checkpoint directory; ``full``: one file with full state dicts) it fits 4 epochs
with 2 geometric rounds (epochs 0 and 2) and rewinding, saving a checkpoint every epoch (run
A), then fits a fresh model from the epoch-0 checkpoint to the same end (run B). Every rank writes
``rank{N}.json`` (see tests/_ddp.py) with, per form and run, the full masks, the full rewind
weights, the full final weights, the rounds and the history epochs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import finish_distributed
from _models import DigitsDataModule
from fsdp_callback_script import MLP
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_fairprune.callbacks.pruning import IterativePruning


def _pruning() -> IterativePruning:
    # rounds at epochs 0 and 2: resumed after epoch 0, epoch 1 trains on the restored masks
    # (without them the pruned weights would regrow before the second round)
    return IterativePruning(
        0.75,
        schedule="geometric",
        num_rounds=2,
        start=0,
        frequency=2,
        prune_classifier=True,
        rewind="init",
    )


def _full(t: torch.Tensor) -> list:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().reshape(-1).tolist()


def _fit(out: Path, form: str, ckpt_path: str | None) -> tuple[pl.Trainer, IterativePruning, MLP]:
    pl.seed_everything(0, workers=True)
    model = MLP(shard=True)
    pruning = _pruning()
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=form == "dcp"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[pruning, ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1)],
        max_epochs=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    data = DigitsDataModule(batch_size=32, n=256, shuffle=False)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, pruning, model


def _summary(pruning: IterativePruning, model: MLP) -> dict:
    state = pruning.state_dict()  # full masks (packed) and rewind weights, on every rank
    return {
        "masks": {k: v.reshape(-1).int().tolist() for k, v in pruning.mask_state.full().items()},
        "rewind": {k: v.reshape(-1).tolist() for k, v in state["rewind_weights"].items()},
        "weights": {n: _full(p) for n, p in model.named_parameters()},
        "rounds_done": pruning.rounds_done,
        "epochs": [h["epoch"] for h in pruning.history],
        "sparsity": pruning.current_sparsity,
    }


def main(out_dir: Path) -> None:
    result: dict = {}
    rank = 0
    for form in ("dcp", "full"):
        out = out_dir / form
        trainer, pruning, model = _fit(out, form, None)
        rank = trainer.global_rank
        first = _summary(pruning, model)
        ckpt = sorted((out / "ckpt").glob("epoch=0-*"))
        if len(ckpt) != 1:
            raise RuntimeError(f"Expected one epoch-0 checkpoint, but got {ckpt}")
        saved_kind = "dir" if ckpt[0].is_dir() else "file"
        _, pruning_b, model_b = _fit(out / "resumed", form, str(ckpt[0]))
        result[form] = {
            "kind": saved_kind,
            "a": first,
            "b": _summary(pruning_b, model_b),
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    finish_distributed()
