"""Per-group fairness diagnostics on FSDP2-sharded parameters (``fully_shard`` DTensors).

Under ``torch.distributed.fsdp.fully_shard`` a parameter is a DTensor of which every process
holds a block of rows; the forward pass all-gathers the full parameters and the backward pass
reduce-scatters the gradients *in hooks outside autograd*. `torch.autograd.grad` with respect
to the sharded parameters therefore sees no gradient at all, and double-backward
Hessian-vector products cannot reach them. This module measures what FSDP allows:

* :func:`sharded_group_gradient_norms`: ‖g_a‖ = ‖S_a‖ / n_a per group, with S_a the summed
  gradient of group a over the data of *all* processes. For every group in turn, every process
  runs ``.backward()`` of its summed group loss (in pure-group chunks); FSDP's reduce-scatter
  leaves each process the local shard of S_a (divided by FSDP's gradient divide factor, which
  is multiplied back), the squared norms of the local shards are summed, and one all-reduce
  of ``3 G`` numbers (squared norms, loss sums, counts) gives every process the exact global
  norms. No ``[G, P]`` tensor and no full parameter or gradient is ever built: memory is one
  local gradient shard.
* :func:`sharded_measure_groups`: counts, recall, losses and confusion counts
  (`~lightning_fairprune.diagnostics.curvature.measure_groups` forward-only, whose sums are
  all-reduced), plus the gradient norms above.

**Lockstep.** Every FSDP forward and backward is a collective, so every process must run the
same number of them. Before measuring, one scan of the local data and two all-reduces (max)
of 4 and ``G`` integers fix the chunk size and the number of backward calls of each group; a process
with fewer chunks of a group runs the missing backward calls on one of its samples with a zero
output gradient (the graph is kept, the gradient is exactly zero). The forward-only part needs
the same number of batches on every process (checked: a clear error otherwise).

**Cost.** The gradient norms cost one forward and one backward per pure-group chunk, i.e.
about one forward+backward over the data plus at most ``G`` padded calls per process, but
every backward reduce-scatters the gradient of *every* trainable parameter: at least ``G``
full gradient reduce-scatters per measurement (the unsharded
`~lightning_fairprune.diagnostics.curvature.group_gradient_norms` needs one all-reduce of a
``[G, P]`` tensor instead). Backward calls reach every trainable parameter, not only the
measured ones (FSDP reduces whole parameter groups).

**Not available under FSDP.** Hutchinson traces, λ_max and the quadratic term of the
predicted excess loss need double backward through the parameters, which FSDP2's
reduce-scatter hooks do not provide.

Everything runs inside `lightning_fairprune.measure.isolated`: module modes, buffers,
``.grad`` and ``requires_grad`` of every parameter and the RNG states are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.diagnostics._batching import (
    Nested,
    check_groups,
    check_targets,
    default_forward,
    default_loss,
    split_batch,
    tree_cat,
    tree_map,
)
from lightning_fairprune.diagnostics.curvature import (
    ForwardFn,
    GroupGradients,
    GroupMeasurement,
    LossFn,
    ParamsArg,
    _check_iterable,
    _check_pass_args,
    _resolve_params,
    _safe_div,
    _warn_missing,
    measure_groups,
)
from lightning_fairprune.dtensor import _group_of, is_sharded, local_tensor, shard_spec
from lightning_fairprune.measure import isolated

__all__ = [
    "CURVATURE_UNAVAILABLE",
    "has_dtensor_params",
    "sharded_group_gradient_norms",
    "sharded_measure_groups",
]

CURVATURE_UNAVAILABLE = (
    "the Hutchinson Hessian trace, λ_max and the predicted excess loss are not measured on "
    "FSDP2-sharded parameters: FSDP2 computes and reduce-scatters their gradients in hooks "
    "outside autograd, so there is no double backward (Hessian-vector product) through them"
)


def has_dtensor_params(params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (an FSDP2-sharded parameter).

    Example:
        >>> has_dtensor_params([torch.zeros(2)])
        False
    """
    return any(is_sharded(p) for p in params)


def _process_group(params: list[Tensor], group: Any) -> Any:
    """The group given, else the DTensors' mesh group (one mesh), else the default group."""
    return _group_of({str(i): p for i, p in enumerate(params)}, group)


def _world_size(group: Any) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def _all_reduce(t: Tensor, group: Any, op: Any = None) -> Tensor:
    if _world_size(group) > 1:
        dist = torch.distributed
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def _divide_factors(model: nn.Module) -> dict[int, float]:
    """id(sharded parameter) -> the factor FSDP2 divides its reduced gradient by.

    FSDP2 averages by default (the data-parallel size); ``set_gradient_divide_factor`` sets
    another factor. Read from FSDP2's parameter groups (a private structure of torch 2.x);
    parameters not found there get the size of their mesh (FSDP2's default).
    """
    factors: dict[int, float] = {}
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if not callable(get_state):
            continue
        try:
            groups = list(get_state()._fsdp_param_groups)
        except AttributeError:  # a torch version with another layout: use the default
            continue
        for pg in groups:
            factor = getattr(pg, "gradient_divide_factor", None)
            for fp in getattr(pg, "fsdp_params", []):
                param = getattr(fp, "sharded_param", None)
                if param is None:
                    continue
                default = float(param.device_mesh.size())
                factors[id(param)] = default if factor is None else float(factor)
    return factors


def _scan(
    batches: Iterable[Any], num_groups: int, check_labels: bool
) -> tuple[int, Tensor, int, tuple[Nested, Tensor] | None]:
    """Local batch count, group counts, first batch size and one sample (for padding)."""
    num_batches = 0
    counts = torch.zeros(num_groups, dtype=torch.int64)
    first_size = 0
    sample = None
    for batch in batches:
        num_batches += 1
        x, y, g = split_batch(batch)
        n = y.shape[0] if y.ndim else 0
        check_groups(g, num_groups, n)
        if check_labels:
            check_targets(y, n, None)
        if n == 0:
            continue
        if sample is None:
            first_size = n
            sample = (tree_map(lambda t: t[:1], x), y[:1])
        counts += torch.bincount(g.cpu(), minlength=num_groups)
    return num_batches, counts, first_size, sample


class _Plan:
    """What every process agrees on before the first collective of the measurement."""

    def __init__(
        self,
        batches: Iterable[Any],
        num_groups: int,
        chunk_size: int | None,
        group: Any,
        check_labels: bool,
        device: torch.device,
    ) -> None:
        num_batches, counts, first, sample = _scan(batches, num_groups, check_labels)
        head = torch.tensor(
            [chunk_size or first, int(sample is None), num_batches, -num_batches],
            dtype=torch.int64,
            device=device,
        )
        head = _all_reduce(head, group, torch.distributed.ReduceOp.MAX).cpu()
        if int(head[1]):
            raise ValueError(
                "Expected `batches` to hold at least one sample on every process (FSDP runs "
                "its forward and backward passes in lockstep), but a process has none"
            )
        self.chunk = int(head[0])
        self.batches_equal = int(head[2]) == -int(head[3])
        self.batch_range = (-int(head[3]), int(head[2]))
        self.local_counts = counts
        local_chunks = (counts + self.chunk - 1) // self.chunk
        chunks = _all_reduce(local_chunks.to(device), group, torch.distributed.ReduceOp.MAX)
        self.chunks = chunks.cpu().tolist()
        assert sample is not None
        self.sample = sample


def _group_chunks(batches: Iterable[Any], a: int, chunk: int) -> Iterator[tuple[Nested, Tensor]]:
    """Chunks of exactly ``chunk`` samples of group ``a`` (the last one shorter)."""
    buf_x: list[Nested] = []
    buf_y: list[Tensor] = []
    held = 0
    for batch in batches:
        x, y, g = split_batch(batch)
        if not y.ndim or y.shape[0] == 0:
            continue
        keep = g == a
        if not bool(keep.any()):
            continue
        buf_x.append(tree_map(lambda t, k=keep: t[k.to(t.device)], x))
        buf_y.append(y[keep.to(y.device)])
        held += int(keep.sum())
        while held >= chunk:
            x_all, y_all = tree_cat(buf_x), torch.cat(buf_y)
            yield tree_map(lambda t: t[:chunk], x_all), y_all[:chunk]
            held -= chunk
            buf_x = [tree_map(lambda t: t[chunk:], x_all)] if held else []
            buf_y = [y_all[chunk:]] if held else []
    if held:
        yield tree_cat(buf_x), torch.cat(buf_y)


def _local_sq_norm(
    named: list[tuple[str, Tensor]], factors: dict[int, float], group: Any
) -> Tensor:
    """Σ over this process's owned elements of S_a², S_a the *summed* global gradient."""
    total = torch.zeros((), dtype=torch.float64)
    for _, p in named:
        grad = p.grad
        spec = shard_spec(p, group)
        if has_dtensor_params([p]):
            if grad is None or not spec.owner:
                continue
            local = local_tensor(grad).detach().to(torch.float64)
            factor = factors.get(id(p), float(p.device_mesh.size()))  # type: ignore[attr-defined]
            total += float(torch.linalg.vector_norm(local * factor)) ** 2
            continue
        # a plain (unsharded) parameter: its gradient is local to each process, sum it
        local = (
            torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            if grad is None
            else grad.detach().to(torch.float64)
        )
        local = _all_reduce(local.clone(), group)
        if spec.owner:
            total += float(torch.linalg.vector_norm(local)) ** 2
    return total


def _gradient_sums(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: list[tuple[str, Tensor]],
    plan: _Plan,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    group: Any,
) -> tuple[Tensor, Tensor]:
    """Local ``[G]`` squared-norm contributions and loss sums (before the all-reduce)."""
    loss_fn = loss_fn or default_loss
    forward_fn = forward_fn or default_forward
    device = named[0][1].device
    every = list(model.parameters())
    factors = _divide_factors(model)
    sq = torch.zeros(num_groups, dtype=torch.float64)
    loss_sums = torch.zeros(num_groups, dtype=torch.float64)
    pad_x = plan.sample[0]
    for a in range(num_groups):
        for p in every:
            p.grad = None
        done = 0
        for x, y in _group_chunks(batches, a, plan.chunk):
            x = tree_map(lambda t: t.to(device), x)
            out = forward_fn(model, x)
            losses = loss_fn(out, y.to(device))
            if not isinstance(losses, Tensor) or losses.shape != (y.shape[0],):
                raise ValueError(
                    f"Expected `loss_fn` to return per-sample losses of shape [{y.shape[0]}],"
                    " but got"
                    f" {tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)}"
                )
            if not bool(torch.isfinite(losses).all()):
                raise ValueError(
                    "Expected finite losses, but `loss_fn` returned NaN or inf (check the "
                    "model weights and inputs)"
                )
            total = losses.sum()
            loss_sums[a] += float(total.detach())
            total.backward()
            done += 1
        for _ in range(plan.chunks[a] - done):  # lockstep: zero-gradient backward calls
            out = forward_fn(model, tree_map(lambda t: t.to(device), pad_x))
            out.backward(torch.zeros_like(out))
        sq[a] = _local_sq_norm(named, factors, group)
    for p in every:
        p.grad = None
    return sq, loss_sums


def _check_params_sharded(named: list[tuple[str, Tensor]]) -> None:

    for _, p in named:
        shard_spec(p)  # raises for placements other than Shard(0) / Replicate on a 1-D mesh


def sharded_group_gradient_norms(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    *,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    group: Any = None,
) -> GroupGradients:
    """Norm of the gradient of each group's mean loss, for FSDP2-sharded (or plain) models.

    The same quantity as `~lightning_fairprune.diagnostics.curvature.group_gradient_norms`
    on the gathered model and the data of all processes, computed from local gradient shards
    (see the module docstring): per group, ``.backward()`` of the summed group loss in
    pure-group chunks of ``chunk_size`` samples on every process (in lockstep, padded with
    zero-gradient calls), then the squared norms of the local shards and one all-reduce.
    Plain (unsharded) parameters among ``params`` are treated as replicated: their local
    gradients are summed with one all-reduce each per group. Every process must call it.

    Args:
        model: the (sharded) network; eval mode during the measurement, then restored.
        batches: re-iterable ``(inputs, targets, groups)`` or ``(inputs, targets)``: this
            process's share of the data (any number of batches).
        num_groups: number of groups G.
        params: the parameters whose gradient norm is measured (see `group_gradient_norms`).
        loss_fn: ``(outputs, targets) -> Tensor[N]`` per-sample losses (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        chunk_size: samples per backward call (default: the largest first-batch size over
            the processes).
        group: process group (default: the DTensors' mesh group, else the default group).

    Returns:
        `GroupGradients` (float64, CPU), identical on every process; NaN norm, with one
        warning, for groups without samples on any process.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> res = sharded_group_gradient_norms(model, [(x, y, y)], num_groups=2)
        >>> from lightning_fairprune.diagnostics import group_gradient_norms
        >>> ref = group_gradient_norms(model, [(x, y, y)], num_groups=2)
        >>> bool(torch.allclose(res.norms, ref.norms)), res.counts.tolist()
        (True, [4.0, 4.0])
    """
    _check_pass_args(num_groups, chunk_size, batches)
    _check_iterable(batches, 2)
    named = _resolve_params(model, params)
    _check_params_sharded(named)
    pg = _process_group([p for _, p in named], group)
    with isolated(model, mode="eval", grad_params=[p for _, p in named]):
        plan = _Plan(batches, num_groups, chunk_size, pg, loss_fn is None, _comm_device(named))
        return _norms(model, batches, num_groups, named, plan, loss_fn, forward_fn, pg)


def _comm_device(named: list[tuple[str, Tensor]]) -> torch.device:
    return named[0][1].device


def _norms(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: list[tuple[str, Tensor]],
    plan: _Plan,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    group: Any,
    warn: bool = True,
) -> GroupGradients:
    sq, loss_sums = _gradient_sums(
        model, batches, num_groups, named, plan, loss_fn, forward_fn, group
    )
    packed = torch.cat([sq, loss_sums, plan.local_counts.to(torch.float64)])
    packed = _all_reduce(packed.to(_comm_device(named)), group).cpu()
    sq, loss_sums, counts = packed.split(num_groups)
    if warn:
        _warn_missing("sharded_group_gradient_norms", counts)
    return GroupGradients(
        norms=_safe_div(sq.clamp_min(0).sqrt(), counts), loss_sums=loss_sums, counts=counts
    )


def sharded_measure_groups(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    num_classes: int | None,
    *,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    gradients: bool = True,
    chunk_size: int | None = None,
    group: Any = None,
) -> GroupMeasurement:
    """`measure_groups` for FSDP2-sharded models: counts, recall, losses, confusion, ‖g_a‖.

    The forward-only part is `measure_groups` with ``gradients=False`` and ``num_probes=0``
    and an all-reduce (sum) of its sums; the gradient norms come from
    :func:`sharded_group_gradient_norms`. The Hessian trace, λ_max and predicted excess loss
    stay ``None`` (:data:`CURVATURE_UNAVAILABLE`). Every process must call it, with the same
    number of batches (checked).

    Args:
        model: the (sharded) network; eval mode during the measurement, then restored.
        batches: re-iterable ``(inputs, targets, groups)`` or ``(inputs, targets)``.
        num_groups: number of groups G.
        num_classes: number of classes C (None: the logits' width).
        params: parameters of the gradient norms (see `group_gradient_norms`).
        loss_fn: per-sample loss (default cross-entropy).
        forward_fn: ``(model, inputs) -> logits``.
        gradients: measure the per-group gradient norms.
        chunk_size: samples per backward call of the gradient norms.
        group: process group (default: the DTensors' mesh group, else the default group).

    Returns:
        `GroupMeasurement`, identical on every process.

    Raises:
        ValueError: processes with different numbers of batches, a process without samples,
            or the errors of `measure_groups`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> m = sharded_measure_groups(model, [(x, y, y)], num_groups=2, num_classes=2)
        >>> m.support.sum().item(), m.grad_norms.shape, m.hessian_trace is None
        (8.0, torch.Size([2]), True)
    """
    _check_pass_args(num_groups, chunk_size, batches)
    _check_iterable(batches, 2)
    named = _resolve_params(model, params)
    _check_params_sharded(named)
    pg = _process_group([p for _, p in named], group)
    with isolated(model, mode="eval", grad_params=[p for _, p in named]):
        plan = _Plan(batches, num_groups, chunk_size, pg, True, _comm_device(named))
        if not plan.batches_equal:
            lo, hi = plan.batch_range
            raise ValueError(
                "Expected every process to hold the same number of batches (FSDP's forward "
                f"passes run in lockstep), but got between {lo} and {hi} batches per process"
            )

        def reduce_fn(t: Tensor) -> Tensor:
            return _all_reduce(t.clone(), pg)

        result = measure_groups(
            model,
            batches,
            num_groups,
            num_classes,
            params=dict(named),
            loss_fn=loss_fn,
            forward_fn=forward_fn,
            reduce_fn=reduce_fn,
            gradients=False,
            num_probes=0,
        )
        if gradients:
            res = _norms(
                model, batches, num_groups, named, plan, loss_fn, forward_fn, pg, warn=False
            )
            result.grad_norms = res.norms
    return result
