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

**Groups.** `normalize_group_names`, `combine_groups` (intersectional product groups with
readable names such as ``"race=black & sex=F"``), `split_groups` (the inverse) and
`group_slugs` (names safe for logger keys).

**Any torchmetrics metric per group.** `PerGroupMetric` keeps one clone of a metric per group
and updates each clone only with its own group's samples, so a batch that lacks a group leaves
that group's state untouched (torchmetrics 1.9's ``BinaryGroupStatRates`` credits the samples
of a batch's first present group to group 0 instead, torchmetrics issue #3489).

This module imports only torch (torchmetrics is duck-typed, never imported).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_fairprune.diagnostics.recall import (
    _check_count,
    _check_labels,
    intensification_ratio,
)

__all__ = [
    "INTENSIFICATION_MIN_ABS_REF",
    "SMALL_GROUP_SIZE",
    "CombinedGroups",
    "GroupConfusion",
    "GroupMetrics",
    "PerGroupMetric",
    "Rate",
    "combine_groups",
    "confusion_to_counts",
    "group_confusion",
    "group_metrics",
    "group_slugs",
    "guarded_intensification_ratio",
    "normalize_group_names",
    "product_group_names",
    "rate",
    "split_groups",
    "wilson_interval",
]

SMALL_GROUP_SIZE = 30
"""Groups with fewer samples than this are flagged ``small`` (see the module docstring)."""

INTENSIFICATION_MIN_ABS_REF = 0.02
"""|B̃_ref| below which an intensification ratio is undefined (recall within 2% of accuracy)."""


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def _check_ids(name: str, t: Tensor, upper: int | None, what: str, validate: bool) -> None:
    """`_check_labels`; without ``validate`` only type, dtype and shape (no device sync)."""
    if validate or not isinstance(t, Tensor) or t.ndim != 1:
        _check_labels(name, t, upper, what)
    else:
        _check_labels(name, t[:0], upper, what)


def _predictions(
    preds_or_logits: Tensor, num_classes: int | None, threshold: float, validate: bool = True
) -> Tensor:
    """Class ids ``[N]`` from class ids, logits ``[N, C]`` or binary scores ``[N]``/``[N, 1]``."""
    if not isinstance(preds_or_logits, Tensor):
        raise TypeError(
            "Expected `preds_or_logits` to be a torch.Tensor of class ids [N], logits [N, C] or"
            f" binary scores [N], but got {type(preds_or_logits)}"
        )
    x = preds_or_logits
    if not x.is_floating_point():
        _check_ids("preds_or_logits", x, num_classes, "predicted class ids", validate)
        return x.long()
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim == 1:
        if num_classes not in (None, 2):
            raise ValueError(
                "Expected floating point `preds_or_logits` of shape [N, C] for"
                f" `num_classes`={num_classes}, but got shape {tuple(preds_or_logits.shape)}"
            )
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            x = torch.sigmoid(x)  # logits, as torchmetrics treats scores outside [0, 1]
        return (x >= threshold).long()
    if x.ndim != 2:
        raise ValueError(
            "Expected floating point `preds_or_logits` to be logits [N, C] or binary scores [N],"
            f" but got shape {tuple(preds_or_logits.shape)}"
        )
    if num_classes is not None and x.shape[1] != num_classes:
        raise ValueError(
            f"Expected logits with `num_classes`={num_classes} columns, but got shape"
            f" {tuple(x.shape)}"
        )
    return x.argmax(dim=1)


def group_confusion(
    preds_or_logits: Tensor,
    targets: Tensor,
    groups: Tensor,
    num_groups: int,
    num_classes: int,
    threshold: float = 0.5,
    validate: bool = True,
) -> Tensor:
    """Per-group confusion counts ``confusion[g, t, p]`` of one batch.

    Args:
        preds_or_logits: predicted class ids ``[N]`` (integer), logits/scores ``[N, C]``
            (argmax over dim 1), or for ``num_classes == 2`` binary scores ``[N]`` or ``[N, 1]``:
            probabilities in [0, 1], else logits (passed through a sigmoid), predicted positive
            (class 1) when ``>= threshold``.
        targets: true class ids ``[N]`` in ``[0, num_classes)``.
        groups: group id of every sample ``[N]`` in ``[0, num_groups)``.
        num_groups: number of groups G.
        num_classes: number of classes C.
        threshold: decision threshold on probabilities for binary scores.
        validate: check that ids are in range (one device sync per tensor). Pass False in a
            hot loop once the data were validated (e.g. at fit start): out-of-range ids then
            give wrong counts or an index error (a device-side assert on CUDA). Binary scores
            ``[N]`` always sync once (probability or logit is decided from their range).

    Returns:
        int64 ``[G, C, C]`` on the input device (target x prediction per group). Counting is a
        ``scatter_add_`` into a fixed-size tensor, so no device sync happens when
        ``validate=False`` and the predictions are ids or ``[N, C]`` logits.

    Raises:
        ValueError: on ids that are not integer, negative or out of range, on shapes, or on
            lengths that do not match.

    Example:
        >>> import torch
        >>> c = group_confusion(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0]),
        ...                     torch.tensor([0, 0, 1]), num_groups=2, num_classes=2)
        >>> c[0].tolist(), c[1].tolist()
        ([[0, 0], [1, 1]], [[0, 1], [0, 0]])
    """
    _check_count("num_groups", num_groups)
    _check_count("num_classes", num_classes)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"Expected `threshold` to be a float in [0, 1], but got {threshold!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"Expected `threshold` to be a float in [0, 1], but got {threshold!r}")
    preds = _predictions(preds_or_logits, num_classes, float(threshold), validate)
    _check_ids("targets", targets, num_classes, "class labels", validate)
    _check_ids("groups", groups, num_groups, "group ids", validate)
    n = targets.shape[0]
    if preds.shape[0] != n or groups.shape[0] != n:
        raise ValueError(
            "Expected `preds_or_logits`, `targets` and `groups` to have the same length, but got"
            f" {preds.shape[0]}, {n} and {groups.shape[0]}"
        )
    cell = (groups.long() * num_classes + targets.long()) * num_classes + preds
    counts = torch.zeros(num_groups * num_classes**2, dtype=torch.int64, device=cell.device)
    counts.scatter_add_(0, cell, torch.ones_like(cell))
    return counts.view(num_groups, num_classes, num_classes)


def confusion_to_counts(confusion: Tensor) -> tuple[Tensor, Tensor]:
    """``(support, correct)`` float64 ``[G, C]`` as `group_counts` returns them.

    With these, the recall-distortion functions of `recall` (`group_recall`, `accuracy`, ...)
    run on the same counts.

    Args:
        confusion: ``[G, C, C]`` counts from `group_confusion` / `GroupConfusion`.

    Returns:
        ``support[g, c]`` (samples of class c in group g) and ``correct[g, c]``.

    Example:
        >>> import torch
        >>> conf = torch.tensor([[[3, 1], [0, 2]]])
        >>> support, correct = confusion_to_counts(conf)
        >>> support.tolist(), correct.tolist()
        ([[4.0, 2.0]], [[3.0, 2.0]])
    """
    _check_confusion(confusion)
    c = confusion.to(torch.float64)
    return c.sum(-1), torch.diagonal(c, dim1=-2, dim2=-1)


def _check_confusion(confusion: Tensor) -> None:
    if not isinstance(confusion, Tensor):
        raise TypeError(
            f"Expected `confusion` to be a torch.Tensor [G, C, C], but got {type(confusion)}"
        )
    if confusion.ndim != 3 or confusion.shape[1] != confusion.shape[2]:
        raise ValueError(
            f"Expected `confusion` of shape [G, C, C], but got {tuple(confusion.shape)}"
        )
    if confusion.numel() and bool((confusion < 0).any()):
        raise ValueError("Expected `confusion` to hold non-negative counts, but got a negative")


class GroupConfusion:
    """Streaming per-group confusion counts: ``update`` per batch, ``compute`` at the end.

    The state is one int64 tensor ``[G, C, C]``; `sync` all-reduces it with ``sum`` (exact).
    Call `sync` on every process (it is a collective) before `compute`, or all-reduce
    ``self.confusion`` yourself.

    Args:
        num_groups: number of groups G.
        num_classes: number of classes C.
        threshold: decision threshold for binary scores (see `group_confusion`).
        validate: range-check ids on every update (see `group_confusion`).

    Example:
        >>> import torch
        >>> m = GroupConfusion(num_groups=2, num_classes=2)
        >>> m.update(torch.tensor([1, 0]), torch.tensor([1, 1]), torch.tensor([0, 0]))
        >>> m.update(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))
        >>> m.compute().sum(dim=(1, 2)).tolist()
        [2, 1]
    """

    def __init__(
        self, num_groups: int, num_classes: int, threshold: float = 0.5, validate: bool = True
    ) -> None:
        _check_count("num_groups", num_groups)
        _check_count("num_classes", num_classes)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"Expected `threshold` to be a float in [0, 1], but got {threshold!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"Expected `threshold` to be a float in [0, 1], but got {threshold!r}")
        self.num_groups = num_groups
        self.num_classes = num_classes
        self.threshold = float(threshold)
        self.validate = bool(validate)
        self.confusion = torch.zeros(num_groups, num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Zero the counts (keeps the device)."""
        self.confusion = torch.zeros_like(self.confusion)

    def update(self, preds_or_logits: Tensor, targets: Tensor, groups: Tensor) -> None:
        """Add one batch (arguments as in `group_confusion`)."""
        batch = group_confusion(
            preds_or_logits,
            targets,
            groups,
            self.num_groups,
            self.num_classes,
            self.threshold,
            self.validate,
        )
        if self.confusion.device != batch.device:
            self.confusion = self.confusion.to(batch.device)
        self.confusion += batch

    def sync(self, group: Any = None) -> None:
        """All-reduce (sum) the counts over processes; a no-op without torch.distributed."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(
                self.confusion, op=torch.distributed.ReduceOp.SUM, group=group
            )

    def compute(self) -> Tensor:
        """A copy of the counts ``[G, C, C]`` (int64)."""
        return self.confusion.clone()

    def state_dict(self) -> dict[str, Any]:
        """Plain values (loads with ``torch.load(weights_only=True)``)."""
        return {"confusion": self.confusion.cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counts saved by `state_dict`."""
        conf = state["confusion"]
        if tuple(conf.shape) != tuple(self.confusion.shape):
            raise ValueError(
                f"Expected `state['confusion']` of shape {tuple(self.confusion.shape)}, but got"
                f" {tuple(conf.shape)}"
            )
        self.confusion = conf.to(self.confusion.device, torch.int64).clone()


# --------------------------------------------------------------------------------------------
# Rates with Wilson intervals
# --------------------------------------------------------------------------------------------


def _check_confidence(confidence: float) -> None:
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float))
        or not 0.0 < float(confidence) < 1.0
    ):
        raise ValueError(f"Expected `confidence` to be a float in (0, 1), but got {confidence!r}")


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

    def to_scalars(
        self,
        group_names: Sequence[str] | Mapping[int, str] | None = None,
        prefix: str = "fairprune",
        intervals: bool = True,
        include_absent: bool = False,
    ) -> dict[str, float]:
        """Flat ``{key: float}`` for ``log_dict``: ``<prefix>/<metric>/<group slug>`` and summaries.

        Keys: ``<prefix>/<summary name>`` for every summary; per group,
        ``<prefix>/<rate>/<slug>`` with ``<prefix>/<rate>_lower/<slug>`` and
        ``<prefix>/<rate>_upper/<slug>`` (when ``intervals``) for accuracy (and tpr, fpr,
        selection_rate when binary), and ``<prefix>/count/<slug>``. Absent groups are left out
        unless ``include_absent`` (their values are NaN).

        Args:
            group_names: names (see `normalize_group_names`); default ``g0, g1, ...``.
            prefix: key prefix ("" for none).
            intervals: include the Wilson bounds.
            include_absent: include absent groups (NaN values).

        Returns:
            The flat dict of Python floats.
        """
        names = normalize_group_names(group_names, self.count.numel())
        slugs = group_slugs(names)
        pre = f"{prefix}/" if prefix else ""
        out = {f"{pre}{k}": float(v) for k, v in self.summary.items()}
        for g, slug in enumerate(slugs):
            if not include_absent and not bool(self.present[g]):
                continue
            out[f"{pre}count/{slug}"] = float(self.count[g])
            for name, r in self.rates().items():
                out[f"{pre}{name}/{slug}"] = float(r.value[g])
                if intervals:
                    out[f"{pre}{name}_lower/{slug}"] = float(r.lower[g])
                    out[f"{pre}{name}_upper/{slug}"] = float(r.upper[g])
        return out

    def rows(
        self, group_names: Sequence[str] | Mapping[int, str] | None = None
    ) -> list[dict[str, Any]]:
        """One plain-value row per group for tables, plots and the history.

        Each row: ``group`` (name), ``group_id``, ``count``, ``present``, ``small``, and for
        each rate ``<rate>``, ``<rate>_lower``, ``<rate>_upper``.
        """
        names = normalize_group_names(group_names, self.count.numel())
        rows = []
        for g, name in enumerate(names):
            row: dict[str, Any] = {
                "group": name,
                "group_id": g,
                "count": int(self.count[g]),
                "present": bool(self.present[g]),
                "small": bool(self.small[g]),
            }
            for rname, r in self.rates().items():
                row[rname] = float(r.value[g])
                row[f"{rname}_lower"] = float(r.lower[g])
                row[f"{rname}_upper"] = float(r.upper[g])
            rows.append(row)
        return rows


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
        >>> conf = group_confusion(torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 1, 0, 1]),
        ...                        torch.tensor([0, 0, 1, 1, 1]), num_groups=3, num_classes=2)
        >>> m = group_metrics(conf)
        >>> m.tpr.value.tolist(), m.fpr.value.tolist()
        ([1.0, 0.5, nan], [1.0, 0.0, nan])
        >>> m.summary["equalized_odds_difference"], m.summary["demographic_parity_difference"]
        (1.0, 0.6666666666666667)
    """
    _check_confusion(confusion)
    _check_confidence(confidence)
    _check_count("min_group_size", min_group_size)
    if isinstance(zero_division, bool) or not isinstance(zero_division, (int, float)):
        raise TypeError(f"Expected `zero_division` to be a float, but got {zero_division!r}")
    conf = confusion.to(torch.int64)
    _, num_classes, _ = conf.shape
    binary = num_classes == 2 and pos_label is not None
    if binary and pos_label not in (0, 1):
        raise ValueError(f"Expected `pos_label` to be 0, 1 or None, but got {pos_label!r}")
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
# Group names, intersections, slugs
# --------------------------------------------------------------------------------------------


def normalize_group_names(
    group_names: Sequence[str] | Mapping[int, str] | None, num_groups: int
) -> list[str]:
    """A list of ``num_groups`` unique names from a list, a mapping id -> name, or None.

    None gives ``g0, g1, ...``; a mapping may name only some ids (the others get ``g<id>``).

    Args:
        group_names: the names.
        num_groups: number of groups G.

    Returns:
        ``list[str]`` of length G.

    Raises:
        ValueError: wrong length, ids outside ``[0, G)``, empty or duplicate names.
        TypeError: names that are not strings, or ids that are not ints.

    Example:
        >>> normalize_group_names({1: "black"}, 3)
        ['g0', 'black', 'g2']
        >>> normalize_group_names(["a", "b"], 2)
        ['a', 'b']
    """
    _check_count("num_groups", num_groups)
    if group_names is None:
        return [f"g{i}" for i in range(num_groups)]
    if isinstance(group_names, Mapping):
        names = [f"g{i}" for i in range(num_groups)]
        for key, name in group_names.items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise TypeError(f"Expected `group_names` keys to be int group ids, but got {key!r}")
            if not 0 <= key < num_groups:
                raise ValueError(
                    f"Expected `group_names` keys in [0, {num_groups}), but got {key!r}"
                )
            names[key] = name
    elif isinstance(group_names, Sequence) and not isinstance(group_names, (str, bytes)):
        names = list(group_names)
        if len(names) != num_groups:
            raise ValueError(
                f"Expected `group_names` to have {num_groups} names (one per group), but got"
                f" {len(names)}: {names!r}"
            )
    else:
        raise TypeError(
            "Expected `group_names` to be a list of names or a mapping id -> name, but got"
            f" {group_names!r}"
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"Expected `group_names` to hold strings, but got {name!r}")
        if not name.strip():
            raise ValueError(f"Expected `group_names` to hold non-empty names, but got {name!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Expected `group_names` to be unique, but got duplicates {dupes}")
    return names


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def group_slugs(group_names: Sequence[str]) -> list[str]:
    """Logger-key-safe, unique slugs of group names (letters, digits, ``_``, ``.``, ``-``).

    ``=`` becomes ``-``, every other run of unsafe characters (spaces, ``&``, ``/``) becomes
    ``_``; a slug that collides with an earlier one gets ``_<index>`` appended.

    Args:
        group_names: names, e.g. from `normalize_group_names`.

    Returns:
        ``list[str]`` of the same length.

    Example:
        >>> group_slugs(["race=black & sex=F", "a/b", "a b"])
        ['race-black_sex-F', 'a_b', 'a_b_2']
    """
    slugs: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(group_names):
        if not isinstance(name, str):
            raise TypeError(f"Expected `group_names` to hold strings, but got {name!r}")
        slug = _UNSAFE.sub("_", name.replace("=", "-")).strip("_") or f"g{i}"
        if slug in seen:
            slug = f"{slug}_{i}"
        seen.add(slug)
        slugs.append(slug)
    return slugs


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise ValueError(f"Expected `sizes` to be a non-empty list of ints, but got {sizes!r}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"Expected `sizes` to hold positive ints, but got {sizes!r}")
    return list(sizes)


def product_group_names(
    sizes: Sequence[int],
    names: Sequence[str] | None = None,
    value_names: Sequence[Sequence[str] | Mapping[int, str] | None] | None = None,
) -> list[str]:
    """Readable names of the product groups of several attributes, in product-id order.

    The id of values ``(v_0, ..., v_{k-1})`` is mixed radix with the first attribute most
    significant: ``((v_0·s_1) + v_1)·s_2 + ...``. A name reads ``"race=black & sex=F"``.

    Args:
        sizes: number of values of each attribute.
        names: attribute names (default ``a0, a1, ...``).
        value_names: per attribute, value names as for `normalize_group_names` (None:
            the value ids ``0, 1, ...``).

    Returns:
        ``prod(sizes)`` names.

    Example:
        >>> product_group_names([2, 2], ["race", "sex"], [["white", "black"], ["M", "F"]])
        ['race=white & sex=M', 'race=white & sex=F', 'race=black & sex=M', 'race=black & sex=F']
    """
    sizes = _check_sizes(sizes)
    k = len(sizes)
    if names is None:
        names = [f"a{i}" for i in range(k)]
    if isinstance(names, (str, bytes)) or len(names) != k:
        raise ValueError(f"Expected `names` to have {k} attribute names, but got {names!r}")
    if value_names is None:
        value_names = [None] * k
    if len(value_names) != k:
        raise ValueError(
            f"Expected `value_names` to have {k} entries (one per attribute), but got"
            f" {value_names!r}"
        )
    values = []
    for s, vn in zip(sizes, value_names, strict=True):
        values.append([str(i) for i in range(s)] if vn is None else normalize_group_names(vn, s))
    out = [""]
    for attr, vals in zip(names, values, strict=True):
        out = [
            f"{prefix} & {attr}={v}" if prefix else f"{attr}={v}" for prefix in out for v in vals
        ]
    return out


class CombinedGroups(NamedTuple):
    """Product group ids and names returned by `combine_groups`."""

    ids: Tensor
    names: list[str]
    num_groups: int


def combine_groups(
    attributes: Sequence[Tensor],
    sizes: Sequence[int],
    names: Sequence[str] | None = None,
    value_names: Sequence[Sequence[str] | Mapping[int, str] | None] | None = None,
) -> CombinedGroups:
    """Intersectional groups: one product id per sample from several attribute id tensors.

    Args:
        attributes: one integer tensor ``[N]`` per attribute, values in ``[0, sizes[i])``.
        sizes: number of values of each attribute.
        names: attribute names (see `product_group_names`).
        value_names: value names per attribute (see `product_group_names`).

    Returns:
        ``CombinedGroups(ids, names, num_groups)``: int64 ids ``[N]`` (mixed radix, first
        attribute most significant), all ``prod(sizes)`` names, and their number.

    Example:
        >>> import torch
        >>> c = combine_groups([torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])], [2, 2],
        ...                    ["race", "sex"], [["white", "black"], ["M", "F"]])
        >>> c.ids.tolist(), [c.names[i] for i in c.ids.tolist()]
        ([1, 2, 3], ['race=white & sex=F', 'race=black & sex=M', 'race=black & sex=F'])
    """
    sizes = _check_sizes(sizes)
    if isinstance(attributes, Tensor) or not isinstance(attributes, Sequence):
        raise TypeError(
            f"Expected `attributes` to be a list of 1-D tensors, but got {type(attributes)}"
        )
    if len(attributes) != len(sizes):
        raise ValueError(
            f"Expected `attributes` to have {len(sizes)} tensors (one per size), but got"
            f" {len(attributes)}"
        )
    ids: Tensor | None = None
    for i, (a, s) in enumerate(zip(attributes, sizes, strict=True)):
        _check_labels(f"attributes[{i}]", a, s, "attribute values")
        if ids is not None and a.shape != ids.shape:
            raise ValueError(
                f"Expected `attributes` of the same length, but got {tuple(a.shape)} at index"
                f" {i} and {tuple(ids.shape)} before"
            )
        ids = a.long() if ids is None else ids * s + a.long()
    assert ids is not None  # sizes is non-empty
    group_names = product_group_names(sizes, names, value_names)
    return CombinedGroups(ids, group_names, len(group_names))


def split_groups(ids: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """Inverse of `combine_groups`: attribute value ids from product group ids.

    Args:
        ids: product ids ``[N]`` in ``[0, prod(sizes))``.
        sizes: number of values of each attribute.

    Returns:
        One int64 tensor ``[N]`` per attribute.

    Example:
        >>> import torch
        >>> [t.tolist() for t in split_groups(torch.tensor([1, 2, 3]), [2, 2])]
        [[0, 1, 1], [1, 0, 1]]
    """
    sizes = _check_sizes(sizes)
    _check_labels("ids", ids, math.prod(sizes), "product group ids")
    rest = ids.long()
    out = []
    for s in reversed(sizes):
        out.append(rest % s)
        rest = rest // s
    return tuple(reversed(out))


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
        counts = self.counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
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
