"""Fairness diagnostics under FSDP2 on 2 CPU processes (gloo); see test_sharded_diagnostics.py.

Usage:

* ``python fsdp_diag_script.py OUT_DIR core``: plain-torch cores on a float64 model sharded
  with ``fully_shard``; every rank writes ``rank{N}.json`` with the full weights, its own data
  and the sharded results, so the test recomputes everything on the gathered model.
* ``python fsdp_diag_script.py OUT_DIR fsdp|single``: ``Trainer.fit`` with IterativePruning,
  FairnessMonitor and GroupEqualizer (a GroupEqualizedLoss in the module) under
  ``ModelParallelStrategy`` (2 processes) or on one process with the same global batches.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from _ddp import finish_distributed
from torch import nn

WORLD = 2
GROUPS = 4


def core_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)
    ).double()


def core_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Uneven shares: rank 0 has 3 batches and no sample of group 3; rank 1 has 2 batches."""
    g = torch.Generator().manual_seed(10 + rank)
    sizes = [7, 5, 6] if rank == 0 else [9, 4]
    out = []
    for n in sizes:
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        grp = torch.randint(0, 3 if rank == 0 else GROUPS, (n,), generator=g)
        out.append((x, y, grp))
    return out


def run_core(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_fairprune.diagnostics import group_gradient_norms, measure_groups

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    mesh = init_device_mesh("cpu", (WORLD,))
    model = core_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    full = {n: p.full_tensor().tolist() for n, p in model.named_parameters()}
    batches = core_batches(rank)
    names = ["0.weight", "2.weight", "4.weight", "4.bias"]
    # a sentinel gradient and train mode: both must be restored
    model.train()
    sentinel = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n]
    rng_before = torch.get_rng_state()
    res = group_gradient_norms(model, batches, GROUPS, params=names, chunk_size=4)
    restored = all(p.grad is sentinel[n] for n, p in model.named_parameters())
    restored = restored and model.training and torch.equal(rng_before, torch.get_rng_state())
    res_all = group_gradient_norms(model, batches, GROUPS)  # all params, default chunk
    # a custom FSDP divide factor is read back
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(3.0)
    res_factor = group_gradient_norms(model, batches, GROUPS, params=names, chunk_size=4)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(float(WORLD))
    # forward-only measurement and the gradient norms in one call (equal batch counts)
    even = batches[:2]
    meas = measure_groups(model, even, GROUPS, None, params=names)
    try:
        measure_groups(model, batches, GROUPS, None, params=names)
        uneven_error = None
    except ValueError as err:
        uneven_error = str(err)
    result = {
        "rank": rank,
        "full": full,
        "names": names,
        "batches": [[x.tolist(), y.tolist(), g.tolist()] for x, y, g in batches],
        "norms": res.norms.tolist(),
        "loss_sums": res.loss_sums.tolist(),
        "counts": res.counts.tolist(),
        "norms_all": res_all.norms.tolist(),
        "norms_factor": res_factor.norms.tolist(),
        "restored": bool(restored),
        "measure": {
            "support": meas.support.tolist(),
            "correct": meas.correct.tolist(),
            "loss_sums": meas.loss_sums.tolist(),
            "confusion": meas.confusion.tolist(),
            "grad_norms": meas.grad_norms.tolist(),
            "hessian_trace": meas.hessian_trace,
        },
        "uneven_error": uneven_error,
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finish_distributed()  # not the interpreter's teardown: it aborted now and then (see there)


# ------------------------------------------------------------------ Trainer.fit


def run_fit(out_dir: Path, mode: str) -> None:
    import lightning.pytorch as pl
    from _models import digits_tensors
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_fairprune.callbacks.equalizer import GroupEqualizer
    from lightning_fairprune.callbacks.monitor import FairnessMonitor
    from lightning_fairprune.callbacks.pruning import IterativePruning
    from lightning_fairprune.losses import GroupEqualizedLoss

    class MLP(pl.LightningModule):
        def __init__(self, shard: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.shard = shard
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
            self.criterion = GroupEqualizedLoss(10, constraint="signed")

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
            return self.criterion(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    shard = mode in ("fsdp", "fsdp_unmonitored")
    model = MLP(shard)
    pruning = IterativePruning(0.6, num_rounds=2, start=0, prune_classifier=True)
    # held-out fairness data: 60 digits; under FSDP rank 0 gets 34 and rank 1 gets 26 of them
    x, y = digits_tensors(316)  # the first 204 train (the order is the seeded shuffle's)
    x, y = x[256:], y[256:]
    # gate_memory=0: under FSDP2 the frozen gates are recomputed per chunk (the memory-bounded
    # mode) in this real fit; the single-process run ignores it (double backward)
    monitor = FairnessMonitor(num_probes=2, lambda_max_iterations=2, log=False, gate_memory=0)
    # 12 optimizer steps; rounds at steps 0 and 4 reset the dual counter: one dual step, at 12
    equalizer = GroupEqualizer(dual_lr=0.5, every_n_steps=8, log=False)
    if shard:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        devices, batch = 2, 32
    else:
        strategy, devices, batch = "auto", 1, 64
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        # "fsdp_unmonitored": the same fit without the monitor, whose final weights must be
        # those of the monitored fit bit for bit (measurement never changes training)
        callbacks=[pruning, equalizer]
        if mode == "fsdp_unmonitored"
        else [pruning, monitor, equalizer],
        max_epochs=3,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    train_x, train_y = digits_tensors(204)
    if shard:
        part = slice(0, 34) if trainer.global_rank == 0 else slice(34, 60)
        x, y = x[part], y[part]
        # each global batch of 64 (the last of 12) split in halves: the single run's batches
        rows: list[int] = []
        for start in range(0, 204, 64):
            half = (min(204, start + 64) - start) // 2
            first = start + half * trainer.global_rank
            rows += range(first, first + half)
        train_x, train_y = train_x[rows], train_y[rows]
    monitor.data.dataloader = DataLoader(TensorDataset(x, y), batch_size=64)
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=train)
    keys = ("moment", "support", "recall", "accuracy", "loss", "grad_norm", "hessian_trace")
    keys += ("hessian_lambda_max", "predicted_excess_loss", "sparsity", "global_step")
    records = [{k: r.get(k) for k in keys} for r in monitor.history]
    weights = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        weights[name] = full.detach().reshape(-1).tolist()
    result = {
        "weights": weights,
        "records": records,
        "multipliers": model.criterion.multipliers.double().tolist(),
        "num_dual_steps": equalizer.num_dual_steps,
        "warnings": sum("no double backward" in str(w.message) for w in caught),
    }
    name = f"rank{trainer.global_rank}.json" if shard else "single.json"
    (out_dir / name).write_text(json.dumps(result))


if __name__ == "__main__":
    out, what = sys.argv[1], sys.argv[2]
    if what == "core":
        torch.multiprocessing.spawn(run_core, args=(out,), nprocs=WORLD, join=True)
    else:
        run_fit(Path(out), what)
        finish_distributed()
