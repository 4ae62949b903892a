"""IterativePruning under Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes.

Usage: ``python fsdp_callback_script.py OUT_DIR MODE`` with MODE ``fsdp`` (2 processes,
``configure_model`` shards every Linear with ``fully_shard``) or ``single`` (one process, no
sharding, the same global batch). Every rank writes ``rank{N}.json`` (see tests/_ddp.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import finish_distributed
from _models import DigitsDataModule
from torch import nn

from lightning_fairprune.callbacks.pruning import IterativePruning


class MLP(pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shard = shard
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
            nn.Linear(32, 10),
        )  # fmt: skip

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Recorder(pl.Callback):
    """Records the full weights before and the full masks after every round (test only)."""

    def __init__(self, pruning: IterativePruning) -> None:
        self.pruning = pruning
        self.rounds: list[dict] = []

    def on_before_pruning_round(self, trainer, pl_module, event) -> None:
        weights = {}
        for name, p in pl_module.named_parameters():
            if name in event.parameter_names:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                weights[name] = full.detach().reshape(-1).tolist()
        self.rounds.append({"weights": weights, "target": event.target_sparsity})

    def on_pruning_round(self, trainer, pl_module, event) -> None:
        # the survivors were rewound to the initial weights: record them (a collective)
        after = {}
        for name, p in pl_module.named_parameters():
            if name in event.parameter_names:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                after[name] = full.detach().reshape(-1).tolist()
        self.rounds[-1]["after"] = after
        full = self.pruning.mask_state.full()  # a collective when sharded: every rank is here
        self.rounds[-1]["masks"] = {k: v.reshape(-1).int().tolist() for k, v in full.items()}
        self.rounds[-1]["sparsity"] = event.realized_sparsity
        self.rounds[-1]["layers"] = event.layer_sparsity


def _trainer(out_dir: Path, devices: int, strategy: object, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        callbacks=callbacks,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )


def main(out_dir: Path, mode: str) -> None:
    pl.seed_everything(0, workers=True)
    shard = mode == "fsdp"
    model = MLP(shard)
    pruning = IterativePruning(0.8, num_rounds=2, start=0, prune_classifier=True, rewind="init")
    recorder = Recorder(pruning)
    if shard:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        devices, batch = 2, 32
    else:
        strategy, devices, batch = "auto", 1, 64
    trainer = _trainer(out_dir, devices, strategy, [pruning, recorder])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=batch, n=256, shuffle=False))
    pruning.export_masks(out_dir / f"export_{mode}.pt")  # every rank calls it
    state = pruning.state_dict()
    pruned_nonzero = 0
    for name, p in model.named_parameters():
        if name in pruning.masks:
            local = p.to_local() if hasattr(p, "to_local") else p
            pruned_nonzero += int((local[~pruning.masks[name]] != 0).sum())
    # restore the checkpointed state into a fresh callback on this (sharded) model
    restored = IterativePruning(0.8, num_rounds=2, start=0, prune_classifier=True, rewind="init")
    restored.pruned_parameters(model)  # binds this model's (sharded) parameters
    restored.load_state_dict(state)
    same = all(torch.equal(restored.masks[k], pruning.masks[k]) for k in pruning.masks)
    mine, theirs = pruning.mask_state.rewind_weights, restored.mask_state.rewind_weights
    assert mine is not None
    assert theirs is not None
    rewind_same = all(torch.equal(theirs[k], mine[k]) for k in mine)
    result = {
        "rank": trainer.global_rank,
        "rounds": recorder.rounds,
        "sparsity": pruning.current_sparsity,
        "pruned_nonzero": pruned_nonzero,
        "state_keys": sorted(k for k in state if "masks" in k),
        "packed_bytes": sum(int(v["bits"].numel()) for v in state["masks"].values()),
        "restored_equal": same,
        "restored_rewind_equal": rewind_same,
        "rewind_state": {k: v.reshape(-1).tolist() for k, v in state["rewind_weights"].items()},
        "rewind_local_shapes": {k: list(v.shape) for k, v in mine.items()},
        "restored_sparsity": restored.current_sparsity,
    }
    if shard:  # a fairness-aware criterion is refused at fit start, before any step
        refused = IterativePruning(0.5, num_rounds=1, start=1, criterion="fairprune")
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        late = _trainer(out_dir / "refused", 2, strategy, [refused])
        try:
            late.fit(MLP(True), datamodule=DigitsDataModule(batch_size=32, n=64, shuffle=False))
            result["refused"] = None
        except ValueError as err:
            result["refused"] = {"message": str(err), "global_step": late.global_step}
    name = f"rank{trainer.global_rank}.json" if shard else "single.json"
    (out_dir / name).write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    finish_distributed()
