"""Per-group gradient norms, Hessian traces and predicted excess loss (methods.md section 4).

For every group ``a`` with ``n_a`` samples, J_a(θ) is the group's *mean* loss. This module
measures at the model's current weights:

* ‖g_a‖ with g_a = ∇J_a = S_a / n_a, S_a the sum of per-sample gradients of group ``a``;
* Tr(H_a) by Hutchinson, mean over Rademacher probes v_k of v_kᵀ H_a v_k, with its standard
  error over probes; optionally λ_max(H_a) by power iteration;
* the predicted excess loss g_aᵀδ + ½ δᵀ H_a δ of a weight change δ.

How it stays cheap: samples are regrouped across batches into *pure-group chunks* of
``chunk_size`` samples (default: the size of the first batch). Each chunk gets one forward
pass and one backward of its summed loss (kept with ``create_graph=True`` when curvature is
needed); the K Hessian-vector products of the Hutchinson probes reuse that graph by double
backward. Every sample is therefore processed once, in full-size chunks, however many groups
there are: about one forward+backward over the data for the gradient norms, about K HVPs for
the trace. The price is memory: samples waiting for their group's chunk to fill (at most
``num_groups * chunk_size`` samples) and one flat gradient sum per group (``[G, P]``).

All accumulators are sums (per-group gradient sums, loss sums, counts, vᵀHv sums), so
``reduce_fn`` (a function summing a tensor across processes, e.g. an all-reduce) turns
per-process sums into global ones: N processes with the same probes give the numbers of one
process over all the data.

The model is put in eval mode (normalization layers use their running statistics, dropout
off) and its modes restored afterwards; gradients are taken with `torch.autograd.grad`, so
``.grad`` of every parameter is left untouched. Parameters selected while having
``requires_grad=False`` are enabled for the measurement and restored.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.diagnostics._batching import (
    Nested,
    Regrouper,
    check_groups,
    check_targets,
    default_forward,
    default_loss,
    first_tensor,
    split_batch,
    tree_map,
)
from lightning_fairprune.diagnostics.recall import accuracy as _accuracy
from lightning_fairprune.diagnostics.recall import group_recall

__all__ = [
    "GroupGradients",
    "GroupHessianTrace",
    "GroupMeasurement",
    "group_gradient_norms",
    "group_hessian_trace",
    "measure_groups",
    "predicted_excess_loss",
    "rademacher_probes",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
ForwardFn = Callable[[nn.Module, Nested], Tensor]
ReduceFn = Callable[[Tensor], Tensor]
ParamsArg = Mapping[str, Tensor] | Sequence[str] | None


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
        return _safe_div(self.loss_sums, self.counts)


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
        hessian_lambda_max: ``[G]`` top Hessian eigenvalue (filled by callers that run
            `group_hessian_lambda_max`, e.g. `FairnessMonitor`), or None.
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

    @property
    def missing(self) -> list[int]:
        """Ids of the groups without samples."""
        return (self.counts <= 0).nonzero().flatten().tolist()


# --------------------------------------------------------------------------- helpers


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    den = den.to(torch.float64)
    missing = den <= 0
    out = num.to(torch.float64) / torch.where(missing, torch.ones_like(den), den)
    return torch.where(missing, torch.full_like(out, math.nan), out)


def _warn_missing(fn: str, counts: Tensor) -> None:
    ids = (counts <= 0).nonzero().flatten().tolist()
    if ids:
        warnings.warn(
            f"{fn}: group(s) {ids} have no samples in `batches`; reported as missing (NaN).",
            UserWarning,
            stacklevel=3,
        )


def _check_positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        kind = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"Expected `{name}` to be {kind}, but got {value!r}")


def _resolve_params(model: nn.Module, params: ParamsArg) -> list[tuple[str, Tensor]]:
    """Selected (FQN, parameter) pairs in the model's registration order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model)}")
    named = dict(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named.items() if p.requires_grad]
    else:
        if isinstance(params, Mapping):
            wanted = list(params.keys())
            for name, value in params.items():
                if name in named and value is not named[name]:
                    raise ValueError(
                        f"Expected `params[{name!r}]` to be the model's parameter {name!r}, but"
                        " got a different tensor"
                    )
        elif isinstance(params, str) or not isinstance(params, Sequence):
            raise TypeError(
                "Expected `params` to be None, a mapping FQN -> parameter or a sequence of"
                f" parameter names, but got {type(params).__name__}"
            )
        else:
            wanted = list(params)
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise ValueError(
                f"Expected `params` to name parameters of `model`, but got unknown {unknown}"
            )
        order = {n: i for i, n in enumerate(named)}
        chosen = [(n, named[n]) for n in sorted(set(wanted), key=order.__getitem__)]
    if not chosen:
        raise ValueError(
            "Expected at least one parameter to be selected (`params`, or model parameters with"
            f" requires_grad=True), but got none (params={params!r})"
        )
    return chosen


@contextmanager
def _measurement_mode(model: nn.Module, params: list[Tensor]) -> Iterator[None]:
    """Eval mode, grad enabled outside inference mode, selected params requiring grad."""
    modes = [(m, m.training) for m in model.modules()]
    frozen = [p for p in params if not p.requires_grad]
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, mode in modes:
            m.training = mode


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _parts(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [v.view(s) for v, s in zip(flat.split(sizes), shapes, strict=True)]


def _row_norms(rows: Tensor, block_elems: int = 1 << 22) -> Tensor:
    """Euclidean norm of each row of ``[G, P]`` as float64, without a float64 copy.

    Squares are summed in the rows' dtype (torch's reduction sums in blocks, so float32 keeps
    about 1e-7 relative accuracy) a few rows at a time, bounding the temporary to
    ``block_elems`` elements; converting all of ``[G, P]`` to float64 first was 10x slower.
    Rows whose sum of squares overflows, or is small enough for subnormal squares to matter,
    are recomputed in float64.
    """
    if rows.dtype == torch.float64:
        return torch.linalg.vector_norm(rows, dim=1)
    step = max(1, block_elems // max(1, rows.shape[1]))
    sumsq = torch.cat([blk.square().sum(dim=1) for blk in rows.split(step)]).to(torch.float64)
    info = torch.finfo(rows.dtype)
    # squares beyond the dtype's range, or so small that subnormal squares lose accuracy:
    # redo those (rare) rows in float64
    redo = torch.isinf(sumsq) | (sumsq < info.tiny / info.eps * rows.shape[1])
    if bool(redo.any()):
        sumsq[redo] = rows[redo].to(torch.float64).square().sum(dim=1)
    return sumsq.sqrt()


def _apply_reduce(reduce_fn: ReduceFn | None, t: Tensor, name: str) -> Tensor:
    if reduce_fn is None:
        return t
    out = reduce_fn(t)
    if not isinstance(out, Tensor) or out.shape != t.shape:
        raise ValueError(
            f"Expected `reduce_fn` to return a tensor of shape {tuple(t.shape)} (the summed"
            f" {name}), but got {type(out).__name__}"
            + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
        )
    return out


def rademacher_probes(num_probes: int, size: int, seed: int | torch.Generator = 0) -> Tensor:
    """Rademacher (±1) probe vectors ``[num_probes, size]`` from a seeded CPU generator.

    The same seed gives the same probes on every process and device.

    Args:
        num_probes: number of probes K.
        size: length P of each (flattened) probe.
        seed: an int seed, or a CPU `torch.Generator` to continue.

    Returns:
        float32 CPU tensor of ±1 values.

    Example:
        >>> v = rademacher_probes(3, 5, seed=0)
        >>> v.shape, bool((v.abs() == 1).all())
        (torch.Size([3, 5]), True)
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (num_probes, size), generator=gen, dtype=torch.int8)
    return bits.to(torch.float32) * 2 - 1


# --------------------------------------------------------------------------- the engine

_NONFINITE = (
    "Expected finite losses, but `loss_fn` returned NaN or inf (check the model weights and inputs)"
)


@dataclass
class _Sums:
    """Per-process accumulators of one pass (before reduction)."""

    loss_sums: Tensor  # [G] float64
    counts: Tensor  # [G] float64
    grad_sums: Tensor | None = None  # [G, P]
    probe_sums: Tensor | None = None  # [G, K] float64, Σ_chunks vᵀ H_chunk v
    delta_lin: Tensor | None = None  # [G] float64, Σ_chunks S·δ
    delta_quad: Tensor | None = None  # [G] float64, Σ_chunks δᵀ H_chunk δ
    hv_sums: Tensor | None = None  # [G, P] Σ_chunks H_chunk v_a
    support: Tensor | None = None  # [G, C] float64
    correct: Tensor | None = None  # [G, C] float64


def _run_pass(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: list[tuple[str, Tensor]],
    *,
    loss_fn: LossFn | None,
    forward_fn: ForwardFn | None,
    chunk_size: int | None,
    grad_sums: bool = False,
    probes: Tensor | None = None,
    delta: Tensor | None = None,
    hv_vectors: Tensor | None = None,
    num_classes: int | None = None,
    count_classes: bool = False,
) -> tuple[_Sums, int | None]:
    """One pass over ``batches`` accumulating the requested per-group sums."""
    params = [p for _, p in named]
    shapes = [p.shape for p in params]
    device = params[0].device
    dtype = params[0].dtype
    acc_dtype = torch.promote_types(dtype, torch.float32)
    need_graph = probes is not None or delta is not None or hv_vectors is not None
    need_grad = grad_sums or need_graph
    check_labels = loss_fn is None or count_classes
    loss_fn = loss_fn or default_loss
    forward_fn = forward_fn or default_forward
    g_count = num_groups
    size = sum(p.numel() for p in params)

    sums = _Sums(
        loss_sums=torch.zeros(g_count, dtype=torch.float64, device=device),
        counts=torch.zeros(g_count, dtype=torch.float64, device=device),
    )
    if grad_sums:
        sums.grad_sums = torch.zeros(g_count, size, dtype=acc_dtype, device=device)
    if probes is not None:
        sums.probe_sums = torch.zeros(g_count, probes.shape[0], dtype=torch.float64, device=device)
    if delta is not None:
        sums.delta_lin = torch.zeros(g_count, dtype=torch.float64, device=device)
        sums.delta_quad = torch.zeros(g_count, dtype=torch.float64, device=device)
    if hv_vectors is not None:
        sums.hv_sums = torch.zeros(g_count, size, dtype=acc_dtype, device=device)

    def count_update(a_or_groups: int | Tensor, out: Tensor, y: Tensor) -> None:
        nonlocal num_classes
        if not count_classes:
            return
        if out.ndim != 2:
            raise ValueError(
                "Expected the model output to be logits [N, C] to count correct predictions,"
                f" but got shape {tuple(out.shape)}"
            )
        if num_classes is None:
            num_classes = out.shape[1]
        if sums.support is None:
            sums.support = torch.zeros(g_count, num_classes, dtype=torch.float64, device=device)
            sums.correct = torch.zeros_like(sums.support)
        if isinstance(a_or_groups, int):
            cell = y.to(device)
            base = a_or_groups * num_classes
        else:
            cell = a_or_groups.to(device) * num_classes + y.to(device)
            base = 0
        hit = out.detach().argmax(1).to(device) == y.to(device)
        total = g_count * num_classes
        expect = total if base == 0 else num_classes
        sup = torch.bincount(cell, minlength=expect)
        if sup.numel() > expect:
            raise ValueError(
                f"Expected class labels in [0, {num_classes}) in `targets`, but got"
                f" {sup.numel() - 1 if base == 0 else int(cell.max())}"
            )
        cor = torch.bincount(cell[hit], minlength=expect)
        sums.support.view(-1)[base : base + sup.numel()] += sup.to(torch.float64)
        sums.correct.view(-1)[base : base + cor.numel()] += cor.to(torch.float64)

    def losses_of(out: Tensor, y: Tensor, n: int) -> Tensor:
        losses = loss_fn(out, y)
        if not isinstance(losses, Tensor) or losses.shape != (n,):
            raise ValueError(
                f"Expected `loss_fn` to return per-sample losses of shape [{n}], but got"
                f" {tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)}"
            )
        return losses

    def hvp(grads: list[Tensor], vec_parts: list[Tensor]) -> Tensor:
        idx = [i for i, g in enumerate(grads) if g.requires_grad]
        if not idx:
            return torch.zeros(size, dtype=dtype, device=device)
        hv = torch.autograd.grad(
            [grads[i] for i in idx],
            params,
            grad_outputs=[vec_parts[i] for i in idx],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return _flat(hv)

    probe_rows = None
    if probes is not None:
        probe_rows = [(row, _parts(row, shapes)) for row in probes]
    delta_parts = _parts(delta, shapes) if delta is not None else None

    def process_chunk(a: int, x: Nested, y: Tensor) -> None:
        n = y.shape[0]
        out = forward_fn(model, x)
        losses = losses_of(out, y, n)
        total = losses.sum()
        chunk_losses.append(total.detach())
        chunk_groups.append(a)
        host_counts[a] += n
        count_update(a, out, y)
        grads = list(
            torch.autograd.grad(
                total, params, create_graph=need_graph, allow_unused=True, materialize_grads=True
            )
        )
        if not need_graph:
            if a not in grad_views:
                grad_views[a] = _parts(sums.grad_sums[a], shapes)
            if acc_dtype == dtype:
                torch._foreach_add_(grad_views[a], grads)
            else:
                sums.grad_sums[a] += _flat(grads).to(acc_dtype)
            return
        flat_g = _flat(grads).detach()
        if grad_sums:
            sums.grad_sums[a] += flat_g.to(acc_dtype)
        if probe_rows is not None:
            vals = [torch.dot(hvp(grads, parts), row) for row, parts in probe_rows]
            sums.probe_sums[a] += torch.stack(vals).to(torch.float64)
        if delta is not None:
            sums.delta_lin[a] += torch.dot(flat_g, delta).to(torch.float64)
            sums.delta_quad[a] += torch.dot(hvp(grads, delta_parts), delta).to(torch.float64)
        if hv_vectors is not None:
            vec = hv_vectors[a]
            sums.hv_sums[a] += hvp(grads, _parts(vec, shapes)).to(acc_dtype)

    chunk_losses: list[Tensor] = []
    chunk_groups: list[int] = []
    host_counts = [0] * g_count
    grad_views: dict[int, list[Tensor]] = {}
    regrouper: Regrouper | None = None
    seen_batches = 0
    for batch in batches:
        seen_batches += 1
        x, y, g = split_batch(batch)
        n = y.shape[0] if y.ndim else 0
        check_groups(g, num_groups, n)
        if check_labels:
            check_targets(y, n, num_classes)
        if n == 0:
            continue
        lead = first_tensor(x)
        if lead.shape[0] != n:
            raise ValueError(
                f"Expected inputs with {n} samples (as many as targets), but got first dim"
                f" {lead.shape[0]}"
            )
        x = tree_map(lambda t: t.to(device), x)
        y, g = y.to(device), g.to(device)
        if not need_grad:
            with torch.no_grad():
                out = forward_fn(model, x)
                losses = losses_of(out, y, n)
                sums.loss_sums.index_add_(0, g, losses.to(torch.float64))
                sums.counts += torch.bincount(g, minlength=g_count).to(torch.float64)
                if not bool(torch.isfinite(losses).all()):
                    raise ValueError(_NONFINITE)
                count_update(g, out, y)
            continue
        if regrouper is None:
            regrouper = Regrouper(num_groups, chunk_size or n)
        for a, cx, cy in regrouper.push(x, y, g):
            process_chunk(a, cx, cy)
    if seen_batches == 0:
        raise ValueError("Expected `batches` to yield at least one batch, but it yielded none")
    if regrouper is not None:
        for a, cx, cy in regrouper.flush():
            process_chunk(a, cx, cy)
    if chunk_losses:
        idx = torch.tensor(chunk_groups, device=device)
        sums.loss_sums.index_add_(0, idx, torch.stack(chunk_losses).to(torch.float64))
        sums.counts += torch.tensor(host_counts, dtype=torch.float64, device=device)
    if not bool(torch.isfinite(sums.loss_sums).all()):
        raise ValueError(_NONFINITE)
    if float(sums.counts.sum()) == 0:
        raise ValueError("Expected `batches` to contain at least one sample, but all were empty")
    return sums, num_classes


def _check_pass_args(num_groups: int, chunk_size: int | None, batches: Any) -> None:
    """Validate the arguments every pass-based function shares."""
    _check_positive_int("num_groups", num_groups)
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    _check_iterable(batches, 1)


def _single_pass(
    name: str,
    model: nn.Module,
    batches: Any,
    num_groups: int,
    named: Any,
    reduce_fn: Any,
    **pass_kwargs: Any,
) -> tuple[Any, Tensor]:
    """One measured pass, reduced across processes; warns about groups with no samples."""
    with _measurement_mode(model, [p for _, p in named]):
        sums, _ = _run_pass(model, batches, num_groups, named, **pass_kwargs)
    sums = _reduce_sums(sums, reduce_fn)
    counts = sums.counts.cpu()
    _warn_missing(name, counts)
    return sums, counts


def _reduce_sums(sums: _Sums, reduce_fn: ReduceFn | None) -> _Sums:
    """Sum every accumulator across processes (one call for all float64 scalars)."""
    if reduce_fn is None:
        return sums
    small = [
        (name, getattr(sums, name))
        for name in (
            "loss_sums",
            "counts",
            "probe_sums",
            "delta_lin",
            "delta_quad",
            "support",
            "correct",
        )
        if getattr(sums, name) is not None
    ]
    packed = torch.cat([t.reshape(-1) for _, t in small])
    packed = _apply_reduce(reduce_fn, packed, "float64 sums")
    offset = 0
    for name, t in small:
        setattr(sums, name, packed[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    for name in ("grad_sums", "hv_sums"):
        t = getattr(sums, name)
        if t is not None:
            setattr(sums, name, _apply_reduce(reduce_fn, t, name))
    return sums


def _check_iterable(batches: Any, passes: int) -> None:
    if not isinstance(batches, Iterable):
        raise TypeError(
            f"Expected `batches` to be an iterable of (inputs, targets, groups), but got"
            f" {type(batches).__name__}"
        )
    if passes > 1 and iter(batches) is batches:
        raise ValueError(
            "Expected `batches` to be re-iterable (a list or a DataLoader) because this"
            f" measurement needs {passes} passes, but got a one-shot iterator"
            f" ({type(batches).__name__})"
        )


def _flat_delta(delta: Mapping[str, Tensor], named: list[tuple[str, Tensor]]) -> Tensor:
    if not isinstance(delta, Mapping):
        raise TypeError(
            f"Expected `delta` to be a mapping FQN -> tensor, but got {type(delta).__name__}"
        )
    names = {n for n, _ in named}
    extra = [k for k in delta if k not in names]
    if extra:
        raise ValueError(
            f"Expected `delta` keys among the selected parameters, but got unknown {extra}"
        )
    parts = []
    for n, p in named:
        d = delta.get(n)
        if d is None:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            continue
        if tuple(d.shape) != tuple(p.shape):
            raise ValueError(
                f"Expected `delta[{n!r}]` of shape {tuple(p.shape)}, but got {tuple(d.shape)}"
            )
        parts.append(d.detach().reshape(-1).to(device=p.device, dtype=p.dtype))
    return torch.cat(parts)


def _probe_matrix(
    probes: Tensor | None, num_probes: int, gen: torch.Generator, size: int, ref: Tensor
) -> Tensor:
    if probes is None:
        return rademacher_probes(num_probes, size, gen).to(device=ref.device, dtype=ref.dtype)
    if not isinstance(probes, Tensor) or probes.ndim != 2 or probes.shape[1] != size:
        raise ValueError(
            f"Expected `probes` to be a tensor [K, {size}] (flattened over the selected"
            " parameters), but got"
            f" {tuple(probes.shape) if isinstance(probes, Tensor) else type(probes)}"
        )
    return probes.to(device=ref.device, dtype=ref.dtype)


def _trace_stats(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error over probes (dim 1) of ``[G, K]`` values."""
    k = values.shape[1]
    trace = values.mean(1)
    if k < 2:
        return trace, torch.full_like(trace, math.nan)
    return trace, values.std(1, correction=1) / math.sqrt(k)


# --------------------------------------------------------------------------- public API


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
) -> GroupGradients:
    """Norm of the gradient of each group's *mean* loss, accumulated over many batches.

    g_a = ∇_θ J(θ; D_a) = S_a / n_a with S_a the summed per-sample gradient of group a
    (not a mean of per-sample gradient norms). Cost: about one forward+backward over the
    data, whatever the number of groups (see the module docstring).

    Args:
        model: the network; put in eval mode during the measurement, then restored.
        batches: iterable of ``(inputs, targets, groups)`` (or ``(inputs, targets)``:
            groups = targets). ``inputs`` may be a tensor or a tuple/list/dict of tensors.
        num_groups: number of groups G; ids must lie in ``[0, G)``.
        params: parameters to differentiate: a mapping FQN -> parameter, a sequence of FQNs,
            or None for every parameter with ``requires_grad``.
        loss_fn: ``(outputs, targets) -> Tensor[N]`` per-sample losses (default:
            cross-entropy, which also validates the labels).
        forward_fn: ``(model, inputs) -> outputs`` (default ``model(inputs)``).
        reduce_fn: sums a tensor across processes (e.g. an all-reduce); None for one process.
        chunk_size: samples per pure-group chunk (default: the size of the first batch).

    Returns:
        `GroupGradients` with ``norms``, ``loss_sums`` and ``counts`` per group (NaN norm,
        with one warning, for groups without samples).

    Raises:
        ValueError: bad group ids or labels, non-finite losses, no parameters, no batches.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> res = group_gradient_norms(model, [(x, y, y)], num_groups=2)
        >>> res.norms.shape, res.counts.tolist()
        (torch.Size([2]), [4.0, 4.0])
    """
    _check_pass_args(num_groups, chunk_size, batches)
    named = _resolve_params(model, params)
    sums, counts = _single_pass(
        "group_gradient_norms",
        model,
        batches,
        num_groups,
        named,
        reduce_fn,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        chunk_size=chunk_size,
        grad_sums=True,
    )
    norms = _safe_div(_row_norms(sums.grad_sums).cpu(), counts)
    return GroupGradients(norms=norms, loss_sums=sums.loss_sums.cpu(), counts=counts)


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
) -> GroupHessianTrace:
    """Hutchinson estimate of Tr(H_a) per group, H_a the Hessian of group a's mean loss.

    Tr(H_a) ≈ (1/K) Σ_k v_kᵀ H_a v_k with Rademacher probes v_k drawn from a CPU generator
    seeded with ``seed`` (identical on every process; the same probes for every group).
    Per pure-group chunk: one forward, one backward with ``create_graph=True``, then K
    Hessian-vector products by double backward reusing the graph, so K probes cost about K
    HVPs over the data in total.

    Args:
        model: the network (eval mode during the measurement, then restored).
        batches: iterable of ``(inputs, targets, groups)``; must be re-iterable (a list or a
            DataLoader) when ``tolerance`` or ``power_iterations`` need several passes.
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
            magnitude) with that many power-iteration passes over the data.
        chunk_size: samples per pure-group chunk (default: first batch size).
        max_probes: cap for tolerance mode (default ``16 * num_probes``).
        probes: explicit probe vectors ``[K, P]`` flattened over the selected parameters in
            registration order; overrides ``num_probes``, ``seed`` and ``tolerance``. The
            estimate is the mean of v_kᵀ H_a v_k, unbiased when E[v vᵀ] = I: ``sqrt(P)``
            times the standard basis (P probes) gives the exact trace.

    Returns:
        `GroupHessianTrace` (NaN, with one warning, for groups without samples).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> res = group_hessian_trace(model, [(x, y, y)], num_groups=2, num_probes=4)
        >>> res.trace.shape, res.num_probes
        (torch.Size([2]), 4)
    """
    _check_positive_int("num_groups", num_groups)
    _check_positive_int("num_probes", num_probes)
    _check_positive_int("power_iterations", power_iterations, allow_zero=True)
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0
    ):
        raise ValueError(f"Expected `tolerance` to be a positive float, but got {tolerance!r}")
    if max_probes is None:
        max_probes = 16 * num_probes
    else:
        _check_positive_int("max_probes", max_probes)
    adaptive = tolerance is not None and probes is None
    _check_iterable(batches, 2 if (adaptive or power_iterations) else 1)
    named = _resolve_params(model, params)
    ref = named[0][1]
    size = sum(p.numel() for _, p in named)
    gen = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = dict(loss_fn=loss_fn, forward_fn=forward_fn, chunk_size=chunk_size)

    values: list[Tensor] = []
    counts = None
    with _measurement_mode(model, [p for _, p in named]):
        used = 0
        while True:
            k = num_probes if probes is None else probes.shape[0]
            if adaptive:
                k = min(k, max_probes - used)
            pm = _probe_matrix(probes, k, gen, size, ref)
            sums, _ = _run_pass(model, batches, num_groups, named, probes=pm, **kw)
            sums = _reduce_sums(sums, reduce_fn)
            counts = sums.counts.cpu()
            values.append(_safe_div(sums.probe_sums.cpu(), counts[:, None]))
            used += k
            if not adaptive or used >= max_probes:
                break
            trace, stderr = _trace_stats(torch.cat(values, 1))
            present = counts > 0
            rel = stderr[present] / trace[present].abs()
            if bool((rel <= tolerance).all()):
                break
        lambda_max = None
        if power_iterations:
            lambda_max, _ = _power_iteration(
                model, batches, num_groups, named, power_iterations, seed, reduce_fn, kw
            )
    _warn_missing("group_hessian_trace", counts)
    all_values = torch.cat(values, 1)
    trace, stderr = _trace_stats(all_values)
    return GroupHessianTrace(
        trace=trace,
        stderr=stderr,
        num_probes=all_values.shape[1],
        lambda_max=lambda_max,
        counts=counts,
        probe_values=all_values,
    )


def _power_iteration(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: list[tuple[str, Tensor]],
    iterations: int,
    seed: int,
    reduce_fn: ReduceFn | None,
    kw: dict[str, Any],
) -> tuple[Tensor, Tensor]:
    """λ_max(H_a) and the sample counts for all groups: one pass per iteration."""
    ref = named[0][1]
    size = sum(p.numel() for _, p in named)
    gen = torch.Generator().manual_seed(seed + 1)
    vecs = torch.randn(num_groups, size, generator=gen, dtype=torch.float64)
    vecs = (vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True)).to(ref.device, ref.dtype)
    lam = torch.full((num_groups,), math.nan, dtype=torch.float64)
    counts = torch.zeros(num_groups, dtype=torch.float64)
    for _ in range(iterations):
        sums, _ = _run_pass(model, batches, num_groups, named, hv_vectors=vecs, **kw)
        sums = _reduce_sums(sums, reduce_fn)
        counts = sums.counts.to(sums.hv_sums.device)
        hv = sums.hv_sums.to(torch.float64) / counts.clamp_min(1)[:, None]
        lam = (hv * vecs.to(torch.float64)).sum(1).cpu()
        lam[counts.cpu() <= 0] = math.nan
        norm = torch.linalg.vector_norm(hv, dim=1, keepdim=True)
        ok = (norm > 0).squeeze(1) & (counts > 0)
        new = torch.where(ok[:, None], hv / norm.clamp_min(1e-300), vecs.to(torch.float64))
        vecs = new.to(ref.dtype)
    return lam, counts.cpu()


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
) -> Tensor:
    """Dominant eigenvalue of each group's Hessian H_a by power iteration, all groups at once.

    Each iteration is one pass over ``batches`` with one Hessian-vector product per pure-group
    chunk (v_a ← H_a v_a / ‖H_a v_a‖); the estimate is the Rayleigh quotient v_aᵀ H_a v_a,
    i.e. the eigenvalue of largest magnitude (the top curvature of a trained model, where
    negative eigenvalues are small). Start vectors come from a CPU generator seeded with
    ``seed + 1``, identical on every process; with ``reduce_fn`` every process gets the same
    estimates.

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

    Returns:
        float64 ``[G]`` on the CPU (NaN for groups without samples).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> group_hessian_lambda_max(model, [(x, y, y)], num_groups=2, iterations=5).shape
        torch.Size([2])
    """
    _check_positive_int("num_groups", num_groups)
    _check_positive_int("iterations", iterations)
    _check_positive_int("seed", seed, allow_zero=True)
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    _check_iterable(batches, 2 if iterations > 1 else 1)
    named = _resolve_params(model, params)
    kw: dict[str, Any] = dict(loss_fn=loss_fn, forward_fn=forward_fn, chunk_size=chunk_size)
    with _measurement_mode(model, [p for _, p in named]):
        lam, counts = _power_iteration(
            model, batches, num_groups, named, iterations, seed, reduce_fn, kw
        )
    _warn_missing("group_hessian_lambda_max", counts)
    return lam


def predicted_excess_loss(
    model: nn.Module,
    batches: Iterable[Any],
    delta: Mapping[str, Tensor],
    num_groups: int,
    *,
    params: ParamsArg = None,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Second-order prediction of each group's excess loss for a weight change δ.

    R̂(a) = g_aᵀδ + ½ δᵀ H_a δ at the model's current weights θ* (δ = θ̄ − θ*, the weights
    removed by pruning, with sign), with one Hessian-vector product per chunk.

    Args:
        model: the network at θ* (eval mode during the measurement, then restored).
        batches: iterable of ``(inputs, targets, groups)``.
        delta: FQN -> change of that parameter (same shape); parameters not listed have
            δ = 0.
        num_groups: number of groups G.
        params: parameters to differentiate (default: the keys of ``delta``).
        loss_fn: per-sample loss (default cross-entropy).
        forward_fn: ``(model, inputs) -> outputs``.
        reduce_fn: sums a tensor across processes (None: one process).
        chunk_size: samples per pure-group chunk.

    Returns:
        float64 ``[G]`` (NaN, with one warning, for groups without samples).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> delta = {"weight": -0.1 * model.weight.detach()}
        >>> predicted_excess_loss(model, [(x, y, y)], delta, num_groups=2).shape
        torch.Size([2])
    """
    _check_pass_args(num_groups, chunk_size, batches)
    if params is None and isinstance(delta, Mapping):
        params = list(delta.keys())
    named = _resolve_params(model, params)
    sums, counts = _single_pass(
        "predicted_excess_loss",
        model,
        batches,
        num_groups,
        named,
        reduce_fn,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        chunk_size=chunk_size,
        delta=_flat_delta(delta, named),
    )
    return _safe_div((sums.delta_lin + 0.5 * sums.delta_quad).cpu(), counts)


def measure_groups(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    num_classes: int | None,
    *,
    params: ParamsArg = None,
    num_probes: int = 0,
    delta: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    reduce_fn: ReduceFn | None = None,
    gradients: bool = True,
    chunk_size: int | None = None,
    probes: Tensor | None = None,
) -> GroupMeasurement:
    """Everything per group in ONE pass: counts, recall, losses, ‖g_a‖, Tr(H_a), R̂(a).

    Each pure-group chunk gets one forward (logits for the counts and the losses), one
    backward (gradient sums), and, when asked, ``num_probes`` HVPs for the trace and one HVP
    with ``delta`` for the predicted excess loss, all reusing the same graph. With
    ``gradients=False``, ``num_probes=0`` and ``delta=None`` it is a plain no-grad
    evaluation of whole batches.

    Args:
        model: the network (eval mode during the measurement, then restored).
        batches: iterable of ``(inputs, targets, groups)`` (or ``(inputs, targets)``).
        num_groups: number of groups G.
        num_classes: number of classes C (None: the logits' width).
        params: parameters for the gradient/curvature work (default: all trainable).
        num_probes: Hutchinson probes (0: no Hessian trace).
        delta: FQN -> weight change for the predicted excess loss (None: skip).
        seed: probe seed.
        loss_fn: per-sample loss (default cross-entropy).
        forward_fn: ``(model, inputs) -> logits``.
        reduce_fn: sums a tensor across processes (None: one process).
        gradients: measure the per-group gradient norms.
        chunk_size: samples per pure-group chunk.
        probes: explicit probes ``[K, P]`` (overrides ``num_probes`` and ``seed``).

    Returns:
        `GroupMeasurement`; missing groups are NaN (one warning per call).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> m = measure_groups(model, [(x, y, y)], num_groups=2, num_classes=2, num_probes=2)
        >>> m.support.sum().item(), m.grad_norms.shape, m.hessian_trace.shape
        (8.0, torch.Size([2]), torch.Size([2]))
    """
    _check_positive_int("num_groups", num_groups)
    if num_classes is not None:
        _check_positive_int("num_classes", num_classes)
    _check_positive_int("num_probes", num_probes, allow_zero=True)
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    _check_iterable(batches, 1)
    named = _resolve_params(model, params)
    ref = named[0][1]
    size = sum(p.numel() for _, p in named)
    pm = None
    if probes is not None or num_probes > 0:
        pm = _probe_matrix(probes, num_probes, torch.Generator().manual_seed(seed), size, ref)
    flat_delta = _flat_delta(delta, named) if delta is not None else None
    with _measurement_mode(model, [p for _, p in named]):
        sums, num_classes = _run_pass(
            model,
            batches,
            num_groups,
            named,
            loss_fn=loss_fn,
            forward_fn=forward_fn,
            chunk_size=chunk_size,
            grad_sums=gradients,
            probes=pm,
            delta=flat_delta,
            num_classes=num_classes,
            count_classes=True,
        )
    sums = _reduce_sums(sums, reduce_fn)
    counts = sums.counts.cpu()
    _warn_missing("measure_groups", counts)
    support, correct = sums.support.cpu(), sums.correct.cpu()
    result = GroupMeasurement(
        support=support,
        correct=correct,
        loss_sums=sums.loss_sums.cpu(),
        counts=counts,
        recall=group_recall(support, correct, warn=False),
        accuracy=_accuracy(support, correct),
        mean_loss=_safe_div(sums.loss_sums.cpu(), counts),
    )
    if gradients:
        norm = _row_norms(sums.grad_sums).cpu()
        result.grad_norms = _safe_div(norm, counts)
    if pm is not None:
        values = _safe_div(sums.probe_sums.cpu(), counts[:, None])
        result.hessian_trace, result.hessian_trace_stderr = _trace_stats(values)
        result.num_probes = values.shape[1]
    if flat_delta is not None:
        result.predicted_excess_loss = _safe_div(
            (sums.delta_lin + 0.5 * sums.delta_quad).cpu(), counts
        )
    return result
