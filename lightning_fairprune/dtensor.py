"""DTensor helpers shared by the pruning and diagnostics cores (FSDP2-sharded parameters).

`local_tensor` gives a DTensor's local shard (sharing storage; plain tensors pass through),
`is_sharded` tells whether parameters are sharded, `shard_spec` where a local shard sits in
the unsharded parameter's flat order. Only ``Shard(0)`` on a 1-D mesh and ``Replicate`` are
supported; other placements are refused with a clear error. No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["ShardSpec", "is_sharded", "local_tensor", "shard_spec"]


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def _world(group: Any) -> tuple[int, int]:
    dist = torch.distributed
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (``t.to_local()``, sharing its storage), else ``t``.

    In-place operations on the result change the DTensor's local shard; this is how masks
    are enforced on FSDP2-sharded parameters without gathering them.

    Args:
        t: a tensor or DTensor.

    Returns:
        The local tensor.

    Example:
        >>> t = torch.ones(2)
        >>> local_tensor(t) is t
        True
    """
    to_local = getattr(t, "to_local", None)
    if to_local is not None and callable(to_local) and type(t).__name__ == "DTensor":
        return to_local()
    return t


def is_sharded(tensors: Mapping[str, Tensor] | Tensor) -> bool:
    """Whether a tensor (or any tensor of a mapping) is a DTensor.

    Args:
        tensors: a tensor, or FQN -> tensor.

    Returns:
        ``True`` if a DTensor is among them.

    Example:
        >>> is_sharded({"w": torch.zeros(2)})
        False
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    if isinstance(tensors, Tensor):
        return isinstance(tensors, dtensor)
    return any(isinstance(t, dtensor) for t in tensors.values())


class ShardSpec(NamedTuple):
    """Where a process's local part of a (possibly sharded) tensor lies in the full tensor.

    Attributes:
        shape: the full (global) shape.
        numel: number of elements of the full tensor.
        offset: row-major flat index, in the full tensor, of the first local element.
        local_numel: number of local elements (a contiguous flat range from ``offset``).
        owner: whether this process counts the local elements (``False`` for replicas held
            by processes other than the first one).
    """

    shape: tuple[int, ...]
    numel: int
    offset: int
    local_numel: int
    owner: bool


def shard_spec(t: Tensor, group: Any = None) -> ShardSpec:
    """The :class:`ShardSpec` of a DTensor sharded on dim 0 (1-D mesh) or of a plain tensor.

    ``Shard(0)`` follows ``torch.chunk``: with ``W`` shards of ``R`` rows, shard ``c`` holds
    rows ``[c·ceil(R/W), min(R, (c+1)·ceil(R/W)))`` (FSDP2 and DTensor both cut so). A plain
    tensor is a replica: offset 0, counted by the first process of ``group`` only.

    Args:
        t: a DTensor with placement ``Shard(0)`` or ``Replicate()`` on a 1-D mesh, or a tensor.
        group: process group of plain tensors (default: the default group if initialized).

    Returns:
        The spec.

    Raises:
        ValueError: for other placements (e.g. ``Shard(1)``, 2-D meshes) or a local shape
            that does not match the ``torch.chunk`` rule.

    Example:
        >>> shard_spec(torch.zeros(3, 4))
        ShardSpec(shape=(3, 4), numel=12, offset=0, local_numel=12, owner=True)
    """
    dtensor = _dtensor_type()
    shape = tuple(int(s) for s in t.shape)
    numel = math.prod(shape)
    if dtensor is None or not isinstance(t, dtensor):
        rank, _ = _world(group)
        return ShardSpec(shape, numel, 0, numel, rank == 0)
    from torch.distributed.tensor import Replicate, Shard

    mesh = t.device_mesh
    placements = tuple(t.placements)
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            "Expected DTensors on a 1-D device mesh (FSDP2 `fully_shard`), but got a mesh of "
            f"shape {tuple(mesh.shape)} with placements {placements}"
        )
    coord = int(mesh.get_local_rank())
    size = int(mesh.size())
    local = t.to_local()
    placement = placements[0]
    if isinstance(placement, Replicate):
        return ShardSpec(shape, numel, 0, numel, coord == 0)
    if not isinstance(placement, Shard) or placement.dim != 0 or not shape:
        raise ValueError(
            f"Expected DTensors sharded on dim 0 (`Shard(0)`) or replicated, but got placement "
            f"{placement} for a tensor of shape {shape}"
        )
    rows = shape[0]
    chunk = -(-rows // size)
    start = min(coord * chunk, rows)
    expected = (min(chunk, rows - start), *shape[1:])
    if tuple(local.shape) != expected:
        raise ValueError(
            f"Expected the local shard of a tensor of shape {shape} on shard {coord} of {size} "
            f"to have shape {expected} (torch.chunk rule), but got {tuple(local.shape)}"
        )
    row = math.prod(shape[1:])
    return ShardSpec(shape, numel, start * row, math.prod(expected), True)


def _rows_split(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor sharded on rows (``Shard(0)``), whatever its local shard.

    The same answer on every process (unlike the size of the local shard, which is the
    whole tensor on one process and empty on another when there are fewer rows than
    processes), so it can decide whether to run a collective.
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return False
    from torch.distributed.tensor import Shard

    return any(isinstance(p, Shard) for p in t.placements)


def _group_of(tensors: Mapping[str, Tensor], group: Any) -> Any:
    """The process group: given, else the DTensors' (one mesh for all), else the default."""
    if group is not None:
        return group
    dtensor = _dtensor_type()
    meshes = [t.device_mesh for t in tensors.values() if dtensor and isinstance(t, dtensor)]
    if meshes:
        first = meshes[0]
        for mesh in meshes[1:]:
            if mesh != first:
                raise ValueError(
                    f"Expected every DTensor to live on one device mesh, but got {first} and {mesh}"
                )
        return first.get_group()
    return None
