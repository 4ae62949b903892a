"""Structured (channel) pruning: does `compact` make the model smaller and faster? (issue 20)

Two models, defined here (no torchvision): a CIFAR-size ResNet-18 (3x32x32 inputs, basic
blocks 64-128-256-512, 11.2M parameters) and a small residual CNN (widths 32-64-128). Each is
pruned one-shot at 30 / 50 / 70 % of the channels of every channel group (layerwise, group L2
magnitude): ``channel_groups`` -> ``group_scores`` -> ``select_channels`` -> ``channel_masks``
-> ``compact``. For each fraction:

1. **compact vs masked**: max abs difference of the outputs (eval mode, float32) between the
   compact model and the dense model with the masks applied. Target <= 1e-4.
2. **parameters**: compact / dense. Target at 50 %: <= 0.30.
3. **CPU latency** of one forward (eval, ``inference_mode``, one thread) at batch 64 and batch
   1: dense, ours and Torch-Pruning's, timed interleaved in every repeat (rotating order),
   medians. Ratios: ours / dense (target at 50 %: <= 0.5) and ours / Torch-Pruning's
   (target: <= 1.10). Batch 64: ``--repeats`` repeats; batch 1: 8x as many.
4. **Torch-Pruning's own MetaPruner** (``tp.pruner.BasePruner``, of which ``MetaPruner`` is the
   deprecated alias in 1.6) prunes a copy of the same model one-shot with
   ``MagnitudeImportance(p=2)``, layerwise, with a per-group ratio that gives exactly our
   channel count (checked: equal parameter counts).
5. **compact seconds**: wall time of ``compact`` (deep copy, graph trace, pruning, output check)
   on a batch-1 example input.

Run: ``python benchmarks/bench_structured.py [--repeats 15] [--json out.json]``;
``--quick`` (CI): the small CNN on 16x16 inputs at 50 % only, 3 repeats, a few seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from structured import Block  # the example's ResNet basic block

from lightning_fairprune.compact import compact
from lightning_fairprune.cost import model_cost
from lightning_fairprune.pruning.structured import (
    channel_groups,
    channel_masks,
    group_parameter_names,
    group_scores,
    import_torch_pruning,
    select_channels,
)


# ----------------------------------------------------------------------------- models
class ResNet(nn.Module):
    """CIFAR ResNet (3x3 stem, no max-pool): ``blocks=(2, 2, 2, 2)``, widths 64..512 = ResNet-18."""

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for b in range(n):
                layers.append(Block(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18() -> ResNet:
    return ResNet()


def small_cnn() -> ResNet:
    return ResNet(blocks=(1, 1, 1), widths=(32, 64, 128))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics, so that masked channels matter."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# ----------------------------------------------------------------------------- pruning
def prune_ours(model: nn.Module, x: torch.Tensor, fraction: float):
    """Our path: groups -> scores -> keep -> masks -> compact (``x``: a small example batch)."""
    groups = channel_groups(model, x)
    params = dict(model.named_parameters())
    weights = {n: params[n].detach().abs() for n in group_parameter_names(groups)}
    keep = select_channels(group_scores(groups, weights, "l2"), fraction, scope="layerwise")
    masks = channel_masks(groups, params, keep)
    start = time.perf_counter()
    small = compact(model, x, masks=masks, groups=groups).eval()
    compact_s = time.perf_counter() - start
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            dict(masked.named_parameters())[name].mul_(mask)
    return groups, keep, masked.eval(), small, compact_s


def prune_tp(model: nn.Module, x: torch.Tensor, groups, keep) -> nn.Module:
    """Torch-Pruning's MetaPruner on a copy, one-shot, layerwise, with our per-group counts."""
    tp = import_torch_pruning()
    theirs = copy.deepcopy(model)
    modules = dict(theirs.named_modules())
    ratios = {}
    for group, k in zip(groups, keep, strict=True):
        pruned = int((~k).sum())
        # BasePruner prunes C - int(C * (1 - r)): r = (pruned - 0.5) / C gives exactly `pruned`
        ratios[modules[group.root]] = (pruned - 0.5) / group.num_channels if pruned else 0.0
    pruner = tp.pruner.BasePruner(
        theirs,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        ignored_layers=[theirs.fc],
        global_pruning=False,
    )
    pruner.step()
    return theirs.eval()


# ----------------------------------------------------------------------------- timing
@torch.inference_mode()
def latencies(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward, the models interleaved in rotating order in every repeat."""
    names = list(models)
    for name in names:  # warm-up
        models[name](x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            models[name](x)
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def run_model(
    name: str, factory, size: int, fractions, repeats: int, batch: int, seed: int = 0
) -> list[dict]:
    dense = _init(factory(), seed)
    x = torch.randn(batch, 3, size, size)
    x1 = x[:1].clone()
    dense_cost = model_cost(dense, x1)
    rows = []
    for fraction in fractions:
        groups, keep, masked, ours, compact_s = prune_ours(dense, x1, fraction)
        theirs = prune_tp(dense, x1, groups, keep)
        with torch.no_grad():
            diff = float((masked(x) - ours(x)).abs().max())
        cost, tp_cost = model_cost(ours, x1), model_cost(theirs, x1)
        models = {"dense": dense, "ours": ours, "tp": theirs}
        lat64 = latencies(models, x, repeats)
        lat1 = latencies(models, x1, repeats * 8)
        row = {
            "model": name,
            "fraction": fraction,
            "channels_total": sum(g.num_channels for g in groups),
            "channels_kept": sum(int(k.sum()) for k in keep),
            "max_abs_diff": diff,
            "params_dense": dense_cost["params"],
            "params": cost["params"],
            "params_tp": tp_cost["params"],
            "params_ratio": cost["params"] / dense_cost["params"],
            "flops_ratio": cost["flops"] / dense_cost["flops"],
            "latency_dense_b64_ms": 1e3 * lat64["dense"],
            "latency_b64_ms": 1e3 * lat64["ours"],
            "latency_tp_b64_ms": 1e3 * lat64["tp"],
            "latency_ratio_b64": lat64["ours"] / lat64["dense"],
            "tp_latency_ratio_b64": lat64["ours"] / lat64["tp"],
            "latency_dense_b1_ms": 1e3 * lat1["dense"],
            "latency_b1_ms": 1e3 * lat1["ours"],
            "latency_tp_b1_ms": 1e3 * lat1["tp"],
            "latency_ratio_b1": lat1["ours"] / lat1["dense"],
            "tp_latency_ratio_b1": lat1["ours"] / lat1["tp"],
            "compact_seconds": compact_s,
        }
        rows.append(row)
        print(
            f"{name:9s} {fraction:4.0%}  kept {row['channels_kept']:5d}/{row['channels_total']:<5d}"
            f" diff {diff:.1e}  params {row['params_ratio']:.3f} (tp {tp_cost['params']})"
            f"  flops {row['flops_ratio']:.3f}  b64 {row['latency_ratio_b64']:.3f}"
            f" (vs tp {row['tp_latency_ratio_b64']:.3f})  b1 {row['latency_ratio_b1']:.3f}"
            f" (vs tp {row['tp_latency_ratio_b1']:.3f})  compact {compact_s:.2f}s",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CNN, 50 %% only (CI)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch_pruning")
    if args.quick:
        rows = run_model("small_cnn", small_cnn, 16, [0.5], 3, 16)
    else:
        rows = []
        for name, factory in (("small_cnn", small_cnn), ("resnet18", resnet18)):
            rows += run_model(name, factory, 32, [0.3, 0.5, 0.7], args.repeats, 64)
    result = {
        "device": f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "quick": args.quick,
        "rows": rows,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
