"""The fairness-aware criteria inside `IterativePruning` (real fits) against the core."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune import IterativePruning
from lightning_fairprune.diagnostics import group_statistics
from lightning_fairprune.fairness_data import FairnessData
from lightning_fairprune.pruning.fair_criteria import fair_masks

NAMES = ["features.2.weight", "fc.weight"]


class PreRound(Callback):
    """Keeps a copy of the model right before each round, and its buffers/modes."""

    def __init__(self) -> None:
        self.models: list[torch.nn.Module] = []
        self.after: list[dict] = []

    def on_before_pruning_round(self, trainer, pl_module, event):
        self.models.append(copy.deepcopy(pl_module))

    def on_pruning_round(self, trainer, pl_module, event):
        self.after.append({k: v.clone() for k, v in pl_module.named_buffers()})


@pytest.mark.parametrize(
    ("criterion", "options"),
    [("fairgrape", {}), ("fairprune", {"beta": 0.5}), ("worst_group", {"iterations": 20})],
)
def test_fair_criteria_in_a_fit_equal_the_core_on_the_same_batches(tmp_path, criterion, options):
    pl.seed_everything(0)
    dm = DigitsDataModule(n=300, batch_size=50, with_groups=True)
    dm.setup("fit")
    x, y, g = dm.val_set.tensors
    loader = DataLoader(TensorDataset(x, y, g), batch_size=30)
    data = FairnessData(loader, num_groups=2)
    pruning = IterativePruning(
        0.7,
        num_rounds=2,
        start=1,
        criterion=criterion,
        include_names=NAMES,
        group_data=data,
        criterion_options=options,
    )
    spy = PreRound()
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        callbacks=[pruning, spy],
        **quiet_trainer_kwargs(tmp_path),
    )
    model = SmallCNN()
    trainer.fit(model, datamodule=dm)
    assert pruning.rounds_done == 2
    assert pruning.current_sparsity == pytest.approx(0.7, abs=1e-4)
    # the last round's masks equal the core's on the pre-round model and the same batches
    pre = spy.models[1]
    named = dict(pre.named_parameters())
    params = {n: named[n] for n in NAMES}
    curvature = "none" if criterion == "fairgrape" else "fisher"
    stats = group_statistics(pre, list(loader), 2, params=params, curvature=curvature, seed=1)
    pre0 = spy.models[0]
    named0 = dict(pre0.named_parameters())
    stats0 = group_statistics(
        pre0, list(loader), 2, params={n: named0[n] for n in NAMES}, curvature=curvature, seed=0
    )
    first_masks = fair_masks(
        criterion,
        {n: named0[n] for n in NAMES},
        stats0,
        pruning.history[0]["target_sparsity"],
        **options,
    )
    expected = fair_masks(criterion, params, stats, 0.7, current_masks=first_masks, **options)
    for name in NAMES:
        assert torch.equal(pruning.masks[name].cpu(), expected[name]), name
    # the statistics pass left the buffers alone
    for name, value in spy.models[1].named_buffers():
        assert torch.equal(value, spy.after[1][name]), name


def test_fair_criterion_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match="only with a fairness-aware criterion"):
        IterativePruning(0.5, curvature="fisher")
    with pytest.raises(ValueError, match="`curvature` 'fisher' or 'hutchinson'"):
        IterativePruning(0.5, criterion="worst_group", curvature="none")
    with pytest.raises(TypeError, match=r"`group_data` to be a lightning_fairprune\.FairnessData"):
        IterativePruning(0.5, criterion="fairgrape", group_data=[1, 2])
    with pytest.raises(ValueError, match=r"`criterion` to be one of \("):
        IterativePruning(0.5, criterion="fair")


def test_default_group_data_is_the_whole_training_loader_with_class_groups(tmp_path):
    pl.seed_everything(0)
    pruning = IterativePruning(0.5, criterion="fairprune", include_names=NAMES)
    spy = PreRound()
    dm = DigitsDataModule(n=200, batch_size=40, shuffle=False)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        callbacks=[pruning, spy],
        **quiet_trainer_kwargs(tmp_path),
    )
    trainer.fit(SmallCNN(), datamodule=dm)
    assert pruning.current_sparsity == pytest.approx(0.5, abs=1e-4)
    # the masks equal the core's on every batch of the training loader (4 of 40: 160 samples,
    # although limit_train_batches=2 trains on 2), not on `gradient_batches`=1 of them
    pre = spy.models[0]
    named = dict(pre.named_parameters())
    params = {n: named[n] for n in NAMES}
    batches = list(dm.train_dataloader())
    stats = group_statistics(pre, batches, 10, params=params, curvature="fisher", seed=0)
    assert float(stats.counts.sum()) == 160
    expected = fair_masks("fairprune", params, stats, 0.5)
    for name in NAMES:
        assert torch.equal(pruning.masks[name].cpu(), expected[name]), name
    one = group_statistics(pre, batches[:1], 10, params=params, curvature="fisher", seed=0)
    first = fair_masks("fairprune", params, one, 0.5)
    assert any(not torch.equal(first[n], expected[n]) for n in NAMES)  # the test can tell
