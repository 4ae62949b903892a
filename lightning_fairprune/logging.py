"""Send fairness measurements to the Lightning loggers of a `Trainer`, never failing training.

This is the only module besides `callbacks/` that knows about Lightning loggers.

* `log_scalars`: scalars to every attached logger (TensorBoard, CSV, W&B, ...).
* `log_round`: one `FairnessMonitor` history record: its scalars to every logger and, when a
  `WandbLogger` is attached, a per-group table, a bar chart of recall dense vs now, per-group
  recall against sparsity (a line series that grows every round) and a scatter of the
  normalized recall balance B̃ now against B̃ dense with the fitted slope α.
* `log_summary`: final sparsity, accuracy, worst-group recall, α and disparities into the
  W&B run summary; `log_config`: a callback's settings into the W&B run config.

Only global rank 0 logs. ``wandb`` is imported lazily, inside functions, and only when a
`WandbLogger` is attached (detected by class name). Any logger or W&B failure becomes one
warning per logger and kind of failure and is otherwise ignored: the callers keep every
measurement in their local history, which nothing here modifies.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "GROUP_TABLE_COLUMNS",
    "MOMENT_CODES",
    "find_wandb_logger",
    "group_table",
    "is_global_zero",
    "log_config",
    "log_round",
    "log_scalars",
    "log_summary",
    "recall_curves",
    "record_scalars",
    "summary_values",
]

#: Numeric code of each record moment, logged as ``fairprune/moment_code``.
MOMENT_CODES: dict[str, int] = {
    "dense": 0,
    "after_round": 1,
    "before_round": 2,
    "periodic": 3,
    "end": 4,
}

#: Per-group list fields of a history record logged as ``fairprune/<field>/g<a>``.
_PER_GROUP_KEYS: tuple[str, ...] = (
    "recall",
    "intensification",
    "excess_loss",
    "grad_norm",
    "hessian_trace",
    "hessian_lambda_max",
)

_warned: set[int] = set()
_warned_kinds: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_warned_kinds_by_id: dict[int, set[str]] = {}


def is_global_zero(trainer: Any) -> bool:
    """Return ``trainer.is_global_zero``, or ``True`` for objects without it.

    Example:
        >>> is_global_zero(object())
        True
    """
    return bool(getattr(trainer, "is_global_zero", True))


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, NaN, inf or not a number)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _finite_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        number = _number(value)
        if number is not None:
            out[key] = number
    return out


def _warn_once(owner: Any, kind: str, message: str) -> None:
    """Warn once per ``owner`` (a logger) and ``kind`` of failure."""
    try:
        seen = _warned_kinds.setdefault(owner, set())
    except TypeError:  # owner not weak-referenceable
        seen = _warned_kinds_by_id.setdefault(id(owner), set())
    if kind in seen:
        return
    seen.add(kind)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _send(trainer: Any, values: Mapping[str, float], step: int, skip: Any | None = None) -> None:
    for logger in list(getattr(trainer, "loggers", None) or []):
        if skip is not None and logger is skip:
            continue
        try:
            logger.log_metrics(dict(values), step=step)
        except Exception as err:  # a logger failure must never stop training
            if id(logger) not in _warned:
                _warned.add(id(logger))
                warnings.warn(
                    f"lightning_fairprune: logging to {type(logger).__name__} failed "
                    f"({type(err).__name__}: {err}); training continues and the measurements "
                    "are kept in the callback's local history.",
                    RuntimeWarning,
                    stacklevel=3,
                )


def log_scalars(trainer: Any, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log scalar metrics to every logger of ``trainer``; failures become warnings.

    Non-finite values and ``None`` (a group with no samples) are dropped, because most
    loggers reject NaN; the callers keep them in their local histories. Only global rank 0
    logs, as Lightning's loggers expect.

    Args:
        trainer: a `lightning.pytorch.Trainer` (anything with a ``loggers`` list works).
        metrics: name -> number (Python number or 0-d tensor).
        step: the step to log at; defaults to ``trainer.global_step``.

    Example:
        >>> class _Logger:
        ...     def __init__(self): self.seen = {}
        ...     def log_metrics(self, metrics, step): self.seen.update(metrics)
        >>> class _Trainer:
        ...     loggers = [_Logger()]; global_step = 3; is_global_zero = True
        >>> t = _Trainer()
        >>> log_scalars(t, {"fairprune/sparsity": 0.5, "fairprune/missing": float("nan")})
        >>> t.loggers[0].seen
        {'fairprune/sparsity': 0.5}
    """
    if not is_global_zero(trainer):
        return
    values = _finite_scalars(metrics)
    if not values:
        return
    if step is None:
        step = int(getattr(trainer, "global_step", 0))
    _send(trainer, values, step)


def find_wandb_logger(trainer: Any) -> Any | None:
    """Return the first `WandbLogger` attached to ``trainer``, or ``None``.

    Detected by class name so that neither wandb nor the logger class is imported here.

    Example:
        >>> class _Trainer:
        ...     loggers = [object()]
        >>> find_wandb_logger(_Trainer()) is None
        True
    """
    for logger in list(getattr(trainer, "loggers", None) or []):
        if type(logger).__name__ == "WandbLogger":
            return logger
    return None


# --------------------------------------------------------------------------------------
# Pure helpers: history record -> scalars, tables, curves (no logger, no wandb)
# --------------------------------------------------------------------------------------


def _check_record(record: Any, name: str = "record") -> None:
    if not isinstance(record, Mapping):
        raise TypeError(
            f"Expected `{name}` to be a dict (a FairnessMonitor history record), "
            f"but got {type(record).__name__}"
        )


def _group_list(record: Mapping[str, Any], key: str) -> list[Any]:
    values = record.get(key)
    if values is None or isinstance(values, (str, bytes)):
        return []
    try:
        return list(values)
    except TypeError:
        return []


def _worst(values: Sequence[Any]) -> float | None:
    finite = [v for v in (_number(x) for x in values) if v is not None]
    return min(finite) if finite else None


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Flatten one history record into the ``fairprune/...`` scalars every logger gets.

    Keys: ``fairprune/accuracy``, ``fairprune/alpha``, ``fairprune/sparsity``,
    ``fairprune/worst_group_recall`` (lowest recall over groups with samples),
    ``fairprune/moment_code`` (see `MOMENT_CODES`), ``fairprune/<field>/g<a>`` for
    ``recall``, ``intensification``, ``excess_loss``, ``grad_norm``, ``hessian_trace`` and
    ``hessian_lambda_max``, and ``fairprune/disparity/<quantity>/gap`` and ``.../ratio``.
    Missing and non-finite values are left out (the record keeps them).

    Args:
        record: a `FairnessMonitor` history record (fields listed in the README).

    Returns:
        Key -> finite float.

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
        fairprune/sparsity 0.5
        fairprune/worst_group_recall 0.8
    """
    _check_record(record)
    out: dict[str, Any] = {
        "fairprune/accuracy": record.get("accuracy"),
        "fairprune/alpha": record.get("alpha"),
        "fairprune/sparsity": record.get("sparsity"),
        "fairprune/worst_group_recall": _worst(_group_list(record, "recall")),
        "fairprune/moment_code": MOMENT_CODES.get(str(record.get("moment"))),
    }
    for key in _PER_GROUP_KEYS:
        for group, value in enumerate(_group_list(record, key)):
            out[f"fairprune/{key}/g{group}"] = value
    disparity = record.get("disparity") or {}
    if isinstance(disparity, Mapping):
        for quantity, summary in disparity.items():
            if isinstance(summary, Mapping):
                for stat in ("gap", "ratio"):
                    out[f"fairprune/disparity/{quantity}/{stat}"] = summary.get(stat)
    return _finite_scalars(out)


def _dense_record(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for rec in reversed(list(history)):
        if isinstance(rec, Mapping) and rec.get("moment") == "dense":
            return rec
    return None


def _dense_norm_balance(
    record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> list[float | None]:
    """B̃ of the dense reference per group: from the dense record, else B̃ / I."""
    dense = _dense_record(history)
    if dense is not None and _group_list(dense, "norm_balance"):
        return [_number(v) for v in _group_list(dense, "norm_balance")]
    out: list[float | None] = []
    ratios = _group_list(record, "intensification")
    for group, nb in enumerate(_group_list(record, "norm_balance")):
        nb_now = _number(nb)
        ratio = _number(ratios[group]) if group < len(ratios) else None
        out.append(nb_now / ratio if nb_now is not None and ratio else None)
    return out


#: Columns of the per-group table logged to W&B.
GROUP_TABLE_COLUMNS: list[str] = [
    "group",
    "support",
    "recall_dense",
    "recall",
    "norm_balance_dense",
    "norm_balance",
    "intensification",
    "excess_loss",
    "predicted_excess_loss",
    "grad_norm",
    "hessian_trace",
    "hessian_lambda_max",
]


def group_table(
    record: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = ()
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-group table of one record (``None`` where missing).

    ``norm_balance_dense`` (B̃ of the dense model) comes from the last ``"dense"`` record
    of ``history``; without one it is B̃ / I of this record.

    Args:
        record: a history record.
        history: the records so far (only the dense reference is used).

    Returns:
        ``(GROUP_TABLE_COLUMNS, rows)``, one row per group.

    Example:
        >>> rec = {"num_groups": 2, "support": [10, 5], "recall": [0.9, 0.6],
        ...        "recall_dense": [1.0, 0.8], "norm_balance": [0.125, -0.25],
        ...        "intensification": [0.5, 2.0]}
        >>> columns, rows = group_table(rec)
        >>> dict(zip(columns, rows[1]))["norm_balance_dense"]
        -0.125
        >>> rows[0][:4]
        [0, 10, 1.0, 0.9]
    """
    _check_record(record)
    columns = list(GROUP_TABLE_COLUMNS)
    fields = {
        "support": _group_list(record, "support"),
        "recall_dense": _group_list(record, "recall_dense"),
        "recall": _group_list(record, "recall"),
        "norm_balance_dense": _dense_norm_balance(record, history),
        "norm_balance": _group_list(record, "norm_balance"),
        "intensification": _group_list(record, "intensification"),
        "excess_loss": _group_list(record, "excess_loss"),
        "predicted_excess_loss": _group_list(record, "predicted_excess_loss"),
        "grad_norm": _group_list(record, "grad_norm"),
        "hessian_trace": _group_list(record, "hessian_trace"),
        "hessian_lambda_max": _group_list(record, "hessian_lambda_max"),
    }
    num_groups = record.get("num_groups")
    if not isinstance(num_groups, int):
        num_groups = max((len(v) for v in fields.values()), default=0)
    rows: list[list[Any]] = []
    for group in range(num_groups):
        row: list[Any] = [group]
        for name in columns[1:]:
            values = fields[name]
            value = _number(values[group]) if group < len(values) else None
            if name == "support" and value is not None:
                value = int(value)
            row.append(value)
        rows.append(row)
    return columns, rows


def recall_curves(
    history: Sequence[Mapping[str, Any]],
) -> tuple[list[list[float]], list[list[float]], list[str]]:
    """Per-group recall against sparsity, one point per sparsity level.

    At each sparsity level the latest record with a recall wins (after fine-tuning when the
    monitor measured both right after the round and later), so the curves are functions of
    sparsity. Points where a group had no samples are left out of that group's series.

    Args:
        history: the records, oldest first.

    Returns:
        ``(xs, ys, keys)``: per group the sparsities, the recalls and the label ``"g<a>"``.

    Example:
        >>> hist = [{"sparsity": 0.0, "recall": [1.0, 0.9]},
        ...         {"sparsity": 0.5, "recall": [0.9, 0.5]},
        ...         {"sparsity": 0.5, "recall": [0.95, None]}]
        >>> recall_curves(hist)
        ([[0.0, 0.5], [0.0]], [[1.0, 0.95], [0.9]], ['g0', 'g1'])
    """
    latest: dict[float, Mapping[str, Any]] = {}
    for rec in history:
        if not isinstance(rec, Mapping):
            continue
        sparsity = _number(rec.get("sparsity"))
        if sparsity is None or not _group_list(rec, "recall"):
            continue
        latest[sparsity] = rec
    num_groups = max((len(_group_list(r, "recall")) for r in latest.values()), default=0)
    xs: list[list[float]] = [[] for _ in range(num_groups)]
    ys: list[list[float]] = [[] for _ in range(num_groups)]
    for sparsity in sorted(latest):
        for group, value in enumerate(_group_list(latest[sparsity], "recall")):
            number = _number(value)
            if number is not None:
                xs[group].append(sparsity)
                ys[group].append(number)
    return xs, ys, [f"g{a}" for a in range(num_groups)]


def summary_values(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The run summary of a history: its last record's headline numbers.

    Keys ``fairprune/final/<name>`` for ``sparsity``, ``accuracy``, ``worst_group_recall``,
    ``alpha``, ``moment_code`` and ``disparity/<quantity>/gap|ratio``; plus
    ``fairprune/dense/accuracy`` and ``fairprune/dense/worst_group_recall`` from the dense
    reference, and ``fairprune/num_records``. Missing values are left out.

    Args:
        history: the records, oldest first.

    Returns:
        Key -> finite float (empty for an empty history).

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
    out: dict[str, float] = {"fairprune/num_records": float(len(records))}
    for key, value in record_scalars(records[-1]).items():
        name = key.removeprefix("fairprune/")
        if name.split("/")[0] in _PER_GROUP_KEYS:
            continue
        out[f"fairprune/final/{name}"] = value
    dense = _dense_record(records)
    if dense is not None:
        scalars = record_scalars(dense)
        for name in ("accuracy", "worst_group_recall"):
            if f"fairprune/{name}" in scalars:
                out[f"fairprune/dense/{name}"] = scalars[f"fairprune/{name}"]
    return out


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-friendly copy of ``value`` (callables by name, tensors as lists)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth > 6:
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_plain(v, depth + 1) for v in items]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and getattr(value, "numel", lambda: 2**20)() <= 64:
        return _plain(tolist(), depth + 1)
    if callable(value):
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        module = getattr(value, "__module__", None)
        return f"{module}.{name}" if module else str(name)
    return repr(value)


# --------------------------------------------------------------------------------------
# Logging entry points
# --------------------------------------------------------------------------------------


def _experiment(logger: Any) -> Any | None:
    try:
        return logger.experiment
    except Exception as err:  # wandb.init failed
        _warn_once(
            logger,
            "experiment",
            f"lightning_fairprune: the W&B run could not be started ({type(err).__name__}: "
            f"{err}); nothing goes to W&B, training continues and the measurements are kept "
            "in the callback's local history.",
        )
        return None


def _wandb_media(record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Tables and charts of one record (imports wandb)."""
    import wandb

    media: dict[str, Any] = {}
    columns, rows = group_table(record, history)
    if not rows:
        return media
    media["fairprune/groups"] = wandb.Table(columns=columns, data=rows)

    idx = {name: i for i, name in enumerate(columns)}
    bars = []
    for row in rows:
        for label, column in (("dense", "recall_dense"), ("now", "recall")):
            value = row[idx[column]]
            if value is not None:
                bars.append([f"g{row[0]} {label}", value])
    if bars:
        bar_table = wandb.Table(columns=["group", "recall"], data=bars)
        media["fairprune/recall_dense_vs_now"] = wandb.plot.bar(
            bar_table, "group", "recall", title="Recall per group: dense vs now"
        )

    xs, ys, keys = recall_curves(history)
    kept = [i for i, x in enumerate(xs) if x]
    if kept:
        media["fairprune/recall_vs_sparsity"] = wandb.plot.line_series(
            xs=[xs[i] for i in kept],
            ys=[ys[i] for i in kept],
            keys=[keys[i] for i in kept],
            title="Recall per group vs sparsity",
            xname="sparsity",
        )

    points = [
        [row[0], row[idx["norm_balance_dense"]], row[idx["norm_balance"]]]
        for row in rows
        if row[idx["norm_balance_dense"]] is not None and row[idx["norm_balance"]] is not None
    ]
    if points:
        alpha = _number(record.get("alpha"))
        alpha_text = f"{alpha:.3f}" if alpha is not None else "n/a"
        scatter_table = wandb.Table(
            columns=["group", "norm_balance_dense", "norm_balance"], data=points
        )
        media["fairprune/norm_balance_scatter"] = wandb.plot.scatter(
            scatter_table,
            "norm_balance_dense",
            "norm_balance",
            title=f"Normalized recall balance: now vs dense (alpha = {alpha_text})",
        )
    return media


def log_round(
    trainer: Any, record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> None:
    """Log one `FairnessMonitor` record: scalars everywhere, tables and charts to W&B.

    Every logger of ``trainer`` gets `record_scalars` of the record at
    ``trainer.global_step``. When a `WandbLogger` is attached, the same W&B history row also
    holds a per-group table (``fairprune/groups``, columns `GROUP_TABLE_COLUMNS`), a bar
    chart of recall dense vs now (``fairprune/recall_dense_vs_now``), per-group recall vs
    sparsity over ``history`` (``fairprune/recall_vs_sparsity``) and a scatter of B̃ now vs
    B̃ dense titled with α (``fairprune/norm_balance_scatter``). Only global rank 0 logs.
    Failures become one warning per logger and kind; ``record`` and ``history`` are never
    modified.

    Args:
        trainer: a `lightning.pytorch.Trainer` (anything with ``loggers`` works).
        record: the new history record.
        history: all records so far (``record`` included or not).

    Example:
        >>> class _Logger:
        ...     def __init__(self): self.rows = []
        ...     def log_metrics(self, metrics, step): self.rows.append((step, metrics))
        >>> class _Trainer:
        ...     loggers = [_Logger()]; global_step = 7
        >>> rec = {"moment": "dense", "sparsity": 0.0, "accuracy": 0.5, "recall": [0.5]}
        >>> log_round(_Trainer(), rec, [rec])
        >>> step, metrics = _Trainer.loggers[0].rows[0]
        >>> step, metrics["fairprune/recall/g0"], metrics["fairprune/worst_group_recall"]
        (7, 0.5, 0.5)
    """
    _check_record(record)
    if not is_global_zero(trainer):
        return
    step = int(getattr(trainer, "global_step", 0))
    scalars = record_scalars(record)
    wandb_logger = find_wandb_logger(trainer)
    _send(trainer, scalars, step, skip=wandb_logger)
    if wandb_logger is None:
        return
    records = list(history)
    if not records or records[-1] is not record:
        records.append(record)
    payload: dict[str, Any] = dict(scalars)
    try:
        payload.update(_wandb_media(record, records))
    except Exception as err:
        _warn_once(
            wandb_logger,
            "media",
            "lightning_fairprune: building the W&B tables and charts failed "
            f"({type(err).__name__}: {err}); the scalars are still logged and the "
            "measurements are kept in the callback's local history.",
        )
    if not payload:
        return
    try:
        wandb_logger.log_metrics(payload, step=step)
    except Exception as err:
        _warn_once(
            wandb_logger,
            "log",
            f"lightning_fairprune: logging to W&B failed ({type(err).__name__}: {err}); "
            "training continues and the measurements are kept in the callback's local "
            "history.",
        )


def log_summary(trainer: Any, history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Write `summary_values` of ``history`` into the W&B run summary (if W&B is attached).

    Args:
        trainer: a `lightning.pytorch.Trainer`.
        history: the records, oldest first.

    Returns:
        The summary values (also when no W&B logger is attached or on other ranks).

    Example:
        >>> values = log_summary(object(), [{"moment": "end", "sparsity": 0.9, "accuracy": 0.8}])
        >>> values["fairprune/final/sparsity"], values["fairprune/final/accuracy"]
        (0.9, 0.8)
    """
    values = summary_values(history)
    if not values or not is_global_zero(trainer):
        return values
    logger = find_wandb_logger(trainer)
    if logger is None:
        return values
    run = _experiment(logger)
    if run is None:
        return values
    try:
        run.summary.update(values)
    except Exception as err:
        _warn_once(
            logger,
            "summary",
            f"lightning_fairprune: writing the W&B run summary failed ({type(err).__name__}: "
            f"{err}); the local history is complete.",
        )
    return values


def log_config(trainer: Any, name: str, settings: Mapping[str, Any]) -> None:
    """Put a callback's settings into the W&B run config under ``fairprune/<name>``.

    Values are made JSON-friendly first (callables by qualified name, small tensors as
    lists). Does nothing without a `WandbLogger` or off rank 0.

    Args:
        trainer: a `lightning.pytorch.Trainer`.
        name: the section name, e.g. ``"IterativePruning"``.
        settings: the callback's constructor settings.

    Example:
        >>> log_config(object(), "IterativePruning", {"final_sparsity": 0.9})
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected `name` to be a non-empty string, but got {name!r}")
    if not isinstance(settings, Mapping):
        raise TypeError(
            f"Expected `settings` to be a mapping of setting -> value, but got "
            f"{type(settings).__name__}"
        )
    if not is_global_zero(trainer):
        return
    logger = find_wandb_logger(trainer)
    if logger is None:
        return
    run = _experiment(logger)
    if run is None:
        return
    try:
        run.config.update({f"fairprune/{name}": _plain(settings)}, allow_val_change=True)
    except Exception as err:
        _warn_once(
            logger,
            "config",
            f"lightning_fairprune: writing the callback settings into the W&B run config "
            f"failed ({type(err).__name__}: {err}); training continues.",
        )
