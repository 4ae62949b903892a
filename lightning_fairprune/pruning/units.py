"""What a pruning round selects: single weights, whole channel groups or N:M blocks.

A *structure* turns per-parameter scores into masks in three steps that every criterion
shares: :meth:`Units.reduce` maps per-parameter values to one value per selection unit (a
weight, a channel of a channel group, a weight within its N:M block), :meth:`Units.select`
keeps the best units with the exact counts of the target, and :meth:`Units.expand` turns the
kept units back into bool masks of every masked parameter. Values may carry leading
dimensions (e.g. ``[G, *shape]`` per-group statistics of the fairness-aware criteria); they
are reduced alike.

* `WeightUnits` (``structure="weight"``): units are the weights themselves;
  :func:`~lightning_fairprune.pruning.select.global_masks` /
  :func:`~lightning_fairprune.pruning.select.layerwise_masks` select them (plain tensors and
  FSDP2 DTensors alike).
* `ChannelUnits` (``structure="channel"``): units are the channels of the groups found by
  :func:`~lightning_fairprune.pruning.structured.channel_groups`; a channel's value is the
  L2 norm (``"l2"``) or the sum of absolute values (``"l1"``) or the plain sum (``"sum"``) of
  its coupled entries; masks cover every coupled parameter.
* `NMUnits` (``structure="n:m"``): at most ``n`` kept weights in every block of ``m``
  consecutive input weights (:func:`~lightning_fairprune.pruning.nm.nm_masks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fairprune.pruning.nm import nm_masks
from lightning_fairprune.pruning.select import global_masks, layerwise_masks
from lightning_fairprune.pruning.structured import (
    ChannelGroup,
    channel_masks,
    dead_channels,
    group_scores,
    select_channels,
)

__all__ = ["ChannelUnits", "NMUnits", "Units", "WeightUnits"]


@runtime_checkable
class Units(Protocol):
    """The selection units of a structure (see the module docstring).

    Attributes:
        kind: ``"weight"``, ``"channel"`` or ``"nm"``.
        exact_counts: whether :meth:`select` prunes exactly the target's count of units, so
            that criteria that rank units themselves (the fairness-aware ones) apply.
        keep_one: whether every unit tensor keeps at least one unit in the global scope
            (channel groups: a layer cannot lose all its channels).
    """

    kind: str
    exact_counts: bool
    keep_one: bool

    def reduce(self, values: Mapping[str, Tensor], how: str) -> dict[str, Tensor]:
        """Per-parameter values ``[*lead, *shape]`` -> per-unit values ``[*lead, *units]``."""
        ...

    def current(self, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        """The kept units of the current parameter masks (``None``: nothing pruned yet)."""
        ...

    def select(
        self,
        scores: Mapping[str, Tensor],
        target: float,
        scope: str,
        current: Mapping[str, Tensor] | None,
    ) -> dict[str, Tensor]:
        """Bool keep masks of the units (``True`` = kept), lowest scores pruned."""
        ...

    def expand(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Masks of every masked parameter from the kept units."""
        ...


class WeightUnits(Units):
    """Units are the weights: the masks are the unit masks.

    Example:
        >>> units = WeightUnits()
        >>> keep = units.select({"w": torch.tensor([0.3, -0.1, 0.2])}, 1 / 3, "global", None)
        >>> units.expand(keep)["w"].tolist()
        [True, False, True]
    """

    kind = "weight"
    exact_counts = True
    keep_one = False

    @override
    def reduce(self, values: Mapping[str, Tensor], how: str) -> dict[str, Tensor]:
        return dict(values)

    @override
    def current(self, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        return None if not masks else dict(masks)

    @override
    def select(
        self,
        scores: Mapping[str, Tensor],
        target: float,
        scope: str,
        current: Mapping[str, Tensor] | None,
    ) -> dict[str, Tensor]:
        if scope == "global":
            return global_masks(scores, target, current)
        return layerwise_masks(scores, target, current)

    @override
    def expand(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(keep)


class ChannelUnits(Units):
    """Units are the channels of channel groups; unit tensors are keyed by the group root.

    Args:
        groups: the channel groups (:func:`~lightning_fairprune.pruning.structured.channel_groups`).
        params: FQN -> parameter (or a tensor of its shape) of every coupled parameter.

    Example:
        >>> from lightning_fairprune.pruning.structured import ChannelGroup, CoupledSlice
        >>> out = CoupledSlice("a.weight", 0, torch.arange(3), torch.arange(3), False)
        >>> inp = CoupledSlice("b.weight", 1, torch.arange(3), torch.arange(3), True)
        >>> g = ChannelGroup("a", 3, torch.arange(3), (out, inp), ("a", "b"))
        >>> params = {"a.weight": torch.tensor([[3.0], [0.1], [2.0]]), "b.weight": torch.ones(1, 3)}
        >>> units = ChannelUnits([g], params)
        >>> keep = units.select(units.reduce(params, "l2"), 0.4, "global", None)
        >>> keep["a"].tolist(), units.expand(keep)["b.weight"].tolist()
        ([True, False, True], [[True, False, True]])
    """

    kind = "channel"
    exact_counts = True
    keep_one = True

    def __init__(self, groups: Sequence[ChannelGroup], params: Mapping[str, Tensor]) -> None:
        self.groups = list(groups)
        self.params = dict(params)
        self._roots = [g.root for g in self.groups]

    @override
    def reduce(self, values: Mapping[str, Tensor], how: str) -> dict[str, Tensor]:
        first = next(iter(values.values()))
        lead = first.dim() - self.params[next(iter(values))].dim()
        if lead == 0:
            reduced = group_scores(self.groups, values, how)
            return dict(zip(self._roots, reduced, strict=True))
        rows = first.shape[:lead]  # e.g. [G]: reduce every leading index on its own
        flat = {n: v.reshape(-1, *v.shape[lead:]) for n, v in values.items()}
        per = [
            group_scores(self.groups, {n: v[i] for n, v in flat.items()}, how)
            for i in range(flat[next(iter(flat))].shape[0])
        ]
        return {
            root: torch.stack([p[j] for p in per]).reshape(*rows, -1)
            for j, root in enumerate(self._roots)
        }

    @override
    def current(self, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        if not masks:
            return None
        dead = dead_channels(self.groups, masks)
        return {root: ~d for root, d in zip(self._roots, dead, strict=True)}

    @override
    def select(
        self,
        scores: Mapping[str, Tensor],
        target: float,
        scope: str,
        current: Mapping[str, Tensor] | None,
    ) -> dict[str, Tensor]:
        keep = select_channels(
            [scores[r] for r in self._roots],
            target,
            scope=scope,
            current_keep=None if current is None else [current[r] for r in self._roots],
        )
        return dict(zip(self._roots, keep, strict=True))

    @override
    def expand(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return channel_masks(self.groups, self.params, [keep[r] for r in self._roots])


class NMUnits(Units):
    """N:M blocks along the input dimension (at most ``n`` kept weights in every ``m``).

    A round with target ``t`` keeps ``max(n, m - round(t · m))`` weights per block, so the
    last round of a schedule to ``1 - n/m`` reaches the ``n:m`` pattern exactly.

    Example:
        >>> units = NMUnits(2, 4)
        >>> w = {"fc.weight": torch.tensor([[0.1, -3.0, 2.0, 0.5]])}
        >>> units.select(w, 0.5, "global", None)["fc.weight"].int().tolist()
        [[0, 1, 1, 0]]
    """

    kind = "nm"
    exact_counts = False
    keep_one = False

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = n, m

    @override
    def reduce(self, values: Mapping[str, Tensor], how: str) -> dict[str, Tensor]:
        return dict(values)

    @override
    def current(self, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        return None if not masks else dict(masks)

    @override
    def select(
        self,
        scores: Mapping[str, Tensor],
        target: float,
        scope: str,
        current: Mapping[str, Tensor] | None,
    ) -> dict[str, Tensor]:
        keep = max(self.n, self.m - int(target * self.m + 0.5))
        if keep >= self.m:
            ones = {
                n: torch.ones(s.shape, dtype=torch.bool, device=s.device) for n, s in scores.items()
            }
            return ones if current is None else {n: current[n].clone() for n in scores}
        masks = nm_masks(scores, keep, self.m, current)
        if current is not None:
            masks = {n: m & current[n].to(m.device) for n, m in masks.items()}
        return masks

    @override
    def expand(self, keep: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(keep)
