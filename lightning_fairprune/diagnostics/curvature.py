"""Per-group gradient norms, Hessian traces, λ_max and predicted excess loss (methods.md §4).

For every group ``a`` with ``n_a`` samples, J_a(θ) is the group's *mean* loss. This module
measures at the model's current weights:

* ‖g_a‖ with g_a = ∇J_a = S_a / n_a, S_a the sum of per-sample gradients of group ``a``;
* Tr(H_a) by Hutchinson, mean over Rademacher probes v_k of v_kᵀ H_a v_k, with its standard
  error over probes; λ_max(H_a) by power iteration;
* g_aᵀd and dᵀH_a d along given directions, and the predicted excess loss
  g_aᵀδ + ½ δᵀ H_a δ of a weight change δ;
* `measure_groups`: counts, recall, losses and all of the above in as few passes as possible.

Each estimator is written once over the pass engine (`lightning_fairprune.diagnostics.passes`),
whose backend the parameters select: plain tensors get pure-group chunks with double-backward
Hessian-vector products (about one forward+backward over the data for the gradient norms,
about K HVPs for a trace of K probes, whatever the number of groups); FSDP2-sharded DTensor
parameters get lockstep per-group backward passes on local shards and central differences of
sharded gradients (`~lightning_fairprune.diagnostics.sharded_pass.FiniteDifference`: step,
frozen gates, gate memory). The same probes and start vectors (`rademacher_probes`) serve
both backends, so both estimate the same quantities (to finite-difference accuracy).

All accumulators are sums, so ``reduce_fn`` (a function summing a tensor across processes,
e.g. an all-reduce) turns per-process sums into global ones on plain parameters: N processes
with the same probes give the numbers of one process over all the data. On FSDP2-sharded
parameters the sums are all-reduced over the DTensors' process group instead (``reduce_fn``
is not used). Measurements run inside `lightning_fairprune.measure.isolated`: the model is in
eval mode, and module modes, buffers, ``.grad``, ``requires_grad`` flags and RNG states are
restored afterwards (selected frozen parameters get gradients for the measurement only).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_int
from lightning_fairprune.diagnostics.passes import (
    Backend,
    ForwardFn,
    LossFn,
    ParamsArg,
    PassOptions,
    PassRequest,
    ReduceFn,
    check_iterable,
    check_pass_args,
    local_directions,
    open_pass,
    probe_batch,
    resolve_params,
    resolve_strategy,
    safe_div,
)
from lightning_fairprune.diagnostics.probes import Probes
from lightning_fairprune.diagnostics.recall import accuracy as _accuracy
from lightning_fairprune.diagnostics.recall import group_recall, warn_missing
from lightning_fairprune.diagnostics.sharded_pass import FiniteDifference
from lightning_fairprune.distributed import local_tensor

__all__ = [
    "GroupDirectional",
    "GroupGradients",
    "GroupHessianTrace",
    "GroupMeasurement",
    "group_directional",
    "group_gradient_norms",
    "group_hessian_lambda_max",
    "group_hessian_trace",
    "measure_groups",
    "predicted_excess_loss",
]

Directions = Mapping[str, Tensor]


# --------------------------------------------------------------------------- results


@dataclass
class GroupGradients:
    """Result of `group_gradient_norms` (float64, CPU, indexed by group id).

    Attributes:
        norms: ‖∇ J_a‖, the norm of the gradient of each group's mean loss; NaN if missing.
        loss_sums: sum of per-sample losses of each group.
        counts: number of samples of each group.
    """

    norms: Tensor
    loss_sums: Tensor
    counts: Tensor

    @property
    def mean_loss(self) -> Tensor:
        """Mean loss J_a per group (NaN for missing groups)."""
        return safe_div(self.loss_sums, self.counts)


@dataclass
class GroupHessianTrace:
    """Result of `group_hessian_trace` (float64, CPU, indexed by group id).

    Attributes:
        trace: Hutchinson estimate of Tr(H_a), H_a the Hessian of group a's mean loss.
        stderr: standard error of the estimate over probes (NaN with one probe).
        num_probes: number of probes used.
        lambda_max: largest-magnitude eigenvalue of H_a by power iteration, or None.
        counts: number of samples of each group.
        probe_values: ``[G, K]`` values v_kᵀ H_a v_k of every probe.
    """

    trace: Tensor
    stderr: Tensor
    num_probes: int
    lambda_max: Tensor | None
    counts: Tensor
    probe_values: Tensor


@dataclass
class GroupDirectional:
    """Result of `group_directional` (float64, CPU, indexed by group id).

    Attributes:
        linear: ``[G, K]`` g_aᵀd_k, g_a the gradient of group a's *mean* loss (NaN if missing).
        quadratic: ``[G, K]`` d_kᵀH_a d_k (NaN if missing).
        counts: ``[G]`` samples per group (all processes).
        eps: ``[K]`` the finite-difference step ε_k along each direction (FSDP2 backend), or
            None (double backward, exact).
        gate_mode: how the gates of the finite differences ran: ``"stored"`` (frozen gates
            of all the data held), ``"per_chunk"`` (recomputed per chunk, see
            ``gate_memory``) or ``"live"``; None with double backward.
    """

    linear: Tensor
    quadratic: Tensor
    counts: Tensor
    eps: Tensor | None = None
    gate_mode: str | None = None


@dataclass
class GroupMeasurement:
    """Result of `measure_groups` (float64, CPU, indexed by group id; None = not measured).

    Attributes:
        support: ``[G, C]`` sample counts per (group, class).
        correct: ``[G, C]`` correct predictions per (group, class).
        loss_sums: ``[G]`` sums of per-sample losses.
        counts: ``[G]`` samples per group.
        recall: ``[G]`` group recall (accuracy within the group); NaN if missing.
        accuracy: overall accuracy.
        mean_loss: ``[G]`` mean loss per group; NaN if missing.
        grad_norms: ``[G]`` ‖∇ J_a‖, or None.
        hessian_trace: ``[G]`` Hutchinson Tr(H_a), or None.
        hessian_trace_stderr: ``[G]`` its standard error, or None.
        num_probes: probes used for the trace (0 = none).
        predicted_excess_loss: ``[G]`` g_aᵀδ + ½ δᵀH_aδ, or None.
        hessian_lambda_max: ``[G]`` top Hessian eigenvalue (``lambda_max_iterations``), or
            None.
        confusion: ``[G, C, C]`` counts of (group, target class, predicted class), the input
            of `lightning_fairprune.diagnostics.group_metrics` (TPR, FPR, selection rate...).
    """

    support: Tensor
    correct: Tensor
    loss_sums: Tensor
    counts: Tensor
    recall: Tensor
    accuracy: float
    mean_loss: Tensor
    grad_norms: Tensor | None = None
    hessian_trace: Tensor | None = None
    hessian_trace_stderr: Tensor | None = None
    num_probes: int = 0
    predicted_excess_loss: Tensor | None = None
    hessian_lambda_max: Tensor | None = None
    confusion: Tensor | None = None

    @property
    def missing(self) -> list[int]:
        """Ids of the groups without samples."""
        return (self.counts <= 0).nonzero().flatten().tolist()


# --------------------------------------------------------------------------- helpers


def _options(
    finite_difference: Any,
    named: list[tuple[str, Tensor]],
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    reduce_fn: ReduceFn | None,
    chunk_size: int | None,
    strategy: str = "auto",
    max_memory: int | None = None,
    num_probes: int = 1,
) -> PassOptions:
    """The pass options of an estimator (strategy and probe batching: plain backend only)."""
    if finite_difference is not None and not isinstance(finite_difference, FiniteDifference):
        raise TypeError(
            "Expected `finite_difference` to be None or a FiniteDifference, but got "
            f"{type(finite_difference).__name__}"
        )
    ref = named[0][1]
    size = sum(p.numel() for _, p in named)
    return PassOptions(
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        reduce_fn=reduce_fn,
        chunk_size=chunk_size,
        batched=resolve_strategy(strategy, ref),
        probe_batch=probe_batch(max_memory, size, ref, num_probes),
    )


def _trace_stats(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error over probes (dim 1) of ``[G, K]`` values."""
    k = values.shape[1]
    trace = values.mean(1)
    if k < 2:
        return trace, torch.full_like(trace, math.nan)
    return trace, values.std(1, correction=1) / math.sqrt(k)


def _power_iteration(
    backend: Backend, num_groups: int, iterations: int, seed: int
) -> tuple[Tensor, Tensor]:
    """λ_max(H_a) for all groups (NaN for groups without samples): one pass per iteration.

    The start vector of group a is row a of ``rademacher_probes(G, P, seed + 1)`` divided by
    √P (each process builds its columns); then v_a ← H_a v_a / ‖H_a v_a‖ with the Rayleigh
    quotient v_aᵀ H_a v_a as the estimate. Returns λ_max and the sample counts.
    """
    lam = torch.full((num_groups,), math.nan, dtype=torch.float64)
    counts = torch.zeros(num_groups, dtype=torch.float64)
    if iterations == 0:
        return lam, counts
    # ±1 times the scale is exact: scaling in the parameters' dtype equals scaling in float64
    vecs = backend.probe_rows(num_groups, seed + 1).mul_(1.0 / math.sqrt(max(backend.numel, 1)))
    for _ in range(iterations):
        sums = backend.run(PassRequest(hv_vectors=vecs))
        assert sums.hv_sums is not None
        counts = sums.counts
        n = counts.to(sums.hv_sums.device)
        hv = sums.hv_sums.to(torch.float64).div_(n.clamp_min(1)[:, None])
        lam = backend.dots(hv, vecs)
        lam[counts <= 0] = math.nan
        norm = backend.dots(hv, hv).clamp_min(0).sqrt().to(hv.device)
        ok = (norm > 0) & (n > 0)
        hv = hv.div_(norm.clamp_min(1e-300)[:, None]).to(backend.dtype)
        vecs = torch.where(ok[:, None], hv, vecs)
    return lam, counts


def _gradient_blocks(
    backend: Backend, num_groups: int, max_memory: int | None
) -> list[tuple[int, int] | None]:
    """Group ranges whose ``[G_block, P]`` gradient sums fit ``max_memory`` ([None]: all)."""
    if max_memory is None or not backend.dense_rows:
        return [None]
    row_bytes = backend.size * torch.promote_types(backend.dtype, torch.float32).itemsize
    block = max_memory // row_bytes
    if block < 1:
        raise ValueError(
            f"Expected `max_memory` to hold at least one group's gradient sum ({row_bytes}"
            f" bytes for {backend.size} parameters), but got {max_memory}"
        )
    starts = range(0, num_groups, min(block, num_groups))
    if len(starts) == 1:
        return [None]
    return [(lo, min(num_groups, lo + block)) for lo in starts]


@contextmanager
def _weights_at(
    named: list[tuple[str, Tensor]], pre: Mapping[str, Tensor]
) -> Iterator[dict[str, Tensor]]:
    """The selected parameters set to ``pre``, yielding δ = current − pre; restored after.

    ``pre`` holds local values (``local_tensor(param)``: local shards under FSDP2). The
    current values are put back bit for bit, also on error.
    """
    if not isinstance(pre, Mapping):
        raise TypeError(f"Expected `pre` to be a mapping FQN -> tensor, but got {type(pre)}")
    index = dict(named)
    unknown = [n for n in pre if n not in index]
    if unknown:
        raise ValueError(f"Expected `pre` keys among the selected parameters, but got {unknown}")
    locals_ = {n: local_tensor(index[n]) for n in pre}
    for n, t in locals_.items():
        if tuple(pre[n].shape) != tuple(t.shape):
            raise ValueError(
                f"Expected `pre[{n!r}]` of shape {tuple(t.shape)} (this process's part of the"
                f" parameter), but got {tuple(pre[n].shape)}"
            )
    post = {n: t.detach().clone() for n, t in locals_.items()}
    delta = {n: post[n] - pre[n].to(post[n]) for n in pre}
    try:
        with torch.no_grad():
            for n, t in locals_.items():
                t.copy_(pre[n])
        yield delta
    finally:
        with torch.no_grad():
            for n, t in locals_.items():
                t.copy_(post[n])


def _check_tolerance(tolerance: Any) -> None:
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0
    ):
        raise ValueError(f"Expected `tolerance` to be a positive float, but got {tolerance!r}")


# --------------------------------------------------------------------------- estimators


def group_gradient_norms(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    *,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    chunk_size: int | None = None,
    strategy: str = "auto",
    max_memory: int | None = None,
    finite_difference: FiniteDifference | None = None,
) -> GroupGradients:
    """Norm of the gradient of each group's *mean* loss, accumulated over many batches.

    g_a = ∇_θ J(θ; D_a) = S_a / n_a with S_a the summed per-sample gradient of group a
    (not a mean of per-sample gradient norms). Cost: about one forward+backward over the
    data, whatever the number of groups (see the module docstring). On FSDP2-sharded
    parameters every process runs, per group, ``.backward()`` of its summed group loss in
    lockstep and the squared norms of the local gradient shards are all-reduced: the same
    numbers as on the gathered model and the data of all processes, with no ``[G, P]`` sums.

    Args:
        model: the network; put in eval mode during the measurement, then restored.
        batches: iterable of ``(inputs, targets, groups)`` (or ``(inputs, targets)``:
            groups = targets). ``inputs`` may be a tensor or a tuple/list/dict of tensors.
            Re-iterable on FSDP2-sharded parameters (any number of batches per process).
        num_groups: number of groups G; ids must lie in ``[0, G)``.
        params: parameters to differentiate: a mapping FQN -> parameter, a sequence of FQNs,
            or None for every parameter with ``requires_grad``.
        loss_fn: ``(outputs, targets) -> Tensor[N]`` per-sample losses (default:
            cross-entropy, which also validates the labels).
        forward_fn: ``(model, inputs) -> outputs`` (default ``model(inputs)``).
        reduce_fn: sums a tensor across processes (e.g. an all-reduce); None for one process.
        chunk_size: samples per pure-group chunk (default: the size of the first batch).
        strategy: ``"loop"``: one backward per pure-group chunk (fastest on the CPU);
            ``"batched"``: ``torch.func.vmap`` of the gradient over several padded chunks
            (about 2,048 samples per call; the ``loss_fn`` and model must be vmappable), which
            keeps a GPU busy when chunks are small; ``"auto"``: ``"loop"`` on the CPU,
            ``"batched"`` elsewhere. Same result to float tolerance.
        max_memory: bound in bytes on the ``[G, P]`` gradient sums (``P`` parameters, 4 bytes
            each in float32): groups are measured in blocks of ``max_memory // (4 P)`` with
            one pass over ``batches`` per block (samples of other groups are dropped before
            the forward pass, so the compute stays about one pass; the data is read
            ``ceil(G / block)`` times and must be re-iterable). None: all groups at once.
        finite_difference: options of the FSDP2 backend (``force=True`` runs it on plain
            parameters).

    Returns:
        `GroupGradients` with ``norms``, ``loss_sums`` and ``counts`` per group (NaN norm,
        with one warning, for groups without samples).

    Raises:
        ValueError: bad group ids or labels, non-finite losses, no parameters, no batches.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> res = group_gradient_norms(model, [(x, y, y)], num_groups=2)
        >>> res.norms.shape, res.counts.tolist()
        (torch.Size([2]), [4.0, 4.0])
    """
    check_pass_args(num_groups, chunk_size, batches, 1)
    check_int(max_memory, "max_memory", 1, allow_none=True)
    named = resolve_params(model, params)
    opts = _options(finite_difference, named, loss_fn, forward_fn, reduce_fn, chunk_size, strategy)
    norms, loss_sums, counts = [], [], []
    with open_pass(model, batches, num_groups, named, opts, finite_difference) as backend:
        blocks = _gradient_blocks(backend, num_groups, max_memory)
        check_iterable(batches, len(blocks))
        for block in blocks:
            sums = backend.run(PassRequest(grad_norms=True, group_range=block))
            assert sums.grad_norms is not None
            assert sums.loss_sums is not None
            norms.append(safe_div(sums.grad_norms.cpu(), sums.counts))
            loss_sums.append(sums.loss_sums.cpu())
            counts.append(sums.counts)
            del sums
    all_counts = torch.cat(counts)
    if float(all_counts.sum()) == 0:
        raise ValueError("Expected `batches` to contain at least one sample, but all were empty")
    warn_missing("group_gradient_norms", all_counts <= 0)
    return GroupGradients(norms=torch.cat(norms), loss_sums=torch.cat(loss_sums), counts=all_counts)


def group_hessian_trace(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    *,
    num_probes: int = 16,
    tolerance: float | None = None,
    seed: int = 0,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    power_iterations: int = 0,
    chunk_size: int | None = None,
    max_probes: int | None = None,
    probes: Tensor | None = None,
    strategy: str = "auto",
    max_memory: int | None = None,
    finite_difference: FiniteDifference | None = None,
) -> GroupHessianTrace:
    """Hutchinson estimate of Tr(H_a) per group, H_a the Hessian of group a's mean loss.

    Tr(H_a) ≈ (1/K) Σ_k v_kᵀ H_a v_k with Rademacher probes v_k built on the parameters'
    device by `rademacher_probes` from ``seed`` (bit-identical on every process and device,
    whatever the chunking or sharding; the same probes for every group). Plain parameters:
    per pure-group chunk one forward, one backward with ``create_graph=True``, then K
    Hessian-vector products by double backward reusing the graph, so K probes cost about K
    HVPs over the data. FSDP2-sharded parameters: v_kᵀ H_a v_k by central differences
    (``2 K G`` sharded backward sets, plus ``G`` for the frozen gates), each process building
    only its slice of each probe.

    Args:
        model: the network (eval mode during the measurement, then restored).
        batches: iterable of ``(inputs, targets, groups)``; must be re-iterable (a list or a
            DataLoader) when ``tolerance`` or ``power_iterations`` need several passes, and
            on FSDP2-sharded parameters.
        num_groups: number of groups G.
        num_probes: probes K per pass.
        tolerance: if given, add passes of ``num_probes`` new probes until the relative
            standard error ``stderr / |trace|`` of every present group is at most
            ``tolerance`` or ``max_probes`` probes are used.
        seed: probe seed.
        params: parameters (see `group_gradient_norms`).
        loss_fn: per-sample loss (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        reduce_fn: sums a tensor across processes (None: one process).
        power_iterations: if > 0, also estimate λ_max(H_a) (the eigenvalue of largest
            magnitude) with that many power-iteration passes (`group_hessian_lambda_max`).
        chunk_size: samples per pure-group chunk (default: first batch size).
        max_probes: cap for tolerance mode (default ``16 * num_probes``).
        probes: explicit probe vectors ``[K, P]`` flattened over the selected parameters in
            registration order (plain parameters); overrides ``num_probes``, ``seed`` and
            ``tolerance``. The estimate is the mean of v_kᵀ H_a v_k, unbiased when
            E[v vᵀ] = I: ``sqrt(P)`` times the standard basis (P probes) gives the exact trace.
        strategy: ``"loop"``: one double backward per probe (fastest on the CPU);
            ``"batched"``: all probes of a chunk in one double backward
            (``torch.autograd.grad(..., is_grads_batched=True)``); ``"auto"``: ``"loop"`` on
            the CPU, ``"batched"`` elsewhere. The same probes and estimates either way.
        max_memory: bound in bytes on the batched probes' buffers (probe, HVP and product,
            ``3 · P`` values per probe): probes go through the double backward in groups of
            ``max(1, max_memory // (3 P · itemsize))``. The vmapped backward also holds that
            many copies of the backward's intermediates, so leave headroom. None: all at once.
        finite_difference: options of the FSDP2 backend (see `FiniteDifference`).

    Returns:
        `GroupHessianTrace` (NaN, with one warning, for groups without samples).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> res = group_hessian_trace(model, [(x, y, y)], num_groups=2, num_probes=4)
        >>> res.trace.shape, res.num_probes
        (torch.Size([2]), 4)
    """
    check_pass_args(num_groups, chunk_size, batches, 1)
    check_int(num_probes, "num_probes", 1)
    check_int(power_iterations, "power_iterations", 0)
    _check_tolerance(tolerance)
    max_probes = 16 * num_probes if max_probes is None else check_int(max_probes, "max_probes", 1)
    adaptive = tolerance is not None and probes is None
    check_iterable(batches, 2 if (adaptive or power_iterations) else 1)
    named = resolve_params(model, params)
    opts = _options(finite_difference, named, loss_fn, forward_fn, reduce_fn, chunk_size,
                    strategy, max_memory, num_probes)  # fmt: skip
    values: list[Tensor] = []
    with open_pass(model, batches, num_groups, named, opts, finite_difference) as backend:
        while True:
            used = sum(v.shape[1] for v in values)
            k = num_probes if probes is None else probes.shape[0]
            k = min(k, max_probes - used) if adaptive else k
            request = PassRequest(probes=Probes(k, seed, used) if probes is None else probes)
            sums = backend.run(request)
            assert sums.probe_quads is not None
            counts = sums.counts
            values.append(safe_div(sums.probe_quads.cpu(), counts[:, None]))
            if not adaptive or used + k >= max_probes:
                break
            trace, stderr = _trace_stats(torch.cat(values, 1))
            present = counts > 0
            if bool((stderr[present] / trace[present].abs() <= tolerance).all()):
                break
        lam, _ = _power_iteration(backend, num_groups, power_iterations, seed)
    warn_missing("group_hessian_trace", counts <= 0)
    all_values = torch.cat(values, 1)
    trace, stderr = _trace_stats(all_values)
    return GroupHessianTrace(
        trace=trace,
        stderr=stderr,
        num_probes=all_values.shape[1],
        lambda_max=lam if power_iterations else None,
        counts=counts,
        probe_values=all_values,
    )


def group_hessian_lambda_max(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    chunk_size: int | None = None,
    finite_difference: FiniteDifference | None = None,
) -> Tensor:
    """Dominant eigenvalue of each group's Hessian H_a by power iteration, all groups at once.

    Each iteration is one pass over ``batches`` with one Hessian-vector product per pure-group
    chunk (v_a ← H_a v_a / ‖H_a v_a‖); the estimate is the Rayleigh quotient v_aᵀ H_a v_a,
    i.e. the eigenvalue of largest magnitude (the top curvature of a trained model, where
    negative eigenvalues are small). The start vector of group a is row a of
    ``rademacher_probes(G, P, seed + 1)`` divided by √P (counter-based, identical on every
    process and device, sliceable per shard); with ``reduce_fn`` (or on FSDP2-sharded
    parameters) every process gets the same estimates. On FSDP2-sharded parameters H_a v_a
    is a central difference of sharded gradients with the vectors kept as local shards
    (``2 · iterations · G`` sharded backward sets, each group's alone, plus ``G`` for the
    frozen gates, recorded once).

    Args:
        model: the network (eval mode during the measurement, then restored).
        batches: a re-iterable of ``(inputs, targets, groups)`` or ``(inputs, targets)``.
        num_groups: number of groups G.
        iterations: power iterations (passes over the data), at least 1.
        seed: seed of the start vectors.
        params: parameters spanning the Hessian (see `group_gradient_norms`).
        loss_fn: ``(outputs, targets) -> Tensor[N]`` per-sample losses.
        forward_fn: ``(model, inputs) -> outputs``.
        reduce_fn: sums a tensor across processes; None for one process.
        chunk_size: samples per pure-group chunk.
        finite_difference: options of the FSDP2 backend (see `FiniteDifference`).

    Returns:
        float64 ``[G]`` on the CPU (NaN for groups without samples).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> group_hessian_lambda_max(model, [(x, y, y)], num_groups=2, iterations=5).shape
        torch.Size([2])
    """
    check_pass_args(num_groups, chunk_size, batches, 1)
    check_int(iterations, "iterations", 1)
    check_int(seed, "seed", 0)
    check_iterable(batches, 2 if iterations > 1 else 1)
    named = resolve_params(model, params)
    opts = _options(finite_difference, named, loss_fn, forward_fn, reduce_fn, chunk_size)
    with open_pass(model, batches, num_groups, named, opts, finite_difference) as backend:
        lam, counts = _power_iteration(backend, num_groups, iterations, seed)
    warn_missing("group_hessian_lambda_max", counts <= 0)
    return lam


def group_directional(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    directions: Directions | Sequence[Directions],
    *,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    chunk_size: int | None = None,
    finite_difference: FiniteDifference | None = None,
) -> GroupDirectional:
    """Per group, g_aᵀd and dᵀH_a d along given directions.

    Plain parameters: S_a·d and dᵀH_a d by double backward per pure-group chunk (exact).
    FSDP2-sharded parameters (directions given as this process's *local shards*): the local
    shards move in place to θ ± εd and dᵀH_a d ≈ dᵀ(g_a(θ + εd) − g_a(θ − εd)) / (2ε)
    (central difference: exact for a quadratic loss, O(ε²) otherwise); g_aᵀd comes from the
    gradient at θ itself with frozen gates, else ≈ dᵀ(g_a(θ + εd) + g_a(θ − εd)) / 2. The
    weights are restored bit for bit (also on error). See `FiniteDifference` for the step and
    the gates.

    Args:
        model: the network (eval mode during the measurement, then restored).
        batches: iterable of ``(inputs, targets, groups)`` or ``(inputs, targets)``
            (re-iterable on FSDP2-sharded parameters).
        num_groups: number of groups G.
        directions: one mapping FQN -> d (of ``local_tensor(param)``'s shape: the local shard
            under FSDP2, a DTensor taken by its local shard), or a non-empty sequence of them.
            Parameters not listed have d = 0.
        params: parameters to differentiate (default: the keys of ``directions``).
        loss_fn: ``(outputs, targets) -> Tensor[N]`` per-sample losses (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        reduce_fn: sums a tensor across processes (plain parameters; None: one process).
        chunk_size: samples per chunk (per backward call under FSDP2).
        finite_difference: options of the FSDP2 backend (see `FiniteDifference`).

    Returns:
        `GroupDirectional`, identical on every process (NaN, one warning, for groups without
        samples).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
        >>> d = {"weight": torch.ones(2, 3, dtype=torch.float64)}
        >>> fd = FiniteDifference(force=True)  # central differences, as under FSDP2
        >>> res = group_directional(model, [(x, y, y)], 2, d)
        >>> approx = group_directional(model, [(x, y, y)], 2, d, finite_difference=fd)
        >>> from torch.func import functional_call, hessian
        >>> def loss(w):  # group 0's mean loss as a function of the weight
        ...     out = functional_call(model, {"weight": w, "bias": model.bias}, (x[y == 0],))
        ...     return nn.functional.cross_entropy(out, y[y == 0])
        >>> exact = hessian(loss)(model.weight.detach()).reshape(6, 6).sum()
        >>> bool(torch.isclose(res.quadratic[0, 0], exact, rtol=1e-10))
        True
        >>> bool(torch.isclose(approx.quadratic[0, 0], exact, rtol=1e-6)), approx.gate_mode
        (True, 'stored')
    """
    many = [directions] if isinstance(directions, Mapping) else directions
    if isinstance(many, (str, bytes)) or not isinstance(many, Sequence) or not many:
        raise TypeError(
            "Expected `directions` to be a mapping FQN -> tensor or a non-empty sequence of "
            f"them, but got {type(directions).__name__}"
        )
    check_pass_args(num_groups, chunk_size, batches, 1)
    if params is None:
        params = list(dict.fromkeys(n for m in many if isinstance(m, Mapping) for n in m))
    named = resolve_params(model, params)
    opts = _options(finite_difference, named, loss_fn, forward_fn, reduce_fn, chunk_size)
    with open_pass(model, batches, num_groups, named, opts, finite_difference) as backend:
        sums = backend.run(PassRequest(directions=local_directions(named, many, "directions")))
    assert sums.dir_lin is not None
    assert sums.dir_quad is not None
    warn_missing("group_directional", sums.counts <= 0)
    return GroupDirectional(
        linear=safe_div(sums.dir_lin.cpu(), sums.counts[:, None]),
        quadratic=safe_div(sums.dir_quad.cpu(), sums.counts[:, None]),
        counts=sums.counts,
        eps=sums.steps,
        gate_mode=sums.gate_mode,
    )


def predicted_excess_loss(
    model: nn.Module,
    batches: Iterable[Any],
    delta: Mapping[str, Tensor] | None,
    num_groups: int,
    *,
    pre: Mapping[str, Tensor] | None = None,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    chunk_size: int | None = None,
    finite_difference: FiniteDifference | None = None,
) -> Tensor:
    """Second-order prediction of each group's excess loss for a weight change δ.

    R̂(a) = g_aᵀδ + ½ δᵀ H_a δ at weights θ*, with one Hessian-vector product per chunk on
    plain parameters, by central differences on FSDP2-sharded ones (`group_directional`).
    Either ``delta`` (δ = θ̄ − θ*, the weights removed by pruning, with sign, measured at the
    current weights θ*) or ``pre`` (the weights before a pruning round: δ = current − pre,
    measured at ``pre``; the parameters are set to ``pre`` for the measurement and their
    current values restored bit for bit, also on error).

    Args:
        model: the network (eval mode during the measurement, then restored).
        batches: iterable of ``(inputs, targets, groups)``.
        delta: FQN -> change of that parameter (``local_tensor(param)``'s shape); parameters
            not listed have δ = 0. None when ``pre`` is given.
        num_groups: number of groups G.
        pre: FQN -> the parameter's (local) values before the step.
        params: parameters to differentiate (default: the keys of ``delta`` or ``pre``).
        loss_fn: per-sample loss (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        reduce_fn: sums a tensor across processes (None: one process).
        chunk_size: samples per pure-group chunk.
        finite_difference: options of the FSDP2 backend (see `FiniteDifference`).

    Returns:
        float64 ``[G]`` (NaN, with one warning, for groups without samples).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> delta = {"weight": -0.1 * model.weight.detach()}
        >>> pred = predicted_excess_loss(model, [(x, y, y)], delta, num_groups=2)
        >>> pre = {"weight": model.weight.detach().clone()}
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(0.9)  # the step, taken
        >>> after = predicted_excess_loss(model, [(x, y, y)], None, num_groups=2, pre=pre)
        >>> pred.shape, bool(torch.allclose(pred, after)), torch.equal(model.weight, 0.9 * pre["weight"])
        (torch.Size([2]), True, True)
    """  # noqa: E501
    if (delta is None) == (pre is None):
        raise ValueError("Expected exactly one of `delta` and `pre`, but got both or neither")
    given = delta if delta is not None else pre
    if not isinstance(given, Mapping):
        name = "delta" if delta is not None else "pre"
        raise TypeError(
            f"Expected `{name}` to be a mapping FQN -> tensor, but got {type(given).__name__}"
        )
    check_pass_args(num_groups, chunk_size, batches, 1)
    named = resolve_params(model, list(given.keys()) if params is None else params)
    opts = _options(finite_difference, named, loss_fn, forward_fn, reduce_fn, chunk_size)
    swap = _weights_at(named, pre) if pre is not None else contextlib.nullcontext(delta)
    with swap as step:
        parts = local_directions(named, [step], "delta")
        with open_pass(model, batches, num_groups, named, opts, finite_difference) as backend:
            sums = backend.run(PassRequest(directions=parts))
    assert sums.dir_lin is not None
    assert sums.dir_quad is not None
    warn_missing("predicted_excess_loss", sums.counts <= 0)
    return safe_div((sums.dir_lin[:, 0] + 0.5 * sums.dir_quad[:, 0]).cpu(), sums.counts)


def measure_groups(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    num_classes: int | None,
    *,
    params: ParamsArg = None,
    num_probes: int = 0,
    delta: Mapping[str, Tensor] | None = None,
    pre: Mapping[str, Tensor] | None = None,
    lambda_max_iterations: int = 0,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    gradients: bool = True,
    chunk_size: int | None = None,
    probes: Tensor | None = None,
    strategy: str = "auto",
    max_memory: int | None = None,
    finite_difference: FiniteDifference | None = None,
) -> GroupMeasurement:
    """Everything per group: counts, recall, losses, ‖g_a‖, Tr(H_a), λ_max, R̂(a).

    On plain parameters each pure-group chunk gets one forward (logits for the counts and
    the losses), one backward (gradient sums), and, when asked, ``num_probes`` HVPs for the
    trace and one HVP with ``delta`` for the predicted excess loss, all in ONE pass reusing
    the same graph; λ_max adds ``lambda_max_iterations`` passes and ``pre`` one pass at the
    pre-round weights. With ``gradients=False``, ``num_probes=0`` and no ``delta``/``pre`` it
    is a plain no-grad evaluation of whole batches. On FSDP2-sharded parameters: a forward-only
    pass (the same number of batches on every process, checked), the lockstep gradient norms
    and the curvature by central differences (frozen gates recorded once for the trace and
    λ_max); the results equal those of the gathered model on all processes' data (the
    curvature to finite-difference accuracy).

    Args:
        model: the network (eval mode during the measurement, then restored).
        batches: iterable of ``(inputs, targets, groups)`` (or ``(inputs, targets)``).
        num_groups: number of groups G.
        num_classes: number of classes C (None: the logits' width).
        params: parameters for the gradient/curvature work (default: all trainable).
        num_probes: Hutchinson probes (0: no Hessian trace).
        delta: FQN -> weight change for the predicted excess loss at the current weights.
        pre: FQN -> the weights before a pruning round: the predicted excess loss of the step
            to the current weights, measured at ``pre`` (see `predicted_excess_loss`).
        lambda_max_iterations: power iterations for λ_max(H_a) (0: none).
        seed: probe and start-vector seed.
        loss_fn: per-sample loss (default cross-entropy).
        forward_fn: ``(model, inputs) -> logits``.
        reduce_fn: sums a tensor across processes (None: one process).
        gradients: measure the per-group gradient norms.
        chunk_size: samples per pure-group chunk.
        probes: explicit probes ``[K, P]`` (overrides ``num_probes`` and ``seed``).
        strategy: ``"auto"``, ``"loop"`` or ``"batched"`` (see `group_gradient_norms` and
            `group_hessian_trace`; the vmapped gradients apply when no probes or ``delta``
            are asked for).
        max_memory: bound on the batched probes' buffers (see `group_hessian_trace`).
        finite_difference: options of the FSDP2 backend (see `FiniteDifference`).

    Returns:
        `GroupMeasurement`; missing groups are NaN (one warning per call).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> m = measure_groups(model, [(x, y, y)], num_groups=2, num_classes=2, num_probes=2,
        ...                    lambda_max_iterations=3)
        >>> m.support.sum().item(), m.grad_norms.shape, m.hessian_trace.shape
        (8.0, torch.Size([2]), torch.Size([2]))
        >>> m.hessian_lambda_max.shape
        torch.Size([2])
    """
    check_pass_args(num_groups, chunk_size, batches, 1 + lambda_max_iterations + (pre is not None))
    check_int(num_classes, "num_classes", 1, allow_none=True)
    check_int(num_probes, "num_probes", 0)
    check_int(lambda_max_iterations, "lambda_max_iterations", 0)
    if delta is not None and pre is not None:
        raise ValueError("Expected at most one of `delta` and `pre`, but got both")
    named = resolve_params(model, params)
    opts = _options(finite_difference, named, loss_fn, forward_fn, reduce_fn, chunk_size,
                    strategy, max_memory, max(1, num_probes))  # fmt: skip
    request = PassRequest(class_counts=True, num_classes=num_classes, grad_norms=gradients)
    if probes is not None or num_probes > 0:
        request.probes = probes if probes is not None else Probes(num_probes, seed)
    if delta is not None:
        request.directions = local_directions(named, [delta], "delta")
    with open_pass(model, batches, num_groups, named, opts, finite_difference) as backend:
        sums = backend.run(request)
        lam, _ = _power_iteration(backend, num_groups, lambda_max_iterations, seed)
    warn_missing("measure_groups", sums.counts <= 0)
    result = _measurement(sums, lam if lambda_max_iterations else None)
    if pre is not None:
        with warnings.catch_warnings():  # absent groups were reported above
            warnings.simplefilter("ignore", UserWarning)
            result.predicted_excess_loss = predicted_excess_loss(
                model, batches, None, num_groups, pre=pre, params=params, loss_fn=loss_fn,
                forward_fn=forward_fn, reduce_fn=reduce_fn, chunk_size=chunk_size,
                finite_difference=finite_difference,
            )  # fmt: skip
    return result


def _measurement(sums: Any, lambda_max: Tensor | None) -> GroupMeasurement:
    """`GroupMeasurement` from the sums of one `measure_groups` pass."""
    counts = sums.counts
    support, correct = sums.class_counts()
    result = GroupMeasurement(
        support=support,
        correct=correct,
        loss_sums=sums.loss_sums.cpu(),
        counts=counts,
        recall=group_recall(support, correct, warn=False),
        accuracy=_accuracy(support, correct),
        mean_loss=safe_div(sums.loss_sums.cpu(), counts),
        confusion=sums.confusion.cpu(),
        hessian_lambda_max=lambda_max,
    )
    if sums.grad_norms is not None:
        result.grad_norms = safe_div(sums.grad_norms.cpu(), counts)
    if sums.probe_quads is not None:
        values = safe_div(sums.probe_quads.cpu(), counts[:, None])
        result.hessian_trace, result.hessian_trace_stderr = _trace_stats(values)
        result.num_probes = values.shape[1]
    if sums.dir_lin is not None:
        pred = sums.dir_lin[:, 0] + 0.5 * sums.dir_quad[:, 0]
        result.predicted_excess_loss = safe_div(pred.cpu(), counts)
    return result
