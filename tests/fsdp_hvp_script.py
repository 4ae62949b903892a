"""Finite-difference curvature under FSDP2 on 2 CPU processes (gloo); see test_sharded_curvature.

Usage:

* ``python fsdp_hvp_script.py OUT_DIR core``: the sharded Hutchinson trace, directional terms,
  predicted excess loss and λ_max on the float64 model of ``fsdp_diag_script.py`` sharded with
  ``fully_shard``, and the same (frozen gates) on a float32 CNN with ReLU and max pooling;
  every rank writes ``rank{N}.json`` with the full weights, its own data, the full step δ and
  the sharded results, so the test recomputes everything on the gathered model with the
  unsharded cores.
* ``python fsdp_hvp_script.py OUT_DIR fsdp|single``: ``Trainer.fit`` of a float64 tanh MLP
  with IterativePruning and FairnessMonitor under ``ModelParallelStrategy`` (2 processes) or
  on one process with the same global batches.
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
PROBES = 3
SEED = 5
LAMBDA_ITERATIONS = 3


def conv_model() -> nn.Module:
    """float32 CNN with ReLU (also in place) and max pooling: kinks everywhere."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 3),
    )


def conv_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(20 + rank)
    out = []
    for n in [8, 6] if rank == 0 else [5, 9, 3]:
        x = torch.randn(n, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        out.append((x, y, torch.randint(0, 3, (n,), generator=g)))
    return out


def full_delta(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A pruning-like step on the full (gathered) weights: seeded, identical on every rank."""
    g = torch.Generator().manual_seed(3)
    named = dict(model.named_parameters())
    out = {}
    for n in names:
        full = named[n].full_tensor() if hasattr(named[n], "full_tensor") else named[n]
        keep = torch.rand(full.shape, generator=g, dtype=torch.float64) < 0.7
        out[n] = torch.where(keep, torch.zeros_like(full), -full).detach()
    return out


def run_core(rank: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=WORLD)
    from fsdp_diag_script import GROUPS, core_batches, core_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_fairprune.diagnostics import (
        FiniteDifference,
        group_directional,
        group_hessian_lambda_max,
        group_hessian_trace,
        local_rademacher_probes,
        predicted_excess_loss,
    )
    from lightning_fairprune.distributed import local_tensor, shard_spec

    per_chunk = FiniteDifference(gate_memory=0)  # frozen gates recomputed per chunk

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
    named = [(n, p) for n, p in model.named_parameters() if n in names]
    model.train()
    sentinel = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n]
    before = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()}
    trace = group_hessian_trace(
        model, batches, GROUPS, num_probes=PROBES, seed=SEED, params=names, chunk_size=4
    )
    trace_all = group_hessian_trace(model, batches, GROUPS, num_probes=2)
    delta_full = full_delta(model, names)

    def local_part(n: str, t: torch.Tensor) -> torch.Tensor:
        p = dict(model.named_parameters())[n]
        spec = shard_spec(p)
        shape = local_tensor(p).shape
        return t.flatten()[spec.offset : spec.offset + spec.local_numel].view(shape)

    delta = {n: local_part(n, t) for n, t in delta_full.items()}
    predicted = predicted_excess_loss(model, batches, delta, GROUPS, chunk_size=4)
    # the same step given as two directions at once, with an explicit relative step
    half = {n: 0.5 * t for n, t in delta.items()}
    directional = group_directional(
        model, batches, GROUPS, [delta, half], params=names,
        finite_difference=FiniteDifference(eps=1e-5),
    )  # fmt: skip
    lambda_max = group_hessian_lambda_max(
        model, batches, GROUPS, iterations=LAMBDA_ITERATIONS, seed=SEED, params=names
    )
    restored = all(
        torch.equal(local_tensor(p), before[n]) and p.grad is sentinel[n]
        for n, p in model.named_parameters()
    )
    restored = restored and model.training
    # float32 CNN (ReLU, in-place ReLU, max pooling) with the default frozen gates; the last
    # layer belongs to the root module (FSDP2 keeps the root's parameters unsharded after a
    # forward: the per-chunk gates' no-grad forward must not leave them stale)
    conv = conv_model()
    for layer in (conv[0], conv[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(conv, mesh=mesh)
    conv_full = {n: p.full_tensor().tolist() for n, p in conv.named_parameters()}
    cb = conv_batches(rank)
    conv_before = {n: local_tensor(p).detach().clone() for n, p in conv.named_parameters()}
    with torch.no_grad():  # leaves the root's parameters unsharded (FSDP2 keeps them)
        out_before = conv(cb[0][0])
    conv_trace = group_hessian_trace(conv, cb, 3, num_probes=PROBES, seed=SEED)
    conv_names = [n for n, _ in conv.named_parameters()]
    conv_delta_full = full_delta(conv, ["0.weight", "4.weight"])
    conv_params = dict(conv.named_parameters())

    def conv_local(n: str, t: torch.Tensor) -> torch.Tensor:
        spec = shard_spec(conv_params[n])
        shape = local_tensor(conv_params[n]).shape
        return t.flatten()[spec.offset : spec.offset + spec.local_numel].view(shape)

    conv_delta = {n: conv_local(n, t) for n, t in conv_delta_full.items()}
    conv_pred = predicted_excess_loss(conv, cb, conv_delta, 3, chunk_size=3)
    conv_lam = group_hessian_lambda_max(conv, cb, 3, iterations=LAMBDA_ITERATIONS, seed=SEED)
    conv_dir = group_directional(conv, cb, 3, conv_delta, chunk_size=3)
    # the same with the gates recomputed per chunk (gate_memory=0): equal bit for bit
    chunked_trace = group_hessian_trace(
        conv, cb, 3, num_probes=PROBES, seed=SEED, finite_difference=per_chunk
    )
    chunked_pred = predicted_excess_loss(
        conv, cb, conv_delta, 3, chunk_size=3, finite_difference=per_chunk
    )
    chunked_lam = group_hessian_lambda_max(
        conv, cb, 3, iterations=LAMBDA_ITERATIONS, seed=SEED, finite_difference=per_chunk
    )
    chunked_dir = group_directional(
        conv, cb, 3, conv_delta, chunk_size=3, finite_difference=per_chunk
    )
    restored = restored and all(
        torch.equal(local_tensor(p), conv_before[n]) for n, p in conv.named_parameters()
    )
    with torch.no_grad():  # no stale unsharded parameters left behind
        restored = restored and torch.equal(conv(cb[0][0]), out_before)
    probe_parts = [[t.flatten().tolist() for t in local_rademacher_probes(named, 1, SEED)]]
    offsets = [shard_spec(p).offset for _, p in named]
    result = {
        "rank": rank,
        "full": full,
        "names": names,
        "batches": [[x.tolist(), y.tolist(), g.tolist()] for x, y, g in batches],
        "delta": {n: t.tolist() for n, t in delta_full.items()},
        "trace": trace.trace.tolist(),
        "stderr": trace.stderr.tolist(),
        "probe_values": trace.probe_values.tolist(),
        "lambda_max": trace.lambda_max,
        "counts": trace.counts.tolist(),
        "trace_all": trace_all.probe_values.tolist(),
        "predicted": predicted.tolist(),
        "linear": directional.linear.tolist(),
        "quadratic": directional.quadratic.tolist(),
        "restored": bool(restored),
        "probe_parts": probe_parts,
        "offsets": offsets,
        "lambda_max_power": lambda_max.tolist(),
        "conv": {
            "full": conv_full,
            "names": conv_names,
            "batches": [[x.tolist(), y.tolist(), g.tolist()] for x, y, g in cb],
            "delta": {n: t.tolist() for n, t in conv_delta_full.items()},
            "probe_values": conv_trace.probe_values.tolist(),
            "predicted": conv_pred.tolist(),
            "lambda_max": conv_lam.tolist(),
            "modes": [conv_dir.gate_mode, chunked_dir.gate_mode],
            "per_chunk_equal": {
                "probe_values": torch.equal(chunked_trace.probe_values, conv_trace.probe_values),
                "predicted": torch.equal(chunked_pred, conv_pred),
                "lambda_max": torch.equal(chunked_lam, conv_lam),
                "linear": torch.equal(chunked_dir.linear, conv_dir.linear),
                "quadratic": torch.equal(chunked_dir.quadratic, conv_dir.quadratic),
            },
        },
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finish_distributed()  # not the interpreter's teardown: it aborted now and then (see there)


# ------------------------------------------------------------------ Trainer.fit


def run_fit(out_dir: Path, mode: str) -> None:
    import lightning.pytorch as pl
    from _models import digits_tensors
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_fairprune.callbacks.monitor import FairnessMonitor
    from lightning_fairprune.callbacks.pruning import IterativePruning

    class MLP(pl.LightningModule):
        def __init__(self, shard: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.shard = shard
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)
            ).double()

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
            return torch.optim.SGD(self.parameters(), lr=0.2)

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    shard = mode == "fsdp"
    model = MLP(shard)
    pruning = IterativePruning(0.5, num_rounds=2, start=0, prune_classifier=True)
    x, y = digits_tensors(316)
    x, y = x[256:].double(), y[256:]
    monitor = FairnessMonitor(num_probes=PROBES, lambda_max_iterations=2, log=False)
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
        callbacks=[pruning, monitor],
        max_epochs=2,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    train_x, train_y = digits_tensors(128)
    train_x = train_x.double()
    if shard:
        part = slice(0, 34) if trainer.global_rank == 0 else slice(34, 60)
        x, y = x[part], y[part]
        rows: list[int] = []
        for start in range(0, 128, 64):
            half = (min(128, start + 64) - start) // 2
            first = start + half * trainer.global_rank
            rows += range(first, first + half)
        train_x, train_y = train_x[rows], train_y[rows]
    monitor.data.dataloader = DataLoader(TensorDataset(x, y), batch_size=64)
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=train)
    keys = ("moment", "support", "grad_norm", "hessian_trace", "hessian_trace_se")
    keys += ("hessian_lambda_max", "predicted_excess_loss", "sparsity")
    records = [{k: r.get(k) for k in keys} for r in monitor.history]
    messages = [str(w.message) for w in caught if "λ_max" in str(w.message)]
    result = {"records": records, "warnings": messages}
    name = f"rank{trainer.global_rank}.json" if shard else "single.json"
    (out_dir / name).write_text(json.dumps(result))


if __name__ == "__main__":
    out, what = sys.argv[1], sys.argv[2]
    if what == "core":
        torch.multiprocessing.spawn(run_core, args=(out,), nprocs=WORLD, join=True)
    else:
        run_fit(Path(out), what)
        finish_distributed()
