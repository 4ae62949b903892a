"""What a pruning run prunes in one model: the structure, its units and the masked parameters.

`PruningTarget` turns the ``structure`` and the parameter selection of a pruning callback
into the units of :mod:`lightning_fairprune.pruning.units` once per model (channel groups need
one traced example input), looks the masked parameters up fresh on every call (strategies
replace parameters), and measures what the pruned model costs
(:func:`~lightning_fairprune.cost.pruned_cost`) or writes its compact copy
(:func:`~lightning_fairprune.compact.compact`). Plain torch; the callback supplies an example
input from the training data when the module has none.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.compact import compact
from lightning_fairprune.cost import pruned_cost
from lightning_fairprune.distributed import is_sharded
from lightning_fairprune.pruning.structured import Structure, parse_structure
from lightning_fairprune.pruning.units import UNITS, Units, check_structure, make_units

__all__ = ["PruningTarget"]


class PruningTarget:
    """The structure, units and masked parameters of a pruning run on one model.

    Args:
        structure: ``"weight"``, ``"channel"`` or ``"n:m"`` (`parse_structure`).
        selection: keyword arguments of
            :func:`~lightning_fairprune.pruning.selection.select_parameters`.
        example_input: one input batch of the model (default: its ``example_input_array``,
            else what :meth:`params` is given).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> target = PruningTarget("channel", {}, example_input=torch.randn(1, 4))
        >>> list(target.params(net)), target.units.kind
        (['0.weight', '0.bias', '2.weight'], 'channel')
        >>> target.cost(net, {})  # nothing pruned yet: the dense model, one sample
        {'params': 44, 'flops': 72}
    """

    def __init__(
        self, structure: str | Structure, selection: Mapping[str, Any], example_input: Any = None
    ) -> None:
        self.structure = parse_structure(structure)
        self.selection = dict(selection)
        self.example_input = example_input
        self.units: Units | None = None
        self.names: list[str] | None = None
        self.example: Any = None  # the example input the units were built with

    def final_sparsity(
        self, final_sparsity: float | None, compression_ratio: float | None, callable_schedule: bool
    ) -> float | None:
        """The final sparsity the structure implies (`check_structure`, with the selection)."""
        return check_structure(
            self.structure, self.selection, final_sparsity, compression_ratio, callable_schedule
        )

    @property
    def bound(self) -> bool:
        """Whether the units are built."""
        return self.names is not None

    def example_of(self, module: nn.Module) -> Any:
        """The ``example_input`` argument, else the module's ``example_input_array``."""
        if self.example_input is not None:
            return self.example_input
        return getattr(module, "example_input_array", None)

    @property
    def needs_example(self) -> bool:
        """Whether building the units needs an example input (channel groups)."""
        return UNITS[self.structure.kind].needs_example

    def ready(self, module: nn.Module) -> bool:
        """Whether :meth:`params` can build the units without an example from elsewhere."""
        return self.bound or not self.needs_example or self.example_of(module) is not None

    def params(
        self, module: nn.Module, example: Callable[[bool], Any] | None = None
    ) -> dict[str, nn.Parameter]:
        """The masked parameters of ``module`` by name (the units are built on first call).

        Args:
            module: the model.
            example: ``required -> example input``, asked while the target and the module have
                none (``required``: the units need it; the cost and ``compact`` use it too).
        """
        if self.example is None:
            self.example = self.example_of(module)
            if self.example is None and example is not None:
                self.example = example(self.needs_example)
        if self.names is None:
            self.units, params = make_units(self.structure, module, self.selection, self.example)
            self.names = list(params)
        named = dict(module.named_parameters())
        return {name: named[name] for name in self.names}

    def check_compact(self, params: Mapping[str, Tensor]) -> None:
        """Raise unless the model can be compacted: an example input, unsharded parameters."""
        if self.example is None:
            raise ValueError(
                "Expected `example_input` (or the module's `example_input_array`) with "
                "`compact_path`, but got none, and the training batches give none"
            )
        if is_sharded(params):
            raise ValueError(
                "Expected `compact_path` None with FSDP2-sharded parameters (`compact` needs "
                "the whole model on one process), but got a path"
            )

    def sparsity(self, masks: Mapping[str, Tensor], weight_sparsity: float) -> float:
        """The realized sparsity in the structure's units (channels: pruned channels)."""
        if self.units is None:
            return weight_sparsity
        return self.units.sparsity(masks, weight_sparsity)

    def cost(self, module: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, int] | None:
        """`pruned_cost` of ``module`` with ``masks`` (``None`` without example, or sharded)."""
        if self.example is None or is_sharded(dict(module.named_parameters())):
            return None
        return pruned_cost(module, self.example, masks, getattr(self.units, "groups", None))

    def save_compact(
        self, module: nn.Module, masks: Mapping[str, Tensor], path: str | os.PathLike[str]
    ) -> None:
        """Write ``compact(module, masks=masks).state_dict()`` to ``path`` (`load_compact`)."""
        groups = getattr(self.units, "groups", None)
        small = compact(module, self.example, masks=masks, groups=groups)
        torch.save(small.state_dict(), path)
