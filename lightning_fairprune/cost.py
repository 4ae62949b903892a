"""What a model costs to run: parameters and floating-point operations of one forward pass.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts the matrix
multiplications and convolutions (2 FLOPs per multiply-add; biases, norms and activations are
not counted). Count a compacted model to see what structured pruning saves:
``model_cost(compact(model, x), x)``; a masked model costs as much as the dense one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_fairprune.measure import isolated
from lightning_fairprune.pruning.structured import forward_example

__all__ = ["model_cost"]


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
