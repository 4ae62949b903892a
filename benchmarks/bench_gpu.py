"""GPU speed of the training step, the pruning round and the per-group diagnostics (issue 12).

One prepared script, every section side by side in one run, JSON output and a summary table:

1. ``step``: ResNet-50-like training step (bf16 autocast on CUDA), pruning active with
   `MaskEnforcer` / no pruning, beside ``torch.nn.utils.prune`` forward pre-hooks / no pruning;
   plus the enforcement's own time per step.
2. ``round``: one global magnitude round 0 -> 50 % and a second 50 -> 80 % on square Linear
   weights (>= 500M on the GPU), `global_masks` + `apply_masks` vs
   ``torch.nn.utils.prune.global_unstructured``: time and peak extra memory (CUDA allocator
   peak; resident-set peak on the CPU is not measured), masks checked identical.
3. ``norms``: `group_gradient_norms` for G = 10 and G = 100 / one plain forward+backward over
   the same data (ResNet-18-like, 32x32), plus the ``max_memory`` blocked path at G = 100.
4. ``hutchinson``: `group_hessian_trace` with K probes / K sequential HVPs per batch
   (PyHessian's way: forward, backward with graph, one double backward per probe).

Run: ``python benchmarks/bench_gpu.py [--json out.json]`` (about 3-5 minutes on one H200);
``--smoke``: every section with tiny sizes on the CPU in well under a minute (the test suite
runs it). All models are defined here (no torchvision needed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_fairprune.diagnostics.curvature import (
    group_gradient_norms,
    group_hessian_trace,
)
from lightning_fairprune.pruning import (
    MaskEnforcer,
    apply_masks,
    global_masks,
)

# --------------------------------------------------------------------------- models


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck block (1x1, 3x3, 1x1 convolutions, expansion 4)."""

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == out
            else nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class Basic(nn.Module):
    """ResNet-18 basic block (two 3x3 convolutions)."""

    def __init__(self, cin: int, out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
            nn.Conv2d(out, out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == out
            else nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet(kind: str, base: int = 64, num_classes: int = 1000, small_input: bool = False):
    """ResNet-50-like (``kind="50"``: 3-4-6-3 bottlenecks) or ResNet-18-like (2-2-2-2)."""
    if small_input:  # CIFAR-style stem for 32x32 inputs
        stem = [nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU()]
    else:
        stem = [
            nn.Conv2d(3, base, 7, 2, 3, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        ]
    layers: list[nn.Module] = list(stem)
    cin = base
    depths = (3, 4, 6, 3) if kind == "50" else (2, 2, 2, 2)
    for i, depth in enumerate(depths):
        width = base * 2**i
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            if kind == "50":
                layers.append(Bottleneck(cin, width, stride))
                cin = 4 * width
            else:
                layers.append(Basic(cin, width, stride))
                cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv and Linear weights (FQN -> parameter)."""
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _best(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict:
    """Best time of each function, interleaved round-robin (drift hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn, device))
    return {k: min(v) for k, v in times.items()}


# --------------------------------------------------------------------------- sections


def bench_step(cfg: dict, device: torch.device) -> dict:
    """Training-step time with pruning active (ours / torch prune hooks) over none."""
    from torch.nn.utils import prune

    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = resnet("50", cfg["step_base"], 1000).to(device).to(memory_format=cfg["fmt"])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return model, opt

    x = torch.randn(cfg["step_batch"], 3, cfg["step_res"], cfg["step_res"], device=device)
    x = x.to(memory_format=cfg["fmt"])
    y = torch.randint(0, 1000, (cfg["step_batch"],), device=device)
    amp_dtype = torch.bfloat16

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    setups: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    model, opt = make()
    setups["none"] = (model, opt)
    model, opt = make()
    named = prunable(model)
    masks = global_masks({n: p.detach() for n, p in named.items()}, 0.8)
    apply_masks(named, masks)
    enforcer = MaskEnforcer(opt, named, masks)
    setups["ours"] = (model, opt)
    model, opt = make()
    prune.global_unstructured(
        [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
        pruning_method=prune.L1Unstructured,
        amount=0.8,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    setups["torch_prune"] = (model, opt)

    for m, o in setups.values():  # warm-up (cuDNN autotune, allocator)
        for _ in range(cfg["step_warmup"]):
            step(m, o)
    per: dict[str, list[float]] = {k: [] for k in setups}
    for _ in range(cfg["step_repeats"]):
        for k, (m, o) in setups.items():
            t = _timed(lambda m=m, o=o: [step(m, o) for _ in range(cfg["step_iters"])], device)
            per[k].append(t / cfg["step_iters"])
    med = {k: statistics.median(v) for k, v in per.items()}
    enforce_s = _timed(lambda: [enforcer.enforce() for _ in range(50)], device) / 50
    zeros_kept = all(int(torch.count_nonzero(p.detach()[~masks[n]])) == 0 for n, p in named.items())
    return {
        "step_ms": {k: 1e3 * v for k, v in med.items()},
        "enforce_ms": 1e3 * enforce_s,
        "enforce_mode": "foreach" if device.type != "cpu" else "uint8",
        "zeros_kept": zeros_kept,
        "ratios": {
            "ours_over_none": med["ours"] / med["none"],
            "torch_prune_over_none": med["torch_prune"] / med["none"],
        },
    }


def bench_round(cfg: dict, device: torch.device) -> dict:
    """Two global magnitude rounds: ours vs torch.nn.utils.prune (time, peak extra memory)."""
    from torch.nn.utils import prune

    width, count = cfg["round_width"], cfg["round_layers"]
    rounds = (0.5, 0.8)

    def layers() -> nn.ModuleList:
        torch.manual_seed(0)
        with torch.device(device):
            out = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(count))
        return out

    def peak_start() -> int:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        return 0

    def peak_extra(before: int) -> float | None:
        if device.type == "cuda":
            return (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return None

    result: dict[str, Any] = {"num_weights": width * width * count}
    ours_masks: list[dict[str, torch.Tensor]] = []
    for method in ("ours", "torch"):
        mods = layers()
        named = {f"{i}.weight": m.weight for i, m in enumerate(mods)}
        masks = None
        previous = 0.0
        entries = []
        for r, target in enumerate(rounds):
            before = peak_start()
            start = time.perf_counter()
            if method == "ours":
                masks = global_masks({n: p.detach() for n, p in named.items()}, target, masks)
                apply_masks(named, masks)
                ours_masks.append(masks)
            else:
                prune.global_unstructured(
                    [(m, "weight") for m in mods],
                    pruning_method=prune.L1Unstructured,
                    amount=(target - previous) / (1 - previous),
                )
            _sync(device)
            elapsed = time.perf_counter() - start
            entry = {"time_s": elapsed, "peak_extra_mb": peak_extra(before)}
            if method == "torch":
                entry["masks_identical"] = all(
                    torch.equal(m.weight_mask.bool(), ours_masks[r][f"{i}.weight"])
                    for i, m in enumerate(mods)
                )
            entries.append(entry)
            previous = target
        result[method] = entries
        del mods, named, masks
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratios = {}
    for r in range(len(rounds)):
        ours, theirs = result["ours"][r], result["torch"][r]
        ratios[f"round{r + 1}_time"] = ours["time_s"] / theirs["time_s"]
        if ours["peak_extra_mb"] is not None and theirs["peak_extra_mb"]:
            ratios[f"round{r + 1}_peak_memory"] = ours["peak_extra_mb"] / theirs["peak_extra_mb"]
    result["ratios"] = ratios
    return result


def _group_data(n: int, res: int, num_groups: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, res, res, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    g = torch.randint(0, num_groups, (n,), generator=gen)
    return x.to(device), y.to(device), g.to(device)


def _batches(x, y, g, batch):
    return [(x[i : i + batch], y[i : i + batch], g[i : i + batch]) for i in range(0, len(y), batch)]


def bench_norms(cfg: dict, device: torch.device) -> dict:
    """Per-group gradient norms / one plain forward+backward over the same data."""
    torch.manual_seed(0)
    model = resnet("18", cfg["norm_base"], 10, small_input=True).to(device)
    size = sum(p.numel() for p in model.parameters())
    n, batch = cfg["norm_samples"], cfg["norm_batch"]

    def plain(batches):
        model.eval()
        params = list(model.parameters())
        for x, y, _ in batches:
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
            torch.autograd.grad(loss, params)
        model.train()

    out: dict[str, Any] = {"parameters": size, "samples": n, "ratios": {}, "time_s": {}}
    for groups in (10, 100):
        batches = _batches(*_group_data(n, 32, groups, device), batch)
        fns = {
            "plain": lambda b=batches: plain(b),
            "auto": lambda b=batches, G=groups: group_gradient_norms(model, b, G),
            "loop": lambda b=batches, G=groups: group_gradient_norms(model, b, G, strategy="loop"),
        }
        if groups == 100:
            budget = 26 * size * 4  # 4 blocks of 26 groups
            fns["auto_blocked"] = lambda b=batches, m=budget: group_gradient_norms(
                model, b, 100, max_memory=m
            )
        for fn in fns.values():  # warm-up
            fn()
        best = _best(fns, device, cfg["repeats"])
        out["time_s"][f"G{groups}"] = best
        for k, v in best.items():
            if k != "plain":
                out["ratios"][f"G{groups}_{k}_over_plain"] = v / best["plain"]
    return out


def bench_hutchinson(cfg: dict, device: torch.device) -> dict:
    """Hutchinson trace, 10 groups, K probes / K sequential HVPs per batch (no grouping)."""
    torch.manual_seed(0)
    model = resnet("18", cfg["norm_base"], 10, small_input=True).to(device)
    k = cfg["probes"]
    x, y, g = _group_data(cfg["hutch_samples"], 32, 10, device)
    batches = _batches(x, y, g, cfg["norm_batch"])
    params = list(model.parameters())

    def sequential() -> None:
        model.eval()
        for bx, by, _ in batches:
            loss = nn.functional.cross_entropy(model(bx), by, reduction="sum")
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for _ in range(k):
                vs = [torch.randint_like(p, 2) * 2 - 1 for p in params]
                torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        model.train()

    fns = {
        "sequential_hvps": sequential,
        "auto": lambda: group_hessian_trace(model, batches, 10, num_probes=k),
        "loop": lambda: group_hessian_trace(model, batches, 10, num_probes=k, strategy="loop"),
    }
    for fn in fns.values():
        fn()
    best = _best(fns, device, cfg["repeats"])
    return {
        "probes": k,
        "samples": cfg["hutch_samples"],
        "time_s": best,
        "ratios": {
            "auto_over_sequential": best["auto"] / best["sequential_hvps"],
            "loop_over_sequential": best["loop"] / best["sequential_hvps"],
        },
    }


FULL = {
    "step_base": 64, "step_res": 224, "step_batch": 64, "step_warmup": 5, "step_iters": 10,
    "step_repeats": 5, "round_width": 4096, "round_layers": 30, "norm_base": 64,
    "norm_samples": 8192, "norm_batch": 256, "hutch_samples": 2048, "probes": 16, "repeats": 3,
}  # fmt: skip
SMOKE = {
    "step_base": 4, "step_res": 32, "step_batch": 4, "step_warmup": 1, "step_iters": 2,
    "step_repeats": 2, "round_width": 64, "round_layers": 3, "norm_base": 4,
    "norm_samples": 64, "norm_batch": 16, "hutch_samples": 32, "probes": 3, "repeats": 1,
}  # fmt: skip


def run(smoke: bool, sections: list[str]) -> dict:
    """Run the chosen sections; returns the JSON-able summary."""
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    cfg = dict(SMOKE if smoke else FULL)
    cfg["fmt"] = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    warnings.filterwarnings("ignore", message=".*have no samples in `batches`")
    if device.type == "cpu":
        torch.set_num_threads(1)
    else:
        torch.backends.cudnn.benchmark = True
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke": smoke,
        "config": {k: v for k, v in cfg.items() if k != "fmt"},
    }
    table = {"step": bench_step, "round": bench_round, "norms": bench_norms,
             "hutchinson": bench_hutchinson}  # fmt: skip
    for name in sections:
        start = time.perf_counter()
        summary[name] = table[name](cfg, device)
        summary[name]["section_s"] = time.perf_counter() - start
    return summary


TARGETS = {
    "step.ours_over_none": 1.005,
    "round.round1_time": 0.2,
    "round.round2_time": 0.2,
    "round.round1_peak_memory": 0.1,
    "round.round2_peak_memory": 0.1,
    "norms.G10_auto_over_plain": 1.0,
    "norms.G100_auto_over_plain": 1.25,
    "hutchinson.auto_over_sequential": 0.6,
}


def format_table(summary: dict) -> str:
    """Summary table of every ratio with its target."""
    lines = [f"device: {summary['device']} (torch {summary['torch']}, smoke={summary['smoke']})"]
    lines.append(f"{'ratio':<44}{'value':>9}{'target':>9}")
    for section in ("step", "round", "norms", "hutchinson"):
        if section not in summary:
            continue
        for key, value in summary[section]["ratios"].items():
            target = TARGETS.get(f"{section}.{key}")
            shown = "" if target is None else f"{target:>9.3f}"
            lines.append(f"{section + '.' + key:<44}{value:>9.3f}{shown}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument(
        "--sections", default="step,round,norms,hutchinson", help="comma-separated subset"
    )
    args = parser.parse_args()
    summary = run(args.smoke, [s for s in args.sections.split(",") if s])
    print(format_table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    bad = [
        (s, k, v)
        for s in ("step", "round", "norms", "hutchinson")
        if s in summary
        for k, v in summary[s]["ratios"].items()
        if not (math.isfinite(v) and v > 0)
    ]
    if bad:
        raise SystemExit(f"non-finite or non-positive ratios: {bad}")


if __name__ == "__main__":
    main()
