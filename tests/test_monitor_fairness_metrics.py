"""The monitor's fairness metrics as the field defines them, visible to Lightning.

Every per-group number is compared with fairlearn's `MetricFrame` on the same predictions;
`ModelCheckpoint` and `EarlyStopping` act on a fairness metric in real fits; mistakes in the
fairness data surface at fit start, before any training step.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _models import digits_tensors, quiet_trainer_kwargs
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from sklearn.metrics import accuracy_score, recall_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune import FairnessMonitor, IterativePruning
from lightning_fairprune.history import read_history


class BinaryDigits(pl.LightningModule):
    """Digit >= 5 or not, from 8x8 digits; batches (x, y) or (x, y, g) or dicts."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))
        self.lr = lr
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else (batch[0], batch[1])
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _binary_data(n: int = 300, seed: int = 0):
    x, digit = digits_tensors(n=n, seed=seed)
    y = (digit >= 5).long()
    ink = x.flatten(1).mean(1)
    thick = (ink > ink.median()).long()  # attribute 1: 2 values
    region = (digit % 3).long()  # attribute 2: 3 values (a stand-in for a protected attribute)
    return x, y, thick, region


def _predictions(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).argmax(1).numpy()


# ------------------------------------------------------------------ fairlearn agreement
def test_binary_group_metrics_equal_fairlearn_metricframe(tmp_path):
    torch.manual_seed(0)
    x, y, _thick, region = _binary_data()
    # one group absent (id 3), one group with a single sample (id 2)
    groups = region.clone()
    groups[groups == 2] = 0
    groups[5] = 2
    model = BinaryDigits()
    # a few steps of training so that predictions are not constant
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    monitor = FairnessMonitor([(x, y, groups)], num_groups=4, num_probes=0, log=False)
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # absent and small groups are warned
        record = monitor.measure(trainer, model, "dense")
    pred = _predictions(model, x)
    yn, gn = y.numpy(), groups.numpy()
    frame = MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "selection_rate": selection_rate,
        },
        y_true=yn,
        y_pred=pred,
        sensitive_features=gn,
    )
    by = frame.by_group
    for g in range(4):
        if g not in by.index:  # absent group: None, not 0
            for key in ("group_accuracy", "tpr", "fpr", "selection_rate"):
                assert record[key][g] is None, key
            continue
        assert record["group_accuracy"][g] == pytest.approx(by.loc[g, "accuracy"], abs=1e-12)
        assert record["selection_rate"][g] == pytest.approx(by.loc[g, "selection_rate"])
        positives, negatives = (
            int(((gn == g) & (yn == 1)).sum()),
            int(((gn == g) & (yn == 0)).sum()),
        )
        if positives:
            assert record["tpr"][g] == pytest.approx(by.loc[g, "tpr"], abs=1e-12)
        else:  # undefined (fairlearn reports 0 here): None in the record
            assert record["tpr"][g] is None
        if negatives:
            assert record["fpr"][g] == pytest.approx(by.loc[g, "fpr"], abs=1e-12)
        else:
            assert record["fpr"][g] is None
    # summaries over the groups where every rate is defined equal fairlearn's on those groups
    defined = [g for g in by.index if record["tpr"][g] is not None and record["fpr"][g] is not None]
    keep = np.isin(gn, defined)
    fairness = record["fairness"]
    assert fairness["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(yn, pred, sensitive_features=gn), abs=1e-12
    )
    assert fairness["demographic_parity_ratio"] == pytest.approx(
        demographic_parity_ratio(yn, pred, sensitive_features=gn), abs=1e-12
    )
    assert fairness["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(yn[keep], pred[keep], sensitive_features=gn[keep]), abs=1e-12
    )
    assert fairness["worst_group_accuracy"] == pytest.approx(by["accuracy"].min(), abs=1e-12)
    # the groups are not the classes: no "recall" of a group
    assert record["recall"] is None
    # Wilson intervals bracket each rate
    for g in by.index:
        lo, hi = record["group_accuracy_ci"][g]
        assert lo <= record["group_accuracy"][g] <= hi
    assert 2 in record["small_groups"]


def test_class_groups_keep_recall_and_equal_sklearn(tmp_path):
    x, digit = digits_tensors(n=200)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    monitor = FairnessMonitor([(x, digit)], num_probes=0, log=False)
    record = monitor.measure(pl.Trainer(**quiet_trainer_kwargs(tmp_path)), model, "dense")
    pred = _predictions(model, x)
    expected = recall_score(digit.numpy(), pred, labels=list(range(10)), average=None)
    np.testing.assert_allclose(record["recall"], expected, atol=1e-12)
    np.testing.assert_allclose(record["group_accuracy"], expected, atol=1e-12)
    assert record["groups_are_classes"] is True
    assert record["tpr"] is None  # multiclass: no binary rates


# ------------------------------------------------------------------ names and intersections
def test_intersectional_named_groups_from_dict_batches(tmp_path):
    x, y, thick, region = _binary_data(n=240)
    batches = [
        {
            "x": x[i : i + 60],
            "y": y[i : i + 60],
            "ink": thick[i : i + 60],
            "reg": region[i : i + 60],
        }
        for i in range(0, 240, 60)
    ]
    names = {"ink": ["thin", "thick"], "reg": ["r0", "r1", "r2"]}
    monitor = FairnessMonitor(
        batches,
        num_groups=[2, 3],
        group_key=["ink", "reg"],
        group_names=names,
        num_probes=0,
        log=False,
    )
    model = BinaryDigits()
    record = monitor.measure(pl.Trainer(**quiet_trainer_kwargs(tmp_path)), model, "dense")
    expected_names = [
        f"ink={a} & reg={b}" for a, b in itertools.product(names["ink"], names["reg"])
    ]
    assert record["group_names"] == expected_names
    pred = _predictions(model, x)
    for gid, (a, b) in enumerate(itertools.product(range(2), range(3))):
        sel = ((thick == a) & (region == b)).numpy()
        assert record["support"][gid] == int(sel.sum())
        if sel.any():
            acc = accuracy_score(y.numpy()[sel], pred[sel])
            assert record["group_accuracy"][gid] == pytest.approx(acc, abs=1e-12)
    from lightning_fairprune.records import record_scalars

    scalars = record_scalars(record)
    assert "fairprune/group_accuracy/ink-thick_reg-r2" in scalars
    assert "fairprune/group_accuracy_lower/ink-thin_reg-r0" in scalars


# ------------------------------------------------------------------ Lightning integration
def _binary_datamodule(batch_size: int = 40):
    x, y, thick, _ = _binary_data(n=300)
    train = TensorDataset(x[:200], y[:200], thick[:200])
    val = TensorDataset(x[200:], y[200:], thick[200:])

    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(train, batch_size=batch_size)

        def val_dataloader(self):
            return DataLoader(val, batch_size=batch_size)

    return DM(), val


def test_model_checkpoint_on_worst_group_accuracy_picks_the_best_measured_epoch(tmp_path):
    torch.manual_seed(0)
    dm, _ = _binary_datamodule()
    monitor = FairnessMonitor(
        num_groups=2,
        group_names=["thin", "thick"],
        every_n_epochs=1,
        num_probes=0,
        gradient_norms=False,
    )
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="fairprune/worst_group_accuracy",
        mode="max",
        save_top_k=1,
    )
    pruning = IterativePruning(0.5, num_rounds=2, start=1, prune_classifier=True)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    trainer = pl.Trainer(max_epochs=4, callbacks=[pruning, monitor, checkpoint], **kwargs)
    trainer.fit(BinaryDigits(lr=0.05), datamodule=dm)
    periodic = [r for r in monitor.history if r["moment"] == "periodic"]
    assert [r["epoch"] for r in periodic] == [0, 1, 2, 3]
    best = max(periodic, key=lambda r: r["fairness"]["worst_group_accuracy"])
    # the checkpoint holds the epoch whose measurement (taken right after its validation) was
    # the best: the metric reached callback_metrics before ModelCheckpoint acted
    assert checkpoint.best_model_score.item() == pytest.approx(
        best["fairness"]["worst_group_accuracy"], abs=1e-6
    )
    assert f"epoch={best['epoch']}" in checkpoint.best_model_path
    assert "fairprune/worst_group_accuracy" in trainer.callback_metrics
    assert "fairprune/group_accuracy/thick" in trainer.callback_metrics


def test_early_stopping_on_a_fairness_metric(tmp_path):
    torch.manual_seed(0)
    dm, _ = _binary_datamodule()
    monitor = FairnessMonitor(num_groups=2, every_n_epochs=1, num_probes=0, gradient_norms=False)
    # a worst-group accuracy that must improve by 1.0 per epoch stops after `patience` epochs
    stopper = EarlyStopping(
        monitor="fairprune/worst_group_accuracy", mode="max", patience=1, min_delta=1.0
    )
    trainer = pl.Trainer(
        max_epochs=10, callbacks=[monitor, stopper], **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(BinaryDigits(), datamodule=dm)
    assert trainer.current_epoch == 2  # epochs 0 and 1 ran, no improvement of 1.0: stopped
    assert stopper.stopped_epoch == 1


def test_fairness_data_mistakes_surface_at_fit_start(tmp_path):
    dm, val = _binary_datamodule()
    x, y, g = val.tensors
    cases = [
        (FairnessMonitor([(x, y, g)], num_probes=0), "`num_groups` to be given"),
        (FairnessMonitor([(x, y, g.float())], num_groups=2, num_probes=0), "integer tensor"),
        (FairnessMonitor([(x, y, g + 1)], num_groups=2, num_probes=0), r"in \[0, 2\)"),
        # a protected attribute promised, but the batches have no group column
        (FairnessMonitor([(x, y)], num_groups=5, num_probes=0), "no group column"),
    ]
    for monitor, match in cases:
        model = BinaryDigits()
        trainer = pl.Trainer(max_epochs=3, callbacks=[monitor], **quiet_trainer_kwargs(tmp_path))
        with pytest.raises(ValueError, match=match):
            trainer.fit(model, datamodule=dm)
        assert model.steps == 0, match  # before any training step


def test_torchmetrics_per_group_and_small_group_warning(tmp_path):
    from torchmetrics.classification import BinaryF1Score

    x, y, _thick, region = _binary_data(n=200)
    groups = region.clone()
    groups[:3] = 3  # a 3-sample group
    model = BinaryDigits()
    monitor = FairnessMonitor(
        [(x, y, groups)], num_groups=4, num_probes=2, log=False, metrics={"f1": BinaryF1Score()}
    )
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match=r"fewer than 30 samples \(\[3\]\)"):
        record = monitor.measure(trainer, model, "dense")
    pred = _predictions(model, x)
    from sklearn.metrics import f1_score

    for g in range(4):
        sel = (groups == g).numpy()
        expected = f1_score(y.numpy()[sel], pred[sel], zero_division=0.0)
        assert record["metrics"]["f1"][g] == pytest.approx(expected, abs=1e-6)
    from lightning_fairprune.records import record_scalars

    scalars = record_scalars(record)
    assert scalars["fairprune/f1/g3"] == pytest.approx(record["metrics"]["f1"][3])
    # the Hutchinson trace's standard error is logged next to the trace
    assert scalars["fairprune/hessian_trace_se/g0"] == record["hessian_trace_se"][0]
    assert not math.isnan(scalars["fairprune/hessian_trace_se/g0"])


def test_wandb_only_runs_keep_their_own_history(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    for k in range(2):
        torch.manual_seed(k)
        dm, _ = _binary_datamodule()
        monitor = FairnessMonitor(num_groups=2, num_probes=0, gradient_norms=False)
        logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fairprune-test")
        kwargs = {**quiet_trainer_kwargs(tmp_path), "logger": logger}
        trainer = pl.Trainer(max_epochs=1, callbacks=[monitor], **kwargs)
        trainer.fit(BinaryDigits(), datamodule=dm)
        logger.experiment.finish()
        assert monitor.history_file.parent.name == logger.version
    files = sorted(tmp_path.rglob("fairprune_history*.jsonl"))
    assert len(files) == 2  # before: both runs wrote <save_dir>/fairprune_history.jsonl
    assert all(len(read_history(f)) == 1 for f in files)


def test_each_callback_logs_its_settings_to_every_logger(tmp_path):
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    from lightning_fairprune import GroupEqualizer

    logger = CSVLogger(str(tmp_path), name="csv")
    pruning = IterativePruning(0.6, schedule="cubic", num_rounds=2, criterion="magnitude")
    monitor = FairnessMonitor(num_groups=2, num_probes=0, gradient_norms=False, name="val")
    kwargs = {**quiet_trainer_kwargs(tmp_path), "logger": logger}
    dm, _ = _binary_datamodule()
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning, monitor], **kwargs)
    trainer.fit(BinaryDigits(), datamodule=dm)
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["fairprune/pruning/schedule"] == "cubic"
    assert hparams["fairprune/pruning/final_sparsity"] == 0.6
    assert hparams["fairprune/pruning/num_rounds"] == 2
    assert hparams["fairprune/monitor-val/num_probes"] == 0
    assert GroupEqualizer(dual_lr=0.02).settings()["dual_lr"] == 0.02


def test_the_number_of_classes_comes_from_the_measurement_pass(tmp_path):
    x, y, thick, _ = _binary_data(n=120)
    calls = []
    model = BinaryDigits()
    model.net.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    batches = [(x[:60], y[:60], thick[:60]), (x[60:], y[60:], thick[60:])]
    monitor = FairnessMonitor(batches, num_groups=2, num_probes=0, gradient_norms=False, log=False)
    record = monitor.measure(pl.Trainer(**quiet_trainer_kwargs(tmp_path)), model, "dense")
    assert calls == [60, 60]  # one pass over the data, no extra forward for the class count
    assert monitor.groups.num_classes == 2
    assert record["tpr"] is not None  # binary rates: the class count was known in time
