"""The FSDP2 backend of the pass engine: per-group lockstep backward on local shards.

Under ``torch.distributed.fsdp.fully_shard`` a parameter is a DTensor of which every process
holds a block of rows; the forward pass all-gathers the full parameters and the backward pass
reduce-scatters the gradients *in hooks outside autograd*. `torch.autograd.grad` with respect
to the sharded parameters therefore sees no gradient at all, and double-backward
Hessian-vector products cannot reach them. `ShardedBackend` answers the same `PassRequest` as
the plain backend (`lightning_fairprune.diagnostics.passes`) with what FSDP allows:

* **class counts and losses**: the plain forward-only pass, its sums all-reduced (every
  process needs the same number of batches: checked, with a clear error);
* **gradient norms** ‖S_a‖, S_a the summed gradient of group a over the data of *all*
  processes: for every group in turn, every process runs ``.backward()`` of its summed group
  loss (in pure-group chunks); FSDP's reduce-scatter leaves each process the local shard of
  S_a (divided by FSDP's gradient divide factor, which is multiplied back), the squared norms
  of the local shards are summed and one all-reduce gives the exact global norms. No
  ``[G, P]`` tensor and no full parameter or gradient is built;
* **curvature by finite differences** (probes, directions, H·v): first-order sharded
  gradients at perturbed weights give dᵀH_a d ≈ dᵀ(g_a(θ+εd) − g_a(θ−εd)) / (2ε); the local
  shards are moved in place and restored bit for bit. With ``gates="frozen"`` (default) a
  lockstep pass at θ records the activation pattern of every ReLU-like op and max pool
  (`~lightning_fairprune.diagnostics.gates.FrozenGates`) and the perturbed passes replay it,
  so the difference quotient is that of the smooth network whose Hessian at θ is the
  almost-everywhere Hessian of double backward; that pass also gives g_aᵀd exactly. The gates
  are stored for the whole data when their estimated size fits ``gate_memory`` (default
  `GATE_MEMORY`, 1 GiB), else recomputed per chunk by one more no-grad forward before each
  perturbed call (the same results bit for bit). The recorded gates are kept for the open
  backend's later passes (power iteration records once). `FiniteDifference` holds the options.

**Lockstep.** Every FSDP forward and backward is a collective, so every process must run the
same number of them. When the backend opens, one scan of the local data and two all-reduces
(max) of 4 and ``G`` integers fix the chunk size and the number of backward calls of each
group; a process with fewer chunks of a group runs the missing backward calls on one of its
samples with a zero output gradient (the graph is kept, the gradient is exactly zero).

**Cost.** Gradient norms: about one forward+backward over the data plus at most ``G`` padded
calls per process, but every backward reduce-scatters the gradient of *every* trainable
parameter (FSDP reduces whole parameter groups): at least ``G`` full gradient
reduce-scatters. Curvature: ``2 K G`` sharded backward sets for K probes or directions,
``2 G`` per H·v iteration, plus ``G`` for the pass at θ with frozen gates.

Plain (unsharded) parameters among the selected ones are treated as replicated: their local
gradients are summed with one all-reduce each per group. Everything runs inside
`lightning_fairprune.measure.isolated`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_bool, check_choice, check_int
from lightning_fairprune.diagnostics._batching import (
    ForwardFn,
    LossFn,
    Nested,
    check_groups,
    check_targets,
    default_forward,
    default_loss,
    split_batch,
    tree_cat,
    tree_map,
)
from lightning_fairprune.diagnostics.gates import FrozenGates
from lightning_fairprune.diagnostics.passes import (
    Named,
    Parts,
    PassOptions,
    PassRequest,
    PlainPass,
    Sums,
    check_iterable,
    split_flat,
)
from lightning_fairprune.diagnostics.probes import Probes, local_rademacher_probes
from lightning_fairprune.distributed import (
    all_reduce,
    is_sharded,
    local_tensor,
    process_group,
    reshard,
    shard_spec,
)
from lightning_fairprune.measure import isolated

__all__ = ["GATES", "GATE_MEMORY", "FiniteDifference", "ShardedBackend", "default_relative_step"]

_log = logging.getLogger(__name__)

GATE_MEMORY = 1 << 30
"""Default ``gate_memory`` (bytes) of the frozen gates: 1 GiB."""

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


def _check_eps(eps: Any) -> None:
    if eps is not None and (
        isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1
    ):
        raise ValueError(
            f"Expected `eps` to be None or a float in (0, 1) (the relative finite-difference "
            f"step), but got {eps!r}"
        )


@dataclass(frozen=True)
class FiniteDifference:
    """How curvature is taken on FSDP2-sharded parameters (central differences).

    FSDP2 has no double backward, so Hessian-vector products are central differences of
    sharded gradients, dᵀ(g_a(θ + εd) − g_a(θ − εd)) / (2ε), with ε_k = r · ‖θ‖ / ‖d_k‖ over
    the selected parameters (‖θ‖ replaced by 1 if zero): the perturbation has norm r · ‖θ‖.

    Attributes:
        eps: relative step r in (0, 1) (default: `default_relative_step` of the parameters'
            dtype and ``gates``: 6e-6 in float64; in float32 1e-3 frozen, 1e-4 live).
        gates: ``"frozen"`` (replay the activation pattern of θ; see the module docstring)
            or ``"live"`` (the plain difference, which also counts the units switching
            within ±ε: errors of 10-60x on a float32 ReLU MLP).
        gate_memory: bytes the frozen gates of all the data may take (``None``: no limit);
            above it they are recomputed per chunk (the same results, bit for bit).
        force: use this backend on plain (unsharded) parameters too, as one process holding
            every shard (how it is checked against double backward).

    Example:
        >>> FiniteDifference(gate_memory=0).gates
        'frozen'
        >>> FiniteDifference(gates="off")
        Traceback (most recent call last):
        ...
        ValueError: Expected `gates` to be one of ('frozen', 'live'), but got 'off'
    """

    eps: float | None = None
    gates: str = "frozen"
    gate_memory: int | None = GATE_MEMORY
    force: bool = False

    def __post_init__(self) -> None:
        _check_eps(self.eps)
        check_choice(self.gates, "gates", GATES)
        check_int(self.gate_memory, "gate_memory", 0, allow_none=True)
        check_bool(self.force, "force")


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
        head = all_reduce(head, group, "max").cpu()
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
        chunks = all_reduce(local_chunks.to(device), group, "max")
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
        local = all_reduce(local.clone(), group)
        if spec.owner or replicas:
            yield i, local


_SCRATCH = "chunk"  # FrozenGates key of the gates of one chunk (per-chunk mode)


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
        head = all_reduce(head, self.group, "max").cpu()
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
            reshard(model)
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

    reshard(model)  # the local shards may have moved since FSDP's last forward
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


def _owned_sq(named: list[tuple[str, Tensor]], tensors: list[Tensor | None], group: Any) -> float:
    """Σ of squares over this process's owned elements (plain tensors: the first process)."""
    total = 0.0
    for (_, p), t in zip(named, tensors, strict=True):
        if t is not None and shard_spec(p, group).owner:
            total += float(torch.linalg.vector_norm(t.detach().to(torch.float64))) ** 2
    return total


def _move(
    locals_: list[Tensor], saved: list[Tensor], dirs: list[Tensor | None], step: float
) -> None:
    """Local shards to θ + step · d (in the parameters' dtype), θ itself where d is None."""
    with torch.no_grad():
        for t, s, d in zip(locals_, saved, dirs, strict=True):
            t.copy_(s)
            if d is not None:
                t.add_(d.to(t.dtype), alpha=step)


def _step_norms(
    named: Named, saved: list[Tensor], extra: list[float], device: Any, group: Any
) -> Tensor:
    """``[‖θ‖, *sqrt(extra)]`` over all processes: one all-reduce of ``1 + len(extra)``."""
    norms = torch.tensor([_owned_sq(named, list(saved), group), *extra], dtype=torch.float64)
    return all_reduce(norms.to(device), group).cpu().clamp_min(0).sqrt()


_UNSUPPORTED = {
    "grad_sums": "per-group [G, P] gradient sums",
    "fisher_diag": "the per-sample Fisher diagonal",
    "hutch_probes": "the Hutchinson diagonal",
    "group_range": "group blocks (no [G, P] sums are built here)",
}


class ShardedBackend:
    """Passes on FSDP2-sharded parameters (see the module docstring); open with `open`.

    ``size`` is the number of local elements of the selected parameters (vectors of
    ``hv_vectors`` and `probe_rows` are their local parts, concatenated in order);
    ``dense_rows`` is False (no ``[G, P]`` sums).
    """

    dense_rows = False

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        num_groups: int,
        named: Named,
        options: PassOptions,
        fd: FiniteDifference,
    ) -> None:
        self.model, self.batches, self.num_groups, self.named = model, batches, num_groups, named
        self.options, self.fd = options, fd
        self.group = process_group([p for _, p in named])
        self.device = named[0][1].device
        self.locals_ = [local_tensor(p) for _, p in named]
        self.shapes = [t.shape for t in self.locals_]
        self.size = sum(t.numel() for t in self.locals_)
        self.numel = sum(shard_spec(p, self.group).numel for _, p in named)
        self.dtype = self.locals_[0].dtype
        self.owned = []  # flat ranges of the local parts this process counts
        start = 0
        for t, (_, p) in zip(self.locals_, named, strict=True):
            if shard_spec(p, self.group).owner:
                self.owned.append((start, start + t.numel()))
            start += t.numel()
        self.factors = _divide_factors(model)
        self.plan = _Plan(
            batches, num_groups, options.chunk_size, self.group, options.loss_fn is None,
            self.device,
        )  # fmt: skip
        local = self.plan.local_counts.to(torch.float64)
        self.counts = all_reduce(local.to(self.device), self.group).cpu()
        self.saved: list[Tensor] | None = None
        self.gating: _Gating | None = None

    @classmethod
    @contextmanager
    def open(
        cls,
        model: nn.Module,
        batches: Iterable[Any],
        num_groups: int,
        named: Named,
        options: PassOptions,
        fd: FiniteDifference | None,
    ) -> Iterator[ShardedBackend]:
        """The backend inside `isolated`; weights restored and gates dropped on exit."""
        check_iterable(batches, 2)
        for _, p in named:
            shard_spec(p)  # raises for placements other than Shard(0) / Replicate on a 1-D mesh
        with isolated(model, mode="eval", grad_params=[p for _, p in named]):
            backend = cls(model, batches, num_groups, named, options, fd or FiniteDifference())
            try:
                yield backend
            finally:
                backend.close()

    def close(self) -> None:
        """Put the weights back to θ (bit for bit) and forget the gates."""
        if self.saved is not None:
            _move(self.locals_, self.saved, [None] * len(self.saved), 0.0)
        if self.gating is not None:
            self.gating.finish()

    # ---------------------------------------------------------------- requests
    def run(self, request: PassRequest) -> Sums:
        """The global sums of ``request`` (see the module docstring for what each costs)."""
        for name, what in _UNSUPPORTED.items():
            if getattr(request, name) not in (None, False):
                raise ValueError(
                    f"Expected a measurement the FSDP2 backend supports, but it was asked for "
                    f"{what} (`{name}`), which FSDP2-sharded parameters do not give"
                )
        if isinstance(request.probes, Tensor):
            raise ValueError(
                "Expected `probes` to be None (probes by seed) on FSDP2-sharded parameters, but "
                "got an explicit probe matrix"
            )
        sums = Sums(counts=self.counts.clone())
        if request.class_counts:
            self._forward_sums(request, sums)
        if request.grad_norms:
            self._norm_sums(sums)
        if request.probes is not None or request.directions is not None:
            self._directional(request, sums)
        if request.hv_vectors is not None:
            sums.hv_sums = self._hv_sums(request.hv_vectors)
        return sums

    def _forward_sums(self, request: PassRequest, sums: Sums) -> None:
        """Losses and confusion counts: the plain no-grad pass, sums all-reduced."""
        if not self.plan.batches_equal:
            lo, hi = self.plan.batch_range
            raise ValueError(
                "Expected every process to hold the same number of batches (FSDP's forward "
                f"passes run in lockstep), but got between {lo} and {hi} batches per process"
            )
        forward = PassRequest(class_counts=True, num_classes=request.num_classes)
        acc = PlainPass(self.model, self.named, self.num_groups, forward, self.options)
        for batch in self.batches:
            acc.feed(batch)
        res = acc.finish(lambda t: all_reduce(t.clone(), self.group))
        sums.loss_sums, sums.confusion = res.loss_sums, res.confusion

    def _norm_sums(self, sums: Sums) -> None:
        """‖S_a‖ from the squared norms of the owned gradient shards, and the loss sums."""
        sq = torch.zeros(self.num_groups, dtype=torch.float64)

        def on_group(a: int) -> None:
            for _, part in _owned_summed_grads(self.named, self.factors, self.group):
                sq[a] += float(torch.linalg.vector_norm(part)) ** 2

        loss = self._lockstep(on_group)
        packed = all_reduce(torch.cat([sq, loss]).to(self.device), self.group).cpu()
        sq, loss = packed.split(self.num_groups)
        sums.grad_norms = sq.clamp_min(0).sqrt()
        if sums.loss_sums is None:
            sums.loss_sums = loss

    def _lockstep(self, on_group: Callable[[int], None], **kw: Any) -> Tensor:
        return _lockstep_backward(
            self.model, self.batches, self.num_groups, self.plan, self.options.loss_fn,
            self.options.forward_fn, self.device, on_group, **kw,
        )  # fmt: skip

    # ---------------------------------------------------------------- finite differences
    def _theta(self) -> list[Tensor]:
        """The local shards at θ (saved once per open backend)."""
        if self.saved is None:
            self.saved = [t.detach().clone() for t in self.locals_]
        return self.saved

    def _gates(self) -> _Gating | None:
        """The frozen gates of this backend (None with live gates)."""
        if self.fd.gates != "frozen":
            return None
        if self.gating is None:
            calls = sum(self.plan.chunks)
            self.gating = _Gating(
                self.locals_, self._theta(), self.fd.gate_memory, calls, self.group, self.device
            )
        return self.gating

    def _rel(self) -> float:
        if self.fd.eps is not None:
            return float(self.fd.eps)
        return max(default_relative_step(t.dtype, self.fd.gates) for t in self.locals_)

    def _at_theta(self, gating: _Gating | None, on_group: Callable[[int], None]) -> None:
        """The pass at θ: records the gates if not yet done, else runs live (same pattern)."""
        if gating is not None and gating.mode is None:
            self._lockstep(on_group, gating=gating, phase="record")
        else:
            self._lockstep(on_group)

    def _perturbed(
        self, dirs: Parts, step: float, on_group: Callable[[int], None], **kw: Any
    ) -> None:
        """One lockstep pass at θ + step · d (gates replayed), weights moved back to θ after."""
        saved = self._theta()
        _move(self.locals_, saved, dirs, step)

        def point() -> None:
            _move(self.locals_, saved, dirs, step)

        try:
            self._lockstep(on_group, gating=self._gates(), phase="replay", point=point, **kw)
        finally:
            _move(self.locals_, saved, [None] * len(saved), 0.0)

    def _directions(self, request: PassRequest) -> tuple[int, Callable[[int], Parts]]:
        probes = request.probes
        k = probes.num if isinstance(probes, Probes) else 0
        extra = request.directions or []

        def direction(j: int) -> Parts:
            if j < k:
                assert isinstance(probes, Probes)
                seed, index = probes.seed, probes.start + j
                return list(local_rademacher_probes(self.named, index, seed, self.group))
            return extra[j - k]

        return k, direction

    def _directional(self, request: PassRequest, sums: Sums) -> None:
        """Probe quadratic forms and directional forms by central differences."""
        k, direction = self._directions(request)
        num = k + len(request.directions or [])
        sq = [_owned_sq(self.named, direction(j), self.group) for j in range(num)]
        norms = _step_norms(self.named, self._theta(), sq, self.device, self.group)
        theta_norm = float(norms[0]) if float(norms[0]) > 0 else 1.0
        steps = torch.zeros(num, dtype=torch.float64)
        for j in range(num):
            if float(norms[j + 1]) > 0:  # zero directions: 0
                steps[j] = self._rel() * theta_norm / float(norms[j + 1])
        plus, minus, theta = self._fd_passes(num, k, direction, steps)
        safe = torch.where(steps > 0, 2 * steps, torch.ones_like(steps))
        quad = torch.where(steps > 0, (plus - minus) / safe, torch.zeros_like(plus))
        lin = (plus + minus) / 2 if theta is None else theta
        lin = torch.where(steps > 0, lin, torch.zeros_like(plus))
        if request.probes is not None:
            sums.probe_quads = quad[:, :k]
        if request.directions is not None:
            sums.dir_lin, sums.dir_quad = lin[:, k:], quad[:, k:]
        sums.steps = steps
        sums.gate_mode = "live" if self.gating is None else self.gating.summary()

    def _fd_passes(
        self, num: int, k: int, direction: Callable[[int], Parts], steps: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Global ``[G, num]`` sums S_a·d_j at θ ± ε_j d_j, and at θ (frozen gates) or None."""
        g = self.num_groups
        plus, minus, at_theta = (torch.zeros(g, num, dtype=torch.float64) for _ in range(3))
        live = [j for j in range(num) if float(steps[j]) > 0]
        linear = [j for j in live if j >= k]
        gating = self._gates()
        if gating is not None and (gating.mode is None or linear):
            self._at_theta(gating, self._dots_into(at_theta, {j: direction(j) for j in linear}))
        for j in live:
            dirs = direction(j)
            for sign, out in ((1.0, plus), (-1.0, minus)):
                self._perturbed(dirs, sign * float(steps[j]), self._dots_into(out, {j: dirs}))
        parts = [plus.flatten(), minus.flatten()]
        if gating is not None:
            parts.append(at_theta.flatten())
        packed = all_reduce(torch.cat(parts).to(self.device), self.group).cpu().view(-1, g, num)
        return packed[0], packed[1], packed[2] if gating is not None else None

    def _dots_into(self, out: Tensor, dirs: dict[int, Parts]) -> Callable[[int], None]:
        """``on_group(a)``: ``out[a, j] = S_a · d_j`` (owned parts) for every j of ``dirs``."""
        wanted = [False] * len(self.named)
        for parts in dirs.values():
            wanted = [w or d is not None for w, d in zip(wanted, parts, strict=True)]

        def on_group(a: int) -> None:
            if not dirs:
                return
            grads = dict(_owned_summed_grads(self.named, self.factors, self.group, wanted))
            for j, parts in dirs.items():
                out[a, j] = sum(
                    float((grad * parts[i].to(torch.float64)).sum())  # type: ignore[union-attr]
                    for i, grad in grads.items()
                    if parts[i] is not None
                )

        return on_group

    def _hv_sums(self, vecs: Tensor) -> Tensor:
        """``[G, P_local]`` Σ H_a v_a (owned and replicated parts), one group at a time."""
        present = [a for a in range(self.num_groups) if float(self.counts[a]) > 0]
        norms = self.dots(vecs, vecs).clamp_min(0).sqrt()
        theta = _step_norms(self.named, self._theta(), [], self.device, self.group)
        theta_norm = float(theta[0]) if float(theta[0]) > 0 else 1.0
        gating = self._gates()
        if gating is not None and gating.mode is None and present:
            self._lockstep(lambda a: None, groups=present, gating=gating, phase="record")
        out = torch.zeros(self.num_groups, self.size, dtype=torch.float64, device=self.device)
        for a in present:
            if float(norms[a]) == 0:
                continue
            step = self._rel() * theta_norm / float(norms[a])
            dirs: Parts = list(split_flat(vecs[a], self.shapes))
            grads: dict[float, dict[int, Tensor]] = {}
            for sign in (1.0, -1.0):

                def on_group(_: int, sign: float = sign, grads: dict = grads) -> None:
                    grads[sign] = dict(
                        _owned_summed_grads(self.named, self.factors, self.group, replicas=True)
                    )

                self._perturbed(dirs, sign * step, on_group, groups=[a])
            rows = split_flat(out[a], self.shapes)
            for i, t in enumerate(self.locals_):
                zero = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
                diff = grads[1.0].get(i, zero) - grads[-1.0].get(i, zero)
                rows[i].copy_(diff.view(t.shape) / (2.0 * step))
        return out

    # ---------------------------------------------------------------- vectors
    def dots(self, a: Tensor, b: Tensor) -> Tensor:
        """Global row-wise dot products ``[R]`` (float64, CPU) of local ``[R, P_local]`` rows.

        Owned elements only (a replicated parameter counts once): one all-reduce.
        """
        local = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
        for lo, hi in self.owned:
            local += (a[:, lo:hi].to(torch.float64) * b[:, lo:hi].to(torch.float64)).sum(1)
        return all_reduce(local.to(self.device), self.group).cpu()

    def probe_rows(self, num: int, seed: int) -> Tensor:
        """This process's columns of probes ``0..num-1`` of `rademacher_probes`."""
        rows = torch.empty(num, self.size, dtype=self.dtype, device=self.device)
        for k in range(num):
            parts = local_rademacher_probes(self.named, k, seed, self.group)
            torch.cat([t.reshape(-1).to(self.dtype) for t in parts], out=rows[k])
        return rows
