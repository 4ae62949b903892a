"""The mask state of a pruning run: masks, counts, rewind weights and enforcement in one place.

`MaskState` holds what a pruning callback keeps between rounds and across checkpoints, and
hides sharding: with FSDP2 parameters (DTensors) the masks and rewind weights are local
shards and the counts are taken over all shards (one all-reduce), with plain parameters they
are whole tensors; the methods are the same. Its checkpoint form is the one of
:mod:`~lightning_fairprune.pruning.mask_io` (full masks packed 1 bit per weight, full rewind
weights), so a state restores on any world size. `mask_counts`, `realized_sparsity` and
`sparsity_report` count masks of either kind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.distributed import (
    all_reduce,
    is_sharded,
    local_tensor,
    process_group,
    shard_spec,
)
from lightning_fairprune.pruning.enforce import (
    MaskEnforcer,
    apply_masks,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.pruning.mask_io import (
    distribute_like,
    gather_full_masks,
    gather_full_tensors,
    load_masks,
    masks_from_state,
    masks_to_state,
    save_masks,
    shard_full_masks,
    shard_full_tensors,
)
from lightning_fairprune.pruning.select import check_masks_fit

__all__ = ["MaskState", "mask_counts", "realized_sparsity", "sparsity_report"]


def mask_counts(
    masks: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None, group: Any = None
) -> dict[str, tuple[int, int]]:
    """Pruned and total weights of every full tensor (one all-reduce when sharded).

    Args:
        masks: FQN -> bool mask (local shards for DTensor parameters).
        params: FQN -> the parameters the masks belong to, for their layout (default: the
            masks themselves). With a DTensor among them (or a ``group``), every process of
            the group must call this: the counts are summed over the shards.
        group: process group (default: the DTensors' mesh group).

    Returns:
        FQN -> ``(pruned, total)`` over the full tensor.

    Example:
        >>> mask_counts({"w": torch.tensor([True, False, False, True])})
        {'w': (2, 4)}
    """
    ref = params if params is not None else masks
    names = list(masks)
    if group is None and not is_sharded(ref):  # whole tensors on this process
        return {
            n: (int(m.numel() - torch.count_nonzero(m)), int(m.numel())) for n, m in masks.items()
        }
    group = process_group(ref, group)
    # on the masks' device: the collective backend of that device (NCCL) must accept it
    device = local_tensor(masks[names[0]]).device if names else torch.device("cpu")
    pruned = torch.zeros(len(names), dtype=torch.int64, device=device)
    totals = []
    for i, name in enumerate(names):
        spec = shard_spec(ref[name], group)
        totals.append(spec.numel)
        if spec.owner:
            local = local_tensor(masks[name])
            pruned[i] = local.numel() - int(torch.count_nonzero(local))
    all_reduce(pruned, group)
    return {n: (int(pruned[i]), totals[i]) for i, n in enumerate(names)}


def realized_sparsity(
    masks: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None
) -> float:
    """Fraction of all masked weights that are pruned (``False``), over the full tensors.

    Args:
        masks: FQN -> bool mask (local shards for DTensor parameters).
        params: the parameters, for their layout when sharded (see `mask_counts`).

    Returns:
        The global sparsity (0.0 for empty masks).

    Example:
        >>> realized_sparsity({"a": torch.tensor([True, False]), "b": torch.tensor([False, False])})
        0.75
    """
    counts = mask_counts(masks, params)
    total = sum(t for _, t in counts.values())
    return sum(z for z, _ in counts.values()) / total if total else 0.0


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
        masks: FQN -> full bool mask, or ``None``.

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
    names = list(masks) if masks is not None else list(all_params)
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
    nonzero = model_total - zeros
    return {
        "layers": layers,
        "zeros": zeros,
        "total": total,
        "sparsity": zeros / total if total else 0.0,
        "model_zeros": zeros,
        "model_total": model_total,
        "model_sparsity": zeros / model_total if model_total else 0.0,
        "compression_ratio": model_total / nonzero if nonzero else math.inf,
    }


class MaskState:
    """Masks of the pruned parameters, their global counts, rewind weights and enforcers.

    The parameters are bound with :meth:`bind` (the caller looks them up fresh: strategies
    replace parameters, e.g. FSDP2's DTensors). Masks only shrink: :meth:`set` ANDs new masks
    with the current ones and zeroes the pruned weights. A state loaded before the parameters
    are known (:meth:`load_state_dict`, :meth:`load`) is applied when they are bound.

    Args:
        owner: how messages name the owner, e.g. ``"IterativePruning"``.

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
        >>> state = MaskState()
        >>> state.bind({"w": w})
        >>> state.set({"w": torch.tensor([True, False, True, False])})
        >>> state.sparsity, w.tolist()
        (0.5, [1.0, 0.0, 3.0, 0.0])
        >>> other = MaskState()
        >>> other.bind({"w": w})
        >>> other.load_state_dict(state.state_dict())
        >>> other.masks["w"].tolist()
        [True, False, True, False]
    """

    def __init__(self, owner: str = "MaskState") -> None:
        self.owner = owner
        self.masks: dict[str, Tensor] = {}
        self.counts: dict[str, tuple[int, int]] = {}
        self.rewind_weights: dict[str, Tensor] | None = None
        self._params: dict[str, Tensor] | None = None
        self._pending: list[tuple[str, Any]] = []
        self._enforcers: list[tuple[MaskEnforcer, list[str]]] = []
        self._enforced: list[int] = []

    # ------------------------------------------------------------------ parameters
    def bind(self, params: Mapping[str, Tensor]) -> None:
        """Set the live parameters (and apply a state or masks loaded before)."""
        self._params = dict(params)
        pending, self._pending = self._pending, []
        for kind, value in pending:
            if kind == "state":
                self.load_state_dict(value)
            else:
                self.set(self.localize(value, "imported masks"), "imported masks")

    @property
    def bound(self) -> bool:
        """Whether the parameters are known."""
        return self._params is not None

    @property
    def params(self) -> dict[str, Tensor]:
        """The bound parameters."""
        if self._params is None:
            raise ValueError(f"{self.owner}: the parameters are not known yet (no model seen)")
        return self._params

    @property
    def sharded(self) -> bool:
        """Whether the parameters are DTensors (FSDP2 shards)."""
        return self._params is not None and is_sharded(self._params)

    # ------------------------------------------------------------------ masks
    def _check_fit(
        self, masks: Mapping[str, Tensor], targets: Mapping[str, Tensor], source: str
    ) -> None:
        try:
            check_masks_fit(masks, targets)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.owner}: the {source} do not fit the model: {err}") from err

    def set(self, masks: Mapping[str, Tensor], source: str = "masks") -> None:
        """Validate, store (ANDed with the current masks) and apply local masks.

        Args:
            masks: FQN -> bool mask of every bound parameter (local shards when sharded).
            source: what the masks are, for messages.
        """
        params = self.params
        local = {k: local_tensor(p) for k, p in params.items()}
        masks = {k: local_tensor(m) for k, m in masks.items()}
        self._check_fit(masks, local, source)
        new = {k: masks[k].to(device=local[k].device, dtype=torch.bool) for k in params}
        if self.masks:
            new = {k: v & self.masks[k].to(v.device) for k, v in new.items()}
        self.masks = new
        apply_masks(params, new)
        self.counts = mask_counts(new, params)  # one all-reduce when sharded

    def apply(self) -> None:
        """Zero the pruned weights of the bound parameters now."""
        if self.masks:
            apply_masks(self.params, self.masks)

    def clear(self) -> None:
        """Forget masks, counts and rewind weights, and remove the enforcers."""
        self.release()
        self.masks, self.counts, self.rewind_weights = {}, {}, None

    @property
    def sparsity(self) -> float:
        """Pruned fraction of the masked weights over the full tensors (0.0 without masks)."""
        total = sum(t for _, t in self.counts.values())
        return sum(z for z, _ in self.counts.values()) / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Pruned fraction of every masked parameter (over its full tensor)."""
        return {k: 1.0 - float(t - z) / t for k, (z, t) in self.counts.items()}

    def full(self) -> dict[str, Tensor]:
        """The full masks on the CPU (a collective on every process when sharded)."""
        if not self.masks:
            return {}
        return gather_full_masks(self.masks, self.params)

    def localize(self, full: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
        """Local masks cut from full ones, checked against the full shapes.

        Checked against the full shapes, every process accepts or refuses them alike (a check
        of local shapes could pass on the process whose shard is the whole tensor only).
        """
        self._check_fit(full, self.params, source)  # DTensor shapes are the full shapes
        return shard_full_masks(full, self.params)

    def distribute(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Scores laid out like the parameters (full-shape scores of shards become DTensors).

        Plain (or not yet bound) parameters: the scores as they are.
        """
        return dict(scores) if self._params is None else distribute_like(scores, self._params)

    # ------------------------------------------------------------------ optimizers
    def zero_optimizer_state(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Zero the momentum and other state of the pruned weights in every optimizer."""
        for optimizer in optimizers:
            zero_pruned_optimizer_state(optimizer, self.params, self.masks)

    def enforce(self, optimizers: Sequence[torch.optim.Optimizer], force: bool = False) -> None:
        """(Re-)register one `MaskEnforcer` per optimizer holding masked parameters.

        Args:
            optimizers: the optimizers of the run.
            force: install the current masks in enforcers of the same optimizers.
        """
        if not self.masks or not optimizers:
            return
        ids = [id(o) for o in optimizers]
        if self._enforcers and ids == self._enforced:
            if force:  # same optimizers, new masks
                for enforcer, names in self._enforcers:
                    enforcer.update({k: self.masks[k] for k in names})
            return
        self.release()
        for optimizer in optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = {k: p for k, p in self.params.items() if id(p) in held}
            if mine:
                masks = {k: self.masks[k] for k in mine}
                self._enforcers.append((MaskEnforcer(optimizer, mine, masks), list(mine)))
        self._enforced = ids

    def release(self) -> None:
        """Remove the enforcers' optimizer hooks."""
        for enforcer, _ in self._enforcers:
            enforcer.remove()
        self._enforcers, self._enforced = [], []

    # ------------------------------------------------------------------ rewinding
    def capture_rewind(self) -> None:
        """Keep a copy of the (local shards of the) parameters as rewind weights."""
        self.rewind_weights = {k: local_tensor(p).detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset the parameters to the rewind weights, then apply the masks."""
        assert self.rewind_weights is not None
        for name, p in self.params.items():
            local = local_tensor(p)
            local.copy_(self.rewind_weights[name].to(local.device))
        self.apply()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"masks": packed full masks, "rewind_weights": full CPU tensors or None}``.

        The same on every process (a collective when sharded), restorable on any world size;
        the rewind weights cost one full CPU copy of the pruned weights while it is written.
        """
        rewind = None
        if self.rewind_weights is not None:
            rewind = gather_full_tensors(self.rewind_weights, self.params)
        return {"masks": masks_to_state(self.full()), "rewind_weights": rewind}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (at :meth:`bind` if the parameters are not known yet)."""
        if self._params is None:
            self._pending.append(("state", dict(state)))
            return
        self.masks, self.counts = {}, {}
        masks = masks_from_state(state.get("masks") or {})
        if masks:
            self.set(self.localize(masks, "checkpoint masks"), "checkpoint masks")
        rewind = state.get("rewind_weights")
        if rewind is not None:
            try:
                if set(rewind) != set(self.params):
                    expected, got = sorted(self.params), sorted(rewind)
                    raise ValueError(f"Expected rewind weights for {expected}, but got {got}")
                self.rewind_weights = shard_full_tensors(rewind, self.params)
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"{self.owner}: the checkpoint rewind weights do not fit the model: {err}"
                ) from err

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the full masks to a file (`save_masks`; the first process writes).

        Sharded, call it on every process: the shards are gathered first.
        """
        if not self.masks:
            raise ValueError("Expected masks to export, but no pruning round has run yet")
        full = self.full()
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            save_masks(full, path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Apply masks from a file of `save` / `save_masks` (at :meth:`bind` if not bound)."""
        masks = load_masks(path)
        if self._params is None:
            self._pending.append(("masks", masks))
            return
        self.set(self.localize(masks, "imported masks"), "imported masks")

    def report(self, module: nn.Module) -> dict[str, Any]:
        """`sparsity_report` of ``module`` (zeros of the weights before any mask is set)."""
        masks = self.full() or {k: p.detach() != 0 for k, p in self.params.items()}
        return sparsity_report(module, masks)
