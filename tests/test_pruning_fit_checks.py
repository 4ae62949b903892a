"""IterativePruning in real fits: what must be refused before the first optimizer step, what a fit
that ends early must say, and what the defaults prune (issue 18 items 2, 3, 9, 10, 13)."""

from __future__ import annotations

import copy
import signal

import lightning.pytorch as pl
import pytest
import torch
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune import FairnessMonitor, IterativePruning
from lightning_fairprune.fairness_data import FairnessData

NAMES = ["features.2.weight", "fc.weight"]


class StepSpy(Callback):
    """Records the global step of every optimizer step taken (to show none was taken)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    kwargs = {"max_epochs": 2, "limit_train_batches": 2, **kwargs}
    return pl.Trainer(callbacks=callbacks, **kwargs, **quiet_trainer_kwargs(tmp_path))


def _dm(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(**{"n": 200, "batch_size": 40, **kwargs})


def _group_loader(bad_last: int | None = None, nan_group: int | None = None, batches: int = 4):
    dm = _dm(with_groups=True)
    dm.setup("fit")
    x, y, g = (t.clone() for t in dm.val_set.tensors)
    if bad_last is not None:
        g[-1] = bad_last
    if nan_group is not None:
        row = int((g == nan_group).nonzero()[-1])
        x[row, 0, 0, 0] = float("nan")
    return DataLoader(TensorDataset(x, y, g), batch_size=len(y) // batches)


# ------------------------------------------------------------------ item 2: unfinished schedules
def test_early_stopping_leaves_the_schedule_incomplete_with_a_warning_a_flag_and_a_way_to_finish(
    tmp_path,
):
    pl.seed_everything(0)
    pruning = IterativePruning(0.9, num_rounds=4)  # rounds at epochs 1..4 (default start)
    stop = EarlyStopping(monitor="val_acc", mode="max", patience=0, min_delta=1.0)
    model = SmallCNN()
    trainer = _trainer(tmp_path, [pruning, stop], max_epochs=8, limit_val_batches=1)
    with pytest.warns(UserWarning, match=r"ended after 1 of 4 pruning rounds, at sparsity") as rec:
        trainer.fit(model, datamodule=_dm())
    assert trainer.current_epoch == 2  # EarlyStopping ended the fit after epoch 1
    message = next(str(w.message) for w in rec if "pruning rounds" in str(w.message))
    assert f"{pruning.current_sparsity:.4g} of the target 0.9" in message
    assert "prune_now(trainer, model)" in message
    assert pruning.rounds_done == 1
    assert pruning.current_sparsity < 0.9
    assert pruning.schedule_complete is False
    for _ in range(3):  # the way to finish that the warning gives
        pruning.prune_now(trainer, model)
    assert pruning.schedule_complete is True
    params = pruning.pruned_parameters(model)
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert zeros == round(0.9 * sum(p.numel() for p in params.values()))


def test_max_steps_ending_before_the_last_round_warns_at_fit_end(tmp_path):
    pl.seed_everything(0)
    pruning = IterativePruning(0.8, num_rounds=3, interval="step", start=2, frequency=4)
    trainer = _trainer(tmp_path, [pruning], max_steps=7, limit_train_batches=4)
    with pytest.warns(UserWarning, match="ended after 2 of 3 pruning rounds"):
        trainer.fit(SmallCNN(), datamodule=_dm())
    assert not pruning.schedule_complete


def test_an_interrupted_fit_warns_that_the_schedule_did_not_complete(tmp_path):
    class Interrupt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                raise KeyboardInterrupt

    pl.seed_everything(0)
    pruning = IterativePruning(0.8, num_rounds=3, interval="step", start=2, frequency=4)
    trainer = _trainer(tmp_path, [pruning, Interrupt()], limit_train_batches=4)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with (
            pytest.warns(UserWarning, match="ended after 1 of 3 pruning rounds"),
            pytest.raises(SystemExit),  # Lightning's graceful shutdown after Ctrl+C
        ):
            trainer.fit(SmallCNN(), datamodule=_dm())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after an interrupt
    assert trainer.interrupted
    assert not pruning.schedule_complete


def test_a_completed_schedule_says_nothing_at_fit_end(tmp_path):
    pl.seed_everything(0)
    pruning = IterativePruning(0.5, num_rounds=2)
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _trainer(tmp_path, [pruning], max_epochs=3).fit(SmallCNN(), datamodule=_dm())
    assert pruning.schedule_complete
    assert not [w for w in rec if "pruning rounds" in str(w.message)]


# ------------------------------------------------------------------ item 3: the whole data, first
def test_monitor_refuses_a_bad_group_id_in_the_last_validation_batch_before_training(tmp_path):
    pl.seed_everything(0)
    spy = StepSpy()
    monitor = FairnessMonitor(_group_loader(bad_last=9), num_groups=4, num_probes=0)
    trainer = _trainer(tmp_path, [IterativePruning(0.5, start=1), monitor, spy], max_epochs=3)
    with pytest.raises(ValueError, match=r"fairness batch 3 \(offending ids: \[9\]\)"):
        trainer.fit(SmallCNN(), datamodule=_dm())
    assert spy.steps == []  # refused before the first optimizer step


def test_monitor_names_the_batch_and_the_group_of_nan_inputs(tmp_path):
    spy = StepSpy()
    monitor = FairnessMonitor(_group_loader(nan_group=1), num_groups=2, num_probes=0)
    trainer = _trainer(tmp_path, [IterativePruning(0.5, start=1), monitor, spy])
    with pytest.raises(ValueError, match=r"batch 3 has NaN .* of group\(s\) \[1\]"):
        trainer.fit(SmallCNN(), datamodule=_dm())
    assert spy.steps == []


def test_pruning_group_data_is_scanned_entirely_at_fit_start(tmp_path):
    spy = StepSpy()
    data = FairnessData(_group_loader(bad_last=9), num_groups=2)
    pruning = IterativePruning(
        0.5, criterion="fairprune", include_names=NAMES, group_data=data, start=1
    )
    with pytest.raises(ValueError, match=r"ids from 0 to 9 in fairness batch 3"):
        _trainer(tmp_path, [pruning, spy]).fit(SmallCNN(), datamodule=_dm())
    assert spy.steps == []


# ------------------------------------------------------------------ item 9: overlapping pruners
def test_two_pruning_callbacks_over_overlapping_parameters_are_refused_at_fit_start(tmp_path):
    spy = StepSpy()
    a = IterativePruning(0.5, name="convs", include_names=["features.*"], start=1)
    b = IterativePruning(0.5, include_names=["features.2.*", "fc.*"], start=1)
    with pytest.raises(
        ValueError,
        match=r"pruned parameters of IterativePruning\(name='convs'\) and IterativePruning at "
        r"trainer.callbacks\[1\] to be disjoint, but they share 1: \['features.2.weight'\]",
    ):
        _trainer(tmp_path, [a, b, spy]).fit(SmallCNN(), datamodule=_dm())
    assert spy.steps == []


def test_disjoint_pruning_callbacks_each_report_the_sparsity_the_model_has(tmp_path):
    a = IterativePruning(0.5, include_names=["features.*"])
    b = IterativePruning(0.7, include_names=["fc.*"])
    model = SmallCNN()
    _trainer(tmp_path, [a, b]).fit(model, datamodule=_dm())
    for pruning in (a, b):
        params = pruning.pruned_parameters(model)
        zeros = sum(int((p == 0).sum()) for p in params.values())
        assert zeros / sum(p.numel() for p in params.values()) == pruning.current_sparsity


# ------------------------------------------------------------------ item 10: errors before step 1
def test_criterion_option_typos_and_bad_values_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"options of 'fairprune' among .* but got \['betta'\]"):
        IterativePruning(0.5, criterion="fairprune", criterion_options={"betta": 0.5})
    with pytest.raises(ValueError, match="Expected `beta` to be a finite float >= 0"):
        IterativePruning(0.5, criterion="fairprune", criterion_options={"beta": -1.0})
    with pytest.raises(ValueError, match="Expected `iterations` to be an int >= 1"):
        IterativePruning(0.5, criterion="worst_group", criterion_options={"iterations": 0})


def test_a_group_id_option_beyond_the_groups_is_refused_at_fit_start(tmp_path):
    spy = StepSpy()
    data = FairnessData(_group_loader(), num_groups=2)
    pruning = IterativePruning(
        0.5,
        criterion="fairprune",
        include_names=NAMES,
        group_data=data,
        criterion_options={"worst": 3},
        start=1,
    )
    with pytest.raises(ValueError, match=r"`worst` to be a group id in \[0, 2\), but got 3"):
        _trainer(tmp_path, [pruning, spy]).fit(SmallCNN(), datamodule=_dm())
    assert spy.steps == []


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            lambda: FairnessData(
                [
                    {
                        "x": torch.zeros(4, 1, 8, 8),
                        "y": torch.tensor([0, 1, 2, 3]),
                        "grp": torch.tensor([0, 1, 0, 1]),
                    }
                ],
                num_groups=2,
            ),
            r"dict batch with keys \['group'\]",
        ),
        (
            lambda: FairnessData(
                DataLoader(TensorDataset(*_dm_val()[:2]), batch_size=20), num_groups=2
            ),
            r"carry group ids \(`num_groups`=2 was given, but the model has 10 classes\)",
        ),
    ],
    ids=["wrong_keys", "wrong_num_groups"],
)
def test_a_bad_group_data_is_refused_at_fit_start(tmp_path, data, match):
    spy = StepSpy()
    pruning = IterativePruning(
        0.5, criterion="fairgrape", include_names=NAMES, group_data=data(), start=1
    )
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, [pruning, spy]).fit(SmallCNN(), datamodule=_dm())
    assert spy.steps == []


def _dm_val():
    dm = _dm(with_groups=True)
    dm.setup("fit")
    return dm.val_set.tensors


class Regressor(SmallCNN):
    """One output per sample: a regression model."""

    def __init__(self) -> None:
        super().__init__(num_classes=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).squeeze(1), y.float())


def test_a_regression_model_with_a_fair_criterion_is_refused_at_fit_start(tmp_path):
    spy = StepSpy()
    pruning = IterativePruning(0.5, criterion="fairprune", include_names=NAMES, start=1)
    with pytest.raises(ValueError, match=r"class logits of shape \(N, C\) with C >= 2 .*\(40, 1\)"):
        _trainer(tmp_path, [pruning, spy], limit_val_batches=0).fit(Regressor(), datamodule=_dm())
    assert spy.steps == []


def test_training_batches_with_groups_and_no_group_data_are_refused_at_fit_start(tmp_path):
    spy = StepSpy()
    pruning = IterativePruning(0.5, criterion="worst_group", include_names=NAMES, start=1)
    with pytest.raises(ValueError, match=r"derives its group data from the training dataloader"):
        _trainer(tmp_path, [pruning, spy]).fit(SmallCNN(), datamodule=_dm(with_groups=True))
    assert spy.steps == []


class BNModel(SmallCNN):
    """SmallCNN with batch norm and dropout: buffers and RNG that a dry run could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.features.insert(1, nn.BatchNorm2d(8))
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = self.features(x).flatten(1)
        return self.classifier(self.drop(torch.relu(self.fc(h))))


def test_the_fit_start_dry_run_leaves_training_bitwise_unchanged(tmp_path):
    pl.seed_everything(0)
    init = BNModel()
    plain, checked = copy.deepcopy(init), copy.deepcopy(init)
    pl.seed_everything(1)
    _trainer(tmp_path, [], max_epochs=1).fit(plain, datamodule=_dm())
    data = FairnessData(_group_loader(), num_groups=2)
    pruning = IterativePruning(0.5, criterion="fairprune", include_names=NAMES, group_data=data)
    pl.seed_everything(1)
    _trainer(tmp_path, [pruning], max_epochs=1).fit(checked, datamodule=_dm())  # no round yet
    assert pruning.rounds_done == 0
    for (name, a), b in zip(plain.state_dict().items(), checked.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ item 13: prune a trained model
def test_the_default_start_prunes_after_one_epoch_of_training(tmp_path):
    epoch_plan = IterativePruning(0.5)
    step_plan = IterativePruning(0.5, interval="step", num_rounds=2, frequency=3, name="steps")
    model = SmallCNN()
    trainer = _trainer(tmp_path, [epoch_plan], limit_train_batches=3)
    trainer.fit(model, datamodule=_dm())
    assert epoch_plan.history[0]["epoch"] == 1
    assert epoch_plan.history[0]["global_step"] == 3
    trainer = _trainer(tmp_path, [step_plan], max_epochs=3, limit_train_batches=4)
    trainer.fit(SmallCNN(), datamodule=_dm())
    assert step_plan.plan.event_points == [4, 7]  # one epoch = 4 optimizer steps
    assert [h["global_step"] for h in step_plan.history] == [4, 7]


def test_a_round_before_any_training_step_warns_unless_the_model_is_pretrained(tmp_path):
    import warnings

    with pytest.warns(UserWarning, match="runs before any optimizer step of the fit"):
        _trainer(tmp_path, [IterativePruning(0.5, start=0)]).fit(SmallCNN(), datamodule=_dm())
    pretrained = IterativePruning(0.5, pretrained=True)
    assert pretrained.plan.start == 0
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _trainer(tmp_path, [pretrained]).fit(SmallCNN(), datamodule=_dm())
    assert pretrained.history[0]["global_step"] == 0
    assert not [w for w in rec if "before any optimizer step" in str(w.message)]


# ------------------------------------------------------------------ issue 21: accessor
def test_pruned_parameters_are_the_models_tensors_the_masks_apply_to(tmp_path):
    model = SmallCNN()
    pruning = IterativePruning(0.5, include_names=NAMES)
    _trainer(tmp_path, [pruning]).fit(model, datamodule=_dm())
    params = pruning.pruned_parameters(model)
    named = dict(model.named_parameters())
    assert list(params) == pruning.parameter_names == list(pruning.masks) == NAMES
    for name, p in params.items():
        assert p is named[name]
        assert torch.equal(p != 0, pruning.masks[name]) or bool(
            (p[~pruning.masks[name]] == 0).all()
        )
