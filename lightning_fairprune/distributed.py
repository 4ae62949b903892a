"""Distribution helpers shared by the pruning and diagnostics cores (DTensors, collectives).

`local_tensor` gives a DTensor's local shard (sharing storage; plain tensors pass through),
`is_sharded` tells whether parameters are sharded (the one predicate every core uses to pick
its FSDP2 backend), `shard_spec` where a local shard sits in the unsharded parameter's flat
order, `process_group` the group of a set of DTensors, `world` the rank and size of a group and
`all_reduce` the one collective helper (a no-op on one process). Only ``Shard(0)`` on a 1-D
mesh and ``Replicate`` are supported; other placements are refused with a clear error. No
Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ShardSpec",
    "all_reduce",
    "is_sharded",
    "local_tensor",
    "process_group",
    "reshard",
    "shard_spec",
    "world",
]


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, size)`` of ``group`` (default group); ``(0, 1)`` without torch.distributed.

    Example:
        >>> world()
        (0, 1)
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return int(dist.get_rank(group)), int(dist.get_world_size(group))


def all_reduce(t: Tensor, group: Any = None, op: str = "sum") -> Tensor:
    """All-reduce ``t`` in place over ``group`` (``op``: ``"sum"`` or ``"max"``) and return it.

    A no-op on one process (or without an initialized process group), so that every core runs
    the same code on 1 or N processes. It is a collective: every process of ``group`` must
    call it with a tensor of the same shape.

    Example:
        >>> all_reduce(torch.tensor([1.0, 2.0])).tolist()
        [1.0, 2.0]
    """
    if op not in ("sum", "max"):
        raise ValueError(f"Expected `op` to be one of ('sum', 'max'), but got {op!r}")
    if world(group)[1] > 1:
        dist = torch.distributed
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(t, op=reduce_op, group=group)
    return t


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


def is_sharded(tensors: Tensor | Mapping[str, Tensor] | Iterable[Tensor]) -> bool:
    """Whether a tensor (or any tensor of a mapping or iterable) is a DTensor.

    Args:
        tensors: a tensor, FQN -> tensor, or an iterable of tensors (e.g. ``parameters()``).

    Returns:
        ``True`` if a DTensor is among them.

    Example:
        >>> is_sharded({"w": torch.zeros(2)}), is_sharded(torch.nn.Linear(2, 2).parameters())
        (False, False)
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    if isinstance(tensors, Tensor):
        return isinstance(tensors, dtensor)
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return any(isinstance(t, dtensor) for t in values)


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
        rank, _ = world(group)
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


def reshard(model: torch.nn.Module) -> None:
    """Free every FSDP2 unsharded parameter, so the next forward all-gathers the local shards.

    FSDP2 keeps the root module's parameters unsharded after a forward pass (they are
    resharded after the backward); after a forward without backward (no grad) and an in-place
    change of the local shards, the next forward would use the stale unsharded values.
    Parameters resolved after it are the DTensors. A no-op on models without FSDP2 modules.

    Example:
        >>> reshard(torch.nn.Linear(2, 2))
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def process_group(tensors: Mapping[str, Tensor] | Iterable[Tensor], group: Any = None) -> Any:
    """The process group: ``group`` if given, else the DTensors' (one mesh for all), else None.

    None stands for the default group (or one process).

    Example:
        >>> process_group({"w": torch.zeros(2)}) is None
        True
    """
    if group is not None:
        return group
    dtensor = _dtensor_type()
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    meshes = [t.device_mesh for t in values if dtensor and isinstance(t, dtensor)]
    if meshes:
        first = meshes[0]
        for mesh in meshes[1:]:
            if mesh != first:
                raise ValueError(
                    f"Expected every DTensor to live on one device mesh, but got {first} and {mesh}"
                )
        return first.get_group()
    return None
