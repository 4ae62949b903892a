"""What a model costs to run: parameters and floating-point operations of one forward pass.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix
multiplications and convolutions (2 FLOPs per multiply-add; biases, norms and activations are
not counted). Count a compacted model to see what structured pruning saves:
``model_cost(compact(model, x), x)``; a masked model costs as much as the dense one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_fairprune.compact import compact
from lightning_fairprune.measure import isolated
from lightning_fairprune.pruning.structured import ChannelGroup, forward_example

__all__ = ["model_cost", "pruned_cost"]


def model_cost(module: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Parameters and FLOPs of one forward pass of ``module`` on ``example_inputs``.

    The forward runs in eval mode without gradients; every module mode, buffer, gradient and
    RNG state is restored afterwards (:func:`~lightning_fairprune.measure.isolated`).

    Args:
        module: the model (a compact one to count the savings of channel pruning).
        example_inputs: one batch: a tensor, a tuple of positional arguments or a dict of
            keyword arguments. FLOPs scale with its batch size.

    Returns:
        ``{"params": number of parameter entries (shared ones once), "flops": FLOPs}``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model_cost(net, torch.randn(3, 4))  # params 4*8+8+8*2+2; flops 2*3*(4*8+8*2)
        {'params': 58, 'flops': 288}
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be an nn.Module, but got {type(module).__name__}")
    params = sum(p.numel() for p in module.parameters())
    counter = FlopCounterMode(display=False)
    with isolated(module), torch.no_grad(), counter:
        forward_example(module, example_inputs)
    return {"params": int(params), "flops": int(counter.get_total_flops())}


def pruned_cost(
    module: nn.Module,
    example_inputs: Any,
    masks: Mapping[str, Tensor],
    groups: Sequence[ChannelGroup] | None = None,
) -> dict[str, int]:
    """What a pruned model costs: channel-pruned, its compact copy; weight-pruned, as run.

    With channel ``groups`` the cost is that of ``compact(module, example_inputs, masks=masks)``
    (the pruned channels physically removed). Without them (single weights, N:M blocks) the
    model still runs dense kernels: ``flops`` are the dense model's, and ``params`` counts the
    parameters minus the pruned weights (what sparse storage would hold).

    Args:
        module: the model (not modified).
        example_inputs: one input batch (FLOPs scale with its batch size).
        masks: FQN -> full bool mask (``True`` = kept) of the pruned parameters.
        groups: the channel groups of a channel-pruned model, or ``None``.

    Returns:
        ``{"params": int, "flops": int}``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> masks = {"0.weight": torch.rand(8, 4) > 2.0}  # every weight of layer 0 pruned
        >>> pruned_cost(net, torch.randn(3, 4), masks)  # 58 params, 32 pruned; dense flops
        {'params': 26, 'flops': 288}
    """
    if groups is None:
        cost = model_cost(module, example_inputs)
        pruned = sum(int(m.numel() - torch.count_nonzero(m)) for m in masks.values())
        return {"params": cost["params"] - pruned, "flops": cost["flops"]}
    small = compact(
        module, example_inputs, masks=masks, groups=groups, check=False, semi_structured=False
    )
    return model_cost(small, example_inputs)
