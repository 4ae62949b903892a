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

from lightning_fairprune.checks import check_int
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
    check_int(value, name, 0 if allow_zero else 1)


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
    (``start`` continues a sequence).

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
    _check_positive_int("seed", seed, allow_zero=True)
    _check_positive_int("start", start, allow_zero=True)
    _check_positive_int("offset", offset, allow_zero=True)
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


_VMAP_SAMPLES = 2048  # samples per vmapped gradient call (several pure-group chunks)
_STRATEGIES = ("auto", "loop", "batched")


def _resolve_strategy(strategy: str, ref: Tensor) -> bool:
    """True for the batched (vmap / is_grads_batched) paths: off the CPU when ``"auto"``."""
    if strategy not in _STRATEGIES:
        raise ValueError(f"Expected `strategy` to be one of {_STRATEGIES}, but got {strategy!r}")
    if strategy == "auto":
        return ref.device.type != "cpu"
    return strategy == "batched"


def _check_max_memory(max_memory: Any) -> None:
    if max_memory is not None and (
        isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1
    ):
        raise ValueError(
            f"Expected `max_memory` to be None or a positive int (bytes), but got {max_memory!r}"
        )


def _probe_batch(max_memory: int | None, size: int, ref: Tensor, num_probes: int) -> int | None:
    """Probes per batched double backward: probe, HVP and product buffers within the budget."""
    _check_max_memory(max_memory)
    if max_memory is None:
        return None
    return max(1, min(num_probes, max_memory // (3 * size * ref.element_size())))


class _Forward(nn.Module):
    """``forward_fn(model, inputs)`` as a module, so `functional_call` can swap parameters."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.m = model
        self.forward_fn = forward_fn

    def forward(self, inputs: Nested) -> Tensor:
        return self.forward_fn(self.m, inputs)


def _pad_stack(parts: list[Nested], index: list[Tensor]) -> Nested:
    """Stack nested chunks to ``[B, L, ...]``, chunk j gathered at ``index[j]`` (padding)."""
    head = parts[0]
    if isinstance(head, Tensor):
        return torch.stack(
            [p.index_select(0, i.to(p.device)) for p, i in zip(parts, index, strict=True)]
        )
    if isinstance(head, Mapping):
        return {k: _pad_stack([p[k] for p in parts], index) for k in head}
    return type(head)(_pad_stack([p[i] for p in parts], index) for i in range(len(head)))


class _VmapGrads:
    """Gradient sums of several pure-group chunks in one call: ``vmap`` of ``grad``.

    Chunks are padded to the longest by repeating their own samples (finite, valid inputs)
    with weight 0, so each chunk's gradient is exactly the sum over its real samples.
    """

    def __init__(
        self,
        model: nn.Module,
        forward_fn: ForwardFn,
        loss_fn: LossFn,
        named: list[tuple[str, Tensor]],
    ) -> None:
        from torch.func import functional_call, grad, vmap

        wrapped = _Forward(model, forward_fn)
        names = ["m." + n for n, _ in named]
        self.params = [p for _, p in named]

        def total(pvals: tuple[Tensor, ...], x: Nested, y: Tensor, w: Tensor) -> Any:
            out = functional_call(wrapped, dict(zip(names, pvals, strict=True)), (x,))
            losses = loss_fn(out, y)
            if not isinstance(losses, Tensor) or losses.shape != y.shape:
                raise ValueError(
                    f"Expected `loss_fn` to return per-sample losses of shape {tuple(y.shape)},"
                    " but got"
                    f" {tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)}"
                )
            weighted = (losses * w).sum()
            return weighted, (weighted.detach(), out.detach())

        self.fn = vmap(grad(total, has_aux=True), in_dims=(None, 0, 0, 0))

    def __call__(
        self, chunks: list[tuple[int, Nested, Tensor]]
    ) -> tuple[Tensor, list[int], Tensor, Tensor, Tensor]:
        lengths = [int(y.shape[0]) for _, _, y in chunks]
        width = max(lengths)
        device = chunks[0][2].device
        index = [torch.arange(width, device=device) % n for n in lengths]
        x = _pad_stack([c[1] for c in chunks], index)
        y = torch.stack([c[2].index_select(0, i) for c, i in zip(chunks, index, strict=True)])
        ref = self.params[0]
        w = (
            torch.arange(width, device=device)[None, :]
            < torch.tensor(lengths, device=device)[:, None]
        )
        pvals = tuple(p.detach() for p in self.params)
        grads, (loss_totals, outs) = self.fn(pvals, x, y, w.to(ref.dtype))
        b = len(chunks)
        flat = torch.cat([g.reshape(b, -1) for g in grads], 1)
        ids = torch.tensor([a for a, _, _ in chunks], dtype=torch.int64)
        return ids, lengths, flat, loss_totals, outs


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
    confusion: Tensor | None = None  # [G, C, C] float64 (group, target, prediction)


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
    batched: bool = False,
    probe_batch: int | None = None,
    group_range: tuple[int, int] | None = None,
    vmap_samples: int = _VMAP_SAMPLES,
) -> tuple[_Sums, int | None]:
    """One pass over ``batches`` accumulating the requested per-group sums.

    ``batched``: gradient sums by ``vmap`` of the gradient over padded pure-group chunks
    (about ``vmap_samples`` samples per call) when no graph is needed, and all Hutchinson
    probes (``probe_batch`` at a time) in one double backward with ``is_grads_batched``.
    ``group_range=(lo, hi)``: only groups ``lo <= a < hi`` are measured (sums indexed
    ``a - lo``); other samples are dropped before the forward pass.
    """
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
    lo, hi = group_range if group_range is not None else (0, num_groups)
    g_count = hi - lo
    size = sum(p.numel() for p in params)
    use_vmap = batched and grad_sums and not need_graph

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
            sums.confusion = torch.zeros(
                g_count, num_classes, num_classes, dtype=torch.float64, device=device
            )
        if isinstance(a_or_groups, int):
            cell = y.to(device)
            base = a_or_groups * num_classes
        else:
            cell = a_or_groups.to(device) * num_classes + y.to(device)
            base = 0
        pred = out.detach().argmax(1).to(device)
        hit = pred == y.to(device)
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
        pairs = torch.bincount(cell * num_classes + pred, minlength=expect * num_classes)
        start = base * num_classes
        sums.confusion.view(-1)[start : start + pairs.numel()] += pairs.to(torch.float64)

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

    def batched_quadratic_forms(grads: list[Tensor]) -> Tensor:
        """v_kᵀ H v_k for all probes: ``probe_batch`` probes per double backward."""
        assert probes is not None
        idx = [i for i, g in enumerate(grads) if g.requires_grad]
        k_all = probes.shape[0]
        if not idx:
            return torch.zeros(k_all, dtype=torch.float64, device=device)
        step = probe_batch or k_all
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        out = []
        for k0 in range(0, k_all, step):
            rows = probes[k0 : k0 + step]
            kc = rows.shape[0]
            parts = [rows[:, offsets[i] : offsets[i + 1]].reshape(kc, *shapes[i]) for i in idx]
            hv = torch.autograd.grad(
                [grads[i] for i in idx],
                params,
                grad_outputs=parts,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=True,
            )
            val = torch.zeros(kc, dtype=dtype, device=device)
            for j, h in enumerate(hv):
                val += (h.reshape(kc, -1) * rows[:, offsets[j] : offsets[j + 1]]).sum(1)
            out.append(val)
        return torch.cat(out)

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
        if probe_rows is not None and batched:
            sums.probe_sums[a] += batched_quadratic_forms(grads).to(torch.float64)
        elif probe_rows is not None:
            vals = [torch.dot(hvp(grads, parts), row) for row, parts in probe_rows]
            sums.probe_sums[a] += torch.stack(vals).to(torch.float64)
        if delta is not None:
            sums.delta_lin[a] += torch.dot(flat_g, delta).to(torch.float64)
            sums.delta_quad[a] += torch.dot(hvp(grads, delta_parts), delta).to(torch.float64)
        if hv_vectors is not None:
            vec = hv_vectors[a]
            sums.hv_sums[a] += hvp(grads, _parts(vec, shapes)).to(acc_dtype)

    vmapped = _VmapGrads(model, forward_fn, loss_fn, named) if use_vmap else None
    pending: list[tuple[int, Nested, Tensor]] = []
    pending_samples = 0

    def flush_pending() -> None:
        nonlocal pending_samples
        if not pending:
            return
        assert vmapped is not None
        assert sums.grad_sums is not None
        ids, lengths, flat_grads, loss_totals, outs = vmapped(pending)
        sums.grad_sums.index_add_(0, ids.to(device), flat_grads.to(acc_dtype))
        for j, (a, _, y) in enumerate(pending):
            chunk_losses.append(loss_totals[j].detach())
            chunk_groups.append(a)
            host_counts[a] += lengths[j]
            count_update(a, outs[j, : lengths[j]], y)
        pending.clear()
        pending_samples = 0

    def take_chunk(a: int, x: Nested, y: Tensor) -> None:
        nonlocal pending_samples
        if vmapped is None:
            process_chunk(a, x, y)
            return
        pending.append((a, x, y))
        pending_samples += y.shape[0]
        if pending_samples >= vmap_samples:
            flush_pending()

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
        if group_range is not None and n:
            keep = (g >= lo) & (g < hi)
            if not bool(keep.all()):
                x = tree_map(lambda t, k=keep: t[k.to(t.device)], x)
                y, g = y[keep.to(y.device)], g[keep]
            g = g - lo
            n = y.shape[0]
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
            regrouper = Regrouper(g_count, chunk_size or n)
        for a, cx, cy in regrouper.push(x, y, g):
            take_chunk(a, cx, cy)
    if seen_batches == 0:
        raise ValueError("Expected `batches` to yield at least one batch, but it yielded none")
    if regrouper is not None:
        for a, cx, cy in regrouper.flush():
            take_chunk(a, cx, cy)
        flush_pending()
    if chunk_losses:
        idx = torch.tensor(chunk_groups, device=device)
        sums.loss_sums.index_add_(0, idx, torch.stack(chunk_losses).to(torch.float64))
        sums.counts += torch.tensor(host_counts, dtype=torch.float64, device=device)
    if not bool(torch.isfinite(sums.loss_sums).all()):
        raise ValueError(_NONFINITE)
    if group_range is None and float(sums.counts.sum()) == 0:
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
            "confusion",
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
    probes: Tensor | None, num_probes: int, seed: int, start: int, size: int, ref: Tensor
) -> Tensor:
    if probes is None:
        return rademacher_probes(
            num_probes, size, seed, start=start, device=ref.device, dtype=ref.dtype
        )
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
    strategy: str = "auto",
    max_memory: int | None = None,
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
    _check_max_memory(max_memory)
    named = _resolve_params(model, params)
    ref = named[0][1]
    batched = _resolve_strategy(strategy, ref)
    size = sum(p.numel() for _, p in named)
    row_bytes = size * torch.promote_types(ref.dtype, torch.float32).itemsize
    block = num_groups
    if max_memory is not None:
        block = max_memory // row_bytes
        if block < 1:
            raise ValueError(
                f"Expected `max_memory` to hold at least one group's gradient sum ({row_bytes}"
                f" bytes for {size} parameters), but got {max_memory}"
            )
        block = min(block, num_groups)
    starts = list(range(0, num_groups, block))
    _check_iterable(batches, len(starts))
    norms, loss_sums, counts = [], [], []
    with _measurement_mode(model, [p for _, p in named]):
        for lo in starts:
            hi = min(num_groups, lo + block)
            sums, _ = _run_pass(
                model,
                batches,
                num_groups,
                named,
                loss_fn=loss_fn,
                forward_fn=forward_fn,
                chunk_size=chunk_size,
                grad_sums=True,
                batched=batched,
                group_range=None if len(starts) == 1 else (lo, hi),
            )
            sums = _reduce_sums(sums, reduce_fn)
            block_counts = sums.counts.cpu()
            norms.append(_safe_div(_row_norms(sums.grad_sums).cpu(), block_counts))
            loss_sums.append(sums.loss_sums.cpu())
            counts.append(block_counts)
            del sums
    all_counts = torch.cat(counts)
    if float(all_counts.sum()) == 0:
        raise ValueError("Expected `batches` to contain at least one sample, but all were empty")
    _warn_missing("group_gradient_norms", all_counts)
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
) -> GroupHessianTrace:
    """Hutchinson estimate of Tr(H_a) per group, H_a the Hessian of group a's mean loss.

    Tr(H_a) ≈ (1/K) Σ_k v_kᵀ H_a v_k with Rademacher probes v_k built on the parameters'
    device by `rademacher_probes` from ``seed`` (bit-identical on every process and device,
    whatever the chunking; the same probes for every group).
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
        strategy: ``"loop"``: one double backward per probe (fastest on the CPU);
            ``"batched"``: all probes of a chunk in one double backward
            (``torch.autograd.grad(..., is_grads_batched=True)``); ``"auto"``: ``"loop"`` on
            the CPU, ``"batched"`` elsewhere. The same probes and estimates either way.
        max_memory: bound in bytes on the batched probes' buffers (probe, HVP and product,
            ``3 · P`` values per probe): probes go through the double backward in groups of
            ``max(1, max_memory // (3 P · itemsize))``. The vmapped backward also holds that
            many copies of the backward's intermediates, so leave headroom. None: all at once.

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
    kw: dict[str, Any] = dict(
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        chunk_size=chunk_size,
        batched=_resolve_strategy(strategy, ref),
        probe_batch=_probe_batch(max_memory, size, ref, num_probes),
    )

    values: list[Tensor] = []
    counts = None
    with _measurement_mode(model, [p for _, p in named]):
        used = 0
        while True:
            k = num_probes if probes is None else probes.shape[0]
            if adaptive:
                k = min(k, max_probes - used)
            pm = _probe_matrix(probes, k, seed, used, size, ref)
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
    # counter-based Rademacher rows (sliceable per shard: the sharded path starts the same)
    vecs = rademacher_probes(num_groups, size, seed + 1, device=ref.device, dtype=torch.float64)
    vecs = (vecs * (1.0 / math.sqrt(max(size, 1)))).to(ref.dtype)
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
    negative eigenvalues are small). The start vector of group a is row a of
    ``rademacher_probes(G, P, seed + 1)`` divided by √P (counter-based, identical on every
    process and device, and sliceable per shard: the FSDP2 path
    `~lightning_fairprune.diagnostics.sharded.sharded_group_hessian_lambda_max` starts from
    the same vectors); with ``reduce_fn`` every process gets the same estimates.

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
    strategy: str = "auto",
    max_memory: int | None = None,
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
        strategy: ``"auto"``, ``"loop"`` or ``"batched"`` (see `group_gradient_norms` and
            `group_hessian_trace`; the vmapped gradients apply when no probes or ``delta``
            are asked for).
        max_memory: bound on the batched probes' buffers (see `group_hessian_trace`).

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
        pm = _probe_matrix(probes, num_probes, seed, 0, size, ref)
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
            batched=_resolve_strategy(strategy, ref),
            probe_batch=_probe_batch(max_memory, size, ref, max(1, num_probes)),
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
        confusion=None if sums.confusion is None else sums.confusion.cpu().round().long(),
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
