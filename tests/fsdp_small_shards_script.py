"""Pruning on FSDP2 shards that are empty, uneven or the whole tensor: 2 CPU processes (gloo).

Usage: ``python fsdp_small_shards_script.py OUT_DIR``. The model has a 4-row layer (2 + 2
rows), a 3-row layer (2 + 1) and a one-row classifier: process 0 holds its whole weight and
bias, process 1 an empty shard of each. Every collective of the sharded paths must be joined
by both processes (a process that skips one leaves the other waiting: the process group's
timeout turns such a hang into an error). Every rank writes ``rank{N}.json`` with the full
masks it gathered, so the test compares them with the unsharded callback and cores
(tests/test_sharded.py).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _ddp import finish_distributed
from torch import nn

from lightning_fairprune import IterativePruning
from lightning_fairprune.diagnostics import group_gradient_norms
from lightning_fairprune.distributed import local_tensor
from lightning_fairprune.pruning import (
    gather_full_masks,
    layerwise_masks,
    mask_counts,
    masks_from_state,
    masks_to_state,
    shard_full_masks,
)
from lightning_fairprune.pruning.mask_io import gather_full_tensors

WORLD = 2
TIMEOUT_S = 60  # a skipped collective fails within this time instead of hanging


def build_model() -> nn.Module:
    """Layers of 4, 3 and 1 rows (shards 2+2, 2+1, 1+0 on two processes)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """16 samples (8 per process): inputs, regression targets, 2 groups."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen), torch.randn(16, generator=gen), torch.arange(16) % 2


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(1) - y) ** 2


def make_pruning() -> IterativePruning:
    return IterativePruning(0.5, prune_classifier=True, prune_bias=True)


def _full(masks: dict) -> dict:
    return {k: v.reshape(-1).int().tolist() for k, v in masks.items()}


def _local(masks: dict) -> dict:
    return {k: local_tensor(v).reshape(-1).int().tolist() for k, v in masks.items()}


def _unpacked(state: dict) -> dict:
    return _full(masks_from_state(state["masks"]))


def run(rank: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/pg",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    out = Path(out_dir)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = build_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    result: dict = {
        "local_rows": {n: local_tensor(p).shape[0] for n, p in model.named_parameters()}
    }

    # the callback: a round, its checkpoint state, the exported file
    pruning = make_pruning()
    pruning.prune_now(None, model)
    result["sparsity"] = pruning.current_sparsity
    result["state_masks"] = _unpacked(pruning.state_dict())
    pruning.export_masks(out / "masks.pt")
    dist.barrier()  # the file is written (by rank 0) before anyone reads it

    # importing the file, and loading the state, give every process its own shards back
    imported = make_pruning()
    imported.import_masks(out / "masks.pt", model)
    loaded = make_pruning()
    loaded.prune_now(None, model, sparsity=0.1)  # has seen the model (prunes only zeros)
    loaded.load_state_dict(pruning.state_dict())
    result["own_local"] = _local(pruning.masks)
    result["imported_local"] = _local(imported.masks)
    result["loaded_local"] = _local(loaded.masks)
    result["imported_sparsity"] = imported.current_sparsity
    # a file of process 0's shards (e.g. `save_masks(pruning.masks)` on rank 0): refused by
    # every process alike, not taken as local masks by process 0 alone
    full = torch.load(out / "masks.pt", weights_only=True)
    torch.save({k: v[: -(-v.shape[0] // WORLD)] for k, v in full.items()}, out / f"bad{rank}.pt")
    try:
        make_pruning().import_masks(out / f"bad{rank}.pt", model)
        result["bad_import"] = None
    except ValueError as err:
        result["bad_import"] = str(err)

    # a masked selection: a further round on top of the current masks, then exported again
    pruning.prune_now(None, model, sparsity=0.75)
    result["sparsity_75"] = pruning.current_sparsity
    pruning.export_masks(out / "masks_75.pt")

    # the cores: a layerwise selection on current masks, counts, the checkpoint form
    params = dict(model.named_parameters())
    scores = {n: p.detach().abs() for n, p in params.items()}
    first = layerwise_masks(scores, 0.5)
    second = layerwise_masks(scores, 0.6, current_masks=first)
    result["layerwise"] = _full(gather_full_masks(second, params))
    result["counts"] = {k: list(v) for k, v in mask_counts(second, params).items()}
    state = masks_to_state(gather_full_masks(second, params))
    restored = shard_full_masks(masks_from_state(state), params)
    result["state_equal"] = all(torch.equal(restored[n], second[n]) for n in params)
    # full weights from local shards (the rewind weights' checkpoint form)
    weights = gather_full_tensors({n: local_tensor(p) for n, p in params.items()}, params)
    result["weights"] = {n: w.reshape(-1).tolist() for n, w in weights.items()}

    # per-group gradient norms (sharded backward passes, all-reduced local norms)
    x, y, g = data()
    mine = slice(rank * 8, (rank + 1) * 8)
    norms = group_gradient_norms(model, [(x[mine], y[mine], g[mine])], 2, loss_fn=squared_error)
    result["grad_norms"] = norms.norms.tolist()

    (out / f"rank{rank}.json").write_text(json.dumps(result))
    finish_distributed()


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(sys.argv[1],), nprocs=WORLD, join=True)
