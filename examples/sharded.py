"""Prune and monitor an FSDP2-sharded model: Lightning's `ModelParallelStrategy` on 2 CPU processes.

`configure_model` shards every Linear with torch's `fully_shard` (parameters become DTensors,
each process holding half of the rows). `IterativePruning` selects exactly across the shards
without gathering any weight, `FairnessMonitor` measures per-group accuracy and gradient norms
(and Hutchinson traces and λ_max by finite differences) on the shards, and every process
prints its local shard's sparsity next to the global one.

Run (CPU, gloo; about 20 s)::

    python examples/sharded.py            # 2 processes
    python examples/sharded.py --devices 1  # the same on one process, for comparison
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune import FairnessMonitor, IterativePruning


class ShardedMLP(pl.LightningModule):
    """An MLP on 8x8 digits whose Linear layers are sharded with FSDP2 on more than 1 device."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(),
            nn.Linear(64, 10),
        )  # fmt: skip

    def configure_model(self) -> None:
        if self.trainer.world_size == 1:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main(argv: list[str] | None = None) -> dict:
    """Fit with pruning and monitoring; return rank 0's summary (also written as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", default="examples/out/sharded")
    args = parser.parse_args(argv)
    pl.seed_everything(0, workers=True)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    train = DataLoader(TensorDataset(x[:1200], y[:1200]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[1200:], y[1200:]), batch_size=100)

    pruning = IterativePruning(0.7, num_rounds=2, start=3, prune_classifier=True)
    # Hutchinson traces (2 probes) and λ_max (2 power iterations) by finite differences of
    # the sharded gradients: FSDP2 has no double backward
    monitor = FairnessMonitor(num_probes=2, lambda_max_iterations=2, max_batches=2)
    strategy: object = "auto"
    if args.devices > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=6,
        callbacks=[pruning, monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    model = ShardedMLP()
    trainer.fit(model, train, val)

    local = {}
    for name, mask in pruning.masks.items():  # local shards of the masks on this process
        local[name] = 1 - mask.float().mean().item()
    print(
        f"rank {trainer.global_rank}: global sparsity {pruning.current_sparsity:.4f}, "
        + ", ".join(f"{k} local shard {v:.3f}" for k, v in local.items())
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank_file = out / f"rank{trainer.global_rank}_of_{trainer.world_size}.json"
    rank_file.write_text(json.dumps({"sparsity": pruning.current_sparsity, "local": local}))
    final = monitor.history[-1]
    summary = {
        "world_size": trainer.world_size,
        "sparsity": pruning.current_sparsity,
        "accuracy": final["accuracy"],
        "worst_group_accuracy": final["fairness"]["worst_group_accuracy"],
        "grad_norm": final["grad_norm"],
        "hessian_trace": final["hessian_trace"],
        "hessian_lambda_max": final["hessian_lambda_max"],
        "moments": [r["moment"] for r in monitor.history],
    }
    if trainer.is_global_zero:
        (out / f"summary_{trainer.world_size}.json").write_text(json.dumps(summary))
        print(
            f"sparsity {summary['sparsity']:.3f}, accuracy {summary['accuracy']:.3f}, "
            f"worst-class accuracy {summary['worst_group_accuracy']:.3f}"
        )
    return summary


if __name__ == "__main__":
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the process group up after `fit`: take it down on every process.
        # The FSDP2 modules still hold it (and its gloo threads) after that, and a thread
        # running into the interpreter's teardown aborts now and then ("terminate called
        # without an active exception"): leave without the teardown once all is written.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
