"""Frozen gates: replay the activation pattern of piecewise-linear ops at perturbed weights.

A network with ReLU-like activations or max pooling is piecewise smooth in its weights. Double
backward gives the Hessian of the smooth piece that contains θ (the *almost-everywhere*
Hessian). A finite difference of gradients at θ ± εd does not: units that switch on or off
within ±ε add to the difference quotient a term that does not shrink with ε. `FrozenGates`
removes that term: in ``record`` mode it notes, at θ, the gate of every kink (which units are
on, which input a max pool picks), and in ``replay`` mode it re-uses those gates at θ ± εd.
The replayed network *is* the smooth piece of θ (e.g. ReLU becomes ``x · 1[x_θ > 0]``), so its
Hessian at θ is the a.e. Hessian and the central difference is O(ε²) accurate.

Frozen (every spelling a `torch.overrides.TorchFunctionMode` sees, in-place variants too):

* ReLU: ``F.relu`` (``nn.ReLU``, ``inplace=True``), ``torch.relu``, ``Tensor.relu``,
  ``torch.relu_`` / ``F.relu_`` / ``Tensor.relu_``;
* ``F.leaky_relu`` (``nn.LeakyReLU``), ``F.leaky_relu_``;
* ``F.hardtanh`` (``nn.Hardtanh``, ``nn.ReLU6``), ``F.hardtanh_``, ``F.relu6``;
* ``F.threshold`` (``nn.Threshold``), ``torch.prelu`` / ``F.prelu`` (``nn.PReLU``);
* ``clamp`` / ``clip`` / ``clamp_min`` / ``clamp_max`` as functions and methods, in-place
  variants too (e.g. ReLU written as ``x.clamp(min=0)``);
* ``F.max_pool1d/2d/3d`` and ``F.adaptive_max_pool1d/2d/3d`` (``nn.MaxPool*``,
  ``nn.AdaptiveMaxPool*``): the argmax indices are recorded and the replay gathers the input
  at them (a caller's ``return_indices=True`` gets the recorded indices).

Each gate replays with the backward convention of its op (ReLU and leaky ReLU pass the
gradient where ``x > 0``, hardtanh where ``min < x < max``, clamp where ``min <= x <= max``),
so the gradients of the replayed network at θ equal autograd's. Not frozen (they pass through
unchanged, and their kinks still count in a finite difference): ``abs``, ``maximum`` /
``minimum``, ``max`` / ``min`` / ``amax`` along a dimension, ``sort`` / ``topk`` (e.g.
mixture-of-experts routing), ``sign``, ``round``, hardswish / hardsigmoid, and anything a
custom autograd function or a C++ extension does internally.

Memory: one bit per gated activation element (bit-packed masks) and one int32 (int64 for
huge planes) per max-pool output element, for every forward recorded, on the activations'
device, until the key is dropped (`FrozenGates.drop`) or cleared. The FSDP2 backend of the
curvature diagnostics either holds the gates of the whole measured data set between the record
pass and the last replay, or, above its ``gate_memory`` budget, records and drops one chunk's
gates at a time (see `lightning_fairprune.diagnostics.sharded_pass`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["FrozenGates"]

_SHIFTS: dict[torch.device, Tensor] = {}
_EVERY: Any = object()  # `FrozenGates.nbytes`: every key


def _shifts(device: torch.device) -> Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def _pack(mask: Tensor) -> Tensor:
    """A bool tensor packed 8 elements per byte (flattened, zero-padded)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) << _shifts(flat.device)
    return bits.sum(1, dtype=torch.uint8)


def _unpack(packed: Tensor, shape: torch.Size) -> Tensor:
    bits = (packed[:, None] >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[: shape.numel()].view(shape).bool()


@dataclass
class _Gate:
    """One recorded kink: its kind, the input's shape and the packed data."""

    kind: str
    shape: torch.Size
    data: tuple[Tensor, ...]


# ----------------------------------------------------------------- argument parsers
# Each returns (input, options) for the signature of the op family.


def _p_relu(input: Tensor, inplace: bool = False) -> tuple[Tensor, dict[str, Any]]:
    return input, {"inplace": inplace}


def _p_leaky(
    input: Tensor, negative_slope: float = 0.01, inplace: bool = False
) -> tuple[Tensor, dict[str, Any]]:
    return input, {"slope": negative_slope, "inplace": inplace}


def _p_hardtanh(
    input: Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> tuple[Tensor, dict[str, Any]]:
    return input, {"low": min_val, "high": max_val, "inplace": inplace}


def _p_relu6(input: Tensor, inplace: bool = False) -> tuple[Tensor, dict[str, Any]]:
    return input, {"low": 0.0, "high": 6.0, "inplace": inplace}


def _p_threshold(
    input: Tensor, threshold: float, value: float, inplace: bool = False
) -> tuple[Tensor, dict[str, Any]]:
    return input, {"threshold": threshold, "value": value, "inplace": inplace}


def _p_prelu(input: Tensor, weight: Tensor) -> tuple[Tensor, dict[str, Any]]:
    return input, {"weight": weight, "inplace": False}


def _p_clamp(input: Tensor, min: Any = None, max: Any = None) -> tuple[Tensor, dict[str, Any]]:
    return input, {"min": min, "max": max}


def _p_clamp_min(input: Tensor, min: Any) -> tuple[Tensor, dict[str, Any]]:
    return input, {"min": min, "max": None}


def _p_clamp_max(input: Tensor, max: Any) -> tuple[Tensor, dict[str, Any]]:
    return input, {"min": None, "max": max}


def _p_pool(
    input: Tensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    args = (kernel_size, stride, padding, dilation, ceil_mode)
    return input, {"args": args, "return_indices": return_indices}


def _p_adaptive(
    input: Tensor, output_size: Any, return_indices: bool = False
) -> tuple[Tensor, dict[str, Any]]:
    return input, {"args": (output_size,), "return_indices": return_indices}


def _table() -> dict[Any, tuple[str, Callable[..., tuple[Tensor, dict[str, Any]]], bool, int]]:
    """Map each frozen torch function to (kind, parser, in place, spatial dims of a pool)."""
    table: dict[Any, tuple[str, Callable[..., tuple[Tensor, dict[str, Any]]], bool, int]] = {}

    def add(func: Any, kind: str, parser: Callable[..., Any], inplace: bool, dims: int = 0) -> None:
        if func is not None:
            table[func] = (kind, parser, inplace, dims)

    add(F.relu, "relu", _p_relu, False)
    add(torch.relu, "relu", _p_relu, False)
    add(torch.Tensor.relu, "relu", _p_relu, False)
    add(torch.relu_, "relu", _p_relu, True)
    add(F.relu_, "relu", _p_relu, True)
    add(torch.Tensor.relu_, "relu", _p_relu, True)
    add(F.leaky_relu, "leaky", _p_leaky, False)
    add(F.leaky_relu_, "leaky", _p_leaky, True)
    add(F.hardtanh, "hardtanh", _p_hardtanh, False)
    add(F.hardtanh_, "hardtanh", _p_hardtanh, True)
    add(F.relu6, "hardtanh", _p_relu6, False)
    add(F.threshold, "threshold", _p_threshold, False)
    add(getattr(F, "threshold_", None), "threshold", _p_threshold, True)
    add(torch.prelu, "prelu", _p_prelu, False)
    add(F.prelu, "prelu", _p_prelu, False)
    for name in ("clamp", "clip"):
        add(getattr(torch, name), "clamp", _p_clamp, False)
        add(getattr(torch.Tensor, name), "clamp", _p_clamp, False)
        add(getattr(torch, name + "_", None), "clamp", _p_clamp, True)
        add(getattr(torch.Tensor, name + "_"), "clamp", _p_clamp, True)
    for name, parser in (("clamp_min", _p_clamp_min), ("clamp_max", _p_clamp_max)):
        add(getattr(torch, name), "clamp", parser, False)
        add(getattr(torch.Tensor, name), "clamp", parser, False)
        add(getattr(torch, name + "_", None), "clamp", parser, True)
        add(getattr(torch.Tensor, name + "_"), "clamp", parser, True)
    for dims in (1, 2, 3):
        add(getattr(F, f"max_pool{dims}d"), "max_pool", _p_pool, False, dims)
        add(getattr(F, f"max_pool{dims}d_with_indices"), "max_pool", _p_pool, False, dims)
        add(getattr(F, f"adaptive_max_pool{dims}d"), "adaptive_max_pool", _p_adaptive, False, dims)
        add(
            getattr(F, f"adaptive_max_pool{dims}d_with_indices"),
            "adaptive_max_pool",
            _p_adaptive,
            False,
            dims,
        )
    return table


_TABLE = _table()


def _with_indices(kind: str, dims: int) -> Callable[..., tuple[Tensor, Tensor]]:
    prefix = "adaptive_max_pool" if kind == "adaptive_max_pool" else "max_pool"
    return getattr(F, f"{prefix}{dims}d_with_indices")  # type: ignore[no-any-return]


def _bound(value: Any, like: Tensor) -> Any:
    """A clamp bound usable in ``torch.where``: a tensor as is, a number as a 0-d tensor."""
    if isinstance(value, Tensor):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _prelu_weight(weight: Tensor, x: Tensor) -> Tensor:
    """PReLU's weight broadcast like ``torch.prelu`` (channel dim 1, or 0 for 1-D input)."""
    if weight.numel() == 1:
        return weight.reshape(())
    if x.ndim < 2:
        return weight.reshape(-1)
    return weight.reshape([1, -1] + [1] * (x.ndim - 2))


class FrozenGates(TorchFunctionMode):
    """Record the gates of piecewise-linear ops at θ and replay them at other weights.

    Use ``with gates.record(key):`` around the forward passes at θ and
    ``with gates.replay(key):`` around the same forward passes (same inputs, same order) at
    perturbed weights. Each key holds its own sequence of gates in call order; a replay
    consumes them from the start and raises `RuntimeError` if the forward differs (another
    number of gated calls, another op or shape: data-dependent control flow). Outside
    ``record`` / ``replay`` the mode is not active; inside, every other torch call passes
    through unchanged. See the module docstring for which ops are frozen.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> x = torch.randn(5, 3)
        >>> gates = FrozenGates()
        >>> with gates.record(0):
        ...     at_theta = net(x)
        >>> with torch.no_grad():
        ...     _ = net[0].bias.add_(10.0)  # every unit would switch on
        >>> with gates.replay(0):
        ...     frozen = net(x)
        >>> bool(((frozen == 0) == (at_theta == 0)).all())  # the units off at θ stay off
        True
        >>> gates.num_gates(0), gates.nbytes(), gates.nbytes(0)  # 5 x 4 bits, packed
        (1, 3, 3)
        >>> gates.drop(0)
        >>> gates.num_gates(0), gates.nbytes()
        (0, 0)
    """

    def __init__(self) -> None:
        super().__init__()
        self._store: dict[Hashable, list[_Gate]] = {}
        self._phase: str | None = None
        self._key: Hashable = None
        self._pos = 0
        self._paused = False

    # ---------------------------------------------------------------- phases

    @contextmanager
    def record(self, key: Hashable) -> Iterator[None]:
        """Record the gates of the forward passes run inside (replacing ``key``'s record)."""
        self._store[key] = []
        with self._phase_of("record", key):
            yield

    @contextmanager
    def replay(self, key: Hashable) -> Iterator[None]:
        """Replay ``key``'s recorded gates, in order, in the forward passes run inside.

        Raises:
            KeyError: nothing was recorded under ``key``.
            RuntimeError: the forward passes inside gate other ops, shapes or a different
                number of them than the record (checked at each call and on exit).
        """
        if key not in self._store:
            raise KeyError(f"FrozenGates: nothing was recorded under key {key!r}")
        with self._phase_of("replay", key):
            yield
            used, total = self._pos, len(self._store[key])
            if used != total:
                raise RuntimeError(
                    f"FrozenGates: the replayed forward differs from the recorded one (key "
                    f"{key!r}): it ran {used} gated ops, the record has {total} "
                    "(data-dependent control flow?)"
                )

    @contextmanager
    def _phase_of(self, phase: str, key: Hashable) -> Iterator[None]:
        if self._phase is not None:
            raise RuntimeError(f"FrozenGates: already in {self._phase} mode (no nesting)")
        self._phase, self._key, self._pos = phase, key, 0
        try:
            with self:
                yield
        finally:
            self._phase, self._key = None, None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Let every call through unchanged inside (e.g. a backward pass within a record)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def num_gates(self, key: Hashable) -> int:
        """Number of gates recorded under ``key``."""
        return len(self._store.get(key, []))

    def nbytes(self, key: Hashable = _EVERY) -> int:
        """Bytes held by the recorded gates: of every key, or of ``key`` alone (0 if none)."""
        records = self._store.values() if key is _EVERY else [self._store.get(key, [])]
        return sum(t.numel() * t.element_size() for gates in records for g in gates for t in g.data)

    def drop(self, key: Hashable) -> None:
        """Forget ``key``'s record (no error if there is none)."""
        self._store.pop(key, None)

    def clear(self) -> None:
        """Forget every record."""
        self._store.clear()

    # ---------------------------------------------------------------- dispatch

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        entry = _TABLE.get(func)
        if entry is None or self._phase is None or self._paused or "out" in kwargs:
            return func(*args, **kwargs)
        kind, parser, inplace, dims = entry
        x, opts = parser(*args, **kwargs)
        if not isinstance(x, Tensor):
            return func(*args, **kwargs)
        inplace = inplace or bool(opts.get("inplace", False))
        if self._phase == "record":
            return self._record(func, args, kwargs, kind, x, opts, dims)
        out = self._replay(kind, x, opts, dims)
        if inplace:
            return x.copy_(out)
        return out

    def _record(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str,
        x: Tensor,
        opts: dict[str, Any],
        dims: int,
    ) -> Any:
        gates = self._store[self._key]
        xd = x.detach()
        if kind in ("max_pool", "adaptive_max_pool"):
            out, idx = _with_indices(kind, dims)(x, *opts["args"], return_indices=True)
            small = idx.to(torch.int32) if xd[0].numel() < 2**31 else idx
            gates.append(_Gate(kind, x.shape, (small,)))
            return (out, idx) if opts["return_indices"] else out
        if kind == "relu" or kind == "leaky" or kind == "prelu":
            data: tuple[Tensor, ...] = (_pack(xd > 0),)
        elif kind == "hardtanh":
            data = (_pack((xd > opts["low"]) & (xd < opts["high"])), _pack(xd >= opts["high"]))
        elif kind == "threshold":
            data = (_pack(xd > opts["threshold"]),)
        else:  # clamp: the gradient passes where min <= x <= max (autograd's convention)
            low, high = opts["min"], opts["max"]
            below = torch.zeros_like(xd, dtype=torch.bool)
            inside = torch.ones_like(xd, dtype=torch.bool)
            if low is not None:
                lo = low.detach() if isinstance(low, Tensor) else low
                below = torch.broadcast_to(xd < lo, xd.shape)
                inside = inside & (xd >= lo)
            if high is not None:
                hi = high.detach() if isinstance(high, Tensor) else high
                inside = inside & (xd <= hi)
            data = (_pack(inside), _pack(below))
        gates.append(_Gate(kind, x.shape, data))
        return func(*args, **kwargs)

    def _next(self, kind: str, x: Tensor) -> _Gate:
        gates = self._store[self._key]
        pos = self._pos
        if pos >= len(gates):
            raise RuntimeError(
                f"FrozenGates: the replayed forward differs from the recorded one (key "
                f"{self._key!r}): gated op #{pos} ({kind}) was not recorded; the record has "
                f"{len(gates)} (data-dependent control flow?)"
            )
        gate = gates[pos]
        if gate.kind != kind or gate.shape != x.shape:
            raise RuntimeError(
                f"FrozenGates: the replayed forward differs from the recorded one (key "
                f"{self._key!r}) at gated op #{pos}: recorded {gate.kind} of shape "
                f"{tuple(gate.shape)}, got {kind} of shape {tuple(x.shape)}"
            )
        self._pos += 1
        return gate

    def _replay(self, kind: str, x: Tensor, opts: dict[str, Any], dims: int) -> Tensor:
        gate = self._next(kind, x)
        if kind in ("max_pool", "adaptive_max_pool"):
            (idx,) = gate.data
            start = x.ndim - dims
            flat = x.flatten(start)
            out = flat.gather(start, idx.to(torch.int64).flatten(start)).view(idx.shape)
            return (out, idx.to(torch.int64)) if opts["return_indices"] else out  # type: ignore[return-value]
        masks = [_unpack(d, x.shape) for d in gate.data]
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        if kind == "relu":
            return torch.where(masks[0], x, zero)
        if kind == "leaky":
            return torch.where(masks[0], x, x * opts["slope"])
        if kind == "prelu":
            return torch.where(masks[0], x, _prelu_weight(opts["weight"], x) * x)
        if kind == "hardtanh":
            inside, high = masks
            rail = torch.where(high, _bound(opts["high"], x), _bound(opts["low"], x))
            return torch.where(inside, x, rail)
        if kind == "threshold":
            return torch.where(masks[0], x, _bound(opts["value"], x))
        inside, below = masks  # clamp
        low, high = opts["min"], opts["max"]
        if low is None:
            rail = _bound(high, x)
        elif high is None:
            rail = _bound(low, x)
        else:
            rail = torch.where(below, _bound(low, x), _bound(high, x))
        return torch.where(inside, x, rail).to(x.dtype)
