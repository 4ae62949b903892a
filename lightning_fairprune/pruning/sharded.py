"""Pruning on sharded parameters (FSDP2 ``fully_shard`` DTensors) without gathering them.

Every function here works on the *local shards*: a DTensor parameter (or score) sharded on
its first dimension over a 1-D device mesh (what ``torch.distributed.fsdp.fully_shard``
makes) contributes ``t.to_local()``, a contiguous range of the parameter's row-major flat
index; a plain tensor is taken as *replicated* (identical on every process, counted once).
Masks are local-shard-shaped bool tensors.

**Exact global selection.** :func:`sharded_global_masks` gives on every process the local
slice of exactly the masks :func:`~lightning_fairprune.pruning.masks.global_masks` would
give on the gathered scores, same ordering rules (already-pruned weights first, then lowest
``abs(score)``, ties by the flat index over the unsharded parameters in mapping order):

1. the threshold key comes from :func:`~lightning_fairprune.pruning.masks.radix_select`
   with an all-reduce (sum) of each pass's histogram: two all-reduces of 65,536 int64
   counts for float32 scores (four for float64, one for 16-bit floats);
2. if the threshold is tied, the mask pass prunes every tie and keeps their local positions
   (few, as a rule); one all-reduce of a ``[world, 2 * num_params]`` int64 table (tie counts
   and flat offsets) then gives the exclusive prefix of ties in the global flat order, so
   each process knows how many of its own ties stay pruned (lowest index first) and keeps
   the rest. Beyond 4 Mi ties a counting pass precedes the mask pass instead, so memory
   stays bounded;
3. with current masks, one all-reduce of the pruned count (and of a NaN flag when needed).

Communication per round is therefore ``O(bins + world · num_params)`` numbers whatever the
number of weights (about 1 MiB for float32: two 512 KiB histograms); the layerwise scope
does this once per parameter. Memory per process: the local scores, the local masks, the
65,536-bin histograms, chunk-sized scratch buffers and the local positions of threshold
ties (int64, fewer than 4 Mi over all processes); no tensor of a full parameter is
ever created (tested by recording every tensor the selection allocates).

**Checkpoints.** Masks are stored packed, 1 bit per weight (:func:`pack_mask`):
:func:`sharded_mask_state` gives a ``torch.distributed.checkpoint`` (DCP) state whose
entries are DTensors sharded like the parameters (rows packed along the last dimension),
so DCP reshards them when they are loaded onto another world size;
:func:`gather_full_masks` gives the full (unsharded) masks for
``IterativePruning.export_masks`` and full state dicts, and :func:`shard_full_masks` cuts
full masks down to the local shards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_fairprune.distributed import (
    ShardSpec,
    _dtensor_type,
    _rows_split,
    all_reduce,
    is_sharded,
    process_group,
    shard_spec,
    world,
)
from lightning_fairprune.pruning.masks import (
    _BITS,
    _INT_VIEW,
    _check_sparsity,
    _chunk_size,
    _chunks,
    _common_dtype,
    _Scratch,
    _true_positions,
    local_tensor,
    num_to_prune,
    pack_mask,
    radix_select,
    unpack_mask,
)

__all__ = [
    "ShardSpec",
    "gather_full_masks",
    "gather_full_tensors",
    "is_sharded",
    "load_sharded_mask_state",
    "shard_full_masks",
    "shard_full_tensors",
    "shard_spec",
    "sharded_counts",
    "sharded_global_masks",
    "sharded_layerwise_masks",
    "sharded_mask_state",
    "sharded_realized_sparsity",
]


_MAX_STORED_TIES = 1 << 22
"""Global number of threshold ties up to which the mask pass keeps their positions (int64:
at most 32 MiB); above it a separate counting pass precedes the mask pass."""


def _cat_positions(parts: list[Tensor], device: torch.device) -> Tensor:
    """One int64 tensor of the positions found chunk by chunk (empty if none)."""
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def _count_ties(seg: _Segment, scratch: dict[torch.device, _Scratch], threshold: int) -> int:
    """Unpruned weights of one local segment whose key equals ``threshold`` (one pass)."""
    buffers = scratch[seg.flat.device]
    n_eq = 0
    for a, b in _chunks(seg.flat):
        eq = torch.eq(buffers.keys(seg.flat[a:b]), threshold, out=buffers.flags[: b - a])
        if seg.current is not None:
            eq &= seg.current[a:b]
        n_eq += int(torch.count_nonzero(eq))
    return n_eq


def _tie_prefix(segs: list[_Segment], local_ties: list[int], group: Any) -> list[int]:
    """Per segment, the ties that precede it in the global flat order (one all-reduce).

    Every process contributes its tie count and flat offset per segment (replicas: their
    first holder only) to a ``[world, 2 * segments]`` table; a segment is preceded by all
    ties of earlier tensors and by the ties of the same tensor held at lower offsets.
    """
    r, size = world(group)
    dev0 = segs[0].flat.device
    table = torch.zeros(size, 2 * len(segs), dtype=torch.int64, device=dev0)
    for j, seg in enumerate(segs):
        if seg.spec.owner:
            table[r, 2 * j] = local_ties[j]
            table[r, 2 * j + 1] = seg.spec.offset
    table = all_reduce(table, group).cpu()
    counts, offsets = table[:, 0::2], table[:, 1::2]
    totals = counts.sum(0)
    return [
        int(totals[:j].sum()) + int(counts[:, j][offsets[:, j] < seg.spec.offset].sum())
        for j, seg in enumerate(segs)
    ]


class _Segment(NamedTuple):
    name: str
    index: int  # position in the mapping (global flat order)
    flat: Tensor  # local scores, flat
    current: Tensor | None  # local current mask, flat
    spec: ShardSpec
    shape: tuple[int, ...]  # local shape


def _segments(
    scores: Mapping[str, Tensor], current_masks: Mapping[str, Tensor] | None, group: Any
) -> list[_Segment]:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"Expected `scores` to be a non-empty dict of tensors, but got {scores!r}")
    if current_masks is not None:
        missing = [n for n in scores if n not in current_masks]
        unexpected = [n for n in current_masks if n not in scores]
        if missing or unexpected:
            raise ValueError(
                "Expected `current_masks` to cover exactly the scored parameters, but "
                f"missing={missing}, unexpected={unexpected}"
            )
    out = []
    for i, (name, score) in enumerate(scores.items()):
        spec = shard_spec(score, group)
        local = local_tensor(score).detach()
        cur = None
        if current_masks is not None:
            mask = local_tensor(current_masks[name])
            if tuple(mask.shape) != tuple(local.shape) or mask.dtype != torch.bool:
                raise ValueError(
                    f"Expected the current mask of {name!r} to be a local-shard bool tensor of "
                    f"shape {tuple(local.shape)}, but got {mask.dtype} {tuple(mask.shape)}"
                )
            cur = mask.to(local.device).reshape(-1)
        out.append(_Segment(name, i, local.reshape(-1), cur, spec, tuple(local.shape)))
    return out


def _select_sharded(
    segs: list[_Segment], k: int, group: Any, dtype: torch.dtype, sync_free: bool | None
) -> dict[str, Tensor]:
    """Local masks pruning the ``k`` lowest-priority weights of the *global* scores."""
    int_dtype = _INT_VIEW[dtype]
    bits = _BITS[int_dtype]
    inf_key = int(torch.tensor(math.inf, dtype=dtype).view(int_dtype).item())
    scratch: dict[torch.device, _Scratch] = {}
    for seg in segs:
        dev = seg.flat.device
        if dev not in scratch:
            size = max([s.flat.numel() for s in segs if s.flat.device == dev] + [1])
            scratch[dev] = _Scratch(dtype, dev, min(_chunk_size(dev), size))
    dev0 = segs[0].flat.device

    def nan_check() -> None:  # local scan, then one all-reduce so every process raises
        nan = 0
        for seg in segs:
            for a, b in _chunks(seg.flat):
                key = scratch[seg.flat.device].keys(seg.flat[a:b])
                if seg.current is not None:
                    key = key[seg.current[a:b]]
                if key.numel() and int(key.max()) > inf_key:
                    nan = 1
        if int(all_reduce(torch.tensor([nan], dtype=torch.int64, device=dev0), group)[0]):
            raise ValueError(
                "Expected scores without NaN, but a score of a weight that is not pruned is "
                "NaN (on some process; check the gradients and weights)"
            )

    already = 0  # without current masks on any process (the same call everywhere): none
    if any(seg.current is not None for seg in segs):
        pruned = 0
        for seg in segs:
            if seg.current is not None and seg.spec.owner:
                pruned += seg.current.numel() - int(torch.count_nonzero(seg.current))
        counted = torch.tensor([pruned], dtype=torch.int64, device=dev0)
        already = int(all_reduce(counted, group)[0])
    rank = k - already
    if rank < 0:
        warnings.warn(
            f"{already} of {sum(s.spec.numel for s in segs)} weights of {[s.name for s in segs]} "
            f"are already pruned, more than the {k} asked for; masks only shrink, so they are "
            "kept as they are",
            UserWarning,
            stacklevel=3,
        )
    if rank <= 0:
        nan_check()
        return {
            s.name: (
                s.current.clone()
                if s.current is not None
                else torch.ones(s.flat.numel(), dtype=torch.bool, device=s.flat.device)
            ).view(s.shape)
            for s in segs
        }

    def key_chunks() -> Iterator[tuple[Tensor, Tensor | None]]:
        for seg in segs:
            if not seg.spec.owner:  # a replica counted by its first holder only
                continue
            buffers = scratch[seg.flat.device]
            for a, b in _chunks(seg.flat):
                cand = seg.current[a:b] if seg.current is not None else None
                yield buffers.keys(seg.flat[a:b]), cand

    sel = radix_select(
        key_chunks,
        rank,
        bits,
        # on the same device everywhere (a process without local keys, e.g. with empty
        # shards, makes its zero histogram on the CPU)
        reduce_fn=lambda h: all_reduce(h.to(dev0), group),
        sync_free=sync_free,
    )
    # NaN keys lie above +inf: the (global) top histogram tells every process alike
    top_shift = bits - 16
    inf_digit = inf_key >> top_shift
    hist = sel.top_histogram
    if int(hist[inf_digit + 1 :].sum()) or (top_shift and int(hist[inf_digit])):
        nan_check()
    threshold = sel.threshold
    need = sel.rank_in_ties
    ties = need < sel.count_equal

    # Ties at the threshold are pruned in the global flat order, which needs the number of
    # ties every process holds before each of its segments. When the ties are few (the usual
    # case), the mask pass prunes all of them and keeps their positions; one all-reduce of
    # the tie table then gives each process how many of its own to keep pruned. Otherwise
    # (very many equal scores) a counting pass comes first and the mask pass needs no memory.
    count_first = ties and sel.count_equal > _MAX_STORED_TIES
    preceding = [0] * len(segs)
    if count_first:
        preceding = _tie_prefix(segs, [_count_ties(seg, scratch, threshold) for seg in segs], group)

    masks: dict[str, Tensor] = {}
    stored: list[list[Tensor]] = [[] for _ in segs]  # local flat positions of the ties
    for j, seg in enumerate(segs):
        buffers = scratch[seg.flat.device]
        out = torch.empty(seg.flat.numel(), dtype=torch.bool, device=seg.flat.device)
        left = max(0, need - preceding[j])  # ties of this segment still to prune
        for a, b in _chunks(seg.flat):
            key = buffers.keys(seg.flat[a:b])
            keep = out[a:b]
            torch.gt(key, threshold, out=keep)
            if seg.current is not None:
                keep &= seg.current[a:b]
            if not ties:
                continue
            eq = torch.eq(key, threshold, out=buffers.flags[: b - a])
            if seg.current is not None:
                eq &= seg.current[a:b]
            if count_first and left == 0:  # every later tie of this segment is kept
                keep |= eq
                continue
            positions = _true_positions(eq)
            if not count_first:
                if positions.numel():
                    stored[j].append(positions.add_(a))
            elif positions.numel() <= left:
                left -= positions.numel()
            else:
                keep[positions[left:]] = True
                left = 0
        masks[seg.name] = out.view(seg.shape)
    if ties and not count_first:
        found = [
            _cat_positions(parts, seg.flat.device) for parts, seg in zip(stored, segs, strict=True)
        ]
        preceding = _tie_prefix(segs, [int(f.numel()) for f in found], group)
        for j, seg in enumerate(segs):
            left = max(0, need - preceding[j])
            if found[j].numel() > left:  # the ties after the first `left` are kept
                masks[seg.name].view(-1)[found[j][left:]] = True
    return masks


def sharded_global_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
    *,
    group: Any = None,
    sync_free: bool | None = None,
) -> dict[str, Tensor]:
    """Local masks of :func:`~lightning_fairprune.pruning.masks.global_masks` over shards.

    Call it on every process of the group at once (it runs collectives), with
    ``current_masks`` given on every process or on none. The local masks of
    all processes put together equal ``global_masks`` of the gathered scores, bit for bit:
    exactly ``round(sparsity · N)`` weights pruned, ``N`` the number of weights of the full
    tensors (see the module docstring for the algorithm and its communication).

    Args:
        scores: FQN -> score: DTensors sharded on dim 0 (their local shards are used) or
            plain tensors (replicas, identical on every process). The mapping order and
            row-major order within each full tensor define the tie-break order.
        sparsity: target cumulative sparsity in ``[0, 1)``.
        current_masks: FQN -> local-shard bool mask of earlier rounds (or DTensor masks
            placed like the scores), or ``None``.
        group: process group (default: the DTensors' mesh group, else the default group).
        sync_free: see :func:`~lightning_fairprune.pruning.masks.radix_select`.

    Returns:
        FQN -> local-shard bool mask (``True`` = kept).

    Example:
        >>> scores = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([[0.3, 0.1]])}
        >>> masks = sharded_global_masks(scores, 0.6)  # one process: same as global_masks
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([True, False, True], [[False, False]])
    """
    s = _check_sparsity(sparsity)
    group = process_group(scores, group)
    segs = _segments(scores, current_masks, group)
    dtype = _common_dtype({sg.name: sg.flat for sg in segs})
    total = sum(sg.spec.numel for sg in segs)
    k = num_to_prune(s, total)
    return _select_sharded(segs, k, group, dtype, sync_free)


def sharded_layerwise_masks(
    scores: Mapping[str, Tensor],
    sparsity: float | Mapping[str, float],
    current_masks: Mapping[str, Tensor] | None = None,
    *,
    group: Any = None,
    sync_free: bool | None = None,
) -> dict[str, Tensor]:
    """Local masks of :func:`~lightning_fairprune.pruning.masks.layerwise_masks` over shards.

    Every tensor reaches ``round(sparsity · n_l)`` pruned weights of its full size ``n_l``;
    one radix selection (two histogram all-reduces for float32) per tensor.

    Args:
        scores: FQN -> score (see :func:`sharded_global_masks`).
        sparsity: one target for every tensor, or a per-FQN mapping.
        current_masks: FQN -> local-shard bool mask, or ``None``.
        group: process group (see :func:`sharded_global_masks`).
        sync_free: see :func:`~lightning_fairprune.pruning.masks.radix_select`.

    Returns:
        FQN -> local-shard bool mask.

    Example:
        >>> scores = {"a": torch.tensor([0.5, 0.1, 0.9, 0.2]), "b": torch.tensor([0.3, 0.1])}
        >>> masks = sharded_layerwise_masks(scores, 0.5)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([True, False, True, False], [True, False])
    """
    group = process_group(scores, group)
    segs = _segments(scores, current_masks, group)
    if isinstance(sparsity, Mapping):
        missing = [n for n in scores if n not in sparsity]
        if missing:
            raise ValueError(
                "Expected `sparsity` to hold a value for every parameter, "
                f"but {missing} are missing"
            )
        targets = {n: _check_sparsity(sparsity[n], f"sparsity[{n!r}]") for n in scores}
    else:
        targets = dict.fromkeys(scores, _check_sparsity(sparsity))
    masks: dict[str, Tensor] = {}
    for seg in segs:
        k = num_to_prune(targets[seg.name], seg.spec.numel)
        one = [seg._replace(index=0)]
        dtype = _common_dtype({seg.name: seg.flat})
        masks.update(_select_sharded(one, k, group, dtype, sync_free))
    return masks


def sharded_counts(
    masks: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None, group: Any = None
) -> dict[str, tuple[int, int]]:
    """Pruned and total weights of every full tensor from local masks (one all-reduce).

    Args:
        masks: FQN -> local-shard bool mask (or DTensor masks).
        params: FQN -> the (DTensor) parameters the masks belong to, for their layout
            (default: the masks themselves, which must then be DTensors or replicas).
        group: process group (default: the parameters' mesh group, else the default group).

    Returns:
        FQN -> ``(pruned, total)`` over the full tensor.

    Example:
        >>> sharded_counts({"w": torch.tensor([True, False, False, True])})
        {'w': (2, 4)}
    """
    ref = params if params is not None else masks
    group = process_group(ref, group)
    names = list(masks)
    pruned = torch.zeros(len(names), dtype=torch.int64)
    totals = []
    for i, name in enumerate(names):
        spec = shard_spec(ref[name], group)
        totals.append(spec.numel)
        if spec.owner:
            local = local_tensor(masks[name])
            pruned[i] = local.numel() - int(torch.count_nonzero(local))
    pruned = all_reduce(pruned, group)
    return {n: (int(pruned[i]), totals[i]) for i, n in enumerate(names)}


def sharded_realized_sparsity(
    masks: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None, group: Any = None
) -> float:
    """Global fraction of pruned weights from local masks (one all-reduce).

    Args:
        masks: FQN -> local-shard bool mask (or DTensor masks).
        params: FQN -> the (DTensor) parameters the masks belong to (see :func:`sharded_counts`).
        group: process group (default: the parameters' mesh group, else the default group).

    Returns:
        Pruned weights / all weights, over the full tensors.

    Example:
        >>> sharded_realized_sparsity({"w": torch.tensor([True, False, False, True])})
        0.5
    """
    counts = sharded_counts(masks, params, group)
    total = sum(t for _, t in counts.values())
    return sum(z for z, _ in counts.values()) / total if total else 0.0


# ---------------------------------------------------------------------------- checkpoints


def gather_full_masks(
    masks: Mapping[str, Tensor], params: Mapping[str, Tensor], group: Any = None
) -> dict[str, Tensor]:
    """Full (unsharded) CPU bool masks from local-shard masks, on every process.

    Each process sends its local masks packed (1 bit per weight); the full masks are
    assembled one parameter at a time. A collective for every parameter sharded on rows,
    whatever the size of the local shards (empty ones included): call it on every process.
    This is the *full* form (for ``export_masks`` and full state dicts): its size is one
    byte per weight of the full model (bool), so use :func:`sharded_mask_state` when the
    full masks should not exist anywhere.

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
    _, size = world(group)
    out: dict[str, Tensor] = {}
    for name, param in params.items():
        spec = shard_spec(param, group)
        local = local_tensor(masks[name]).detach().to("cpu").reshape(-1)
        # decided from the layout alone, the same on every process: a process holding the
        # whole of a sharded tensor (the others an empty shard) still joins the gather
        if size == 1 or not _rows_split(param):
            out[name] = local.clone().view(spec.shape)
            continue
        pieces: list[Any] = [None] * size
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
    dtensor = _dtensor_type()
    out: dict[str, Tensor] = {}
    for name, param in params.items():
        value = local[name].detach()
        if dtensor is not None and isinstance(param, dtensor):
            wrapped = dtensor.from_local(
                value.to(param.to_local().device),
                param.device_mesh,
                param.placements,
                shape=param.shape,
                stride=param.stride(),
                run_check=False,
            )
            out[name] = wrapped.full_tensor().cpu()
        else:
            out[name] = value.cpu().clone()
    return out


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


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def sharded_mask_state(
    masks: Mapping[str, Tensor], params: Mapping[str, Tensor], group: Any = None
) -> dict[str, Tensor]:
    """A ``torch.distributed.checkpoint`` state of the masks, packed and sharded.

    A mask of a tensor sharded on rows is stored as a ``[rows, ceil(cols / 8)]`` uint8
    DTensor (each row packed on its own, ``cols`` = product of the other dimensions) placed
    like the parameter, so DCP writes each process's rows once and reshards them on load
    onto any world size. 1-D tensors (biases) and replicas are stored as plain packed
    tensors (``[1, ceil(n / 8)]`` for 1-D), gathered first (they are small). The layout
    depends only on the full shape, so a state saved sharded loads on one process. 1 bit
    per weight plus at most 7 bits of padding per row.

    Args:
        masks: FQN -> local-shard bool mask.
        params: FQN -> (DTensor) parameter.
        group: process group (default: the parameters' mesh group, else the default group).

    Returns:
        FQN -> packed tensor (DTensor or plain), for ``dcp.save({"masks": state, ...})``.

    Example:
        >>> masks, params = {"w": torch.tensor([[True, False]])}, {"w": torch.zeros(1, 2)}
        >>> state = sharded_mask_state(masks, params)
        >>> state["w"]
        tensor([[128]], dtype=torch.uint8)
    """
    group = process_group(params, group)
    dtensor = _dtensor_type()
    out: dict[str, Tensor] = {}
    for name, param in params.items():
        spec = shard_spec(param, group)
        rows, cols = _rows(spec.shape)
        if dtensor is not None and isinstance(param, dtensor) and len(spec.shape) > 1:
            local = local_tensor(masks[name]).detach().to("cpu").reshape(-1, cols)
            packed = pack_mask(local)
            out[name] = dtensor.from_local(
                packed.to(local_tensor(param).device),
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=torch.Size((rows, -(-cols // 8))),
                stride=(-(-cols // 8), 1),
            )
        else:
            full = gather_full_masks({name: masks[name]}, {name: param}, group)[name]
            out[name] = pack_mask(full.reshape(rows, cols))
    return out


def load_sharded_mask_state(
    state: Mapping[str, Tensor], params: Mapping[str, Tensor], group: Any = None
) -> dict[str, Tensor]:
    """Local-shard bool masks from a state loaded by DCP into :func:`sharded_mask_state` targets.

    Load with ``dcp.load({"masks": sharded_mask_state(placeholder_masks, params)}, ...)``
    (the placeholders only give the layout: any masks of the right local shapes, e.g.
    all-``True``), then unpack here. On a single process without a process group the
    targets are plain tensors and DCP fills them with the full packed rows.

    Args:
        state: FQN -> packed tensor (DTensor or plain) as filled by ``dcp.load``.
        params: FQN -> (DTensor) parameter.
        group: process group of plain parameters.

    Returns:
        FQN -> local-shard bool mask, on the parameters' devices.

    Example:
        >>> params = {"w": torch.zeros(1, 2)}
        >>> state = sharded_mask_state({"w": torch.tensor([[True, False]])}, params)
        >>> load_sharded_mask_state(state, params)["w"]
        tensor([[ True, False]])
    """
    group = process_group(params, group)
    dtensor = _dtensor_type()
    out: dict[str, Tensor] = {}
    for name, param in params.items():
        spec = shard_spec(param, group)
        local_param = local_tensor(param)
        packed = state[name]
        _, cols = _rows(spec.shape)
        if dtensor is not None and isinstance(packed, dtensor):
            packed_local = packed.to_local().cpu()
            bits = unpack_mask(packed_local, cols)
            out[name] = bits.reshape(local_param.shape).to(local_param.device)
            continue
        full = unpack_mask(packed.cpu(), cols).reshape(spec.shape)
        out.update(shard_full_masks({name: full}, {name: param}, group))
    return out
