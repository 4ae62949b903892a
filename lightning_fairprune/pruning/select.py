"""Selection: from scores to bool keep-masks with exactly the requested sparsity.

Masks are ``dict[str, torch.BoolTensor]`` keyed by the parameter's fully-qualified name,
``True`` = kept, same shape and device as the scores: one byte per weight.

**One selection for plain tensors and shards.** :func:`global_masks` prunes exactly
``round(s · N)`` weights (``N`` = number of weights, rounding half up) with the lowest
``abs(score)``; :func:`layerwise_masks` does so in every tensor. Scores may be plain tensors
or DTensors sharded on dim 0 over a 1-D mesh (what FSDP2's ``fully_shard`` makes). Every
tensor is a list of *segments*: a contiguous range of its row-major flat index held by one
process. A plain tensor is one segment held by this process; a DTensor contributes its local
shard; with DTensors (or an explicit ``group``) a plain tensor is a replica counted by the
first process only. The same algorithm runs on both, and the local masks of all processes
put together equal the masks of the gathered scores, bit for bit:

1. the threshold key comes from :func:`radix_select` on the bit patterns of the absolute
   scores (for non-negative IEEE floats the bit pattern, read as an integer, orders like the
   value): one histogram of the top 16 bits, then one of the next 16 bits within the bucket
   that holds the threshold (float32; float64 needs four passes, float16 one). Across
   processes each pass's histogram is all-reduced (two all-reduces of 65,536 int64 counts for
   float32 scores). The scores are streamed in chunks: the peak extra memory is the output
   masks plus a few chunk-sized buffers, with no sort and no concatenated copy of the scores;
2. ties at the threshold are pruned in the global flat order. One process streams them (a
   running count; on accelerators a cumulative sum without host synchronisation). Across
   processes the mask pass prunes every tie and keeps their local positions (few, as a rule);
   one all-reduce of a ``[world, 2 · segments]`` int64 table (tie counts and flat offsets)
   then gives each process how many of its own ties stay pruned (lowest index first). Beyond
   4 Mi ties a counting pass precedes the mask pass instead, so memory stays bounded;
3. with current masks, one all-reduce of the pruned count (and of a NaN flag when needed).

Communication per round is ``O(bins + world · tensors)`` numbers whatever the number of
weights; no tensor of a full sharded parameter is ever created.

**Ordering rules.** Weights that are already pruned in ``current_masks`` stay pruned (they
rank below every score). Among equal scores the weight with the lower *flat index* is pruned
first, where the flat index runs over the tensors in the mapping's order and row-major within
each (full) tensor. A NaN score of a weight that is not already pruned raises ``ValueError``
on every process; ``±inf`` is allowed. Scores of different floating dtypes are compared in
their promoted dtype. The returned masks are new tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_fairprune.checks import check_sparsity
from lightning_fairprune.distributed import (
    ShardSpec,
    all_reduce,
    is_sharded,
    local_tensor,
    process_group,
    shard_spec,
)
from lightning_fairprune.distributed import (
    world as rank_world,
)

__all__ = [
    "RadixSelection",
    "abs_keys",
    "check_masks_fit",
    "full_masks",
    "global_masks",
    "layerwise_masks",
    "num_to_prune",
    "radix_select",
]

_CHUNK = 1 << 22  # elements per streamed chunk on the CPU: 9 bytes of scratch each (36 MiB)
_CHUNK_DEVICE = 1 << 24  # on accelerators (fewer launches; about 0.3 GiB of scratch)
_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_BITS = {torch.int16: 16, torch.int32: 32, torch.int64: 64}
_SPREAD = 1024  # overflow bins for discarded elements in the sync-free histogram
_MAX_STORED_TIES = 1 << 22
"""Global number of threshold ties up to which the mask pass keeps their positions (int64:
at most 32 MiB); above it a separate counting pass precedes the mask pass."""


def num_to_prune(sparsity: float, total: int) -> int:
    """Number of weights a sparsity prunes out of ``total``: ``round(sparsity · total)``.

    Rounds half up (``floor(s · N + 0.5)``), so the result does not depend on Python's
    banker's rounding.

    Args:
        sparsity: fraction in ``[0, 1)``.
        total: number of weights.

    Returns:
        The count.

    Example:
        >>> num_to_prune(0.25, 10)
        3
        >>> num_to_prune(0.5, 7)
        4
    """
    s = check_sparsity(sparsity, "sparsity")
    return min(int(total), math.floor(s * total + 0.5))


def check_masks_fit(masks: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
    """Check that masks fit parameters: same names, same shapes, boolean dtype.

    Args:
        masks: FQN -> mask.
        params: FQN -> parameter (or any tensor of the parameter's shape).

    Raises:
        ValueError: naming the missing and unexpected names, or the FQN whose mask has the
            wrong shape (expected and got), or the wrong dtype.

    Example:
        >>> check_masks_fit({"w": torch.ones(2, 3, dtype=torch.bool)}, {"w": torch.zeros(3, 2)})
        Traceback (most recent call last):
        ...
        ValueError: Expected the mask of 'w' to have shape (3, 2), but got (2, 3)
    """
    if not isinstance(masks, Mapping):
        raise TypeError(
            f"Expected `masks` to be a dict of bool tensors, but got {type(masks).__name__}"
        )
    _check_cover(masks, params, "the masks", "the pruned parameters")
    for name, param in params.items():
        mask = masks[name]
        if not isinstance(mask, Tensor):
            raise ValueError(f"Expected the mask of {name!r} to be a tensor, but got {mask!r:.80}")
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"Expected the mask of {name!r} to have shape {tuple(param.shape)}, "
                f"but got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(
                f"Expected the mask of {name!r} to have dtype torch.bool, but got {mask.dtype}"
            )


def _check_cover(given: Mapping[str, Any], names: Mapping[str, Any], what: str, of: str) -> None:
    missing = [n for n in names if n not in given]
    unexpected = [n for n in given if n not in names]
    if missing or unexpected:
        raise ValueError(
            f"Expected {what} to cover exactly {of}, but missing={missing}, unexpected={unexpected}"
        )


def full_masks(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All-``True`` masks (nothing pruned) for the given parameters.

    Args:
        params: FQN -> parameter.

    Returns:
        FQN -> bool mask of ones.

    Example:
        >>> full_masks({"w": torch.zeros(2)})["w"]
        tensor([True, True])
    """
    return {n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in params.items()}


def _common_dtype(scores: Mapping[str, Tensor]) -> torch.dtype:
    dtype: torch.dtype | None = None
    for name, score in scores.items():
        if not isinstance(score, Tensor) or not score.is_floating_point():
            raise TypeError(
                f"Expected the score of {name!r} to be a floating-point tensor, "
                f"but got {getattr(score, 'dtype', type(score).__name__)}"
            )
        dtype = score.dtype if dtype is None else torch.promote_types(dtype, score.dtype)
    if dtype not in _INT_VIEW:
        dtype = torch.float32 if dtype is None or dtype.itemsize <= 4 else torch.float64
    return dtype


def abs_keys(values: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Non-negative integer keys that order like ``abs(values)`` (input of :func:`radix_select`).

    The bit pattern of a non-negative IEEE float, read as a signed integer of the same width,
    orders like the value (``+inf`` above every finite value, NaN above ``+inf``).

    Args:
        values: floating-point tensor.
        dtype: float dtype to compare in (default ``values.dtype``; float16, bfloat16,
            float32 or float64).

    Returns:
        A new integer tensor (int16/int32/int64) of the same shape.

    Example:
        >>> keys = abs_keys(torch.tensor([-2.0, 0.5, 1.0, -0.0]))
        >>> torch.argsort(keys).tolist()
        [3, 1, 2, 0]
    """
    dtype = values.dtype if dtype is None else dtype
    if dtype not in _INT_VIEW:
        raise ValueError(
            f"Expected `dtype` to be float16, bfloat16, float32 or float64, but got {dtype}"
        )
    return values.detach().to(dtype).abs().view(_INT_VIEW[dtype])


def _true_positions(flags: Tensor) -> Tensor:
    """Flat int64 indices of the ``True`` entries of a 1-D bool tensor.

    A ``max`` over the ``uint8`` view first (about 40x cheaper than ``nonzero`` on the CPU)
    skips ``nonzero`` when nothing is set, which is the usual case for the ties of a
    selection threshold. One host synchronisation.

    Example:
        >>> _true_positions(torch.tensor([False, True, False, True])).tolist()
        [1, 3]
    """
    if flags.numel() == 0 or not int(flags.view(torch.uint8).max()):
        return torch.zeros(0, dtype=torch.int64, device=flags.device)
    return flags.nonzero().flatten()


class _Scratch:
    """Reusable chunk buffers, so streaming the scores allocates nothing per chunk."""

    def __init__(self, dtype: torch.dtype, device: torch.device, size: int) -> None:
        self.dtype = dtype
        self.int_dtype = _INT_VIEW[dtype]
        self.values = torch.empty(size, dtype=dtype, device=device)
        self.ints = torch.empty(size, dtype=self.int_dtype, device=device)
        self.flags = torch.empty(size, dtype=torch.bool, device=device)

    def keys(self, chunk: Tensor) -> Tensor:
        """Integer keys that order like ``abs(chunk)`` (non-negative; NaN above +inf)."""
        buf = self.values[: chunk.numel()]
        if chunk.dtype == self.dtype:
            torch.abs(chunk, out=buf)
        else:
            buf.copy_(chunk)
            buf.abs_()
        return buf.view(self.int_dtype)


# ----------------------------------------------------------------------------- radix select


class RadixSelection(NamedTuple):
    """Result of :func:`radix_select`.

    Attributes:
        threshold: the key of the ``rank``-th smallest candidate.
        rank_in_ties: how many candidates whose key equals ``threshold`` lie within the
            ``rank`` smallest (``1 <= rank_in_ties <= count_equal``); a caller that breaks
            ties by position selects the first ``rank_in_ties`` of them.
        count_equal: number of candidates whose key equals ``threshold``.
        top_histogram: CPU int64 histogram of the most significant digit over all
            candidates (after ``reduce_fn``), e.g. to detect NaN keys above ``+inf``.
    """

    threshold: int
    rank_in_ties: int
    count_equal: int
    top_histogram: Tensor


class _DigitScratch:
    """Per-device digit buffers of :func:`radix_select`, reused across chunks and passes."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.flags: dict[torch.device, Tensor] = {}
        self.spread: dict[torch.device, Tensor] = {}

    def ints(self, like: Tensor, dtype: torch.dtype, n: int) -> Tensor:
        key = (like.device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = torch.empty(n, dtype=dtype, device=like.device)
        return buf[:n]

    def bools(self, like: Tensor, n: int) -> Tensor:
        buf = self.flags.get(like.device)
        if buf is None or buf.numel() < n:
            buf = self.flags[like.device] = torch.empty(n, dtype=torch.bool, device=like.device)
        return buf[:n]

    def spread_bins(self, like: Tensor, base: int, n: int) -> Tensor:
        """``base + (arange(n) % 1024)``: overflow bins that spread discarded elements."""
        buf = self.spread.get(like.device)
        if buf is None or buf.numel() < n:
            idx = torch.arange(n, device=like.device, dtype=torch.int32)
            buf = self.spread[like.device] = idx.bitwise_and_(_SPREAD - 1).add_(base)
        return buf[:n]


def radix_select(
    chunks: Callable[[], Iterable[tuple[Tensor, Tensor | None]]],
    rank: int,
    key_bits: int,
    *,
    digit_bits: int = 16,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
    sync_free: bool | None = None,
) -> RadixSelection:
    """Exact ``rank``-th smallest key by histogram (radix) passes, without sorting.

    Each pass streams the keys once and histograms one ``digit_bits``-wide digit of the
    keys whose higher digits equal the prefix found so far (most significant digit first),
    so a ``key_bits``-bit key needs ``ceil(key_bits / digit_bits)`` passes (float32 bit
    patterns with 16-bit digits: two) and the extra memory is the histogram plus a few
    chunk-sized buffers. The histogram of each pass goes through ``reduce_fn`` before it is
    read, so with ``reduce_fn`` an all-reduce (sum) over processes that each stream their own
    shard of the keys, every process finds the same *global* threshold: one all-reduce of
    ``2**digit_bits`` counts per pass (two of 65,536 counts for float32 scores).

    The keys are non-negative integers that order like the values being selected, e.g. the
    bit patterns of non-negative IEEE floats viewed as integers (see :func:`abs_keys`).

    Args:
        chunks: called once per pass; returns an iterable of ``(keys, candidates)``: a 1-D
            non-negative integer tensor of keys and a bool tensor of the same shape marking
            the candidates (``None``: all are candidates). Every pass must yield the same
            keys in the same order; each chunk is consumed before the next is requested, so
            the keys may live in a reused buffer.
        rank: 1-indexed rank of the wanted key among all candidates (over all processes
            when ``reduce_fn`` is given); ``1 <= rank <= number of candidates``.
        key_bits: width of the keys in bits (16, 32 or 64: the bit patterns of float16 /
            bfloat16, float32, float64).
        digit_bits: bits per pass (1-16); ``2**digit_bits`` counts per histogram.
        reduce_fn: ``hist -> hist`` applied to every pass's int64 histogram (on the keys'
            device) before it is read, e.g. ``dist.all_reduce`` (sum) for sharded keys.
        sync_free: build the histograms without host synchronisation inside a pass
            (discarded elements go to spread overflow bins instead of being compacted);
            ``None`` chooses it for every device but the CPU, where compaction is faster.

    Returns:
        :class:`RadixSelection`.

    Raises:
        ValueError: bad ``key_bits``/``digit_bits``, ``rank < 1`` or more than the candidates.

    Example:
        >>> keys = torch.tensor([7, 3, 3, 9, 1, 3])
        >>> sel = radix_select(lambda: [(keys, None)], rank=3, key_bits=32, digit_bits=4)
        >>> sel.threshold, sel.rank_in_ties, sel.count_equal
        (3, 2, 3)
        >>> int(torch.sort(keys).values[2])
        3
    """
    if key_bits not in (16, 32, 64):
        raise ValueError(f"Expected `key_bits` to be 16, 32 or 64, but got {key_bits!r}")
    if isinstance(digit_bits, bool) or not isinstance(digit_bits, int) or not 1 <= digit_bits <= 16:
        raise ValueError(f"Expected `digit_bits` to be an int in [1, 16], but got {digit_bits!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Expected `rank` to be an int >= 1, but got {rank!r}")
    nbins = 1 << digit_bits
    shifts = [*range(key_bits - digit_bits, 0, -digit_bits), 0]
    scratch = _DigitScratch()
    device = torch.device("cpu")  # of the last keys seen (for an empty local histogram)
    prefix = 0
    count_equal = 0
    top_hist: Tensor | None = None
    remaining = rank
    for i, shift in enumerate(shifts):
        # the most significant digit may be narrower than digit_bits (e.g. 64 = 4*16)
        high_shift = shifts[i - 1] if i else key_bits
        hist: Tensor | None = None
        for key, cand in chunks():
            device = key.device
            if key.numel() == 0:
                continue
            free = key.device.type != "cpu" if sync_free is None else sync_free
            counts = _digit_histogram(
                key, cand, shift, high_shift, prefix, i == 0, nbins, free, scratch
            )
            if counts is not None:
                hist = counts if hist is None else hist.add_(counts)
        if hist is None:
            if reduce_fn is None:
                raise ValueError(
                    f"Expected `rank` <= the number of candidates, but got rank {rank} and no "
                    "candidate keys"
                )
            # this process holds no candidate of the bucket: it still joins the reduction
            hist = torch.zeros(nbins, dtype=torch.int64, device=device)
        if reduce_fn is not None:
            hist = reduce_fn(hist)
        hist = hist.cpu()
        if i == 0:
            top_hist = hist
        cum = torch.cumsum(hist, 0)
        if int(cum[-1]) < remaining:
            raise ValueError(
                f"Expected `rank` <= the number of candidates, but got rank {rank} and "
                f"{int(cum[-1]) if i == 0 else 'fewer'} candidates"
            )
        d = int(torch.searchsorted(cum, torch.tensor([remaining], dtype=cum.dtype)).item())
        if d > 0:
            remaining -= int(cum[d - 1])
        count_equal = int(hist[d])
        prefix = (prefix << (high_shift - shift)) | d
    return RadixSelection(prefix, remaining, count_equal, top_hist)  # type: ignore[arg-type]


def _digit_histogram(
    key: Tensor,
    cand: Tensor | None,
    shift: int,
    high_shift: int,
    prefix: int,
    first: bool,
    nbins: int,
    sync_free: bool,
    scratch: _DigitScratch,
) -> Tensor | None:
    """Histogram of one digit of the candidates of one chunk (int64, ``nbins`` counts)."""
    n = key.numel()
    mask = (1 << (high_shift - shift)) - 1  # the last digit may be narrower
    if sync_free:
        wide = torch.promote_types(key.dtype, torch.int32)
        digit = torch.bitwise_right_shift(key, shift, out=scratch.ints(key, wide, n))
        if not first:
            digit.bitwise_and_(mask)
            sel = torch.eq(key >> high_shift, prefix, out=scratch.bools(key, n))
            if cand is not None:
                sel &= cand
        else:
            sel = cand
        if sel is not None:
            # discarded elements go to overflow bins spread by position (no hot spot, no sync)
            digit = torch.where(sel, digit, scratch.spread_bins(key, nbins, n))
        return torch.bincount(digit, minlength=nbins + _SPREAD)[:nbins]
    if first:
        digit = torch.bitwise_right_shift(key, shift, out=scratch.ints(key, key.dtype, n))
        pruned = 0
        if cand is not None:
            pruned = n - int(torch.count_nonzero(cand))
            if pruned:
                digit.mul_(cand)  # excluded ones to bucket 0, subtracted below
        counts = torch.bincount(digit, minlength=nbins)
        if pruned:
            counts[0] -= pruned
        return counts
    high = torch.bitwise_right_shift(key, high_shift, out=scratch.ints(key, key.dtype, n))
    sel = torch.eq(high, prefix, out=scratch.bools(key, n))
    if cand is not None:
        sel &= cand
    digit = (key[sel] >> shift) & mask
    if digit.numel() == 0:
        return None
    return torch.bincount(digit, minlength=nbins)


def _chunk_size(device: torch.device) -> int:
    # larger chunks off the CPU: fewer launches; the scratch stays a few hundred MB at most
    return _CHUNK if device.type == "cpu" else _CHUNK_DEVICE


def _chunks(flat: Tensor) -> Iterator[tuple[int, int]]:
    n = flat.numel()
    step = _chunk_size(flat.device)
    for start in range(0, n, step):
        yield start, min(n, start + step)


# ----------------------------------------------------------------------------- segments


class _Comm(NamedTuple):
    """The processes a selection spans: all-reduces over ``group`` (rank, world size)."""

    group: Any
    rank: int
    world: int

    def reduce(self, t: Tensor) -> Tensor:
        return all_reduce(t, self.group) if self.world > 1 else t


class _Segment(NamedTuple):
    name: str
    flat: Tensor  # local scores, flat
    current: Tensor | None  # local current mask, flat
    spec: ShardSpec
    shape: tuple[int, ...]  # local shape


def _comm(scores: Mapping[str, Tensor], group: Any) -> _Comm | None:
    """Across processes when a score is a DTensor or a group is given, else ``None``."""
    if group is None and not is_sharded(scores):
        return None
    group = process_group(scores, group)
    rank, world = rank_world(group)
    return _Comm(group, rank, world)


def _segments(
    scores: Mapping[str, Tensor], current_masks: Mapping[str, Tensor] | None, comm: _Comm | None
) -> list[_Segment]:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"Expected `scores` to be a non-empty dict of tensors, but got {scores!r}")
    if current_masks is not None:
        _check_cover(current_masks, scores, "`current_masks`", "the scored parameters")
    out = []
    for name, score in scores.items():
        local = local_tensor(score).detach()
        if comm is None:  # one process holds the whole tensor
            numel = local.numel()
            spec = ShardSpec(tuple(local.shape), numel, 0, numel, True)
        else:
            spec = shard_spec(score, comm.group)
        cur = None
        if current_masks is not None:
            mask = local_tensor(current_masks[name])
            if tuple(mask.shape) != tuple(local.shape) or mask.dtype != torch.bool:
                raise ValueError(
                    f"Expected the current mask of {name!r} to be a bool tensor of shape "
                    f"{tuple(local.shape)} (the local shard), but got {mask.dtype} "
                    f"{tuple(mask.shape)}"
                )
            cur = mask.to(local.device).reshape(-1)
        out.append(_Segment(name, local.reshape(-1), cur, spec, tuple(local.shape)))
    return out


def _scratch(segs: list[_Segment], dtype: torch.dtype) -> dict[torch.device, _Scratch]:
    scratch: dict[torch.device, _Scratch] = {}
    for seg in segs:
        dev = seg.flat.device
        if dev not in scratch:
            size = max([s.flat.numel() for s in segs if s.flat.device == dev] + [1])
            scratch[dev] = _Scratch(dtype, dev, min(_chunk_size(dev), size))
    return scratch


def _count_pruned(segs: list[_Segment], comm: _Comm | None) -> int:
    """Already pruned weights over all segments (one host synchronisation per device)."""
    if all(seg.current is None for seg in segs):  # the same on every process (contract)
        return 0
    per_device: dict[torch.device, list[Tensor]] = {}
    for seg in segs:
        if seg.current is not None and seg.spec.owner:
            count = seg.current.numel() - torch.count_nonzero(seg.current)
            per_device.setdefault(seg.current.device, []).append(count)
    local = sum(int(torch.stack(v).sum()) for v in per_device.values())
    if comm is None:
        return local
    counted = torch.tensor([local], dtype=torch.int64, device=segs[0].flat.device)
    return int(comm.reduce(counted)[0])


def _check_nan(
    segs: list[_Segment], scratch: dict[torch.device, _Scratch], inf_key: int, comm: _Comm | None
) -> None:
    """Raise on every process if a score of a weight not yet pruned is NaN (one all-reduce)."""
    bad: str | None = None
    for seg in segs:
        for a, b in _chunks(seg.flat):
            key = scratch[seg.flat.device].keys(seg.flat[a:b])
            if seg.current is not None:
                key = key[seg.current[a:b]]
            if key.numel() and int(key.max()) > inf_key:
                bad = seg.name
                break
        if bad is not None:
            break
    found = bad is not None
    if comm is not None:
        flag = torch.tensor([int(found)], dtype=torch.int64, device=segs[0].flat.device)
        found = bool(int(comm.reduce(flag)[0]))
    if found:
        where = f"the score of {bad!r} contains NaN" if bad else "a score on another process is NaN"
        raise ValueError(
            f"Expected scores without NaN, but {where} (check the gradients and weights of "
            "this parameter)"
        )


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


def _tie_prefix(segs: list[_Segment], local_ties: list[int], comm: _Comm) -> list[int]:
    """Per segment, the ties that precede it in the global flat order (one all-reduce).

    Every process contributes its tie count and flat offset per segment (replicas: their
    first holder only) to a ``[world, 2 * segments]`` table; a segment is preceded by all
    ties of earlier tensors and by the ties of the same tensor held at lower offsets.
    """
    table = torch.zeros(comm.world, 2 * len(segs), dtype=torch.int64, device=segs[0].flat.device)
    for j, seg in enumerate(segs):
        if seg.spec.owner:
            table[comm.rank, 2 * j] = local_ties[j]
            table[comm.rank, 2 * j + 1] = seg.spec.offset
    table = comm.reduce(table).cpu()
    counts, offsets = table[:, 0::2], table[:, 1::2]
    totals = counts.sum(0)
    return [
        int(totals[:j].sum()) + int(counts[:, j][offsets[:, j] < seg.spec.offset].sum())
        for j, seg in enumerate(segs)
    ]


# ----------------------------------------------------------------------------- selection


def _select(
    segs: list[_Segment], k: int, comm: _Comm | None, sync_free: bool | None
) -> dict[str, Tensor]:
    """Local masks pruning the ``k`` lowest-priority weights of the segments (all processes)."""
    dtype = _common_dtype({seg.name: seg.flat for seg in segs})
    bits = _BITS[_INT_VIEW[dtype]]
    inf_key = int(torch.tensor(math.inf, dtype=dtype).view(_INT_VIEW[dtype]).item())
    scratch = _scratch(segs, dtype)
    already = _count_pruned(segs, comm)
    rank = k - already  # how many more weights to prune (1-indexed rank of the threshold)
    if rank < 0:
        names = f" of {[s.name for s in segs]}" if len(segs) == 1 else ""
        warnings.warn(
            f"{already} of {sum(s.spec.numel for s in segs)} weights{names} are already pruned, "
            f"more than the {k} the target asks for; masks only shrink, so they are kept as "
            "they are",
            UserWarning,
            stacklevel=4,
        )
    if rank <= 0:
        _check_nan(segs, scratch, inf_key, comm)
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

    dev0 = segs[0].flat.device
    # (a process without local keys, e.g. with empty shards, makes its histogram on the CPU)
    reduce = None if comm is None else (lambda h: comm.reduce(h.to(dev0)))
    sel = radix_select(key_chunks, rank, bits, reduce_fn=reduce, sync_free=sync_free)
    # NaN keys lie above +inf: the (global) top histogram tells every process alike
    top_shift = bits - 16
    inf_digit = inf_key >> top_shift
    hist = sel.top_histogram
    if int(hist[inf_digit + 1 :].sum()) or (top_shift and int(hist[inf_digit])):
        _check_nan(segs, scratch, inf_key, comm)
    return _mask_pass(segs, scratch, sel, comm, sync_free)


def _mask_pass(
    segs: list[_Segment],
    scratch: dict[torch.device, _Scratch],
    sel: RadixSelection,
    comm: _Comm | None,
    sync_free: bool | None,
) -> dict[str, Tensor]:
    """Keep what lies above the threshold, and the ties beyond the first ``rank_in_ties``.

    Ties are pruned in flat order: streamed with a running count on one process (a
    cumulative sum when ``sync_free``), and across processes either counted first
    (``_tie_prefix`` before the pass) or stored and fixed up after it (the usual case).
    """
    threshold, need = sel.threshold, sel.rank_in_ties
    ties = need < sel.count_equal  # only then does the flat-index order matter
    store = ties and comm is not None and sel.count_equal <= _MAX_STORED_TIES
    preceding: list[int] | None = None
    if ties and comm is not None and not store:
        counted = [_count_ties(seg, scratch, threshold) for seg in segs]
        preceding = _tie_prefix(segs, counted, comm)
    masks: dict[str, Tensor] = {}
    stored: list[list[Tensor]] = [[] for _ in segs]  # local flat positions of the ties
    left = need  # ties still to prune (carried across segments on one process)
    seen: Tensor | None = None  # sync-free running count of ties
    for j, seg in enumerate(segs):
        dev = seg.flat.device
        buffers = scratch[dev]
        free = comm is None and (dev.type != "cpu" if sync_free is None else sync_free)
        if preceding is not None:
            left = max(0, need - preceding[j])
        out = torch.empty(seg.flat.numel(), dtype=torch.bool, device=dev)
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
            if free:  # keep the ties whose running count exceeds `need`, without a sync
                seen = torch.zeros((), dtype=torch.int64, device=dev) if seen is None else seen
                running = torch.cumsum(eq, 0).add_(seen.to(dev))
                keep |= eq & (running > need)
                seen = running[-1]
            elif store:
                positions = _true_positions(eq)
                if positions.numel():
                    stored[j].append(positions.add_(a))
            elif left == 0:  # every later tie is kept
                keep |= eq
            else:
                positions = _true_positions(eq)
                if positions.numel() <= left:
                    left -= positions.numel()
                else:
                    keep[positions[left:]] = True
                    left = 0
        masks[seg.name] = out.view(seg.shape)
    if store:
        assert comm is not None
        found = [
            torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=s.flat.device)
            for parts, s in zip(stored, segs, strict=True)
        ]
        preceding = _tie_prefix(segs, [int(f.numel()) for f in found], comm)
        for j, seg in enumerate(segs):
            left = max(0, need - preceding[j])
            if found[j].numel() > left:  # the ties after the first `left` are kept
                masks[seg.name].view(-1)[found[j][left:]] = True
    return masks


def global_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
    *,
    group: Any = None,
    sync_free: bool | None = None,
) -> dict[str, Tensor]:
    """Masks that prune the ``round(sparsity · N)`` lowest ``abs(score)`` weights globally.

    ``N`` is the total number of weights in ``scores`` (of the full tensors, for DTensors).
    Already-pruned weights (``False`` in ``current_masks``) stay pruned and count towards the
    target; ties are broken by flat index (lowest pruned first). If more weights are already
    pruned than the target asks, the current masks are returned unchanged with a warning.
    With DTensor scores (FSDP2 shards) call it on every process of their mesh at once, with
    ``current_masks`` on every process or on none: it runs collectives (see the module
    docstring) and returns each process's local masks.

    Args:
        scores: FQN -> score tensor (floating point, no NaN): plain tensors, or DTensors
            sharded on dim 0 (their local shards are used). The order of the mapping defines
            the flat index for tie-breaking.
        sparsity: target cumulative sparsity in ``[0, 1)``.
        current_masks: masks of earlier rounds (``True`` = kept; local shards for DTensor
            scores), or ``None``.
        group: process group over which plain tensors are replicas (default: the DTensors'
            mesh group when a score is a DTensor, else a selection on this process alone).
        sync_free: histogram and tie-break without host synchronisation inside a pass
            (see :func:`radix_select`); ``None`` chooses it off the CPU. Same masks either way.

    Returns:
        FQN -> bool mask (``True`` = kept), same shapes and devices as the (local) scores.

    Example:
        >>> scores = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([[0.3, 0.1]])}
        >>> masks = global_masks(scores, 0.6)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([True, False, True], [[False, False]])
    """
    s = check_sparsity(sparsity, "sparsity")
    comm = _comm(scores, group) if isinstance(scores, Mapping) else None
    segs = _segments(scores, current_masks, comm)
    k = num_to_prune(s, sum(seg.spec.numel for seg in segs))
    return _select(segs, k, comm, sync_free)


def layerwise_masks(
    scores: Mapping[str, Tensor],
    sparsity: float | Mapping[str, float],
    current_masks: Mapping[str, Tensor] | None = None,
    *,
    group: Any = None,
    sync_free: bool | None = None,
) -> dict[str, Tensor]:
    """Masks that prune ``round(sparsity · n_l)`` lowest ``abs(score)`` weights of each tensor.

    Same rules as :func:`global_masks` (DTensor scores included), applied to every tensor on
    its own (``n_l`` its full size): one radix selection per tensor.

    Args:
        scores: FQN -> score tensor.
        sparsity: one target for every tensor, or a per-FQN mapping.
        current_masks: masks of earlier rounds, or ``None``.
        group: see :func:`global_masks`.
        sync_free: see :func:`global_masks`.

    Returns:
        FQN -> bool mask (``True`` = kept).

    Example:
        >>> scores = {"a": torch.tensor([0.5, 0.1, 0.9, 0.2]), "b": torch.tensor([0.3, 0.1])}
        >>> masks = layerwise_masks(scores, 0.5)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([True, False, True, False], [True, False])
    """
    comm = _comm(scores, group) if isinstance(scores, Mapping) else None
    segs = _segments(scores, current_masks, comm)
    if isinstance(sparsity, Mapping):
        missing = [n for n in scores if n not in sparsity]
        if missing:
            raise ValueError(
                "Expected `sparsity` to hold a value for every parameter, "
                f"but {missing} are missing"
            )
        targets = {n: check_sparsity(sparsity[n], f"sparsity[{n!r}]") for n in scores}
    else:
        targets = dict.fromkeys(scores, check_sparsity(sparsity, "sparsity"))
    masks: dict[str, Tensor] = {}
    for seg in segs:
        k = num_to_prune(targets[seg.name], seg.spec.numel)
        masks.update(_select([seg], k, comm, sync_free))
    return masks
