"""Per-group recall, recall balance, intensification and disparity (methods.md section 3).

Everything here works on *count sums*: ``support[a, c]`` (samples of group ``a`` with class
``c``) and ``correct[a, c]`` (those predicted correctly), kept in float64. Sums of counts over
batches or processes are counts of the union, so streaming and distributed evaluation (an
all-reduce with ``sum``) give exactly the numbers of a single pass over all the data.

A group with no samples is *missing*: its recall is NaN (with one warning per call), never 0
and never another group's value. Every function below propagates NaN for missing groups and
ignores them where it summarizes over groups (``intensification_alpha``, ``disparity``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_fairprune.checks import check_int, check_labels

__all__ = [
    "accuracy",
    "disparity",
    "excessive_loss",
    "group_recall",
    "intensification_alpha",
    "intensification_ratio",
    "normalized_recall_balance",
    "recall_balance",
]


def _check_labels(name: str, t: Tensor, upper: int | None, what: str) -> None:
    """`lightning_fairprune.checks.check_labels` with this module's argument order."""
    check_labels(t, name, upper=upper, what=what)


def _check_count(name: str, value: int | None) -> None:
    check_int(value, name, 1, allow_none=True)


def warn_missing(kind: str, missing: Tensor) -> None:
    """One warning from ``kind`` naming the groups marked ``missing`` (reported as NaN)."""
    ids = missing.nonzero().flatten().tolist()
    if ids:
        warnings.warn(
            f"{kind}: group(s) {ids} have no samples; reported as missing (NaN).",
            UserWarning,
            stacklevel=3,
        )


def _check_counts_pair(support: Tensor, correct: Tensor) -> None:
    if not isinstance(support, Tensor) or not isinstance(correct, Tensor):
        raise TypeError("Expected `support` and `correct` to be torch.Tensor count sums")
    if support.shape != correct.shape or support.ndim not in (1, 2):
        raise ValueError(
            "Expected `support` and `correct` of the same shape [G, C] (or [G]), but got"
            f" {tuple(support.shape)} and {tuple(correct.shape)}"
        )


def group_recall(support: Tensor, correct: Tensor, warn: bool = True) -> Tensor:
    """Per-group recall (group accuracy): correct / support over each group's samples.

    With groups = classes this is the per-class recall R^c of methods.md section 3.

    Args:
        support: ``[G, C]`` (or ``[G]``) sample counts from `group_counts`.
        correct: correct-prediction counts of the same shape.
        warn: warn once when some groups have no samples.

    Returns:
        float64 ``[G]``; NaN for groups with no samples (missing).

    Example:
        >>> import torch
        >>> support = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
        >>> correct = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
        >>> group_recall(support, correct, warn=False)
        tensor([0.7500,    nan, 1.0000], dtype=torch.float64)
    """
    _check_counts_pair(support, correct)
    s = support.to(torch.float64)
    c = correct.to(torch.float64)
    if s.ndim == 2:
        s, c = s.sum(1), c.sum(1)
    missing = s <= 0
    if warn:
        warn_missing("group_recall", missing)
    recall = c / torch.where(missing, torch.ones_like(s), s)
    return torch.where(missing, torch.full_like(recall, math.nan), recall)


def accuracy(support: Tensor, correct: Tensor) -> float:
    """Overall accuracy: total correct / total samples (NaN, with a warning, when empty).

    Args:
        support: sample counts (any shape) from `group_counts`.
        correct: correct-prediction counts of the same shape.

    Returns:
        The accuracy as a Python float.

    Example:
        >>> import torch
        >>> accuracy(torch.tensor([[4.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
        0.8333333333333334
    """
    _check_counts_pair(support, correct)
    total = float(support.to(torch.float64).sum())
    if total <= 0:
        warnings.warn(
            "accuracy: no samples were counted; returning NaN.", UserWarning, stacklevel=2
        )
        return math.nan
    return float(correct.to(torch.float64).sum()) / total


def _as_f64(name: str, values: Tensor | Sequence[float]) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().to(torch.float64)
    try:
        return torch.tensor(
            [math.nan if v is None else float(v) for v in values], dtype=torch.float64
        )
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"Expected `{name}` to be a tensor or a sequence of floats, but got {values!r}"
        ) from err


def recall_balance(recall: Tensor | Sequence[float], acc: float) -> Tensor:
    """Recall balance B = R - A per group (NaN stays NaN).

    Args:
        recall: per-group recall ``[G]``.
        acc: the model's overall accuracy A.

    Returns:
        float64 ``[G]``.

    Example:
        >>> import torch
        >>> recall_balance(torch.tensor([0.9, 0.6]), 0.75)
        tensor([ 0.1500, -0.1500], dtype=torch.float64)
    """
    return _as_f64("recall", recall) - float(acc)


def normalized_recall_balance(recall: Tensor | Sequence[float], acc: float) -> Tensor:
    """Normalized recall balance B̃ = (R - A) / A per group.

    Args:
        recall: per-group recall ``[G]``.
        acc: the model's overall accuracy A (> 0; A = 0 gives inf/NaN).

    Returns:
        float64 ``[G]``.

    Example:
        >>> import torch
        >>> normalized_recall_balance(torch.tensor([0.9, 0.6]), 0.75)
        tensor([ 0.2000, -0.2000], dtype=torch.float64)
    """
    return (_as_f64("recall", recall) - float(acc)) / float(acc)


def intensification_ratio(
    nrb: Tensor | Sequence[float], nrb_ref: Tensor | Sequence[float]
) -> Tensor:
    """Intensification ratio I = B̃ / B̃_ref per group (I > 1: the group's gap widened).

    A group whose reference balance is exactly 0 gives ±inf (or NaN for 0/0); a missing
    group (NaN in either input) gives NaN.

    Args:
        nrb: normalized recall balance B̃_t of the pruned model ``[G]``.
        nrb_ref: normalized recall balance B̃ of the reference (dense) model ``[G]``.

    Returns:
        float64 ``[G]``.

    Example:
        >>> import torch
        >>> intensification_ratio(torch.tensor([0.4, -0.1]), torch.tensor([0.2, -0.2]))
        tensor([2.0000, 0.5000], dtype=torch.float64)
    """
    a, b = _as_f64("nrb", nrb), _as_f64("nrb_ref", nrb_ref)
    if a.shape != b.shape:
        raise ValueError(
            f"Expected `nrb` and `nrb_ref` of the same shape, but got {tuple(a.shape)} and"
            f" {tuple(b.shape)}"
        )
    return a / b


def intensification_alpha(
    nrb: Tensor | Sequence[float], nrb_ref: Tensor | Sequence[float]
) -> float:
    """Model-level intensification α: least-squares slope through the origin of B̃_t on B̃_ref.

    α = Σ_a B̃_ref[a]·B̃_t[a] / Σ_a B̃_ref[a]², over the groups finite in both inputs
    (missing groups are ignored). α > 1: intensification; α < 1: de-intensification.

    Args:
        nrb: normalized recall balance B̃_t of the pruned model ``[G]``.
        nrb_ref: normalized recall balance B̃ of the reference (dense) model ``[G]``.

    Returns:
        α as a float; NaN when no group is present in both or all reference balances are 0.

    Example:
        >>> import torch
        >>> intensification_alpha(torch.tensor([0.2, -0.4, float("nan")]),
        ...                       torch.tensor([0.1, -0.2, 0.3]))
        2.0
    """
    a, b = _as_f64("nrb", nrb), _as_f64("nrb_ref", nrb_ref)
    if a.shape != b.shape:
        raise ValueError(
            f"Expected `nrb` and `nrb_ref` of the same shape, but got {tuple(a.shape)} and"
            f" {tuple(b.shape)}"
        )
    ok = torch.isfinite(a) & torch.isfinite(b)
    den = float((b[ok] ** 2).sum())
    if den == 0.0:
        return math.nan
    return float((a[ok] * b[ok]).sum()) / den


def excessive_loss(loss: Tensor | Sequence[float], loss_ref: Tensor | Sequence[float]) -> Tensor:
    """Excessive loss R(a) = J(θ̄; D_a) - J(θ*; D_a) per group (NaN where either is missing).

    Args:
        loss: per-group mean loss of the pruned model ``[G]``.
        loss_ref: per-group mean loss of the reference (dense) model ``[G]``.

    Returns:
        float64 ``[G]``.

    Example:
        >>> import torch
        >>> excessive_loss(torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.5]))
        tensor([0.2500, 0.5000], dtype=torch.float64)
    """
    a, b = _as_f64("loss", loss), _as_f64("loss_ref", loss_ref)
    if a.shape != b.shape:
        raise ValueError(
            f"Expected `loss` and `loss_ref` of the same shape, but got {tuple(a.shape)} and"
            f" {tuple(b.shape)}"
        )
    return a - b


def disparity(values: Tensor | Sequence[float], higher_is_worse: bool = True) -> dict[str, Any]:
    """Summarize a per-group quantity across groups, ignoring missing (NaN) groups.

    Args:
        values: one value per group ``[G]`` (NaN or None = missing).
        higher_is_worse: which end is "worst". True (default) for losses, gradient norms,
            curvature; pass False for recall or accuracy so that "worst" is the lowest.

    Returns:
        ``{"max", "min", "gap" (max - min), "ratio" (max / min; NaN unless min > 0: a
        ratio of quantities that can be zero or negative, such as Hutchinson trace
        estimates, says nothing),
        "worst" (group id), "best" (group id)}``; floats NaN and ids None when no group
        has a finite value.

    Example:
        >>> import torch
        >>> d = disparity(torch.tensor([0.5, float("nan"), 2.0]))
        >>> d["gap"], d["ratio"], d["worst"], d["best"]
        (1.5, 4.0, 2, 0)
        >>> disparity(torch.tensor([0.9, 0.6]), higher_is_worse=False)["worst"]
        1
    """
    v = _as_f64("values", values).flatten()
    ok = torch.isfinite(v)
    if not bool(ok.any()):
        nan = math.nan
        return {"max": nan, "min": nan, "gap": nan, "ratio": nan, "worst": None, "best": None}
    masked_hi = torch.where(ok, v, torch.full_like(v, -math.inf))
    masked_lo = torch.where(ok, v, torch.full_like(v, math.inf))
    i_max, i_min = int(masked_hi.argmax()), int(masked_lo.argmin())
    vmax, vmin = float(v[i_max]), float(v[i_min])
    ratio = vmax / vmin if vmin > 0.0 else math.nan
    worst, best = (i_max, i_min) if higher_is_worse else (i_min, i_max)
    return {
        "max": vmax,
        "min": vmin,
        "gap": vmax - vmin,
        "ratio": ratio,
        "worst": worst,
        "best": best,
    }
