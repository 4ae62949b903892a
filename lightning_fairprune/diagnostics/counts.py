"""Per-(group, class) counts, computed one way and shared (methods.md section 3).

Everything that counts samples per group and class goes through `group_confusion`, the
per-group confusion matrix ``confusion[g, t, p]`` of one batch (int64 ``[G, C, C]``: samples
of group ``g`` with true class ``t`` predicted as ``p``): the recall-distortion functions
(`group_counts` = `confusion_to_counts` of it), the field-standard rates of `group_metrics`
(`GroupConfusion`, streaming) and the one-pass measurement of `measure_groups`. Counts of
disjoint batches (or processes) add up to the counts of their union, so an all-reduce with
``sum`` gives exactly the numbers of one pass over all data (torchmetrics' shared
``_update`` helpers, ``dist_reduce_fx="sum"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_fairprune.checks import check_int, check_labels
from lightning_fairprune.distributed import all_reduce

__all__ = ["GroupConfusion", "confusion_to_counts", "group_confusion", "group_counts"]


def _check_sizes(num_groups: int, num_classes: int, threshold: float) -> float:
    """Validate the sizes and the binary threshold of a confusion count; the threshold."""
    check_int(num_groups, "num_groups", 1)
    check_int(num_classes, "num_classes", 1)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"Expected `threshold` to be a float in [0, 1], but got {threshold!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"Expected `threshold` to be a float in [0, 1], but got {threshold!r}")
    return float(threshold)


def _check_ids(name: str, t: Tensor, upper: int | None, what: str, validate: bool) -> None:
    """`check_labels`; without ``validate`` only type, dtype and shape (no device sync)."""
    if validate or not isinstance(t, Tensor) or t.ndim != 1:
        check_labels(t, name, upper=upper, what=what)
    else:
        check_labels(t[:0], name, upper=upper, what=what)


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
    threshold = _check_sizes(num_groups, num_classes, threshold)
    preds = _predictions(preds_or_logits, num_classes, threshold, validate)
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
    """``(support, correct)`` float64 ``[G, C]``: samples and correct predictions per cell.

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
    check_confusion(confusion)
    c = confusion.to(torch.float64)
    return c.sum(-1), torch.diagonal(c, dim1=-2, dim2=-1)


def check_confusion(confusion: Tensor) -> None:
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
        self.threshold = _check_sizes(num_groups, num_classes, threshold)
        self.num_groups = num_groups
        self.num_classes = num_classes
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
        all_reduce(self.confusion, group)

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


def group_counts(
    preds_or_logits: Tensor,
    targets: Tensor,
    groups: Tensor | None = None,
    num_groups: int | None = None,
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Count samples and correct predictions per (group, class) of one batch.

    ``confusion_to_counts(group_confusion(...))`` with defaults for the sizes.

    Args:
        preds_or_logits: predicted class ids ``[N]`` (integer) or scores/logits ``[N, C]``
            (floating point; the prediction is the argmax over dim 1).
        targets: true class ids ``[N]``, integers in ``[0, num_classes)``.
        groups: group id of every sample ``[N]``, integers in ``[0, num_groups)``; ``None``
            means groups are the classes (``groups = targets``).
        num_groups: number of groups G. Defaults to ``num_classes`` when ``groups`` is None,
            else to ``groups.max() + 1`` (pass it explicitly when streaming, so that every
            batch gives tensors of the same shape).
        num_classes: number of classes C. Defaults to ``logits.shape[1]``, else to the
            largest label or prediction + 1 (again: pass it when streaming).

    Returns:
        ``(support, correct)``, two float64 tensors of shape ``[G, C]`` on the input device:
        sums that can be added over batches and all-reduced over processes.

    Raises:
        ValueError: on labels or groups that are not integer, are negative or out of range,
            or on mismatching lengths.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
        >>> support, correct = group_counts(logits, torch.tensor([0, 1, 1]))
        >>> support
        tensor([[1., 0.],
                [0., 2.]], dtype=torch.float64)
        >>> correct
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """
    check_int(num_groups, "num_groups", 1, allow_none=True)
    check_int(num_classes, "num_classes", 1, allow_none=True)
    if isinstance(preds_or_logits, Tensor) and preds_or_logits.is_floating_point():
        if preds_or_logits.ndim != 2:
            raise ValueError(
                "Expected floating point `preds_or_logits` to be logits of shape [N, C], but"
                f" got shape {tuple(preds_or_logits.shape)}"
            )
        num_classes = preds_or_logits.shape[1] if num_classes is None else num_classes
    preds = _predictions(preds_or_logits, num_classes, 0.5)
    check_labels(targets, "targets", upper=num_classes, what="class labels")
    if preds.shape[0] != targets.shape[0]:
        raise ValueError(
            f"Expected `preds_or_logits` and `targets` to have the same length, but got"
            f" {preds.shape[0]} and {targets.shape[0]}"
        )
    if num_classes is None:
        top = [int(t.max()) for t in (targets, preds) if t.numel()]
        num_classes = max(top, default=0) + 1
    if groups is None:
        groups = targets
        num_groups = num_classes if num_groups is None else num_groups
    check_labels(groups, "groups", upper=num_groups, n=targets.shape[0], what="group ids")
    if num_groups is None:
        num_groups = int(groups.max()) + 1 if groups.numel() else 1
    conf = group_confusion(preds, targets, groups, num_groups, num_classes, validate=False)
    return confusion_to_counts(conf)
