"""FairnessMonitor in real fits: keys, measurements, files, errors and progress (issue 18).

Each test reproduces what a user hit: two named monitors sharing metric keys, the same weights
measured twice at one step, a second run overwriting the first run's history, a ``metrics=``
entry failing after training steps with a raw message, a checkpoint on worst-group accuracy
that keeps the dense model, parity gaps of 1.0 for class groups, ModelCheckpoint failing on a
key that appears only at the first round, and long passes without progress.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _models import (
    CaptureLogger,
    DigitsDataModule,
    SmallCNN,
    digits_tensors,
    quiet_trainer_kwargs,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune import FairnessMonitor, IterativePruning
from lightning_fairprune.history import HISTORY_FILENAME, read_history
from lightning_fairprune.records import PARITY_SUMMARIES

PRUNED = ["features.0.weight", "features.2.weight", "fc.weight"]
PRUNER_KEYS = ("fairprune/sparsity", "fairprune/target_sparsity", "fairprune/round")


@pytest.fixture
def lightning_caplog(caplog):
    """`caplog` that sees Lightning's `rank_zero_info` whatever configured logging earlier in the
    session (Lightning's logger may not propagate; an in-process example sets it to WARNING)."""
    logger = logging.getLogger("lightning.pytorch")
    propagate, level = logger.propagate, logger.level
    logger.addHandler(caplog.handler)
    logger.propagate = False  # each record reaches caplog once
    logger.setLevel(logging.INFO)  # an in-process example may have quietened it
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate
        logger.setLevel(level)


class StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps += 1


def _trainer(tmp_path: Path, callbacks: list, **overrides) -> pl.Trainer:
    kwargs = {**quiet_trainer_kwargs(tmp_path), "max_epochs": 2, "limit_train_batches": 2}
    kwargs.update(overrides)
    return pl.Trainer(callbacks=callbacks, **kwargs)


def _no_key_twice_per_step(rows: list[tuple[int, dict]]) -> None:
    seen: dict[int, set[str]] = {}
    for step, metrics in rows:
        assert not seen.setdefault(step, set()) & set(metrics), f"a key logged twice at {step}"
        seen[step] |= set(metrics)


# ------------------------------------------------------------------ 1: named monitors' keys
def test_two_named_monitors_log_and_publish_under_their_own_names(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(n=200, batch_size=40, with_groups=True)
    attr = FairnessMonitor(num_groups=2, num_probes=0, name="attr", every_n_epochs=1)
    by_class = FairnessMonitor(
        group_key=None, group_fn=lambda b: (b[0], b[1], None), num_probes=0, name="cls"
    )
    logger = CaptureLogger(str(tmp_path))
    pruning = IterativePruning(0.5, num_rounds=1, start=1)
    trainer = _trainer(tmp_path, [pruning, attr, by_class], logger=logger)
    trainer.fit(SmallCNN(), datamodule=dm)

    logged = {k for _, metrics in logger.rows for k in metrics if "fairprune" in k}
    assert {k for k in logged if k.startswith("fairprune/")} == set(PRUNER_KEYS) | {
        f"fairprune/sparsity/{n}" for n in PRUNED
    }  # only the pruner's keys stay unprefixed
    assert "fairprune-attr/worst_group_accuracy" in logged
    assert "fairprune-cls/dense/worst_group_recall" in logged
    _no_key_twice_per_step(logger.rows)
    metrics = trainer.callback_metrics
    assert "fairprune/worst_group_accuracy" not in metrics
    for monitor in (attr, by_class):
        last = monitor.history[-1]
        key = f"fairprune-{monitor.name}/worst_group_accuracy"
        assert float(metrics[key]) == pytest.approx(min(last["group_accuracy"]), abs=1e-6)
    assert attr.history[-1]["num_groups"] == 2
    assert by_class.history[-1]["num_groups"] == 10


def test_monitors_whose_keys_would_collide_are_refused_before_training(tmp_path):
    dm = DigitsDataModule(n=100, batch_size=50)
    counter = StepCounter()
    # distinct names, hence distinct checkpoint state keys, but one slug: keys and file collide
    clash = [FairnessMonitor(num_probes=0, name="a b"), FairnessMonitor(num_probes=0, name="a/b")]
    with pytest.raises(ValueError, match=r"its own `name`.*\['a b', 'a/b'\].*'fairprune-a_b/"):
        _trainer(tmp_path, [*clash, counter]).fit(SmallCNN(), datamodule=dm)
    # two unnamed monitors: Lightning refuses their shared state key when the Trainer is built;
    # one appended afterwards is refused by the monitors' setup
    with pytest.raises(RuntimeError, match="FairnessMonitor"):
        _trainer(tmp_path, [FairnessMonitor(), FairnessMonitor()])
    trainer = _trainer(tmp_path, [FairnessMonitor(num_probes=0), counter])
    trainer.callbacks.append(FairnessMonitor(num_probes=0))
    with pytest.raises(ValueError, match=r"names \[None, None\]"):
        trainer.fit(SmallCNN(), datamodule=dm)
    assert counter.steps == 0


# ------------------------------------------------------------------ 4: measured once
def test_the_same_weights_are_measured_once_and_logged_once_per_step(tmp_path):
    pl.seed_everything(0)
    monitor = FairnessMonitor(num_probes=2, every_n_epochs=1, max_batches=2)
    measured: list[str] = []
    inner = monitor._measure

    def counting(trainer, model, moment, event):
        measured.append(moment)
        return inner(trainer, model, moment, event)

    monitor._measure = counting
    logger = CaptureLogger(str(tmp_path))
    pruning = IterativePruning(0.5, schedule="linear", num_rounds=2, start=1)
    trainer = _trainer(tmp_path, [pruning, monitor], max_epochs=3, logger=logger)
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=200, batch_size=40))

    history = monitor.history
    assert [r["moment"] for r in history] == [
        "periodic", "dense", "after_round",
        "periodic", "before_round", "after_round",
        "periodic", "end",
    ]  # fmt: skip
    # the end-of-epoch measurement serves the next round's "dense"/"before_round" and "end"
    assert measured == ["periodic", "after_round"] * 2 + ["periodic"]
    for reused, source in ((1, 0), (4, 3), (7, 6)):
        for key in ("global_step", "accuracy", "group_accuracy", "loss", "grad_norm"):
            assert history[reused][key] == history[source][key], key
        assert history[reused]["hessian_trace"] == history[source]["hessian_trace"]
        assert history[reused]["epoch"] == history[source]["epoch"] + 1  # the next epoch's
    dense = history[1]
    assert dense["alpha"] == pytest.approx(1.0)
    assert dense["excess_loss"] == [0.0] * 10  # its own reference
    assert history[0]["alpha"] is None  # before any dense reference
    assert history[4]["group_accuracy_dense"] == dense["group_accuracy"]
    assert history[7]["predicted_excess_loss"] is None  # only after_round records predict
    assert read_history(monitor.history_file) == history  # plain JSON values, NaN-free
    # loggers: one value per key and step; one "fairprune/accuracy" per step
    rows = [(s, m) for s, m in logger.rows if any("moment_code" in k for k in m)]
    _no_key_twice_per_step(rows)
    steps = [s for s, m in rows if "fairprune/accuracy" in m]
    assert len(steps) == len(set(steps)) == 3  # one per epoch: the periodic measurements


# ------------------------------------------------------------------ 5: history files
def test_runs_without_logger_never_overwrite_and_a_resume_continues_its_file(tmp_path):
    dm = DigitsDataModule(n=150, batch_size=50, shuffle=False)

    def fit(tag: str, max_epochs: int, ckpt_path: Path | None = None) -> FairnessMonitor:
        pl.seed_everything(0)
        monitor = FairnessMonitor(num_probes=0, max_batches=1, gradient_norms=False)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt" / tag, save_last=True)
        pruning = IterativePruning(0.5, schedule="linear", num_rounds=2, start=1)
        callbacks = [pruning, monitor, checkpoint]
        trainer = _trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(SmallCNN(), datamodule=dm, ckpt_path=ckpt_path)
        return monitor

    first = fit("a", 2)  # logger=False, default_root_dir=tmp_path: the Quickstart's setting
    runs = tmp_path / "fairprune"
    assert first.history_file == runs / "version_0" / HISTORY_FILENAME
    text = first.history_file.read_text()
    second = fit("b", 2)
    assert second.history_file == runs / "version_1" / HISTORY_FILENAME
    assert first.history_file.read_text() == text  # the first run's history is untouched
    second_text = second.history_file.read_text()

    resumed = fit("a2", 3, ckpt_path=tmp_path / "ckpt" / "a" / "last.ckpt")
    assert resumed.history_file == first.history_file  # the same run goes on in its file
    assert read_history(resumed.history_file) == resumed.history
    saved = len(resumed.history) - len(first.history)  # "end" was written after last.ckpt
    assert resumed.history[: len(first.history) - 1] == first.history[:-1]
    assert saved > 0
    assert second.history_file.read_text() == second_text
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]


# ------------------------------------------------------------------ 11: metrics= errors
def _binary_with_groups(n: int = 240):
    """Digits >= 5 vs < 5; groups: even digits, odd digits, and the nines (all positive)."""
    x, digit = digits_tensors(n=n)
    y = (digit >= 5).long()
    g = torch.where(digit == 9, 2, digit % 2)
    return x, y, g


class SklearnAUROC:
    """A user's AUROC (torchmetrics' interface) that raises with one class, as sklearn < 1.6."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.preds: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []

    def clone(self) -> SklearnAUROC:
        return SklearnAUROC()

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds)
        self.target.append(target)

    def compute(self) -> torch.Tensor:
        from sklearn.metrics import roc_auc_score

        target, preds = torch.cat(self.target), torch.cat(self.preds)
        if len(torch.unique(target)) < 2:
            raise ValueError("Only one class present in y_true. ROC AUC score is not defined.")
        return torch.tensor(roc_auc_score(target.numpy(), preds.numpy()))


def test_a_metric_failing_on_a_group_is_named_at_fit_start(tmp_path):
    x, y, g = _binary_with_groups()
    train = DataLoader(TensorDataset(x[:160], y[:160]), batch_size=40)
    val = DataLoader(TensorDataset(x[160:], y[160:], g[160:]), batch_size=40)
    monitor = FairnessMonitor(
        num_groups=3,
        group_names=["even", "odd", "nines"],
        metrics={"auroc": SklearnAUROC()},
        metrics_input="probs",
        num_probes=0,
    )
    counter = StepCounter()
    pruning = IterativePruning(0.5, start=1)  # the first measurement would follow training
    trainer = _trainer(tmp_path, [pruning, monitor, counter])
    with pytest.raises(
        ValueError,
        match=r"`metrics\['auroc'\]`.*raised on group 'nines' \(id 2\): ValueError: Only one class",
    ):
        trainer.fit(SmallCNN(num_classes=2), train, val)
    assert counter.steps == 0  # before any training step
    # the same metric on groups that all hold both classes works, and equals sklearn per group
    from sklearn.metrics import roc_auc_score

    two = torch.where(g == 2, 1, g)
    fine = FairnessMonitor(
        [(x, y, two)], num_groups=2, metrics={"auroc": SklearnAUROC()}, metrics_input="probs"
    )
    model = SmallCNN(num_classes=2)
    fine.check_metrics(None, model)
    record = fine.measure(pl.Trainer(**quiet_trainer_kwargs(tmp_path)), model, "dense")
    with torch.no_grad():
        probs = model.eval()(x).softmax(1)[:, 1]
    for group in (0, 1):
        sel = two == group
        expected = roc_auc_score(y[sel].numpy(), probs[sel].numpy())
        assert record["metrics"]["auroc"][group] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------ 12: at the target sparsity
class KeySpy(Callback):
    """Reads the keys at each validation end, as ModelCheckpoint does (it runs after)."""

    def __init__(self, pruning: IterativePruning) -> None:
        self.pruning = pruning
        self.rows: list[tuple[int, float, float, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.rows.append(
            (
                trainer.current_epoch,
                float(metrics["fairprune/at_target/worst_group_accuracy"]),
                float(metrics["fairprune/worst_group_accuracy"]),
                self.pruning.current_sparsity,
            )
        )


def test_model_checkpoint_on_the_at_target_key_keeps_a_model_at_the_target_sparsity(tmp_path):
    pl.seed_everything(0)
    pruning = IterativePruning(0.8, schedule="linear", num_rounds=2, start=1)
    monitor = FairnessMonitor(num_probes=0, gradient_norms=False)  # the defaults otherwise
    spy = KeySpy(pruning)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="fairprune/at_target/worst_group_accuracy",  # README's example
        mode="max",
        save_top_k=1,
    )
    trainer = _trainer(
        tmp_path,
        [pruning, monitor, spy, checkpoint],
        max_epochs=4,
        limit_train_batches=4,
        enable_checkpointing=True,
    )
    trainer.fit(SmallCNN(lr=0.02, optimizer="adam"), datamodule=DigitsDataModule(n=300))
    assert [row[0] for row in spy.rows] == [0, 1, 2, 3]
    for epoch, at_target, plain, sparsity in spy.rows:
        if epoch < 2:  # before the last round (epoch 2): NaN, which ModelCheckpoint ranks last
            assert math.isnan(at_target)
            assert not math.isnan(plain)
        else:
            assert at_target == plain
            assert sparsity == pytest.approx(0.8, abs=1e-3)
    best = max(row[1] for row in spy.rows if row[0] >= 2)
    assert checkpoint.best_model_score.item() == pytest.approx(best)
    state = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    zeros = sum(int((state[n] == 0).sum()) for n in PRUNED)
    total = sum(state[n].numel() for n in PRUNED)
    assert zeros / total == pytest.approx(0.8, abs=1e-3)  # a model at the target sparsity
    # EarlyStopping stops on NaN (check_finite): said at fit start, with the key to use
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_fairprune.logging import measure_at_validation

    stopper = EarlyStopping(monitor="fairprune/at_target/worst_group_accuracy", mode="max")
    with pytest.warns(UserWarning, match=r"monitor 'fairprune/worst_group_accuracy'"):
        measure_at_validation(pl.Trainer(callbacks=[stopper], logger=False), "fairprune/", "auto")


# ------------------------------------------------------------------ 14: parity for classes
def test_parity_gaps_are_not_reported_for_class_groups_and_why_is_said_once(
    tmp_path, lightning_caplog
):
    caplog = lightning_caplog
    x, y, g = _binary_with_groups()
    g = torch.where(g == 2, 1, g)  # two protected groups: even and odd digits
    train = DataLoader(TensorDataset(x[:160], y[:160], g[:160]), batch_size=40)
    val = DataLoader(TensorDataset(x[160:], y[160:], g[160:]), batch_size=40)
    quick = {"num_probes": 0, "every_n_epochs": 1}
    classes = FairnessMonitor(
        group_key=None, group_fn=lambda b: (b[0], b[1], None), name="cls", **quick
    )
    attr = FairnessMonitor(num_groups=2, name="attr", **quick)
    logger = CaptureLogger(str(tmp_path))
    pruning = IterativePruning(0.5, start=1)
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [pruning, classes, attr], logger=logger).fit(
            SmallCNN(num_classes=2), train, val
        )
    logged = {k for _, metrics in logger.rows for k in metrics}
    for name in PARITY_SUMMARIES:
        assert not any(k.startswith("fairprune-cls/") and name in k for k in logged), name
        if any(r["fairness"][name] is not None for r in attr.history):  # defined: logged
            assert f"fairprune-attr/{name}" in logged, name
    assert "fairprune-attr/demographic_parity_difference" in logged
    assert all(set(r["fairness"]) == {"worst_group_accuracy", "accuracy_difference"}
               for r in classes.history)  # fmt: skip
    assert all(r["tpr"] is not None for r in classes.history)  # the rates themselves stay
    said = [r for r in caplog.records if "the groups are the classes" in r.getMessage()]
    assert len(said) == 1
    assert len(classes.history) > 1
    assert "demographic_parity_difference" in said[0].getMessage()


# ------------------------------------------------------------------ 16: keys from the start
def test_model_checkpoint_works_with_the_default_monitor_from_the_first_validation(
    tmp_path, lightning_caplog
):
    caplog = lightning_caplog
    pl.seed_everything(0)
    monitor = FairnessMonitor(num_probes=0, gradient_norms=False)  # every_n_epochs="auto"
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="fairprune/worst_group_accuracy", mode="max"
    )
    pruning = IterativePruning(0.5, num_rounds=1, start=2)  # no measurement before epoch 2
    trainer = _trainer(
        tmp_path,
        [pruning, monitor, checkpoint],
        max_epochs=3,
        limit_train_batches=4,
        val_check_interval=0.5,  # mid-epoch validations too: ModelCheckpoint reads at each
        enable_checkpointing=True,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=300, batch_size=32))
    periodic = [r for r in monitor.history if r["moment"] == "periodic"]
    assert [r["epoch"] for r in periodic] == [0, 0, 1, 1, 2, 2]  # every validation end
    best = max(r["fairness"]["worst_group_accuracy"] for r in periodic)
    assert checkpoint.best_model_score.item() == pytest.approx(best, abs=1e-6)
    assert any("measuring at the end of every validation" in r.getMessage() for r in caplog.records)
    # with every_n_epochs=None the monitor says at fit start which setting makes the key fresh
    quiet = FairnessMonitor(num_probes=0, gradient_norms=False, every_n_epochs=None)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "c2", monitor="fairprune/worst_group_accuracy")
    trainer = _trainer(
        tmp_path,
        [IterativePruning(0.5, start=0), quiet, checkpoint],
        max_epochs=1,
        enable_checkpointing=True,
    )
    with pytest.warns(UserWarning, match=r"every_n_epochs=None.*set every_n_epochs='auto' or 1"):
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=100, batch_size=50))
    assert "periodic" not in [r["moment"] for r in quiet.history]


def test_without_validation_the_keys_are_fresh_where_model_checkpoint_reads_them(tmp_path):
    x, y = digits_tensors(n=60)
    monitor = FairnessMonitor(DataLoader(TensorDataset(x, y), batch_size=30), num_probes=0)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="fairprune/worst_group_accuracy", mode="max"
    )
    trainer = _trainer(
        tmp_path, [monitor, checkpoint], limit_val_batches=0, enable_checkpointing=True
    )
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=100, batch_size=50))
    periodic = [r for r in monitor.history if r["moment"] == "periodic"]
    assert [r["epoch"] for r in periodic] == [0, 1]  # at each epoch end (no validation)
    best = max(r["fairness"]["worst_group_accuracy"] for r in periodic)
    assert checkpoint.best_model_score.item() == pytest.approx(best, abs=1e-6)


# ------------------------------------------------------------------ 17: progress
def test_long_measurement_passes_show_progress_only_with_a_progress_bar(tmp_path, capsys):
    x, y = digits_tensors(n=160)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 10 batches per pass

    def fit(progress_bar: bool) -> str:
        from torchmetrics.classification import MulticlassAccuracy

        monitor = FairnessMonitor(
            loader,
            num_probes=1,
            every_n_epochs=1,
            measure_end=False,
            metrics={"acc": MulticlassAccuracy(num_classes=10)},
        )
        trainer = _trainer(
            tmp_path, [monitor], max_epochs=1, limit_val_batches=0, enable_progress_bar=progress_bar
        )
        capsys.readouterr()
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=100, batch_size=50))
        return capsys.readouterr().out

    shown = fit(True)
    assert "FairnessMonitor: periodic" in shown
    assert "/10 [" in shown
    assert "pass=2" in shown
    assert "FairnessMonitor" not in fit(False)
