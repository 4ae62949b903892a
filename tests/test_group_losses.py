"""One rule for every group loss (the shared `GroupLoss` base), and one driver per loss."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs

from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.losses import (
    ConstrainedGapLoss,
    GroupDROLoss,
    GroupEqualizedLoss,
    GroupWeightedLoss,
    inverse_frequency_weights,
)

LOSSES = {
    "equalized": lambda g: GroupEqualizedLoss(g),
    "dro": lambda g: GroupDROLoss(g),
    "weighted": lambda g: GroupWeightedLoss([1.0] * g),
    "gap": lambda g: ConstrainedGapLoss(g),
}


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_class_targets_are_not_groups_when_the_counts_differ(kind):
    # issue 18 item 7: 4 classes, 3 groups, no `groups`: the targets (all < 3 here, so they
    # would pass as group ids) must not silently become the groups, whichever loss it is
    loss_fn = LOSSES[kind](3)
    logits = torch.randn(6, 4)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match=r"logits have 4 classes and `num_groups`=3"):
        loss_fn(logits, targets)
    # with the groups given, every loss takes the batch; with as many groups as classes, the
    # class targets are the groups (the same value as passing them)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.isfinite(loss_fn(logits, targets, groups))
    same = LOSSES[kind](4)
    if kind == "gap":
        same.set_reference([0.5] * 4)
    torch.testing.assert_close(same(logits, targets), same(logits, targets, targets.clone()))


class TwoDriversCNN(SmallCNN):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.criterion = GroupEqualizedLoss(10)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return self.criterion(self(batch[0]), batch[1])


def test_two_equalizers_on_one_loss_are_refused_at_fit_start(tmp_path):
    # issue 18 item 8: different state keys, so Lightning lets both in; both would drive
    # `criterion` and double its dual steps. The fit must stop before any training step.
    model = TwoDriversCNN()
    first, second = GroupEqualizer(dual_lr=0.1), GroupEqualizer(loss_attr="criterion")
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer = pl.Trainer(callbacks=[first, second], **kwargs)
    with pytest.raises(ValueError, match=r"one GroupEqualizer per loss") as err:
        trainer.fit(model, DigitsDataModule(batch_size=64, n=128))
    message = str(err.value)
    assert "GroupEqualizer(dual_lr=0.1, every_n_steps=1)" in message
    assert "GroupEqualizer(dual_lr=0.01, every_n_steps=1, loss_attr='criterion')" in message
    assert "`criterion` (GroupEqualizedLoss)" in message
    assert model.steps == 0
    assert torch.equal(model.criterion.multipliers, torch.zeros(10))


def test_two_losses_with_one_equalizer_each_are_fine(tmp_path):
    model = TwoDriversCNN()
    model.other = GroupDROLoss(10)
    drivers = [GroupEqualizer(loss_attr="criterion"), GroupEqualizer(loss_attr="other")]
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0)
    pl.Trainer(callbacks=drivers, **kwargs).fit(model, DigitsDataModule(batch_size=64, n=128))
    assert [d.num_dual_steps for d in drivers] == [2, 2]


def test_per_sample_losses_take_the_targets_as_groups_in_every_loss():
    # without logits there are no classes to compare: the targets are the groups (ids checked)
    per_sample = F.cross_entropy(
        torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), reduction="none"
    )
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    for loss_fn in (
        GroupEqualizedLoss(3, base_loss=None),
        GroupDROLoss(3, base_loss=None),
        GroupWeightedLoss([1.0, 2.0, 3.0], base_loss=None),
    ):
        torch.testing.assert_close(loss_fn(per_sample, ids), loss_fn(per_sample, None, ids))
        with pytest.raises(ValueError, match=r"`targets \(used as groups\)` to hold group ids"):
            loss_fn(per_sample, ids + 1)


class WeightedCNN(SmallCNN):
    """Groups = classes, inverse-frequency weights; or the same weights through F.cross_entropy."""

    def __init__(self, weights: torch.Tensor, reference: bool = False) -> None:
        super().__init__(lr=0.05)
        self.criterion = GroupWeightedLoss(weights)
        self.reference = reference

    def training_step(self, batch, batch_idx):
        logits, y = self(batch[0]), batch[1]
        if self.reference:
            return F.cross_entropy(logits, y, weight=self.criterion.multipliers)
        return self.criterion(logits, y)


def test_group_weighted_loss_needs_no_equalizer(tmp_path):
    # issue 21 item 5: the weighted loss alone trains exactly as with an equalizer attached,
    # equals class-weighted cross-entropy, and holds only the last batch's sums (it kept
    # adding every batch for good when nothing reset its accumulators)
    def fit(reference: bool = False, equalizer: bool = False) -> WeightedCNN:
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=64, n=400, minority={3: 0.15, 8: 0.15})
        dm.setup()
        weights = inverse_frequency_weights(torch.bincount(dm.train_set.tensors[1], minlength=10))
        model = WeightedCNN(weights, reference)
        model.last_batch = len(dm.train_set) % 64 or 64
        kwargs = quiet_trainer_kwargs(tmp_path)
        kwargs.update(max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
        callbacks = [GroupEqualizer(log=False)] if equalizer else []
        pl.Trainer(callbacks=callbacks, **kwargs).fit(model, dm)
        return model

    alone, driven, reference = fit(), fit(equalizer=True), fit(reference=True)
    for (name, p), q, r in zip(
        alone.named_parameters(), driven.parameters(), reference.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-5, msg=name)
    assert alone.criterion.driven is False
    assert driven.criterion.driven is False  # released at the end of the fit
    # alone: the sums of the last batch only, not of the 2 epochs
    assert alone.criterion.accumulated[1].sum().item() == alone.last_batch
