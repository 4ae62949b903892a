"""Any torchmetrics metric per group (a monitor's ``metrics=``), with errors that say where.

`user_metric_values` runs one forward pass over the fairness batches and updates, per metric,
one clone per group (`PerGroupMetric`) with that group's samples only. A metric that raises on
some group's samples (a class it was not built for, one class only where AUROC needs two...)
raises a `ValueError` naming the metric, the group and the metric's own message, instead of
the metric's raw traceback. Under DDP a failure on one process is announced to all (through
``reduce_fn``) before any collective, so that every process raises instead of one waiting.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.diagnostics.group_metrics import PerGroupMetric
from lightning_fairprune.diagnostics.groups import normalize_group_names

__all__ = ["metric_inputs", "user_metric_values"]


def metric_inputs(logits: Tensor, metrics_input: str, pos_label: int | None) -> Tensor:
    """What a metric gets with the targets: class ids (``"preds"``) or probabilities.

    ``"probs"``: softmax probabilities; for two classes and a ``pos_label``, the probability
    of the positive class (as binary AUROC expects).

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> metric_inputs(logits, "preds", 1).tolist()
        [0, 1]
        >>> [round(p, 3) for p in metric_inputs(logits, "probs", 1).tolist()]
        [0.119, 0.731]
    """
    if metrics_input == "preds":
        return logits.argmax(1)
    probs = logits.float().softmax(1)
    if probs.shape[1] == 2 and pos_label is not None:
        return probs[:, pos_label]
    return probs


def _fresh(metric: Any) -> Any:
    return metric.clone() if callable(getattr(metric, "clone", None)) else copy.deepcopy(metric)


def _error(name: str, names: Sequence[str], group: int | None, err: Exception) -> ValueError:
    where = "a group" if group is None else f"group {names[group]!r} (id {group})"
    return ValueError(
        f"Expected `metrics[{name!r}]` to compute on the samples of every group, but it raised "
        f"on {where}: {type(err).__name__}: {err}"
    )


def _update_culprit(metric: Any, args: tuple[Tensor, Tensor], groups: Tensor) -> int | None:
    """The first group whose samples alone make a fresh clone's ``update`` raise."""
    for group in torch.unique(groups).tolist():
        idx = (groups == group).nonzero().flatten()
        try:
            _fresh(metric).update(*(a[idx.to(a.device)] for a in args))
        except Exception:
            return int(group)
    return None


def _compute_culprit(per_group: PerGroupMetric) -> int | None:
    """The first group with samples whose clone's ``compute`` raises (one process only)."""
    for group in range(per_group.num_groups):
        if int(per_group.counts[group]) > 0:
            try:
                per_group.metrics[group].compute()
            except Exception:
                return group
    return None


def user_metric_values(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor, Tensor]],
    metrics: Mapping[str, Any],
    num_groups: int,
    *,
    forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    metrics_input: str = "preds",
    pos_label: int | None = 1,
    group_names: Sequence[str] | None = None,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, list[Any]]:
    """Each metric's value per group over ``batches`` (NaN for a group without samples).

    Args:
        model: the model (called under ``torch.no_grad()``).
        batches: ``(inputs, targets, groups)`` batches.
        metrics: ``{name: Metric}``; the metrics themselves are not updated (clones are).
        num_groups: number of groups G.
        forward_fn: ``fn(model, inputs) -> logits``; default ``model(inputs)``.
        metrics_input: ``"preds"`` or ``"probs"`` (`metric_inputs`).
        pos_label: positive class of a binary task.
        group_names: names of the groups, for error messages.
        reduce_fn: sum over processes (DDP), so that a failure on one process stops all.

    Returns:
        ``{name: [value per group]}``.

    Raises:
        ValueError: a metric raised on some group's samples; the message names the metric,
            the group and the metric's error.

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> model = nn.Linear(2, 3)
        >>> x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> g = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> out = user_metric_values(model, [(x, y, g)], {"acc": MulticlassAccuracy(3)}, 2)
        >>> len(out["acc"])
        2
        >>> user_metric_values(model, [(x, y, g)], {"acc": MulticlassAccuracy(2)}, 2)
        Traceback (most recent call last):
        ...
        ValueError: Expected `metrics['acc']` to compute on the samples of every group, but it raised on group 'g0' (id 0): RuntimeError: Detected more unique values in `target` than expected. Expected only 2 but found 3 in `target`. Found values: tensor([0, 1, 2]).
    """  # noqa: E501
    names = normalize_group_names(group_names, num_groups)
    device = next(model.parameters()).device
    per_group = {
        name: PerGroupMetric(metric, num_groups).to(device) for name, metric in metrics.items()
    }
    failure: ValueError | None = None
    with torch.no_grad():
        for x, y, g in batches:
            logits = model(x) if forward_fn is None else forward_fn(model, x)
            inputs = metric_inputs(logits, metrics_input, pos_label)
            for name, metric in per_group.items():
                try:
                    metric.update(inputs, y, groups=g)
                except Exception as err:
                    culprit = _update_culprit(metrics[name], (inputs, y), g)
                    failure = _error(name, names, culprit, err)
                    failure.__cause__ = err
                    break
            if failure is not None:
                break
    if reduce_fn is not None:
        failed = reduce_fn(torch.tensor([float(failure is not None)], device=device))
        if failure is None and float(failed.sum()) > 0:
            failure = ValueError(
                "Expected every `metrics` entry to compute on the fairness batches of every "
                "process, but one raised on another process (its message is shown there)"
            )
    if failure is not None:
        raise failure
    out: dict[str, list[Any]] = {}
    for name, metric in per_group.items():
        try:
            out[name] = metric.compute()
        except Exception as err:
            culprit = None
            if reduce_fn is None:
                with contextlib.suppress(Exception):
                    culprit = _compute_culprit(metric)
            raise _error(name, names, culprit, err) from err
    return out
