"""`FairnessData.scan` on 2 CPU processes (gloo), plain torch.distributed.

Usage: ``python ddp_scan_script.py OUT_DIR``. Every rank writes ``rank{N}.json``:

* ``strided_*``: a loader derived from a datamodule's ``val_dataloader()`` (each process scans
  every other batch); the counts are all-reduced;
* ``bad_error``: the same with a bad group id in batch 3, which only rank 1 scans: both
  processes must raise (rank 0 learns of it through the all-reduce), neither may hang.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune.fairness_data import FairnessData

WORLD = 2


def _batches(num_batches: int = 6, n: int = 6, num_groups: int = 4, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        x = torch.randn(n, 3, generator=gen)
        y = torch.randint(0, 2, (n,), generator=gen)
        g = torch.randint(0, num_groups, (n,), generator=gen)
        out.append((x, y, g))
    return out


class _Strategy:
    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out


class _DataModule:
    def __init__(self, batches: list) -> None:
        self.batches = batches

    def val_dataloader(self) -> DataLoader:
        x, y, g = (torch.cat(t) for t in zip(*self.batches, strict=True))
        return DataLoader(TensorDataset(x, y, g), batch_size=len(self.batches[0][1]))


class _Trainer:
    """What `FairnessData` reads of a Trainer under DDP (duck-typed)."""

    def __init__(self, rank: int, batches: list) -> None:
        self.world_size, self.global_rank = WORLD, rank
        self.strategy = _Strategy()
        self.val_dataloaders = None
        self.datamodule = _DataModule(batches)


def run(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result: dict = {}
    scan = FairnessData(num_groups=4).scan(_Trainer(rank, _batches()))
    result["strided_counts"], result["strided_batches"] = scan.counts, scan.num_batches
    bad = _batches()
    bad[3][2][0] = 9
    try:
        FairnessData(num_groups=4).scan(_Trainer(rank, bad))
        result["bad_error"] = None
    except ValueError as err:
        result["bad_error"] = str(err)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(sys.argv[1],), nprocs=WORLD, join=True)
