"""The group-loss core: per-sample losses to per-group sums, written once; weighting by strategy.

`GroupLoss` turns a batch into per-sample losses, groups them (`GroupTerms`), accumulates the
detached per-group sums the dual step reads and keeps the last values, for every group loss.
How the groups are weighed is a `Weighting`, in the shape of Cooper's formulations
(cooper-org/cooper ``src/cooper/formulations/formulations.py``): it declares what it expects
(``has_dual_step``, ``expects_accuracy``, ``expects_reference``) and implements its primal
contribution (`Weighting.primal`) and its dual one (`Weighting.dual_update`), so a driver
(`lightning_fairprune.callbacks.equalizer.GroupEqualizer`) never asks which strategy it runs.

Multipliers (and state every process shares, such as a dense reference) are buffers: they
move with ``.to()`` and are checkpointed. The primal term uses them detached. The dual side
reads float64 per-group sums (`Statistics`), additive over batches and processes, which the
driver all-reduces. Accumulators and per-process history are plain attributes, not buffers:
DistributedDataParallel broadcasts buffers from rank 0 before each forward. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fairprune.checks import check_int, check_labels, check_real, check_vector
from lightning_fairprune.measure import isolated

__all__ = ["GroupLoss", "GroupTerms", "Statistics", "Weighting", "group_gaps", "measure_statistics"]

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
Statistics = dict[str, Tensor]
"""Detached float64 per-group sums by name (``"loss"``, ``"count"``; with accuracy also
``"correct"`` and ``"seen"``), each of shape (G,): additive over batches and processes."""

_TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class GroupTerms:
    """One batch reduced per group: what a strategy's primal contribution reads.

    Attributes:
        num: per-sample (weighted) loss sums, (N,), differentiable.
        den: per-sample weights (class weight times the number of loss entries), (N,), detached.
        groups: group id per sample, int64 (N,).
        sums: per-group sums of ``num``, (G,), differentiable.
        counts: per-group sums of ``den``, (G,), detached.
        objective: the mean loss ``J = Σ num / Σ den`` (differentiable).
        group_losses: ``J_a = sums / counts`` (0 for absent groups), differentiable.
        present: groups with samples, bool (G,).
        correct: per-sample accuracy in [0, 1] (float64, (N,)) when the strategy needs it.

    Example:
        >>> from lightning_fairprune.losses import GroupEqualizedLoss
        >>> logits, targets = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 1])
        >>> terms = GroupEqualizedLoss(2).terms(logits, targets, groups=torch.tensor([0, 0, 1]))
        >>> terms.counts, terms.present.tolist()
        (tensor([2., 1.]), [True, True])
        >>> terms.statistics(2)["loss"]  # detached float64 per-group sums
        tensor([0.8201, 0.3133], dtype=torch.float64)
    """  # noqa: E501

    num: Tensor
    den: Tensor
    groups: Tensor
    sums: Tensor
    counts: Tensor
    objective: Tensor
    group_losses: Tensor
    present: Tensor
    correct: Tensor | None = None

    def statistics(self, num_groups: int) -> Statistics:
        """The batch's detached float64 per-group sums (see `Statistics`)."""
        stats = {
            "loss": self.sums.detach().to(torch.float64),
            "count": self.counts.to(torch.float64),
        }
        if self.correct is not None:
            zeros = torch.zeros(num_groups, dtype=torch.float64, device=self.correct.device)
            stats["correct"] = zeros.index_add(0, self.groups, self.correct)
            stats["seen"] = zeros.index_add(0, self.groups, torch.ones_like(self.correct))
        return stats


def group_gaps(stats: Mapping[str, Tensor]) -> Tensor:
    """``J_a − J`` from per-group loss sums and counts (float64; NaN for absent groups).

    Example:
        >>> group_gaps({"loss": torch.tensor([2.0, 0.0, 9.0]), "count": torch.tensor([2.0, 0, 3])})
        tensor([-1.2000,     nan,  0.8000])
    """
    sums, counts = stats["loss"], stats["count"]
    present = counts > 0
    nan = torch.full_like(sums, float("nan"))
    if not bool(present.any()):
        return nan
    overall = sums.sum() / counts.sum()
    group_losses = sums / counts.clamp_min(_TINY)
    return torch.where(present, group_losses - overall, nan)


class Weighting:
    """How a `GroupLoss` weighs its groups (the strategy base, Cooper's `Formulation` shape).

    Subclasses set the class attributes they need and implement `primal`; adaptive ones also
    `dual_update`. The per-process hooks (`observe`, `history`, `forget`, `local_state`) are
    for strategies that keep a history between dual steps (a replay buffer).

    Example:
        >>> class WorstGroup(Weighting):  # a new weighting is one small class
        ...     def primal(self, loss, terms):
        ...         return terms.group_losses[terms.present].max()
        >>> loss_fn = GroupLoss(2, WorstGroup())
        >>> loss_fn(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]))
        tensor(0.6931)
        >>> loss_fn.strategy.has_dual_step, loss_fn.strategy.statistic_keys
        (False, ('loss', 'count'))
    """

    has_dual_step: ClassVar[bool] = False
    expects_accuracy: ClassVar[bool] = False
    expects_reference: ClassVar[bool] = False

    @property
    def statistic_keys(self) -> tuple[str, ...]:
        """The keys of the `Statistics` the dual side reads."""
        return ("loss", "count", "correct", "seen") if self.expects_accuracy else ("loss", "count")

    def buffers(self, num_groups: int) -> dict[str, Tensor]:
        """The loss module's buffers this strategy needs (``multipliers`` at least)."""
        return {"multipliers": self.initial_multipliers(num_groups)}

    def initial_multipliers(self, num_groups: int) -> Tensor:
        """The multipliers a fresh loss starts from (zeros)."""
        return torch.zeros(num_groups)

    def bind(self, loss: GroupLoss) -> None:
        """Check that this strategy fits ``loss`` (called once by its constructor)."""

    def settings(self) -> dict[str, Any]:
        """The strategy's options as plain values (logged by the driver)."""
        return {"strategy": type(self).__name__}

    def __repr__(self) -> str:
        options = {k: v for k, v in self.settings().items() if k != "strategy"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in options.items())})"

    def primal(self, loss: GroupLoss, terms: GroupTerms) -> Tensor:
        """The value to back-propagate for one batch (while the loss is active)."""
        raise NotImplementedError

    def violations(self, loss: GroupLoss, stats: Statistics) -> Tensor:
        """What the dual side reads per group (float64, NaN where undefined): here ``J_a − J``."""
        return group_gaps(stats)

    def dual_update(self, loss: GroupLoss, lr: float, stats: Statistics) -> Tensor:
        """Update ``loss.multipliers`` from ``stats``; return the violations (none here)."""
        return self.violations(loss, stats)

    def reset_value(self, loss: GroupLoss, value: float | None) -> Tensor:
        """The multipliers `GroupLoss.reset_multipliers` sets (``value`` must be None here)."""
        if value is not None:
            raise ValueError(
                f"Expected `value` to be None ({type(self).__name__} resets its multipliers to "
                f"their initial values), but got {value!r}"
            )
        return self.initial_multipliers(loss.num_groups)

    def missing_reference(self, loss: GroupLoss) -> bool:
        """Whether ``loss`` still lacks a reference this strategy needs (never, here)."""
        return False

    def take_reference(self, loss: GroupLoss, stats: Statistics) -> None:
        """Store a reference measured as `Statistics` (all-reduced); nothing to store here."""

    # -- per-process history (none by default)
    def observe(self, terms: GroupTerms) -> None:
        """See one training batch (after the accumulators)."""

    def history(self, device: torch.device) -> Statistics:
        """This process's history as additive `Statistics` (merged into `GroupLoss.statistics`)."""
        return {}

    def forget(self) -> None:
        """Drop the history (the model changed, e.g. by a pruning round)."""

    def local_state(self) -> dict[str, Tensor]:
        """This process's history as tensors, for a checkpoint."""
        return {}

    def load_local_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore `local_state`."""


class GroupLoss(nn.Module):
    """A per-sample base loss reduced per group and weighed by a `Weighting` strategy.

    ``forward(inputs, targets, groups)`` returns the strategy's objective while ``active``,
    else the plain mean ``J = Σ_i w_i ℓ_i / Σ_i w_i`` (``w_i`` the class weight of the
    sample's target when ``weight`` is given, else 1, so ``J`` equals
    ``F.cross_entropy(logits, targets, weight=weight, label_smoothing=...)``).

    Groups, one rule for every group loss: pass them, ``loss(logits, targets, groups)``.
    Without ``groups`` the class targets are the groups, which is refused for cross-entropy
    logits whose number of classes differs from ``num_groups`` (a protected attribute with as
    many groups as classes cannot be told apart from that mistake: pass the groups).

    In training mode every call adds the batch's detached float64 per-group loss sums and
    weight counts to accumulators read by `dual_step` (and lets the strategy see the batch);
    in eval mode nothing is recorded. A strategy without a dual step that no `GroupEqualizer`
    drives (``driven`` is ``False``) keeps only the last batch's sums, so a loss used alone
    holds nothing that grows.

    Args:
        num_groups: number of groups G; group ids are int64 in ``[0, G)``.
        strategy: the `Weighting`.
        base_loss: ``"cross_entropy"`` (default), a callable ``fn(inputs, targets) -> Tensor[N]``
            of per-sample losses (extra trailing dims are averaged per sample), or ``None`` when
            ``forward`` receives per-sample losses directly.
        label_smoothing: passed to cross-entropy.
        weight: class weights for cross-entropy, shape (C,).
        active: whether the strategy is applied (``False``: plain ``J``).
        validate_inputs: check target and group ranges and finiteness on every call (each
            check synchronizes a GPU once; turn off in tight loops you trust).

    Example:
        >>> from lightning_fairprune.losses import Fixed
        >>> loss_fn = GroupLoss(2, Fixed([1.0, 3.0]))
        >>> logits, targets = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
        >>> loss_fn(logits, targets)  # (1·0.1269 + 3·0.6931) / 4
        tensor(0.5516)
        >>> loss_fn.strategy.has_dual_step, loss_fn.accumulated[1].tolist()
        (False, [1.0, 1.0])
    """

    multipliers: Tensor

    def __init__(
        self,
        num_groups: int,
        strategy: Weighting,
        *,
        base_loss: str | PerSampleLoss | None = "cross_entropy",
        label_smoothing: float = 0.0,
        weight: Tensor | Sequence[float] | None = None,
        active: bool = True,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.num_groups = check_int(num_groups, "num_groups", 1)
        if not isinstance(strategy, Weighting):
            raise TypeError(
                f"Expected `strategy` to be a Weighting (Equalize, DRO, Fixed, ConstrainedGap), "
                f"but got {type(strategy).__name__}"
            )
        if not (base_loss is None or base_loss == "cross_entropy" or callable(base_loss)):
            raise ValueError(
                "Expected `base_loss` to be 'cross_entropy', a callable "
                f"`fn(inputs, targets) -> Tensor[N]` or None, but got {base_loss!r}"
            )
        check_real(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        if base_loss != "cross_entropy" and (label_smoothing != 0.0 or weight is not None):
            raise ValueError(
                "`label_smoothing` and `weight` apply to base_loss='cross_entropy' only, but got "
                f"base_loss={base_loss!r}; fold them into your per-sample loss instead"
            )
        self.strategy = strategy
        self.base_loss = base_loss
        self.label_smoothing = float(label_smoothing)
        self.active = bool(active)
        self.validate_inputs = bool(validate_inputs)
        self.driven = False  # set by the GroupEqualizer that drives this loss
        if weight is not None:
            w = check_vector(weight, "weight", low=0.0, what="class weights")
            self.register_buffer("weight", w.to(torch.float32))
        else:
            self.weight: Tensor | None = None
        for name, value in strategy.buffers(self.num_groups).items():
            self.register_buffer(name, value)
        strategy.bind(self)
        self._acc: Tensor | None = None  # (2, G) float64: loss sums, counts
        self.last_objective: Tensor | None = None
        self.last_group_losses: Tensor | None = None

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_groups={self.num_groups}, strategy={self.strategy!r}, active={self.active}"

    # ------------------------------------------------------------------ per-sample terms
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
                f"Expected a non-empty batch (first dim >= 1), but got shape {tuple(inputs.shape)}"
            )
        n = inputs.shape[0]
        if self.base_loss is None:
            per = inputs
        elif self.base_loss == "cross_entropy":
            self._check_targets(inputs, targets)
            assert targets is not None
            weight = None if self.weight is None else self.weight.to(inputs.dtype)
            smoothing = self.label_smoothing
            per = F.cross_entropy(
                inputs, targets, weight=weight, reduction="none", label_smoothing=smoothing
            )
            if weight is not None:
                w = weight.to(per.dtype)[targets]
                return per.reshape(n, -1).sum(1), w.reshape(n, -1).sum(1)
        else:
            if targets is None:
                raise ValueError("Expected `targets` for a callable `base_loss`, but got None")
            per = self.base_loss(inputs, targets)  # type: ignore[operator]
            if not isinstance(per, Tensor) or per.dim() == 0 or per.shape[0] != n:
                got = tuple(per.shape) if isinstance(per, Tensor) else type(per).__name__
                raise ValueError(
                    f"Expected `base_loss` to return per-sample losses of shape ({n}, ...), "
                    f"but got {got}"
                )
        flat = per.reshape(n, -1)
        return flat.sum(1), torch.full(
            (n,), float(flat.shape[1]), dtype=flat.dtype, device=flat.device
        )

    def _check_targets(self, logits: Tensor, targets: Tensor | None) -> bool:
        """Class indices matching logits (N, C, ...): shape, dtype and (if validating) range."""
        if targets is None:
            raise ValueError("Expected `targets` (class indices) for cross-entropy, but got None")
        if logits.dim() < 2:
            raise ValueError(
                f"Expected `logits` of shape (N, C, ...), but got shape {tuple(logits.shape)}"
            )
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(
                "Expected `targets` to be integer class indices (soft labels: pass a callable "
                f"`base_loss`), but got dtype {targets.dtype}"
            )
        expected = (logits.shape[0], *logits.shape[2:])
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"Expected `targets` of shape {expected} to match `logits` of shape "
                f"{tuple(logits.shape)}, but got {tuple(targets.shape)}"
            )
        num_classes = logits.shape[1]
        if self.weight is not None and self.weight.numel() != num_classes:
            raise ValueError(
                f"Expected `weight` to have one entry per class ({num_classes}), but got "
                f"{self.weight.numel()}"
            )
        check_labels(
            targets.reshape(-1), "targets", upper=num_classes, what="class labels",
            values=self.validate_inputs,
        )  # fmt: skip
        return True

    def _groups(self, inputs: Tensor, targets: Tensor | None, groups: Tensor | None) -> Tensor:
        """The group ids, one rule for every group loss (see the class docstring)."""
        n = inputs.shape[0] if isinstance(inputs, Tensor) and inputs.dim() else 0
        name = "groups"
        if groups is None:
            if targets is None:
                raise ValueError("Expected `groups` (or `targets` to use as groups), but got None")
            classes = inputs.shape[1] if isinstance(inputs, Tensor) and inputs.ndim >= 2 else None
            if self.base_loss == "cross_entropy" and classes not in (None, self.num_groups):
                raise ValueError(
                    f"Expected `groups` (one group id per sample): without them the class "
                    f"targets are the groups, but the logits have {classes} classes and "
                    f"`num_groups`={self.num_groups}. Call `loss(logits, targets, groups)`."
                )
            groups, name = targets, "targets (used as groups)"
        check_labels(
            groups, name, upper=self.num_groups, n=n, what="group ids", upper_name="num_groups",
            values=self.validate_inputs,
        )  # fmt: skip
        return groups.long()

    def _correct(self, inputs: Tensor, targets: Tensor | None) -> Tensor:
        """Per-sample accuracy (float64, mean over extra dims) of logits (N, C, ...)."""
        if self.base_loss != "cross_entropy":  # cross-entropy checked the targets already
            self._check_targets(inputs, targets)
        assert targets is not None
        hits = (inputs.detach().argmax(1) == targets).to(torch.float64)
        return hits.reshape(inputs.shape[0], -1).mean(1)

    def terms(
        self, inputs: Tensor, targets: Tensor | None = None, groups: Tensor | None = None
    ) -> GroupTerms:
        """Validate one batch and reduce it per group (no side effects).

        Args:
            inputs: logits (N, C, ...) for cross-entropy, model outputs for a callable base
                loss, or per-sample losses (N, ...) when ``base_loss=None``.
            targets: class indices (N, ...) (not needed with ``base_loss=None`` if ``groups``
                is given).
            groups: group id per sample, int (N,); default: ``targets`` (see the class).

        Returns:
            The batch's `GroupTerms`.

        Raises:
            ValueError: mismatched shapes, ids out of range, an empty batch, non-finite losses
                or a zero total weight.
            TypeError: wrong dtypes.
        """
        groups = self._groups(inputs, targets, groups)
        num, den = self._per_sample(inputs, targets)
        n = num.shape[0]
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
        correct = self._correct(inputs, targets) if self.strategy.expects_accuracy else None
        return GroupTerms(
            num=num,
            den=den,
            groups=groups,
            sums=sums,
            counts=counts,
            objective=num.sum() / total,
            group_losses=sums / counts.clamp_min(torch.finfo(counts.dtype).tiny),
            present=counts > 0,
            correct=correct,
        )

    def forward(
        self, inputs: Tensor, targets: Tensor | None = None, groups: Tensor | None = None
    ) -> Tensor:
        """Return the strategy's objective (or ``J`` while inactive) for one batch.

        Args:
            inputs: logits, model outputs or per-sample losses (see `terms`).
            targets: class indices.
            groups: group id per sample (default: ``targets``).

        Returns:
            Scalar tensor to back-propagate.
        """
        t = self.terms(inputs, targets, groups)
        self.last_objective = t.objective.detach()
        self.last_group_losses = torch.where(
            t.present, t.group_losses.detach(), torch.full_like(t.group_losses, float("nan"))
        )
        if self.training:
            self._record(t)
        if not self.active:
            return t.objective
        return self.strategy.primal(self, t)

    # ------------------------------------------------------------------ accumulators
    def _record(self, t: GroupTerms) -> None:
        batch = torch.stack([t.sums.detach().to(torch.float64), t.counts.to(torch.float64)])
        keep = self.strategy.has_dual_step or self.driven
        if not keep or self._acc is None or self._acc.device != batch.device:
            self._acc = batch
        else:
            self._acc += batch
        self.strategy.observe(t)

    @property
    def accumulated(self) -> tuple[Tensor, Tensor]:
        """Detached float64 (loss_sums[G], counts[G]) accumulated since the last dual step/reset.

        On the device of ``multipliers``; zeros when nothing was accumulated.
        """
        device = self.multipliers.device
        if self._acc is None:
            zeros = torch.zeros(self.num_groups, dtype=torch.float64, device=device)
            return zeros, zeros.clone()
        acc = self._acc.to(device)
        return acc[0].clone(), acc[1].clone()

    def set_accumulated(
        self, loss_sums: Tensor | Sequence[float], counts: Tensor | Sequence[float]
    ) -> None:
        """Replace the accumulators (used when restoring a checkpoint).

        Example:
            >>> from lightning_fairprune.losses import GroupEqualizedLoss
            >>> loss_fn = GroupEqualizedLoss(2)
            >>> loss_fn.set_accumulated([1.0, 3.0], [2.0, 2.0])
            >>> loss_fn.violations()  # signed: J_a − J
            tensor([-0.5000,  0.5000], dtype=torch.float64)
        """
        stats = self._check_statistics({"loss": loss_sums, "count": counts}, ("loss", "count"))
        self._acc = torch.stack([stats["loss"], stats["count"]])

    def reset_accumulators(self) -> None:
        """Forget the per-group sums accumulated since the last dual step."""
        self._acc = None

    def forget(self) -> None:
        """Forget the accumulators and the strategy's history (the multipliers stay)."""
        self.reset_accumulators()
        self.strategy.forget()

    def local_state(self) -> dict[str, Tensor]:
        """This process's strategy history (e.g. replay buffers) as tensors, for a checkpoint."""
        return self.strategy.local_state()

    def load_local_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore `local_state` (on this process)."""
        self.strategy.load_local_state(state)

    def statistics(self) -> Statistics:
        """This process's dual-side `Statistics`: the accumulators and the strategy's history."""
        loss_sums, counts = self.accumulated
        return {"loss": loss_sums, "count": counts, **self.strategy.history(counts.device)}

    @property
    def reference_missing(self) -> bool:
        """Whether the strategy needs a dense reference it has not got yet (not applied then)."""
        return self.strategy.missing_reference(self)

    def take_reference(self, statistics: Mapping[str, Any]) -> None:
        """Give the strategy a reference measured as `Statistics` (e.g. of the dense model)."""
        keys = ("loss", "count", "correct", "seen") if self.strategy.expects_reference else ()
        self.strategy.take_reference(self, self._check_statistics(statistics, keys))

    def reset_multipliers(self, value: float | None = None) -> None:
        """Reset the multipliers: ``None`` to the strategy's initial values, or to ``value``."""
        new = self.strategy.reset_value(self, value)
        with torch.no_grad():
            self.multipliers.copy_(new.to(self.multipliers))

    # ------------------------------------------------------------------ dual side
    def _check_statistics(self, stats: Mapping[str, Any], keys: Iterable[str]) -> Statistics:
        out: Statistics = {}
        device = self.multipliers.device
        for key in keys:
            if key not in stats:
                raise ValueError(
                    f"Expected `statistics` with the keys {self.strategy.statistic_keys} "
                    f"({type(self.strategy).__name__}), but got {sorted(stats)}"
                )
            name = "loss_sums" if key == "loss" else ("counts" if key == "count" else key)
            low = None if key == "loss" else 0.0
            what = "per-group sums" if key == "loss" else "per-group counts"
            out[key] = check_vector(stats[key], name, size=self.num_groups, low=low, what=what).to(
                device
            )
        return out

    def resolve_statistics(
        self,
        loss_sums: Tensor | Sequence[float] | None = None,
        counts: Tensor | Sequence[float] | None = None,
        statistics: Mapping[str, Any] | None = None,
    ) -> Statistics:
        """The statistics a dual step reads: given ones, or this process's (`statistics`)."""
        if statistics is not None:
            return self._check_statistics(statistics, self.strategy.statistic_keys)
        if (loss_sums is None) != (counts is None):
            raise ValueError("Expected both `loss_sums` and `counts`, or neither")
        if loss_sums is None:
            return self.statistics()
        return self._check_statistics(
            {"loss": loss_sums, "count": counts}, self.strategy.statistic_keys
        )

    def violations(
        self,
        loss_sums: Tensor | Sequence[float] | None = None,
        counts: Tensor | Sequence[float] | None = None,
        *,
        statistics: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """The strategy's per-group violations (float64, NaN for absent groups).

        From ``loss_sums``/``counts`` (or ``statistics``) when given, else from this process's
        accumulators (nothing is reset).

        Example:
            >>> from lightning_fairprune.losses import GroupEqualizedLoss
            >>> GroupEqualizedLoss(3).violations([2.0, 0.0, 9.0], [2.0, 0.0, 3.0])
            tensor([-1.2000,     nan,  0.8000], dtype=torch.float64)
        """
        stats = self.resolve_statistics(loss_sums, counts, statistics)
        return self.strategy.violations(self, stats)

    @torch.no_grad()
    def dual_step(
        self,
        lr: float,
        loss_sums: Tensor | Sequence[float] | None = None,
        counts: Tensor | Sequence[float] | None = None,
        *,
        statistics: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """One dual step of the strategy with step size ``lr``; resets the accumulators.

        The statistics come from ``loss_sums``/``counts`` or ``statistics`` when given (e.g.
        all-reduced over processes, or measured on held-out data), else from this process.
        Groups without samples keep their multiplier.

        Args:
            lr: dual step size >= 0.
            loss_sums: per-group sums of (weighted) losses, shape (G,).
            counts: per-group sample (weight) counts, shape (G,).
            statistics: all the `Statistics` the strategy reads (instead of the two above).

        Returns:
            The violations used (float64, NaN for groups without an update).
        """
        lr = check_real(lr, "lr", low=0.0)
        stats = self.resolve_statistics(loss_sums, counts, statistics)
        violations = self.strategy.dual_update(self, lr, stats)
        self.reset_accumulators()
        return violations


@torch.no_grad()
def _batch_statistics(loss: GroupLoss, outputs: Tensor, y: Tensor, g: Tensor) -> Statistics:
    stats = loss.terms(outputs, y, g).statistics(loss.num_groups)
    if loss.strategy.expects_accuracy:
        return stats
    return {"loss": stats["loss"], "count": stats["count"]}


def measure_statistics(
    loss: GroupLoss,
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor, Tensor]],
    *,
    forward: Callable[[Any], Tensor] | None = None,
    loaders: Iterable[Any] = (),
) -> Statistics:
    """The loss's `Statistics` of ``model`` on ``(x, y, g)`` batches, measured in isolation.

    The pass runs inside `lightning_fairprune.measure.isolated` (modules in eval mode, every
    mode, buffer and RNG state restored afterwards) and without gradients; the loss records
    nothing. With accuracy (``loss.strategy.expects_accuracy``) the keys ``correct`` and
    ``seen`` hold per-group correct predictions and samples. Sums over this process's batches
    only: all-reduce them under data parallelism.

    Args:
        loss: the group loss (its per-sample loss, class weights and groups rule are used).
        model: the model.
        batches: validated ``(inputs, targets, groups)`` batches on the model's device.
        forward: ``fn(inputs) -> outputs`` (default ``model(inputs)``).
        loaders: loaders iterated, whose generators are restored.

    Returns:
        float64 `Statistics` (G,) per key.

    Example:
        >>> from lightning_fairprune.losses import GroupEqualizedLoss
        >>> net = nn.Linear(2, 2)
        >>> x, y, g = torch.randn(6, 2), torch.tensor([0, 1] * 3), torch.tensor([0, 0, 1] * 2)
        >>> stats = measure_statistics(GroupEqualizedLoss(2), net, [(x, y, g)])
        >>> per = F.cross_entropy(net(x), y, reduction="none").double()
        >>> bool(torch.allclose(stats["loss"][1], per[g == 1].sum())), stats["count"].tolist()
        (True, [4.0, 2.0])
    """
    total: Statistics | None = None
    call = forward if forward is not None else model
    with isolated(model, loaders=loaders), torch.no_grad():
        for x, y, g in batches:
            stats = _batch_statistics(loss, call(x), y, g)
            total = stats if total is None else {k: total[k] + v for k, v in stats.items()}
    if total is None:
        raise ValueError("Expected at least one (inputs, targets, groups) batch, but got none")
    return {k: v.to(loss.multipliers.device) for k, v in total.items()}
