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
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_fairprune.distributed import local_tensor
from lightning_fairprune.pruning.nm import nm_masks
from lightning_fairprune.pruning.select import global_masks, layerwise_masks
from lightning_fairprune.pruning.selection import select_parameters
from lightning_fairprune.pruning.structured import (
    ChannelGroup,
    Structure,
    channel_groups,
    channel_masks,
    dead_channels,
    group_parameter_names,
    group_scores,
    parse_structure,
    select_channels,
)

__all__ = [
    "UNITS",
    "ChannelUnits",
    "NMUnits",
    "Units",
    "WeightUnits",
    "check_structure",
    "make_units",
]


@runtime_checkable
class Units(Protocol):
    """The selection units of a structure (see the module docstring).

    Attributes:
        kind: ``"weight"``, ``"channel"`` or ``"nm"``.
        exact_counts: whether :meth:`select` prunes exactly the target's count of units, so
            that criteria that rank units themselves (the fairness-aware ones) apply.
        keep_one: whether every unit tensor keeps at least one unit in the global scope
            (channel groups: a layer cannot lose all its channels).
        supports_sharding: whether the units work on FSDP2-sharded parameters.
        needs_example: whether building them traces the model on an example input.
    """

    kind: str
    exact_counts: bool
    keep_one: bool
    supports_sharding: bool
    needs_example: bool

    def sparsity(self, masks: Mapping[str, Tensor], weight_sparsity: float) -> float:
        """The realized sparsity in units (``weight_sparsity``: the masked entries' one)."""
        ...

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
    supports_sharding = True
    needs_example = False

    @override
    def sparsity(self, masks: Mapping[str, Tensor], weight_sparsity: float) -> float:
        return weight_sparsity

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
    supports_sharding = False
    needs_example = True

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
    def sparsity(self, masks: Mapping[str, Tensor], weight_sparsity: float) -> float:
        """Pruned fraction of the channels (the unit of ``final_sparsity``)."""
        if not masks:
            return 0.0
        dead = dead_channels(self.groups, masks)
        return sum(int(d.sum()) for d in dead) / sum(g.num_channels for g in self.groups)

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


class NMUnits(WeightUnits):
    """N:M blocks along the input dimension (at most ``n`` kept weights in every ``m``).

    The units are weights (masks, counts), selected block by block: a round with target
    ``t`` keeps ``max(n, m - round(t · m))`` weights per block, so the last round of a
    schedule to ``1 - n/m`` reaches the ``n:m`` pattern exactly.

    Example:
        >>> units = NMUnits(2, 4)
        >>> w = {"fc.weight": torch.tensor([[0.1, -3.0, 2.0, 0.5]])}
        >>> units.select(w, 0.5, "global", None)["fc.weight"].int().tolist()
        [[0, 1, 1, 0]]
    """

    kind = "nm"
    exact_counts = False
    keep_one = False
    supports_sharding = True  # blocks lie within rows: every shard holds whole blocks
    needs_example = False

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = n, m

    @override
    def select(
        self,
        scores: Mapping[str, Tensor],
        target: float,
        scope: str,
        current: Mapping[str, Tensor] | None,
    ) -> dict[str, Tensor]:
        scores = {n: local_tensor(s) for n, s in scores.items()}  # whole rows on every shard
        if current is not None:
            current = {n: local_tensor(c) for n, c in current.items()}
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


UNITS: dict[str, type[Units]] = {"weight": WeightUnits, "channel": ChannelUnits, "nm": NMUnits}
"""The units class of every structure kind (its declared attributes, before it is built)."""


def make_units(
    structure: str | Structure,
    module: nn.Module,
    selection: Mapping[str, Any],
    example_inputs: Any = None,
) -> tuple[Units, dict[str, Tensor]]:
    """The units of ``structure`` on ``module``, and the parameters their masks cover.

    Args:
        structure: ``"weight"``, ``"channel"`` or ``"n:m"`` (`parse_structure`).
        module: the model.
        selection: keyword arguments of
            :func:`~lightning_fairprune.pruning.selection.select_parameters` (which modules'
            output channels may be pruned, for channels).
        example_inputs: one input batch of ``module`` (channels: traced for the dependency
            graph).

    Returns:
        ``(units, params)`` with ``params`` FQN -> parameter: the selected weights, or every
        parameter coupled to the channel groups.

    Raises:
        ValueError: channels without ``example_inputs``; ``"n:m"`` on tensors of fewer than
            two dimensions; a selection that matches nothing.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> units, params = make_units("channel", net, {}, torch.randn(2, 4))
        >>> units.kind, list(params)
        ('channel', ['0.weight', '0.bias', '2.weight'])
    """
    parsed = parse_structure(structure)
    named = dict(module.named_parameters())
    if parsed.kind == "channel":
        if example_inputs is None:
            raise ValueError(
                "Expected an example input with structure='channel' (`example_input`, the "
                "module's `example_input_array`, or a training batch), but got none"
            )
        keys = ("include_types", "exclude_types", "include_names", "exclude_names")
        groups = channel_groups(module, example_inputs, **{k: selection.get(k) for k in keys})
        params = {n: named[n] for n in group_parameter_names(groups)}
        return ChannelUnits(groups, params), params
    params = select_parameters(module, **selection)
    if not params:
        raise ValueError(
            f"Expected the parameter selection to match at least one parameter of "
            f"{type(module).__name__}, but got none with {dict(selection)}"
        )
    if parsed.kind == "nm":
        flat = [n for n, p in params.items() if p.dim() < 2]
        if flat:
            raise ValueError(
                f"Expected only Linear/Conv weights with structure={str(parsed)!r} (blocks "
                f"along their input dimension), but the selection holds {flat}"
            )
        return NMUnits(parsed.n, parsed.m), params
    return WeightUnits(), params


def check_structure(
    structure: Structure,
    selection: Mapping[str, Any],
    final_sparsity: float | None,
    compression_ratio: float | None,
    callable_schedule: bool = False,
) -> float | None:
    """Check a structure against the other pruning arguments; its final sparsity.

    Channels and N:M blocks take ``final_sparsity`` (a fraction of the channels, of the
    weights), not a compression ratio; channels mask biases, norms and the next layers'
    inputs with their channel (no ``prune_bias``/``prune_norm``/``prune_classifier``); N:M
    blocks are for weights (no ``prune_bias``/``prune_norm``) and fix the final sparsity to
    ``1 - n/m`` (its default).

    Returns:
        The final sparsity (``1 - n/m`` for ``"n:m"`` when not given).

    Example:
        >>> from lightning_fairprune.pruning.structured import parse_structure
        >>> check_structure(parse_structure("2:4"), {}, None, None)
        0.5
    """
    if structure.kind == "weight":
        return final_sparsity
    if compression_ratio is not None:
        raise ValueError(
            f"Expected `final_sparsity` with structure={str(structure)!r}, but got "
            f"compression_ratio={compression_ratio!r}"
        )
    flags = ["prune_bias", "prune_norm"] + (
        ["prune_classifier"] if structure.kind == "channel" else []
    )
    for flag in flags:
        if selection.get(flag):
            raise ValueError(
                f"Expected `{flag}` False with structure={str(structure)!r} (channels mask their "
                "biases, norms and the next layers' inputs; N:M blocks are for weights), but "
                "got True"
            )
    if structure.kind != "nm" or callable_schedule:
        return final_sparsity
    pattern = 1.0 - structure.n / structure.m
    if final_sparsity is not None and abs(final_sparsity - pattern) > 1e-9:
        raise ValueError(
            f"Expected `final_sparsity` None or {pattern:g} (the {structure} pattern) with "
            f"structure={str(structure)!r}, but got {final_sparsity!r}"
        )
    return pattern
