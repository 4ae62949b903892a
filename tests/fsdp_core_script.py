"""Plain-torch pruning cores under FSDP2 ``fully_shard``: 2 CPU processes (gloo).

Usage: ``python fsdp_core_script.py OUT_DIR``. Every rank writes ``rank{N}.json`` with its
local scores, masks and shard offsets, so the test can put the shards together and compare
them with the same cores on the full tensors of one process (see tests/test_sharded.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _ddp import finish_distributed
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_fairprune.pruning.select as select_module
from lightning_fairprune.distributed import local_tensor, shard_spec
from lightning_fairprune.pruning import (
    MaskEnforcer,
    gather_full_masks,
    global_masks,
    layerwise_masks,
    masks_to_state,
    realized_sparsity,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.pruning.criteria import random_scores
from lightning_fairprune.pruning.mask_io import distribute_like

WORLD = 2


def build_model(seed: int = 0) -> nn.Module:
    """The test model; weights rounded to multiples of 1/8 so that many scores tie."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 33), nn.ReLU(), nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 5)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 8) / 8)
    return model


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


class MaxAlloc(TorchDispatchMode):
    """Records the largest tensor (in elements) any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _local(masks: dict) -> dict:
    return {k: local_tensor(v).reshape(-1).int().tolist() for k, v in masks.items()}


def run(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = build_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    names = ["0.weight", "2.weight", "4.weight", "0.bias"]
    named = dict(model.named_parameters())
    params = {n: named[n] for n in names}
    result: dict = {"rank": rank, "specs": {n: list(shard_spec(p)) for n, p in params.items()}}

    # (a)-(c) magnitude: global, global on top of current masks, layerwise
    scores = {n: p.detach().abs() for n, p in params.items()}
    m_a = global_masks(scores, 0.5)
    m_b = global_masks(scores, 0.7, current_masks=m_a)
    m_c = layerwise_masks(scores, 0.6, current_masks=m_a)
    result["magnitude"] = {"a": _local(m_a), "b": _local(m_b), "c": _local(m_c)}
    # the same with the ties counted in a pass of their own (the path for very many ties)
    saved_limit = select_module._MAX_STORED_TIES
    select_module._MAX_STORED_TIES = 0
    try:
        c_a = global_masks(scores, 0.5)
        c_b = global_masks(scores, 0.7, current_masks=c_a)
        c_c = layerwise_masks(scores, 0.6, current_masks=c_a)
    finally:
        select_module._MAX_STORED_TIES = saved_limit
    result["magnitude_counted"] = {"a": _local(c_a), "b": _local(c_b), "c": _local(c_c)}
    result["sparsity_b"] = realized_sparsity(m_b, params)

    # (d) gradient scores from the sharded gradients of an FSDP backward
    x, y = data()
    xs, ys = x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]
    nn.functional.cross_entropy(model(xs), ys).backward()
    gscores = {n: (p.detach() * p.grad).abs() for n, p in params.items()}
    m_d = global_masks(gscores, 0.4)
    result["gradient"] = {
        "scores": {n: local_tensor(s).reshape(-1).tolist() for n, s in gscores.items()},
        "masks": _local(m_d),
    }

    # (d') random criterion: full-shape seeded scores on every process, laid out like the
    # DTensor parameters (each process selects on its part of them)
    rscores = distribute_like(random_scores(params, seed=5), params)
    result["random"] = _local(global_masks(rscores, 0.5))

    # (e) memory: the largest tensor the selection creates, on a layer bigger than the bins
    big = nn.Linear(600, 512)
    fully_shard(big, mesh=mesh)
    big_scores = {"weight": big.weight.detach().abs()}
    big_masks = global_masks(big_scores, 0.3)  # warm-up (lazy imports, caches)
    with MaxAlloc() as rec:
        big_masks = global_masks(big_scores, 0.5, current_masks=big_masks)
    result["memory"] = {
        "max_numel": rec.max_numel,
        "local_numel": local_tensor(big.weight).numel(),
        "full_numel": big.weight.numel(),
        "sparsity": realized_sparsity(big_masks, {"weight": big.weight}),
    }

    # (f) enforcement on the local shards after optimizer steps (SGD, momentum, decay)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    model.zero_grad()
    nn.functional.cross_entropy(model(xs), ys).backward()
    opt.step()  # momentum buffers exist now
    with torch.no_grad():
        for n, p in params.items():
            local_tensor(p).masked_fill_(~m_b[n], 0)
    touched = zero_pruned_optimizer_state(opt, params, m_b)
    momentum_nonzero = sum(
        int((local_tensor(opt.state[p]["momentum_buffer"])[~m_b[n]] != 0).sum())
        for n, p in params.items()
    )
    enforcer = MaskEnforcer(opt, params, m_b)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
    enforcer.remove()
    result["enforce"] = {
        "touched": touched,
        "pruned_nonzero": sum(
            int((local_tensor(p)[~m_b[n]] != 0).sum()) for n, p in params.items()
        ),
        "kept_nonzero": sum(int((local_tensor(p)[m_b[n]] != 0).sum()) for n, p in params.items()),
        "momentum_pruned_nonzero": momentum_nonzero,
    }

    # (g) checkpoints: the full masks, and their one checkpoint form (packed, 1 bit per weight)
    full = gather_full_masks(m_b, params)
    state = masks_to_state(full)
    result["packed_bytes"] = {n: int(v["bits"].numel()) for n, v in state.items()}
    if rank == 0:
        torch.save({n: m.clone() for n, m in full.items()}, os.path.join(out_dir, "full.pt"))
        torch.save(state, os.path.join(out_dir, "state.pt"))
    result["full_hash"] = {n: m.reshape(-1).int().tolist() for n, m in full.items()}

    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finish_distributed()  # not the interpreter's teardown: it aborted now and then (see there)


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(sys.argv[1],), nprocs=WORLD, join=True)
