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

**Statistics are sums.** `~lightning_fairprune.diagnostics.group_statistics` (the diagnostics'
pass engine) returns per-group sums (gradients, curvature, losses, counts) over the samples it
saw; `GroupStatistics.reduce` sums them across processes (pass an all-reduce). With
all-reduced statistics, identical weights and identical current masks, every criterion is a
deterministic function of its inputs, so every process computes the same masks (no broadcast
needed). Masks are built by
:func:`~lightning_fairprune.pruning.masks.global_masks` /
:func:`~lightning_fairprune.pruning.masks.layerwise_masks`: exactly ``round(s · N)`` pruned
weights (globally or per layer), already-pruned weights stay pruned, ties by flat index.

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
    >>> from lightning_fairprune.diagnostics import group_statistics
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_fairprune.diagnostics.statistics import GroupStatistics
from lightning_fairprune.pruning.masks import global_masks, layerwise_masks, num_to_prune

__all__ = [
    "FAIR_CRITERIA",
    "FAIR_CRITERION_OPTIONS",
    "SCOPES",
    "MinimaxResult",
    "check_fair_options",
    "fair_masks",
    "fairgrape_importance",
    "fairgrape_masks",
    "fairprune_masks",
    "fairprune_saliency",
    "forecast_group_damage",
    "worst_group_forecasts",
    "worst_group_masks",
]

FAIR_CRITERIA: tuple[str, ...] = ("fairgrape", "fairprune", "worst_group")
"""Names accepted by `fair_masks`."""
FAIR_CRITERION_OPTIONS: dict[str, frozenset[str]] = {
    "fairgrape": frozenset({"batch"}),
    "fairprune": frozenset({"beta", "worst", "others"}),
    "worst_group": frozenset({"iterations", "eta", "clip", "swaps"}),
}
"""The keyword options each fairness-aware criterion accepts (`fair_masks`' ``**options``)."""
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
    if scope not in SCOPES:
        raise ValueError(f"Expected `scope` to be one of {SCOPES}, but got {scope!r}")
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


def _select(
    scores: Mapping[str, Tensor],
    sparsity: float,
    current: Mapping[str, Tensor] | None,
    scope: str,
) -> dict[str, Tensor]:
    if scope == "global":
        return global_masks(scores, sparsity, current)
    return layerwise_masks(scores, sparsity, current)


def _rank_scores(keys: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Scores whose order is the order of ``keys`` (lowest first), ties by flat index.

    The score of a weight is its 1-based position in a stable ascending sort of all keys
    (float64: exact up to 2**53 weights), so the mask builders prune by ``keys`` with the
    same tie rule as theirs.
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


def _check_float(name: str, value: object, lo: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (lo is not None and value < lo)
    ):
        bound = "" if lo is None else f" >= {lo}"
        raise ValueError(f"Expected `{name}` to be a finite float{bound}, but got {value!r}")
    return float(value)


def _candidates(params: Mapping[str, Tensor], current: Mapping[str, Tensor] | None) -> dict:
    if current is None:
        return {
            n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in params.items()
        }
    return {n: current[n].to(p.device).bool() for n, p in params.items()}


# --------------------------------------------------------------------------- FairGRAPE


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
    w = _check_inputs(params, stats, scope)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"Expected `batch` to be an int >= 1, but got {batch!r}")
    importance = fairgrape_importance(w, stats)
    cand = _candidates(w, current_masks)
    g = stats.num_groups
    groups_of_names = [list(w)] if scope == "global" else [[n] for n in w]
    scores: dict[str, Tensor] = {
        n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in w.items()
    }
    for names in groups_of_names:
        total = sum(w[n].numel() for n in names)
        n_keep = total - num_to_prune(sparsity, total)
        imp = torch.cat([importance[n].reshape(g, -1) for n in names], dim=1)
        cmask = torch.cat([cand[n].reshape(-1).cpu() for n in names])
        idx = cmask.nonzero().flatten()
        order = _greedy_keep(imp[:, idx.to(imp.device)], min(n_keep, idx.numel()), batch)
        flat = torch.zeros(total, dtype=torch.float64)
        kept = idx[torch.tensor(order, dtype=torch.long)]
        flat[kept] = torch.arange(len(order), 0, -1, dtype=torch.float64)
        start = 0
        for n in names:
            k = w[n].numel()
            scores[n] = flat[start : start + k].reshape(w[n].shape).to(w[n].device)
            start += k
    return _select(scores, sparsity, current_masks, scope)


# --------------------------------------------------------------------------- FairPrune


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
    w = _check_inputs(params, stats, scope)
    beta = _check_float("beta", beta, 0.0)
    if others not in ("mean", "max"):
        raise ValueError(f"Expected `others` to be 'mean' or 'max', but got {others!r}")
    bad = _worst_group(stats, worst)
    sal = fairprune_saliency(w, stats)
    counts = stats.counts.to(torch.float64)
    rest = [a for a in range(stats.num_groups) if a != bad and float(counts[a]) > 0]
    keys: dict[str, Tensor] = {}
    for n, s in sal.items():
        if not rest:
            s_rest = torch.zeros_like(s[0])
        elif others == "mean":
            wts = counts[rest].to(s.device)
            wts = wts / wts.sum()
            s_rest = (s[rest] * wts.reshape(-1, *([1] * (s.dim() - 1)))).sum(0)
        else:
            s_rest = s[rest].amax(0)
        priority = s_rest - beta * s[bad]
        keys[n] = -priority  # lowest key pruned first
    return _select(_rank_scores(keys), sparsity, current_masks, scope)


# --------------------------------------------------------------------------- worst group


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
    w = _check_inputs(params, stats, scope)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"Expected `iterations` to be an int >= 1, but got {iterations!r}")
    g = stats.num_groups
    if eta is None:
        eta = max(0.1, math.sqrt(8.0 * math.log(max(g, 2)) / iterations))
    eta = _check_float("eta", eta, 0.0)
    deltas = worst_group_forecasts(w, stats, clip=clip)
    cand = _candidates(w, current_masks)
    flat_d = torch.cat([deltas[n].reshape(g, -1) for n in w], dim=1)  # [G, N]
    flat_c = torch.cat([cand[n].reshape(-1) for n in w]).to(flat_d.device)
    weights = torch.full((g,), 1.0 / g, dtype=torch.float64, device=flat_d.device)
    best: tuple[float, dict[str, Tensor], Tensor, Tensor] | None = None
    lower = -math.inf
    for _ in range(iterations):
        combined = (weights[:, None] * flat_d).sum(0)
        scores: dict[str, Tensor] = {}
        start = 0
        for n, p in w.items():
            scores[n] = combined[start : start + p.numel()].reshape(p.shape).to(p.device)
            start += p.numel()
        masks = _select(scores, sparsity, current_masks, scope)
        flat_m = torch.cat([masks[n].reshape(-1) for n in w]).to(flat_d.device)
        newly = flat_c & ~flat_m
        damage = (flat_d * newly).sum(1)
        value = float(damage.max())
        lower = max(lower, float((weights * damage).sum()))
        if best is None or value < best[0]:
            best = (value, masks, damage.clone(), weights.clone())
        top = float(damage.max())
        if top <= 0:
            break
        weights = weights * torch.exp(eta * damage / top)
        weights = weights / weights.sum()
    assert best is not None
    masks, damage = best[1], best[2]
    if swaps > 0:
        layer_ids = torch.cat(
            [torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(w.values())]
        ).to(flat_d.device)
        flat_m = torch.cat([masks[n].reshape(-1) for n in w]).to(flat_d.device)
        newly = flat_c & ~flat_m
        newly, damage = _swap_search(flat_d, flat_c, newly, damage, layer_ids, scope, swaps)
        flat_m = flat_c & ~newly
        masks = {}
        start = 0
        for n, p in w.items():
            masks[n] = flat_m[start : start + p.numel()].reshape(p.shape).to(p.device)
            start += p.numel()
    return MinimaxResult(
        masks=masks,
        damage=damage.cpu(),
        lower_bound=lower,
        weights=best[3].cpu(),
        iterations=iterations,
    )


def _swap_search(
    delta: Tensor,
    cand: Tensor,
    newly: Tensor,
    damage: Tensor,
    layer_ids: Tensor,
    scope: str,
    swaps: int,
    width: int = 64,
) -> tuple[Tensor, Tensor]:
    """Local search: exchange one pruned and one kept weight while the worst damage drops.

    Candidates: the ``width`` weights pruned this round with the largest forecast for the
    currently worst group, and the ``width`` kept candidates with the smallest one (same layer
    when layerwise). The best pair by the resulting ``max_a D_a`` is applied if it improves;
    ties by the lowest flat indices. The pruned count never changes.
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
        if scope == "layerwise":
            same = layer_ids[o][:, None] == layer_ids[i][None, :]
            value = torch.where(same, value, torch.full_like(value, math.inf))
        flat_best = int(torch.argmin(value.reshape(-1)))
        a, b = divmod(flat_best, value.shape[1])
        if not float(value[a, b]) < current * (1 - 1e-12) - 1e-15:
            break
        newly[o[a]] = False
        newly[i[b]] = True
        damage = trial[a, b].clone()
    return newly, damage


# --------------------------------------------------------------------------- dispatch


def fair_masks(
    name: str,
    params: Mapping[str, Tensor],
    stats: GroupStatistics,
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
    scope: str = "global",
    **options: Any,
) -> dict[str, Tensor]:
    """Masks of a fairness-aware criterion by name (the entry point for pruning callbacks).

    Args:
        name: one of `FAIR_CRITERIA`.
        params: FQN -> weight (the prunable parameters).
        stats: `group_statistics` of the current model on the fairness batches (all-reduced
            under data parallelism).
        sparsity: target cumulative sparsity in ``[0, 1)``.
        current_masks: masks of earlier rounds (``True`` = kept); never un-pruned.
        scope: ``"global"`` or ``"layerwise"``.
        **options: criterion options: ``batch`` (fairgrape); ``beta``, ``worst``, ``others``
            (fairprune); ``iterations``, ``eta``, ``clip``, ``swaps`` (worst_group).

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
    key = _option_names(name, options)
    if key == "fairgrape":
        return fairgrape_masks(params, stats, sparsity, current_masks, scope, **options)
    if key == "fairprune":
        return fairprune_masks(params, stats, sparsity, current_masks, scope, **options)
    return worst_group_masks(params, stats, sparsity, current_masks, scope, **options).masks


def _option_names(name: str, options: Mapping[str, Any]) -> str:
    """The criterion's key, after checking that every option name is one it accepts."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in FAIR_CRITERION_OPTIONS:
        raise ValueError(f"Expected `name` to be one of {FAIR_CRITERIA}, but got {name!r}")
    allowed = FAIR_CRITERION_OPTIONS[key]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"Expected options of {key!r} among {sorted(allowed)}, but got {unknown}")
    return key


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_fair_options(
    name: str, options: Mapping[str, Any], num_groups: int | None = None
) -> None:
    """Check a fairness-aware criterion's options (names and values) without any model.

    The option names are checked against `FAIR_CRITERION_OPTIONS`, and the values by running
    the criterion once on a tiny synthetic problem with ``num_groups`` groups (four weights,
    half of them pruned): whatever `fair_masks` would refuse at a pruning round is refused
    here, with the same message. Pruning callbacks call it at construction (``num_groups``
    unknown: as many groups as a given ``worst`` needs) and again at fit start, when the
    number of groups is known (FairPrune's ``worst`` must name one of them).

    Args:
        name: one of `FAIR_CRITERIA`.
        options: the keyword options.
        num_groups: number of groups G of the data the criterion will see (``None``: not
            known yet).

    Raises:
        ValueError: an unknown criterion or option name, or a bad option value.

    Example:
        >>> check_fair_options("fairprune", {"beta": 0.5})
        >>> check_fair_options("fairprune", {"betta": 0.5})
        Traceback (most recent call last):
        ...
        ValueError: Expected options of 'fairprune' among ['beta', 'others', 'worst'], but got ['betta']
        >>> check_fair_options("fairprune", {"worst": 3}, num_groups=2)
        Traceback (most recent call last):
        ...
        ValueError: Expected `worst` to be a group id in [0, 2), but got 3
    """  # noqa: E501
    key = _option_names(name, options)
    worst = options.get("worst")
    g = num_groups if num_groups is not None else max(2, worst + 1 if _is_id(worst) else 2)
    grads = {"w": torch.arange(g * 4, dtype=torch.float64).reshape(g, 4) - g * 2}
    stats = GroupStatistics(
        grads,
        torch.ones(g, dtype=torch.float64),
        torch.ones(g, dtype=torch.float64),
        curvature_sums={"w": torch.ones(g, 4, dtype=torch.float64)},
    )
    fair_masks(key, {"w": torch.tensor([1.0, -2.0, 3.0, -4.0])}, stats, 0.5, **options)
