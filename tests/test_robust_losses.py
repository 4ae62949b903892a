"""GroupDROLoss and GroupWeightedLoss: hand computations and one real Trainer.fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs

from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.losses import (
    GroupDROLoss,
    GroupEqualizedLoss,
    GroupLoss,
    GroupWeightedLoss,
    inverse_frequency_weights,
)


def _batch(seed=0, n=12, c=3, g=3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=gen)
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])[:n] % g
    return logits, y, groups


def test_dro_forward_and_steps_vs_numpy():
    logits, y, groups = _batch()
    per = F.cross_entropy(logits, y, reduction="none").detach().numpy()
    gr = groups.numpy()
    loss_fn = GroupDROLoss(3).double()
    q = np.full(3, 1 / 3)
    eta = 0.7
    for _ in range(3):
        out = loss_fn(logits, y, groups)
        j = np.array([per[gr == a].mean() for a in range(3)])
        assert float(out.detach()) == pytest.approx(float((q * j).sum() / q.sum()), rel=1e-12)
        gaps = loss_fn.dual_step(eta)
        np.testing.assert_allclose(gaps.numpy(), j - per.mean(), rtol=1e-12)
        q = q * np.exp(eta * j)
        q = q / q.sum()
        np.testing.assert_allclose(loss_fn.multipliers.numpy(), q, rtol=1e-12)
    assert q[int(np.argmax(j))] == q.max()  # the worst group gains weight


def test_dro_absent_group_and_gradient():
    logits, y, groups = _batch()
    loss_fn = GroupDROLoss(4).double()  # group 3 never appears
    loss_fn.dual_step(1.0, loss_sums=[1.0, 2.0, 3.0, 0.0], counts=[1.0, 1.0, 1.0, 0.0])
    q = loss_fn.multipliers.clone()
    # absent group: factor exp(0) = 1 before the normalization
    e = np.exp([1.0, 2.0, 3.0, 0.0]) * 0.25
    np.testing.assert_allclose(q.numpy(), e / e.sum(), rtol=1e-12)
    out = loss_fn(logits, y, groups)
    out.backward()
    # gradient of Σ q_a J_a / Σ_{present} q_a by hand: sample i of group a gets q_a/(n_a Q)
    counts = torch.bincount(groups, minlength=4).double()
    w = q[groups] / counts[groups] / q[:3].sum()
    ref_logits = logits.detach().clone().requires_grad_(True)
    (F.cross_entropy(ref_logits, y, reduction="none") * w).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    # inactive: the plain mean
    loss_fn.active = False
    assert float(loss_fn(logits, y, groups).detach()) == pytest.approx(
        float(F.cross_entropy(logits, y).detach()), rel=1e-12
    )


def test_group_weighted_equals_class_weighted_cross_entropy():
    logits, y, _ = _batch(seed=3)
    counts = torch.bincount(y, minlength=3)
    v = inverse_frequency_weights(counts)
    # sklearn's "balanced" class weights as the independent reference
    from sklearn.utils.class_weight import compute_class_weight

    ref_v = compute_class_weight("balanced", classes=np.arange(3), y=y.numpy())
    np.testing.assert_allclose(v.numpy(), ref_v, rtol=1e-6)
    loss_fn = GroupWeightedLoss(v).double()
    ref = F.cross_entropy(logits, y, weight=v.double())
    assert float(loss_fn(logits, y).detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    # groups other than the classes: Σ v_g ℓ / Σ v_g
    groups = torch.arange(12) % 2
    lw = GroupWeightedLoss([1.0, 3.0]).double()
    per = F.cross_entropy(logits, y, reduction="none").detach()
    vv = torch.tensor([1.0, 3.0], dtype=torch.float64)[groups]
    assert float(lw(logits, y, groups).detach()) == pytest.approx(
        float((vv * per).sum() / vv.sum())
    )
    # static: the dual step changes nothing and returns the gaps
    before = lw.multipliers.clone()
    gaps = lw.dual_step(5.0)
    assert torch.equal(lw.multipliers, before)
    j = torch.stack([per[groups == a].mean() for a in range(2)]).detach()
    torch.testing.assert_close(gaps, j - per.mean().detach())


def test_bad_inputs():
    with pytest.raises(ValueError, match="Expected `group_weights` to be a non-empty 1-D"):
        GroupWeightedLoss([0.0, 0.0])
    with pytest.raises(ValueError, match="Expected `counts` to be a 1-D tensor"):
        inverse_frequency_weights([-1.0, 2.0])
    with pytest.raises(ValueError, match="Expected `lr` to be a finite float >= 0"):
        GroupDROLoss(2).dual_step(-0.1)
    with pytest.raises(ValueError, match="Expected `num_groups` to be an int >= 1"):
        GroupDROLoss(0)
    # the callback accepts every group loss (one base)
    assert isinstance(GroupDROLoss(2), GroupLoss)
    assert isinstance(GroupEqualizedLoss(2), GroupLoss)


class DROCNN(SmallCNN):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.criterion = GroupDROLoss(10)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.criterion(logits, y)
        with torch.no_grad():
            per = F.cross_entropy(logits, y, reduction="none").double()
            sums = torch.zeros(10, dtype=torch.float64).index_add(0, y, per)
            counts = torch.zeros(10, dtype=torch.float64).index_add(0, y, torch.ones_like(per))
            self.records.append((sums, counts))
        return loss


def test_trainer_fit_with_group_equalizer_drives_dro(tmp_path):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, n=320, shuffle=False)
    model = DROCNN(lr=0.05)
    eq = GroupEqualizer(dual_lr=0.05, every_n_steps=1, log=False)
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(limit_val_batches=0, num_sanity_val_steps=0, max_epochs=2)
    import lightning.pytorch as pl

    pl.Trainer(callbacks=[eq], **kwargs).fit(model, dm)
    assert eq.num_dual_steps == len(model.records) > 0
    # replay Sagawa's update from the recorded per-batch sums
    q = np.full(10, 0.1)
    for sums, counts in model.records:
        present = counts.numpy() > 0
        j = np.where(present, sums.numpy() / np.maximum(counts.numpy(), 1e-300), 0.0)
        q = q * np.exp(0.05 * j)
        q /= q.sum()
    np.testing.assert_allclose(model.criterion.multipliers.double().numpy(), q, rtol=1e-5)
    assert math.isclose(float(model.criterion.multipliers.sum()), 1.0, rel_tol=1e-6)
    assert float(model.criterion.multipliers.max()) > 0.1  # weights moved off uniform
