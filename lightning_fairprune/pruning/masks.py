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
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MaskEnforcer",
    "apply_masks",
    "check_masks_fit",
    "full_masks",
    "global_masks",
    "layerwise_masks",
    "load_masks",
    "masks_to_state",
    "num_to_prune",
    "realized_sparsity",
    "save_masks",
    "sparsity_report",
    "zero_pruned_optimizer_state",
]

_CHUNK = 1 << 22  # elements per streamed chunk: 9 bytes of scratch each (36 MiB)
_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_BITS = {torch.int16: 16, torch.int32: 32, torch.int64: 64}


def _check_sparsity(value: object, name: str = "sparsity") -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0.0 <= value < 1.0
    ):
        raise ValueError(f"Expected `{name}` to be a float in [0, 1), but got {value!r}")
    return float(value)


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


def _chunks(flat: Tensor) -> Any:
    n = flat.numel()
    for start in range(0, n, _CHUNK):
        yield start, min(n, start + _CHUNK)


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


def _select(
    scores: Mapping[str, Tensor], k: int, current: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """Prune the ``k`` lowest-priority weights of ``scores`` (see module docstring)."""
    dtype = _common_dtype(scores)
    int_dtype = _INT_VIEW[dtype]
    bits = _BITS[int_dtype]
    top = bits - 16  # shift of the most significant 16-bit digit
    inf_key = int(torch.tensor(math.inf, dtype=dtype).view(int_dtype).item())
    flats = {name: s.detach().reshape(-1) for name, s in scores.items()}
    mflats = {name: current[name].reshape(-1) for name in scores} if current is not None else None
    scratch: dict[torch.device, _Scratch] = {}
    for flat in flats.values():
        size = min(_CHUNK, max(f.numel() for f in flats.values() if f.device == flat.device))
        if flat.device not in scratch:
            scratch[flat.device] = _Scratch(dtype, flat.device, size)

    already = 0
    if mflats is not None:
        already = sum(int(m.numel() - torch.count_nonzero(m)) for m in mflats.values())
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

    # Radix selection of the key of the rank-th smallest unpruned score, 16 bits per pass.
    prefix = 0
    count_equal = 0  # unpruned weights whose key equals the threshold
    for shift in range(top, -1, -16):
        hist: Tensor | None = None
        for name, flat in flats.items():
            buffers = scratch[flat.device]
            for a, b in _chunks(flat):
                key = buffers.keys(flat[a:b])
                n = b - a
                pruned_here = 0
                if shift == top:
                    # Every weight is a candidate; pruned ones are moved to bucket 0 and
                    # subtracted from it afterwards (cheaper than compacting the chunk).
                    if mflats is not None:
                        m = mflats[name][a:b]
                        pruned_here = n - int(torch.count_nonzero(m))
                        if pruned_here:
                            key.mul_(m)
                    # keys are non-negative, so the top digit needs no mask
                    digit = torch.bitwise_right_shift(key, shift, out=buffers.ints[:n])
                else:
                    high = torch.bitwise_right_shift(key, shift + 16, out=buffers.ints[:n])
                    sel = torch.eq(high, prefix, out=buffers.flags[:n])
                    if mflats is not None:
                        sel &= mflats[name][a:b]
                    digit = (key[sel] >> shift) & 0xFFFF
                    if digit.numel() == 0:
                        continue
                counts = torch.bincount(digit, minlength=1 << 16)
                if pruned_here:
                    counts[0] -= pruned_here
                hist = counts if hist is None else hist.add_(counts)
        if hist is None:  # cannot happen: rank >= 1 implies an unpruned weight in the bucket
            raise RuntimeError("radix selection found no candidate weights")
        hist = hist.cpu()
        if shift == top:
            # NaN keys lie above +inf: exact when the +inf bucket is empty, else scan.
            inf_digit = inf_key >> shift
            if int(hist[inf_digit + 1 :].sum()) or (shift and int(hist[inf_digit])):
                _check_nan_all(flats, scratch, inf_key)
        cum = torch.cumsum(hist, 0)
        d = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype)).item())
        if d > 0:
            rank -= int(cum[d - 1])
        count_equal = int(hist[d])
        prefix = (prefix << 16) | d
    threshold = prefix  # key of the last pruned weight
    need_equal = rank  # weights with key == threshold to prune, lowest flat index first
    ties = need_equal < count_equal  # only then does the flat-index order matter

    for name, flat in flats.items():
        buffers = scratch[flat.device]
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
            if need_equal > 0:
                positions = eq.nonzero().flatten()
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
        already = sum(int(m.numel() - torch.count_nonzero(m)) for m in current.values())
        if already > k:
            warnings.warn(
                f"{already} of {total} weights are already pruned, more than the {k} that "
                f"`sparsity`={s} asks for; masks only shrink, so they are kept as they are",
                UserWarning,
                stacklevel=2,
            )
    return _select(scores, k, current)


def layerwise_masks(
    scores: Mapping[str, Tensor],
    sparsity: float | Mapping[str, float],
    current_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Masks that prune ``round(sparsity · n_l)`` lowest ``abs(score)`` weights of each tensor.

    Same rules as :func:`global_masks`, applied to every tensor on its own.

    Args:
        scores: FQN -> score tensor.
        sparsity: one target for every tensor, or a per-FQN mapping.
        current_masks: masks of earlier rounds, or ``None``.

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
        masks.update(_select({name: score}, k, layer_current))
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
    """Zero the pruned weights in place (``masked_fill_``; exact zeros, even for NaN/inf).

    Args:
        params: FQN -> parameter.
        masks: FQN -> bool mask with the same names and shapes.

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
        >>> apply_masks({"w": w}, {"w": torch.tensor([True, False, True])})
        >>> w.data
        tensor([1., 0., 3.])
    """
    check_masks_fit(masks, params)
    for name, param in params.items():
        mask = masks[name]
        if mask.device != param.device:
            mask = mask.to(param.device)
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
    check_masks_fit(masks, params)
    touched = 0
    for name, param in params.items():
        state = optimizer.state.get(param)
        if not state:
            continue
        mask = masks[name].to(param.device)
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value.mul_(mask)
                touched += 1
    return touched


class MaskEnforcer:
    """Keep pruned weights exactly zero after every optimizer step.

    Registers ``optimizer.register_step_post_hook``; after each real ``optimizer.step()`` (a
    step skipped by a gradient scaler does not run it) the pruned weights are multiplied by
    their mask in place (``mul_`` by a ``uint8`` view of the mask: no allocation, no copy of
    the weights, no per-forward work; a negative weight becomes ``-0.0``, which equals zero).
    Use :meth:`remove` to detach it and :meth:`update` to install the masks of a new round.

    Args:
        optimizer: the optimizer that updates the parameters.
        params: FQN -> parameter.
        masks: FQN -> bool mask (``True`` = kept); moved to each parameter's device.

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

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Expected `optimizer` to be a torch.optim.Optimizer, "
                f"but got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self._params = dict(params)
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self.update(masks)
        self._handle: Any = optimizer.register_step_post_hook(self._hook)

    def update(self, masks: Mapping[str, Tensor]) -> None:
        """Install new masks (checked against the parameters).

        Args:
            masks: FQN -> bool mask.
        """
        check_masks_fit(masks, self._params)
        # A uint8 view of the bool mask (same storage, no copy) takes a 2-3x faster
        # multiplication path than the bool tensor itself.
        self._pairs = [
            (p, masks[n].to(p.device).view(torch.uint8)) for n, p in self._params.items()
        ]

    @torch.no_grad()
    def enforce(self) -> None:
        """Zero the pruned weights now."""
        for param, mask in self._pairs:
            param.mul_(mask)

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
