"""Enforcement: zero the pruned weights in place and keep them zero under every optimizer.

Masks are ``dict[str, torch.BoolTensor]`` (``True`` = kept). :func:`apply_masks` zeroes the
pruned weights once, :func:`zero_pruned_optimizer_state` clears their momentum, and
:class:`MaskEnforcer` re-zeroes them after every optimizer step (no copy of the weights, no
forward pre-hook). DTensor parameters (FSDP2 ``fully_shard``) are handled on their local
shards: their masks are local-shard-shaped bool tensors (or DTensors placed like them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.distributed import local_tensor
from lightning_fairprune.pruning.select import check_masks_fit

__all__ = ["MaskEnforcer", "apply_masks", "zero_pruned_optimizer_state"]

_AND_CHUNK = 1 << 20  # elements per chunk of the widened mask in `_and_mask_`
_BITWISE_MIN = 1 << 22  # MaskEnforcer "auto": "bitwise" from this size on (CPU), else "uint8"
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # float width -> integer view


def _can_and(t: Tensor) -> bool:
    """Whether `_and_mask_` applies: a contiguous CPU float tensor of a supported dtype."""
    return (
        t.device.type == "cpu"
        and t.is_floating_point()
        and t.dtype.itemsize in _INT_OF
        and t.is_contiguous()
    )


def _and_mask_(t: Tensor, mask: Tensor, scratch: dict[torch.dtype, Tensor] | None = None) -> None:
    """``t[~mask] = +0.0`` by a bitwise AND of ``t``'s bit patterns with the widened mask.

    The bool mask is widened chunk by chunk (``_AND_CHUNK`` elements of scratch) to the
    integer type of ``t``'s width and negated (True -> all ones, False -> 0): exact ``+0.0``
    for every pruned element, NaN and inf included, and the kept bits untouched. On the CPU
    this is about 10x faster than ``masked_fill_`` and 5x faster than a ``uint8`` ``mul_``
    (16.8 M float32 weights, one thread: 6 ms against 58 ms and 32 ms). ``scratch`` (integer
    dtype -> buffer) keeps the widened chunk between calls, e.g. across training steps.
    """
    ints = t.view(_INT_OF[t.dtype.itemsize]).view(-1)
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


@torch.no_grad()
def apply_masks(params: Mapping[str, Tensor | nn.Parameter], masks: Mapping[str, Tensor]) -> None:
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
