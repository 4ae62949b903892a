"""One global magnitude-pruning round (and a second round on top) on >= 20M weights.

Compares `lightning_fairprune.pruning.global_masks` + `apply_masks` with
`torch.nn.utils.prune.global_unstructured(..., pruning_method=prune.L1Unstructured)`:

* round 1: dense -> 50 % sparsity of the prunable weights;
* round 2: 50 % -> 80 % (for torch's prune the amount is the fraction of the *remaining*
  weights, 0.6).

Every measurement runs in a fresh Python process (so that allocator state and peak RSS of one
method cannot leak into the other); methods are interleaved, and the median over `repeats`
processes is reported. Time is wall-clock of the pruning call(s). Peak extra memory is the
peak resident set size during the round minus the resident set size right before it: the
peak is reset with ``/proc/self/clear_refs`` (Linux >= 4.0) before each round and read from
``VmHWM`` afterwards (fallback: ``ru_maxrss``). glibc's dynamic mmap threshold is pinned so
freed buffers return to the OS and the baseline is the live memory.

Run: ``python benchmarks/bench_pruning_round.py [--num-weights N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUNDS = (0.5, 0.8)


# ----------------------------------------------------------------------------- child side
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_kb(can_reset: bool) -> int:
    if can_reset:
        value = _status_kb("VmHWM")
        if value is not None:
            return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kb() -> int:
    value = _status_kb("VmRSS")
    if value is None:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    return value


def build_layers(num_weights: int, seed: int = 0, width: int = 2048):
    """Square Linear layers of the given width holding at least ``num_weights`` weights."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    n_layers = max(1, math.ceil(num_weights / (width * width)))
    with torch.no_grad():
        layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(n_layers)))
    return layers


def _worker(method: str, num_weights: int, threads: int) -> dict:
    import torch
    from torch.nn.utils import prune

    from lightning_fairprune.pruning import apply_masks, global_masks
    from lightning_fairprune.schedules import fraction_of_remaining

    if threads > 0:
        torch.set_num_threads(threads)
    model = build_layers(num_weights)
    named = {f"{i}.weight": layer.weight for i, layer in enumerate(model)}
    total = sum(p.numel() for p in named.values())
    result: dict = {
        "method": method,
        "num_weights": total,
        "threads": torch.get_num_threads(),
        "rounds": [],
    }
    masks = None
    previous = 0.0
    for target in ROUNDS:
        gc.collect()
        can_reset = _reset_peak()
        before = _rss_kb()
        start = time.perf_counter()
        if method == "ours":
            # magnitude: the mask builder thresholds on abs(score), so the weights themselves
            # serve as scores without a copy
            scores = {n: p.detach() for n, p in named.items()}
            masks = global_masks(scores, target, masks)
            apply_masks(named, masks)
            del scores
        else:
            amount = fraction_of_remaining(previous, target)
            prune.global_unstructured(
                [(layer, "weight") for layer in model],
                pruning_method=prune.L1Unstructured,
                amount=amount,
            )
        elapsed = time.perf_counter() - start
        peak = _peak_kb(can_reset)
        zeros = sum(int((layer.weight == 0).sum()) for layer in model)
        result["rounds"].append(
            {
                "target": target,
                "time_s": elapsed,
                "peak_extra_mb": max(0, peak - before) / 1024,
                "rss_before_mb": before / 1024,
                "realized_sparsity": zeros / total,
                "peak_reset": can_reset,
            }
        )
        previous = target
    return result


# ----------------------------------------------------------------------------- parent side
def _run_child(method: str, num_weights: int, threads: int) -> dict:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    cmd += ["--num-weights", str(num_weights), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker {method!r} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def masks_agree(num_weights: int = 300_000) -> bool:
    """Check on a small model that both methods prune exactly the same weights."""
    import torch
    from torch.nn.utils import prune

    from lightning_fairprune.pruning import apply_masks, global_masks
    from lightning_fairprune.schedules import fraction_of_remaining

    ours = build_layers(num_weights, seed=1, width=256)
    theirs = build_layers(num_weights, seed=1, width=256)
    named = {f"{i}.weight": layer.weight for i, layer in enumerate(ours)}
    masks = None
    previous = 0.0
    for target in ROUNDS:
        masks = global_masks({n: p.detach() for n, p in named.items()}, target, masks)
        apply_masks(named, masks)
        prune.global_unstructured(
            [(layer, "weight") for layer in theirs],
            pruning_method=prune.L1Unstructured,
            amount=fraction_of_remaining(previous, target),
        )
        previous = target
        for i, layer in enumerate(theirs):
            if not torch.equal(layer.weight_mask.bool(), masks[f"{i}.weight"]):
                return False
    return True


def bench_global_round(num_weights: int = 20_000_000, repeats: int = 3, threads: int = 1) -> dict:
    """Time and peak extra memory of global magnitude rounds: ours vs torch's prune.

    Args:
        num_weights: minimum number of prunable weights (square 2048-wide Linear layers).
        repeats: fresh processes per method (interleaved); medians are reported.
        threads: ``torch.set_num_threads`` in both workers (0: torch's default). The default
            1 keeps the comparison stable on a shared, oversubscribed machine, where OpenMP
            barriers of many short parallel ops stall whenever a thread is descheduled.

    Returns:
        ``{"num_weights", "repeats", "ours": {...}, "torch": {...}, "ratios": {...},
        "raw": [...], "masks_agree": bool}`` where each method's entry holds the median
        ``round{1,2}_time_s`` and ``round{1,2}_peak_extra_mb`` and ``ratios`` holds
        ours / torch for each of them (targets: time <= 0.2, memory <= 0.35).
    """
    raw: list[dict] = []
    for _ in range(repeats):
        for method in ("ours", "torch"):
            raw.append(_run_child(method, num_weights, threads))
    summary: dict = {
        "num_weights": raw[0]["num_weights"],
        "repeats": repeats,
        "threads": raw[0]["threads"],
        "raw": raw,
    }
    for method in ("ours", "torch"):
        runs = [r for r in raw if r["method"] == method]
        entry = {}
        for i in range(len(ROUNDS)):
            entry[f"round{i + 1}_time_s"] = statistics.median(
                r["rounds"][i]["time_s"] for r in runs
            )
            entry[f"round{i + 1}_peak_extra_mb"] = statistics.median(
                r["rounds"][i]["peak_extra_mb"] for r in runs
            )
            entry[f"round{i + 1}_sparsity"] = runs[0]["rounds"][i]["realized_sparsity"]
        summary[method] = entry
    ratios = {}
    for key in summary["ours"]:
        if key.endswith("_sparsity"):
            continue
        denominator = summary["torch"][key]
        ratios[key] = summary["ours"][key] / denominator if denominator else math.nan
    summary["ratios"] = ratios
    summary["masks_agree"] = masks_agree()
    return summary


def format_table(summary: dict) -> str:
    """Render the summary of :func:`bench_global_round` as a text table."""
    lines = [
        f"global magnitude pruning, {summary['num_weights']:,} weights, "
        f"median of {summary['repeats']} fresh processes, {summary['threads']} torch thread(s); "
        "masks identical: "
        f"{summary['masks_agree']}",
        f"{'quantity':<28}{'ours':>12}{'torch prune':>14}{'ratio':>9}{'target':>9}",
    ]
    for key, ratio in summary["ratios"].items():
        target = 0.2 if "time" in key else 0.35
        unit = "s" if "time" in key else "MB"
        ours, theirs = summary["ours"][key], summary["torch"][key]
        lines.append(
            f"{key + ' [' + unit + ']':<28}{ours:>12.3f}{theirs:>14.3f}{ratio:>9.3f}{target:>9.2f}"
        )
    for i, target in enumerate(ROUNDS):
        lines.append(
            f"round{i + 1} realized sparsity (target {target}): ours "
            f"{summary['ours'][f'round{i + 1}_sparsity']:.6f}, torch "
            f"{summary['torch'][f'round{i + 1}_sparsity']:.6f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-weights", type=int, default=20_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--worker", choices=["ours", "torch"], default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.num_weights, args.threads)))
        return
    summary = bench_global_round(args.num_weights, args.repeats, args.threads)
    print(format_table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
