"""The one pass engine of the per-group diagnostics: a request, two backends.

Every per-group quantity of `curvature` and `statistics` is a sum over samples of group ``a``
(losses, counts, confusion counts, gradient sums, Hessian quadratic forms, Hessian-vector
products, diagonal curvatures), so one engine accumulates them all. A `PassRequest` says what
to accumulate; `open_pass` opens the backend that the parameters' type selects
(`lightning_fairprune.distributed.is_sharded`), inside `lightning_fairprune.measure.isolated`;
the backend's ``run(request)`` returns the global `Sums` (reduced across processes). A
measurement that needs several passes (adaptive traces, power iteration) runs them on one
open backend; `run_pass` is the one-request shorthand.

* **Plain backend** (`PlainBackend`, tensors on one device, optionally reduced by
  ``reduce_fn`` across DDP processes): samples are regrouped across batches into *pure-group
  chunks* of ``chunk_size`` samples (default: the size of the first batch); each chunk gets
  one forward pass and one backward of its summed loss (with ``create_graph=True`` when
  curvature is needed), and the small accumulators below add their part, reusing that graph
  for Hessian-vector products by double backward. Every sample is processed once in full-size
  chunks however many groups there are. Without any gradient work it is a no-grad pass over
  whole batches.
* **FSDP2 backend** (`lightning_fairprune.diagnostics.sharded_pass`, DTensor parameters, or
  any parameters with ``FiniteDifference(force=True)``): per-group lockstep backward passes
  on local shards, curvature by central differences of sharded gradients with frozen gates.

The accumulators of the plain backend (each one small method of `PlainPass`): losses and
counts, confusion counts (`lightning_fairprune.diagnostics.counts.group_confusion`, the one
counting path), gradient sums (one backward per chunk, or ``torch.func.vmap`` of the
gradient over several padded chunks), per-sample gradients (``vmap`` over the samples of a
chunk) for the empirical Fisher diagonal, Hutchinson quadratic forms vᵀH v (one double
backward per probe, or all probes at once with ``is_grads_batched``), directional forms
(g·d and dᵀH d of given directions), Hessian-vector products H v_a (power iteration) and the
Hutchinson diagonal v ⊙ H v.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_choice, check_int
from lightning_fairprune.diagnostics._batching import (
    ForwardFn,
    LossFn,
    Nested,
    Regrouper,
    VmapGrads,
    check_groups,
    check_targets,
    default_forward,
    default_loss,
    first_tensor,
    split_batch,
    tree_map,
)
from lightning_fairprune.diagnostics.counts import confusion_to_counts, group_confusion
from lightning_fairprune.diagnostics.probes import Probes, rademacher_probes
from lightning_fairprune.distributed import is_sharded, local_tensor, reshard
from lightning_fairprune.measure import isolated

__all__ = [
    "ForwardFn",
    "LossFn",
    "ParamsArg",
    "PassRequest",
    "PlainBackend",
    "ReduceFn",
    "Sums",
    "open_pass",
    "run_pass",
]

ReduceFn = Callable[[Tensor], Tensor]
ParamsArg = Mapping[str, Tensor] | Sequence[str] | None
Named = list[tuple[str, Tensor]]
Parts = list[Tensor | None]

NONFINITE = (
    "Expected finite losses, but `loss_fn` returned NaN or inf (check the model weights and inputs)"
)
STRATEGIES = ("auto", "loop", "batched")
_VMAP_SAMPLES = 2048  # samples per vmapped gradient call (several pure-group chunks)


# --------------------------------------------------------------------------- small helpers


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` in float64, NaN where ``den <= 0`` (groups without samples)."""
    den = den.to(torch.float64)
    missing = den <= 0
    out = num.to(torch.float64) / torch.where(missing, torch.ones_like(den), den)
    return torch.where(missing, torch.full_like(out, math.nan), out)


def check_iterable(batches: Any, passes: int) -> None:
    """``batches`` must be iterable, and re-iterable when the measurement needs ``passes > 1``."""
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


def check_pass_args(num_groups: int, chunk_size: int | None, batches: Any, passes: int) -> None:
    """Validate the arguments every pass-based function shares."""
    check_int(num_groups, "num_groups", 1)
    check_int(chunk_size, "chunk_size", 1, allow_none=True)
    check_iterable(batches, passes)


def resolve_params(model: nn.Module, params: ParamsArg) -> Named:
    """Selected (FQN, parameter) pairs in the model's registration order.

    FSDP2 modules are resharded first (a no-grad forward leaves the root's parameters
    unsharded), so that sharded parameters resolve as their DTensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model)}")
    reshard(model)
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


def local_directions(named: Named, directions: Sequence[Mapping[str, Tensor]], arg: str) -> list:
    """Per direction, its local part per selected parameter (validated), None where absent.

    A DTensor value is taken by its local shard; a parameter's local part has the shape of
    ``local_tensor(param)`` (the full shape for plain parameters).
    """
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
                f"{[n for n, _ in named]}, but got unknown {unknown}"
            )
        parts: Parts = [None] * len(named)
        for name, value in mapping.items():
            local = local_tensor(named[index[name]][1])
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"Expected `{arg}[{name!r}]` to be a tensor, but got {type(value).__name__}"
                )
            value = local_tensor(value).detach()
            if tuple(value.shape) != tuple(local.shape):
                raise ValueError(
                    f"Expected `{arg}[{name!r}]` to have the shape of this process's local "
                    f"shard {tuple(local.shape)}, but got {tuple(value.shape)}"
                )
            parts[index[name]] = value.to(device=local.device)
        out.append(parts)
    return out


def flat(ts: Sequence[Tensor]) -> Tensor:
    """The concatenation of the flattened tensors."""
    return torch.cat([t.reshape(-1) for t in ts])


def split_flat(vec: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Views of a flat vector in the given shapes (the inverse of `flat`)."""
    sizes = [math.prod(s) for s in shapes]
    return [v.view(s) for v, s in zip(vec.split(sizes), shapes, strict=True)]


def row_norms(rows: Tensor, block_elems: int = 1 << 22) -> Tensor:
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
    redo = torch.isinf(sumsq) | (sumsq < info.tiny / info.eps * rows.shape[1])
    if bool(redo.any()):
        sumsq[redo] = rows[redo].to(torch.float64).square().sum(dim=1)
    return sumsq.sqrt()


def apply_reduce(reduce_fn: ReduceFn | None, t: Tensor, name: str) -> Tensor:
    """``reduce_fn(t)``, checked to return a tensor of the same shape."""
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


# --------------------------------------------------------------------------- request, sums


@dataclass
class PassRequest:
    """What one pass accumulates per group (sums over the group's samples).

    Attributes:
        class_counts: the confusion counts ``[G, C, C]`` (needs logits ``[N, C]``).
        num_classes: C (None: the logits' width).
        grad_norms: ‖S_a‖, S_a the summed gradient of group a.
        grad_sums: the ``[G, P]`` gradient sums themselves (plain backend).
        probes: Hutchinson probes v_k (a `Probes` or an explicit ``[K, P]`` matrix) for the
            quadratic forms Σ vᵀH v.
        directions: per direction, its local part per selected parameter (None: zero), for
            the linear forms S_a·d and the quadratic forms dᵀH_a d.
        hv_vectors: ``[G, P]`` (local) vectors v_a for H_a v_a, one per group.
        fisher_diag: the empirical Fisher diagonal Σ_i g_i ⊙ g_i (per-sample gradients).
        hutch_probes: probes for the Hutchinson diagonal mean_k v_k ⊙ H v_k (plain backend).
        group_range: ``(lo, hi)``: only groups ``lo <= a < hi`` (sums indexed ``a - lo``).
        dtype: accumulation dtype of the ``[G, P]`` sums (default: the parameters' dtype,
            at least float32).
    """

    class_counts: bool = False
    num_classes: int | None = None
    grad_norms: bool = False
    grad_sums: bool = False
    probes: Probes | Tensor | None = None
    directions: list[Parts] | None = None
    hv_vectors: Tensor | None = None
    fisher_diag: bool = False
    hutch_probes: Probes | None = None
    group_range: tuple[int, int] | None = None
    dtype: torch.dtype | None = None

    @property
    def needs_graph(self) -> bool:
        """Whether Hessian-vector products (a graph kept for double backward) are needed."""
        curvature = (self.probes, self.directions, self.hv_vectors, self.hutch_probes)
        return any(x is not None for x in curvature)

    @property
    def needs_grad(self) -> bool:
        """Whether any gradient work is asked for (else: one no-grad pass over batches)."""
        return self.grad_norms or self.grad_sums or self.fisher_diag or self.needs_graph


@dataclass
class Sums:
    """Global per-group sums of one pass (indexed by group, ``a - lo`` with a group range).

    ``counts`` (float64, CPU) is always set; the others when requested (``loss_sums`` by
    every plain pass, by FSDP2 passes that run at θ). Quadratic forms are Σ over the group's
    samples (divide by ``counts`` for the group's mean loss); ``steps`` are the
    finite-difference steps of the FSDP2 backend (probes first, then directions) and
    ``gate_mode`` how its gates ran.
    """

    counts: Tensor
    loss_sums: Tensor | None = None
    confusion: Tensor | None = None
    grad_norms: Tensor | None = None
    grad_sums: Tensor | None = None
    probe_quads: Tensor | None = None
    dir_lin: Tensor | None = None
    dir_quad: Tensor | None = None
    hv_sums: Tensor | None = None
    fisher: Tensor | None = None
    hutch_diag: Tensor | None = None
    steps: Tensor | None = None
    gate_mode: str | None = None

    def class_counts(self) -> tuple[Tensor, Tensor]:
        """``(support, correct)`` float64 ``[G, C]`` on the CPU, from the confusion counts."""
        if self.confusion is None:
            raise ValueError("Expected sums with class counts, but none were requested")
        return confusion_to_counts(self.confusion.cpu())


class Backend(Protocol):
    """What `open_pass` yields: a pass runner bound to a model, data and parameters.

    ``size``: local elements of the selected parameters (the width of ``hv_vectors`` and of
    `probe_rows`); ``numel``: their unsharded number; ``dtype``: the parameters' dtype;
    ``dense_rows``: whether gradient sums are ``[G, P]`` tensors.
    """

    size: int
    numel: int
    dtype: torch.dtype
    dense_rows: bool

    def run(self, request: PassRequest) -> Sums: ...

    def dots(self, a: Tensor, b: Tensor) -> Tensor: ...

    def probe_rows(self, num: int, seed: int) -> Tensor: ...


@dataclass
class PassOptions:
    """How passes run (shared by both backends; the plain-only ones are ignored by FSDP2)."""

    loss_fn: LossFn | None = None
    forward_fn: ForwardFn | None = None
    reduce_fn: ReduceFn | None = None
    chunk_size: int | None = None
    batched: bool = False
    probe_batch: int | None = None
    vmap_samples: int = _VMAP_SAMPLES


def resolve_strategy(strategy: str, ref: Tensor) -> bool:
    """True for the batched (vmap / is_grads_batched) paths: off the CPU when ``"auto"``."""
    check_choice(strategy, "strategy", STRATEGIES)
    if strategy == "auto":
        return ref.device.type != "cpu"
    return strategy == "batched"


def probe_batch(max_memory: int | None, size: int, ref: Tensor, num_probes: int) -> int | None:
    """Probes per batched double backward: probe, HVP and product buffers within the budget."""
    check_int(max_memory, "max_memory", 1, allow_none=True)
    if max_memory is None:
        return None
    return max(1, min(num_probes, max_memory // (3 * size * ref.element_size())))


# --------------------------------------------------------------------------- dispatch


@contextmanager
def open_pass(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: Named,
    options: PassOptions,
    finite_difference: Any = None,
) -> Iterator[Backend]:
    """Open the backend the parameters select, inside `lightning_fairprune.measure.isolated`.

    FSDP2-sharded parameters (or ``finite_difference.force``) get the FSDP2 backend with the
    `~lightning_fairprune.diagnostics.sharded_pass.FiniteDifference` options (default ones
    when None); plain parameters the plain backend (which ignores ``finite_difference``).
    """
    params = [p for _, p in named]
    if is_sharded(params) or bool(getattr(finite_difference, "force", False)):
        # the FSDP2 backend builds on this module: imported here, when it is needed
        from lightning_fairprune.diagnostics.sharded_pass import ShardedBackend

        with ShardedBackend.open(
            model, batches, num_groups, named, options, finite_difference
        ) as backend:
            yield backend
        return
    with isolated(model, mode="eval", grad_params=params):
        yield PlainBackend(model, batches, num_groups, named, options)


def run_pass(
    model: nn.Module,
    batches: Iterable[Any],
    num_groups: int,
    named: Named,
    request: PassRequest,
    options: PassOptions | None = None,
    finite_difference: Any = None,
) -> Sums:
    """One pass of ``request`` on the backend the parameters select (see `open_pass`).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Linear(3, 2)
        >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 1])
        >>> named = list(net.named_parameters())
        >>> sums = run_pass(net, [(x, y)], 2, named, PassRequest(class_counts=True))
        >>> sums.counts.tolist(), sums.class_counts()[0].sum().item()
        ([2.0, 4.0], 6.0)
    """
    with open_pass(
        model, batches, num_groups, named, options or PassOptions(), finite_difference
    ) as backend:
        return backend.run(request)


# --------------------------------------------------------------------------- plain backend


class PlainBackend:
    """Passes on plain parameters: all accumulators in one pass, sums reduced by ``reduce_fn``.

    ``dense_rows``: gradient sums are ``[G, P]`` tensors (bounded by group blocks).
    """

    dense_rows = True

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        num_groups: int,
        named: Named,
        options: PassOptions,
    ) -> None:
        self.model, self.batches, self.num_groups = model, batches, num_groups
        self.named, self.options = named, options
        self.ref = named[0][1]
        self.size = self.numel = sum(p.numel() for _, p in named)
        self.dtype = self.ref.dtype

    def run(self, request: PassRequest) -> Sums:
        """One pass over the batches; the sums reduced across processes."""
        acc = PlainPass(self.model, self.named, self.num_groups, request, self.options)
        seen = 0
        for batch in self.batches:
            seen += 1
            acc.feed(batch)
        if seen == 0:
            raise ValueError("Expected `batches` to yield at least one batch, but it yielded none")
        return acc.finish(self.options.reduce_fn)

    def dots(self, a: Tensor, b: Tensor) -> Tensor:
        """Row-wise dot products ``[R]`` (float64, CPU) of two ``[R, P]`` tensors."""
        return (a.to(torch.float64) * b.to(torch.float64)).sum(1).cpu()

    def probe_rows(self, num: int, seed: int) -> Tensor:
        """Rows ``0..num-1`` of `rademacher_probes` over the selected parameters."""
        return rademacher_probes(num, self.size, seed, device=self.ref.device, dtype=self.dtype)


def probe_matrix(probes: Probes | Tensor, size: int, ref: Tensor) -> Tensor:
    """The ``[K, P]`` probe matrix of a request (built, or the explicit one validated)."""
    if isinstance(probes, Probes):
        return rademacher_probes(
            probes.num, size, probes.seed, start=probes.start, device=ref.device, dtype=ref.dtype
        )
    if not isinstance(probes, Tensor) or probes.ndim != 2 or probes.shape[1] != size:
        raise ValueError(
            f"Expected `probes` to be a tensor [K, {size}] (flattened over the selected"
            " parameters), but got"
            f" {tuple(probes.shape) if isinstance(probes, Tensor) else type(probes)}"
        )
    return probes.to(device=ref.device, dtype=ref.dtype)


def flat_directions(directions: list[Parts], named: Named) -> Tensor:
    """``[D, P]`` flat directions (zeros where a part is None), in the parameters' dtype."""
    rows = []
    for parts in directions:
        rows.append(
            torch.cat(
                [
                    torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    if d is None
                    else d.reshape(-1).to(device=p.device, dtype=p.dtype)
                    for (_, p), d in zip(named, parts, strict=True)
                ]
            )
        )
    return torch.stack(rows)


class PlainPass:
    """The accumulators of one plain pass (see the module docstring); ``finish`` gives `Sums`.

    Per pure-group chunk: one forward (losses, counts), then the gradient work the request
    asks for, each accumulator a small method. Samples of groups outside ``group_range`` are
    dropped before the forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        named: Named,
        num_groups: int,
        request: PassRequest,
        options: PassOptions,
    ) -> None:
        self.model, self.req, self.num_groups = model, request, num_groups
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.acc = request.dtype or torch.promote_types(self.dtype, torch.float32)
        self.size = sum(p.numel() for p in self.params)
        self.lo, self.hi = request.group_range or (0, num_groups)
        self.g = self.hi - self.lo
        self.loss_fn = options.loss_fn or default_loss
        self.forward_fn = options.forward_fn or default_forward
        self.check_labels = options.loss_fn is None or request.class_counts
        self.num_classes = request.num_classes
        self.chunk_size = options.chunk_size
        self.batched = options.batched
        self.probe_step = options.probe_batch
        self.regrouper: Regrouper | None = None
        self.chunk_losses: list[Tensor] = []
        self.chunk_groups: list[int] = []
        self.host_counts = [0] * self.g
        self._init_sums(named)
        self._init_vmap(named, options)

    # ---------------------------------------------------------------- setup
    def _zeros(self, *shape: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.zeros(*shape, dtype=dtype or torch.float64, device=self.device)

    def _init_sums(self, named: Named) -> None:
        req, g, size = self.req, self.g, self.size
        self.sums = Sums(counts=self._zeros(g), loss_sums=self._zeros(g))
        self.confusion: Tensor | None = None
        if req.grad_sums or req.grad_norms or req.fisher_diag:
            self.sums.grad_sums = self._zeros(g, size, dtype=self.acc)
        self.grad_views: dict[int, list[Tensor]] = {}
        self.probes = None if req.probes is None else probe_matrix(req.probes, size, self.params[0])
        if self.probes is not None:
            self.probe_parts = [(row, split_flat(row, self.shapes)) for row in self.probes]
            self.sums.probe_quads = self._zeros(g, self.probes.shape[0])
        self.dirs = None if req.directions is None else flat_directions(req.directions, named)
        if self.dirs is not None:
            self.dir_parts = [(row, split_flat(row, self.shapes)) for row in self.dirs]
            self.sums.dir_lin = self._zeros(g, self.dirs.shape[0])
            self.sums.dir_quad = self._zeros(g, self.dirs.shape[0])
        if req.hv_vectors is not None:
            self.sums.hv_sums = self._zeros(g, size, dtype=self.acc)
        if req.fisher_diag:
            self.sums.fisher = self._zeros(g, size, dtype=self.acc)
        self.hutch = None
        if req.hutch_probes is not None:
            self.hutch = probe_matrix(req.hutch_probes, size, self.params[0])
            self.hutch_parts = [(row, split_flat(row, self.shapes)) for row in self.hutch]
            self.sums.hutch_diag = self._zeros(g, size, dtype=self.acc)

    def _init_vmap(self, named: Named, options: PassOptions) -> None:
        req = self.req
        gradients_only = (req.grad_sums or req.grad_norms) and not req.needs_graph
        use_vmap = self.batched and gradients_only and not req.fisher_diag
        self.vmapped = (
            VmapGrads(self.model, self.forward_fn, self.loss_fn, named)
            if use_vmap or req.fisher_diag
            else None
        )
        self.vmap_samples = options.vmap_samples
        self.pending: list[tuple[int, Nested, Tensor]] = []
        self.pending_samples = 0
        self.per_sample = req.fisher_diag

    # ---------------------------------------------------------------- batches
    def feed(self, batch: Any) -> None:
        """Validate one batch, drop other groups' samples, then count or regroup it."""
        x, y, g = split_batch(batch)
        n = y.shape[0] if y.ndim else 0
        check_groups(g, self.num_groups, n)
        if self.check_labels:
            check_targets(y, n, self.num_classes)
        if self.req.group_range is not None and n:
            keep = (g >= self.lo) & (g < self.hi)
            if not bool(keep.all()):
                x = tree_map(lambda t, k=keep: t[k.to(t.device)], x)
                y, g = y[keep.to(y.device)], g[keep]
            g, n = g - self.lo, int(y.shape[0])
        if n == 0:
            return
        lead = first_tensor(x)
        if lead.shape[0] != n:
            raise ValueError(
                f"Expected inputs with {n} samples (as many as targets), but got first dim"
                f" {lead.shape[0]}"
            )
        x = tree_map(lambda t: t.to(self.device), x)
        y, g = y.to(self.device), g.to(self.device)
        if not self.req.needs_grad:
            self._no_grad_batch(x, y, g)
            return
        if self.regrouper is None:
            self.regrouper = Regrouper(self.g, self.chunk_size or n)
        for a, cx, cy in self.regrouper.push(x, y, g):
            self._take(a, cx, cy)

    def _no_grad_batch(self, x: Nested, y: Tensor, g: Tensor) -> None:
        with torch.no_grad():
            out = self.forward_fn(self.model, x)
            losses = self._losses(out, y)
            self.sums.loss_sums.index_add_(0, g, losses.to(torch.float64))  # type: ignore[union-attr]
            self.sums.counts += torch.bincount(g, minlength=self.g).to(torch.float64)
            if not bool(torch.isfinite(losses).all()):
                raise ValueError(NONFINITE)
            self._count(g, out, y)

    def _losses(self, out: Tensor, y: Tensor) -> Tensor:
        n = y.shape[0]
        losses = self.loss_fn(out, y)
        if not isinstance(losses, Tensor) or losses.shape != (n,):
            raise ValueError(
                f"Expected `loss_fn` to return per-sample losses of shape [{n}], but got"
                f" {tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)}"
            )
        return losses

    def _count(self, groups: Tensor | int, out: Tensor, y: Tensor) -> None:
        """Confusion counts of a batch (group ids) or of a pure-group chunk (one id)."""
        if not self.req.class_counts:
            return
        if out.ndim != 2:
            raise ValueError(
                "Expected the model output to be logits [N, C] to count correct predictions,"
                f" but got shape {tuple(out.shape)}"
            )
        if self.num_classes is None:
            self.num_classes = int(out.shape[1])
        check_targets(y, y.shape[0], self.num_classes)
        if isinstance(groups, int):
            groups = torch.full_like(y, groups)
        pred = out.detach().argmax(1)
        conf = group_confusion(pred, y, groups, self.g, self.num_classes, validate=False)
        if self.confusion is None:
            self.confusion = conf
        else:
            self.confusion += conf

    def _record(self, a: int, total: Tensor, n: int) -> None:
        self.chunk_losses.append(total.detach())
        self.chunk_groups.append(a)
        self.host_counts[a] += n

    # ---------------------------------------------------------------- chunks
    def _take(self, a: int, x: Nested, y: Tensor) -> None:
        if self.per_sample:
            self._per_sample_chunk(a, x, y)
        elif self.vmapped is None:
            self._chunk(a, x, y)
        else:
            self.pending.append((a, x, y))
            self.pending_samples += y.shape[0]
            if self.pending_samples >= self.vmap_samples:
                self._flush_pending()

    def _chunk(self, a: int, x: Nested, y: Tensor) -> None:
        """Forward, backward (graph kept if curvature is asked for), then the accumulators."""
        out = self.forward_fn(self.model, x)
        total = self._losses(out, y).sum()
        self._record(a, total, y.shape[0])
        self._count(a, out, y)
        graph = self.req.needs_graph
        grads = list(
            torch.autograd.grad(
                total, self.params, create_graph=graph, allow_unused=True, materialize_grads=True
            )
        )
        if not graph:
            self._add_grads(a, grads)
            return
        flat_g = flat(grads).detach()
        if self.sums.grad_sums is not None:
            self.sums.grad_sums[a] += flat_g.to(self.acc)
        self._probe_forms(a, grads)
        self._direction_forms(a, grads, flat_g)
        self._hessian_vector(a, grads)
        self._hutchinson_diag(a, grads)

    def _add_grads(self, a: int, grads: list[Tensor]) -> None:
        """Gradient sums of a chunk without a graph: in place on per-parameter views."""
        assert self.sums.grad_sums is not None
        if self.acc != self.dtype:
            self.sums.grad_sums[a] += flat(grads).to(self.acc)
            return
        if a not in self.grad_views:
            self.grad_views[a] = split_flat(self.sums.grad_sums[a], self.shapes)
        torch._foreach_add_(self.grad_views[a], grads)

    def _hvp(self, grads: list[Tensor], vec_parts: list[Tensor]) -> Tensor:
        """H v by double backward through the kept graph (zero if no gradient has a graph)."""
        idx = [i for i, g in enumerate(grads) if g.requires_grad]
        if not idx:
            return torch.zeros(self.size, dtype=self.dtype, device=self.device)
        hv = torch.autograd.grad(
            [grads[i] for i in idx],
            self.params,
            grad_outputs=[vec_parts[i] for i in idx],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return flat(hv)

    def _probe_forms(self, a: int, grads: list[Tensor]) -> None:
        """Σ vᵀH v of every probe: one double backward per probe, or batched."""
        if self.probes is None:
            return
        assert self.sums.probe_quads is not None
        if self.batched:
            self.sums.probe_quads[a] += self._batched_forms(grads).to(torch.float64)
            return
        vals = [torch.dot(self._hvp(grads, parts), row) for row, parts in self.probe_parts]
        self.sums.probe_quads[a] += torch.stack(vals).to(torch.float64)

    def _batched_forms(self, grads: list[Tensor]) -> Tensor:
        """v_kᵀ H v_k for all probes: ``probe_batch`` probes per double backward."""
        assert self.probes is not None
        idx = [i for i, g in enumerate(grads) if g.requires_grad]
        k_all = self.probes.shape[0]
        if not idx:
            return torch.zeros(k_all, dtype=torch.float64, device=self.device)
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        out = []
        for k0 in range(0, k_all, self.probe_step or k_all):
            rows = self.probes[k0 : k0 + (self.probe_step or k_all)]
            kc = rows.shape[0]
            parts = [rows[:, offsets[i] : offsets[i + 1]].reshape(kc, *self.shapes[i]) for i in idx]
            hv = torch.autograd.grad(
                [grads[i] for i in idx],
                self.params,
                grad_outputs=parts,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=True,
            )
            val = torch.zeros(kc, dtype=self.dtype, device=self.device)
            for j, h in enumerate(hv):
                val += (h.reshape(kc, -1) * rows[:, offsets[j] : offsets[j + 1]]).sum(1)
            out.append(val)
        return torch.cat(out)

    def _direction_forms(self, a: int, grads: list[Tensor], flat_g: Tensor) -> None:
        """S·d and dᵀH d of every direction."""
        if self.dirs is None:
            return
        assert self.sums.dir_lin is not None
        assert self.sums.dir_quad is not None
        for k, (row, parts) in enumerate(self.dir_parts):
            self.sums.dir_lin[a, k] += torch.dot(flat_g, row).to(torch.float64)
            self.sums.dir_quad[a, k] += torch.dot(self._hvp(grads, parts), row).to(torch.float64)

    def _hessian_vector(self, a: int, grads: list[Tensor]) -> None:
        """H_chunk v_a with the chunk's own group vector (power iteration)."""
        if self.req.hv_vectors is None:
            return
        assert self.sums.hv_sums is not None
        parts = split_flat(self.req.hv_vectors[a], self.shapes)
        self.sums.hv_sums[a] += self._hvp(grads, parts).to(self.acc)

    def _hutchinson_diag(self, a: int, grads: list[Tensor]) -> None:
        """Σ_k v_k ⊙ H v_k (divided by K in `finish`): the Hutchinson diagonal."""
        if self.hutch is None:
            return
        assert self.sums.hutch_diag is not None
        for row, parts in self.hutch_parts:
            self.sums.hutch_diag[a] += (row * self._hvp(grads, parts)).to(self.acc)

    def _per_sample_chunk(self, a: int, x: Nested, y: Tensor) -> None:
        """Per-sample gradients of a chunk (vmap): their sum and the sum of their squares."""
        assert self.vmapped is not None
        assert self.sums.fisher is not None
        n = y.shape[0]
        grads, totals, outs = self.vmapped.stacked(
            tree_map(lambda t: t.unsqueeze(1), x), y[:, None], torch.ones(n, 1, device=y.device)
        )
        per = grads.to(self.acc)
        self._record(a, totals.sum(), n)
        self._count(a, outs[:, 0], y)
        self.sums.grad_sums[a] += per.sum(0)  # type: ignore[index]
        self.sums.fisher[a] += per.square().sum(0)

    def _flush_pending(self) -> None:
        """Gradient sums of the pending chunks in one vmapped call."""
        if not self.pending:
            return
        assert self.vmapped is not None
        assert self.sums.grad_sums is not None
        ids, lengths, grads, totals, outs = self.vmapped(self.pending)
        self.sums.grad_sums.index_add_(0, ids.to(self.device), grads.to(self.acc))
        for j, (a, _, y) in enumerate(self.pending):
            self._record(a, totals[j], lengths[j])
            self._count(a, outs[j, : lengths[j]], y)
        self.pending.clear()
        self.pending_samples = 0

    # ---------------------------------------------------------------- result
    def finish(self, reduce_fn: ReduceFn | None) -> Sums:
        """Flush the partial chunks, check the losses and reduce the sums across processes."""
        if self.regrouper is not None:
            for a, cx, cy in self.regrouper.flush():
                self._take(a, cx, cy)
            self._flush_pending()
        sums = self.sums
        assert sums.loss_sums is not None
        if self.chunk_losses:
            idx = torch.tensor(self.chunk_groups, device=self.device)
            sums.loss_sums.index_add_(0, idx, torch.stack(self.chunk_losses).to(torch.float64))
            sums.counts += torch.tensor(self.host_counts, dtype=torch.float64, device=self.device)
        if not bool(torch.isfinite(sums.loss_sums).all()):
            raise ValueError(NONFINITE)
        if self.req.group_range is None and float(sums.counts.sum()) == 0:
            raise ValueError(
                "Expected `batches` to contain at least one sample, but all were empty"
            )
        if self.req.class_counts:
            c = self.num_classes or 1
            sums.confusion = (
                self.confusion
                if self.confusion is not None
                else self._zeros(self.g, c, c, dtype=torch.int64)
            )
        if self.hutch is not None:
            sums.hutch_diag /= self.hutch.shape[0]  # type: ignore[operator]
        return reduce_sums(sums, reduce_fn, self.req)


_SMALL = ("loss_sums", "counts", "probe_quads", "dir_lin", "dir_quad")
_LARGE = ("grad_sums", "hv_sums", "fisher", "hutch_diag")


def reduce_sums(sums: Sums, reduce_fn: ReduceFn | None, request: PassRequest) -> Sums:
    """Sum every accumulator across processes (one call for all float64 scalars and counts).

    Then the gradient norms from the reduced gradient sums (which are dropped unless asked
    for) and the small sums to the CPU.
    """
    if reduce_fn is not None:
        small = [(n, getattr(sums, n)) for n in _SMALL if getattr(sums, n) is not None]
        if sums.confusion is not None:
            small.append(("confusion", sums.confusion.to(torch.float64)))
        packed = torch.cat([t.reshape(-1) for _, t in small])
        packed = apply_reduce(reduce_fn, packed, "float64 sums")
        for (name, t), part in zip(small, packed.split([t.numel() for _, t in small]), strict=True):
            part = part.view(t.shape)
            setattr(sums, name, part.round().long() if name == "confusion" else part)
        for name in _LARGE:
            t = getattr(sums, name)
            if t is not None:
                setattr(sums, name, apply_reduce(reduce_fn, t, name))
    if request.grad_norms and sums.grad_sums is not None:
        sums.grad_norms = row_norms(sums.grad_sums)
    if not (request.grad_sums or request.fisher_diag):
        sums.grad_sums = None
    sums.counts = sums.counts.cpu()
    return sums
