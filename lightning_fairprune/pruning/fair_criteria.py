"""Fairness-aware pruning criteria: per-group statistics -> masks (plain torch).

Three criteria select which weights to prune from *per-group* statistics measured on
``(inputs, targets, groups)`` batches (``(inputs, targets)``: groups = classes):

=============  ===========================================================================
name           selection
=============  ===========================================================================
fairgrape      FairGRAPE (Lin et al., ECCV 2022): per-group Taylor importance
               ``I_{a,i} = (θ_i · ḡ_{a,i})²``; a greedy selection of the weights to *keep* that
               keeps every group's share of the kept importance at its share before the round.
fairprune      FairPrune (Wu et al., MICCAI 2022): per-group OBD saliency
               ``S_{a,i} = ½ h_{a,i} θ_i²``; prune first what the well-served groups need and
               the worst-served group does not: priority ``S_{rest,i} − β · S_{worst,i}``.
worst_group    ours: per-group forecasts ``Δ_{a,i} = max(0, −ḡ_{a,i}θ_i + ½ h_{a,i}θ_i²)`` of
               the increase of group a's mean loss when weight i is zeroed; the pruned set
               minimizes the forecast worst-group damage ``max_a Σ_i Δ_{a,i}`` by
               multiplicative-weights (minimax) steps over the group weights.
=============  ===========================================================================

``ḡ_a`` is the gradient of group a's *mean* loss, ``h_a`` a diagonal curvature of that loss
(the per-group empirical Fisher diagonal, or the Hutchinson estimate of the Hessian diagonal).

**Statistics are sums.** `group_statistics` returns per-group sums (gradients, curvature,
losses, counts) over the samples it saw; `GroupStatistics.reduce` sums them across processes
(pass an all-reduce). With all-reduced statistics, identical weights and identical current
masks, every criterion is a deterministic function of its inputs, so every process computes
the same masks (no broadcast needed). Masks are built by
:func:`~lightning_fairprune.pruning.select.global_masks` /
:func:`~lightning_fairprune.pruning.select.layerwise_masks`: exactly ``round(s · N)`` pruned
weights (globally or per layer), already-pruned weights stay pruned, ties by flat index.

**Measurement without disturbing training.** `group_statistics` runs inside
`measuring`, a small local context (eval mode, gradients enabled outside inference mode,
selected parameters requiring grad, and afterwards the modules' modes, buffers,
``requires_grad`` flags, ``.grad`` and the torch RNG state restored). It is kept isolated so
that a shared measurement context can replace it.

Differences from the authors' code:

* FairGRAPE (``Bernardo1998/FairGRAPE``, ``prune.py``): their importance sums
  ``(|θ|·|g_batch|)²`` over mini-batches of each group and steps an Adam optimizer while
  measuring; here ``ḡ_a`` is the gradient of the group's mean loss over all given batches and
  the model is not changed. Their greedy works per layer only; here ``scope="global"`` runs the
  same greedy over all weights with global targets (``"layerwise"`` is theirs). Their
  ``para_batch`` is ``batch`` here. Their protocol prunes 2.5 % of the remaining weights per
  iteration with the statistics recomputed each time; the schedule is the caller's.
* FairPrune (Wu et al.; no official code): the paper has two groups and the exact diagonal
  Hessian. Here ``h`` is the Fisher or Hutchinson diagonal, and for G > 2 groups the worst
  group is the one with the highest mean loss (or given), and ``S_rest`` is the
  sample-weighted mean (``others="mean"``) or the maximum (``others="max"``) of the other
  groups' saliencies; with G = 2 both reduce to the paper's ``S_0 − β S_1``.

Example:
    >>> from lightning_fairprune.diagnostics.statistics import group_statistics
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(30, 4), torch.arange(30) % 3
    >>> stats = group_statistics(model, [(x, y)], num_groups=3, params=["weight"])
    >>> masks = fair_masks("worst_group", {"weight": model.weight}, stats, 0.5)
    >>> int((~masks["weight"]).sum())
    6
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_fairprune.checks import check_bool, check_choice, check_int, check_real
from lightning_fairprune.diagnostics.statistics import GroupStatistics
from lightning_fairprune.pruning.criteria import CRITERIA, CriterionContext, make_options, register
from lightning_fairprune.pruning.select import num_to_prune
from lightning_fairprune.pruning.units import Units

__all__ = [
    "FAIR_CRITERIA",
    "SCOPES",
    "FairGRAPE",
    "FairGRAPEOptions",
    "FairPrune",
    "FairPruneOptions",
    "MinimaxResult",
    "WorstGroup",
    "WorstGroupOptions",
    "fair_masks",
    "fairgrape_importance",
    "fairgrape_masks",
    "fairprune_masks",
    "fairprune_saliency",
    "forecast_group_damage",
    "worst_group_forecasts",
    "worst_group_masks",
]

SCOPES: tuple[str, ...] = ("global", "layerwise")
"""Mask scopes."""

# --------------------------------------------------------------------------- helpers


def _check_inputs(
    params: Mapping[str, Tensor], stats: GroupStatistics, scope: str
) -> dict[str, Tensor]:
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"Expected `params` to be a non-empty dict of tensors, but got {params!r}")
    if not isinstance(stats, GroupStatistics):
        raise TypeError(f"Expected `stats` to be GroupStatistics, but got {type(stats).__name__}")
    check_choice(scope, "scope", SCOPES)
    missing = [n for n in params if n not in stats.grad_sums]
    if missing:
        raise ValueError(f"Expected `stats` to hold statistics for {missing}, but they are missing")
    for n, p in params.items():
        shape = tuple(stats.grad_sums[n].shape[1:])
        if shape != tuple(p.shape):
            raise ValueError(
                f"Expected the statistics of {n!r} to have shape {tuple(p.shape)}, but got {shape}"
            )
    return {n: p.detach() for n, p in params.items()}


def _rank_scores(keys: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Scores whose order is the order of ``keys`` (lowest first), ties by flat index.

    The score of a unit is its 1-based position in a stable ascending sort of all keys
    (float64: exact up to 2**53 units), so the selection prunes by ``keys`` with the same
    tie rule as theirs.
    """
    flat = torch.cat([k.reshape(-1).to(torch.float64) for k in keys.values()])
    order = torch.sort(flat, stable=True).indices
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    out: dict[str, Tensor] = {}
    start = 0
    for name, k in keys.items():
        out[name] = ranks[start : start + k.numel()].reshape(k.shape)
        start += k.numel()
    return out


@dataclass
class _Round:
    """One round's selection over the structure's units (weights or channels)."""

    units: Units
    target: float
    scope: str
    current: dict[str, Tensor] | None  # kept units of earlier rounds

    def select(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.units.select(scores, self.target, self.scope, self.current)

    def candidates(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Units not pruned yet, shaped like ``values[n][0]``."""
        if self.current is None:
            return {
                n: torch.ones(v.shape[1:], dtype=torch.bool, device=v.device)
                for n, v in values.items()
            }
        return {n: self.current[n].to(v.device).bool() for n, v in values.items()}

    def unflatten(self, flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        start = 0
        for n, v in like.items():
            size = math.prod(v.shape[1:])
            out[n] = flat[start : start + size].reshape(v.shape[1:]).to(v.device)
            start += size
        return out


class _FairCriterion:
    """Base of the fairness-aware criteria: per-group statistics -> units -> masks.

    A criterion computes per-group values of every weight (``[G, *shape]``), the structure
    reduces them to its units (a channel's value is the sum over its coupled entries), and
    the criterion's rule picks the units to prune with the structure's exact counts.
    """

    name = ""
    needs_gradients = False
    needs_weight_decay = False
    needs_group_statistics = True
    default_curvature = "fisher"
    curvatures: tuple[str, ...] = ("fisher", "hutchinson")
    supports_sharding = False
    structures: tuple[str, ...] = ("weight", "channel")  # rules that rank units, exact counts
    options_type: type | None = None

    def make_options(self, options: Mapping[str, Any] | None) -> Any:
        """Typed options (`make_options` with `options_type`)."""
        return make_options(self.name, self.options_type, options)

    def check_options(self, options: Any, num_groups: int) -> None:
        """Nothing to check against the number of groups by default."""
        return None

    value_fn: Callable[[Mapping[str, Tensor], GroupStatistics], dict[str, Tensor]]

    def values(
        self, params: Mapping[str, Tensor], stats: GroupStatistics, options: Any
    ) -> dict[str, Tensor]:
        """Per-group values of every weight, FQN -> ``[G, *shape]`` (``value_fn``)."""
        return type(self).value_fn(params, stats)

    def choose(
        self, values: dict[str, Tensor], stats: GroupStatistics, rnd: _Round, options: Any
    ) -> dict[str, Tensor]:
        """The kept units of the round from their per-group values."""
        raise NotImplementedError

    def _prepare(
        self, ctx: CriterionContext, options: Any
    ) -> tuple[dict[str, Tensor], GroupStatistics, _Round]:
        units = ctx.units
        if not units.exact_counts:
            raise ValueError(
                f"Expected structure 'weight' or 'channel' with criterion={self.name!r} (it "
                f"ranks units with exact counts), but got structure {units.kind!r}"
            )
        stats = ctx.group_statistics()
        params = _check_inputs(ctx.params, stats, ctx.scope)
        rnd = _Round(units, ctx.target, ctx.scope, units.current(ctx.current_masks))
        return units.reduce(self.values(params, stats, options), "sum"), stats, rnd

    def masks(self, ctx: CriterionContext) -> dict[str, Tensor]:
        """Masks of every parameter of ``ctx.params`` (``True`` = kept)."""
        options = ctx.options if ctx.options is not None else self.make_options(None)
        with torch.no_grad():
            values, stats, rnd = self._prepare(ctx, options)
            return ctx.units.expand(self.choose(values, stats, rnd, options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _context(
    params: Mapping[str, Tensor],
    stats: GroupStatistics,
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None,
    scope: str,
    options: Any,
) -> CriterionContext:
    return CriterionContext(
        params,
        sparsity,
        scope=scope,
        current_masks=current_masks,
        options=options,
        group_statistics=lambda: stats,
    )


# --------------------------------------------------------------------------- FairGRAPE


@dataclass(frozen=True)
class FairGRAPEOptions:
    """Options of ``"fairgrape"``.

    Attributes:
        batch: weights (units) kept per choice of group (their ``para_batch``), >= 1.
    """

    batch: int = 1

    def __post_init__(self) -> None:
        check_int(self.batch, "batch", 1)


def fairgrape_importance(params: Mapping[str, Tensor], stats: GroupStatistics) -> dict[str, Tensor]:
    """Per-group Taylor importance ``I_{a,i} = (θ_i · ḡ_{a,i})²`` (FQN -> ``[G, *shape]``).

    Example:
        >>> s = GroupStatistics({"w": torch.tensor([[1.0, 2.0], [0.0, 4.0]])},
        ...                     torch.zeros(2), torch.tensor([1.0, 2.0]))
        >>> fairgrape_importance({"w": torch.tensor([3.0, -1.0])}, s)["w"]
        tensor([[9., 4.],
                [0., 4.]])
    """
    means = stats.grad_means()
    return {n: (p.detach().to(means[n].dtype) * means[n]) ** 2 for n, p in params.items()}


def _greedy_keep(importance: Tensor, n_keep: int, batch: int) -> list[int]:
    """FairGRAPE's greedy over candidates: ``importance`` is ``[G, M]``; returns kept order."""
    g, m = importance.shape
    if n_keep <= 0 or m == 0:
        return []
    imp = importance.detach().to(torch.float64).cpu()
    totals = imp.sum(1)
    grand = float(totals.sum())
    target = (totals / grand).tolist() if grand > 0 else [1.0 / g] * g
    # each group's candidates by descending own importance, ties by flat index
    orders = [torch.sort(-imp[a], stable=True).indices.tolist() for a in range(g)]
    cols = imp.t().tolist()
    kept = [False] * m
    pointer = [0] * g
    selected = [0.0] * g
    prop = [1.0 / g] * g
    out: list[int] = []
    group = 0
    streak = 0
    while len(out) < n_keep:
        if streak == 0:
            group = min(range(g), key=lambda a: (prop[a] - target[a], a))
        streak = streak + 1 if streak < batch - 1 else 0
        order = orders[group]
        p = pointer[group]
        while p < m and kept[order[p]]:
            p += 1
        pointer[group] = p
        if p >= m:  # this group's list is exhausted (cannot happen before n_keep <= m)
            streak = 0
            continue
        j = order[p]
        kept[j] = True
        out.append(j)
        col = cols[j]
        for a in range(g):
            selected[a] += col[a]
        s = sum(selected)
        if s > 0:
            prop = [v / s for v in selected]
    return out


class FairGRAPE(_FairCriterion):
    """FairGRAPE (Lin et al., 2022): keep units so each group keeps its importance share.

    See `fairgrape_masks`.
    """

    name = "fairgrape"
    default_curvature = "none"
    curvatures = ("fisher", "hutchinson", "none")
    options_type = FairGRAPEOptions
    value_fn = fairgrape_importance

    @override
    def choose(
        self, values: dict[str, Tensor], stats: GroupStatistics, rnd: _Round, options: Any
    ) -> dict[str, Tensor]:
        cand = rnd.candidates(values)
        g = stats.num_groups
        parts = [list(values)] if rnd.scope == "global" else [[n] for n in values]
        scores = {
            n: torch.zeros(v.shape[1:], dtype=torch.float64, device=v.device)
            for n, v in values.items()
        }
        for names in parts:
            total = sum(math.prod(values[n].shape[1:]) for n in names)
            n_keep = total - num_to_prune(rnd.target, total)
            imp = torch.cat([values[n].reshape(g, -1) for n in names], dim=1)
            cmask = torch.cat([cand[n].reshape(-1).cpu() for n in names])
            idx = cmask.nonzero().flatten()
            order = _greedy_keep(
                imp[:, idx.to(imp.device)], min(n_keep, idx.numel()), options.batch
            )
            flat = torch.zeros(total, dtype=torch.float64)
            kept = idx[torch.tensor(order, dtype=torch.long)]
            flat[kept] = torch.arange(len(order), 0, -1, dtype=torch.float64)
            scores.update(rnd.unflatten(flat, {n: values[n] for n in names}))
        return rnd.select(scores)


def fairgrape_masks(
    params: Mapping[str, Tensor],
    stats: GroupStatistics,
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
    scope: str = "global",
    batch: int = 1,
) -> dict[str, Tensor]:
    """FairGRAPE: keep weights greedily so each group's importance share stays at its target.

    Among the weights not yet pruned, the target share of group a is
    ``T_a = Σ_i I_{a,i} / Σ_{b,i} I_{b,i}`` (over the scope: all weights, or one layer). The
    greedy starts from an empty keep-set with shares ``1/G``; it repeatedly takes the group
    with the largest deficit ``argmin_a(share_a − T_a)`` (ties: lowest id) and keeps that
    group's most important weight not yet kept (ties: lowest flat index), ``batch`` weights per
    choice of group (their ``para_batch``), until ``N − round(s·N)`` weights are kept.

    Args:
        params: FQN -> weight.
        stats: per-group statistics (gradients needed).
        sparsity: target cumulative sparsity in ``[0, 1)``.
        current_masks: masks of earlier rounds (``True`` = kept), or None.
        scope: ``"global"`` or ``"layerwise"``.
        batch: weights kept per choice of group (>= 1).

    Returns:
        FQN -> bool mask (``True`` = kept).

    Example:
        >>> s = GroupStatistics({"w": torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])},
        ...                     torch.zeros(2), torch.ones(2))
        >>> fairgrape_masks({"w": torch.ones(3)}, s, 1 / 3)["w"].tolist()
        [True, True, False]
    """
    options = FairGRAPEOptions(batch)
    return FAIRGRAPE.masks(_context(params, stats, sparsity, current_masks, scope, options))


# --------------------------------------------------------------------------- FairPrune


@dataclass(frozen=True)
class FairPruneOptions:
    """Options of ``"fairprune"``.

    Attributes:
        beta: trade-off β >= 0 of ``S_rest − β · S_worst``.
        worst: id of the worst-served group (``None``: the highest mean loss).
        others: ``"mean"`` (count-weighted) or ``"max"`` over the other groups.
    """

    beta: float = 0.5
    worst: int | None = None
    others: str = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", check_real(self.beta, "beta", low=0.0))
        check_int(self.worst, "worst", 0, allow_none=True)
        check_choice(self.others, "others", ("mean", "max"))


def _worst_group(stats: GroupStatistics, worst: int | None) -> int:
    g = stats.num_groups
    if worst is not None:
        if isinstance(worst, bool) or not isinstance(worst, int) or not 0 <= worst < g:
            raise ValueError(f"Expected `worst` to be a group id in [0, {g}), but got {worst!r}")
        return worst
    mean = stats.mean_loss
    present = stats.counts > 0
    if not bool(present.any()):
        raise ValueError("Expected `stats` to hold at least one group with samples, but got none")
    masked = torch.where(present, mean, torch.full_like(mean, -math.inf))
    return int(torch.argmax(masked))  # first maximum: ties -> lowest id


def fairprune_saliency(params: Mapping[str, Tensor], stats: GroupStatistics) -> dict[str, Tensor]:
    """Per-group OBD saliency ``S_{a,i} = ½ h_{a,i} θ_i²`` (FQN -> ``[G, *shape]``).

    Example:
        >>> s = GroupStatistics({"w": torch.zeros(2, 2)}, torch.zeros(2), torch.ones(2),
        ...                     curvature_sums={"w": torch.tensor([[1.0, 2.0], [4.0, 0.0]])})
        >>> fairprune_saliency({"w": torch.tensor([1.0, 2.0])}, s)["w"]
        tensor([[0.5000, 4.0000],
                [2.0000, 0.0000]])
    """
    curv = stats.curvature_means()
    return {n: 0.5 * curv[n] * p.detach().to(curv[n].dtype) ** 2 for n, p in params.items()}


class FairPrune(_FairCriterion):
    """FairPrune (Wu et al., 2022): prune what the well-served groups need, the worst not.

    See `fairprune_masks`.
    """

    name = "fairprune"
    options_type = FairPruneOptions
    value_fn = fairprune_saliency

    @override
    def check_options(self, options: Any, num_groups: int) -> None:
        if options is not None and options.worst is not None and options.worst >= num_groups:
            raise ValueError(
                f"Expected `worst` to be a group id in [0, {num_groups}), but got {options.worst!r}"
            )

    @override
    def choose(
        self, values: dict[str, Tensor], stats: GroupStatistics, rnd: _Round, options: Any
    ) -> dict[str, Tensor]:
        bad = _worst_group(stats, options.worst)
        counts = stats.counts.to(torch.float64)
        rest = [a for a in range(stats.num_groups) if a != bad and float(counts[a]) > 0]
        keys: dict[str, Tensor] = {}
        for n, s in values.items():
            if not rest:
                s_rest = torch.zeros_like(s[0])
            elif options.others == "mean":
                wts = counts[rest].to(s.device)
                wts = wts / wts.sum()
                s_rest = (s[rest] * wts.reshape(-1, *([1] * (s.dim() - 1)))).sum(0)
            else:
                s_rest = s[rest].amax(0)
            keys[n] = -(s_rest - options.beta * s[bad])  # largest priority pruned first
        return rnd.select(_rank_scores(keys))


def fairprune_masks(
    params: Mapping[str, Tensor],
    stats: GroupStatistics,
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
    scope: str = "global",
    beta: float = 0.5,
    worst: int | None = None,
    others: str = "mean",
) -> dict[str, Tensor]:
    """FairPrune: prune first the weights the well-served groups need and the worst does not.

    Pruning priority ``P_i = S_{rest,i} − β · S_{worst,i}`` (largest pruned first, ties by
    flat index) with ``S`` from `fairprune_saliency`; ``worst`` is the group with the highest
    mean loss unless given; ``S_rest`` is the count-weighted mean (``others="mean"``) or the
    maximum (``"max"``) over the other groups with samples. With two groups this is the
    paper's ``S_0 − β S_1`` (group 0 the privileged, 1 the unprivileged).

    Args:
        params: FQN -> weight.
        stats: per-group statistics with a curvature.
        sparsity: target cumulative sparsity in ``[0, 1)``.
        current_masks: masks of earlier rounds, or None.
        scope: ``"global"`` or ``"layerwise"``.
        beta: trade-off β >= 0.
        worst: id of the worst-served group (None: highest mean loss).
        others: ``"mean"`` or ``"max"``.

    Returns:
        FQN -> bool mask (``True`` = kept).

    Example:
        >>> curv = {"w": torch.tensor([[2.0, 2.0, 0.0], [0.0, 2.0, 2.0]])}
        >>> s = GroupStatistics({"w": torch.zeros(2, 3)}, torch.tensor([0.1, 0.9]),
        ...                     torch.ones(2), curvature_sums=curv)
        >>> fairprune_masks({"w": torch.ones(3)}, s, 1 / 3, beta=1.0)["w"].tolist()
        [False, True, True]
    """
    options = FairPruneOptions(beta, worst, others)
    return FAIRPRUNE.masks(_context(params, stats, sparsity, current_masks, scope, options))


# --------------------------------------------------------------------------- worst group


@dataclass(frozen=True)
class WorstGroupOptions:
    """Options of ``"worst_group"`` (see `worst_group_masks`).

    Attributes:
        iterations: multiplicative-weights iterations (>= 1).
        eta: step size (``None``: ``sqrt(8 ln(G) / iterations)``, at least 0.1).
        clip: clip the forecasts at 0.
        swaps: rounds of the 1-exchange local search (0 = off).
    """

    iterations: int = 100
    eta: float | None = None
    clip: bool = True
    swaps: int = 10

    def __post_init__(self) -> None:
        check_int(self.iterations, "iterations", 1)
        object.__setattr__(self, "eta", check_real(self.eta, "eta", low=0.0, allow_none=True))
        check_bool(self.clip, "clip")
        check_int(self.swaps, "swaps", 0)


def worst_group_forecasts(
    params: Mapping[str, Tensor], stats: GroupStatistics, clip: bool = True
) -> dict[str, Tensor]:
    """Per-group forecasts ``Δ_{a,i} = −ḡ_{a,i} θ_i + ½ h_{a,i} θ_i²`` (clipped at 0 by default).

    ``Δ_{a,i}`` is the diagonal second-order forecast of the increase of group a's mean loss
    when weight i alone is set to zero. Clipping matters: a negative forecast of a *large*
    weight (a first-order term that predicts a gain) lies far outside the forecast's range;
    pruning such weights first collapsed models to chance in the pilot.

    Example:
        >>> s = GroupStatistics({"w": torch.tensor([[3.0, -1.0]])}, torch.zeros(1),
        ...                     torch.ones(1), curvature_sums={"w": torch.tensor([[2.0, 0.0]])})
        >>> worst_group_forecasts({"w": torch.tensor([1.0, 2.0])}, s)["w"]
        tensor([[0., 2.]])
        >>> worst_group_forecasts({"w": torch.tensor([1.0, 2.0])}, s, clip=False)["w"]
        tensor([[-2.,  2.]])
    """
    grads = stats.grad_means()
    curv = stats.curvature_means()
    out: dict[str, Tensor] = {}
    for n, p in params.items():
        theta = p.detach().to(grads[n].dtype)
        d = -grads[n] * theta + 0.5 * curv[n] * theta * theta
        out[n] = d.clamp_min(0.0) if clip else d
    return out


def forecast_group_damage(
    params: Mapping[str, Tensor],
    stats: GroupStatistics,
    before: Mapping[str, Tensor] | None,
    after: Mapping[str, Tensor],
    clip: bool = False,
) -> Tensor:
    """Forecast increase of every group's mean loss from pruning ``before`` -> ``after``.

    ``Σ_{i pruned in after, kept in before} Δ_{a,i}`` with the diagonal forecasts of
    `worst_group_forecasts` (cross terms between weights ignored), float64 ``[G]``.

    Example:
        >>> s = GroupStatistics({"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}, torch.zeros(2),
        ...                     torch.ones(2), curvature_sums={"w": torch.zeros(2, 2)})
        >>> forecast_group_damage({"w": torch.tensor([-1.0, 2.0])}, s, None,
        ...                       {"w": torch.tensor([False, True])})
        tensor([1., 0.], dtype=torch.float64)
    """
    deltas = worst_group_forecasts(params, stats, clip=clip)
    total = torch.zeros(stats.num_groups, dtype=torch.float64)
    for n, d in deltas.items():
        newly = ~after[n].to(d.device).bool()
        if before is not None:
            newly &= before[n].to(d.device).bool()
        total += (d * newly).reshape(d.shape[0], -1).sum(1).to(torch.float64).cpu()
    return total


@dataclass
class MinimaxResult:
    """Result of `worst_group_masks`.

    Attributes:
        masks: FQN -> bool mask (``True`` = kept).
        damage: ``[G]`` forecast damage ``Σ Δ_{a,i}`` of the chosen round (clipped Δ).
        lower_bound: a certified lower bound on ``min_P max_a D_a(P)`` over all masks P of
            this round (the best Lagrangian dual value ``max_t min_P w_t·D(P)`` seen).
        weights: ``[G]`` group weights whose best response was chosen.
        iterations: multiplicative-weights iterations run.
    """

    masks: dict[str, Tensor]
    damage: Tensor
    lower_bound: float
    weights: Tensor
    iterations: int


class WorstGroup(_FairCriterion):
    """Ours: minimax over per-group second-order damage forecasts (see `worst_group_masks`).

    On channel units the forecast of a channel is the sum of its entries' forecasts, and the
    local search never leaves a channel group without a kept channel.
    """

    name = "worst_group"
    options_type = WorstGroupOptions

    @override
    def values(
        self, params: Mapping[str, Tensor], stats: GroupStatistics, options: Any
    ) -> dict[str, Tensor]:
        return worst_group_forecasts(params, stats, clip=options.clip)

    @override
    def masks(self, ctx: CriterionContext) -> dict[str, Tensor]:
        return ctx.units.expand(self.minimax(ctx).masks)

    def minimax(self, ctx: CriterionContext) -> MinimaxResult:
        """The full result of the round, with unit masks (weights: the masks)."""
        options = ctx.options if ctx.options is not None else WorstGroupOptions()
        with torch.no_grad():
            values, stats, rnd = self._prepare(ctx, options)
            return self._minimax(values, stats.num_groups, rnd, options)

    def _minimax(
        self, deltas: dict[str, Tensor], g: int, rnd: _Round, options: WorstGroupOptions
    ) -> MinimaxResult:
        iterations = options.iterations
        eta = options.eta
        if eta is None:
            eta = max(0.1, math.sqrt(8.0 * math.log(max(g, 2)) / iterations))
        cand = rnd.candidates(deltas)
        flat_d = torch.cat([deltas[n].reshape(g, -1) for n in deltas], dim=1)  # [G, N]
        flat_c = torch.cat([cand[n].reshape(-1) for n in deltas]).to(flat_d.device)
        weights = torch.full((g,), 1.0 / g, dtype=torch.float64, device=flat_d.device)
        best: tuple[float, dict[str, Tensor], Tensor, Tensor] | None = None
        lower = -math.inf
        for _ in range(iterations):
            masks = rnd.select(rnd.unflatten((weights[:, None] * flat_d).sum(0), deltas))
            flat_m = torch.cat([masks[n].reshape(-1) for n in deltas]).to(flat_d.device)
            damage = (flat_d * (flat_c & ~flat_m)).sum(1)
            value = float(damage.max())
            lower = max(lower, float((weights * damage).sum()))
            if best is None or value < best[0]:
                best = (value, masks, damage.clone(), weights.clone())
            if value <= 0:
                break
            weights = weights * torch.exp(eta * damage / value)
            weights = weights / weights.sum()
        assert best is not None
        masks, damage = best[1], best[2]
        if options.swaps > 0:
            layer_ids = torch.cat(
                [
                    torch.full((math.prod(v.shape[1:]),), i, dtype=torch.long)
                    for i, v in enumerate(deltas.values())
                ]
            ).to(flat_d.device)
            flat_m = torch.cat([masks[n].reshape(-1) for n in deltas]).to(flat_d.device)
            keep_one = rnd.units.keep_one and rnd.scope == "global"
            newly, damage = _swap_search(
                flat_d,
                flat_c,
                flat_c & ~flat_m,
                damage,
                layer_ids,
                rnd.scope,
                options.swaps,
                keep_one=keep_one,
            )
            masks = rnd.unflatten(flat_c & ~newly, deltas)
        return MinimaxResult(
            masks=masks,
            damage=damage.cpu(),
            lower_bound=lower,
            weights=best[3].cpu(),
            iterations=iterations,
        )


def worst_group_masks(
    params: Mapping[str, Tensor],
    stats: GroupStatistics,
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
    scope: str = "global",
    iterations: int = 100,
    eta: float | None = None,
    clip: bool = True,
    swaps: int = 10,
) -> MinimaxResult:
    """Ours: the masks of this round that minimize the forecast worst-group damage.

    Objective: ``min_P max_a D_a(P)`` with ``D_a(P) = Σ_{i ∈ P} Δ_{a,i}``, P the weights
    pruned in this round (exactly ``round(s·N) − already pruned`` of them, globally or per
    layer). Multiplicative weights over the group weights ``w`` (the simplex): for each ``w``
    the best response, the ``P`` minimizing ``Σ_a w_a D_a(P)``, is exactly the ``k`` lowest
    scores ``Σ_a w_a Δ_{a,i}`` (global or per-layer top-k, `global_masks`/`layerwise_masks`);
    then ``w_a ← w_a · exp(η · D_a / max_b D_b)``, normalized. The iterate with the lowest
    ``max_a D_a`` is returned (iteration 0 uses uniform weights, so the result is never worse
    than the uniform-weight selection), with the certificate ``max_t w_t·D(P_t) ≤ OPT``.
    Designed for many small rounds with statistics recomputed each round: the forecast is a
    local (second-order) one.

    Args:
        params: FQN -> weight.
        stats: per-group statistics with a curvature.
        sparsity: target cumulative sparsity in ``[0, 1)``.
        current_masks: masks of earlier rounds, or None.
        scope: ``"global"`` or ``"layerwise"``.
        iterations: multiplicative-weights iterations (>= 1).
        eta: step size (default ``sqrt(8 ln(G) / iterations)``, at least 0.1).
        clip: clip the forecasts at 0 (see `worst_group_forecasts`).
        swaps: rounds of a 1-exchange local search after the multiplicative weights (one
            pruned and one kept weight swapped while the worst-group forecast drops; 0 = off).
            On the 12-weight brute-force tests it reaches the exact optimum.

    Returns:
        `MinimaxResult`.

    Example:
        >>> curv = {"w": torch.zeros(2, 4)}
        >>> grads = {"w": torch.tensor([[-1.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, -1.0]])}
        >>> s = GroupStatistics(grads, torch.zeros(2), torch.ones(2), curvature_sums=curv)
        >>> res = worst_group_masks({"w": torch.tensor([1.0, 2.0, 1.5, 3.0])}, s, 0.5)
        >>> res.masks["w"].tolist(), res.damage.tolist()  # one weight of each group
        ([False, True, False, True], [1.0, 1.5])
    """
    options = WorstGroupOptions(iterations, eta, clip, swaps)
    ctx = _context(params, stats, sparsity, current_masks, scope, options)
    return WORST_GROUP.minimax(ctx)


def _swap_search(
    delta: Tensor,
    cand: Tensor,
    newly: Tensor,
    damage: Tensor,
    layer_ids: Tensor,
    scope: str,
    swaps: int,
    width: int = 64,
    keep_one: bool = False,
) -> tuple[Tensor, Tensor]:
    """Local search: exchange one pruned and one kept unit while the worst damage drops.

    Candidates: the ``width`` units pruned this round with the largest forecast for the
    currently worst group, and the ``width`` kept candidates with the smallest one (same layer
    when layerwise). The best pair by the resulting ``max_a D_a`` is applied if it improves;
    ties by the lowest flat indices. The pruned count never changes; with ``keep_one`` no
    layer loses its last kept unit.
    """
    newly = newly.clone()
    damage = damage.clone()
    for _ in range(swaps):
        worst = int(torch.argmax(damage))
        current = float(damage[worst])
        out_idx = newly.nonzero().flatten()
        in_idx = (cand & ~newly).nonzero().flatten()
        if out_idx.numel() == 0 or in_idx.numel() == 0:
            break
        row = delta[worst]
        o = out_idx[torch.sort(-row[out_idx], stable=True).indices[:width]]
        i = in_idx[torch.sort(row[in_idx], stable=True).indices[:width]]
        trial = damage[None, None, :] - delta[:, o].t()[:, None, :] + delta[:, i].t()[None, :, :]
        value = trial.amax(2)  # [len(o), len(i)]
        same = layer_ids[o][:, None] == layer_ids[i][None, :]
        invalid = ~same if scope == "layerwise" else torch.zeros_like(same)
        if keep_one:  # pruning a layer's last kept unit needs one back from the same layer
            kept = torch.bincount(layer_ids[in_idx], minlength=int(layer_ids.max()) + 1)
            invalid |= (kept[layer_ids[i]] <= 1)[None, :] & ~same
        value = torch.where(invalid, torch.full_like(value, math.inf), value)
        flat_best = int(torch.argmin(value.reshape(-1)))
        a, b = divmod(flat_best, value.shape[1])
        if not float(value[a, b]) < current * (1 - 1e-12) - 1e-15:
            break
        newly[o[a]] = False
        newly[i[b]] = True
        damage = trial[a, b].clone()
    return newly, damage


# --------------------------------------------------------------------------- registry

FAIRGRAPE = register(FairGRAPE())
FAIRPRUNE = register(FairPrune())
WORST_GROUP = register(WorstGroup())
FAIR_CRITERIA: tuple[str, ...] = (FAIRGRAPE.name, FAIRPRUNE.name, WORST_GROUP.name)
"""Names of the fairness-aware criteria (registered in `CRITERIA`)."""


def fair_masks(
    name: str,
    params: Mapping[str, Tensor],
    stats: GroupStatistics,
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
    scope: str = "global",
    **options: Any,
) -> dict[str, Tensor]:
    """Masks of a fairness-aware criterion by name, from given statistics.

    Args:
        name: one of `FAIR_CRITERIA`.
        params: FQN -> weight (the prunable parameters).
        stats: `group_statistics` of the current model on the fairness batches (all-reduced
            under data parallelism).
        sparsity: target cumulative sparsity in ``[0, 1)``.
        current_masks: masks of earlier rounds (``True`` = kept); never un-pruned.
        scope: ``"global"`` or ``"layerwise"``.
        **options: the criterion's options (`FairGRAPEOptions`, `FairPruneOptions`,
            `WorstGroupOptions`).

    Returns:
        FQN -> bool mask with exactly ``round(s·N)`` pruned weights (per layer when
        layerwise).

    Raises:
        ValueError: unknown name or options, bad arguments.

    Example:
        >>> s = GroupStatistics({"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}, torch.zeros(2),
        ...                     torch.ones(2), curvature_sums={"w": torch.ones(2, 2)})
        >>> fair_masks("fairprune", {"w": torch.ones(2)}, s, 0.5, beta=0.0)["w"].sum().item()
        1
    """
    if name not in FAIR_CRITERIA:
        raise ValueError(f"Expected `name` to be one of {FAIR_CRITERIA}, but got {name!r}")
    criterion = CRITERIA[name]
    typed = criterion.make_options(options)
    return criterion.masks(_context(params, stats, sparsity, current_masks, scope, typed))
