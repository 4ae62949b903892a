"""Mask I/O: the checkpoint form of masks, mask files, and full masks from and to shards.

**One checkpoint form.** :func:`masks_to_state` packs *full* (unsharded) masks 1 bit per
weight (:func:`pack_mask`, the ``numpy.packbits`` layout) as ``{name: {"bits": uint8,
"shape": [...]}}``: plain values (``torch.load(weights_only=True)`` works), the same on every
process, so a state written by one world size restores on any other;
:func:`masks_from_state` reads it back. Sharded (FSDP2) masks are gathered first
(:func:`gather_full_masks`, one tensor at a time) and cut down again after loading
(:func:`shard_full_masks`); the rewind weights of the pruning callback take the same way
(:func:`gather_full_tensors` / :func:`shard_full_tensors`).

**Files.** :func:`save_masks` / :func:`load_masks` write and read full masks as a dict of
bool tensors (``torch.save``), readable without this package.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_fairprune.distributed import (
    _dtensor_type,
    _rows_split,
    is_sharded,
    local_tensor,
    process_group,
    shard_spec,
)
from lightning_fairprune.distributed import (
    world as rank_world,
)

__all__ = [
    "distribute_like",
    "gather_full_masks",
    "gather_full_tensors",
    "load_masks",
    "masks_from_state",
    "masks_to_state",
    "pack_mask",
    "save_masks",
    "shard_full_masks",
    "shard_full_tensors",
    "unpack_mask",
]

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask along its last dimension, 8 weights per byte (most significant first).

    Same layout as ``numpy.packbits(mask, axis=-1)``: shape ``(..., n)`` becomes
    ``(..., ceil(n / 8))`` uint8, the last byte of each row padded with zero bits.

    Args:
        mask: bool tensor with at least one dimension.

    Returns:
        uint8 tensor on the mask's device.

    Example:
        >>> pack_mask(torch.tensor([True, False, True, True, False, False, False, False, True]))
        tensor([176, 128], dtype=torch.uint8)
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim < 1:
        raise ValueError(
            "Expected `mask` to be a bool tensor with at least one dimension, but got "
            f"{getattr(mask, 'dtype', type(mask).__name__)} "
            f"of shape {tuple(getattr(mask, 'shape', ()))}"
        )
    n = mask.shape[-1]
    pad = (-n) % 8
    bits = mask.to(torch.uint8)
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    grouped = bits.reshape(*mask.shape[:-1], (n + pad) // 8, 8)
    return (grouped * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_mask`: ``(..., ceil(n / 8))`` uint8 -> ``(..., n)`` bool.

    Args:
        packed: uint8 tensor from :func:`pack_mask`.
        n: length of the unpacked last dimension.

    Returns:
        bool tensor on the packed tensor's device.

    Example:
        >>> unpack_mask(torch.tensor([176, 128], dtype=torch.uint8), 9).int().tolist()
        [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.ndim < 1:
        raise ValueError(
            "Expected `packed` to be a uint8 tensor from pack_mask, but got "
            f"{getattr(packed, 'dtype', type(packed).__name__)}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 8 * packed.shape[-1]:
        raise ValueError(
            f"Expected `n` to be an int in [0, {8 * packed.shape[-1]}] (8 per packed byte), "
            f"but got {n!r}"
        )
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(-1).bitwise_and(weights).ne(0)
    return bits.reshape(*packed.shape[:-1], 8 * packed.shape[-1])[..., :n]


def _check_bool(name: str, mask: object) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"Expected the mask of {name!r} to be a bool tensor, "
            f"but got {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    return mask


def masks_to_state(masks: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """The checkpoint form of full masks: packed 1 bit per weight, on the CPU.

    Args:
        masks: FQN -> full bool mask (gather sharded masks first: :func:`gather_full_masks`).

    Returns:
        FQN -> ``{"bits": uint8 tensor, "shape": list of ints}`` (plain values).

    Example:
        >>> state = masks_to_state({"w": torch.tensor([[True, False, True]])})
        >>> state["w"]["bits"], state["w"]["shape"]
        (tensor([160], dtype=torch.uint8), [1, 3])
    """
    out: dict[str, dict[str, Any]] = {}
    for name, mask in masks.items():
        flat = _check_bool(name, mask).detach().to("cpu").reshape(-1)
        out[str(name)] = {"bits": pack_mask(flat), "shape": list(mask.shape)}
    return out


def masks_from_state(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Full bool masks from :func:`masks_to_state`'s form (on the CPU).

    Args:
        state: FQN -> ``{"bits", "shape"}``.

    Returns:
        FQN -> bool mask of the saved shape.

    Raises:
        ValueError: if an entry is not of that form.

    Example:
        >>> masks_from_state(masks_to_state({"w": torch.tensor([True, False])}))
        {'w': tensor([ True, False])}
    """
    out: dict[str, Tensor] = {}
    for name, entry in state.items():
        if not isinstance(entry, Mapping) or not {"bits", "shape"} <= set(entry):
            raise ValueError(
                f"Expected the mask state of {name!r} to be {{'bits': uint8 tensor, 'shape': "
                f"[...]}} (from masks_to_state), but got {type(entry).__name__}"
            )
        shape = [int(d) for d in entry["shape"]]
        out[name] = unpack_mask(entry["bits"].cpu(), math.prod(shape)).view(shape)
    return out


def gather_full_masks(
    masks: Mapping[str, Tensor], params: Mapping[str, Tensor], group: Any = None
) -> dict[str, Tensor]:
    """Full (unsharded) CPU bool masks from local-shard masks, on every process.

    Each process sends its local masks packed (1 bit per weight); the full masks are
    assembled one parameter at a time. A collective for every parameter sharded on rows,
    whatever the size of the local shards (empty ones included): call it on every process.
    The result holds one byte per weight of the full model (bool) on every process.

    Args:
        masks: FQN -> local-shard bool mask.
        params: FQN -> (DTensor) parameter, for the layout.
        group: process group (default: the parameters' mesh group, else the default group).

    Returns:
        FQN -> full-shape CPU bool mask.

    Example:
        >>> gather_full_masks({"w": torch.tensor([True, False])}, {"w": torch.zeros(2)})
        {'w': tensor([ True, False])}
    """
    group = process_group(params, group)
    _, world = rank_world(group)
    out: dict[str, Tensor] = {}
    for name, param in params.items():
        spec = shard_spec(param, group)
        local = local_tensor(masks[name]).detach().to("cpu").reshape(-1)
        # decided from the layout alone, the same on every process: a process holding the
        # whole of a sharded tensor (the others an empty shard) still joins the gather
        if world == 1 or not _rows_split(param):
            out[name] = local.clone().view(spec.shape)
            continue
        pieces: list[Any] = [None] * world
        torch.distributed.all_gather_object(
            pieces, (spec.offset, local.numel(), pack_mask(local)), group=group
        )
        full = torch.ones(spec.numel, dtype=torch.bool)
        for offset, n, bits in pieces:
            full[offset : offset + n] = unpack_mask(bits, n)
        out[name] = full.view(spec.shape)
    return out


def gather_full_tensors(
    local: Mapping[str, Tensor], params: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Full CPU tensors from local shards laid out like ``params``, one tensor at a time.

    Each local shard is wrapped as a DTensor placed like its (DTensor) parameter and
    all-gathered (``full_tensor``), so every process holds one full tensor on its device at a
    time (what an FSDP2 forward pass all-gathers anyway) before it moves to the CPU. Plain
    parameters (replicas) are copied to the CPU. A collective when any parameter is sharded:
    call it on every process. Used for checkpoint entries of full form (e.g. the rewind
    weights of `IterativePruning`).

    Args:
        local: FQN -> local shard (of ``local_tensor(param)``'s shape).
        params: FQN -> (DTensor) parameter, for the layout.

    Returns:
        FQN -> full-shape CPU tensor.

    Example:
        >>> gather_full_tensors({"w": torch.ones(2)}, {"w": torch.zeros(2)})
        {'w': tensor([1., 1.])}
    """
    out: dict[str, Tensor] = {}
    for name, param in params.items():
        value = local[name].detach()
        if is_sharded(param):
            out[name] = _wrap_like(value, param).full_tensor().cpu()
        else:
            out[name] = value.cpu().clone()
    return out


def _wrap_like(local: Tensor, param: Any) -> Any:
    """A DTensor of ``param``'s layout whose local shard is ``local`` (no communication)."""
    return _dtensor_type().from_local(
        local.to(param.to_local().device),
        param.device_mesh,
        param.placements,
        shape=param.shape,
        stride=param.stride(),
        run_check=False,
    )


def _local_part(full: Tensor, param: Tensor, group: Any) -> Tensor:
    """This process's shard of ``full`` (a tensor of ``param``'s full shape), on its device."""
    spec = shard_spec(param, group)
    local = local_tensor(param)
    flat = full.reshape(-1)[spec.offset : spec.offset + spec.local_numel]
    return flat.to(local.device).clone().view(local.shape)


def shard_full_tensors(
    full: Mapping[str, Tensor], params: Mapping[str, Tensor], group: Any = None
) -> dict[str, Tensor]:
    """Local shards cut from full tensors (the inverse of :func:`gather_full_tensors`).

    Args:
        full: FQN -> tensor of the parameter's full shape (any dtype).
        params: FQN -> (DTensor) parameter.
        group: process group of plain parameters.

    Returns:
        FQN -> local shard on the parameter's device, in the full tensor's dtype.

    Raises:
        ValueError: if a tensor is missing or does not have its parameter's full shape.

    Example:
        >>> shard_full_tensors({"w": torch.arange(3.0)}, {"w": torch.zeros(3)})
        {'w': tensor([0., 1., 2.])}
    """
    group = process_group(params, group)
    missing = [n for n in params if n not in full]
    if missing:
        raise ValueError(f"Expected a full tensor for every parameter, but {missing} are missing")
    out: dict[str, Tensor] = {}
    for name, param in params.items():
        shape = tuple(int(d) for d in param.shape)
        if tuple(full[name].shape) != shape:
            raise ValueError(
                f"Expected the full tensor of {name!r} to have shape {shape}, but got "
                f"{tuple(full[name].shape)}"
            )
        out[name] = _local_part(full[name], param, group)
    return out


def distribute_like(full: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Full-shape tensors laid out like the parameters: DTensors for sharded ones.

    A plain full-shape tensor of a DTensor parameter (e.g. seeded random scores, drawn in
    full on every process) becomes a DTensor placed like the parameter, holding this
    process's part; DTensors and tensors of plain parameters are returned as they are. No
    communication.

    Args:
        full: FQN -> tensor of the parameter's full shape (or already a DTensor).
        params: FQN -> (DTensor) parameter.

    Returns:
        FQN -> tensor or DTensor.

    Example:
        >>> distribute_like({"w": torch.arange(2.0)}, {"w": torch.zeros(2)})
        {'w': tensor([0., 1.])}
    """
    out: dict[str, Tensor] = {}
    for name, value in full.items():
        param = params[name]
        if is_sharded(param) and not is_sharded(value):
            value = _wrap_like(_local_part(value, param, None), param)
        out[name] = value
    return out


def shard_full_masks(
    full_masks: Mapping[str, Tensor], params: Mapping[str, Tensor], group: Any = None
) -> dict[str, Tensor]:
    """Local-shard masks cut from full masks (e.g. imported ones), on the parameters' devices.

    Args:
        full_masks: FQN -> full-shape bool mask.
        params: FQN -> (DTensor) parameter.
        group: process group of plain parameters.

    Returns:
        FQN -> local-shard bool mask.

    Raises:
        ValueError: if a full mask does not have its parameter's full shape.

    Example:
        >>> shard_full_masks({"w": torch.tensor([True, False])}, {"w": torch.zeros(2)})
        {'w': tensor([ True, False])}
    """
    group = process_group(params, group)
    out: dict[str, Tensor] = {}
    for name, param in params.items():
        spec = shard_spec(param, group)
        mask = full_masks[name]
        if tuple(mask.shape) != spec.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"Expected the full mask of {name!r} to be a bool tensor of shape {spec.shape}, "
                f"but got {mask.dtype} {tuple(mask.shape)}"
            )
        out[name] = _local_part(mask, param, group)
    return out


def save_masks(masks: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Save masks with ``torch.save`` (loadable with ``torch.load(weights_only=True)``).

    Args:
        masks: FQN -> bool mask.
        path: file path.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "masks.pt"
        >>> save_masks({"w": torch.tensor([True, False])}, path)
        >>> load_masks(path)["w"]
        tensor([ True, False])
    """
    state = {str(n): _check_bool(n, m).detach().to("cpu", copy=True) for n, m in masks.items()}
    torch.save({n: m.contiguous() for n, m in state.items()}, path)


def load_masks(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Load masks saved by :func:`save_masks` (with ``weights_only=True``).

    Args:
        path: file path.
        map_location: device to load onto.

    Returns:
        FQN -> bool mask.

    Raises:
        ValueError: if the file does not hold a dict of bool tensors.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.pt"
        >>> save_masks({"fc.weight": torch.ones(2, 2, dtype=torch.bool)}, path)
        >>> list(load_masks(path))
        ['fc.weight']
    """
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(
            f"Expected {str(path)!r} to hold a dict of bool tensors, but got {type(state).__name__}"
        )
    for name, mask in state.items():
        if not isinstance(name, str) or not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"Expected {str(path)!r} to hold a dict of bool tensors, but entry {name!r} is "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
    return dict(state)
