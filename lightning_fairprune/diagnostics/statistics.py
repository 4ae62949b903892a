"""Per-group gradient sums and diagonal curvatures for the fairness-aware criteria.

`group_statistics` is one `PassRequest` of the diagnostics' pass engine (gradient sums, and the
empirical Fisher diagonal from per-sample gradients or the Hutchinson diagonal from the
package's `rademacher_probes`); `GroupStatistics` holds the per-group sums by parameter, ready
for `lightning_fairprune.pruning.fair_criteria` (FairGRAPE, FairPrune, worst_group). All sums
are additive over samples and processes: `GroupStatistics.reduce` sums them with one
collective call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_choice, check_int
from lightning_fairprune.diagnostics.passes import (
    ForwardFn,
    LossFn,
    ParamsArg,
    PassOptions,
    PassRequest,
    ReduceFn,
    check_pass_args,
    open_pass,
    resolve_params,
)
from lightning_fairprune.diagnostics.probes import Probes

__all__ = ["CURVATURES", "GroupStatistics", "group_statistics"]

CURVATURES: tuple[str, ...] = ("fisher", "hutchinson", "none")
"""Per-group diagonal curvatures `group_statistics` can measure."""


@dataclass
class GroupStatistics:
    """Per-group sums measured by `group_statistics` (all additive over samples/processes).

    Attributes:
        grad_sums: FQN -> ``[G, *shape]`` sums of per-sample loss gradients of each group.
        loss_sums: ``[G]`` sums of per-sample losses.
        counts: ``[G]`` samples per group.
        curvature_sums: FQN -> ``[G, *shape]`` sums of the per-sample diagonal curvature
            (Fisher: squared per-sample gradients; Hutchinson: mean over probes of
            ``v ⊙ H_i v``), or None.
        curvature: ``"fisher"``, ``"hutchinson"`` or ``"none"``.
        num_probes: Hutchinson probes used (0 otherwise).
    """

    grad_sums: dict[str, Tensor]
    loss_sums: Tensor
    counts: Tensor
    curvature_sums: dict[str, Tensor] | None = None
    curvature: str = "none"
    num_probes: int = 0

    @property
    def num_groups(self) -> int:
        """Number of groups G."""
        return int(self.counts.shape[0])

    @property
    def mean_loss(self) -> Tensor:
        """``[G]`` mean loss per group (NaN for groups without samples)."""
        return self.loss_sums / _nan_counts(self.counts)

    def grad_means(self) -> dict[str, Tensor]:
        """FQN -> ``[G, *shape]`` gradients of each group's mean loss (0 for absent groups)."""
        return {n: _per_group_div(s, self.counts) for n, s in self.grad_sums.items()}

    def curvature_means(self) -> dict[str, Tensor]:
        """FQN -> ``[G, *shape]`` diagonal curvature of each group's mean loss.

        Raises:
            ValueError: if no curvature was measured.
        """
        if self.curvature_sums is None:
            raise ValueError(
                "Expected statistics with a curvature (curvature='fisher' or 'hutchinson' in "
                "`group_statistics`), but got curvature='none'"
            )
        return {n: _per_group_div(s, self.counts) for n, s in self.curvature_sums.items()}

    def reduce(self, reduce_fn: ReduceFn | None) -> GroupStatistics:
        """Sum every statistic across processes with ``reduce_fn`` (e.g. an all-reduce).

        All tensors are concatenated into one flat buffer, so one collective call suffices.

        Example:
            >>> s = GroupStatistics({"w": torch.ones(2, 3)}, torch.ones(2), torch.ones(2))
            >>> s.reduce(lambda t: 2 * t).counts  # as if two processes held the same sums
            tensor([2., 2.])
        """
        if reduce_fn is None:
            return self
        parts: list[Tensor] = [self.loss_sums, self.counts]
        parts += list(self.grad_sums.values())
        if self.curvature_sums is not None:
            parts += list(self.curvature_sums.values())
        flat = torch.cat([p.reshape(-1) for p in parts])
        out = reduce_fn(flat.clone())
        if not isinstance(out, Tensor) or out.shape != flat.shape:
            raise ValueError(
                f"Expected `reduce_fn` to return a tensor of shape {tuple(flat.shape)}, but got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        pieces = iter(torch.split(out, [p.numel() for p in parts]))

        def take(t: Tensor) -> Tensor:
            return next(pieces).reshape(t.shape)

        loss_sums, counts = take(self.loss_sums), take(self.counts)
        grads = {n: take(t) for n, t in self.grad_sums.items()}
        curv = (
            None
            if self.curvature_sums is None
            else {n: take(t) for n, t in self.curvature_sums.items()}
        )
        return GroupStatistics(grads, loss_sums, counts, curv, self.curvature, self.num_probes)


def _nan_counts(counts: Tensor) -> Tensor:
    return torch.where(counts > 0, counts, torch.full_like(counts, float("nan")))


def _per_group_div(sums: Tensor, counts: Tensor) -> Tensor:
    c = counts.to(sums.dtype).clamp_min(1.0).reshape(-1, *([1] * (sums.dim() - 1)))
    return sums / c


def group_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    *,
    params: ParamsArg = None,
    curvature: str = "fisher",
    num_probes: int = 4,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    chunk_size: int = 64,
    dtype: torch.dtype = torch.float64,
) -> GroupStatistics:
    """Per-group gradient sums and diagonal curvature sums at the model's current weights.

    One pass of the diagnostics' engine over pure-group chunks of ``chunk_size`` samples
    (`lightning_fairprune.diagnostics.passes`), inside `lightning_fairprune.measure.isolated`
    (eval mode; modes, buffers, ``.grad``, ``requires_grad`` and RNG states restored).
    Curvature:

    * ``"fisher"``: per-group empirical Fisher diagonal, the sums of squared per-sample
      gradients (per-sample gradients by ``torch.func.vmap`` over each chunk; the model must
      be `torch.func`-compatible);
    * ``"hutchinson"``: per-group Hessian diagonal by Hutchinson, ``v ⊙ H_a v`` averaged over
      ``num_probes`` Rademacher probes ``v`` (`rademacher_probes` of ``seed``: the same probes
      for every group, chunk and process), one double backward per chunk and probe;
    * ``"none"``: gradients only (one backward per chunk).

    Args:
        model: the network (eval mode during the measurement, restored afterwards).
        batches: iterable of ``(inputs, targets, groups)`` or ``(inputs, targets)``;
            ``inputs`` a tensor or a tuple/list/dict of tensors.
        num_groups: number of groups G (ids in ``[0, G)``).
        params: FQN -> parameter, a sequence of FQNs, or None (every trainable parameter).
        curvature: one of `CURVATURES`.
        num_probes: Hutchinson probes (>= 1) for ``curvature="hutchinson"``.
        seed: probe seed.
        loss_fn: ``(outputs, targets) -> Tensor[N]`` per-sample losses (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs`` (default ``model(inputs)``).
        reduce_fn: sums a tensor across processes (None: one process); one call.
        chunk_size: samples per pure-group chunk (memory of the per-sample gradients:
            ``chunk_size × #params``).
        dtype: accumulation dtype.

    Returns:
        `GroupStatistics` (sums; on the parameters' device).

    Raises:
        ValueError: bad arguments, group ids or an empty iterable.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> s = group_statistics(net, [(x, y)], num_groups=2)
        >>> s.counts.tolist(), s.grad_sums["weight"].shape
        ([3.0, 3.0], torch.Size([2, 2, 3]))
    """
    check_int(num_groups, "num_groups", 1)
    check_choice(curvature, "curvature", CURVATURES)
    check_int(num_probes, "num_probes", 1)
    check_pass_args(num_groups, chunk_size, batches, 1)
    named = resolve_params(model, params)
    request = PassRequest(
        grad_sums=True,
        fisher_diag=curvature == "fisher",
        hutch_probes=Probes(num_probes, seed) if curvature == "hutchinson" else None,
        dtype=dtype,
    )
    opts = PassOptions(loss_fn=loss_fn, forward_fn=forward_fn, chunk_size=chunk_size)
    with open_pass(model, batches, num_groups, named, opts) as backend:
        sums = backend.run(request)
    assert sums.grad_sums is not None
    assert sums.loss_sums is not None
    curv = sums.fisher if curvature == "fisher" else sums.hutch_diag
    stats = GroupStatistics(
        grad_sums=_by_name(sums.grad_sums, named),
        loss_sums=sums.loss_sums.to(dtype),
        counts=sums.counts.to(device=sums.loss_sums.device, dtype=dtype),
        curvature_sums=None if curv is None else _by_name(curv, named),
        curvature=curvature,
        num_probes=num_probes if curvature == "hutchinson" else 0,
    )
    return stats.reduce(reduce_fn)


def _by_name(rows: Tensor, named: list[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """``[G, P]`` flat sums -> FQN -> ``[G, *shape]``."""
    out, start = {}, 0
    for name, p in named:
        out[name] = rows[:, start : start + p.numel()].reshape(rows.shape[0], *p.shape)
        start += p.numel()
    return out
