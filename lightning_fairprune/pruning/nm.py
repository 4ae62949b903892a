"""N:M masks: at most ``n`` kept weights in every ``m`` consecutive input weights (``"2:4"``).

The pattern NVIDIA's sparse tensor cores accelerate (2:4) and its generalization. Plain torch;
``compact`` converts 2:4 Linear weights to ``torch.sparse.to_sparse_semi_structured`` where a
GPU supports it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_fairprune.checks import check_int

__all__ = ["nm_masks"]


def nm_masks(
    scores: Mapping[str, Tensor],
    n: int,
    m: int,
    current_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """N:M masks: at most ``n`` kept entries in every ``m`` consecutive input weights.

    Blocks run along dimension 1 of each tensor: the input features of a Linear weight
    ``(out, in)``, and for a convolution weight ``(out, in, *kernel)`` the ``m`` consecutive
    input channels at each output channel and kernel position, the layout of NVIDIA's ASP
    (``apex.contrib.sparsity``, which permutes conv weights to ``(*kernel, out, in)`` and masks
    along ``in``) and of channels-last implicit GEMMs. ``torch.sparse.to_sparse_semi_structured``
    accelerates the 2:4 pattern of Linear weights only (``compact``). In each block the ``n``
    entries of largest ``abs(score)`` are kept; entries already pruned in ``current_masks`` rank
    lowest; among equal scores the lower index is pruned first. A tensor whose dimension 1 is not
    a multiple of ``m`` (e.g. a first convolution on 3 input channels) is left dense, with a
    ``UserWarning`` naming it. Transposed convolutions (dimension 1 = output channels) are not
    meant here; leave them out of ``scores``.

    Args:
        scores: FQN -> score tensor (2-D or more) of each pruned weight.
        n: kept entries per block.
        m: block length.
        current_masks: masks of the previous round, or ``None``.

    Returns:
        FQN -> bool mask (``True`` = kept) for every tensor of ``scores``.

    Raises:
        ValueError: for ``0 < n < m`` violated, a tensor with fewer than 2 dimensions, or a NaN
            score of a weight not yet pruned.

    Example:
        >>> w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0]])
        >>> nm_masks({"fc.weight": w}, 2, 4)["fc.weight"].int().tolist()
        [[0, 1, 1, 0, 0, 0, 1, 1]]
    """
    n = check_int(n, "n", 1)
    m = check_int(m, "m", 2)
    if n >= m:
        raise ValueError(f"Expected `n` to be smaller than `m` ({m}), but got {n}")
    masks: dict[str, Tensor] = {}
    dense: list[str] = []
    for name, score in scores.items():
        if score.dim() < 2:
            raise ValueError(
                f"Expected every tensor of `scores` to be a Linear/Conv weight (2-D or more) "
                f"for an n:m structure, but {name!r} has shape {tuple(score.shape)}"
            )
        width = score.shape[1]
        if width % m:
            dense.append(name)
            masks[name] = torch.ones(score.shape, dtype=torch.bool, device=score.device)
            continue
        key = score.detach().abs().to(torch.float64)
        cur = None if current_masks is None else current_masks.get(name)
        if bool(key[cur if cur is not None else ...].isnan().any()):
            raise ValueError(f"Expected scores without NaN, but {name!r} has NaN scores")
        if cur is not None:
            key = key.masked_fill(~cur.to(torch.bool), -math.inf)
        moved = key.movedim(1, -1)
        blocks = moved.reshape(*moved.shape[:-1], width // m, m)
        order = torch.sort(blocks, dim=-1, stable=True).indices
        keep = torch.ones(blocks.shape, dtype=torch.bool, device=score.device)
        keep.scatter_(-1, order[..., : m - n], False)
        masks[name] = keep.reshape(moved.shape).movedim(-1, 1).contiguous()
    if dense:
        warnings.warn(
            f"n:m ({n}:{m}) leaves {dense} dense: their input dimension is not a multiple of {m}",
            UserWarning,
            stacklevel=2,
        )
    return masks
