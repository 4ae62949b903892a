"""GroupEqualizedLoss against hand computations (numpy) and known fixed points."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_fairprune.losses import GroupEqualizedLoss, constraint_values


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _hand_lagrangian(z, y, groups, lam, num_groups, constraint, eps=0.0, w_class=None):
    """Value and d/dz of J + Σ_a λ_a c_a, by hand (numpy, float64)."""
    n, c = z.shape
    p = _softmax(z)
    onehot = np.eye(c)[y]
    ell = -np.log(p[np.arange(n), y])
    g = p - onehot  # d ell_i / d z_i
    w = np.ones(n) if w_class is None else w_class[y]
    total_w = w.sum()
    big_j = (w * ell).sum() / total_w
    d_big_j = (w[:, None] * g) / total_w
    value = big_j
    grad = d_big_j.copy()
    for a in range(num_groups):
        members = groups == a
        if not members.any():
            continue
        wa = w[members].sum()
        ja = (w[members] * ell[members]).sum() / wa
        d_ja = np.where(members[:, None], w[:, None] * g / wa, 0.0)
        d = ja - big_j
        if constraint == "absolute":
            c_a, slope = max(abs(d) - eps, 0.0), (np.sign(d) if abs(d) > eps else 0.0)
        elif constraint == "signed":
            c_a, slope = d - eps, 1.0
        else:
            c_a, slope = max(d - eps, 0.0), (1.0 if d > eps else 0.0)
        value += lam[a] * c_a
        grad += lam[a] * slope * (d_ja - d_big_j)
    return value, grad


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 0])
    return z, y, groups


@pytest.mark.parametrize(
    ("constraint", "eps"),
    [("absolute", 0.0), ("absolute", 0.05), ("signed", 0.0), ("signed", 0.1), ("one_sided", 0.02)],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_lagrangian_value_and_gradient_match_hand_formula(batch, constraint, eps, weighted):
    z, y, groups = batch
    lam = np.array([0.7, 1.3, 0.4])
    w_class = np.array([1.0, 2.0, 0.5, 3.0]) if weighted else None
    loss_fn = GroupEqualizedLoss(
        3,
        constraint=constraint,
        tolerance=eps,
        weight=None if w_class is None else torch.tensor(w_class),
    ).double()
    loss_fn.multipliers.copy_(torch.tensor(lam))
    zz = z.clone().requires_grad_(True)
    value = loss_fn(zz, y, groups)
    (grad,) = torch.autograd.grad(value, zz)
    ref_value, ref_grad = _hand_lagrangian(
        z.numpy(), y.numpy(), groups.numpy(), lam, 3, constraint, eps, w_class
    )
    assert value.item() == pytest.approx(ref_value, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)
    # the multipliers receive no gradient (detached in the primal term)
    assert not loss_fn.multipliers.requires_grad


def test_zero_multipliers_equal_torch_cross_entropy(batch):
    z, y, _ = batch
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    loss_fn = GroupEqualizedLoss(4, label_smoothing=0.1, weight=weight).double()
    ref = F.cross_entropy(z, y, weight=weight, label_smoothing=0.1)
    torch.testing.assert_close(loss_fn(z, y), ref, rtol=1e-12, atol=1e-12)
    # inactive: plain J even with large multipliers
    loss_fn.multipliers.fill_(5.0)
    loss_fn.active = False
    torch.testing.assert_close(loss_fn(z, y), ref, rtol=1e-12, atol=1e-12)
    loss_fn.active = True
    assert loss_fn(z, y).item() > ref.item() + 1e-3


def test_per_sample_losses_and_callable_base_loss_agree_with_cross_entropy(batch):
    z, y, groups = batch
    lam = torch.tensor([0.5, 0.2, 0.9], dtype=torch.float64)
    results = []
    for base, first, targets in [
        ("cross_entropy", z, y),
        (lambda out, t: F.cross_entropy(out, t, reduction="none"), z, y),
        (None, F.cross_entropy(z, y, reduction="none"), None),
    ]:
        loss_fn = GroupEqualizedLoss(3, base_loss=base)
        loss_fn.multipliers.copy_(lam)
        results.append(loss_fn(first, targets, groups))
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[2], results[0])


def test_spatial_outputs_average_over_extra_dims():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 2, 2, generator=gen)
    y = torch.randint(0, 3, (4, 2, 2), generator=gen)
    groups = torch.tensor([0, 1, 1, 0])
    loss_fn = GroupEqualizedLoss(2, constraint="absolute")
    torch.testing.assert_close(loss_fn(z, y, groups), F.cross_entropy(z, y))
    per_sample = F.cross_entropy(z, y, reduction="none").mean((1, 2))
    loss_fn.multipliers.fill_(1.0)
    j = per_sample.mean()
    ref = j + sum((per_sample[groups == a].mean() - j).abs() for a in range(2))
    torch.testing.assert_close(loss_fn(z, y, groups), ref)


def test_groups_default_to_targets(batch):
    z, y, _ = batch
    loss_fn = GroupEqualizedLoss(4)
    loss_fn.multipliers.fill_(1.0)
    torch.testing.assert_close(loss_fn(z, y), loss_fn(z, y, groups=y.clone()))


def test_absent_groups_add_no_term_and_keep_their_multiplier(batch):
    z, y, groups = batch
    lam = torch.tensor([0.5, 1.5, 0.25, 9.0], dtype=torch.float64)  # group 3 never appears
    loss4 = GroupEqualizedLoss(4).double()
    loss4.multipliers.copy_(lam)
    loss3 = GroupEqualizedLoss(3).double()
    loss3.multipliers.copy_(lam[:3])
    zz = z.clone().requires_grad_(True)
    (g4,) = torch.autograd.grad(loss4(zz, y, groups), zz)
    (g3,) = torch.autograd.grad(loss3(zz, y, groups), zz)
    torch.testing.assert_close(g4, g3)
    v = loss4.dual_step(0.1)
    assert math.isnan(v[3].item())
    assert loss4.multipliers[3].item() == 9.0
    # a batch with only group 0: J_0 = J, no violation
    only0 = groups == 0
    v = loss4.violations(*_sums(z[only0], y[only0], groups[only0], 4))
    assert v[0].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isnan(v[1:]).all()


def _sums(z, y, groups, g):
    per = F.cross_entropy(z, y, reduction="none").double()
    sums = torch.zeros(g, dtype=torch.float64).index_add(0, groups, per)
    counts = torch.zeros(g, dtype=torch.float64).index_add(0, groups, torch.ones_like(per))
    return sums, counts


def test_accumulates_in_train_mode_only_and_dual_step_uses_the_union(batch):
    z, y, groups = batch
    loss_fn = GroupEqualizedLoss(3, constraint="signed")
    loss_fn(z[:4], y[:4], groups[:4])
    loss_fn(z[4:], y[4:], groups[4:])
    loss_fn.eval()
    loss_fn(z, y, groups)  # validation: not accumulated
    loss_fn.train()
    sums, counts = _sums(z, y, groups, 3)
    acc_sums, acc_counts = loss_fn.accumulated
    torch.testing.assert_close(acc_sums, sums)
    torch.testing.assert_close(acc_counts, counts)
    ja = (sums / counts).numpy()
    j = sums.sum().item() / counts.sum().item()
    v = loss_fn.dual_step(0.5)
    np.testing.assert_allclose(v.numpy(), ja - j, rtol=1e-12)
    np.testing.assert_allclose(
        loss_fn.multipliers.numpy(), np.maximum(0.0, 0.5 * (ja - j)), rtol=1e-6
    )
    # accumulators reset by the dual step
    assert loss_fn.accumulated[1].sum().item() == 0.0


def test_multipliers_grow_for_violated_groups_and_stay_nonnegative():
    sums = torch.tensor([3.0, 1.0, 2.0])  # group losses 1.5, 0.5, 1.0 with equal counts -> J = 1
    counts = torch.tensor([2.0, 2.0, 2.0])
    for constraint in ("absolute", "signed", "one_sided"):
        loss_fn = GroupEqualizedLoss(3, constraint=constraint)
        history = []
        for _ in range(5):
            loss_fn.dual_step(0.1, sums, counts)
            history.append(loss_fn.multipliers.clone())
        lam = torch.stack(history)
        assert (lam >= 0).all()
        # the worst group's multiplier grows by lr * 0.5 per step
        torch.testing.assert_close(lam[:, 0], 0.05 * torch.arange(1, 6, dtype=torch.float32))
        expected_best = {"absolute": 0.05 * 5, "signed": 0.0, "one_sided": 0.0}[constraint]
        assert lam[-1, 1].item() == pytest.approx(expected_best, abs=1e-6)
        assert lam[-1, 2].item() == pytest.approx(0.0, abs=1e-7)  # J_2 = J
    # free multipliers (signed equality): the better-than-mean group goes negative
    free = GroupEqualizedLoss(3, constraint="signed", nonnegative=False)
    free.dual_step(0.1, sums, counts)
    torch.testing.assert_close(free.multipliers, torch.tensor([0.05, -0.05, 0.0]))


def test_signed_multipliers_shrink_back_to_zero():
    loss_fn = GroupEqualizedLoss(2, constraint="signed")
    loss_fn.dual_step(1.0, [3.0, 1.0], [1.0, 1.0])  # J_0 - J = +1
    assert loss_fn.multipliers.tolist() == [1.0, 0.0]
    loss_fn.dual_step(0.4, [1.0, 3.0], [1.0, 1.0])  # now group 0 is better: -1
    assert loss_fn.multipliers.tolist() == pytest.approx([0.6, 0.4])
    loss_fn.dual_step(1.0, [1.0, 3.0], [1.0, 1.0])
    assert loss_fn.multipliers.tolist() == pytest.approx([0.0, 1.4])


def _scalar_toy(constraint, nonnegative, dual_lr, steps):
    """Two groups (3 vs 1 samples) with losses (θ−1)² and (θ+1)².

    J = θ² − θ + 1, J_0 − J = −θ, J_1 − J = 3θ: the constraint forces θ* = 0 (the unconstrained
    optimum is θ = 0.5). Stationarity of the Lagrangian at θ = 0 needs 3λ_1 − λ_0 = 1 (signed)
    or λ_0 + 3λ_1 ≥ 1 (absolute, subgradient of |θ|).
    """
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    loss_fn = GroupEqualizedLoss(
        2, base_loss=None, constraint=constraint, nonnegative=nonnegative
    ).double()
    opt = torch.optim.SGD([theta], lr=0.05)
    groups = torch.tensor([0, 0, 0, 1])
    for _ in range(steps):
        per_sample = torch.stack([(theta - 1) ** 2] * 3 + [(theta + 1) ** 2])
        opt.zero_grad()
        loss_fn(per_sample, groups=groups).backward()
        opt.step()
        loss_fn.dual_step(dual_lr)
    return theta.item(), loss_fn.multipliers.tolist()


def test_scalar_toy_signed_free_multipliers_reach_the_kkt_point():
    # λ updates are proportional to (−θ, 3θ), so λ_1 = −3 λ_0; with 3λ_1 − λ_0 = 1: (−0.1, 0.3)
    theta, lam = _scalar_toy("signed", False, 0.05, 600)
    assert theta == pytest.approx(0.0, abs=1e-6)
    assert lam == pytest.approx([-0.1, 0.3], abs=1e-5)


def test_scalar_toy_signed_projected_multipliers_satisfy_kkt():
    theta, lam = _scalar_toy("signed", True, 0.05, 600)
    assert theta == pytest.approx(0.0, abs=1e-6)
    assert min(lam) >= 0.0
    assert 3 * lam[1] - lam[0] == pytest.approx(1.0, abs=1e-5)


def test_scalar_toy_absolute_form_reaches_the_constrained_optimum():
    # λ updates ∝ (|θ|, 3|θ|): λ_1 = 3 λ_0, and θ settles once λ_0 + 3λ_1 reaches 1: (0.1, 0.3)
    theta, lam = _scalar_toy("absolute", True, 0.002, 1500)
    assert theta == pytest.approx(0.0, abs=1e-4)
    assert lam == pytest.approx([0.1, 0.3], abs=2e-3)
    assert lam[0] + 3 * lam[1] >= 1.0 - 1e-3


def test_checkpoint_round_trip_state_dict_buffers_and_to():
    loss_fn = GroupEqualizedLoss(3, weight=torch.tensor([1.0, 2.0, 3.0]))
    loss_fn.dual_step(0.5, [3.0, 1.0, 2.0], [2.0, 2.0, 2.0])
    lam = loss_fn.multipliers.clone()
    assert any(b is loss_fn.multipliers for b in loss_fn.buffers())
    state = loss_fn.state_dict()
    assert set(state) == {"multipliers", "weight"}  # accumulators are not buffers
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = GroupEqualizedLoss(3, weight=torch.ones(3))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.multipliers, lam)
    torch.testing.assert_close(restored.weight, torch.tensor([1.0, 2.0, 3.0]))
    moved = restored.to(torch.float64)
    assert moved.multipliers.dtype == torch.float64
    torch.testing.assert_close(moved.multipliers, lam.double())
    # inside a model, the multipliers travel with the model's state_dict
    model = torch.nn.Module()
    model.criterion = restored
    assert "criterion.multipliers" in model.state_dict()


def test_constraint_values_and_accumulator_restore():
    gaps = torch.tensor([-0.5, -0.05, 0.05, 0.5])
    torch.testing.assert_close(
        constraint_values(gaps, "absolute", 0.1), torch.tensor([0.4, 0.0, 0.0, 0.4])
    )
    torch.testing.assert_close(constraint_values(gaps, "signed", 0.1), gaps - 0.1)
    torch.testing.assert_close(
        constraint_values(gaps, "one_sided", 0.1), torch.tensor([0.0, 0.0, 0.0, 0.4])
    )
    loss_fn = GroupEqualizedLoss(2, constraint="absolute")
    loss_fn.set_accumulated([1.0, 3.0], [1.0, 1.0])
    loss_fn.dual_step(1.0)
    assert loss_fn.multipliers.tolist() == [1.0, 1.0]
    signed = GroupEqualizedLoss(2)  # the default: only the group above the mean gets λ > 0
    signed.set_accumulated([1.0, 3.0], [1.0, 1.0])
    signed.dual_step(1.0)
    assert signed.multipliers.tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(batch):
    z, y, groups = batch
    loss_fn = GroupEqualizedLoss(3)
    with pytest.raises(ValueError, match=r"Expected `targets` of shape \(9,\).*got \(8,\)"):
        loss_fn(z, y[:8], groups)
    with pytest.raises(ValueError, match=r"Expected `groups` to be a 1-D .* per sample \(9\)"):
        loss_fn(z, y, groups[:5])
    with pytest.raises(ValueError, match=r"`groups` to hold group ids in \[0, 3\).*from 0 to 3"):
        loss_fn(z, y, torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 0]))
    with pytest.raises(ValueError, match=r"ids in \[0, 3\).*from -1 to 2"):
        loss_fn(z, y, torch.tensor([0, 1, 2, -1, 0, 1, 2, 0, 0]))
    with pytest.raises(ValueError, match=r"logits have 4 classes and `num_groups`=3"):
        loss_fn(z, y)  # the README's old mistake: the class targets silently used as groups
    per_sample = F.cross_entropy(z, y, reduction="none")
    with pytest.raises(ValueError, match=r"`targets \(used as groups\)` to hold .* \[0, 3\)"):
        GroupEqualizedLoss(3, base_loss=None)(per_sample, y)
    with pytest.raises(ValueError, match=r"Expected `targets` to hold class labels in \[0, 4\)"):
        loss_fn(z, torch.tensor([0, 1, 2, 4, 0, 1, 2, 0, 0]), groups)
    with pytest.raises(ValueError, match="integer tensor of group ids"):
        loss_fn(z, y, groups.float())
    with pytest.raises(TypeError, match="integer class indices"):
        loss_fn(z, y.float(), groups)
    with pytest.raises(ValueError, match="Expected `targets`"):
        loss_fn(z, None, groups)
    with pytest.raises(ValueError, match="non-empty batch"):
        loss_fn(z[:0], y[:0], groups[:0])
    nan_logits = z.clone()
    nan_logits[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"finite per-sample losses.*1 non-finite"):
        loss_fn(nan_logits, y, groups)
    with pytest.raises(ValueError, match="Expected `loss_sums` to be a 1-D tensor of finite"):
        loss_fn.dual_step(0.1, [float("nan"), 1.0, 1.0], [1.0, 1.0, 1.0])
    for bad_lr in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Expected `lr` to be a finite float >= 0"):
            loss_fn.dual_step(bad_lr)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        loss_fn.dual_step(0.1, [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"Expected `counts` to be .* >= 0"):
        loss_fn.dual_step(0.1, [1.0, 1.0, 1.0], [1.0, -1.0, 1.0])
    bad_callable = GroupEqualizedLoss(3, base_loss=lambda out, t: out.mean())
    with pytest.raises(ValueError, match=r"per-sample losses of shape \(9, ...\)"):
        bad_callable(z, y, groups)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_groups": 0}, "`num_groups`"),
        ({"num_groups": 2, "constraint": "equal"}, "`constraint`"),
        ({"num_groups": 2, "tolerance": -0.1}, "`tolerance`"),
        ({"num_groups": 2, "label_smoothing": 1.5}, "`label_smoothing`"),
        ({"num_groups": 2, "base_loss": "mse"}, "`base_loss`"),
        ({"num_groups": 2, "base_loss": None, "weight": [1.0, 2.0]}, "`weight` apply"),
        ({"num_groups": 2, "constraint": "absolute", "nonnegative": False}, "`nonnegative=True`"),
        (
            {"num_groups": 2, "constraint": "signed", "nonnegative": False, "tolerance": 0.1},
            "`tolerance=0`",
        ),
        ({"num_groups": 2, "multiplier_init": -1.0}, "`multiplier_init`"),
        ({"num_groups": 2, "weight": [1.0, -2.0]}, "`weight`"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupEqualizedLoss(**kwargs)
