"""Rademacher probes: a pure function of (seed, probe index, element index), sliceable per shard.

`rademacher_probes` is the one probe generator of the package (Hutchinson traces and diagonals,
power-iteration start vectors); `local_rademacher_probes` gives a process its slice of a probe
over FSDP2-sharded parameters; `Probes` names probes by seed in a `PassRequest`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_fairprune.checks import check_int
from lightning_fairprune.distributed import local_tensor, shard_spec

__all__ = ["Probes", "local_rademacher_probes", "rademacher_probes"]

_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + torch.bitwise_left_shift((x * hi) & 0xFFFF, 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32 by C. Wellons) on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def rademacher_probes(
    num_probes: int,
    size: int,
    seed: int | torch.Generator = 0,
    *,
    start: int = 0,
    offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Rademacher (±1) probe vectors ``[num_probes, size]``, a pure function of the seed.

    Entry ``i`` of probe ``k`` is a bit of an integer hash of ``(seed, start + k, offset + i)``
    computed with integer tensor ops on ``device``: the same seed gives bit-identical probes
    on every process and every device (CPU or GPU), nothing is generated on the host and
    copied over, and probe ``k`` does not depend on how many probes are drawn at once
    (``start`` continues a sequence). The one probe generator of the package (Hutchinson
    traces and diagonals, power-iteration start vectors).

    Args:
        num_probes: number of probes K.
        size: length P of each (flattened) probe.
        seed: a non-negative int seed (a CPU `torch.Generator` is accepted and consumed:
            one int seed is drawn from it).
        start: index of the first probe.
        offset: element index of the first column: the result is columns
            ``[offset, offset + size)`` of the probes of any longer length, so a process holding
            a shard of the parameters builds exactly its slice of every probe.
        device: where to build the probes (default CPU).
        dtype: floating dtype of the result.

    Returns:
        ``[num_probes, size]`` tensor of ±1 values.

    Example:
        >>> v = rademacher_probes(3, 5, seed=0)
        >>> v.shape, bool((v.abs() == 1).all())
        (torch.Size([3, 5]), True)
        >>> torch.equal(rademacher_probes(2, 5, seed=0, start=1), v[1:])
        True
        >>> torch.equal(rademacher_probes(3, 2, seed=0, offset=3), v[:, 3:])
        True
    """
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=seed))
    check_int(seed, "seed", 0)
    check_int(start, "start", 0)
    check_int(offset, "offset", 0)
    out = torch.empty(num_probes, size, dtype=dtype, device=device)
    if num_probes == 0 or size == 0:
        return out
    idx = torch.arange(offset, offset + size, dtype=torch.int64, device=out.device)
    low, high = idx & _M32, idx >> 32
    seed_key = _mix32_int(_mix32_int(seed & _M32) ^ (seed >> 32))
    for k in range(num_probes):
        base = _mix32_int(seed_key + 0x9E3779B9 * (start + k + 1))
        x = _mix32(low ^ base)
        if offset + size > _M32:  # elements past 2**32 mix in their high bits
            x = torch.where(high > 0, _mix32((x + high) & _M32), x)
        # top bit -> ±1
        torch.sub(1, (x >> 31).to(dtype), alpha=2, out=out[k])
    return out


def flat_bases(named: Sequence[tuple[str, Tensor]], group: Any = None) -> list[int]:
    """Flat index, in the unsharded concatenation of ``named``, of each local part's start."""
    bases, base = [], 0
    for _, p in named:
        spec = shard_spec(p, group)
        bases.append(base + spec.offset)
        base += spec.numel
    return bases


def local_rademacher_probes(
    named: Sequence[tuple[str, Tensor]], probe: int, seed: int = 0, group: Any = None
) -> list[Tensor]:
    """This process's slice, per parameter, of Rademacher probe number ``probe``.

    The unsharded probe is `rademacher_probes` over the flat concatenation of the parameters
    (in order, as in `~lightning_fairprune.diagnostics.group_hessian_trace`); each local
    shard of an FSDP2-sharded parameter gets the columns at its flat offset (`shard_spec`), so
    the slices are those probes element for element, generated without the full probe.

    Args:
        named: (FQN, parameter) pairs, sharded or plain, in the order of the flat probe.
        probe: probe index k (>= 0).
        seed: probe seed.
        group: process group of plain tensors (see `shard_spec`).

    Returns:
        One tensor per parameter, of its local shard's shape, dtype and device.

    Example:
        >>> net = torch.nn.Linear(2, 3)
        >>> parts = local_rademacher_probes(list(net.named_parameters()), probe=1)
        >>> full = rademacher_probes(2, 9)[1]
        >>> torch.equal(torch.cat([t.flatten() for t in parts]), full)
        True
    """
    out = []
    for (_, p), base in zip(named, flat_bases(named, group), strict=True):
        local = local_tensor(p)
        row = rademacher_probes(
            1, local.numel(), seed, start=probe, offset=base, device=local.device, dtype=local.dtype
        )
        out.append(row.view(local.shape))
    return out


@dataclass(frozen=True)
class Probes:
    """Rademacher probes by seed: probes ``start .. start + num - 1`` of `rademacher_probes`.

    Each backend builds them its way: the plain backend as one ``[num, P]`` matrix, the FSDP2
    backend one probe at a time as local shards (`local_rademacher_probes`).
    """

    num: int
    seed: int = 0
    start: int = 0
