"""Constrained excess accuracy gaps (Hashemizadeh et al., ICLR 2024): `ConstrainedGapLoss`.

"Balancing Act: Constraining Disparate Impact in Sparse Models" constrains, for every group
``a``, the *excess accuracy gap* of the sparse model against its dense reference

    ψ_a = (A_dense_a − A_a) − (A_dense − A)  ≤  ε,

i.e. no group may lose more accuracy than the model as a whole, plus ε. Read in their public
code (merajhashemi/balancing-act, written anew here):

* ``src/cmp/uniform_accuracy_gap.py`` (``UniformAccuracyGapProblem``): the constraint
  (``compute_defects``: ``group_acc_gaps − avg_acc_gap − tolerance``) and the proxy-Lagrangian:
  the primal gradient comes from a differentiable surrogate, the cross-entropy gap
  ``(L_a − L_dense_a) − (L − L_dense)`` (``compute_surrogate``, signs flipped because a loss
  goes down where an accuracy goes up), while the multipliers move on the true,
  non-differentiable accuracy gaps (``strict_violation``); the dense accuracies and losses
  are measured once (``precompute_baseline_metrics``); groups absent from a batch have no
  constraint ("indexed" multipliers);
* ``src/cmp/cyclic_buffer.py`` (``GroupCyclicBuffer``): the accuracy of the current model is
  estimated from the last ``memory`` per-sample correctness values of every group, and only
  groups whose buffer is full enter the dual step (``query``);
* ``src/configs/utkface/sparse_imp.py``: buffer memory 40, tolerance 0.01, dual SGD step 1e-4,
  Cooper's alternating dual-primal optimizer.

Two choices differ from their code and are ours: the overall accuracies ``A`` and ``A_dense``
are weighted by the reference's group frequencies over the groups that have an estimate (their
``query`` takes the unweighted mean of the full buffers but compares it with the dataset-wide
dense accuracy), so that ``Σ_a w_a ψ_a = 0``; and under data parallelism each process keeps
its own buffers and the dual step reads the union of the full ones (summed correct counts and
sizes), so every process takes the same step.

Dual ascent: ours, not cooper-optim. cooper-optim 1.0.1 (the registry's latest; read from its
wheel: 48.7 kB, 3,183 lines, needs torch and typing-extensions) would give the projected step
``λ ← relu(λ + η · (ψ − ε))`` that this module writes in three lines, but its multipliers are
``nn.Parameter`` objects (they would land in ``model.parameters()``, hence in the user's
optimizer, weight decay and DDP's gradient reduction), its ``ConstrainedOptimizer.roll`` owns
the optimizer step (Lightning's automatic optimization does), and it has no all-reduce of the
violations. The package's dual step runs on all-reduced float64 statistics, keeps λ a buffer
and is driven by `lightning_fairprune.callbacks.equalizer.GroupEqualizer` like the other
group losses, so the dependency would cost more than the three lines it saves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fairprune.checks import check_int, check_real, check_vector
from lightning_fairprune.losses.core import (
    _TINY,
    GroupLoss,
    GroupTerms,
    PerSampleLoss,
    Statistics,
    Weighting,
)

__all__ = ["ConstrainedGap", "ConstrainedGapLoss", "ReplayBuffer"]


class ReplayBuffer:
    """The last ``size`` per-sample values of every group: one ring per group, one process.

    Equivalent to one ``deque(maxlen=size)`` per group (balancing-act's ``GroupCyclicBuffer``),
    updated for a whole batch at once, so hundreds of groups cost no Python loop.

    Args:
        num_groups: number of groups G.
        size: values kept per group.

    Example:
        >>> buffer = ReplayBuffer(2, size=3)
        >>> buffer.add(torch.tensor([0, 0, 1, 0, 0]), torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))
        >>> buffer.sums()  # group 0 keeps its last 3 values (0, 1, 1); group 1 is not full
        (tensor([2., 0.], dtype=torch.float64), tensor([3., 0.], dtype=torch.float64))
    """

    def __init__(self, num_groups: int, size: int) -> None:
        self.num_groups = check_int(num_groups, "num_groups", 1)
        self.size = check_int(size, "size", 1)
        self.clear()

    def clear(self, device: torch.device | None = None) -> None:
        """Empty every ring."""
        g, m = self.num_groups, self.size
        self.values = torch.zeros(g, m, dtype=torch.float64, device=device)
        self.filled = torch.zeros(g, dtype=torch.int64, device=device)
        self.head = torch.zeros(g, dtype=torch.int64, device=device)

    def add(self, groups: Tensor, values: Tensor) -> None:
        """Append ``values[i]`` to the ring of ``groups[i]``, in batch order."""
        if self.values.device != groups.device:
            self.load_state_dict({k: v.to(groups.device) for k, v in self.state_dict().items()})
        order = torch.argsort(groups, stable=True)
        g, v = groups[order], values.to(torch.float64)[order]
        counts = torch.bincount(g, minlength=self.num_groups)
        rank = torch.arange(g.numel(), device=g.device) - (counts.cumsum(0) - counts)[g]
        keep = rank >= counts[g] - self.size  # a group's last `size` values of the batch
        slot = (self.head[g] + rank) % self.size
        self.values[g[keep], slot[keep]] = v[keep]
        self.head = (self.head + counts) % self.size
        self.filled = torch.clamp(self.filled + counts, max=self.size)

    def sums(self) -> tuple[Tensor, Tensor]:
        """(sum of values, number of values) per group, for full rings only (0 elsewhere)."""
        full = self.filled == self.size
        total = torch.where(full, self.values.sum(1), torch.zeros_like(self.values[:, 0]))
        return total, torch.where(full, float(self.size), 0.0).to(torch.float64)

    def state_dict(self) -> dict[str, Tensor]:
        """The rings as tensors (a checkpoint restores them exactly)."""
        return {"values": self.values.clone(), "filled": self.filled.clone(), "head": self.head}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore `state_dict`."""
        values = torch.as_tensor(state["values"], dtype=torch.float64)
        if tuple(values.shape) != (self.num_groups, self.size):
            raise ValueError(
                f"Expected a replay state of shape ({self.num_groups}, {self.size}), but got "
                f"{tuple(values.shape)}"
            )
        self.values = values.clone()
        self.filled = torch.as_tensor(state["filled"], dtype=torch.int64).clone()
        self.head = torch.as_tensor(state["head"], dtype=torch.int64).clone()


class ConstrainedGap(Weighting):
    """Constrained excess accuracy gaps ψ_a ≤ ε with a proxy-Lagrangian (see the module).

    Primal, for the groups ``a`` present in the batch that have a reference:
    ``J + Σ_a λ_a [(J_a − L_dense_a) − (J − L_dense)]`` (the cross-entropy surrogate; λ
    detached). Dual, for the groups with an accuracy estimate ``A_a`` (a full replay buffer, or
    held-out samples): ``λ_a ← max(0, λ_a + lr · (ψ_a − ε))`` with
    ``ψ_a = (A_dense_a − A_a) − (A_dense − A)``, where ``A = Σ w_a A_a / Σ w_a`` and
    ``A_dense = Σ w_a A_dense_a / Σ w_a`` over those groups (``w`` the reference's group
    frequencies).

    Args:
        tolerance: ε ≥ 0 (balancing-act's UTKFace runs use 0.01).
        buffer_size: per-sample correctness values kept per group (their default 40).

    Example:
        >>> ConstrainedGap(0.02, buffer_size=16)
        ConstrainedGap(tolerance=0.02, buffer_size=16)
    """

    has_dual_step = True
    expects_accuracy = True
    expects_reference = True

    def __init__(self, tolerance: float = 0.01, buffer_size: int = 40) -> None:
        self.tolerance = check_real(tolerance, "tolerance", low=0.0)
        self.buffer_size = check_int(buffer_size, "buffer_size", 1)
        self.replay: ReplayBuffer | None = None

    def settings(self) -> dict[str, Any]:  # noqa: D102
        return {
            "strategy": "ConstrainedGap",
            "tolerance": self.tolerance,
            "buffer_size": self.buffer_size,
        }

    def buffers(self, num_groups: int) -> dict[str, Tensor]:  # noqa: D102
        # rows: group weight (frequency), dense accuracy, dense loss; NaN until measured
        return {
            "multipliers": torch.zeros(num_groups),
            "reference": torch.full((3, num_groups), float("nan")),
        }

    def bind(self, loss: GroupLoss) -> None:  # noqa: D102
        if loss.base_loss is None:
            raise ValueError(
                "Expected `base_loss` to be 'cross_entropy' or a callable on logits (the "
                "accuracy needs logits (N, C, ...)), but got None"
            )
        if self.replay is not None:
            raise ValueError(
                "Expected a fresh ConstrainedGap per loss (it holds the loss's replay buffers), "
                "but got one already bound to another loss"
            )
        self.replay = ReplayBuffer(loss.num_groups, self.buffer_size)

    def missing_reference(self, loss: GroupLoss) -> bool:  # noqa: D102
        return bool(torch.isnan(loss.reference).any())

    def take_reference(self, loss: GroupLoss, stats: Statistics) -> None:  # noqa: D102
        seen, count = stats["seen"], stats["count"]
        if not bool((seen > 0).any()):
            raise ValueError(
                "Expected the dense reference to hold samples of at least one group, but got none"
            )
        accuracy = stats["correct"] / seen.clamp_min(_TINY)
        dense_loss = stats["loss"] / count.clamp_min(_TINY)
        _store_reference(loss, seen / seen.sum(), accuracy, dense_loss)

    def _reference(self, loss: GroupLoss, like: Tensor) -> Tensor:
        if self.missing_reference(loss):
            raise ValueError(
                "Expected a dense reference for ConstrainedGapLoss, but it has none yet: call "
                "`set_reference(...)`, or let `GroupEqualizer(data=FairnessData(...))` measure "
                "it at the first pruning round"
            )
        return loss.reference.detach().to(device=like.device, dtype=like.dtype)

    def primal(self, loss: GroupLoss, terms: GroupTerms) -> Tensor:  # noqa: D102
        if self.missing_reference(loss):  # nothing to constrain against yet: the plain mean
            return terms.objective
        w, _, dense_loss = self._reference(loss, terms.group_losses)
        known = terms.present & (w > 0)
        dense_overall = (w * dense_loss).sum() / w.sum()
        surrogate = (terms.group_losses - terms.objective) - (dense_loss - dense_overall)
        lam = loss.multipliers.detach().to(surrogate)
        penalty = torch.where(known, lam * surrogate, torch.zeros_like(surrogate)).sum()
        return terms.objective + penalty

    def violations(self, loss: GroupLoss, stats: Statistics) -> Tensor:  # noqa: D102
        seen = stats["seen"]
        w, dense_acc, _ = loss.reference.detach().to(seen)
        estimated = (seen > 0) & (w > 0)  # NaN weights (no reference) compare False
        nan = torch.full_like(seen, float("nan"))
        if not bool(estimated.any()):
            return nan
        accuracy = stats["correct"] / seen.clamp_min(_TINY)
        we = torch.where(estimated, w, torch.zeros_like(w))
        overall = (we * accuracy).sum() / we.sum()
        dense = (we * dense_acc).sum() / we.sum()
        psi = (dense_acc - accuracy) - (dense - overall)
        return torch.where(estimated, psi - self.tolerance, nan)

    def dual_update(self, loss: GroupLoss, lr: float, stats: Statistics) -> Tensor:  # noqa: D102
        self._reference(loss, stats["seen"])
        v = self.violations(loss, stats)
        update = torch.where(~torch.isnan(v), v * lr, torch.zeros_like(v))
        new = torch.relu(loss.multipliers.to(torch.float64) + update)
        loss.multipliers.copy_(new.to(loss.multipliers.dtype))
        return v

    # -- the replay buffer (this process)
    def observe(self, terms: GroupTerms) -> None:  # noqa: D102
        assert self.replay is not None
        assert terms.correct is not None
        self.replay.add(terms.groups, terms.correct)

    def history(self, device: torch.device) -> Statistics:  # noqa: D102
        assert self.replay is not None
        correct, seen = self.replay.sums()
        return {"correct": correct.to(device), "seen": seen.to(device)}

    def forget(self) -> None:  # noqa: D102
        assert self.replay is not None
        self.replay.clear(self.replay.values.device)

    def local_state(self) -> dict[str, Tensor]:  # noqa: D102
        assert self.replay is not None
        return self.replay.state_dict()

    def load_local_state(self, state: Mapping[str, Tensor]) -> None:  # noqa: D102
        assert self.replay is not None
        self.replay.load_state_dict(state)


def _store_reference(loss: GroupLoss, weights: Tensor, accuracy: Tensor, dense: Tensor) -> None:
    ref = torch.stack([weights, accuracy, dense]).to(loss.reference)
    with torch.no_grad():
        loss.reference.copy_(ref)


class ConstrainedGapLoss(GroupLoss):
    """Constrained excess accuracy gaps (Balancing Act, ICLR 2024) as a group loss.

    ``forward`` returns ``J + Σ_a λ_a [(J_a − L_dense_a) − (J − L_dense)]`` over the groups
    present in the batch (the cross-entropy surrogate of the accuracy gap; see
    `ConstrainedGap`), ``J`` while inactive. In training mode it also appends every sample's
    correctness (``argmax`` of the logits) to its group's replay buffer (``buffer_size`` per
    group, per process). `dual_step` moves λ on the true excess accuracy gaps
    ``ψ_a − ε`` of the groups with a full buffer (or, with held-out statistics, with samples).

    The dense reference (per-group accuracy, loss and frequency) is given with `set_reference`
    or measured by `GroupEqualizer` on its ``data`` (a `lightning_fairprune.FairnessData`) in
    ``on_before_pruning_round`` of round 0, i.e. on the dense model (at fit start when the
    Trainer has no pruner). Until it exists the loss is not applied. Measure it on the data the
    dual step reads: training data for the replay buffer (as the paper does), the held-out
    split with ``GroupEqualizer(heldout=True)``.

    Args:
        num_groups: number of groups G (intersectional groups: the product of the sizes).
        tolerance: ε ≥ 0 of ``ψ_a ≤ ε``.
        buffer_size: per-sample correctness values kept per group (per process).
        base_loss: ``"cross_entropy"`` or a callable on logits (see `GroupLoss`).
        label_smoothing: passed to cross-entropy.
        weight: class weights for cross-entropy.
        active: whether the constraint term is applied.
        validate_inputs: as in `GroupLoss`.

    Example:
        >>> loss_fn = ConstrainedGapLoss(2, tolerance=0.0, buffer_size=2)
        >>> loss_fn.set_reference(accuracy=[0.9, 0.9], loss=[0.3, 0.3])
        >>> logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        >>> targets, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
        >>> loss_fn(logits, targets, groups)  # λ = 0: the mean cross-entropy
        tensor(0.6269)
        >>> loss_fn.dual_step(1.0)  # group 1: 1 of 2 right, group 0: 2 of 2; ψ = ∓0.25
        tensor([-0.2500,  0.2500], dtype=torch.float64)
        >>> loss_fn.multipliers
        tensor([0.0000, 0.2500])
    """

    reference: Tensor

    def __init__(
        self,
        num_groups: int,
        tolerance: float = 0.01,
        buffer_size: int = 40,
        base_loss: str | PerSampleLoss = "cross_entropy",
        label_smoothing: float = 0.0,
        weight: Tensor | Sequence[float] | None = None,
        active: bool = True,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__(
            num_groups,
            ConstrainedGap(tolerance, buffer_size),
            base_loss=base_loss,
            label_smoothing=label_smoothing,
            weight=weight,
            active=active,
            validate_inputs=validate_inputs,
        )

    def set_reference(
        self,
        accuracy: Tensor | Sequence[float],
        loss: Tensor | Sequence[float] | None = None,
        weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        """Give the dense reference explicitly.

        Args:
            accuracy: dense per-group accuracy A_dense_a in [0, 1], shape (G,).
            loss: dense per-group mean loss L_dense_a (G,); default 0 (the surrogate's constant:
                its gradient is the same without it).
            weights: group frequencies w_a >= 0 (G,) (normalized here; 0: no constraint for
                that group); default equal.

        Example:
            >>> loss_fn = ConstrainedGapLoss(3)
            >>> loss_fn.set_reference([0.9, 0.8, 0.7], weights=[2, 1, 1])
            >>> loss_fn.reference[0]
            tensor([0.5000, 0.2500, 0.2500])
        """
        g = self.num_groups
        acc = check_vector(accuracy, "accuracy", size=g, low=0.0, what="accuracies")
        if bool((acc > 1).any()):
            raise ValueError(f"Expected `accuracy` in [0, 1], but got {acc.tolist()}")
        dense = torch.zeros(g, dtype=torch.float64)
        if loss is not None:
            dense = check_vector(loss, "loss", size=g, what="per-group losses")
        w = torch.ones(g, dtype=torch.float64)
        if weights is not None:
            w = check_vector(weights, "weights", size=g, low=0.0, what="weights", nonzero=True)
        _store_reference(self, w / w.sum(), acc, dense)

    def dense_reference(self) -> dict[str, list[float]] | None:
        """The reference as plain values (``weights``, ``accuracy``, ``loss``), or None."""
        if self.reference_missing:
            return None
        w, acc, dense = self.reference.double().tolist()
        return {"weights": w, "accuracy": acc, "loss": dense}
