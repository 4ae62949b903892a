"""Which remedy protects the worst group on *your* data? Train every recipe over N seeds, compare.

One command runs every recipe config of ``examples/configs/recipes/`` (``base.yaml`` + one
``<recipe>.yaml`` each: plain cross-entropy, `GroupWeightedLoss` with inverse-frequency
weights, `GroupEqualizedLoss`, `ConstrainedGapLoss` with multipliers from the training batches
and from the validation split; all with README's pruning recipe) through the LightningCLI of
``examples/cli.py``, for seeds 0..N-1, then compares them with
`lightning_fairprune.report.compare_recipes`: worst-group accuracy and the max excess accuracy
gap at matched accuracy, paired by seed, against ``plain``, with confidence intervals and
Bonferroni-corrected Wilcoxon p-values, and the Pareto curves with CI bands over seeds::

    python examples/compare_recipes.py --seeds 5 --out runs/compare     # minutes (2 cores)
    python examples/compare_recipes.py --fast                           # seconds (smoke)
    python examples/compare_recipes.py --recipes plain constrained_gap --seeds 10 \\
        --trainer.max_epochs=40             # any LightningCLI override goes to every run

**Your own model and data.** Edit ``base.yaml``: ``model.class_path`` names any
LightningModule that takes ``criterion`` (a group loss from the recipe, or ``None``) and calls
``self.criterion(logits, targets, groups)`` in ``training_step`` (see
``fairprune_examples.MLP``); ``data.class_path`` your LightningDataModule (batches
``(x, y)``, groups = classes, or ``(x, y, g)`` with the losses' ``num_groups``). A recipe is
one more YAML in the folder (the file name is its label); ``plain`` is the baseline.

Run ``i`` of every recipe uses seed ``i`` (``seed_everything`` and ``--seed-arg``, the
datamodule's split seed), so the runs are paired. Each writes its `FairnessMonitor` history and
its resolved ``config.yaml`` to ``OUT/<recipe>/seed_<i>/``; the same comparison from the
shell::

    fairprune-report compare --recipe plain OUT/plain/seed_* \\
        --recipe constrained_gap OUT/constrained_gap/seed_* --baseline plain \\
        --metric max_excess_accuracy_gap --at accuracy --out OUT/compare
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from cli import main as cli_main

from lightning_fairprune.report import compare_recipes, write_comparison

CONFIGS = Path(__file__).resolve().parent / "configs" / "recipes"
BASELINE = "plain"
METRICS = ("worst_group_accuracy", "max_excess_accuracy_gap")
#: Seconds-long runs for a smoke test (10 epochs, 2 rounds, 40 images per class).
FAST = [
    "--trainer.max_epochs=10",
    "--pruning.start=20",
    "--pruning.num_rounds=2",
    "--pruning.frequency=10",
    "--data.init_args.max_per_class=40",
    "--data.init_args.batch_size=32",
    "--model.init_args.lr=0.1",
]


def recipes(configs: Path = CONFIGS) -> dict[str, Path]:
    """``{label: config}`` for every YAML of ``configs`` but ``base.yaml``, ``plain`` first."""
    found = {p.stem: p for p in sorted(configs.glob("*.yaml")) if p.stem != "base"}
    if BASELINE not in found:
        raise ValueError(f"Expected {configs / (BASELINE + '.yaml')} (the baseline recipe)")
    return {BASELINE: found.pop(BASELINE), **found}


def train_run(label: str, config: Path, seed: int, args: argparse.Namespace, extra: list[str]):
    """One recipe, one seed, through the LightningCLI; returns (run directory, the CLI)."""
    run_dir = Path(args.out) / label / f"seed_{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # one history per run directory
    run_dir.mkdir(parents=True)
    cli_args = ["fit", "--config", str(args.configs / "base.yaml"), "--config", str(config),
                f"--seed_everything={seed}", f"--trainer.default_root_dir={run_dir}"]  # fmt: skip
    if args.seed_arg:
        cli_args.append(f"--{args.seed_arg}={seed}")
    cli_args += (FAST if args.fast else []) + extra
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads `args`, not our own flags
    try:
        cli = cli_main(cli_args, model_class=None)
    finally:
        sys.argv = argv
    return run_dir, cli  # the history is under it (fairprune/<version>/)


def compare(run_dirs: dict[str, list[Path]], metric: str):
    """`compare_recipes` at one accuracy level for all runs, else per seed, else equal sparsity."""
    for at, level in (("accuracy", None), ("accuracy", "per_seed"), ("sparsity", None)):
        try:
            return compare_recipes(run_dirs, metric, BASELINE, at, level)
        except ValueError as err:
            print(f"\n{metric}: not compared at {at} (level={level!r}): {err}")
    raise RuntimeError(f"no comparison of {metric} was possible")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train every recipe for every seed, compare them, write the tables and the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Other arguments (--trainer.max_epochs=40, ...) go to every LightningCLI run.",
    )
    parser.add_argument("--out", default="runs/compare", help="output directory")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per recipe (paired)")
    parser.add_argument("--recipes", nargs="+", default=None, help="labels (default: all)")
    parser.add_argument("--configs", type=Path, default=CONFIGS, help="the recipe folder")
    parser.add_argument(
        "--seed-arg",
        default="data.init_args.seed",
        help="config key set to the seed besides seed_everything ('' for none)",
    )
    parser.add_argument("--fast", action="store_true", help="tiny: 2 seeds, 10 epochs")
    args, extra = parser.parse_known_args(argv)
    found = recipes(args.configs)
    labels = args.recipes or list(found)
    for label in labels:
        if label not in found:
            parser.error(f"Expected recipes from {list(found)}, but got {label!r}")
    if BASELINE not in labels:
        labels = [BASELINE, *labels]
    if args.fast:
        args.seeds = 2
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banner

    run_dirs: dict[str, list[Path]] = {label: [] for label in labels}
    models: dict[str, list[Any]] = {label: [] for label in labels}
    for label in labels:
        print(f"{label}: {found[label].name}, {args.seeds} seeds", flush=True)
        for seed in range(args.seeds):
            run_dir, cli = train_run(label, found[label], seed, args, extra)
            run_dirs[label].append(run_dir)
            models[label].append((cli.model, cli.trainer))

    comparisons, written = {}, []
    for metric in METRICS:
        comparisons[metric] = result = compare(run_dirs, metric)
        written += write_comparison(result, Path(args.out) / "compare" / metric)
        print(f"\n{metric} ({'higher' if metric != METRICS[1] else 'lower'} is better)")
        print(result.table())
    print(f"\nTables and figures: {Path(args.out) / 'compare'}")
    return {"comparisons": comparisons, "run_dirs": run_dirs, "written": written,
            "models": models}  # fmt: skip


if __name__ == "__main__":
    main()
