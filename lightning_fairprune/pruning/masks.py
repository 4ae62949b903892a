"""Masks: from scores to boolean keep-masks, applying and enforcing them, reporting sparsity.

Masks are ``dict[str, torch.BoolTensor]`` keyed by the parameter's fully-qualified name,
``True`` = kept, same shape and device as the parameter: one byte per weight, and no copy of
the weights is ever kept.

**Selection without sorting.** :func:`global_masks` prunes exactly ``round(s · N)`` weights
(``N`` = number of prunable weights, rounding half up) with the lowest ``abs(score)``. The
threshold is found by a radix selection on the bit patterns of the absolute scores (for
non-negative IEEE floats the bit pattern, read as an integer, orders like the value): one
histogram of the top 16 bits over all scores, then one of the next 16 bits within the
bucket that holds the threshold (float32; float64 needs four passes, float16 one). Each pass
streams the scores in chunks, so the peak extra memory is the output masks plus a few
chunk-sized buffers, and there is no sort and no concatenated copy of the scores.

**Ordering rules.** Weights that are already pruned in ``current_masks`` stay pruned (they
rank below every score, as if their score were ``-inf``). Among equal scores the weight with
the lower *flat index* is pruned first, where the flat index runs over the parameters in
the mapping's order and row-major within each tensor. A NaN score of a weight that is not
already pruned raises ``ValueError``; ``±inf`` is allowed. Scores of different floating dtypes
are compared in their promoted dtype. The returned masks are new tensors.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_sparsity
from lightning_fairprune.distributed import local_tensor

__all__ = [
    "MaskEnforcer",
    "RadixSelection",
    "abs_keys",
    "apply_masks",
    "check_masks_fit",
    "full_masks",
    "global_masks",
    "layerwise_masks",
    "load_masks",
    "local_tensor",
    "masks_to_state",
    "num_to_prune",
    "pack_mask",
    "radix_select",
    "realized_sparsity",
    "save_masks",
    "sparsity_report",
    "unpack_mask",
    "zero_pruned_optimizer_state",
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
_AND_CHUNK = 1 << 20  # elements per chunk of the widened mask in `_and_mask_`
_BITWISE_MIN = 1 << 22  # MaskEnforcer "auto": "bitwise" from this size on (CPU), else "uint8"


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


def _can_and(t: Tensor) -> bool:
    """Whether `_and_mask_` applies: a contiguous CPU float tensor of a supported dtype."""
    return t.device.type == "cpu" and t.dtype in _INT_VIEW and t.is_contiguous()


def _and_mask_(t: Tensor, mask: Tensor, scratch: dict[torch.dtype, Tensor] | None = None) -> None:
    """``t[~mask] = +0.0`` by a bitwise AND of ``t``'s bit patterns with the widened mask.

    The bool mask is widened chunk by chunk (``_AND_CHUNK`` elements of scratch) to the
    integer type of ``t``'s width and negated (True -> all ones, False -> 0): exact ``+0.0``
    for every pruned element, NaN and inf included, and the kept bits untouched. On the CPU
    this is about 10x faster than ``masked_fill_`` and 5x faster than a ``uint8`` ``mul_``
    (16.8 M float32 weights, one thread: 6 ms against 58 ms and 32 ms). ``scratch`` (integer
    dtype -> buffer) keeps the widened chunk between calls, e.g. across training steps.
    """
    ints = t.view(_INT_VIEW[t.dtype]).view(-1)
    flags = mask.reshape(-1).view(torch.uint8)
    n = ints.numel()
    size = min(_AND_CHUNK, n)
    buf = None if scratch is None else scratch.get(ints.dtype)
    if buf is None or buf.numel() < size:
        buf = torch.empty(size, dtype=ints.dtype)
        if scratch is not None:
            scratch[ints.dtype] = buf
    for a in range(0, n, _AND_CHUNK):
        b = min(n, a + _AND_CHUNK)
        wide = buf[: b - a]
        wide.copy_(flags[a:b])
        wide.neg_()
        ints[a:b].bitwise_and_(wide)


def _check_sparsity(value: object, name: str = "sparsity") -> float:
    return check_sparsity(value, name)


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
    s = _check_sparsity(sparsity)
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
    missing = [n for n in params if n not in masks]
    unexpected = [n for n in masks if n not in params]
    if missing or unexpected:
        raise ValueError(
            "Expected the masks to cover exactly the pruned parameters, but "
            f"missing={missing}, unexpected={unexpected}"
        )
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


def _check_nan(key: Tensor, inf_key: int, name: str) -> None:
    if key.numel() and int(key.max()) > inf_key:
        raise ValueError(
            f"Expected scores without NaN, but the score of {name!r} contains NaN "
            "(check the gradients and weights of this parameter)"
        )


def _check_nan_all(
    flats: Mapping[str, Tensor], scratch: dict[torch.device, _Scratch], inf_key: int
) -> None:
    for name, flat in flats.items():
        for a, b in _chunks(flat):
            _check_nan(scratch[flat.device].keys(flat[a:b]), inf_key, name)


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


_SPREAD = 1024  # overflow bins for discarded elements in the sync-free histogram


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
            n = key.numel()
            device = key.device
            if n == 0:
                continue
            free = key.device.type != "cpu" if sync_free is None else sync_free
            counts = _digit_histogram(
                key, cand, shift, high_shift, prefix, i == 0, nbins, free, scratch
            )
            if counts is None:
                continue
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


def _chunks(flat: Tensor) -> Any:
    n = flat.numel()
    step = _chunk_size(flat.device)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _count_pruned(masks: Mapping[str, Tensor]) -> int:
    """Number of ``False`` entries over all masks (one host synchronisation per device)."""
    per_device: dict[torch.device, list[Tensor]] = {}
    for m in masks.values():
        per_device.setdefault(m.device, []).append(m.numel() - torch.count_nonzero(m))
    return sum(int(torch.stack(v).sum()) for v in per_device.values())


def _select(
    scores: Mapping[str, Tensor],
    k: int,
    current: Mapping[str, Tensor] | None,
    sync_free: bool | None = None,
) -> dict[str, Tensor]:
    """Prune the ``k`` lowest-priority weights of ``scores`` (see module docstring)."""
    dtype = _common_dtype(scores)
    int_dtype = _INT_VIEW[dtype]
    bits = _BITS[int_dtype]
    inf_key = int(torch.tensor(math.inf, dtype=dtype).view(int_dtype).item())
    flats = {name: s.detach().reshape(-1) for name, s in scores.items()}
    mflats = {name: current[name].reshape(-1) for name in scores} if current is not None else None
    scratch: dict[torch.device, _Scratch] = {}
    for flat in flats.values():
        if flat.device not in scratch:
            size = max(f.numel() for f in flats.values() if f.device == flat.device)
            scratch[flat.device] = _Scratch(dtype, flat.device, min(_chunk_size(flat.device), size))

    already = _count_pruned(mflats) if mflats is not None else 0
    rank = k - already  # how many more unpruned weights to prune (1-indexed rank of threshold)

    masks: dict[str, Tensor] = {}
    if rank <= 0:
        _check_nan_all(flats, scratch, inf_key)
        for name, s in scores.items():
            if mflats is not None:
                masks[name] = current[name].clone()  # type: ignore[index]
            else:
                masks[name] = torch.ones(s.shape, dtype=torch.bool, device=s.device)
        return masks

    def key_chunks() -> Iterator[tuple[Tensor, Tensor | None]]:
        for name, flat in flats.items():
            buffers = scratch[flat.device]
            for a, b in _chunks(flat):
                yield buffers.keys(flat[a:b]), (mflats[name][a:b] if mflats is not None else None)

    # Radix selection of the key of the rank-th smallest unpruned score, 16 bits per pass.
    sel = radix_select(key_chunks, rank, bits, sync_free=sync_free)
    # NaN keys lie above +inf: exact when the +inf bucket is empty, else scan.
    top_shift = bits - 16
    inf_digit = inf_key >> top_shift
    hist = sel.top_histogram
    if int(hist[inf_digit + 1 :].sum()) or (top_shift and int(hist[inf_digit])):
        _check_nan_all(flats, scratch, inf_key)
    threshold = sel.threshold  # key of the last pruned weight
    need_equal = sel.rank_in_ties  # weights with key == threshold to prune, lowest index first
    ties = need_equal < sel.count_equal  # only then does the flat-index order matter

    offsets: dict[torch.device, Tensor] = {}  # equal keys seen so far (sync-free tie break)
    for name, flat in flats.items():
        buffers = scratch[flat.device]
        free = flat.device.type != "cpu" if sync_free is None else sync_free
        out = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
        for a, b in _chunks(flat):
            key = buffers.keys(flat[a:b])
            keep = out[a:b]
            torch.gt(key, threshold, out=keep)
            if mflats is not None:
                keep &= mflats[name][a:b]
            if not ties:
                continue
            eq = torch.eq(key, threshold, out=buffers.flags[: b - a])
            if mflats is not None:
                eq &= mflats[name][a:b]
            if free:
                # keep the equal keys whose running count exceeds need_equal, without a sync
                seen = offsets.get(flat.device)
                if seen is None:
                    seen = offsets[flat.device] = torch.zeros(
                        (), dtype=torch.int64, device=flat.device
                    )
                running = torch.cumsum(eq, 0).add_(seen)
                keep |= eq & (running > need_equal)
                seen.copy_(running[-1])
            elif need_equal > 0:
                positions = _true_positions(eq)
                if positions.numel() <= need_equal:
                    need_equal -= positions.numel()
                else:
                    keep[positions[need_equal:]] = True
                    need_equal = 0
            else:
                keep |= eq
        masks[name] = out.view(scores[name].shape)
    return masks


def _check_current(
    scores: Mapping[str, Tensor], current_masks: Mapping[str, Tensor] | None
) -> dict[str, Tensor] | None:
    if current_masks is None:
        return None
    check_masks_fit(current_masks, scores)
    return {name: current_masks[name].to(scores[name].device) for name in scores}


def global_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
    *,
    sync_free: bool | None = None,
) -> dict[str, Tensor]:
    """Masks that prune the ``round(sparsity · N)`` lowest ``abs(score)`` weights globally.

    ``N`` is the total number of weights in ``scores``. Already-pruned weights (``False`` in
    ``current_masks``) stay pruned and count towards the target; ties are broken by flat index
    (lowest pruned first). If more weights are already pruned than the target asks, the
    current masks are returned unchanged with a warning.

    Args:
        scores: FQN -> score tensor (floating point, no NaN); the order of the mapping defines
            the flat index for tie-breaking.
        sparsity: target cumulative sparsity in ``[0, 1)``.
        current_masks: masks of earlier rounds (``True`` = kept), or ``None``.
        sync_free: histogram and tie-break without host synchronisation inside a pass
            (see :func:`radix_select`); ``None`` chooses it off the CPU. Same masks either way.

    Returns:
        FQN -> bool mask (``True`` = kept), same shapes and devices as the scores.

    Example:
        >>> scores = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([[0.3, 0.1]])}
        >>> masks = global_masks(scores, 0.6)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([True, False, True], [[False, False]])
    """
    s = _check_sparsity(sparsity)
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"Expected `scores` to be a non-empty dict of tensors, but got {scores!r}")
    current = _check_current(scores, current_masks)
    total = sum(t.numel() for t in scores.values())
    k = num_to_prune(s, total)
    if current is not None:
        already = _count_pruned(current)
        if already > k:
            warnings.warn(
                f"{already} of {total} weights are already pruned, more than the {k} that "
                f"`sparsity`={s} asks for; masks only shrink, so they are kept as they are",
                UserWarning,
                stacklevel=2,
            )
    return _select(scores, k, current, sync_free)


def layerwise_masks(
    scores: Mapping[str, Tensor],
    sparsity: float | Mapping[str, float],
    current_masks: Mapping[str, Tensor] | None = None,
    *,
    sync_free: bool | None = None,
) -> dict[str, Tensor]:
    """Masks that prune ``round(sparsity · n_l)`` lowest ``abs(score)`` weights of each tensor.

    Same rules as :func:`global_masks`, applied to every tensor on its own.

    Args:
        scores: FQN -> score tensor.
        sparsity: one target for every tensor, or a per-FQN mapping.
        current_masks: masks of earlier rounds, or ``None``.
        sync_free: see :func:`global_masks`.

    Returns:
        FQN -> bool mask (``True`` = kept).

    Example:
        >>> scores = {"a": torch.tensor([0.5, 0.1, 0.9, 0.2]), "b": torch.tensor([0.3, 0.1])}
        >>> masks = layerwise_masks(scores, 0.5)
        >>> masks["a"].tolist(), masks["b"].tolist()
        ([True, False, True, False], [True, False])
    """
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"Expected `scores` to be a non-empty dict of tensors, but got {scores!r}")
    if isinstance(sparsity, Mapping):
        missing = [n for n in scores if n not in sparsity]
        if missing:
            raise ValueError(
                f"Expected `sparsity` to hold a value for every parameter, "
                f"but {missing} are missing"
            )
        targets = {n: _check_sparsity(sparsity[n], f"sparsity[{n!r}]") for n in scores}
    else:
        s = _check_sparsity(sparsity)
        targets = dict.fromkeys(scores, s)
    current = _check_current(scores, current_masks)
    masks: dict[str, Tensor] = {}
    for name, score in scores.items():
        k = num_to_prune(targets[name], score.numel())
        layer_current = None if current is None else {name: current[name]}
        if layer_current is not None:
            already = int(score.numel() - torch.count_nonzero(layer_current[name]))
            if already > k:
                warnings.warn(
                    f"{already} of {score.numel()} weights of {name!r} are already pruned, more "
                    f"than the {k} that sparsity {targets[name]} asks for; kept as they are",
                    UserWarning,
                    stacklevel=2,
                )
        masks.update(_select({name: score}, k, layer_current, sync_free))
    return masks


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


def realized_sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of all masked weights that are pruned (``False``).

    Args:
        masks: FQN -> bool mask.

    Returns:
        The global sparsity (0.0 for empty masks).

    Example:
        >>> realized_sparsity({"a": torch.tensor([True, False]), "b": torch.tensor([False, False])})
        0.75
    """
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 0.0
    kept = sum(int(torch.count_nonzero(m)) for m in masks.values())
    return (total - kept) / total


@torch.no_grad()
def apply_masks(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned weights in place (exact ``+0.0``, even for NaN/inf).

    On the CPU the weights' bit patterns are ANDed with the widened mask (10x faster than
    ``masked_fill_``, which other devices use).

    DTensor parameters (FSDP2) are masked on their local shards: ``masks`` then holds
    local-shard-shaped bool tensors (or DTensors placed like the parameters).

    Args:
        params: FQN -> parameter.
        masks: FQN -> bool mask with the same names and shapes.

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> apply_masks({"w": w}, {"w": torch.tensor([True, False, True])})
        >>> w.data
        tensor([1., 0., 3.])
    """
    params = {n: local_tensor(p) for n, p in params.items()}
    masks = {n: local_tensor(m) for n, m in masks.items()}
    check_masks_fit(masks, params)
    for name, param in params.items():
        mask = masks[name]
        if mask.device != param.device:
            mask = mask.to(param.device)
        if _can_and(param):
            _and_mask_(param.data, mask)  # the CPU: 10x faster than masked_fill_, same zeros
        else:
            param.masked_fill_(mask.logical_not(), 0)


@torch.no_grad()
def zero_pruned_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
) -> int:
    """Zero the optimizer state (momentum, ``exp_avg``, ``exp_avg_sq``, ...) of pruned weights.

    Every tensor in ``optimizer.state[param]`` with the parameter's shape is multiplied by the
    mask, so a pruned weight carries no momentum into later steps.

    Args:
        optimizer: the optimizer.
        params: FQN -> parameter (the objects the optimizer holds).
        masks: FQN -> bool mask.

    Returns:
        The number of state tensors touched.

    Example:
        >>> w = nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2); opt.step()
        >>> zero_pruned_optimizer_state(opt, {"w": w}, {"w": torch.tensor([True, False])})
        1
        >>> opt.state[w]["momentum_buffer"]
        tensor([1., 0.])
    """
    check_masks_fit(
        {n: local_tensor(m) for n, m in masks.items()},
        {n: local_tensor(p) for n, p in params.items()},
    )
    touched = 0
    for name, param in params.items():
        state = optimizer.state.get(param)
        if not state:
            continue
        local = local_tensor(param)
        mask = local_tensor(masks[name]).to(local.device)
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                local_tensor(value).mul_(mask)
                touched += 1
    return touched


class MaskEnforcer:
    """Keep pruned weights exactly zero after every optimizer step.

    Registers ``optimizer.register_step_post_hook``; after each real ``optimizer.step()`` (a
    step skipped by a gradient scaler does not run it) the pruned weights are set to zero in
    place (no copy of the weights, no per-forward work). Three ways, chosen by ``mode``:

    * ``"bitwise"`` (contiguous CPU tensors): the weights' bit patterns ANDed with the mask
      widened chunk by chunk to their integer width (1 Mi elements of scratch, no other
      memory): exact ``+0.0``, even where a pruned weight became NaN or inf. On large tensors
      it is about 6x faster than ``"uint8"`` (one thread, float32: 4.7 ms against 28 ms for
      16.8 M weights, 2.3 against 14 ms for 8.4 M).
    * ``"uint8"``: one ``mul_`` per tensor by a ``uint8`` view of the bool mask (same storage:
      no extra memory; a negative weight becomes ``-0.0``, a NaN stays NaN). The faster one
      while the tensor stays in the CPU caches (0.12 against 0.19 ms for 1 M weights).
    * ``"foreach"``: one ``torch._foreach_mul_`` per (device, dtype) over masks cast to the
      parameters' dtype once and cached (a few fused launches instead of one per tensor:
      what a GPU wants; costs the cast masks' memory, e.g. 2 bytes per bf16 weight).

    ``"auto"`` (default) takes ``"bitwise"`` for contiguous CPU tensors of at least 4 Mi
    elements, ``"uint8"`` for other CPU tensors and ``"foreach"`` elsewhere. All give
    weights equal to each other (``-0.0 == 0.0``) for finite weights. DTensor parameters
    (FSDP2 ``fully_shard``) are enforced on their local shards, with no gather: their masks
    are local-shard-shaped bool tensors (or DTensors placed like the parameters). Use
    :meth:`remove` to detach it and :meth:`update` for new masks.

    Args:
        optimizer: the optimizer that updates the parameters.
        params: FQN -> parameter.
        masks: FQN -> bool mask (``True`` = kept); moved to each parameter's device.
        mode: ``"auto"``, ``"bitwise"``, ``"uint8"`` or ``"foreach"`` (``"bitwise"`` needs
            contiguous CPU float parameters).

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.1)
        >>> enforcer = MaskEnforcer(opt, {"w": w}, {"w": torch.tensor([True, False])})
        >>> enforcer.enforce()
        >>> w.grad = torch.ones(2); opt.step()
        >>> w.data[1].item() == 0.0
        True
        >>> enforcer.remove()
    """

    _MODES = ("auto", "bitwise", "uint8", "foreach")

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        mode: str = "auto",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Expected `optimizer` to be a torch.optim.Optimizer, "
                f"but got {type(optimizer).__name__}"
            )
        if mode not in self._MODES:
            raise ValueError(f"Expected `mode` to be one of {self._MODES}, but got {mode!r}")
        self.optimizer = optimizer
        self.mode = mode
        self._params = dict(params)
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self._bitwise: list[tuple[Tensor, Tensor]] = []
        self._and_scratch: dict[torch.dtype, Tensor] = {}  # "bitwise": one chunk, reused
        self._groups: list[tuple[list[Tensor], list[Tensor]]] = []
        self.update(masks)
        self._handle: Any = optimizer.register_step_post_hook(self._hook)

    def _mode_for(self, param: Tensor) -> str:
        if self.mode != "auto":
            return self.mode
        if param.device.type != "cpu":
            return "foreach"
        return "bitwise" if _can_and(param) and param.numel() >= _BITWISE_MIN else "uint8"

    def update(self, masks: Mapping[str, Tensor]) -> None:
        """Install new masks (checked against the parameters).

        Args:
            masks: FQN -> bool mask.
        """
        # DTensor (FSDP2) parameters: the masks cover the local shards, enforced in place
        params = {n: local_tensor(p) for n, p in self._params.items()}
        masks = {n: local_tensor(m) for n, m in masks.items()}
        check_masks_fit(masks, params)
        pairs: list[tuple[Tensor, Tensor]] = []
        bitwise: list[tuple[Tensor, Tensor]] = []
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for n, p in params.items():
            mask = masks[n].to(p.device)
            mode = self._mode_for(p)
            if mode == "bitwise":
                if not _can_and(p):
                    raise ValueError(
                        f"Expected the parameters of mode='bitwise' to be contiguous CPU "
                        f"float16/bfloat16/float32/float64 tensors, but got {n!r} on "
                        f"{p.device} ({p.dtype}, contiguous={p.is_contiguous()}); use "
                        "mode='auto'"
                    )
                bitwise.append((p, mask.contiguous()))
            elif mode == "uint8":
                # a uint8 view of the bool mask (same storage, no copy) takes a 2-3x faster
                # multiplication path than the bool tensor itself
                pairs.append((p, mask.view(torch.uint8)))
            else:
                group = groups.setdefault((p.device, p.dtype), ([], []))
                group[0].append(p)
                group[1].append(mask.to(p.dtype))
        self._pairs = pairs
        self._bitwise = bitwise
        self._groups = list(groups.values())

    @torch.no_grad()
    def enforce(self) -> None:
        """Zero the pruned weights now."""
        for param, mask in self._bitwise:
            _and_mask_(param, mask, self._and_scratch)
        for param, mask in self._pairs:
            param.mul_(mask)
        for params, masks in self._groups:
            torch._foreach_mul_(params, masks)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.enforce()

    def remove(self) -> None:
        """Remove the optimizer hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def active(self) -> bool:
        """Whether the hook is registered."""
        return self._handle is not None


def sparsity_report(
    model_or_params: nn.Module | Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Sparsity per layer and overall, plus whole-model sparsity and compression ratio.

    With ``masks``, the report covers the masked parameters; a weight counts as zero when its
    mask is ``False``, and every other parameter of the model counts as dense (so the
    compression ratio matches :func:`~lightning_fairprune.schedules.compression_ratio_to_sparsity`).
    Without masks, every parameter is reported and exact zeros in the weights are counted.

    Args:
        model_or_params: a model, or FQN -> tensor.
        masks: FQN -> bool mask, or ``None``.

    Returns:
        ``{"layers": {fqn: {"zeros", "total", "sparsity"}}, "zeros", "total", "sparsity",
        "model_zeros", "model_total", "model_sparsity", "compression_ratio"}`` where
        ``sparsity`` is over the reported layers, ``model_*`` over every parameter, and
        ``compression_ratio = model_total / (model_total - model_zeros)``.

    Example:
        >>> net = nn.Linear(4, 2)  # 8 weights + 2 biases
        >>> masks = {"weight": torch.tensor([[True, False, False, False]] * 2)}
        >>> report = sparsity_report(net, masks)
        >>> report["layers"]["weight"]
        {'zeros': 6, 'total': 8, 'sparsity': 0.75}
        >>> report["sparsity"], report["model_sparsity"], report["compression_ratio"]
        (0.75, 0.6, 2.5)
    """
    if isinstance(model_or_params, nn.Module):
        all_params: dict[str, Tensor] = dict(model_or_params.named_parameters())
    elif isinstance(model_or_params, Mapping):
        all_params = dict(model_or_params)
    else:
        raise TypeError(
            "Expected `model_or_params` to be an nn.Module or a dict of tensors, "
            f"but got {type(model_or_params).__name__}"
        )
    if masks is not None:
        unknown = [n for n in masks if n not in all_params]
        if unknown:
            raise ValueError(
                f"Expected every mask name to be a parameter of the model, but {unknown} are not"
            )
        check_masks_fit(masks, {n: all_params[n] for n in masks})
        names = list(masks)
    else:
        names = list(all_params)

    layers: dict[str, dict[str, Any]] = {}
    for name in names:
        total = all_params[name].numel()
        if masks is not None:
            zeros = int(total - int(torch.count_nonzero(masks[name])))
        else:
            zeros = int(torch.count_nonzero(all_params[name].detach() == 0))
        layers[name] = {"zeros": zeros, "total": total, "sparsity": zeros / total if total else 0.0}
    zeros = sum(v["zeros"] for v in layers.values())
    total = sum(v["total"] for v in layers.values())
    model_total = sum(p.numel() for p in all_params.values())
    model_zeros = zeros
    nonzero = model_total - model_zeros
    return {
        "layers": layers,
        "zeros": zeros,
        "total": total,
        "sparsity": zeros / total if total else 0.0,
        "model_zeros": model_zeros,
        "model_total": model_total,
        "model_sparsity": model_zeros / model_total if model_total else 0.0,
        "compression_ratio": model_total / nonzero if nonzero else math.inf,
    }


def masks_to_state(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Plain, CPU, contiguous copies of the masks (for checkpoints and ``torch.save``).

    Args:
        masks: FQN -> bool mask.

    Returns:
        A new dict FQN -> CPU bool tensor.

    Example:
        >>> masks_to_state({"w": torch.tensor([True, False])})
        {'w': tensor([ True, False])}
    """
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"Expected the mask of {name!r} to be a bool tensor, "
                f"but got {getattr(mask, 'dtype', type(mask).__name__)}"
            )
        out[str(name)] = mask.detach().to("cpu", copy=True).contiguous()
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
    torch.save(masks_to_state(masks), path)


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
