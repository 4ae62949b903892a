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

**Curvature by finite differences.** FSDP2's reduce-scatter hooks give no double backward,
but first-order sharded gradients at perturbed weights give Hessian-vector products along a
direction d: dᵀH_a d ≈ dᵀ(g_a(θ+εd) − g_a(θ−εd)) / (2ε).
:func:`sharded_group_directional` does this for directions given as local shards (weights
moved in place and restored bit for bit), :func:`sharded_group_hessian_trace` runs Hutchinson
with each process's slice of the unsharded probes (`local_rademacher_probes`), and
:func:`sharded_predicted_excess_loss` gives g_aᵀδ + ½ δᵀH_aδ and
:func:`sharded_group_hessian_lambda_max` runs power iteration with the vectors kept as local
shards. By default (``gates="frozen"``) a first lockstep pass at θ records the activation
pattern of every ReLU-like op and max pool (`~lightning_fairprune.diagnostics.gates.FrozenGates`)
and the perturbed passes replay it, so the difference quotient is that of the smooth network
whose Hessian at θ is the almost-everywhere Hessian of double backward (no term from units
switching within ±ε); that pass also gives g_aᵀd exactly. Cost: ``(2 K + 1) G`` sharded
backward sets per trace of K probes, ``3 G`` per predicted excess loss, ``(2 T + 1) G`` for T
power iterations (``gates="live"``: one ``G`` less each). The gates are stored for the whole
data when their estimated size fits ``gate_memory`` (default `GATE_MEMORY`, 1 GiB), else
recomputed per chunk by one more no-grad forward before each perturbed call (memory: one
chunk's gates; the same results bit for bit; see :func:`sharded_group_directional`).

Everything runs inside `lightning_fairprune.measure.isolated`: module modes, buffers,
``.grad`` and ``requires_grad`` of every parameter and the RNG states are restored afterwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_choice, check_int
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
    GroupHessianTrace,
    GroupMeasurement,
    LossFn,
    ParamsArg,
    _check_iterable,
    _check_pass_args,
    _resolve_params,
    _safe_div,
    _trace_stats,
    _warn_missing,
    measure_groups,
    rademacher_probes,
)
from lightning_fairprune.diagnostics.gates import FrozenGates
from lightning_fairprune.dtensor import _group_of, is_sharded, local_tensor, shard_spec
from lightning_fairprune.measure import isolated

__all__ = [
    "GATES",
    "GATE_MEMORY",
    "GroupDirectional",
    "default_relative_step",
    "has_dtensor_params",
    "local_rademacher_probes",
    "sharded_group_directional",
    "sharded_group_gradient_norms",
    "sharded_group_hessian_lambda_max",
    "sharded_group_hessian_trace",
    "sharded_measure_groups",
    "sharded_predicted_excess_loss",
]


_log = logging.getLogger(__name__)


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


def _owned_summed_grads(
    named: list[tuple[str, Tensor]],
    factors: dict[int, float],
    group: Any,
    wanted: list[bool] | None = None,
    replicas: bool = False,
) -> Iterator[tuple[int, Tensor]]:
    """``(index, part)``: this process's owned part of each parameter's *summed* gradient.

    A sharded parameter gives its local gradient shard times FSDP's divide factor (FSDP
    averaged it over the processes); a plain (replicated) parameter gives its gradient summed
    over the processes, on the owning process only (on every process with ``replicas``: the
    caller then counts it once, see `shard_spec`). The all-reduce of plain parameters is a
    collective: every process must exhaust the generator over the same ``wanted`` parameters.
    """
    for i, (_, p) in enumerate(named):
        if wanted is not None and not wanted[i]:
            continue
        grad = p.grad
        spec = shard_spec(p, group)
        if is_sharded(p):
            if grad is None or not (spec.owner or replicas):
                continue
            factor = factors.get(id(p), float(p.device_mesh.size()))  # type: ignore[attr-defined]
            yield i, local_tensor(grad).detach().to(torch.float64) * factor
            continue
        local = (
            torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            if grad is None
            else grad.detach().to(torch.float64)
        )
        local = _all_reduce(local.clone(), group)
        if spec.owner or replicas:
            yield i, local


def _local_sq_norm(
    named: list[tuple[str, Tensor]], factors: dict[int, float], group: Any
) -> Tensor:
    """Σ over this process's owned elements of S_a², S_a the *summed* global gradient."""
    total = torch.zeros((), dtype=torch.float64)
    for _, part in _owned_summed_grads(named, factors, group):
        total += float(torch.linalg.vector_norm(part)) ** 2
    return total


GATE_MEMORY = 1 << 30
"""Default ``gate_memory`` (bytes) of the frozen-gate functions: 1 GiB."""

_SCRATCH = "chunk"  # FrozenGates key of the gates of one chunk (per-chunk mode)


def _check_gate_memory(value: Any) -> int | None:
    return check_int(value, "gate_memory", 0, allow_none=True)  # type: ignore[no-any-return]


def _reshard(model: nn.Module) -> None:
    """Free every FSDP2 unsharded parameter, so the next forward all-gathers the local shards.

    FSDP2 keeps the root module's parameters unsharded after a forward pass (they are
    resharded after the backward); after a forward without backward (no grad) and an in-place
    change of the local shards, the next forward would use the stale unsharded values.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class _Gating:
    """The frozen gates of one measurement: stored for all the data, or recomputed per chunk.

    The record pass at θ (`_lockstep_backward` with ``phase="record"``) records each lockstep
    call (pure-group chunk or padded call) under its own key ``(group, call)``. After the
    first call, one all-reduce (max) of its gate bytes over the processes gives the estimate
    ``bytes × calls`` (``calls``: the lockstep calls of the record pass, padding included) and
    the mode, the same on every process: ``"stored"`` if it fits ``budget`` (or ``budget`` is
    None), else ``"per_chunk"``: the record pass then drops each call's gates after its
    backward, and every perturbed call first puts the local shards back to θ (``saved``), runs
    a no-grad forward recording that call's gates, moves the shards back to the perturbed point
    and replays them (then drops them). ``held`` / ``peak`` count the bytes of gates held.
    """

    def __init__(
        self,
        locals_: list[Tensor],
        saved: list[Tensor],
        budget: int | None,
        calls: int,
        group: Any,
        device: torch.device,
    ) -> None:
        self.gates = FrozenGates()
        self.locals_ = locals_
        self.saved = saved
        self.budget = budget
        self.calls = calls
        self.group = group
        self.device = device
        self.mode: str | None = None
        self.estimate = 0
        self.held = 0
        self.peak = 0

    def recorded(self, key: Any) -> None:
        self.held += self.gates.nbytes(key)
        self.peak = max(self.peak, self.held)

    def drop(self, key: Any) -> None:
        self.held -= self.gates.nbytes(key)
        self.gates.drop(key)

    def decide(self, first_bytes: int) -> None:
        """The mode from the first call's gate bytes: one all-reduce (max), every process."""
        head = torch.tensor([first_bytes], dtype=torch.int64, device=self.device)
        head = _all_reduce(head, self.group, torch.distributed.ReduceOp.MAX).cpu()
        self.estimate = int(head[0]) * self.calls
        fits = self.budget is None or self.estimate <= self.budget
        self.mode = "stored" if fits else "per_chunk"
        _log.debug(
            "frozen gates: %s (estimated %d bytes for %d lockstep calls, gate_memory=%s)",
            self.mode,
            self.estimate,
            self.calls,
            self.budget,
        )

    def to_theta(self) -> None:
        _move(self.locals_, self.saved, [None] * len(self.saved), 0.0)

    def summary(self) -> str:
        """``"stored"`` / ``"per_chunk"`` (``"stored"`` if nothing was recorded)."""
        return self.mode or "stored"

    def finish(self) -> None:
        """Forget the gates; log the most bytes held at once (debug level)."""
        self.gates.clear()
        self.held = 0
        _log.debug("frozen gates: %s, peak %d bytes held", self.summary(), self.peak)


def _lockstep_backward(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    plan: _Plan,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    device: torch.device,
    on_group: Callable[[int], None],
    *,
    groups: Sequence[int] | None = None,
    gating: _Gating | None = None,
    phase: str = "record",
    point: Callable[[], None] | None = None,
) -> Tensor:
    """Per group: ``.backward()`` of the summed group loss in lockstep, then ``on_group(a)``.

    On ``on_group(a)`` every parameter's ``.grad`` holds the (reduce-scattered, divided) shard
    of S_a. ``groups`` runs only those groups (every process must pass the same ones: each
    backward is a collective). With ``gating``, the forward pass (and loss) of each lockstep
    call records (``phase="record"``, at θ) or replays (``phase="replay"``) its frozen gates,
    stored or recomputed per chunk (see `_Gating`; ``point()`` moves the local shards from θ
    to the perturbed point); the backward passes do not. Returns the local ``[G]`` loss sums
    (zero for groups not run).
    """
    loss_fn = loss_fn or default_loss
    forward_fn = forward_fn or default_forward
    every = list(model.parameters())
    loss_sums = torch.zeros(num_groups, dtype=torch.float64)
    pad_x = tree_map(lambda t: t.to(device), plan.sample[0])

    def forward(x: Nested, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(tensor to backward, its output gradient): the summed loss, or a padded call."""
        out = forward_fn(model, x)
        if y is None:  # lockstep padding: a zero output gradient
            return out, torch.zeros_like(out)
        losses = loss_fn(out, y)
        if not isinstance(losses, Tensor) or losses.shape != (y.shape[0],):
            raise ValueError(
                "Expected `loss_fn` to return per-sample losses of shape "
                f"[{y.shape[0]}], but got "
                f"{tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)}"
            )
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(
                "Expected finite losses, but `loss_fn` returned NaN or inf (check the "
                "model weights and inputs)"
            )
        return losses.sum(), None

    def call(a: int, i: int, x: Nested, y: Tensor | None) -> None:
        if gating is None:
            total, grad = forward(x, y)
        elif phase == "record":
            key: Any = _SCRATCH if gating.mode == "per_chunk" else (a, i)
            with gating.gates.record(key):
                total, grad = forward(x, y)
            gating.recorded(key)
        elif gating.summary() == "stored":
            with gating.gates.replay((a, i)):
                total, grad = forward(x, y)
        else:  # per chunk: the gates of this call at θ, then the perturbed pass
            assert point is not None
            gating.to_theta()
            with torch.no_grad(), gating.gates.record(_SCRATCH):
                forward(x, y)
            gating.recorded(_SCRATCH)
            _reshard(model)
            point()
            with gating.gates.replay(_SCRATCH):
                total, grad = forward(x, y)
        if y is not None:
            loss_sums[a] += float(total.detach())
        total.backward(grad)
        if gating is not None:
            if phase == "record" and gating.mode is None:
                gating.decide(gating.held)
                if gating.mode == "per_chunk":
                    gating.drop((a, i))
            elif gating.mode == "per_chunk":
                gating.drop(_SCRATCH)

    _reshard(model)  # the local shards may have moved since FSDP's last forward
    for a in range(num_groups) if groups is None else groups:
        for p in every:
            p.grad = None
        done = 0
        for x, y in _group_chunks(batches, a, plan.chunk):
            call(a, done, tree_map(lambda t: t.to(device), x), y.to(device))
            done += 1
        for i in range(done, plan.chunks[a]):  # lockstep: zero-gradient backward calls
            call(a, i, pad_x, None)
        on_group(a)
    for p in every:
        p.grad = None
    return loss_sums


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
    factors = _divide_factors(model)
    sq = torch.zeros(num_groups, dtype=torch.float64)

    def on_group(a: int) -> None:
        sq[a] = _local_sq_norm(named, factors, group)

    loss_sums = _lockstep_backward(
        model, batches, num_groups, plan, loss_fn, forward_fn, named[0][1].device, on_group
    )
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
    _reshard(model)  # FSDP2 parameters as DTensors (a no-grad forward leaves the root unsharded)
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
    stay ``None`` (see :func:`sharded_group_hessian_trace` and
    :func:`sharded_predicted_excess_loss`). Every process must call it, with the same
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
    _reshard(model)  # FSDP2 parameters as DTensors (a no-grad forward leaves the root unsharded)
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


# --------------------------------------------------------------------------- curvature

Directions = Mapping[str, Tensor]


@dataclass
class GroupDirectional:
    """Result of :func:`sharded_group_directional` (float64, CPU, indexed by group id).

    Attributes:
        linear: ``[G, K]`` g_aᵀd_k, g_a the gradient of group a's *mean* loss (NaN if missing).
        quadratic: ``[G, K]`` d_kᵀH_a d_k by central differences (NaN if missing).
        counts: ``[G]`` samples per group (all processes).
        eps: ``[K]`` the finite-difference step ε_k used along each direction.
        gate_mode: how the gates ran: ``"stored"`` (frozen gates of all the data held),
            ``"per_chunk"`` (frozen gates recomputed per chunk, see ``gate_memory``) or
            ``"live"``.
    """

    linear: Tensor
    quadratic: Tensor
    counts: Tensor
    eps: Tensor
    gate_mode: str | None = None


GATES = ("frozen", "live")


def default_relative_step(dtype: torch.dtype, gates: str = "frozen") -> float:
    """The default relative finite-difference step r for parameters of ``dtype``.

    For a smooth loss the central difference of the gradient has a truncation error O(ε²)
    and a rounding error O(u/ε) (u the unit roundoff); r = u^(1/3) balances them (6.06e-6 in
    float64, 4.9e-3 in float32). With ``gates="frozen"`` (the activation pattern of every
    ReLU-like op and max pool replayed from θ, see
    `~lightning_fairprune.diagnostics.gates.FrozenGates`) the perturbed network is smooth and
    the default is ``min(u^(1/3), 1e-3)``: in float32 r = 1e-3 had the smallest worst-case
    error over ReLU and tanh MLPs and a ReLU + max-pool CNN (3e-3, against 6e-3 at
    u^(1/3), where the truncation error of the tanh MLP shows). With ``gates="live"`` the
    difference quotient also counts the units that switch on or off within ±ε, a term that
    does not shrink with ε until no unit switches, so r is capped at 1e-4:
    ``min(u^(1/3), 1e-4)`` (still errors of 10-60x on a float32 ReLU MLP). Float16 and
    bfloat16 parameters need an explicit, larger ``eps``. The measurements are in
    ``docs/sharded_curvature.md`` (``benchmarks/sharded_curvature_accuracy.py``).

    Args:
        dtype: floating dtype of the perturbed parameters.
        gates: ``"frozen"`` or ``"live"``.

    Example:
        >>> round(default_relative_step(torch.float64), 8), default_relative_step(torch.float32)
        (6.06e-06, 0.001)
        >>> default_relative_step(torch.float32, gates="live")
        0.0001
    """
    check_choice(gates, "gates", GATES)
    r = float(torch.finfo(dtype).eps) ** (1.0 / 3.0)
    return min(r, 1e-3 if gates == "frozen" else 1e-4)


def _local_dot(
    named: list[tuple[str, Tensor]],
    dirs: list[Tensor | None],
    factors: dict[int, float],
    group: Any,
) -> float:
    """Σ over this process's owned elements of S_a · d, S_a the *summed* global gradient."""
    wanted = [d is not None for d in dirs]
    return sum(
        float((part * dirs[i].to(torch.float64)).sum())  # type: ignore[union-attr]
        for i, part in _owned_summed_grads(named, factors, group, wanted)
    )


def _owned_sq(named: list[tuple[str, Tensor]], tensors: list[Tensor | None], group: Any) -> float:
    """Σ of squares over this process's owned elements (plain tensors: the first process)."""
    total = 0.0
    for (_, p), t in zip(named, tensors, strict=True):
        if t is not None and shard_spec(p, group).owner:
            total += float(torch.linalg.vector_norm(t.detach().to(torch.float64))) ** 2
    return total


def _check_eps(eps: Any) -> None:
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1
    ):
        raise ValueError(
            f"Expected `eps` to be None or a float in (0, 1) (the relative finite-difference "
            f"step), but got {eps!r}"
        )


def _step_norms(
    named: list[tuple[str, Tensor]],
    saved: list[Tensor],
    extra: list[float],
    device: torch.device,
    group: Any,
) -> Tensor:
    """``[‖θ‖, *sqrt(extra)]`` over all processes: one all-reduce of ``1 + len(extra)``."""
    norms = torch.tensor([_owned_sq(named, list(saved), group), *extra], dtype=torch.float64)
    return _all_reduce(norms.to(device), group).cpu().clamp_min(0).sqrt()


def _move(
    locals_: list[Tensor], saved: list[Tensor], dirs: list[Tensor | None], step: float
) -> None:
    """Local shards to θ + step · d (in the parameters' dtype), θ itself where d is None."""
    with torch.no_grad():
        for t, s, d in zip(locals_, saved, dirs, strict=True):
            t.copy_(s)
            if d is not None:
                t.add_(d.to(t.dtype), alpha=step)


def _directional_sums(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: list[tuple[str, Tensor]],
    plan: _Plan,
    num_dirs: int,
    direction: Callable[[int], list[Tensor | None]],
    eps: float | None,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    group: Any,
    gates: str,
    gate_memory: int | None = GATE_MEMORY,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, str]:
    """Global ``[G, K]`` sums S_a·d_k at θ ± ε_k d_k and at θ, ``[K + G]`` (ε, counts), mode.

    The sums at θ are None with live gates. Weights are restored exactly. ``direction(k)``
    gives the local part of d_k per selected parameter (None: zero). With frozen gates one
    more lockstep pass at θ records the gates (and gives S_a(θ)·d_k), and the 2K perturbed
    passes replay them, stored or recomputed per chunk (`_Gating`, ``gate_memory``). The mode
    is ``"stored"``, ``"per_chunk"`` or ``"live"``.
    """
    device = _comm_device(named)
    locals_ = [local_tensor(p) for _, p in named]
    saved = [t.detach().clone() for t in locals_]
    rel = eps if eps is not None else max(default_relative_step(t.dtype, gates) for t in locals_)
    # ‖θ‖ and ‖d_k‖ over the selected parameters, summed across processes (one all-reduce)
    sq = [_owned_sq(named, direction(k), group) for k in range(num_dirs)]
    norms = _step_norms(named, saved, sq, device, group)
    theta_norm = float(norms[0]) if float(norms[0]) > 0 else 1.0
    steps = torch.zeros(num_dirs, dtype=torch.float64)
    factors = _divide_factors(model)
    plus = torch.zeros(num_groups, num_dirs, dtype=torch.float64)
    minus = torch.zeros(num_groups, num_dirs, dtype=torch.float64)
    at_theta = torch.zeros(num_groups, num_dirs, dtype=torch.float64)
    live = [k for k in range(num_dirs) if float(norms[k + 1]) > 0]  # zero directions: 0
    frozen = (
        _Gating(locals_, saved, gate_memory, sum(plan.chunks), group, device)
        if gates == "frozen"
        else None
    )
    try:
        if frozen is not None:
            wanted = [False] * len(named)
            for k in live:
                wanted = [w or d is not None for w, d in zip(wanted, direction(k), strict=True)]

            def on_theta(a: int) -> None:
                parts = dict(_owned_summed_grads(named, factors, group, wanted))
                for k in live:
                    dirs = direction(k)
                    at_theta[a, k] = sum(
                        float((part * dirs[i].to(torch.float64)).sum())  # type: ignore[union-attr]
                        for i, part in parts.items()
                        if dirs[i] is not None
                    )

            _lockstep_backward(
                model, batches, num_groups, plan, loss_fn, forward_fn, device, on_theta,
                gating=frozen, phase="record",
            )  # fmt: skip
        for k in live:
            step = rel * theta_norm / float(norms[k + 1])
            steps[k] = step
            dirs = direction(k)
            for sign, out in ((1.0, plus), (-1.0, minus)):
                _move(locals_, saved, dirs, sign * step)

                def on_group(a: int, out: Tensor = out, dirs: list = dirs, k: int = k) -> None:
                    out[a, k] = _local_dot(named, dirs, factors, group)

                def point(dirs: list = dirs, at: float = sign * step) -> None:
                    _move(locals_, saved, dirs, at)

                _lockstep_backward(
                    model, batches, num_groups, plan, loss_fn, forward_fn, device, on_group,
                    gating=frozen, phase="replay", point=point,
                )  # fmt: skip
    finally:
        _move(locals_, saved, [None] * len(saved), 0.0)
        if frozen is not None:
            frozen.finish()
    parts = [plus.flatten(), minus.flatten()]
    if frozen is not None:
        parts.append(at_theta.flatten())
    packed = torch.cat([*parts, plan.local_counts.to(torch.float64)])
    packed = _all_reduce(packed.to(device), group).cpu()
    g_k = num_groups * num_dirs
    plus = packed[:g_k].view(num_groups, num_dirs)
    minus = packed[g_k : 2 * g_k].view(num_groups, num_dirs)
    theta = packed[2 * g_k : 3 * g_k].view(num_groups, num_dirs) if frozen is not None else None
    counts = packed[len(parts) * g_k :]
    mode = "live" if frozen is None else frozen.summary()
    return plus, minus, theta, torch.cat([steps, counts]), mode


def _directional(
    fn: str,
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: list[tuple[str, Tensor]],
    num_dirs: int,
    direction: Callable[[int], list[Tensor | None]],
    eps: float | None,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    chunk_size: int | None,
    group: Any,
    gates: str,
    gate_memory: int | None,
) -> GroupDirectional:
    pg = _process_group([p for _, p in named], group)
    with isolated(model, mode="eval", grad_params=[p for _, p in named]):
        plan = _Plan(batches, num_groups, chunk_size, pg, loss_fn is None, _comm_device(named))
        plus, minus, theta, rest, mode = _directional_sums(
            model,
            batches,
            num_groups,
            named,
            plan,
            num_dirs,
            direction,
            eps,
            loss_fn,
            forward_fn,
            pg,
            gates,
            gate_memory,
        )
    steps, counts = rest[:num_dirs], rest[num_dirs:]
    _warn_missing(fn, counts)
    safe = torch.where(steps > 0, 2 * steps, torch.ones_like(steps))
    quad = torch.where(steps > 0, (plus - minus) / safe, torch.zeros_like(plus))
    if theta is None:
        lin = torch.where(steps > 0, (plus + minus) / 2, torch.zeros_like(plus))
    else:
        lin = torch.where(steps > 0, theta, torch.zeros_like(plus))
    return GroupDirectional(
        linear=_safe_div(lin, counts[:, None]),
        quadratic=_safe_div(quad, counts[:, None]),
        counts=counts,
        eps=steps,
        gate_mode=mode,
    )


def _local_directions(
    named: list[tuple[str, Tensor]], directions: Sequence[Directions], arg: str
) -> list[list[Tensor | None]]:
    """Per direction, the local part per selected parameter (validated), None where absent."""
    index = {n: i for i, (n, _) in enumerate(named)}
    out = []
    for k, mapping in enumerate(directions):
        if not isinstance(mapping, Mapping):
            raise TypeError(
                f"Expected `{arg}` to hold mappings FQN -> tensor, but got "
                f"{type(mapping).__name__} at position {k}"
            )
        unknown = [n for n in mapping if n not in index]
        if unknown:
            raise ValueError(
                f"Expected the keys of `{arg}` to be selected parameters "
                f"{[n for n, _ in named]}, but got {unknown}"
            )
        parts: list[Tensor | None] = [None] * len(named)
        for name, value in mapping.items():
            p = named[index[name]][1]
            want = tuple(local_tensor(p).shape)
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"Expected `{arg}[{name!r}]` to be a tensor, but got {type(value).__name__}"
                )
            value = local_tensor(value).detach()
            if tuple(value.shape) != want:
                raise ValueError(
                    f"Expected `{arg}[{name!r}]` to have the shape of this process's local "
                    f"shard {want}, but got {tuple(value.shape)}"
                )
            parts[index[name]] = value.to(device=local_tensor(p).device)
        out.append(parts)
    return out


def sharded_group_directional(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    directions: Directions | Sequence[Directions],
    *,
    eps: float | None = None,
    gates: str = "frozen",
    gate_memory: int | None = GATE_MEMORY,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    group: Any = None,
) -> GroupDirectional:
    """Per group, g_aᵀd and dᵀH_a d along given directions, from sharded first-order gradients.

    FSDP2 has no double backward, but its (sharded) gradients can be taken at perturbed
    weights. For each direction d (given as this process's *local shards*), the local shards
    of the selected parameters are moved in place to θ ± ε d and, per group, the summed group
    gradient S_a is taken in lockstep as in :func:`sharded_group_gradient_norms`; then

    * dᵀH_a d ≈ dᵀ(g_a(θ + εd) − g_a(θ − εd)) / (2ε) (central difference: exact for a
      quadratic loss, O(ε²) error otherwise),
    * g_aᵀd from the gradient at θ itself (``gates="frozen"``), or
      ≈ dᵀ(g_a(θ + εd) + g_a(θ − εd)) / 2 (``gates="live"``, also O(ε²)),

    each dot product taken on the local shards. One all-reduce of ``1 + K`` numbers
    (‖θ‖², ‖d_k‖²) fixes the steps and one of ``3 G K + G`` numbers (``2 G K + G`` live)
    gives every process the global results. The weights are restored bit for bit (saved
    local shards copied back, also on error).

    **Gates.** With piecewise-linear activations (ReLU) the loss is smooth only piecewise;
    double backward gives the Hessian of the piece containing θ (almost everywhere), but a
    difference quotient also counts the units that switch on or off within ±ε, a term that
    does not shrink with ε (in float32 it gave errors of 10-60x). ``gates="frozen"``
    (default) runs one more lockstep pass at θ that records the activation pattern of every
    ReLU-like op, clamp and max pool
    (`~lightning_fairprune.diagnostics.gates.FrozenGates`, which lists the ops covered) and
    replays it at θ ± εd: the perturbed network is the smooth piece of θ, so the quotient
    is O(ε²) accurate with no switching term. The forward must gate the same ops in the
    same order at θ ± εd (a `RuntimeError` otherwise). ``gates="live"`` is the plain
    difference.

    **Gate memory.** Stored, the gates take one bit per gated activation element (an int32
    per max-pool output) over all the data, held during the call (e.g. about 1.2 MB per
    224×224 image on a ResNet-50). After the first lockstep call of the pass at θ, one
    all-reduce (max) of its gate bytes gives the estimate ``bytes × calls`` (every lockstep
    call of the pass, padding included), the same on every process: within ``gate_memory``
    the gates are stored; above it they are *recomputed per chunk*: before each perturbed
    call the local shards go back to θ (a copy of the saved shards), a no-grad forward of
    that chunk records its gates, the shards move to θ ± εd and the forward and backward
    replay them; then they are dropped. Memory: the gates of one chunk. Cost: one more
    no-grad forward (an FSDP all-gather) and two local-shard copies per chunk of each
    perturbed pass. The gates, hence the results, are the same bit for bit. The mode is in
    `GroupDirectional.gate_mode` and in a debug-level log of this module.

    **Step.** ε_k = r · ‖θ‖ / ‖d_k‖ over the selected parameters (‖θ‖ replaced by 1 if
    zero): the perturbation ε d has norm r · ‖θ‖, relative to the weights. ``r`` defaults to
    `default_relative_step` of the parameters' dtype and ``gates`` (6e-6 in float64; in
    float32 1e-3 with frozen gates, 1e-4 live); the perturbation is added in the parameters'
    dtype.

    **Cost.** ``2 K`` lockstep passes of ``G`` per-group backward sets (each reduce-scatters
    the gradient of every trainable parameter), plus one at θ with frozen gates.

    Args:
        model: the (sharded) network; eval mode during the measurement, then restored.
        batches: re-iterable ``(inputs, targets, groups)`` or ``(inputs, targets)``: this
            process's share of the data.
        num_groups: number of groups G.
        directions: one mapping FQN -> local part of d (the shard this process holds, of
            ``local_tensor(param)``'s shape; a DTensor is taken by its local shard; a plain
            parameter takes the full tensor, identical on every process), or a sequence of
            them. Parameters not listed have d = 0.
        eps: relative step r in (0, 1) (default: `default_relative_step`).
        gates: ``"frozen"`` (replay the activation pattern of θ) or ``"live"``.
        gate_memory: bytes the frozen gates of all the data may take (default
            `GATE_MEMORY`, 1 GiB; ``None``: no limit). Above it the gates are recomputed per
            chunk (see **Gate memory**); the results are the same, bit for bit.
        params: parameters to perturb and differentiate (default: the keys of
            ``directions``).
        loss_fn: ``(outputs, targets) -> Tensor[N]`` per-sample losses (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        chunk_size: samples per backward call.
        group: process group (default: the DTensors' mesh group, else the default group).

    Returns:
        `GroupDirectional`, identical on every process (NaN, one warning, for groups without
        samples).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
        >>> d = {"weight": torch.ones(2, 3, dtype=torch.float64)}
        >>> res = sharded_group_directional(model, [(x, y, y)], 2, d)
        >>> from torch.func import functional_call, hessian
        >>> def loss(w):  # group 0's mean loss as a function of the weight
        ...     out = functional_call(model, {"weight": w, "bias": model.bias}, (x[y == 0],))
        ...     return nn.functional.cross_entropy(out, y[y == 0])
        >>> exact = hessian(loss)(model.weight.detach()).reshape(6, 6).sum()
        >>> bool(torch.isclose(res.quadratic[0, 0], exact, rtol=1e-6))
        True
    """
    _check_pass_args(num_groups, chunk_size, batches)
    _check_iterable(batches, 2)
    _check_eps(eps)
    check_choice(gates, "gates", GATES)
    _check_gate_memory(gate_memory)
    many = [directions] if isinstance(directions, Mapping) else directions
    if isinstance(many, (str, bytes)) or not isinstance(many, Sequence) or not many:
        raise TypeError(
            "Expected `directions` to be a mapping FQN -> tensor or a non-empty sequence of "
            f"them, but got {type(directions).__name__}"
        )
    if params is None:
        keys: list[str] = []
        for mapping in many:
            if isinstance(mapping, Mapping):
                keys += [n for n in mapping if n not in keys]
        params = keys
    _reshard(model)  # FSDP2 parameters as DTensors (a no-grad forward leaves the root unsharded)
    named = _resolve_params(model, params)
    _check_params_sharded(named)
    parts = _local_directions(named, many, "directions")
    return _directional(
        "sharded_group_directional",
        model,
        batches,
        num_groups,
        named,
        len(parts),
        parts.__getitem__,
        eps,
        loss_fn,
        forward_fn,
        chunk_size,
        group,
        gates,
        gate_memory,
    )


def _flat_bases(named: list[tuple[str, Tensor]], group: Any) -> list[int]:
    """Flat index, in the unsharded concatenation of ``named``, of each local shard's start."""
    bases, base = [], 0
    for _, p in named:
        spec = shard_spec(p, group)
        bases.append(base + spec.offset)
        base += spec.numel
    return bases


def local_rademacher_probes(
    named: Sequence[tuple[str, Tensor]],
    probe: int,
    seed: int = 0,
    group: Any = None,
) -> list[Tensor]:
    """This process's slice, per parameter, of Rademacher probe number ``probe``.

    The unsharded probe is `~lightning_fairprune.diagnostics.curvature.rademacher_probes`
    over the flat concatenation of the parameters (in order, as in `group_hessian_trace`);
    each local shard gets the columns at its flat offset (`shard_spec`), so the slices are
    those probes element for element, generated without building the full probe.

    Args:
        named: (FQN, parameter) pairs, sharded or plain, in the order of the flat probe.
        probe: probe index k (>= 0).
        seed: probe seed.
        group: process group of plain tensors (see `shard_spec`).

    Returns:
        One tensor per parameter, of its local shard's shape, dtype and device.

    Example:
        >>> net = nn.Linear(2, 3)
        >>> parts = local_rademacher_probes(list(net.named_parameters()), probe=1)
        >>> full = rademacher_probes(2, 9)[1]
        >>> torch.equal(torch.cat([t.flatten() for t in parts]), full)
        True
    """
    out = []
    for (_, p), base in zip(named, _flat_bases(list(named), group), strict=True):
        local = local_tensor(p)
        flat = rademacher_probes(
            1,
            local.numel(),
            seed,
            start=probe,
            offset=base,
            device=local.device,
            dtype=local.dtype,
        )
        out.append(flat.view(local.shape))
    return out


def sharded_group_hessian_trace(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    *,
    num_probes: int = 16,
    seed: int = 0,
    eps: float | None = None,
    gates: str = "frozen",
    gate_memory: int | None = GATE_MEMORY,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    group: Any = None,
) -> GroupHessianTrace:
    """Hutchinson Tr(H_a) per group on FSDP2-sharded parameters, by finite-difference HVPs.

    The same estimator and probes as
    `~lightning_fairprune.diagnostics.curvature.group_hessian_trace` (mean over K
    Rademacher probes of v_kᵀH_a v_k, standard error over probes), with v_kᵀH_a v_k from
    :func:`sharded_group_directional` (central differences of sharded gradients). Every
    process builds only its slice of each probe (`local_rademacher_probes`), one probe at a
    time. λ_max is not computed here (``None``; see :func:`sharded_group_hessian_lambda_max`).

    **Cost.** ``2 K`` lockstep passes, each ``G`` per-group backward sets: ``2 K G`` sharded
    backward sets per trace (the unsharded double-backward path costs about K HVPs over the
    data), plus ``G`` for the record pass of frozen gates, one all-reduce of ``1 + K`` and one
    of ``3 G K + G`` numbers.

    Args:
        model: the (sharded) network; eval mode during the measurement, then restored.
        batches: re-iterable ``(inputs, targets, groups)`` or ``(inputs, targets)``.
        num_groups: number of groups G.
        num_probes: number of probes K.
        seed: probe seed (the probes of `group_hessian_trace` with this seed).
        eps: relative finite-difference step (see :func:`sharded_group_directional`).
        gates: ``"frozen"`` or ``"live"`` (see :func:`sharded_group_directional`).
        gate_memory: bytes for stored frozen gates, ``None``: no limit (see
            :func:`sharded_group_directional`).
        params: parameters spanning the Hessian (default: all trainable).
        loss_fn: per-sample loss (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        chunk_size: samples per backward call.
        group: process group.

    Returns:
        `GroupHessianTrace` (``lambda_max=None``), identical on every process.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
        >>> res = sharded_group_hessian_trace(model, [(x, y, y)], 2, num_probes=3)
        >>> from lightning_fairprune.diagnostics import group_hessian_trace
        >>> ref = group_hessian_trace(model, [(x, y, y)], 2, num_probes=3)
        >>> bool(torch.allclose(res.probe_values, ref.probe_values, rtol=1e-6))
        True
    """
    _check_pass_args(num_groups, chunk_size, batches)
    check_int(num_probes, "num_probes", 1)
    check_int(seed, "seed", 0)
    _check_iterable(batches, 2)
    _check_eps(eps)
    check_choice(gates, "gates", GATES)
    _check_gate_memory(gate_memory)
    _reshard(model)  # FSDP2 parameters as DTensors (a no-grad forward leaves the root unsharded)
    named = _resolve_params(model, params)
    _check_params_sharded(named)
    pg = _process_group([p for _, p in named], group)

    def probe(k: int) -> list[Tensor | None]:
        return list(local_rademacher_probes(named, k, seed, pg))

    res = _directional(
        "sharded_group_hessian_trace",
        model,
        batches,
        num_groups,
        named,
        num_probes,
        probe,
        eps,
        loss_fn,
        forward_fn,
        chunk_size,
        pg,
        gates,
        gate_memory,
    )
    trace, stderr = _trace_stats(res.quadratic)
    return GroupHessianTrace(
        trace=trace,
        stderr=stderr,
        num_probes=num_probes,
        lambda_max=None,
        counts=res.counts,
        probe_values=res.quadratic,
    )


def sharded_predicted_excess_loss(
    model: nn.Module,
    batches: Iterable[Any],
    delta: Directions,
    num_groups: int,
    *,
    eps: float | None = None,
    gates: str = "frozen",
    gate_memory: int | None = GATE_MEMORY,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    group: Any = None,
) -> Tensor:
    """R̂(a) = g_aᵀδ + ½ δᵀH_aδ per group on FSDP2-sharded parameters (central differences).

    `~lightning_fairprune.diagnostics.curvature.predicted_excess_loss` for a step δ given
    as local shards, from :func:`sharded_group_directional` with the one direction δ: two
    lockstep passes of ``G`` per-group backward sets, plus one at θ with frozen gates (which
    gives g_aᵀδ exactly).

    Args:
        model: the (sharded) network at θ*.
        batches: re-iterable ``(inputs, targets, groups)`` or ``(inputs, targets)``.
        delta: FQN -> this process's local shard of δ = θ̄ − θ* (parameters not listed: 0).
        num_groups: number of groups G.
        eps: relative finite-difference step (see :func:`sharded_group_directional`).
        gates: ``"frozen"`` or ``"live"`` (see :func:`sharded_group_directional`).
        gate_memory: bytes for stored frozen gates, ``None``: no limit (see
            :func:`sharded_group_directional`).
        params: parameters to differentiate (default: the keys of ``delta``).
        loss_fn: per-sample loss (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        chunk_size: samples per backward call.
        group: process group.

    Returns:
        float64 ``[G]`` on the CPU, identical on every process (NaN for missing groups).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
        >>> delta = {"0.weight": -0.1 * model[0].weight.detach()}
        >>> res = sharded_predicted_excess_loss(model, [(x, y, y)], delta, 2)
        >>> from lightning_fairprune.diagnostics import predicted_excess_loss
        >>> ref = predicted_excess_loss(model, [(x, y, y)], delta, 2)
        >>> bool(torch.allclose(res, ref, rtol=1e-6))
        True
    """
    if not isinstance(delta, Mapping):
        raise TypeError(
            f"Expected `delta` to be a mapping FQN -> tensor, but got {type(delta).__name__}"
        )
    res = sharded_group_directional(
        model,
        batches,
        num_groups,
        delta,
        eps=eps,
        gates=gates,
        gate_memory=gate_memory,
        params=params,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        chunk_size=chunk_size,
        group=group,
    )
    return (res.linear + 0.5 * res.quadratic)[:, 0]


def _start_vectors(
    named: list[tuple[str, Tensor]], num_groups: int, seed: int, group: Any
) -> list[list[Tensor]]:
    """Per group a, this process's slice of the power-iteration start vector of group a.

    The unsharded start vector is row a of ``rademacher_probes(G, P, seed + 1)`` divided by
    √P (`~lightning_fairprune.diagnostics.curvature.group_hessian_lambda_max`); each local
    shard takes its columns (`local_rademacher_probes`), in the parameters' dtype.
    """
    size = sum(shard_spec(p, group).numel for _, p in named)
    scale = 1.0 / math.sqrt(max(size, 1))
    return [
        [  # ±1 entries are exact in every float dtype: scale in float64, then cast back
            (part.to(torch.float64) * scale).to(part.dtype)
            for part in local_rademacher_probes(named, a, seed + 1, group)
        ]
        for a in range(num_groups)
    ]


def sharded_group_hessian_lambda_max(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    eps: float | None = None,
    gates: str = "frozen",
    gate_memory: int | None = GATE_MEMORY,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    group: Any = None,
) -> Tensor:
    """λ_max(H_a) per group on FSDP2-sharded parameters: power iteration on sharded HVPs.

    The iteration of `~lightning_fairprune.diagnostics.curvature.group_hessian_lambda_max`
    (v_a ← H_a v_a / ‖H_a v_a‖, estimate the Rayleigh quotient v_aᵀH_a v_a, the same start
    vectors for a given ``seed``), with H_a v_a taken by a central difference of sharded
    gradients: per iteration and group a, the local shards move to θ ± ε v_a, the lockstep
    backward of group a alone gives the owned shards of S_a(θ ± ε v_a), and
    H_a v_a ≈ (S_a(+) − S_a(−)) / (2 ε n_a). The vectors v_a stay local shards (memory: G
    local shards of the selected parameters, plus two float64 gradient shards); the Rayleigh
    quotients and norms of one iteration take one all-reduce of ``2 G`` numbers. With
    ``gates="frozen"`` (default) one more lockstep pass at θ records the activation pattern
    of ReLU-like ops and max pools, which the perturbed passes replay (see
    :func:`sharded_group_directional`); ε = r · ‖θ‖ with r from `default_relative_step`
    (‖v_a‖ = 1).

    **Cost.** ``2 · iterations · G`` sharded backward sets (each group's alone), plus ``G``
    for the record pass; the unsharded path needs ``iterations`` passes with one HVP per
    chunk.

    Args:
        model: the (sharded) network; eval mode during the measurement, then restored.
        batches: re-iterable ``(inputs, targets, groups)`` or ``(inputs, targets)``: this
            process's share of the data.
        num_groups: number of groups G.
        iterations: power iterations, at least 1.
        seed: seed of the start vectors.
        eps: relative finite-difference step r in (0, 1) (default: `default_relative_step`).
        gates: ``"frozen"`` (replay the activation pattern of θ) or ``"live"``.
        gate_memory: bytes for stored frozen gates, ``None``: no limit (see
            :func:`sharded_group_directional`).
        params: parameters spanning the Hessian (default: all trainable).
        loss_fn: ``(outputs, targets) -> Tensor[N]`` per-sample losses (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        chunk_size: samples per backward call.
        group: process group (default: the DTensors' mesh group, else the default group).

    Returns:
        float64 ``[G]`` on the CPU, identical on every process (NaN, with one warning, for
        groups without samples).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
        >>> lam = sharded_group_hessian_lambda_max(model, [(x, y, y)], 2, iterations=5)
        >>> from lightning_fairprune.diagnostics import group_hessian_lambda_max
        >>> ref = group_hessian_lambda_max(model, [(x, y, y)], 2, iterations=5)
        >>> bool(torch.allclose(lam, ref, rtol=1e-6))
        True
    """
    _check_pass_args(num_groups, chunk_size, batches)
    check_int(iterations, "iterations", 1)
    check_int(seed, "seed", 0)
    _check_iterable(batches, 2)
    _check_eps(eps)
    check_choice(gates, "gates", GATES)
    _check_gate_memory(gate_memory)
    _reshard(model)  # FSDP2 parameters as DTensors (a no-grad forward leaves the root unsharded)
    named = _resolve_params(model, params)
    _check_params_sharded(named)
    pg = _process_group([p for _, p in named], group)
    with isolated(model, mode="eval", grad_params=[p for _, p in named]):
        plan = _Plan(batches, num_groups, chunk_size, pg, loss_fn is None, _comm_device(named))
        lam, counts = _sharded_power_iteration(
            model, batches, num_groups, named, plan, iterations, seed, eps, gates,
            loss_fn, forward_fn, pg, gate_memory,
        )  # fmt: skip
    _warn_missing("sharded_group_hessian_lambda_max", counts)
    return lam


def _sharded_power_iteration(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: list[tuple[str, Tensor]],
    plan: _Plan,
    iterations: int,
    seed: int,
    eps: float | None,
    gates: str,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    group: Any,
    gate_memory: int | None = GATE_MEMORY,
) -> tuple[Tensor, Tensor]:
    """λ_max per group and the global counts; weights restored exactly."""
    device = _comm_device(named)
    locals_ = [local_tensor(p) for _, p in named]
    saved = [t.detach().clone() for t in locals_]
    rel = eps if eps is not None else max(default_relative_step(t.dtype, gates) for t in locals_)
    head = torch.cat(
        [
            torch.tensor([_owned_sq(named, list(saved), group)], dtype=torch.float64),
            plan.local_counts.to(torch.float64),
        ]
    )
    head = _all_reduce(head.to(device), group).cpu()
    theta_norm = math.sqrt(max(float(head[0]), 0.0)) or 1.0
    counts = head[1:]
    present = [a for a in range(num_groups) if float(counts[a]) > 0]
    owners = [shard_spec(p, group).owner for _, p in named]
    vecs = _start_vectors(named, num_groups, seed, group)
    factors = _divide_factors(model)
    calls = sum(plan.chunks[a] for a in present)
    frozen = (
        _Gating(locals_, saved, gate_memory, calls, group, device) if gates == "frozen" else None
    )
    lam = torch.full((num_groups,), math.nan, dtype=torch.float64)
    step = rel * theta_norm  # ‖v_a‖ = 1
    try:
        if frozen is not None and present:
            _lockstep_backward(
                model, batches, num_groups, plan, loss_fn, forward_fn, device, lambda a: None,
                groups=present, gating=frozen, phase="record",
            )  # fmt: skip
        for _ in range(iterations):
            sums = torch.zeros(2 * num_groups, dtype=torch.float64)
            for a in present:
                grads: dict[float, dict[int, Tensor]] = {}
                for sign in (1.0, -1.0):
                    _move(locals_, saved, list(vecs[a]), sign * step)

                    def on_group(
                        _: int, sign: float = sign, grads: dict[float, Any] = grads
                    ) -> None:
                        grads[sign] = dict(
                            _owned_summed_grads(named, factors, group, replicas=True)
                        )

                    def point(v: list[Tensor] = vecs[a], at: float = sign * step) -> None:
                        _move(locals_, saved, list(v), at)

                    _lockstep_backward(
                        model, batches, num_groups, plan, loss_fn, forward_fn, device,
                        on_group, groups=[a], gating=frozen, phase="replay", point=point,
                    )  # fmt: skip
                scale = 1.0 / (2.0 * step * float(counts[a]))
                for i, t in enumerate(locals_):
                    zero = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
                    plus, minus = grads[1.0].get(i, zero), grads[-1.0].get(i, zero)
                    hv = ((plus - minus) * scale).view(t.shape)
                    if owners[i]:
                        sums[a] += float((hv * vecs[a][i].to(torch.float64)).sum())
                        sums[num_groups + a] += float((hv * hv).sum())
                    vecs[a][i] = hv  # normalized below (float64 until then)
            sums = _all_reduce(sums.to(device), group).cpu()
            for a in present:
                lam[a] = sums[a]
                norm = math.sqrt(max(float(sums[num_groups + a]), 0.0))
                for i, t in enumerate(locals_):
                    v = vecs[a][i] / norm if norm > 0 else vecs[a][i]
                    vecs[a][i] = v.to(t.dtype)
    finally:
        _move(locals_, saved, [None] * len(saved), 0.0)
        if frozen is not None:
            frozen.finish()
    return lam, counts
