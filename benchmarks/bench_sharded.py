"""Pruning round on FSDP2-sharded weights (2 CPU processes) vs one process, side by side.

One run measures both on the same total weights, interleaved repeat by repeat inside the
same two processes: first rank 0 alone runs a one-process round (magnitude scores,
`global_masks`, `apply_masks` on full, unsharded tensors) while rank 1 waits, then both
ranks run the 2-process round (the same on the local shards with `global_masks` on the DTensors,
gloo). Interleaving puts both measurements under the same machine conditions (a separate
one-process phase before the 2-process phase drifted by up to 40 % between runs). Each
process uses one thread, so the 2-process round uses two cores where the one-process round
uses one: the figure is the wall-clock time of a round, which is what a user waits for.
Every repeat builds fresh weights (the round prunes them), outside the timed region.

Usage: ``python benchmarks/bench_sharded.py [--layers 4] [--width 2048] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from lightning_fairprune.distributed import local_tensor
from lightning_fairprune.pruning import apply_masks, global_masks


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def _round(params: dict, sparsity: float, sharded: bool) -> None:
    with torch.no_grad():
        scores = {n: p.detach() for n, p in params.items()}  # magnitude (abs inside)
        # one selection for both: DTensor scores select across the shards
        masks = global_masks(scores, sparsity)
        apply_masks(params, masks)


def _check_half_pruned(params: dict) -> None:
    zeros = sum(int((local_tensor(p) == 0).sum()) for p in params.values())
    counted = torch.tensor([zeros])
    dist.all_reduce(counted)
    expected = sum(p.numel() for p in params.values()) // 2
    if int(counted) != expected:
        raise RuntimeError(f"Expected {expected} pruned weights, but got {int(counted)}")


def _worker(rank: int, args: argparse.Namespace, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}.pg", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    single, sharded = [], []
    for _ in range(args.repeats):
        # one process on the full weights (rank 1 waits at the barrier)
        if rank == 0:
            params = dict(_model(args.layers, args.width).named_parameters())
            t0 = time.perf_counter()
            _round(params, 0.5, sharded=False)
            single.append(time.perf_counter() - t0)
            del params
        dist.barrier()
        # both processes on their shards of the same weights
        model = _model(args.layers, args.width)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        params = dict(model.named_parameters())
        dist.barrier()
        t0 = time.perf_counter()
        _round(params, 0.5, sharded=True)
        dist.barrier()
        sharded.append(time.perf_counter() - t0)
        _check_half_pruned(params)
    if rank == 0:
        with open(path, "w") as f:
            json.dump({"single": single, "sharded": sharded}, f)
    dist.barrier()  # both ranks done before the group goes (a teardown race aborted rank 0)
    dist.destroy_process_group()
    # the FSDP2 modules still hold the group and its gloo threads, which a normal exit leaves
    # to the interpreter's teardown (it aborted now and then): leave without it
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    total = args.layers * args.width * args.width
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.json")
        torch.multiprocessing.spawn(_worker, args=(args, path), nprocs=2, join=True)
        with open(path) as f:
            times = json.load(f)
    # the first repeat warms up (lazy imports, allocator): the median of the rest
    single = times["single"][1:] or times["single"]
    sharded = times["sharded"][1:] or times["sharded"]
    s, d = statistics.median(single), statistics.median(sharded)
    ratios = sorted(b / a for a, b in zip(single, sharded, strict=True))
    n = len(single)
    print(f"weights: {total:,} ({args.layers} x Linear({args.width}, {args.width})), float32")
    print(f"one process, full weights:      {s * 1000:8.1f} ms (median of {n})")
    print(f"2 processes, FSDP2 shards:      {d * 1000:8.1f} ms (median of {n})")
    print(f"ratio sharded / single:         {d / s:8.2f}")
    print(f"per-repeat ratios:              {ratios[0]:.2f}-{ratios[-1]:.2f}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
