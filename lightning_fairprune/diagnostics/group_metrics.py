"""Field-standard group fairness metrics from streaming, DDP-summable confusion counts.

Everything is computed from one count tensor, the per-group confusion matrix
``confusion[g, t, p]`` (int64, shape ``[G, C, C]``: samples of group ``g`` with true class
``t`` predicted as ``p``). Counts of disjoint batches (or processes) add up to the counts of
their union, so an all-reduce with ``sum`` gives exactly the numbers of one pass over all data.

Definitions follow fairlearn (``fairlearn.metrics``), which the tests use as the reference:

* accuracy of a group: correct / count; per-class recall within a group: ``TP_c / support_c``.
* binary tasks (``C == 2``, positive class ``pos_label``): TPR = TP / (TP + FN),
  FPR = FP / (FP + TN), selection rate = (TP + FP) / count.
* demographic-parity difference / ratio: max - min / min / max of the selection rate over
  groups; equalized-odds difference: max(TPR difference, FPR difference); equal-opportunity
  difference: the TPR difference; worst-group accuracy / TPR: the minimum over groups.
* multiclass: the selection rate of class ``c`` is one-vs-rest, P(prediction = c | group);
  demographic parity over classes is the largest per-class DP difference and the smallest
  per-class DP ratio (parity must hold for every class; with ``C == 2`` it equals binary DP).

**Absent and undefined.** A group with no samples is *absent*: all its rates are NaN and it is
left out of every summary (fairlearn's ``MetricFrame`` never sees such a group, so the
summaries agree). A rate whose denominator is 0 in a present group (TPR of a group without
positives, FPR of a group without negatives, recall of a class the group lacks) is
*undefined*: ``zero_division`` (default NaN) is returned and NaN values are left out of the
summaries. fairlearn instead returns 0 for such a TPR/FPR (sklearn's ``confusion_matrix``
normalization turns 0/0 into 0) and counts that 0 in its summaries, which makes a group
without positives look like the worst-served one; pass ``zero_division=0.0`` to reproduce
fairlearn exactly. A summary over no defined group is NaN; a ratio whose maximum is 0 is NaN
(as fairlearn's 0/0).

**Uncertainty.** Every rate carries a Wilson score interval (`wilson_interval`) at the given
confidence level. A present group with fewer than ``min_group_size`` samples (default
`SMALL_GROUP_SIZE` = 30) is flagged ``small``: at n = 30 one sample moves a rate by 3.3 points
and the 95% Wilson half-width at p = 0.5 is 0.17 (0.14 at n = 43, 0.10 at n = 100). Small
groups are still included in the summaries (as fairlearn does); the flag is for a warning.

**Intensification guard.** `guarded_intensification_ratio` returns NaN ("undefined") instead of
a huge I = B̃_t / B̃ when the dense balance B̃ is within noise of 0 (see its docstring).

Group names and intersectional groups live in `lightning_fairprune.diagnostics.groups`.

**Any torchmetrics metric per group.** `PerGroupMetric` keeps one clone of a metric per group
and updates each clone only with its own group's samples, so a batch that lacks a group leaves
that group's state untouched (torchmetrics 1.9's ``BinaryGroupStatRates`` credits the samples
of a batch's first present group to group 0 instead, torchmetrics issue #3489).

This module imports only torch (torchmetrics is duck-typed, never imported).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_pos_label, check_real
from lightning_fairprune.diagnostics.counts import check_confusion
from lightning_fairprune.diagnostics.recall import (
    _check_count,
    _check_labels,
    intensification_ratio,
)
from lightning_fairprune.distributed import all_reduce

__all__ = [
    "INTENSIFICATION_MIN_ABS_REF",
    "SMALL_GROUP_SIZE",
    "GroupMetrics",
    "PerGroupMetric",
    "Rate",
    "group_metrics",
    "guarded_intensification_ratio",
    "rate",
    "wilson_interval",
]

SMALL_GROUP_SIZE = 30
"""Groups with fewer samples than this are flagged ``small`` (see the module docstring)."""

INTENSIFICATION_MIN_ABS_REF = 0.02
"""|B̃_ref| below which an intensification ratio is undefined (recall within 2% of accuracy)."""


# --------------------------------------------------------------------------------------------
# Rates with Wilson intervals
# --------------------------------------------------------------------------------------------


def _check_confidence(confidence: float) -> None:
    check_real(confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True)


def wilson_interval(
    successes: Tensor, trials: Tensor, confidence: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Wilson score interval of a binomial proportion, elementwise.

    With p = k / n and z the two-sided normal quantile of ``confidence``:
    center = (k + z²/2) / (n + z²), half-width = z·√n / (n + z²) · √(p(1 - p) + z²/(4n)).

    Args:
        successes: counts k (any shape).
        trials: counts n (same shape); n = 0 gives NaN bounds.
        confidence: confidence level in (0, 1).

    Returns:
        ``(lower, upper)``, float64, clamped to [0, 1].

    Example:
        >>> import torch
        >>> lo, hi = wilson_interval(torch.tensor([5]), torch.tensor([10]))
        >>> round(lo.item(), 4), round(hi.item(), 4)
        (0.2366, 0.7634)
    """
    _check_confidence(confidence)
    k = torch.as_tensor(successes).to(torch.float64)
    n = torch.as_tensor(trials).to(torch.float64)
    if k.shape != n.shape:
        raise ValueError(
            "Expected `successes` and `trials` of the same shape, but got"
            f" {tuple(k.shape)} and {tuple(n.shape)}"
        )
    if k.numel() and bool(((k < 0) | (k > n)).any()):
        raise ValueError("Expected `successes` in [0, trials], but got a count outside it")
    z = float(torch.special.ndtri(torch.tensor(0.5 + float(confidence) / 2, dtype=torch.float64)))
    z2 = z * z
    empty = n <= 0
    n_safe = torch.where(empty, torch.ones_like(n), n)
    p = k / n_safe
    center = (k + z2 / 2) / (n_safe + z2)
    half = z * n_safe.sqrt() / (n_safe + z2) * (p * (1 - p) + z2 / (4 * n_safe)).sqrt()
    nan = torch.full_like(center, math.nan)
    lower = torch.where(empty, nan, (center - half).clamp(0.0, 1.0))
    upper = torch.where(empty, nan, (center + half).clamp(0.0, 1.0))
    return lower, upper


@dataclass(frozen=True)
class Rate:
    """A proportion per group (or per group and class) with its Wilson interval.

    Attributes:
        value: float64 rate ``successes / trials``; NaN for absent groups, ``zero_division``
            for present groups with ``trials == 0``.
        lower: Wilson lower bound (NaN where ``trials == 0``).
        upper: Wilson upper bound (NaN where ``trials == 0``).
        successes: int64 numerators.
        trials: int64 denominators.
    """

    value: Tensor
    lower: Tensor
    upper: Tensor
    successes: Tensor
    trials: Tensor


def rate(
    successes: Tensor,
    trials: Tensor,
    present: Tensor | None = None,
    confidence: float = 0.95,
    zero_division: float = math.nan,
) -> Rate:
    """A `Rate` from counts.

    Args:
        successes: numerators (int counts).
        trials: denominators, same shape.
        present: bool mask of present groups, broadcast against the counts (absent -> NaN);
            None: all present.
        confidence: Wilson confidence level in (0, 1).
        zero_division: value of a present rate whose denominator is 0 (NaN by default;
            fairlearn uses 0.0 for TPR/FPR).

    Returns:
        The `Rate`.

    Example:
        >>> import torch
        >>> r = rate(torch.tensor([1, 0, 0]), torch.tensor([4, 0, 0]),
        ...          present=torch.tensor([True, True, False]), zero_division=0.0)
        >>> r.value.tolist()
        [0.25, 0.0, nan]
    """
    k = torch.as_tensor(successes)
    n = torch.as_tensor(trials)
    lower, upper = wilson_interval(k, n, confidence)
    kf, nf = k.to(torch.float64), n.to(torch.float64)
    empty = nf <= 0
    value = kf / torch.where(empty, torch.ones_like(nf), nf)
    value = torch.where(empty, torch.full_like(value, float(zero_division)), value)
    if present is not None:
        value = torch.where(present.to(value.device), value, torch.full_like(value, math.nan))
    return Rate(value, lower, upper, k.to(torch.int64), n.to(torch.int64))


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _spread(values: Tensor) -> tuple[float, float, float, float]:
    """``(min, max, max - min, min / max)`` over finite entries (NaN when none)."""
    v = values[torch.isfinite(values)]
    if v.numel() == 0:
        return math.nan, math.nan, math.nan, math.nan
    lo, hi = float(v.min()), float(v.max())
    ratio = lo / hi if hi != 0.0 else math.nan
    return lo, hi, hi - lo, ratio


def _argmin_finite(values: Tensor) -> int | None:
    ok = torch.isfinite(values)
    if not bool(ok.any()):
        return None
    return int(torch.where(ok, values, torch.full_like(values, math.inf)).argmin())


@dataclass(frozen=True)
class GroupMetrics:
    """Per-group metrics and their summaries, computed by `group_metrics`.

    Attributes:
        confusion: the int64 ``[G, C, C]`` counts they come from.
        count: int64 samples per group ``[G]``.
        present: bool ``[G]``, groups with at least one sample.
        small: bool ``[G]``, present groups with fewer than ``min_group_size`` samples.
        accuracy: `Rate` ``[G]``.
        class_recall: `Rate` ``[G, C]``, recall of each class within each group.
        class_selection_rate: `Rate` ``[G, C]``, P(prediction = c | group) (one-vs-rest).
        tpr: `Rate` ``[G]`` for binary tasks, else None.
        fpr: `Rate` ``[G]`` for binary tasks, else None.
        selection_rate: `Rate` ``[G]`` of the positive class for binary tasks, else None.
        summary: floats keyed ``worst_group_accuracy``, ``accuracy_difference``,
            ``demographic_parity_difference``, ``demographic_parity_ratio``, and for binary
            tasks also ``worst_group_tpr``, ``equal_opportunity_difference``,
            ``equalized_odds_difference``.
        worst_group: id of the group with the lowest accuracy (None if no group is present).
        pos_label: the positive class for binary tasks (None for multiclass).
        confidence: the Wilson confidence level.
        min_group_size: the small-group threshold.
    """

    confusion: Tensor
    count: Tensor
    present: Tensor
    small: Tensor
    accuracy: Rate
    class_recall: Rate
    class_selection_rate: Rate
    tpr: Rate | None
    fpr: Rate | None
    selection_rate: Rate | None
    summary: dict[str, float]
    worst_group: int | None
    pos_label: int | None
    confidence: float
    min_group_size: int

    def rates(self) -> dict[str, Rate]:
        """The per-group ``[G]`` rates by name (accuracy, and tpr/fpr/selection_rate if binary)."""
        out = {"accuracy": self.accuracy}
        for name in ("tpr", "fpr", "selection_rate"):
            r = getattr(self, name)
            if r is not None:
                out[name] = r
        return out


def group_metrics(
    confusion: Tensor,
    pos_label: int | None = 1,
    confidence: float = 0.95,
    min_group_size: int = SMALL_GROUP_SIZE,
    zero_division: float = math.nan,
) -> GroupMetrics:
    """Field-standard per-group metrics and fairness summaries from confusion counts.

    Args:
        confusion: int ``[G, C, C]`` counts (``confusion[g, true, pred]``), e.g. all-reduced.
        pos_label: the positive class for binary tasks (0 or 1); ignored when ``C != 2``.
            None treats a two-class task as multiclass (no TPR/FPR).
        confidence: Wilson confidence level in (0, 1).
        min_group_size: present groups with fewer samples are flagged ``small``.
        zero_division: value of a rate with a zero denominator in a present group (NaN,
            excluded from summaries; ``0.0`` reproduces fairlearn, see the module docstring).

    Returns:
        A `GroupMetrics`.

    Example:
        >>> import torch
        >>> from lightning_fairprune.diagnostics.counts import group_confusion
        >>> conf = group_confusion(torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 1, 0, 1]),
        ...                        torch.tensor([0, 0, 1, 1, 1]), num_groups=3, num_classes=2)
        >>> m = group_metrics(conf)
        >>> m.tpr.value.tolist(), m.fpr.value.tolist()
        ([1.0, 0.5, nan], [1.0, 0.0, nan])
        >>> m.summary["equalized_odds_difference"], m.summary["demographic_parity_difference"]
        (1.0, 0.6666666666666667)
    """
    check_confusion(confusion)
    _check_confidence(confidence)
    _check_count("min_group_size", min_group_size)
    if isinstance(zero_division, bool) or not isinstance(zero_division, (int, float)):
        raise TypeError(f"Expected `zero_division` to be a float, but got {zero_division!r}")
    conf = confusion.to(torch.int64)
    _, num_classes, _ = conf.shape
    binary = num_classes == 2 and pos_label is not None
    if binary:
        check_pos_label(pos_label)
    zd = float(zero_division)

    count = conf.sum(dim=(1, 2))
    present = count > 0
    small = present & (count < min_group_size)
    diag = torch.diagonal(conf, dim1=-2, dim2=-1)
    pres_c = present[:, None]
    accuracy = rate(diag.sum(-1), count, present, confidence, zd)
    class_recall = rate(diag, conf.sum(-1), pres_c, confidence, zd)
    predicted = conf.sum(-2)
    class_sel = rate(predicted, count[:, None].expand_as(predicted), pres_c, confidence, zd)

    acc_min, _, acc_gap, _ = _spread(accuracy.value)
    summary = {"worst_group_accuracy": acc_min, "accuracy_difference": acc_gap}
    tpr = fpr = sel = None
    if binary:
        pos, neg = int(pos_label), 1 - int(pos_label)  # type: ignore[arg-type]
        tp, fn = conf[:, pos, pos], conf[:, pos, neg]
        fp, tn = conf[:, neg, pos], conf[:, neg, neg]
        tpr = rate(tp, tp + fn, present, confidence, zd)
        fpr = rate(fp, fp + tn, present, confidence, zd)
        sel = rate(tp + fp, count, present, confidence, zd)
        _, _, dp_diff, dp_ratio = _spread(sel.value)
        tpr_min, _, tpr_gap, _ = _spread(tpr.value)
        _, _, fpr_gap, _ = _spread(fpr.value)
        summary.update(
            demographic_parity_difference=dp_diff,
            demographic_parity_ratio=dp_ratio,
            worst_group_tpr=tpr_min,
            equal_opportunity_difference=tpr_gap,
            # NaN if either part is undefined: an incomplete comparison is not "fair".
            equalized_odds_difference=max(tpr_gap, fpr_gap)
            if not (math.isnan(tpr_gap) or math.isnan(fpr_gap))
            else math.nan,
        )
    else:
        spreads = [_spread(class_sel.value[:, c]) for c in range(num_classes)]
        diffs = [s[2] for s in spreads]
        ratios = [s[3] for s in spreads]
        summary.update(
            demographic_parity_difference=math.nan
            if any(math.isnan(d) for d in diffs)
            else max(diffs),
            demographic_parity_ratio=math.nan
            if any(math.isnan(r) for r in ratios)
            else min(ratios),
        )
    return GroupMetrics(
        confusion=conf,
        count=count,
        present=present,
        small=small,
        accuracy=accuracy,
        class_recall=class_recall,
        class_selection_rate=class_sel,
        tpr=tpr,
        fpr=fpr,
        selection_rate=sel,
        summary=summary,
        worst_group=_argmin_finite(accuracy.value),
        pos_label=int(pos_label) if binary else None,  # type: ignore[arg-type]
        confidence=float(confidence),
        min_group_size=min_group_size,
    )


# --------------------------------------------------------------------------------------------
# Intensification guard
# --------------------------------------------------------------------------------------------


def guarded_intensification_ratio(
    nrb: Tensor | Sequence[float],
    nrb_ref: Tensor | Sequence[float],
    min_abs_ref: float = INTENSIFICATION_MIN_ABS_REF,
    support_ref: Tensor | Sequence[float] | None = None,
    acc_ref: float | None = None,
) -> Tensor:
    """Intensification ratio I = B̃ / B̃_ref, NaN ("undefined") where B̃_ref is near zero.

    A group whose dense recall is close to the dense accuracy has B̃_ref ≈ 0, and dividing by
    it turns noise into a huge ratio (2.5 or 8.5 while the group's recall did not move). The
    ratio is undefined where ``|B̃_ref| < min_abs_ref`` (default 0.02: recall within 2% of
    accuracy, relative) and, when ``support_ref`` (the group's sample count) and ``acc_ref``
    (the dense accuracy A) are given, also where ``|B̃_ref| < 1 / (n·A)``: less than what one
    sample changes (one sample moves the recall by 1/n and B̃ by 1/(n·A)). Elsewhere the result
    equals `recall.intensification_ratio`.

    Args:
        nrb: B̃_t of the pruned model ``[G]``.
        nrb_ref: B̃ of the dense reference ``[G]``.
        min_abs_ref: absolute threshold on ``|B̃_ref|`` (>= 0).
        support_ref: per-group sample counts of the reference measurement, or None.
        acc_ref: reference accuracy (required with ``support_ref``).

    Returns:
        float64 ``[G]``.

    Example:
        >>> import torch
        >>> guarded_intensification_ratio(torch.tensor([0.4, 0.03]), torch.tensor([0.2, 0.01]))
        tensor([2., nan], dtype=torch.float64)
        >>> guarded_intensification_ratio([0.4, 0.2], [0.2, 0.05], support_ref=[100, 10],
        ...                               acc_ref=0.8)
        tensor([2., nan], dtype=torch.float64)
    """
    if (
        isinstance(min_abs_ref, bool)
        or not isinstance(min_abs_ref, (int, float))
        or not min_abs_ref >= 0
    ):
        raise ValueError(f"Expected `min_abs_ref` to be a float >= 0, but got {min_abs_ref!r}")
    ratio = intensification_ratio(nrb, nrb_ref)
    ref = torch.as_tensor(nrb_ref, dtype=torch.float64)
    limit = torch.full_like(ref, float(min_abs_ref))
    if (support_ref is None) != (acc_ref is None):
        raise ValueError(
            "Expected `support_ref` and `acc_ref` to be given together, but got"
            f" support_ref={support_ref!r} and acc_ref={acc_ref!r}"
        )
    if support_ref is not None and acc_ref is not None:
        n = torch.as_tensor(support_ref, dtype=torch.float64)
        if n.shape != ref.shape:
            raise ValueError(
                f"Expected `support_ref` of shape {tuple(ref.shape)}, but got {tuple(n.shape)}"
            )
        if not float(acc_ref) > 0:
            raise ValueError(f"Expected `acc_ref` to be a float > 0, but got {acc_ref!r}")
        one_sample = 1.0 / (n.clamp_min(1.0) * float(acc_ref))
        limit = torch.maximum(limit, one_sample)
    undefined = ~(ref.abs() >= limit)  # NaN references are undefined too
    return torch.where(undefined, torch.full_like(ratio, math.nan), ratio)


# --------------------------------------------------------------------------------------------
# Any metric per group
# --------------------------------------------------------------------------------------------


class PerGroupMetric(nn.Module):
    """Computes any torchmetrics ``Metric`` (or alike) separately for each group.

    One clone per group (``metric.clone()``, else a deep copy), updated only with that group's
    samples; a batch lacking a group leaves its clone untouched. The clones are submodules, so
    ``.to(device)`` moves them, and each clone syncs itself under DDP in its ``compute`` (as
    torchmetrics does). Global per-group counts are all-reduced in `compute` when
    torch.distributed is initialized; a group with no sample on any process is NaN.

    Args:
        metric: a torchmetrics ``Metric`` (anything with ``update``, ``compute``, ``reset``
            and ``clone`` or deep-copyable).
        num_groups: number of groups G.

    Example:
        >>> import torch
        >>> from torchmetrics.classification import BinaryAccuracy
        >>> m = PerGroupMetric(BinaryAccuracy(), num_groups=3)
        >>> preds, target = torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])
        >>> m.update(preds, target, groups=torch.tensor([2, 2, 0]))
        >>> [round(float(v), 2) for v in m.compute()]
        [1.0, nan, 0.5]
    """

    def __init__(self, metric: Any, num_groups: int) -> None:
        super().__init__()
        _check_count("num_groups", num_groups)
        for attr in ("update", "compute", "reset"):
            if not callable(getattr(metric, attr, None)):
                raise TypeError(
                    "Expected `metric` to be a torchmetrics Metric (with update, compute and"
                    f" reset), but got {type(metric)}"
                )
        make = metric.clone if callable(getattr(metric, "clone", None)) else None
        clones = [make() if make else copy.deepcopy(metric) for _ in range(num_groups)]
        self.num_groups = num_groups
        self.metrics = (
            nn.ModuleList(clones) if all(isinstance(c, nn.Module) for c in clones) else clones
        )
        self.register_buffer("counts", torch.zeros(num_groups, dtype=torch.int64))

    def update(self, *args: Any, groups: Tensor, **kwargs: Any) -> None:
        """Split every tensor argument with first dimension N by group; update the clones.

        Args:
            *args: the metric's update arguments (tensors ``[N, ...]`` are split; others are
                passed unchanged).
            groups: group id per sample ``[N]``.
            **kwargs: keyword update arguments (split the same way).
        """
        _check_labels("groups", groups, self.num_groups, "group ids")
        n = groups.shape[0]

        def take(x: Any, idx: Tensor) -> Any:
            if isinstance(x, Tensor) and x.ndim >= 1 and x.shape[0] == n:
                return x[idx.to(x.device)]
            return x

        self.counts += torch.bincount(groups.long(), minlength=self.num_groups).to(
            self.counts.device
        )
        for g in torch.unique(groups).tolist():
            idx = (groups == g).nonzero().flatten()
            self.metrics[g].update(
                *(take(a, idx) for a in args), **{k: take(v, idx) for k, v in kwargs.items()}
            )

    def compute(self) -> list[Any]:
        """Each group's metric value; NaN (a float) for groups with no sample anywhere.

        The counts are all-reduced first, so every process calls ``compute`` on the same
        clones (torchmetrics' sync is collective); clones of groups absent everywhere are not
        computed (some metrics raise on an empty state).
        """
        counts = all_reduce(self.counts.clone())
        out: list[Any] = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            for g in range(self.num_groups):
                out.append(self.metrics[g].compute() if int(counts[g]) > 0 else math.nan)
        return out

    def reset(self) -> None:
        """Reset every clone and the counts."""
        for m in self.metrics:
            m.reset()
        self.counts.zero_()

    def forward(self, *args: Any, groups: Tensor, **kwargs: Any) -> None:
        """Same as `update` (no per-batch value is computed)."""
        self.update(*args, groups=groups, **kwargs)
