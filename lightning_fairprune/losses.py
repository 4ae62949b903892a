"""The group-equalized loss of Tran et al.: a Lagrangian that pulls every group's loss to the mean.

Fine-tuning a pruned model on the constrained problem (methods.md, section 5)

    min_θ J(θ; D)   subject to   J(θ; D_a) − J(θ; D) = 0   for every group a

through its Lagrangian ℒ(θ, λ) = J + Σ_a λ_a · c_a, with primal descent on θ (the user's
optimizer, through the value `GroupEqualizedLoss.forward` returns) and projected dual ascent on
the multipliers λ (`GroupEqualizedLoss.dual_step`, usually driven by the
`lightning_fairprune.callbacks.equalizer.GroupEqualizer` callback).

Plain torch: nothing here imports Lightning.

Design notes (Cooper's lessons):

* the multipliers are a registered buffer, so they move with ``.to()`` and live in the
  model's ``state_dict`` (and hence in every Lightning checkpoint);
* the primal term uses detached multipliers (no gradient flows into λ);
* the dual step works on detached, float64 per-group loss *sums and counts*, which are
  additive over batches and processes, and projects with ``relu`` afterwards;
* the per-group sums accumulated since the last dual step are plain tensor attributes, not
  buffers: DistributedDataParallel broadcasts every buffer from rank 0 before each forward,
  which would silently overwrite the other ranks' local sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONSTRAINTS",
    "GroupDROLoss",
    "GroupEqualizedLoss",
    "GroupWeightedLoss",
    "constraint_values",
    "inverse_frequency_weights",
]

ConstraintName = Literal["absolute", "signed", "one_sided"]
CONSTRAINTS: tuple[str, ...] = ("absolute", "signed", "one_sided")
PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


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
        Tensor of the same shape as ``gaps``.

    Example:
        >>> gaps = torch.tensor([-0.3, 0.1, 0.5])
        >>> constraint_values(gaps, "absolute")
        tensor([0.3000, 0.1000, 0.5000])
        >>> constraint_values(gaps, "signed")
        tensor([-0.3000,  0.1000,  0.5000])
        >>> constraint_values(gaps, "one_sided", tolerance=0.2)
        tensor([0.0000, 0.0000, 0.3000])
    """
    _check_constraint(constraint)
    if constraint == "absolute":
        return torch.relu(gaps.abs() - tolerance)
    if constraint == "signed":
        return gaps - tolerance
    return torch.relu(gaps - tolerance)


def _check_constraint(constraint: object) -> None:
    if constraint not in CONSTRAINTS:
        raise ValueError(
            f"Expected `constraint` to be one of {CONSTRAINTS}, but got {constraint!r}"
        )


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


class GroupEqualizedLoss(nn.Module):
    """Per-sample base loss plus the group-equalization Lagrangian term.

    ``forward`` returns ``ℒ = J + Σ_a λ_a · c_a`` where

    * ``J = Σ_i w_i ℓ_i / Σ_i w_i`` is the mean loss of the batch (``w_i`` = class weight of the
      sample's target when ``weight`` is given, else 1, so ``J`` equals
      ``F.cross_entropy(logits, targets, weight=weight, label_smoothing=...)`` exactly);
    * ``J_a`` is the same mean over the samples of group ``a``;
    * ``c_a = constraint_values(J_a − J, constraint, tolerance)`` (see `constraint_values`);
    * ``λ`` are the detached multipliers (the buffer ``multipliers``); groups absent from the
      batch add no term.

    While ``active`` is ``False`` the loss is exactly ``J`` (the multipliers are kept but not
    applied): `GroupEqualizer` uses this for its warm-up and for "start after pruning".

    In training mode every call also adds the batch's detached per-group loss sums and weight
    counts (float64) to accumulators read by `dual_step`; in eval mode nothing is accumulated,
    so validation does not leak into the dual updates.

    Choosing the dual step: the Lagrangian weighs sample ``i`` of group ``a`` by
    ``(1 − Σ_b λ_b s_b)/N + λ_a s_a/N_a`` (``s_b`` the sign of the constraint's slope), so once
    the multipliers sum past about 1 some samples get a *negative* weight and descent raises
    their loss. With ``"absolute"`` and ``"one_sided"`` the multipliers never decrease, and
    mini-batch noise keeps ``|J_a − J|`` positive, so a too large dual step makes them grow
    until training diverges (measured in ``benchmarks/bench_group_equalized.py``). Keep the
    dual step small (about 0.01 per optimizer step) or use ``constraint="signed"`` (the
    default), whose multipliers shrink again once a group is no longer worse than the mean.

    Why ``"signed"`` is the default: in ``benchmarks/bench_group_equalized.py`` (imbalanced
    digits, 97 % sparsity, 10 seeds) it matched or beat ``"absolute"`` on worst-class recall at
    η_λ = 0.01 (70.8 ± 4.7 vs 69.2 ± 3.7) and stayed stable at η_λ = 0.05 where the absolute
    form diverged (accuracy 56.8 %, worst class 6.2 %); on a protected-attribute dataset a user
    also saw the absolute form lower the worst group's accuracy (0.842 to 0.810) and the signed
    form not.

    Groups: pass them, ``loss(logits, targets, groups)``. Without ``groups`` the class targets
    are the groups, which is refused when the logits' number of classes differs from
    ``num_groups`` (a protected attribute with as many groups as there are classes cannot be
    told apart from that mistake: pass the groups).

    Args:
        num_groups: number of groups G; group ids are int64 in ``[0, G)``.
        base_loss: ``"cross_entropy"`` (default), a callable ``fn(inputs, targets) -> Tensor[N]``
            of per-sample losses (extra trailing dims are averaged per sample), or ``None`` when
            ``forward`` receives per-sample losses directly.
        constraint: ``"signed"`` (default), ``"absolute"`` or ``"one_sided"``.
        tolerance: ε ≥ 0 in the constraint (must be 0 with free multipliers).
        label_smoothing: passed to cross-entropy.
        weight: class weights for cross-entropy, shape (C,).
        nonnegative: project the multipliers on λ ≥ 0 after each dual step (default, as in
            methods.md). ``False`` (free multipliers, the Lagrange multipliers of the equality
            constraints ``J_a = J``) is only allowed with ``constraint="signed"``.
        multiplier_init: initial value of every multiplier.
        active: whether the Lagrangian term is applied (``False``: plain ``J``).
        validate_inputs: check shapes, target and group ranges and finiteness on every call
            (each check synchronizes a GPU once; turn off in tight loops you trust).

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

    multipliers: Tensor

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
        super().__init__()
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"Expected `num_groups` to be an int >= 1, but got {num_groups!r}")
        if not (base_loss is None or base_loss == "cross_entropy" or callable(base_loss)):
            raise ValueError(
                "Expected `base_loss` to be 'cross_entropy', a callable "
                f"`fn(inputs, targets) -> Tensor[N]` or None, but got {base_loss!r}"
            )
        _check_constraint(constraint)
        if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
            raise ValueError(
                f"Expected `tolerance` to be a finite float >= 0, but got {tolerance!r}"
            )
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(
                f"Expected `label_smoothing` to be a float in [0, 1], but got {label_smoothing!r}"
            )
        if base_loss != "cross_entropy" and (label_smoothing != 0.0 or weight is not None):
            raise ValueError(
                "`label_smoothing` and `weight` apply to base_loss='cross_entropy' only, but got "
                f"base_loss={base_loss!r}; fold them into your per-sample loss instead"
            )
        if not nonnegative and constraint != "signed":
            raise ValueError(
                "Expected `nonnegative=True` unless constraint='signed' (the multipliers of "
                f"constraint={constraint!r} only grow), but got nonnegative=False"
            )
        if not nonnegative and tolerance != 0.0:
            raise ValueError(
                "Expected `tolerance=0` with free multipliers (nonnegative=False encodes the "
                f"equality J_a = J), but got tolerance={tolerance!r}"
            )
        if not isinstance(multiplier_init, (int, float)) or not math.isfinite(multiplier_init):
            raise ValueError(
                f"Expected `multiplier_init` to be a finite float, but got {multiplier_init!r}"
            )
        if nonnegative and multiplier_init < 0:
            raise ValueError(
                f"Expected `multiplier_init` >= 0 with nonnegative multipliers, but got "
                f"{multiplier_init!r}"
            )
        self.num_groups = num_groups
        self.base_loss = base_loss
        self.constraint: str = constraint
        self.tolerance = float(tolerance)
        self.label_smoothing = float(label_smoothing)
        self.nonnegative = bool(nonnegative)
        self.active = bool(active)
        self.validate_inputs = bool(validate_inputs)
        if weight is not None:
            weight_t = torch.as_tensor(weight, dtype=torch.float32)
            if weight_t.dim() != 1 or not torch.isfinite(weight_t).all() or (weight_t < 0).any():
                raise ValueError(
                    "Expected `weight` to be a 1-D tensor of finite class weights >= 0, but got "
                    f"{weight!r}"
                )
            self.register_buffer("weight", weight_t)
        else:
            self.weight: Tensor | None = None
        self.register_buffer("multipliers", torch.full((num_groups,), float(multiplier_init)))
        self._loss_sums: Tensor | None = None
        self._counts: Tensor | None = None
        self.last_objective: Tensor | None = None
        self.last_group_losses: Tensor | None = None

    def extra_repr(self) -> str:  # noqa: D102
        base = (
            self.base_loss
            if isinstance(self.base_loss, str) or self.base_loss is None
            else (getattr(self.base_loss, "__name__", type(self.base_loss).__name__))
        )
        return (
            f"num_groups={self.num_groups}, base_loss={base}, constraint={self.constraint!r}, "
            f"tolerance={self.tolerance}, nonnegative={self.nonnegative}, active={self.active}"
        )

    # ------------------------------------------------------------------ per-sample losses
    def _per_sample(self, inputs: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """Return (numerator[N], denominator[N]): weighted loss sum and weight sum per sample."""
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise TypeError(
                "Expected the first argument to be a floating-point tensor of "
                f"{'per-sample losses' if self.base_loss is None else 'model outputs'}, but got "
                f"{type(inputs).__name__}"
                + (f" of dtype {inputs.dtype}" if isinstance(inputs, Tensor) else "")
            )
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError(
                f"Expected a non-empty batch (first dim >= 1), but got shape {_shape(inputs)}"
            )
        n = inputs.shape[0]
        if self.base_loss is None:
            per = inputs
        elif self.base_loss == "cross_entropy":
            per = self._cross_entropy(inputs, targets)
            if self.weight is not None:
                assert targets is not None  # checked in _cross_entropy
                w = self.weight.to(per.dtype)[targets]
                return per.reshape(n, -1).sum(1), w.reshape(n, -1).sum(1)
        else:
            if targets is None:
                raise ValueError("Expected `targets` for a callable `base_loss`, but got None")
            per = self.base_loss(inputs, targets)
            if not isinstance(per, Tensor) or per.dim() == 0 or per.shape[0] != n:
                got = _shape(per) if isinstance(per, Tensor) else type(per).__name__
                raise ValueError(
                    f"Expected `base_loss` to return per-sample losses of shape ({n}, ...), "
                    f"but got {got}"
                )
        flat = per.reshape(n, -1)
        return flat.sum(1), torch.full(
            (n,), float(flat.shape[1]), dtype=flat.dtype, device=flat.device
        )

    def _cross_entropy(self, logits: Tensor, targets: Tensor | None) -> Tensor:
        if targets is None:
            raise ValueError("Expected `targets` (class indices) for cross-entropy, but got None")
        if logits.dim() < 2:
            raise ValueError(
                f"Expected `logits` of shape (N, C, ...), but got shape {_shape(logits)}"
            )
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(
                "Expected `targets` to be integer class indices (soft labels: pass a callable "
                f"`base_loss`), but got dtype {targets.dtype}"
            )
        expected = (logits.shape[0], *logits.shape[2:])
        if _shape(targets) != expected:
            raise ValueError(
                f"Expected `targets` of shape {expected} to match `logits` of shape "
                f"{_shape(logits)}, but got {_shape(targets)}"
            )
        num_classes = logits.shape[1]
        if self.weight is not None and self.weight.numel() != num_classes:
            raise ValueError(
                f"Expected `weight` to have one entry per class ({num_classes}), but got "
                f"{self.weight.numel()}"
            )
        if self.validate_inputs:
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(
                    f"Expected `targets` in [0, {num_classes}), but got values in [{lo}, {hi}]"
                )
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        return F.cross_entropy(
            logits, targets, weight=weight, reduction="none", label_smoothing=self.label_smoothing
        )

    def _check_groups(self, groups: Tensor | None, targets: Tensor | None, n: int) -> Tensor:
        if groups is None:
            if targets is None:
                raise ValueError("Expected `groups` (or `targets` to use as groups), but got None")
            groups = targets
            what = "`targets` (used as groups)"
        else:
            what = "`groups`"
        if (
            not isinstance(groups, Tensor)
            or groups.is_floating_point()
            or groups.dtype == torch.bool
        ):
            raise TypeError(
                f"Expected {what} to be an integer tensor of group ids, but got "
                + (f"dtype {groups.dtype}" if isinstance(groups, Tensor) else type(groups).__name__)
            )
        if _shape(groups) != (n,):
            raise ValueError(f"Expected {what} of shape ({n},), but got {_shape(groups)}")
        if self.validate_inputs:
            lo, hi = int(groups.min()), int(groups.max())
            if lo < 0 or hi >= self.num_groups:
                raise ValueError(
                    f"Expected {what} ids in [0, {self.num_groups}) (num_groups="
                    f"{self.num_groups}), but got values in [{lo}, {hi}]"
                )
        return groups.long()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        inputs: Tensor,
        targets: Tensor | None = None,
        groups: Tensor | None = None,
    ) -> Tensor:
        """Return ``J + Σ_a λ_a·c_a`` (or ``J`` while inactive) for one batch.

        Args:
            inputs: logits (N, C, ...) for cross-entropy, model outputs for a callable base
                loss, or per-sample losses (N, ...) when ``base_loss=None``.
            targets: class indices (N, ...) (not needed with ``base_loss=None`` if ``groups``
                is given).
            groups: group id per sample, int (N,); defaults to ``targets`` (refused for logits
                whose number of classes differs from ``num_groups``).

        Returns:
            Scalar tensor to back-propagate.

        Raises:
            ValueError: mismatched shapes, ids out of range, an empty batch or non-finite losses.
            TypeError: wrong dtypes.
        """
        if (
            groups is None
            and self.base_loss == "cross_entropy"
            and isinstance(inputs, Tensor)
            and inputs.ndim >= 2
            and inputs.shape[1] != self.num_groups
        ):
            raise ValueError(
                f"Expected `groups` (one group id per sample): without them the class targets "
                f"are the groups, but the logits have {inputs.shape[1]} classes and "
                f"`num_groups`={self.num_groups}. Call `loss(logits, targets, groups)`."
            )
        num, den = self._per_sample(inputs, targets)
        n = num.shape[0]
        groups = self._check_groups(groups, targets, n)
        if self.validate_inputs and not bool(torch.isfinite(num).all()):
            bad = int((~torch.isfinite(num)).sum())
            raise ValueError(
                f"Expected finite per-sample losses, but got {bad} non-finite value(s) (NaN or "
                f"inf) in a batch of {n}; check the model outputs and the learning rate"
            )
        den = den.detach()
        sums = num.new_zeros(self.num_groups).index_add(0, groups, num)
        counts = den.new_zeros(self.num_groups).index_add(0, groups, den)
        total = den.sum()
        if self.validate_inputs and not bool(total > 0):
            raise ValueError(
                "Expected a positive total sample weight in the batch, but got 0 (all class "
                "weights of the batch's targets are zero)"
            )
        objective = num.sum() / total
        present = counts > 0
        group_losses = sums / counts.clamp_min(torch.finfo(counts.dtype).tiny)
        self.last_objective = objective.detach()
        self.last_group_losses = torch.where(
            present, group_losses.detach(), torch.full_like(group_losses, float("nan"))
        )
        if self.training:
            self._accumulate(sums.detach(), counts)
        if not self.active:
            return objective
        c = constraint_values(group_losses - objective, self.constraint, self.tolerance)
        lam = self.multipliers.detach().to(device=c.device, dtype=c.dtype)
        penalty = torch.where(present, lam * c, torch.zeros_like(c)).sum()
        return objective + penalty

    # ------------------------------------------------------------------ accumulators
    def _accumulate(self, sums: Tensor, counts: Tensor) -> None:
        sums = sums.to(torch.float64)
        counts = counts.to(torch.float64)
        if self._loss_sums is None or self._loss_sums.device != sums.device:
            self._loss_sums = torch.zeros(self.num_groups, dtype=torch.float64, device=sums.device)
            self._counts = torch.zeros_like(self._loss_sums)
        assert self._counts is not None
        self._loss_sums += sums
        self._counts += counts

    @property
    def accumulated(self) -> tuple[Tensor, Tensor]:
        """Detached float64 (loss_sums[G], counts[G]) accumulated since the last dual step/reset.

        On the device of ``multipliers``; zeros when nothing was accumulated.
        """
        device = self.multipliers.device
        if self._loss_sums is None or self._counts is None:
            zeros = torch.zeros(self.num_groups, dtype=torch.float64, device=device)
            return zeros, zeros.clone()
        return self._loss_sums.to(device).clone(), self._counts.to(device).clone()

    def set_accumulated(
        self, loss_sums: Tensor | Sequence[float], counts: Tensor | Sequence[float]
    ) -> None:
        """Replace the accumulators (used when restoring a checkpoint).

        Example:
            >>> loss_fn = GroupEqualizedLoss(2)
            >>> loss_fn.set_accumulated([1.0, 3.0], [2.0, 2.0])
            >>> loss_fn.violations()  # signed: J_a − J
            tensor([-0.5000,  0.5000], dtype=torch.float64)
        """
        sums_t, counts_t = self._check_sums(loss_sums, counts)
        self._loss_sums, self._counts = sums_t, counts_t

    def reset_accumulators(self) -> None:
        """Forget the per-group sums accumulated since the last dual step."""
        self._loss_sums = None
        self._counts = None

    def reset_multipliers(self, value: float = 0.0) -> None:
        """Set every multiplier to ``value`` (in place; the buffer keeps its device)."""
        if self.nonnegative and value < 0:
            raise ValueError(f"Expected `value` >= 0 with nonnegative multipliers, but got {value}")
        with torch.no_grad():
            self.multipliers.fill_(float(value))

    # ------------------------------------------------------------------ dual side
    def _check_sums(
        self, loss_sums: Tensor | Sequence[float], counts: Tensor | Sequence[float]
    ) -> tuple[Tensor, Tensor]:
        device = self.multipliers.device
        sums_t = torch.as_tensor(loss_sums, dtype=torch.float64).detach().to(device)
        counts_t = torch.as_tensor(counts, dtype=torch.float64).detach().to(device)
        g = self.num_groups
        if _shape(sums_t) != (g,) or _shape(counts_t) != (g,):
            raise ValueError(
                f"Expected `loss_sums` and `counts` of shape ({g},), but got "
                f"{_shape(sums_t)} and {_shape(counts_t)}"
            )
        if not bool(torch.isfinite(sums_t).all()) or not bool(torch.isfinite(counts_t).all()):
            raise ValueError(
                "Expected finite per-group `loss_sums` and `counts`, but got NaN or inf "
                f"(loss_sums={sums_t.tolist()}, counts={counts_t.tolist()})"
            )
        if bool((counts_t < 0).any()):
            raise ValueError(f"Expected `counts` >= 0, but got {counts_t.tolist()}")
        return sums_t, counts_t

    def violations(
        self,
        loss_sums: Tensor | Sequence[float] | None = None,
        counts: Tensor | Sequence[float] | None = None,
    ) -> Tensor:
        """Constraint values ``c_a`` from per-group sums (float64; NaN for absent groups).

        ``J_a = loss_sums[a] / counts[a]`` and ``J = Σ loss_sums / Σ counts``. Without
        arguments, uses the accumulators (nothing is reset).

        Example:
            >>> GroupEqualizedLoss(3).violations([2.0, 0.0, 9.0], [2.0, 0.0, 3.0])
            tensor([-1.2000,     nan,  0.8000], dtype=torch.float64)
        """
        if (loss_sums is None) != (counts is None):
            raise ValueError("Expected both `loss_sums` and `counts`, or neither")
        if loss_sums is None or counts is None:
            sums_t, counts_t = self.accumulated
        else:
            sums_t, counts_t = self._check_sums(loss_sums, counts)
        present = counts_t > 0
        nan = torch.full_like(sums_t, float("nan"))
        if not bool(present.any()):
            return nan
        overall = sums_t.sum() / counts_t.sum()
        group_losses = sums_t / counts_t.clamp_min(torch.finfo(torch.float64).tiny)
        c = constraint_values(group_losses - overall, self.constraint, self.tolerance)
        return torch.where(present, c, nan)

    @torch.no_grad()
    def dual_step(
        self,
        lr: float,
        loss_sums: Tensor | Sequence[float] | None = None,
        counts: Tensor | Sequence[float] | None = None,
    ) -> Tensor:
        """One projected dual-ascent step ``λ_a ← max(0, λ_a + lr·c_a)``; resets the accumulators.

        The violations come from ``loss_sums``/``counts`` when given (e.g. all-reduced over
        processes), else from the accumulators. Absent groups (count 0) keep their multiplier.
        The projection on λ ≥ 0 is skipped when ``nonnegative=False``.

        Args:
            lr: dual step size η_λ >= 0.
            loss_sums: per-group sums of (weighted) losses, shape (G,).
            counts: per-group sample (weight) counts, shape (G,).

        Returns:
            The violations used (float64, NaN for absent groups).

        Example:
            >>> loss_fn = GroupEqualizedLoss(2, constraint="signed")
            >>> loss_fn.dual_step(0.5, loss_sums=[1.0, 3.0], counts=[2.0, 2.0])
            tensor([-0.5000,  0.5000], dtype=torch.float64)
            >>> loss_fn.multipliers  # group 0 is better than the mean: projected to 0
            tensor([0.0000, 0.2500])
        """
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr < 0
        ):
            raise ValueError(
                f"Expected the dual step `lr` to be a finite float >= 0, but got {lr!r}"
            )
        v = self.violations(loss_sums, counts)
        present = ~torch.isnan(v)
        update = torch.where(present, v * lr, torch.zeros_like(v))
        new = self.multipliers.to(torch.float64) + update
        if self.nonnegative:
            new = torch.relu(new)
        self.multipliers.copy_(new.to(self.multipliers.dtype))
        self.reset_accumulators()
        return v


# --------------------------------------------------------------------------- siblings
#
# Fine-tuning remedies with the interface of `GroupEqualizedLoss` (they subclass it, so the
# `GroupEqualizer` callback drives them unchanged: ``active``, the accumulators, the
# ``multipliers`` buffer, ``violations`` and ``dual_step``).


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
    c = torch.as_tensor(counts, dtype=torch.float64)
    if c.dim() != 1 or not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        raise ValueError(
            f"Expected `counts` to be a 1-D tensor of finite counts >= 0, but got {counts!r}"
        )
    present = c > 0
    if not bool(present.any()):
        raise ValueError(f"Expected at least one positive entry in `counts`, but got {counts!r}")
    w = torch.where(present, c.sum() / (int(present.sum()) * c.clamp_min(1e-300)), 0.0)
    return w.to(torch.float32)


class _GroupTermsMixin:
    """Shared per-batch work of the siblings: per-sample losses, groups, accumulation."""

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, active={self.active}"

    def _group_terms(
        self, inputs: Tensor, targets: Tensor | None, groups: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Return (num[N], den[N], groups[N], group_sums[G], group_counts[G]); accumulate."""
        loss = self  # type: ignore[assignment]
        num, den = loss._per_sample(inputs, targets)  # type: ignore[attr-defined]
        n = num.shape[0]
        groups = loss._check_groups(groups, targets, n)  # type: ignore[attr-defined]
        if loss.validate_inputs and not bool(torch.isfinite(num).all()):  # type: ignore[attr-defined]
            bad = int((~torch.isfinite(num)).sum())
            raise ValueError(
                f"Expected finite per-sample losses, but got {bad} non-finite value(s) (NaN or "
                f"inf) in a batch of {n}; check the model outputs and the learning rate"
            )
        den = den.detach()
        g = loss.num_groups  # type: ignore[attr-defined]
        sums = num.new_zeros(g).index_add(0, groups, num)
        counts = den.new_zeros(g).index_add(0, groups, den)
        if loss.training:  # type: ignore[attr-defined]
            loss._accumulate(sums.detach(), counts)  # type: ignore[attr-defined]
        return num, den, groups, sums, counts


class GroupDROLoss(_GroupTermsMixin, GroupEqualizedLoss):
    """Group DRO (Sagawa et al., ICLR 2020): ``Σ_a q_a J_a`` with exponentiated-gradient ``q``.

    The ``multipliers`` buffer holds the group weights ``q`` (on the simplex, uniform at the
    start). ``forward`` returns ``Σ_a q_a J_a / Σ_{a present} q_a`` over the groups present in
    the batch (``J_a`` the group's mean loss; the plain mean ``J`` while ``active`` is
    ``False``). `dual_step` with step size ``η`` (the `GroupEqualizer`'s ``dual_lr``) applies
    Sagawa's update ``q_a ← q_a · exp(η · J_a)`` for every group with samples (absent groups:
    factor 1), then renormalizes; ``J_a`` comes from the accumulated (all-reduced) sums, so
    every process holds the same ``q``. `violations` returns the gaps ``J_a − J`` (what the
    callback logs). Sagawa's algorithm updates ``q`` after every batch: use
    ``GroupEqualizer(dual_lr=η, every_n_steps=1)``; they used ``η`` in {0.001, 0.01, 0.1}.

    Args:
        num_groups: number of groups G.
        base_loss: as in `GroupEqualizedLoss`.
        label_smoothing: passed to cross-entropy.
        weight: class weights for cross-entropy.
        active: whether the DRO objective is applied (``False``: plain ``J``).
        validate_inputs: as in `GroupEqualizedLoss`.

    Example:
        >>> loss_fn = GroupDROLoss(num_groups=2)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> targets = torch.tensor([0, 1])
        >>> loss_fn(logits, targets)  # q = (1/2, 1/2): the mean of the two group losses
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
            base_loss=base_loss,
            constraint="signed",
            label_smoothing=label_smoothing,
            weight=weight,
            nonnegative=True,
            multiplier_init=1.0 / num_groups
            if isinstance(num_groups, int) and num_groups > 0
            else 0.0,
            active=active,
            validate_inputs=validate_inputs,
        )

    def forward(
        self, inputs: Tensor, targets: Tensor | None = None, groups: Tensor | None = None
    ) -> Tensor:
        """Return ``Σ_a q_a J_a`` over the groups present (or ``J`` while inactive).

        Args:
            inputs: logits, model outputs or per-sample losses (see `GroupEqualizedLoss`).
            targets: class indices.
            groups: group id per sample (default: ``targets``).

        Returns:
            Scalar tensor to back-propagate.
        """
        num, den, _, sums, counts = self._group_terms(inputs, targets, groups)
        total = den.sum()
        objective = num.sum() / total
        present = counts > 0
        group_losses = sums / counts.clamp_min(torch.finfo(counts.dtype).tiny)
        self.last_objective = objective.detach()
        self.last_group_losses = torch.where(
            present, group_losses.detach(), torch.full_like(group_losses, float("nan"))
        )
        if not self.active:
            return objective
        q = self.multipliers.detach().to(device=group_losses.device, dtype=group_losses.dtype)
        q = torch.where(present, q, torch.zeros_like(q))
        mass = q.sum()
        if not bool(mass > 0):  # every present group has weight 0 (cannot happen with exp)
            return objective
        return (torch.where(present, q * group_losses, torch.zeros_like(q))).sum() / mass

    def reset_multipliers(self, value: float | None = None) -> None:
        """Reset ``q`` to uniform (``value`` is accepted for compatibility and must be None)."""
        if value is not None:
            raise ValueError(
                f"Expected `value` to be None (group DRO weights reset to uniform), but got {value}"
            )
        with torch.no_grad():
            self.multipliers.fill_(1.0 / self.num_groups)

    @torch.no_grad()
    def dual_step(
        self,
        lr: float,
        loss_sums: Tensor | Sequence[float] | None = None,
        counts: Tensor | Sequence[float] | None = None,
    ) -> Tensor:
        """Exponentiated-gradient step ``q_a ← q_a exp(lr · J_a)``, renormalized; resets sums.

        Args:
            lr: step size η >= 0.
            loss_sums: per-group loss sums (G,), e.g. all-reduced; default: the accumulators.
            counts: per-group counts (G,).

        Returns:
            The gaps ``J_a − J`` (float64, NaN for absent groups).

        Example:
            >>> loss_fn = GroupDROLoss(2)
            >>> loss_fn.dual_step(0.5, loss_sums=[1.0, 3.0], counts=[2.0, 2.0])
            tensor([-0.5000,  0.5000], dtype=torch.float64)
            >>> loss_fn.multipliers  # ∝ (0.5·e^0.25, 0.5·e^0.75)
            tensor([0.3775, 0.6225])
        """
        if (
            isinstance(lr, bool)
            or not isinstance(lr, (int, float))
            or not math.isfinite(lr)
            or lr < 0
        ):
            raise ValueError(
                f"Expected the step size `lr` to be a finite float >= 0, but got {lr!r}"
            )
        if (loss_sums is None) != (counts is None):
            raise ValueError("Expected both `loss_sums` and `counts`, or neither")
        if loss_sums is None or counts is None:
            sums_t, counts_t = self.accumulated
        else:
            sums_t, counts_t = self._check_sums(loss_sums, counts)
        gaps = self.violations(sums_t, counts_t)
        present = counts_t > 0
        if bool(present.any()):
            group_losses = sums_t / counts_t.clamp_min(torch.finfo(torch.float64).tiny)
            # subtract the largest exponent (a constant factor, removed by the normalization)
            expo = torch.where(present, lr * group_losses, torch.zeros_like(group_losses))
            q = self.multipliers.to(torch.float64) * torch.exp(expo - expo.max())
            self.multipliers.copy_((q / q.sum()).to(self.multipliers.dtype))
        self.reset_accumulators()
        return gaps


class GroupWeightedLoss(_GroupTermsMixin, GroupEqualizedLoss):
    """Static group-weighted loss ``Σ_i v_{g_i} ℓ_i / Σ_i v_{g_i}`` (no dual variables).

    The baseline the adaptive remedies must beat. With groups = classes and
    ``v = inverse_frequency_weights(class counts)`` it equals
    ``F.cross_entropy(logits, targets, weight=v)``. `dual_step` changes nothing but resets
    the accumulators and returns the gaps ``J_a − J`` of the *unweighted* per-group losses, so
    the `GroupEqualizer` callback can log them. The ``multipliers`` buffer holds ``v``.

    Args:
        group_weights: ``v``, shape (G,), finite, >= 0, not all 0 (see
            `inverse_frequency_weights`).
        base_loss: as in `GroupEqualizedLoss`.
        label_smoothing: passed to cross-entropy.
        active: whether the weights are applied (``False``: plain mean ``J``).
        validate_inputs: as in `GroupEqualizedLoss`.

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
        v = torch.as_tensor(group_weights, dtype=torch.float32)
        if (
            v.dim() != 1
            or v.numel() == 0
            or not bool(torch.isfinite(v).all())
            or bool((v < 0).any())
            or not bool((v > 0).any())
        ):
            raise ValueError(
                "Expected `group_weights` to be a non-empty 1-D tensor of finite weights >= 0, "
                f"not all 0, but got {group_weights!r}"
            )
        super().__init__(
            int(v.numel()),
            base_loss=base_loss,
            constraint="signed",
            label_smoothing=label_smoothing,
            active=active,
            validate_inputs=validate_inputs,
        )
        with torch.no_grad():
            self.multipliers.copy_(v)

    def forward(
        self, inputs: Tensor, targets: Tensor | None = None, groups: Tensor | None = None
    ) -> Tensor:
        """Return the group-weighted mean loss (or the plain mean while inactive).

        Args:
            inputs: logits, model outputs or per-sample losses (see `GroupEqualizedLoss`).
            targets: class indices.
            groups: group id per sample (default: ``targets``).

        Returns:
            Scalar tensor to back-propagate.
        """
        num, den, groups_t, sums, counts = self._group_terms(inputs, targets, groups)
        objective = num.sum() / den.sum()
        present = counts > 0
        group_losses = sums / counts.clamp_min(torch.finfo(counts.dtype).tiny)
        self.last_objective = objective.detach()
        self.last_group_losses = torch.where(
            present, group_losses.detach(), torch.full_like(group_losses, float("nan"))
        )
        if not self.active:
            return objective
        v = self.multipliers.detach().to(device=num.device, dtype=num.dtype)[groups_t]
        weight_sum = (v * den).sum()
        if self.validate_inputs and not bool(weight_sum > 0):
            raise ValueError(
                "Expected a positive total group weight in the batch, but got 0 (every sample "
                "belongs to a group of weight 0)"
            )
        return (v * num).sum() / weight_sum

    def reset_multipliers(self, value: float = 0.0) -> None:
        """Static weights: nothing to reset (kept for interface compatibility)."""

    @torch.no_grad()
    def dual_step(
        self,
        lr: float,
        loss_sums: Tensor | Sequence[float] | None = None,
        counts: Tensor | Sequence[float] | None = None,
    ) -> Tensor:
        """No update (static weights); returns the gaps ``J_a − J`` and resets the sums.

        Example:
            >>> GroupWeightedLoss([1.0, 1.0]).dual_step(0.1, [1.0, 3.0], [2.0, 2.0])
            tensor([-0.5000,  0.5000], dtype=torch.float64)
        """
        gaps = self.violations(loss_sums, counts)
        self.reset_accumulators()
        return gaps
