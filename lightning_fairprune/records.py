"""The measurement record, declared once, and every view derived from its declaration.

A `Record` is one `FairnessMonitor` measurement: when it was taken (``moment``, ``round``,
``epoch``, ``global_step``, ``sparsity``), per-group lists (``support``, ``group_accuracy``,
``loss``, ``grad_norm``, ``hessian_trace``...) and the quantities relative to the dense
reference (``group_accuracy_dense``, ``intensification``, ``alpha``, ``excess_loss``). Each
field is declared once, with metadata saying how it is *viewed*:

* ``scalar``: how the field becomes logger scalars (`record_scalars`): ``"value"``
  (``<prefix><field>``), ``"per_group"`` (``<prefix><field>/<group>``, the `PER_GROUP_KEYS`),
  ``"interval"`` (a rate's Wilson bounds ``<prefix><rate>_lower|_upper/<group>``, the
  `RATE_KEYS`), ``"entries"`` (a mapping name -> number, ``<prefix><name>``),
  ``"per_group_entries"`` (a mapping name -> per-group list) or ``"disparity"``
  (``<prefix>disparity/<quantity>/gap|ratio``); absent: not logged;
* ``table``: a column of the per-group table (`GROUP_TABLE_COLUMNS`; an interval gives the
  columns ``<rate>_lower`` and ``<rate>_upper``), shown in W&B and read by the report;
* ``relative``: relative to the dense reference (``None`` until it exists; filled by
  `with_reference`);
* ``disparity``: ``"high"`` or ``"low"`` (which end is worse): the field gets a summary
  (gap, ratio, worst group...) in the record's ``disparity`` mapping;
* ``from_event``: a getter ``(event, moment) -> value`` that reads the field from the round's
  `PruningEvent` (``None`` at moments without one).

So a new record field is one declaration here, e.g. the model's FLOPs, which the pruner
measures and announces in its `PruningEvent` (``params`` and ``flops`` are declared so)::

    flops: int | None = field(
        default=None,
        metadata=view(scalar="value", from_event=lambda e, m: e.cost_at(m).get("flops")),
    )

and the JSON history (`Record.to_dict`), the scalars, the W&B table and the report pick it up.
On disk and in ``FairnessMonitor.history`` a record is a plain dict (`Record.to_dict`;
`Record.from_dict` reads one back, records of earlier versions included). The views below take
such dicts.

`make_record` builds a record from a `GroupMeasurement` and its `GroupMetrics` (computed by
`lightning_fairprune.diagnostics`) in a `RecordContext`; `restamp` records the same
measurement at another moment. Metric keys start with ``fairprune/`` for an unnamed monitor and
``fairprune-<name>/`` for a named one (`metric_prefix`): two monitors never share a key.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from lightning_fairprune.checks import check_choice, check_mapping
from lightning_fairprune.diagnostics.group_metrics import (
    GroupMetrics,
    guarded_intensification_ratio,
)
from lightning_fairprune.diagnostics.groups import group_slugs, normalize_group_names
from lightning_fairprune.diagnostics.recall import (
    disparity,
    excessive_loss,
    intensification_alpha,
    normalized_recall_balance,
    recall_balance,
)
from lightning_fairprune.history import dense_record, group_list, metric_prefix, number, to_plain

__all__ = [
    "AT_TARGET",
    "GROUP_TABLE_COLUMNS",
    "MOMENTS",
    "MOMENT_CODES",
    "PARITY_NOTE",
    "PARITY_SUMMARIES",
    "PER_GROUP_KEYS",
    "PREFIXED_MOMENTS",
    "RATE_KEYS",
    "RELATIVE_KEYS",
    "Record",
    "RecordContext",
    "callback_scalars",
    "dense_reference",
    "disparity_stat",
    "group_keys",
    "group_table",
    "headline_scalars",
    "logged_scalars",
    "make_record",
    "record_scalars",
    "record_values",
    "restamp",
    "summary_values",
    "view",
    "with_reference",
    "worst_group",
]

#: The moments a record can be taken at, in the order they can happen in a round.
MOMENTS: tuple[str, ...] = ("dense", "after_round", "before_round", "periodic", "end")

#: Numeric code of each record moment, logged as ``fairprune/moment_code``.
MOMENT_CODES: dict[str, int] = {moment: code for code, moment in enumerate(MOMENTS)}

#: Record moments whose scalars are logged under their own prefix (``fairprune/<moment>/...``),
#: so that two measurements at one global step never write the same key twice.
PREFIXED_MOMENTS: tuple[str, ...] = ("dense", "after_round")

#: Key segment of the headline numbers that exist only at the pruner's target sparsity
#: (``fairprune/at_target/...``, NaN before it; see `callback_scalars`).
AT_TARGET = "at_target"

#: Fairness summaries that compare groups on the label itself (selection rate, TPR, FPR):
#: meaningless when the groups are the classes (a right classifier selects each class only in
#: its own group, so the gaps are about 1 by construction); such records leave them out.
PARITY_SUMMARIES: tuple[str, ...] = (
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "worst_group_tpr",
    "equal_opportunity_difference",
    "equalized_odds_difference",
)

#: Why a monitor of class groups leaves the `PARITY_SUMMARIES` out (said once).
PARITY_NOTE = (
    f"FairnessMonitor: the groups are the classes, so {', '.join(PARITY_SUMMARIES)} are not "
    "reported: they compare groups on the label itself (a right classifier selects each class "
    "only within its own group), so they would be about 1 by construction. Give a protected "
    "attribute (`num_groups`, (x, y, g) batches) to get them."
)


def view(
    *,
    scalar: str | None = None,
    table: bool = False,
    relative: bool = False,
    disparity: str | None = None,
    from_event: Callable[[Any, str], Any] | None = None,
) -> dict[str, Any]:
    """The view metadata of a `Record` field (see the module docstring).

    Example:
        >>> view(scalar="value")["scalar"]
        'value'
    """
    return {
        "scalar": scalar,
        "table": table,
        "relative": relative,
        "disparity": disparity,
        "from_event": from_event,
    }


Values = list[Any] | None
Entries = dict[str, Any] | None


@dataclass(kw_only=True)
class Record:
    """One measurement as plain JSON values; per-group lists are indexed by group id.

    ``None`` marks a value not measured (or a group without samples inside a list). See the
    README's `FairnessMonitor` section for the meaning of each field, and the module
    docstring for the view metadata.

    Example:
        >>> rec = Record(moment="end", sparsity=0.5, accuracy=0.75, num_groups=2,
        ...              group_accuracy=[1.0, 0.5])
        >>> Record.from_dict(rec.to_dict()) == rec
        True
        >>> sorted(record_scalars(rec))[:2]
        ['fairprune/accuracy', 'fairprune/group_accuracy/g0']
    """

    moment: str | None = None
    monitor: str | None = None
    round: int | None = None
    epoch: int | None = None
    global_step: int | None = None
    sparsity: float | None = None
    accuracy: float | None = field(default=None, metadata=view(scalar="value"))
    params: int | None = field(
        default=None,
        metadata=view(scalar="value", from_event=lambda e, m: e.cost_at(m).get("params")),
    )
    flops: int | None = field(
        default=None,
        metadata=view(scalar="value", from_event=lambda e, m: e.cost_at(m).get("flops")),
    )
    num_groups: int | None = None
    group_names: Values = None
    groups_are_classes: bool | None = None
    support: Values = field(default=None, metadata=view(table=True))
    small_groups: Values = None
    group_accuracy_dense: Values = field(default=None, metadata=view(table=True, relative=True))
    group_accuracy: Values = field(
        default=None, metadata=view(scalar="per_group", table=True, disparity="low")
    )
    group_accuracy_ci: Values = field(default=None, metadata=view(scalar="interval", table=True))
    recall: Values = field(default=None, metadata=view(scalar="per_group", disparity="low"))
    recall_dense: Values = field(default=None, metadata=view(relative=True))
    tpr: Values = field(default=None, metadata=view(scalar="per_group", table=True))
    tpr_ci: Values = field(default=None, metadata=view(scalar="interval"))
    fpr: Values = field(default=None, metadata=view(scalar="per_group", table=True))
    fpr_ci: Values = field(default=None, metadata=view(scalar="interval"))
    selection_rate: Values = field(default=None, metadata=view(scalar="per_group", table=True))
    selection_rate_ci: Values = field(default=None, metadata=view(scalar="interval"))
    fairness: Entries = field(default=None, metadata=view(scalar="entries"))
    balance: Values = None
    norm_balance_dense: Values = field(default=None, metadata=view(table=True, relative=True))
    norm_balance: Values = field(default=None, metadata=view(table=True))
    intensification: Values = field(
        default=None, metadata=view(scalar="per_group", table=True, relative=True)
    )
    alpha: float | None = field(default=None, metadata=view(scalar="value", relative=True))
    loss: Values = field(default=None, metadata=view(disparity="high"))
    excess_loss: Values = field(
        default=None, metadata=view(scalar="per_group", table=True, relative=True)
    )
    predicted_excess_loss: Values = field(default=None, metadata=view(table=True))
    grad_norm: Values = field(
        default=None, metadata=view(scalar="per_group", table=True, disparity="high")
    )
    hessian_trace: Values = field(
        default=None, metadata=view(scalar="per_group", table=True, disparity="high")
    )
    hessian_trace_se: Values = field(default=None, metadata=view(scalar="per_group"))
    hessian_lambda_max: Values = field(
        default=None, metadata=view(scalar="per_group", table=True, disparity="high")
    )
    metrics: Entries = field(default=None, metadata=view(scalar="per_group_entries"))
    disparity: Entries = field(default=None, metadata=view(scalar="disparity"))

    def to_dict(self) -> dict[str, Any]:
        """The record as a dict of plain JSON values (a fresh copy), in declaration order."""
        return to_plain({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Record:
        """The record of a dict (`to_dict`, a history line); unknown keys are ignored.

        Keys a record of an earlier version lacks stay ``None``.
        """
        values = record_values(values)
        return cls(**{f.name: values.get(f.name) for f in fields(cls)})


def _declared(key: str, *values: Any) -> tuple[str, ...]:
    """Names of the `Record` fields whose metadata ``key`` is one of ``values``."""
    return tuple(f.name for f in fields(Record) if f.metadata.get(key) in values)


#: Per-group list fields of a record logged as ``fairprune/<field>/<group>``.
PER_GROUP_KEYS: tuple[str, ...] = _declared("scalar", "per_group")

#: Per-group rates recorded with Wilson intervals (``<rate>_ci``: ``[lower, upper]`` per group).
RATE_KEYS: tuple[str, ...] = tuple(n.removesuffix("_ci") for n in _declared("scalar", "interval"))

#: Fields relative to the dense reference (``None`` before it exists).
RELATIVE_KEYS: tuple[str, ...] = _declared("relative", True)


def _table_columns(name: str) -> list[str]:
    if name.endswith("_ci"):
        return [f"{name.removesuffix('_ci')}_lower", f"{name.removesuffix('_ci')}_upper"]
    return [name]


def _group_table_columns() -> list[str]:
    """The group's name, then the columns of the table fields in declaration order."""
    return ["group", *(c for name in _declared("table", True) for c in _table_columns(name))]


#: Columns of the per-group table (W&B table, report): the group's name, then the table fields.
GROUP_TABLE_COLUMNS: list[str] = _group_table_columns()


# --------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordContext:
    """Where a measurement belongs: everything of a record that the measurement does not hold.

    Attributes:
        moment: one of `MOMENTS`.
        round_index: the round the record belongs to.
        epoch: training epoch.
        global_step: optimizer steps so far.
        sparsity: realized sparsity of the pruned parameters.
        group_names: names of the groups (default ``g0, g1, ...``).
        groups_are_classes: whether the groups are the class labels.
        dense: the dense reference (`dense_reference`), or ``None`` (a ``"dense"`` record is its
            own reference).
        monitor: the monitor's name (``None`` for an unnamed monitor).
        user_metrics: the ``metrics=`` results per group (plain values), or ``None``.
        event: the round's `PruningEvent` (its attributes fill the ``from_event`` fields).
    """

    moment: str
    round_index: int = 0
    epoch: int = 0
    global_step: int = 0
    sparsity: float = 0.0
    group_names: Sequence[str] | None = None
    groups_are_classes: bool = True
    dense: Mapping[str, Any] | None = None
    monitor: str | None = None
    user_metrics: Mapping[str, Any] | None = None
    event: Any | None = None


def _interval(rate: Any) -> Any:
    return to_plain(torch.stack([rate.lower, rate.upper], dim=-1))


def _event_values(event: Any | None, moment: str) -> dict[str, Any]:
    """The ``from_event`` fields of a record taken at ``moment`` (``None`` without an event)."""
    out = {}
    for f in fields(Record):
        getter = f.metadata.get("from_event")
        if getter is not None:
            out[f.name] = None if event is None else to_plain(getter(event, moment))
    return out


def _when(context: RecordContext) -> dict[str, Any]:
    """The fields that say when a record was taken (from its context)."""
    check_choice(context.moment, "moment", MOMENTS)
    return {
        "moment": context.moment,
        "monitor": context.monitor,
        "round": int(context.round_index),
        "epoch": int(context.epoch),
        "global_step": int(context.global_step),
        "sparsity": float(context.sparsity),
        **_event_values(context.event, context.moment),
    }


def _disparities(record: Record) -> dict[str, Any]:
    """The ``disparity`` summaries of the fields that declare one."""
    out: dict[str, Any] = {}
    for name in _declared("disparity", "high", "low"):
        values = getattr(record, name)
        worse = Record.__dataclass_fields__[name].metadata["disparity"]
        out[name] = None if values is None else to_plain(disparity(values, worse == "high"))
    return out


def make_record(measurement: Any, metrics: GroupMetrics, context: RecordContext) -> Record:
    """Build a record from a measurement, its group metrics and its context.

    Per-group rates follow the fairness field's definitions (those of fairlearn, computed by
    `lightning_fairprune.diagnostics.group_metrics.group_metrics` from the measurement's
    confusion counts): ``group_accuracy`` within each group; ``recall`` only when the groups
    are the classes (then it is each class's recall, the same numbers); for binary tasks
    ``tpr``, ``fpr`` and ``selection_rate``; each with its Wilson interval (``<rate>_ci``).
    ``fairness`` holds the summaries (the `PARITY_SUMMARIES` only when the groups are not the
    classes); ``small_groups`` the groups the metrics flag small. The fields relative to the
    dense reference are filled (`with_reference`).

    Args:
        measurement: a `lightning_fairprune.diagnostics.GroupMeasurement` (``accuracy``,
            ``mean_loss``, optionally ``grad_norms``, ``hessian_trace``,
            ``hessian_trace_stderr``, ``hessian_lambda_max``, ``predicted_excess_loss``).
        metrics: the `GroupMetrics` of its ``confusion``.
        context: when and for whom (`RecordContext`).

    Returns:
        The record.

    Raises:
        ValueError: for an unknown moment, or a dense reference with another number of groups.

    Example:
        >>> from lightning_fairprune.diagnostics import group_confusion, group_metrics
        >>> from types import SimpleNamespace
        >>> y, p = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])
        >>> metrics = group_metrics(group_confusion(p, y, y, num_groups=2, num_classes=2))
        >>> m = SimpleNamespace(accuracy=0.75, mean_loss=torch.tensor([0.1, 0.9]))
        >>> rec = make_record(m, metrics, RecordContext("dense"))
        >>> rec.group_accuracy, rec.recall, rec.alpha, rec.excess_loss
        ([1.0, 0.5], [1.0, 0.5], 1.0, [0.0, 0.0])
    """
    accuracy_per_group = metrics.accuracy.value
    count = metrics.count
    classes = bool(context.groups_are_classes)
    accuracy = float(measurement.accuracy)
    left_out = PARITY_SUMMARIES if classes else ()  # gaps on the label itself
    values: dict[str, Any] = {
        **_when(context),
        "accuracy": to_plain(accuracy),
        "num_groups": int(count.numel()),
        "group_names": normalize_group_names(context.group_names, int(count.numel())),
        "groups_are_classes": classes,
        "support": [int(c) for c in count.tolist()],
        "small_groups": metrics.small.nonzero().flatten().tolist(),
        "recall": to_plain(accuracy_per_group) if classes else None,
        "fairness": to_plain({k: v for k, v in metrics.summary.items() if k not in left_out}),
        "balance": to_plain(recall_balance(accuracy_per_group, accuracy)),
        "norm_balance": to_plain(normalized_recall_balance(accuracy_per_group, accuracy)),
        "loss": to_plain(measurement.mean_loss.double()),
        "metrics": to_plain(context.user_metrics),
    }
    for name, rate in metrics.rates().items():
        key = "group_accuracy" if name == "accuracy" else name
        values[key], values[f"{key}_ci"] = to_plain(rate.value), _interval(rate)
    for key, attribute in (
        ("predicted_excess_loss", "predicted_excess_loss"),
        ("grad_norm", "grad_norms"),
        ("hessian_trace", "hessian_trace"),
        ("hessian_trace_se", "hessian_trace_stderr"),
        ("hessian_lambda_max", "hessian_lambda_max"),
    ):
        values[key] = to_plain(getattr(measurement, attribute, None))
    record = Record(**values)
    record.disparity = _disparities(record)
    reference = dense_reference(record) if context.moment == "dense" else context.dense
    return with_reference(record, reference)


def dense_reference(record: Record | Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a dense record that later records are compared with.

    Example:
        >>> sorted(dense_reference({"group_accuracy": [1.0], "norm_balance": [0.0],
        ...                         "loss": [0.1], "accuracy": 1.0, "support": [3]}))
        ['accuracy', 'loss', 'norm_balance', 'recall', 'support']
    """
    values = record_values(record)
    return {
        "recall": values.get("group_accuracy") or values.get("recall"),  # earlier checkpoints
        "norm_balance": values.get("norm_balance"),
        "loss": values.get("loss"),
        "accuracy": values.get("accuracy"),
        "support": values.get("support"),
    }


def _f64(values: Sequence[Any]) -> torch.Tensor:
    return torch.tensor(
        [math.nan if number(v) is None else float(v) for v in values], dtype=torch.float64
    )


def with_reference(record: Record, dense: Mapping[str, Any] | None) -> Record:
    """The record with its fields relative to the dense reference (`RELATIVE_KEYS`) filled.

    ``group_accuracy_dense`` (and ``recall_dense`` when the groups are the classes),
    ``norm_balance_dense``, the intensification I = B̃ / B̃_dense per group, its slope
    ``alpha`` and ``excess_loss``. I is *undefined* (``None``) for a group whose dense balance
    is too close to zero for the ratio to mean anything (|B̃_dense| < 0.02, or below one
    sample's effect 1 / (n·A); see
    `lightning_fairprune.diagnostics.group_metrics.guarded_intensification_ratio`). Without a
    reference the relative fields are ``None``.

    Raises:
        ValueError: if the reference has another number of groups than the record.
    """
    record = replace(record, **dict.fromkeys(_declared("relative", True)))
    if dense is None:
        return record
    reference = list(dense.get("recall") or dense.get("group_accuracy") or [])
    if len(reference) != record.num_groups:
        raise ValueError(
            f"Expected {len(reference)} groups as in the dense reference, but the "
            f"measurement has {record.num_groups}"
        )
    nrb, nrb_ref = _f64(record.norm_balance or []), _f64(dense["norm_balance"])
    support, acc = dense.get("support"), number(dense.get("accuracy"))
    if acc is None or acc <= 0:  # no size-aware limit without a positive dense accuracy
        support = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ratio = guarded_intensification_ratio(
            nrb,
            nrb_ref,
            support_ref=None if support is None else _f64(support),
            acc_ref=acc if support is not None else None,
        )
        alpha = float(intensification_alpha(nrb, nrb_ref))
    return replace(
        record,
        group_accuracy_dense=list(reference),
        recall_dense=list(reference) if record.groups_are_classes is not False else None,
        norm_balance_dense=to_plain(list(dense["norm_balance"])),
        intensification=to_plain(ratio),
        alpha=to_plain(alpha),
        excess_loss=to_plain(excessive_loss(_f64(record.loss or []), _f64(dense["loss"]))),
    )


def restamp(record: Record, context: RecordContext) -> Record:
    """The same measurement recorded in another context (the same weights at the same step).

    The fields that say when (and those read from the event) come from ``context``; the
    fields relative to the dense reference are filled again (against the record itself for
    ``moment="dense"``); ``predicted_excess_loss`` is kept only for ``"after_round"``.

    Example:
        >>> rec = Record(moment="periodic", round=0, epoch=1, sparsity=0.0, num_groups=2,
        ...              accuracy=0.75, group_accuracy=[1.0, 0.5], norm_balance=[0.25, -0.25],
        ...              loss=[0.1, 0.9], support=[2, 2])
        >>> dense = restamp(rec, RecordContext("dense", epoch=2))
        >>> dense.moment, dense.epoch, dense.alpha, dense.excess_loss, rec.alpha
        ('dense', 2, 1.0, [0.0, 0.0], None)
    """
    when = _when(context)
    when.update(global_step=record.global_step, monitor=record.monitor)
    kept = record.predicted_excess_loss if context.moment == "after_round" else None
    out = replace(record, **when, predicted_excess_loss=kept)
    return with_reference(out, dense_reference(out) if context.moment == "dense" else context.dense)


# --------------------------------------------------------------------------------------------
# reading a record
# --------------------------------------------------------------------------------------------
def record_values(record: Record | Mapping[str, Any]) -> Mapping[str, Any]:
    """A record as a mapping: a `Record` as its dict, a mapping as is; anything else is refused.

    Example:
        >>> record_values(Record(moment="end"))["moment"]
        'end'
        >>> record_values([1])
        Traceback (most recent call last):
        ...
        TypeError: Expected `record` to be a dict (a FairnessMonitor history record), but got list
    """
    if isinstance(record, Record):
        return record.to_dict()
    return check_mapping(record, "record", "a dict (a FairnessMonitor history record)")


def worst_group(
    record: Record | Mapping[str, Any], key: str | None = None
) -> tuple[int | None, float | None]:
    """``(group, value)`` of the lowest ``record[key]`` over groups with a value.

    ``key`` defaults to ``"group_accuracy"`` (``"recall"`` in records of earlier versions).

    Example:
        >>> worst_group({"recall": [0.9, None, 0.7]})
        (2, 0.7)
        >>> worst_group({"group_accuracy": [0.6, 0.8], "recall": None})
        (0, 0.6)
    """
    values = record_values(record)
    if key is None:
        key = "group_accuracy" if group_list(values, "group_accuracy") else "recall"
    present = [(v, g) for g, v in enumerate(number(x) for x in group_list(values, key))]
    present = [(v, g) for v, g in present if v is not None]
    if not present:
        return None, None
    value, group = min(present)
    return group, value


def disparity_stat(
    record: Record | Mapping[str, Any], quantity: str, stat: str = "gap"
) -> float | None:
    """A disparity statistic of a record: from its summary, else from the per-group list.

    Example:
        >>> disparity_stat({"recall": [0.9, 0.6]}, "recall")
        0.30000000000000004
    """
    values = record_values(record)
    summary = (values.get("disparity") or {}).get(quantity)
    if isinstance(summary, Mapping) and number(summary.get(stat)) is not None:
        return number(summary.get(stat))
    present = [v for v in (number(x) for x in group_list(values, quantity)) if v is not None]
    if not present:
        return None
    if stat == "gap":
        return max(present) - min(present)
    if stat == "ratio":
        return max(present) / min(present) if min(present) > 0 else None
    return None


def group_keys(record: Record | Mapping[str, Any]) -> list[str]:
    """Logger-safe keys of the record's groups: slugs of ``group_names`` (``g0, g1...``).

    Example:
        >>> group_keys({"num_groups": 2, "group_names": ["race=black & sex=F", "other"]})
        ['race-black_sex-F', 'other']
        >>> group_keys({"recall": [0.5, 0.7]})
        ['g0', 'g1']
    """
    values = record_values(record)
    names = group_list(values, "group_names")
    if names:
        return group_slugs([str(n) for n in names])
    count = values.get("num_groups")
    if not isinstance(count, int):
        count = max((len(group_list(values, k)) for k in PER_GROUP_KEYS), default=0)
    return [f"g{a}" for a in range(count)]


# --------------------------------------------------------------------------------------------
# scalars: one flattening, driven by the declaration
# --------------------------------------------------------------------------------------------
def _per_group(name: str, values: Sequence[Any], keys: list[str]) -> Iterator[tuple[str, Any]]:
    for group, value in enumerate(values):
        if group < len(keys):
            yield f"{name}/{keys[group]}", value


def _flatten(kind: str, name: str, value: Any, keys: list[str]) -> Iterator[tuple[str, Any]]:
    """The ``(key, value)`` scalars of one field, by its declared ``scalar`` kind."""
    if kind == "value":
        yield name, value
    elif kind == "per_group" and isinstance(value, (list, tuple)):
        yield from _per_group(name, value, keys)
    elif kind == "interval" and isinstance(value, (list, tuple)):
        rate = name.removesuffix("_ci")
        for group, bounds in enumerate(value):
            if group < len(keys) and isinstance(bounds, (list, tuple)) and len(bounds) == 2:
                yield f"{rate}_lower/{keys[group]}", bounds[0]
                yield f"{rate}_upper/{keys[group]}", bounds[1]
    elif kind == "entries" and isinstance(value, Mapping):
        # the worst-group accuracy is computed from the per-group values (old records too)
        yield from ((k, v) for k, v in value.items() if k != "worst_group_accuracy")
    elif kind == "per_group_entries" and isinstance(value, Mapping):
        for metric, values in value.items():
            if isinstance(values, (list, tuple)):
                yield from _per_group(metric, values, keys)
    elif kind == "disparity" and isinstance(value, Mapping):
        for quantity, summary in value.items():
            if isinstance(summary, Mapping):
                for stat in ("gap", "ratio"):
                    yield f"disparity/{quantity}/{stat}", summary.get(stat)


def record_scalars(
    record: Record | Mapping[str, Any], *, undefined: float | None = None
) -> dict[str, float]:
    """Flatten one record into its scalars, keyed under its monitor's `metric_prefix`.

    Every field with a ``scalar`` declaration (module docstring): ``fairprune/accuracy``,
    ``fairprune/alpha``, ``fairprune/<field>/<group>`` for the `PER_GROUP_KEYS` (``<group>``:
    the slug of the group's name, `group_keys`), ``fairprune/<rate>_lower|_upper/<group>`` for
    the `RATE_KEYS`, the fairness summaries (``fairprune/demographic_parity_difference``...),
    the ``metrics=`` per group and ``fairprune/disparity/<quantity>/gap|ratio``; and, derived,
    ``fairprune/worst_group_accuracy`` (lowest accuracy within a group, over groups with
    samples), ``fairprune/worst_group_recall`` (the same, when the groups are the classes) and
    ``fairprune/moment_code`` (`MOMENT_CODES`). ``fairprune-<name>/`` for a named monitor.
    Missing and non-finite values are left out (the record keeps them), or, with ``undefined``
    given, set to it, together with the per-group fields relative to a dense reference the
    record does not have yet: the key set then does not depend on what one measurement
    happened to see. The sparsity is not among them: the pruner logs it.

    Example:
        >>> rec = {"moment": "after_round", "sparsity": 0.5, "accuracy": 0.9, "alpha": None,
        ...        "recall": [0.95, 0.8, None], "intensification": [1.0, 2.0, None],
        ...        "disparity": {"recall": {"gap": 0.15, "ratio": 1.1875}}}
        >>> for key, value in sorted(record_scalars(rec).items()):
        ...     print(key, value)
        fairprune/accuracy 0.9
        fairprune/disparity/recall/gap 0.15
        fairprune/disparity/recall/ratio 1.1875
        fairprune/intensification/g0 1.0
        fairprune/intensification/g1 2.0
        fairprune/moment_code 1.0
        fairprune/recall/g0 0.95
        fairprune/recall/g1 0.8
        fairprune/worst_group_accuracy 0.8
        fairprune/worst_group_recall 0.8
        >>> named = record_scalars({**rec, "monitor": "attr"}, undefined=float("nan"))
        >>> named["fairprune-attr/alpha"], named["fairprune-attr/recall/g2"]
        (nan, nan)
    """
    values = record_values(record)
    keys = group_keys(values)
    out: dict[str, Any] = {
        "worst_group_accuracy": worst_group(values)[1],
        "moment_code": MOMENT_CODES.get(str(values.get("moment"))),
    }
    if group_list(values, "recall"):
        out["worst_group_recall"] = worst_group(values, "recall")[1]
    for f in fields(Record):
        kind, value = f.metadata.get("scalar"), values.get(f.name)
        if kind is None:
            continue
        missing = not group_list(values, f.name) and undefined is not None
        if missing and kind == "per_group" and f.metadata.get("relative"):
            value = [None] * len(keys)  # no dense reference yet
        out.update(_flatten(kind, f.name, value, keys))
    prefix = metric_prefix(values.get("monitor"))
    flat = {prefix + k: number(v) for k, v in out.items()}
    if undefined is None:
        return {k: v for k, v in flat.items() if v is not None}
    return {k: undefined if v is None else v for k, v in flat.items()}


def logged_scalars(
    record: Record | Mapping[str, Any], *, undefined: float | None = None
) -> dict[str, float]:
    """The scalars a logger gets for a record: `record_scalars`, prefixed by moment.

    ``"dense"`` and ``"after_round"`` records go under ``fairprune/dense/...`` and
    ``fairprune/after_round/...`` (`PREFIXED_MOMENTS`); the others (``"before_round"``,
    ``"periodic"``, ``"end"``: the trained model) under ``fairprune/...``. Measurements taken
    at one global step (the dense reference, or the model before and right after a round)
    thus never log the same key twice at one step.

    Example:
        >>> sorted(logged_scalars({"moment": "dense", "accuracy": 0.9, "recall": [0.9]}))[:2]
        ['fairprune/dense/accuracy', 'fairprune/dense/moment_code']
    """
    values = record_values(record)
    scalars = record_scalars(values, undefined=undefined)
    moment = values.get("moment")
    if moment not in PREFIXED_MOMENTS:
        return scalars
    prefix = metric_prefix(values.get("monitor"))
    return {f"{prefix}{moment}/{k.removeprefix(prefix)}": v for k, v in scalars.items()}


def headline_scalars(scalars: Mapping[str, float], prefix: str) -> dict[str, float]:
    """The headline numbers of `record_scalars` (no per-group values), keys without ``prefix``.

    Example:
        >>> headline_scalars({"fairprune/accuracy": 0.9, "fairprune/recall/g0": 0.8,
        ...                   "fairprune/disparity/recall/gap": 0.1}, "fairprune/")
        {'accuracy': 0.9, 'disparity/recall/gap': 0.1}
    """
    out: dict[str, float] = {}
    for key, value in scalars.items():
        name = key.removeprefix(prefix)
        if "/" not in name or name.startswith("disparity/"):
            out[name] = value
    return out


def callback_scalars(record: Record | Mapping[str, Any], *, at_target: bool) -> dict[str, float]:
    """What a monitor puts into ``trainer.callback_metrics`` for one record.

    Every scalar of `record_scalars` and `logged_scalars` (undefined values as NaN, so that
    every key exists from the first measurement on and never holds a stale value), and the
    headline numbers (`headline_scalars`) under ``<prefix>at_target/`` (`AT_TARGET`): equal
    to the plain key once the pruner has reached its target sparsity (``at_target``), NaN
    before. `ModelCheckpoint` ranks NaN last in either mode, so
    ``ModelCheckpoint(monitor="fairprune/at_target/...")`` keeps a model at the target sparsity
    (`EarlyStopping(check_finite=True)` would stop on the NaN: early-stop on the plain keys).

    Example:
        >>> rec = {"moment": "periodic", "accuracy": 0.9, "recall": [0.9, 0.7]}
        >>> before = callback_scalars(rec, at_target=False)
        >>> before["fairprune/worst_group_accuracy"], before["fairprune/at_target/accuracy"]
        (0.7, nan)
        >>> callback_scalars(rec, at_target=True)["fairprune/at_target/worst_group_accuracy"]
        0.7
    """
    values = record_values(record)
    out = record_scalars(values, undefined=math.nan)
    out.update(logged_scalars(values, undefined=math.nan))
    prefix = metric_prefix(values.get("monitor"))
    for name, value in headline_scalars(out, prefix).items():
        out[f"{prefix}{AT_TARGET}/{name}"] = value if at_target else math.nan
    return out


def summary_values(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The run summary of a history: its last record's headline numbers.

    Keys ``fairprune/final/<name>`` for the `headline_scalars` of the last record (accuracy,
    worst-group accuracy and recall, α, the fairness summaries, ``disparity/<q>/gap|ratio``)
    and its ``sparsity``; ``fairprune/dense/accuracy``, ``fairprune/dense/worst_group_accuracy``
    and ``fairprune/dense/worst_group_recall`` from the dense record, and
    ``fairprune/num_records``. Missing values are left out. A named monitor's records give
    ``fairprune-<name>/...`` (`metric_prefix`).

    Example:
        >>> hist = [{"moment": "dense", "sparsity": 0.0, "accuracy": 0.95, "recall": [1.0, 0.9]},
        ...         {"moment": "end", "sparsity": 0.9, "accuracy": 0.9, "recall": [0.95, 0.7],
        ...          "alpha": 1.5}]
        >>> s = summary_values(hist)
        >>> s["fairprune/final/worst_group_recall"], s["fairprune/dense/accuracy"]
        (0.7, 0.95)
    """
    records = [r for r in history if isinstance(r, Mapping)]
    if not records:
        return {}
    final = records[-1]
    prefix = metric_prefix(final.get("monitor"))
    out: dict[str, float] = {f"{prefix}num_records": float(len(records))}
    for name, value in headline_scalars(record_scalars(final), prefix).items():
        out[f"{prefix}final/{name}"] = value
    sparsity = number(final.get("sparsity"))
    if sparsity is not None:
        out[f"{prefix}final/sparsity"] = sparsity
    dense = dense_record(records)
    if dense is not None:
        scalars = record_scalars(dense)
        for name in ("accuracy", "worst_group_accuracy", "worst_group_recall"):
            if f"{prefix}{name}" in scalars:
                out[f"{prefix}dense/{name}"] = scalars[f"{prefix}{name}"]
    return out


# --------------------------------------------------------------------------------------------
# the per-group table
# --------------------------------------------------------------------------------------------
def _dense_norm_balance(
    record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> list[float | None]:
    """B̃ of the dense reference for records of earlier versions: the dense record's, else B̃/I."""
    dense = dense_record(history)
    if dense is not None and group_list(dense, "norm_balance"):
        return [number(v) for v in group_list(dense, "norm_balance")]
    out: list[float | None] = []
    ratios = group_list(record, "intensification")
    for group, nb in enumerate(group_list(record, "norm_balance")):
        nb_now = number(nb)
        ratio = number(ratios[group]) if group < len(ratios) else None
        out.append(nb_now / ratio if nb_now is not None and ratio else None)
    return out


def _table_values(
    record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> dict[str, list[Any]]:
    """Per column, the per-group values (records of earlier versions filled in)."""
    out: dict[str, list[Any]] = {}
    for name in _declared("table", True):
        values = group_list(record, name)
        if name.endswith("_ci"):
            lower, upper = _table_columns(name)
            out[lower] = [b[0] if isinstance(b, (list, tuple)) else None for b in values]
            out[upper] = [b[1] if isinstance(b, (list, tuple)) else None for b in values]
        else:
            out[name] = values
    for name, earlier in (("group_accuracy", "recall"), ("group_accuracy_dense", "recall_dense")):
        out[name] = out[name] or group_list(record, earlier)
    out["norm_balance_dense"] = out["norm_balance_dense"] or _dense_norm_balance(record, history)
    return out


def group_table(
    record: Record | Mapping[str, Any], history: Sequence[Mapping[str, Any]] = ()
) -> tuple[list[str], list[list[Any]]]:
    """Columns (`GROUP_TABLE_COLUMNS`) and rows of the per-group table of one record.

    The first column is the group's name; ``None`` where a value is missing. Records of
    earlier versions (``recall`` only, no ``norm_balance_dense``) fill the accuracy columns
    from ``recall`` and B̃ of the dense model from the dense record of ``history``, else from
    B̃ / I of this record.

    Example:
        >>> rec = {"num_groups": 2, "support": [10, 5], "recall": [0.9, 0.6],
        ...        "recall_dense": [1.0, 0.8], "norm_balance": [0.125, -0.25],
        ...        "intensification": [0.5, 2.0]}
        >>> columns, rows = group_table(rec)
        >>> dict(zip(columns, rows[1]))["norm_balance_dense"]
        -0.125
        >>> rows[0][:4]
        ['g0', 10, 1.0, 0.9]
    """
    values = record_values(record)
    columns = _group_table_columns()
    per_column = _table_values(values, history)
    names = group_list(values, "group_names")
    num_groups = values.get("num_groups")
    if not isinstance(num_groups, int):
        num_groups = max((len(v) for v in per_column.values()), default=0)
    rows: list[list[Any]] = []
    for group in range(num_groups):
        row: list[Any] = [str(names[group]) if group < len(names) else f"g{group}"]
        for name in columns[1:]:
            column = per_column[name]
            value = number(column[group]) if group < len(column) else None
            row.append(int(value) if name == "support" and value is not None else value)
        rows.append(row)
    return columns, rows
