"""Regression tests for the six bugs of the architecture issue (each failed on the old code)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_fairprune import FairnessMonitor, IterativePruning
from lightning_fairprune.history import read_history
from lightning_fairprune.pruning import global_masks
from lightning_fairprune.report import load_runs


# ------------------------------------------------------------------ bug 1: frozen / unused
class FrozenConvCNN(SmallCNN):
    """SmallCNN whose first conv is frozen (requires_grad=False) and not in the optimizer."""

    def __init__(self) -> None:
        super().__init__(lr=0.05, weight_decay=0.0)
        self.features[0].weight.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_gradient_criterion_scores_frozen_parameters_like_the_others(tmp_path):
    pl.seed_everything(0)
    model = FrozenConvCNN()
    reference_model = copy.deepcopy(model)
    dm = DigitsDataModule(n=300, batch_size=32, shuffle=False)
    names = ["features.0.weight", "features.2.weight", "fc.weight"]
    pruning = IterativePruning(0.5, criterion="gradient", include_names=names, start=0)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, callbacks=[pruning], **quiet_trainer_kwargs(tmp_path)
    )
    # the round runs at the start of epoch 0 on the first training batch: take it here too
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    # reference: the gradient of the same loss with the frozen weight made trainable
    ref = reference_model
    ref.features[0].weight.requires_grad_(True)
    nn.functional.cross_entropy(ref(x), y).backward()
    named = dict(ref.named_parameters())
    scores = {n: (named[n].detach() * named[n].grad).abs() for n in names}
    expected = global_masks(scores, 0.5)

    trainer.fit(model, datamodule=dm)

    for name in names:
        assert torch.equal(pruning.masks[name].cpu(), expected[name]), name
    frozen_sparsity = 1 - pruning.masks["features.0.weight"].float().mean().item()
    assert frozen_sparsity < 0.99  # the old code pruned the frozen conv completely
    assert model.features[0].weight.requires_grad is False  # restored after the pass


class UnusedLayerCNN(SmallCNN):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)  # selected (Linear), never called in training_step


def test_gradient_criterion_names_a_selected_parameter_that_gets_no_gradient(tmp_path):
    pl.seed_everything(0)
    pruning = IterativePruning(
        0.5,
        criterion="gradient",
        include_names=["fc.*", "unused.*"],
        prune_classifier=True,
        start=0,
    )
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, callbacks=[pruning], **quiet_trainer_kwargs(tmp_path)
    )
    with pytest.raises(RuntimeError, match=r"\['unused.weight'\] received none"):
        trainer.fit(UnusedLayerCNN(), datamodule=DigitsDataModule(n=200, batch_size=32))


# ------------------------------------------------------------------ bug 2: modes and buffers
class BatchNormCNN(SmallCNN):
    """A CNN with two BatchNorms: one the user froze in eval mode at train start."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.frozen_bn_modes: list[bool] = []

    def on_train_start(self) -> None:
        self.features[1].eval()  # the user freezes the first BatchNorm

    def training_step(self, batch, batch_idx):
        self.frozen_bn_modes.append(self.features[1].training)
        return super().training_step(batch, batch_idx)


class BufferProbe(Callback):
    """Buffers and module modes right before and right after every pruning round."""

    def __init__(self) -> None:
        self.before: list[dict] = []
        self.after: list[dict] = []

    @staticmethod
    def _state(pl_module):
        return {
            "buffers": {k: v.clone() for k, v in pl_module.named_buffers()},
            "modes": {k: m.training for k, m in pl_module.named_modules()},
        }

    def on_before_pruning_round(self, trainer, pl_module, event):
        self.before.append(self._state(pl_module))

    def on_pruning_round(self, trainer, pl_module, event):
        self.after.append(self._state(pl_module))


@pytest.mark.parametrize("criterion", ["gradient", "undecayed"])
def test_gradient_pass_leaves_module_modes_and_batchnorm_statistics_alone(tmp_path, criterion):
    pl.seed_everything(0)
    model = BatchNormCNN()
    probe = BufferProbe()
    pruning = IterativePruning(0.6, num_rounds=2, criterion=criterion, weight_decay=1e-4, start=0)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        callbacks=[pruning, probe],
        **quiet_trainer_kwargs(tmp_path),
    )
    trainer.fit(model, datamodule=DigitsDataModule(n=300, batch_size=32))
    assert len(probe.before) == len(probe.after) == 2
    for before, after in zip(probe.before, probe.after, strict=True):
        assert before["modes"] == after["modes"]
        for name, value in before["buffers"].items():
            assert torch.equal(value, after["buffers"][name]), name
    # the frozen BatchNorm stayed in eval mode at every training step (the old pass reset it)
    assert model.frozen_bn_modes
    assert not any(model.frozen_bn_modes)


# ------------------------------------------------------------------ bug 3: *-true precisions
class DigitsMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_true_precisions_work_with_gradient_criteria_and_the_monitor(tmp_path, precision):
    pl.seed_everything(0)
    model = DigitsMLP()
    dm = DigitsDataModule(n=200, batch_size=40)
    pruning = IterativePruning(0.5, criterion="gradient", prune_classifier=True, start=0)
    monitor = FairnessMonitor(num_probes=2, max_batches=1, log=False)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        precision=precision,
        callbacks=[pruning, monitor],
        **quiet_trainer_kwargs(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert pruning.current_sparsity == 0.5
    end = monitor.history[-1]
    assert end["moment"] == "end"
    # the end record's accuracy equals an independent evaluation on the same batch
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        acc = (model(x.to(dtype)).argmax(1) == y).sum().item() / len(y)
    assert end["accuracy"] == pytest.approx(acc, abs=1e-12)


# ------------------------------------------------------------------ bug 4: named monitors
def test_two_named_monitors_keep_separate_histories_and_the_report_separates_them(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(n=200, batch_size=40, with_groups=True)
    dm.setup("fit")
    loader = dm.val_dataloader()
    by_class = FairnessMonitor(
        loader,
        group_key=None,
        num_probes=0,
        name="classes",
        log=False,
        group_fn=lambda b: (b[0], b[1], None),
    )
    by_ink = FairnessMonitor(loader, num_groups=2, num_probes=0, name="ink", log=False)
    pruning = IterativePruning(0.5, num_rounds=2, start=0)
    kwargs = quiet_trainer_kwargs(tmp_path)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=2, callbacks=[pruning, by_class, by_ink], **kwargs
    )
    trainer.fit(SmallCNN(), datamodule=dm)
    assert by_class.history_file != by_ink.history_file
    for monitor in (by_class, by_ink):
        records = read_history(monitor.history_file)
        assert [r["moment"] for r in records] == [r["moment"] for r in monitor.history]
        assert records[0]["moment"] == "dense"
        assert {r["monitor"] for r in records} == {monitor.name}
    assert read_history(by_class.history_file)[0]["num_groups"] == 10
    assert read_history(by_ink.history_file)[0]["num_groups"] == 2
    runs, errors = load_runs([tmp_path])
    assert not errors
    assert sorted(run.name.split(" ")[-1] for run in runs) == ["[classes]", "[ink]"]


# ------------------------------------------------------------------ bug 5: resume, new target
def _fit_and_checkpoint(tmp_path, final):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    pruning = IterativePruning(final, num_rounds=3, start=0)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, callbacks=[pruning, ckpt], **kwargs)
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=200, batch_size=40))
    assert pruning.rounds_done == 2
    return tmp_path / "ckpt" / "last.ckpt", pruning


def test_resume_with_a_new_final_sparsity_continues_from_the_saved_round(tmp_path):
    path, first = _fit_and_checkpoint(tmp_path, 0.5)
    pruning = IterativePruning(0.8, num_rounds=3, start=0)
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        callbacks=[pruning],
        **quiet_trainer_kwargs(tmp_path / "b"),
    )
    with pytest.warns(UserWarning, match="written with final sparsity 0.5.*targets 0.8"):
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=200, batch_size=40), ckpt_path=path)
    # the two saved rounds are kept; only the third ran (at epoch 2), to the new target
    assert [h["round_index"] for h in pruning.history] == [0, 1, 2]
    assert pruning.history[:2] == first.history
    assert pruning.history[2]["epoch"] == 2
    assert pruning.current_sparsity == pytest.approx(0.8, abs=1e-4)


def test_resume_with_a_target_below_the_reached_sparsity_is_a_clear_error(tmp_path):
    path, _first = _fit_and_checkpoint(tmp_path, 0.5)
    pruning = IterativePruning(0.1, num_rounds=3, start=0)
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        callbacks=[pruning],
        **quiet_trainer_kwargs(tmp_path / "b"),
    )
    with pytest.raises(
        ValueError, match=r"`final_sparsity` to be at least the sparsity 0\.370039 already"
    ):
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=200, batch_size=40), ckpt_path=path)


# ------------------------------------------------------------------ bug 6: step schedule
def test_step_schedule_that_cannot_finish_within_max_epochs_warns(tmp_path):
    # 160 training samples / 40 = 4 optimizer steps per epoch, 2 epochs = 8 steps: rounds at
    # steps 0, 5 and 10 -> only 2 of 3 run
    pruning = IterativePruning(0.5, num_rounds=3, interval="step", frequency=5, start=0)
    trainer = pl.Trainer(max_epochs=2, callbacks=[pruning], **quiet_trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match=r"step 10, but the run ends after 8 steps.*2 of 3"):
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=200, batch_size=40))
    assert pruning.rounds_done == 2


def test_gradual_schedule_without_num_rounds_spreads_over_max_epochs(tmp_path):
    pruning = IterativePruning(0.6, schedule="cubic", start=0)
    assert pruning.plan.num_rounds is None
    trainer = pl.Trainer(
        max_epochs=4, limit_train_batches=1, callbacks=[pruning], **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=200, batch_size=40))
    # ceil(0.75 * 4) - 1 = 2: rounds at epochs 0, 1, 2, epoch 3 is left for fine-tuning
    assert pruning.plan.event_points == [0, 1, 2]
    assert [h["epoch"] for h in pruning.history] == [0, 1, 2]
    assert pruning.current_sparsity == pytest.approx(0.6, abs=1e-4)
