"""The weighting strategies of today's group losses, and the public losses built on them.

`Equalize` (Tran et al.; methods.md, section 5) is `GroupEqualizedLoss`, `DRO` (Sagawa et al.,
ICLR 2020) is `GroupDROLoss`, `Fixed` (static weights, the baseline) is `GroupWeightedLoss`.
The dual step size is the driver's (``GroupEqualizer(dual_lr=...)`` or ``dual_step(lr)``),
not a strategy option: one home for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_fairprune.checks import check_choice, check_real, check_vector
from lightning_fairprune.losses.core import (
    _TINY,
    GroupLoss,
    GroupTerms,
    PerSampleLoss,
    Statistics,
    Weighting,
    group_gaps,
)

__all__ = [
    "CONSTRAINTS",
    "DRO",
    "Equalize",
    "Fixed",
    "GroupDROLoss",
    "GroupEqualizedLoss",
    "GroupWeightedLoss",
    "constraint_values",
    "inverse_frequency_weights",
]

ConstraintName = Literal["absolute", "signed", "one_sided"]
CONSTRAINTS: tuple[str, ...] = ("absolute", "signed", "one_sided")


def constraint_values(gaps: Tensor, constraint: str = "absolute", tolerance: float = 0.0) -> Tensor:
    """Map the gaps ``J_a − J`` to the constraint values ``c_a`` used by the Lagrangian.

    * ``"absolute"``: ``c_a = relu(|J_a − J| − ε)``; with ε = 0 this is ``|J_a − J|``, the
      equality constraint of methods.md (as in the balancing-act re-implementation). ``c_a ≥ 0``,
      so the multipliers never decrease.
    * ``"signed"``: ``c_a = J_a − J − ε``, the inequality ``J_a ≤ J + ε`` (or, with free
      multipliers and ε = 0, the equality ``J_a = J``). Multipliers of groups that are better
      than the mean shrink.
    * ``"one_sided"``: ``c_a = relu(J_a − J − ε)``, a hinge: only groups whose loss exceeds the
      mean by more than ε are penalized; multipliers never decrease.

    Args:
        gaps: ``J_a − J`` per group (any shape, any floating dtype).
        constraint: one of `CONSTRAINTS`.
        tolerance: ε ≥ 0.

    Returns:
        Tensor of the same shape as ``gaps`` (NaN stays NaN).

    Example:
        >>> gaps = torch.tensor([-0.3, 0.1, 0.5])
        >>> constraint_values(gaps, "absolute")
        tensor([0.3000, 0.1000, 0.5000])
        >>> constraint_values(gaps, "signed")
        tensor([-0.3000,  0.1000,  0.5000])
        >>> constraint_values(gaps, "one_sided", tolerance=0.2)
        tensor([0.0000, 0.0000, 0.3000])
    """
    check_choice(constraint, "constraint", CONSTRAINTS)
    if constraint == "absolute":
        return torch.relu(gaps.abs() - tolerance)
    if constraint == "signed":
        return gaps - tolerance
    return torch.relu(gaps - tolerance)


def _project(loss: GroupLoss, new: Tensor) -> None:
    loss.multipliers.copy_(new.to(loss.multipliers.dtype))


class Equalize(Weighting):
    """Group equalization: ``J + Σ_a λ_a · c_a`` with projected dual ascent on λ.

    Primal: ``c_a = constraint_values(J_a − J, constraint, tolerance)`` over the groups present
    in the batch, λ detached. Dual: ``λ_a ← max(0, λ_a + lr · c_a)`` for the groups with
    samples (no projection with ``nonnegative=False``).

    Choosing the dual step: the Lagrangian weighs sample ``i`` of group ``a`` by
    ``(1 − Σ_b λ_b s_b)/N + λ_a s_a/N_a`` (``s_b`` the sign of the constraint's slope), so once
    the multipliers sum past about 1 some samples get a *negative* weight. With ``"absolute"``
    and ``"one_sided"`` the multipliers never decrease and mini-batch noise keeps ``|J_a − J|``
    positive, so a too large step makes them grow until training diverges. Keep it small
    (about 0.01 per optimizer step) or use ``"signed"`` (the default), whose multipliers shrink
    again: in ``benchmarks/bench_group_equalized.py`` (imbalanced digits, 97 % sparsity, 10
    seeds) it matched ``"absolute"`` on worst-class recall at η_λ = 0.01 (70.8 ± 4.7 vs
    69.2 ± 3.7) and stayed stable at η_λ = 0.05, where the absolute form collapsed (worst class
    6.2 %).

    Args:
        constraint: ``"signed"`` (default), ``"absolute"`` or ``"one_sided"``.
        tolerance: ε ≥ 0 in the constraint (must be 0 with free multipliers).
        nonnegative: project on λ ≥ 0 after each dual step; ``False`` (free multipliers of the
            equalities ``J_a = J``) needs ``constraint="signed"``.
        multiplier_init: initial value of every multiplier.

    Example:
        >>> Equalize("absolute", 0.1)
        Equalize(constraint='absolute', tolerance=0.1, nonnegative=True, multiplier_init=0.0)
    """

    has_dual_step = True

    def __init__(
        self,
        constraint: ConstraintName = "signed",
        tolerance: float = 0.0,
        *,
        nonnegative: bool = True,
        multiplier_init: float = 0.0,
    ) -> None:
        self.constraint: str = check_choice(constraint, "constraint", CONSTRAINTS)
        self.tolerance = check_real(tolerance, "tolerance", low=0.0)
        self.nonnegative = bool(nonnegative)
        if not self.nonnegative and constraint != "signed":
            raise ValueError(
                "Expected `nonnegative=True` unless constraint='signed' (the multipliers of "
                f"constraint={constraint!r} only grow), but got nonnegative=False"
            )
        if not self.nonnegative and self.tolerance != 0.0:
            raise ValueError(
                "Expected `tolerance=0` with free multipliers (nonnegative=False encodes the "
                f"equality J_a = J), but got tolerance={tolerance!r}"
            )
        low = 0.0 if self.nonnegative else None
        self.multiplier_init = check_real(multiplier_init, "multiplier_init", low=low)

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return {
            "strategy": "Equalize",
            "constraint": self.constraint,
            "tolerance": self.tolerance,
            "nonnegative": self.nonnegative,
            "multiplier_init": self.multiplier_init,
        }

    def initial_multipliers(self, num_groups: int) -> Tensor:  # noqa: D102
        return torch.full((num_groups,), self.multiplier_init)

    def reset_value(self, loss: GroupLoss, value: float | None) -> Tensor:  # noqa: D102
        if value is None:
            return self.initial_multipliers(loss.num_groups)
        check_real(value, "value", low=0.0 if self.nonnegative else None)
        return torch.full((loss.num_groups,), float(value))

    def primal(self, loss: GroupLoss, terms: GroupTerms) -> Tensor:  # noqa: D102
        c = constraint_values(terms.group_losses - terms.objective, self.constraint, self.tolerance)
        lam = loss.multipliers.detach().to(device=c.device, dtype=c.dtype)
        penalty = torch.where(terms.present, lam * c, torch.zeros_like(c)).sum()
        return terms.objective + penalty

    def violations(self, loss: GroupLoss, stats: Statistics) -> Tensor:  # noqa: D102
        return constraint_values(group_gaps(stats), self.constraint, self.tolerance)

    def dual_update(self, loss: GroupLoss, lr: float, stats: Statistics) -> Tensor:  # noqa: D102
        v = self.violations(loss, stats)
        update = torch.where(~torch.isnan(v), v * lr, torch.zeros_like(v))
        new = loss.multipliers.to(torch.float64) + update
        _project(loss, torch.relu(new) if self.nonnegative else new)
        return v


class DRO(Weighting):
    """Group DRO (Sagawa et al., ICLR 2020): ``Σ_a q_a J_a`` with exponentiated-gradient ``q``.

    The multipliers are the group weights ``q`` (uniform at the start, on the simplex). Primal:
    ``Σ_a q_a J_a / Σ_{a present} q_a`` over the groups present in the batch. Dual: Sagawa's
    ``q_a ← q_a · exp(lr · J_a)`` for every group with samples (absent groups: factor 1), then
    renormalized. Violations: the gaps ``J_a − J`` (what a driver logs).

    Example:
        >>> DRO().initial_multipliers(4)
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    has_dual_step = True

    def initial_multipliers(self, num_groups: int) -> Tensor:  # noqa: D102
        return torch.full((num_groups,), 1.0 / num_groups)

    def primal(self, loss: GroupLoss, terms: GroupTerms) -> Tensor:  # noqa: D102
        group_losses, present = terms.group_losses, terms.present
        q = loss.multipliers.detach().to(device=group_losses.device, dtype=group_losses.dtype)
        q = torch.where(present, q, torch.zeros_like(q))
        mass = q.sum()
        if not bool(mass > 0):  # every present group has weight 0 (cannot happen with exp)
            return terms.objective
        return (torch.where(present, q * group_losses, torch.zeros_like(q))).sum() / mass

    def dual_update(self, loss: GroupLoss, lr: float, stats: Statistics) -> Tensor:  # noqa: D102
        sums, counts = stats["loss"], stats["count"]
        present = counts > 0
        if bool(present.any()):
            group_losses = sums / counts.clamp_min(_TINY)
            # subtract the largest exponent (a constant factor, removed by the normalization)
            expo = torch.where(present, lr * group_losses, torch.zeros_like(group_losses))
            q = loss.multipliers.to(torch.float64) * torch.exp(expo - expo.max())
            _project(loss, q / q.sum())
        return group_gaps(stats)


class Fixed(Weighting):
    """Static group weights ``Σ_i v_{g_i} ℓ_i / Σ_i v_{g_i}`` (no dual variables).

    The multipliers hold ``v``. Violations: the gaps ``J_a − J`` of the unweighted per-group
    losses (what a driver logs).

    Args:
        weights: ``v``, shape (G,), finite, >= 0, not all 0.

    Example:
        >>> Fixed([1.0, 3.0]).initial_multipliers(2)
        tensor([1., 3.])
    """

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        v = check_vector(weights, "weights", low=0.0, what="weights", nonempty=True, nonzero=True)
        self.weights = v.to(torch.float32)

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return {"strategy": "Fixed", "weights": self.weights.tolist()}

    def initial_multipliers(self, num_groups: int) -> Tensor:  # noqa: D102
        return self.weights.clone()

    def bind(self, loss: GroupLoss) -> None:  # noqa: D102
        if self.weights.numel() != loss.num_groups:
            raise ValueError(
                f"Expected `weights` to hold one weight per group ({loss.num_groups}), but got "
                f"{self.weights.numel()}"
            )

    def primal(self, loss: GroupLoss, terms: GroupTerms) -> Tensor:  # noqa: D102
        num = terms.num
        v = loss.multipliers.detach().to(device=num.device, dtype=num.dtype)[terms.groups]
        weight_sum = (v * terms.den).sum()
        if loss.validate_inputs and not bool(weight_sum > 0):
            raise ValueError(
                "Expected a positive total group weight in the batch, but got 0 (every sample "
                "belongs to a group of weight 0)"
            )
        return (v * num).sum() / weight_sum


def inverse_frequency_weights(counts: Tensor | Sequence[float]) -> Tensor:
    """Static inverse-frequency weights ``v_a = N / (G' · n_a)`` (0 for absent groups).

    ``N`` is the total count and ``G'`` the number of groups with samples, so the weighted
    mean of a constant loss is that constant and every present group gets the same total
    weight (scikit-learn's ``class_weight="balanced"``).

    Args:
        counts: samples per group, shape (G,), >= 0, at least one positive.

    Returns:
        float32 weights (G,).

    Example:
        >>> inverse_frequency_weights([30.0, 10.0, 0.0])
        tensor([0.6667, 2.0000, 0.0000])
    """
    c = check_vector(counts, "counts", low=0.0, what="counts", nonzero=True)
    present = c > 0
    w = torch.where(present, c.sum() / (int(present.sum()) * c.clamp_min(1e-300)), 0.0)
    return w.to(torch.float32)


class GroupEqualizedLoss(GroupLoss):
    """``J + Σ_a λ_a · c(J_a − J)``: a `GroupLoss` with the `Equalize` strategy.

    ``J`` is the batch's mean loss (``F.cross_entropy(logits, targets, weight=weight,
    label_smoothing=...)`` exactly), ``J_a`` the same mean over group ``a``, ``c`` the
    `constraint_values` and λ the detached ``multipliers`` buffer; absent groups add no term.
    While ``active`` is ``False`` it is exactly ``J`` (`GroupEqualizer`'s warm-up and "start
    after pruning"). `dual_step(lr)` applies ``λ_a ← max(0, λ_a + lr · c_a)`` (see `Equalize`
    for choosing ``lr``), usually driven by `GroupEqualizer`.

    Args:
        num_groups: number of groups G; group ids are int64 in ``[0, G)``.
        base_loss: ``"cross_entropy"``, a callable or ``None`` (see `GroupLoss`).
        constraint: ``"signed"`` (default), ``"absolute"`` or ``"one_sided"``.
        tolerance: ε ≥ 0 in the constraint.
        label_smoothing: passed to cross-entropy.
        weight: class weights for cross-entropy, shape (C,).
        nonnegative: project the multipliers on λ ≥ 0 (see `Equalize`).
        multiplier_init: initial value of every multiplier.
        active: whether the Lagrangian term is applied (``False``: plain ``J``).
        validate_inputs: check target and group ranges and finiteness on every call.

    Example:
        >>> loss_fn = GroupEqualizedLoss(num_groups=3)
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
        >>> targets = torch.tensor([0, 1, 2])
        >>> loss_fn(logits, targets)  # λ = 0: the plain mean cross-entropy
        tensor(0.5285)
        >>> loss_fn.dual_step(lr=1.0)  # λ_a ← max(0, λ_a + (J_a − J)), returns J_a − J
        tensor([-0.2889,  0.0230,  0.2659], dtype=torch.float64)
        >>> loss_fn.multipliers  # only the groups above the mean loss get a multiplier
        tensor([0.0000, 0.0230, 0.2659])
        >>> round(float(loss_fn(logits, targets)), 4)  # J + Σ λ_a (J_a − J)
        0.5997
    """

    def __init__(
        self,
        num_groups: int,
        base_loss: str | PerSampleLoss | None = "cross_entropy",
        constraint: ConstraintName = "signed",
        tolerance: float = 0.0,
        label_smoothing: float = 0.0,
        weight: Tensor | Sequence[float] | None = None,
        nonnegative: bool = True,
        multiplier_init: float = 0.0,
        active: bool = True,
        validate_inputs: bool = True,
    ) -> None:
        strategy = Equalize(
            constraint, tolerance, nonnegative=nonnegative, multiplier_init=multiplier_init
        )
        super().__init__(
            num_groups,
            strategy,
            base_loss=base_loss,
            label_smoothing=label_smoothing,
            weight=weight,
            active=active,
            validate_inputs=validate_inputs,
        )
        self.constraint: str = strategy.constraint
        self.tolerance = strategy.tolerance
        self.nonnegative = strategy.nonnegative


class GroupDROLoss(GroupLoss):
    """Group DRO: a `GroupLoss` with the `DRO` strategy (``multipliers`` hold ``q``).

    Sagawa's algorithm updates ``q`` after every batch: use
    ``GroupEqualizer(dual_lr=η, every_n_steps=1)``; they used ``η`` in {0.001, 0.01, 0.1}.
    ``J_a`` comes from the accumulated (all-reduced) sums, so every process holds the same ``q``.

    Args:
        num_groups: number of groups G.
        base_loss: as in `GroupLoss`.
        label_smoothing: passed to cross-entropy.
        weight: class weights for cross-entropy.
        active: whether the DRO objective is applied (``False``: plain ``J``).
        validate_inputs: as in `GroupLoss`.

    Example:
        >>> loss_fn = GroupDROLoss(num_groups=2)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> loss_fn(logits, torch.tensor([0, 1]))  # q = (1/2, 1/2): the mean of J_0 and J_1
        tensor(0.4100)
        >>> loss_fn.dual_step(1.0)  # q_a ∝ q_a exp(J_a); returns J_a − J
        tensor([-0.2831,  0.2831], dtype=torch.float64)
        >>> loss_fn.multipliers
        tensor([0.3621, 0.6379])
    """

    def __init__(
        self,
        num_groups: int,
        base_loss: str | PerSampleLoss | None = "cross_entropy",
        label_smoothing: float = 0.0,
        weight: Tensor | Sequence[float] | None = None,
        active: bool = True,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__(
            num_groups,
            DRO(),
            base_loss=base_loss,
            label_smoothing=label_smoothing,
            weight=weight,
            active=active,
            validate_inputs=validate_inputs,
        )


class GroupWeightedLoss(GroupLoss):
    """Static group weights ``Σ_i v_{g_i} ℓ_i / Σ_i v_{g_i}``: a `GroupLoss` with `Fixed`.

    The baseline the adaptive remedies must beat; with groups = classes and
    ``v = inverse_frequency_weights(class counts)`` it equals
    ``F.cross_entropy(logits, targets, weight=v)``. It needs no `GroupEqualizer` (one may drive
    it to log the gaps ``J_a − J``: `dual_step` returns them and changes nothing).

    Args:
        group_weights: ``v``, shape (G,), finite, >= 0, not all 0.
        base_loss: as in `GroupLoss`.
        label_smoothing: passed to cross-entropy.
        active: whether the weights are applied (``False``: plain mean ``J``).
        validate_inputs: as in `GroupLoss`.

    Example:
        >>> loss_fn = GroupWeightedLoss([1.0, 3.0])
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> loss_fn(logits, torch.tensor([0, 1]))  # (1·0.1269 + 3·0.6931) / 4
        tensor(0.5516)
    """

    def __init__(
        self,
        group_weights: Tensor | Sequence[float],
        base_loss: str | PerSampleLoss | None = "cross_entropy",
        label_smoothing: float = 0.0,
        active: bool = True,
        validate_inputs: bool = True,
    ) -> None:
        v = check_vector(
            group_weights, "group_weights", low=0.0, what="weights", nonempty=True, nonzero=True
        )
        super().__init__(
            int(v.numel()),
            Fixed(v),
            base_loss=base_loss,
            label_smoothing=label_smoothing,
            active=active,
            validate_inputs=validate_inputs,
        )
