"""IterativePruning vs Lightning's ModelPruning: step overhead, memory, accuracy, global round.

All runs use the same ~1.2M-parameter CNN (3 conv layers + a 3136->370 Linear + classifier)
on scikit-learn's digits upsampled to 28x28 (1,437 train / 360 validation images), SGD with
momentum 0.9 and weight decay 5e-4, batch 64, one thread (``--threads``), in one process.

Figures (each printed as a ratio in one table at the end):

1. **Training-step overhead**: wall time from ``on_train_batch_start`` to
   ``on_train_batch_end`` (forward, backward, optimizer step and every hook), median over
   the steps after pruning became active (epochs 1..E-1), for three configurations run
   interleaved (rotating order) in every repeat: no pruning, ``IterativePruning`` and
   ``ModelPruning`` (both global magnitude, 90 % of the Conv/Linear weights except the
   classifier, pruned once between epoch 0 and 1). Ratio = pruned / unpruned within the same
   repeat, median over repeats. Target for ours: <= 1.02.
2. **Memory held by pruning state / bytes of the pruned weights**: every tensor reachable
   from the model (parameters, buffers, tensor attributes such as the ``weight`` that
   ``torch.nn.utils.prune`` recomputes) and from the callback (our bool masks and rewind
   copy; ModelPruning's deep copies of the original layers), de-duplicated by storage,
   minus the dense model's parameter bytes; divided by 4 bytes x the number of pruned
   weights. Measured at the end of epoch 1. Target for ours: <= 0.3.
3. **Global round** on >= 20M weights (and a second round on top): ours /
   ``torch.nn.utils.prune.global_unstructured``, from ``bench_pruning_round.bench_global_round``
   (fresh processes). Targets: time <= 0.2, peak extra memory <= 0.35.
4. **Final accuracy at equal final sparsity** (90 %): validation accuracy after E epochs,
   ours vs ModelPruning, for fine-tuning (no rewinding) and for lottery-ticket rewinding to
   the initialization, over several seeds (mean +- std).

Run: ``python benchmarks/bench_pruning.py [--repeats 5] [--epochs 3] [--seeds 3]
[--acc-epochs 6] [--round-weights 20000000] [--skip-round] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_fairprune.callbacks.pruning import IterativePruning
from lightning_fairprune.pruning.enforce import MaskEnforcer

SPARSITY = 0.9
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*The number of training batches.*")


# ----------------------------------------------------------------------------- data and model
def digits28(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(y))
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


class BenchCNN(pl.LightningModule):
    """Conv(1->16) pool Conv(16->32) pool Conv(32->64) Linear(3136->370) Linear(370->10)."""

    def __init__(self, lr: float = 0.02) -> None:
        super().__init__()
        self.lr = lr
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, 370)
        self.classifier = nn.Linear(370, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        return self.classifier(F.relu(self.fc(h.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)

    def prunable(self) -> list[tuple[nn.Module, str]]:
        return [(self.conv1, "weight"), (self.conv2, "weight"), (self.conv3, "weight"),
                (self.fc, "weight")]  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- measurement
class StepTimer(Callback):
    """Wall and thread-CPU time of every training batch, from the first to the last hook.

    With one torch thread all work of a step runs on the calling thread, so its CPU time
    (``time.thread_time``) excludes the time the process waits for a core on a shared
    machine; the wall time is reported too.
    """

    def __init__(self) -> None:
        self.wall: dict[int, list[float]] = {}
        self.cpu: dict[int, list[float]] = {}
        self._w0 = 0.0
        self._c0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._w0 = time.perf_counter()
        self._c0 = time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cpu = time.thread_time() - self._c0
        wall = time.perf_counter() - self._w0
        self.wall.setdefault(trainer.current_epoch, []).append(wall)
        self.cpu.setdefault(trainer.current_epoch, []).append(cpu)


def _storages(tensors) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _module_tensors(module: nn.Module):
    for m in module.modules():
        yield from m._parameters.values()
        yield from m._buffers.values()
        for value in m.__dict__.values():
            if isinstance(value, torch.Tensor):
                yield value


class MemoryProbe(Callback):
    """At the end of epoch 1: bytes held because of pruning, and bytes of pruned weights."""

    def __init__(self, pruner: Callback | None, dense_bytes: int) -> None:
        self.pruner = pruner
        self.dense_bytes = dense_bytes
        self.result: dict | None = None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch != 1 or self.pruner is None:
            return
        tensors = list(_module_tensors(pl_module))
        if isinstance(self.pruner, IterativePruning):
            tensors += list(self.pruner.masks.values())
            tensors += list((self.pruner.mask_state.rewind_weights or {}).values())
            if isinstance(self.pruner.target.example, torch.Tensor):  # the example input
                tensors.append(self.pruner.target.example)
            pruned = sum(int((~m).sum()) for m in self.pruner.masks.values())
        else:
            for ref in (self.pruner._original_layers or {}).values():
                tensors += list(_module_tensors(ref["data"]))
            pruned = sum(int((getattr(m, f"{n}_mask") == 0).sum()) for m, n in pl_module.prunable())
        held = sum(_storages(tensors).values()) - self.dense_bytes
        self.result = {
            "extra_bytes": held,
            "pruned_bytes": 4 * pruned,
            "ratio": held / (4 * pruned),
        }


def _pruner(kind: str, model: BenchCNN, rewind: bool) -> Callback | None:
    if kind == "none":
        return None
    if kind == "ours":
        return IterativePruning(SPARSITY, start=1, rewind="init" if rewind else None)
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=model.prunable(),
        amount=lambda epoch: SPARSITY if epoch == 0 else 0.0,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=rewind,
        verbose=0,
    )


def run(kind: str, seed: int, epochs: int, rewind: bool, data) -> dict:
    train, val = data
    pl.seed_everything(seed, verbose=False)
    model = BenchCNN()
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pruner = _pruner(kind, model, rewind)
    timer = StepTimer()
    probe = MemoryProbe(pruner, dense_bytes)
    callbacks = [timer] + ([pruner] if pruner is not None else []) + [probe]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    enforcer_cls = MaskEnforcer
    original_enforce = enforcer_cls.enforce
    enforce_cpu: list[float] = []

    def timed_enforce(self):
        t0 = time.thread_time()
        original_enforce(self)
        enforce_cpu.append(time.thread_time() - t0)

    enforcer_cls.enforce = timed_enforce
    try:
        trainer.fit(model, train_dataloaders=loader)
    finally:
        enforcer_cls.enforce = original_enforce
    wall = [t for epoch, ts in timer.wall.items() if epoch >= 1 for t in ts]
    cpu = [t for epoch, ts in timer.cpu.items() if epoch >= 1 for t in ts]
    weights = [getattr(m, n) for m, n in model.prunable()]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {
        "kind": kind,
        "rewind": rewind,
        "seed": seed,
        "median_step_s": statistics.median(wall),
        "median_step_cpu_s": statistics.median(cpu),
        "median_enforce_cpu_s": statistics.median(enforce_cpu) if enforce_cpu else 0.0,
        "accuracy": accuracy(model, val),
        "sparsity": sparsity,
        "memory": probe.result,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


# ----------------------------------------------------------------------------- the figures
def bench_step_and_memory(repeats: int, epochs: int, data) -> dict:
    kinds = ["none", "ours", "modelpruning"]
    raw: list[dict] = []
    for r in range(repeats):
        order = kinds[r % 3 :] + kinds[: r % 3]
        row = {k: run(k, seed=0, epochs=epochs, rewind=True, data=data) for k in order}
        raw.append(row)
        print(
            f"  repeat {r}: step ms wall / cpu: "
            + ", ".join(
                f"{k}={row[k]['median_step_s'] * 1e3:.2f}/{row[k]['median_step_cpu_s'] * 1e3:.2f}"
                for k in kinds
            ),
            flush=True,
        )
    ratios = {
        k: statistics.median(row[k]["median_step_s"] / row["none"]["median_step_s"] for row in raw)
        for k in ("ours", "modelpruning")
    }
    cpu_ratios = {
        k: statistics.median(
            row[k]["median_step_cpu_s"] / row["none"]["median_step_cpu_s"] for row in raw
        )
        for k in ("ours", "modelpruning")
    }
    enforce_ms = statistics.median(row["ours"]["median_enforce_cpu_s"] for row in raw) * 1e3
    step_ms = {k: statistics.median(row[k]["median_step_s"] for row in raw) * 1e3 for k in kinds}
    cpu_ms = {k: statistics.median(row[k]["median_step_cpu_s"] for row in raw) * 1e3 for k in kinds}
    return {
        "step_ratio": ratios,
        "step_cpu_ratio": cpu_ratios,
        "step_ms": step_ms,
        "step_cpu_ms": cpu_ms,
        "enforce_cpu_ms": enforce_ms,
        "memory_rewind": {k: raw[0][k]["memory"] for k in ("ours", "modelpruning")},
        "num_params": raw[0]["none"]["num_params"],
        "raw": raw,
    }


def bench_accuracy(seeds: int, epochs: int, data) -> dict:
    out: dict = {}
    dense = [
        run("none", seed=s, epochs=epochs, rewind=False, data=data)["accuracy"]
        for s in range(seeds)
    ]
    out["dense"] = {
        "accuracy_mean": statistics.mean(dense),
        "accuracy_std": statistics.stdev(dense) if len(dense) > 1 else 0.0,
        "accuracies": dense,
    }
    print(f"  dense: accuracy {dense}", flush=True)
    for rewind in (False, True):
        for kind in ("ours", "modelpruning"):
            runs = [
                run(kind, seed=s, epochs=epochs, rewind=rewind, data=data) for s in range(seeds)
            ]
            accs = [r["accuracy"] for r in runs]
            key = f"{kind}{'_rewind' if rewind else ''}"
            out[key] = {
                "accuracy_mean": statistics.mean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "accuracies": accs,
                "sparsity": runs[0]["sparsity"],
                "memory": runs[0]["memory"],
            }
            print(f"  {key}: accuracy {accs}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--acc-epochs", type=int, default=6)
    parser.add_argument("--round-weights", type=int, default=20_000_000)
    parser.add_argument("--round-repeats", type=int, default=3)
    parser.add_argument("--skip-round", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = digits28()

    print("step time and memory (interleaved repeats)...", flush=True)
    step = bench_step_and_memory(args.repeats, args.epochs, data)
    acc = bench_accuracy(args.seeds, args.acc_epochs, data) if not args.skip_accuracy else None
    round_summary = None
    if not args.skip_round:
        print("global round (fresh processes)...", flush=True)
        from bench_pruning_round import bench_global_round, format_table

        round_summary = bench_global_round(args.round_weights, args.round_repeats)
        print(format_table(round_summary))

    rows: list[tuple[str, float, float, str]] = []
    rows.append(
        (
            "step CPU time pruned / unpruned",
            step["step_cpu_ratio"]["ours"],
            step["step_cpu_ratio"]["modelpruning"],
            "ours <= 1.02",
        )
    )
    rows.append(
        (
            "  ours accounted: 1 + enforce / step",
            1 + step["enforce_cpu_ms"] / step["step_cpu_ms"]["none"],
            math.nan,
            f"enforce {step['enforce_cpu_ms']:.3f} ms CPU per step",
        )
    )
    rows.append(
        (
            "step wall time pruned / unpruned",
            step["step_ratio"]["ours"],
            step["step_ratio"]["modelpruning"],
            "(shared machine: noisy)",
        )
    )
    if acc is not None:
        rows.append(
            (
                "state bytes / pruned bytes",
                acc["ours"]["memory"]["ratio"],
                acc["modelpruning"]["memory"]["ratio"],
                "ours <= 0.3",
            )
        )
    rows.append(
        (
            "  same, with rewind copy",
            step["memory_rewind"]["ours"]["ratio"],
            step["memory_rewind"]["modelpruning"]["ratio"],
            "",
        )
    )
    lines = [
        f"BenchCNN {step['num_params']:,} params, sparsity {SPARSITY} of the Conv/Linear weights "
        f"(classifier excluded), {args.threads} thread(s), {args.repeats} interleaved repeats",
        "step ms wall / CPU (median): "
        + ", ".join(
            f"{k} {step['step_ms'][k]:.2f} / {step['step_cpu_ms'][k]:.2f}"
            for k in ("none", "ours", "modelpruning")
        ),
        f"{'figure':<42}{'ours':>10}{'ModelPruning':>14}   target",
    ]
    lines += [f"{name:<42}{a:>10.3f}{b:>14.3f}   {t}" for name, a, b, t in rows]
    if round_summary is not None:
        for key, ratio in round_summary["ratios"].items():
            target = "<= 0.2" if "time" in key else "<= 0.35"
            lines.append(f"{'global ' + key + ' ours/torch':<42}{ratio:>10.3f}{'':>14}   {target}")
    if acc is not None:
        for suffix, label in (("", "fine-tune"), ("_rewind", "rewind to init")):
            a, b = acc[f"ours{suffix}"], acc[f"modelpruning{suffix}"]
            lines.append(
                f"{'accuracy (' + label + ')':<42}{a['accuracy_mean']:>10.4f}"
                f"{b['accuracy_mean']:>14.4f}   std {a['accuracy_std']:.4f} / "
                f"{b['accuracy_std']:.4f}, {args.seeds} seeds, {args.acc_epochs} epochs"
            )
    if acc is not None:
        lines.append(
            f"{'accuracy (dense, no pruning)':<42}{acc['dense']['accuracy_mean']:>10.4f}"
            f"{'':>14}   std {acc['dense']['accuracy_std']:.4f}"
        )
    table = "\n".join(lines)
    print(table)
    if args.json:
        payload = {"step": step, "accuracy": acc, "round": round_summary, "table": table}
        args.json.write_text(json.dumps(payload, indent=2, default=float))
    if not math.isfinite(step["step_ratio"]["ours"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
