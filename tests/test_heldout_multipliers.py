"""GroupEqualizer(heldout=True): dual steps from a held-out FairnessData split."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_fairprune import FairnessData
from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.losses import (
    ConstrainedGapLoss,
    GroupDROLoss,
    GroupEqualizedLoss,
    GroupWeightedLoss,
)

EVERY, LR = 3, 0.5


def groups_of(batch):
    """4 groups: thick strokes × (digit >= 5)."""
    x, y, ink = batch
    return x, y, ink * 2 + (y >= 5).long()


def heldout(dm: DigitsDataModule, **loader_kwargs) -> FairnessData:
    loader = DataLoader(dm.val_set, batch_size=loader_kwargs.pop("batch_size", 40), **loader_kwargs)
    return FairnessData(loader, num_groups=4, group_fn=groups_of)


LOSSES = {
    "equalized": lambda: GroupEqualizedLoss(4),
    "dro": lambda: GroupDROLoss(4),
    "gap": lambda: ConstrainedGapLoss(4, tolerance=0.0),
}


class GroupCNN(SmallCNN):
    def __init__(self, kind: str) -> None:
        super().__init__(lr=0.05)
        self.criterion = LOSSES[kind]()

    def training_step(self, batch, batch_idx):
        x, y, g = groups_of(batch)
        return self.criterion(self(x), y, g)


class NaiveHeldout(Callback):
    """The held-out split's per-sample losses and correctness at fit start and at dual steps."""

    def __init__(self, dm: DigitsDataModule) -> None:
        self.x, self.y, self.g = groups_of(dm.val_set.tensors)
        self.start: tuple[np.ndarray, np.ndarray] | None = None
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []

    def measure(self, module) -> tuple[np.ndarray, np.ndarray]:
        was = module.training
        module.eval()
        with torch.no_grad():
            logits = module(self.x)
        module.train(was)
        per = F.cross_entropy(logits, self.y, reduction="none").double().numpy()
        return per, (logits.argmax(1) == self.y).double().numpy()

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.measure(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step % EVERY == 0:
            self.steps.append(self.measure(pl_module))


def naive_multipliers(kind: str, rec: NaiveHeldout) -> np.ndarray:
    g = rec.g.numpy()
    groups = [g == a for a in range(4)]
    lam = np.full(4, 0.25) if kind == "dro" else np.zeros(4)
    _, start_right = rec.start
    ref_w = np.array([m.mean() for m in groups])
    ref_acc = np.array([start_right[m].mean() for m in groups])
    for per, right in rec.steps:
        j_a = np.array([per[m].mean() for m in groups])
        if kind == "equalized":  # λ ← max(0, λ + η (J_a − J))
            lam = np.maximum(0.0, lam + LR * (j_a - per.mean()))
        elif kind == "dro":  # q ∝ q exp(η J_a)
            lam = lam * np.exp(LR * j_a)
            lam /= lam.sum()
        else:  # λ ← max(0, λ + η ψ), ψ_a = (A*_a − A_a) − (A* − A)
            acc = np.array([right[m].mean() for m in groups])
            psi = (ref_acc - acc) - ((ref_w * ref_acc).sum() - (ref_w * acc).sum())
            lam = np.maximum(0.0, lam + LR * psi)
    return lam


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_multipliers_equal_a_naive_recomputation_on_the_heldout_split(tmp_path, kind):
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, n=400, with_groups=True, shuffle=False)
    dm.setup()
    model, recorder = GroupCNN(kind), NaiveHeldout(dm)
    eq = GroupEqualizer(dual_lr=LR, every_n_steps=EVERY, data=heldout(dm), heldout=True, log=False)
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
    pl.Trainer(callbacks=[recorder, eq], **kwargs).fit(model, dm)
    assert eq.num_dual_steps == len(recorder.steps) == 3
    expected = naive_multipliers(kind, recorder)
    np.testing.assert_allclose(
        model.criterion.multipliers.double().numpy(), expected, rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(expected, expected[0])  # the groups were told apart


class NoisyCNN(SmallCNN):
    """Dropout (draws from the global RNG) and BatchNorm (running statistics) in training."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.bn, self.drop = nn.BatchNorm1d(32), nn.Dropout(0.3)
        self.criterion = GroupEqualizedLoss(4)

    def forward(self, x):
        h = self.fc(self.features(x).flatten(1))
        return self.classifier(self.drop(torch.relu(self.bn(h))))

    def training_step(self, batch, batch_idx):
        x, y, g = groups_of(batch)
        return self.criterion(self(x), y, g)


def test_the_heldout_pass_leaves_training_unchanged(tmp_path):
    # with dual_lr=0 the held-out measurement runs at every dual step and its result changes
    # nothing; the fit must end bitwise where the same fit without it ends (weights, BatchNorm
    # statistics), although dropout and the shuffled loaders draw random numbers
    def fit(measure: bool) -> tuple[NoisyCNN, list]:
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=64, n=400, with_groups=True, shuffle=True)
        dm.setup()
        model = NoisyCNN()
        data = heldout(dm, shuffle=True, batch_size=16)  # the global RNG shuffles it
        callbacks = (
            [GroupEqualizer(0.0, every_n_steps=2, data=data, heldout=True)] if measure else []
        )
        kwargs = quiet_trainer_kwargs(tmp_path)
        kwargs.update(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
        pl.Trainer(callbacks=callbacks, **kwargs).fit(model, dm)
        return model, callbacks

    (measured, (eq,)), (plain, _) = fit(True), fit(False)
    assert eq.num_dual_steps == 5
    assert eq.last_violations[0] is not None
    for (name, a), b in zip(
        measured.state_dict().items(), plain.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_heldout_needs_data_and_a_dual_step(tmp_path):
    with pytest.raises(ValueError, match=r"Expected `data` \(a FairnessData of held-out"):
        GroupEqualizer(heldout=True)
    with pytest.raises(TypeError, match="Expected `data` to be a FairnessData"):
        GroupEqualizer(data=[(torch.zeros(1), torch.zeros(1))])
    dm = DigitsDataModule(batch_size=64, n=128, with_groups=True)
    dm.setup()
    model = GroupCNN("equalized")
    model.criterion = GroupWeightedLoss([1.0] * 4)
    eq = GroupEqualizer(data=heldout(dm), heldout=True)
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"Expected a loss with a dual step for heldout=True"):
        pl.Trainer(callbacks=[eq], **kwargs).fit(model, dm)
