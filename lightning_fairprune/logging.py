"""Send fairness measurements to the Lightning loggers of a `Trainer`, never failing training.

This is the only module besides `callbacks/` that knows about Lightning loggers.

* `log_scalars`: scalars to every attached logger (TensorBoard, CSV, W&B, ...).
* `log_round`: one `FairnessMonitor` history record: its scalars (`records.logged_scalars`:
  dense and after-round records under their own prefix, so no key is logged twice at one
  step) to every logger and, when a `WandbLogger` is attached, a per-group table, a bar chart
  of group accuracy dense vs now, per-group accuracy against sparsity (a line series that
  grows every round) and a scatter of the normalized balance B̃ now against B̃ dense with the
  fitted slope α.
* `log_summary`: final sparsity, accuracy, worst-group accuracy, α, fairness summaries and
  disparities into the W&B run summary; `log_config`: a callback's settings into every
  logger's hyperparameters (the W&B run config included).
* `monitored_keys`: the ``trainer.callback_metrics`` keys that `ModelCheckpoint`,
  `EarlyStopping` and LR schedulers read (what a monitor puts there is
  `lightning_fairprune.records.callback_scalars`); `measure_at_validation`.
* `run_directory`: where a run keeps its history files (never the directory of another run).

A named monitor's keys (scalars, W&B tables and charts, summary) start with
``fairprune-<name>/`` instead of ``fairprune/`` (`history.metric_prefix`).

Only global rank 0 logs. ``wandb`` is imported lazily, inside functions, and only when a
`WandbLogger` is attached (detected by class name). Any logger or W&B failure becomes one
warning per logger and kind of failure and is otherwise ignored: the callers keep every
measurement in their local history, which nothing here modifies.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lightning_fairprune.checks import check_mapping, check_nonempty_str
from lightning_fairprune.history import metric_prefix, number, recall_curves, to_plain
from lightning_fairprune.records import (
    AT_TARGET,
    group_table,
    logged_scalars,
    record_values,
    summary_values,
)

__all__ = [
    "find_wandb_logger",
    "is_global_zero",
    "log_config",
    "log_round",
    "log_scalars",
    "log_summary",
    "measure_at_validation",
    "monitored_keys",
    "run_directory",
]

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


def _finite_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        value_ = number(value)
        if value_ is not None:
            out[key] = value_
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
    prefix = metric_prefix(record.get("monitor"))
    media[f"{prefix}groups"] = wandb.Table(columns=columns, data=rows)

    idx = {name: i for i, name in enumerate(columns)}
    bars = []
    for row in rows:
        for label, column in (("dense", "group_accuracy_dense"), ("now", "group_accuracy")):
            value = row[idx[column]]
            if value is not None:
                bars.append([f"{row[0]} {label}", value])
    if bars:
        bar_table = wandb.Table(columns=["group", "accuracy"], data=bars)
        media[f"{prefix}group_accuracy_dense_vs_now"] = wandb.plot.bar(
            bar_table, "group", "accuracy", title="Accuracy within each group: dense vs now"
        )

    xs, ys, keys = recall_curves(history)
    kept = [i for i, x in enumerate(xs) if x]
    if kept:
        media[f"{prefix}group_accuracy_vs_sparsity"] = wandb.plot.line_series(
            xs=[xs[i] for i in kept],
            ys=[ys[i] for i in kept],
            keys=[keys[i] for i in kept],
            title="Accuracy within each group vs sparsity",
            xname="sparsity",
        )

    points = [
        [row[0], row[idx["norm_balance_dense"]], row[idx["norm_balance"]]]
        for row in rows
        if row[idx["norm_balance_dense"]] is not None and row[idx["norm_balance"]] is not None
    ]
    if points:
        alpha = number(record.get("alpha"))
        alpha_text = f"{alpha:.3f}" if alpha is not None else "n/a"
        scatter_table = wandb.Table(
            columns=["group", "norm_balance_dense", "norm_balance"], data=points
        )
        media[f"{prefix}norm_balance_scatter"] = wandb.plot.scatter(
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

    Every logger of ``trainer`` gets `records.logged_scalars` of the record at
    ``trainer.global_step``. When a `WandbLogger` is attached, the same W&B history row also
    holds a per-group table (``fairprune/groups``, columns `records.GROUP_TABLE_COLUMNS`), a bar
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
        >>> rec = {"moment": "end", "sparsity": 0.5, "accuracy": 0.5, "recall": [0.5]}
        >>> log_round(_Trainer(), rec, [rec])
        >>> step, metrics = _Trainer.loggers[0].rows[0]
        >>> step, metrics["fairprune/recall/g0"], metrics["fairprune/worst_group_recall"]
        (7, 0.5, 0.5)
    """
    record = record_values(record)
    if not is_global_zero(trainer):
        return
    step = int(getattr(trainer, "global_step", 0))
    scalars = logged_scalars(record)
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
    """Put a callback's settings into every logger's hyperparameters.

    Each logger gets ``log_hyperparams`` with flat keys ``fairprune/<name>/<setting>`` (CSV's
    ``hparams.yaml``, TensorBoard's hparams); a `WandbLogger` gets them nested under
    ``fairprune/<name>`` in its run config (sweep runs can be grouped by them). Values are made
    JSON-friendly first (callables by qualified name, tensors as lists). Only global rank 0
    logs; failures become one warning per logger.

    Args:
        trainer: a `lightning.pytorch.Trainer`.
        name: the section name, e.g. ``"IterativePruning"``.
        settings: the callback's constructor settings.

    Example:
        >>> class _Logger:
        ...     def log_hyperparams(self, params): print(params)
        >>> class _Trainer:
        ...     loggers = [_Logger()]
        >>> log_config(_Trainer(), "pruning", {"final_sparsity": 0.9, "schedule": "cubic"})
        {'fairprune/pruning/final_sparsity': 0.9, 'fairprune/pruning/schedule': 'cubic'}
    """
    check_nonempty_str(name, "name")
    check_mapping(settings, "settings", "a mapping of setting -> value")
    if not is_global_zero(trainer):
        return
    plain = to_plain(settings)
    wandb_logger = find_wandb_logger(trainer)
    flat = {f"fairprune/{name}/{key}": value for key, value in plain.items()}
    for logger in list(getattr(trainer, "loggers", None) or []):
        log_hyperparams = getattr(logger, "log_hyperparams", None)
        if logger is wandb_logger or not callable(log_hyperparams):
            continue
        try:
            log_hyperparams(flat)
        except Exception as err:
            _warn_once(
                logger,
                "config",
                f"lightning_fairprune: logging the {name} settings to {type(logger).__name__} "
                f"failed ({type(err).__name__}: {err}); training continues.",
            )
    if wandb_logger is None:
        return
    run = _experiment(wandb_logger)
    if run is None:
        return
    try:
        run.config.update({f"fairprune/{name}": plain}, allow_val_change=True)
    except Exception as err:
        _warn_once(
            wandb_logger,
            "config",
            f"lightning_fairprune: writing the callback settings into the W&B run config "
            f"failed ({type(err).__name__}: {err}); training continues.",
        )


# --------------------------------------------------------------------------------------
# Where a run writes, and what other callbacks read
# --------------------------------------------------------------------------------------


def _next_version(root: Path) -> str:
    """``version_N`` with N one more than the largest in ``root`` (Lightning's convention)."""
    found = [-1]
    if root.is_dir():
        for child in root.iterdir():
            match = re.fullmatch(r"version_(\d+)", child.name)
            if match and child.is_dir():
                found.append(int(match.group(1)))
    return f"version_{max(found) + 1}"


def run_directory(trainer: Any) -> tuple[Path, bool]:
    """The directory of this run's history files, and whether it is the monitor's own.

    * a `TensorBoardLogger` or `CSVLogger` first in ``trainer.loggers``: its ``log_dir``
      (Lightning gives each run its own ``version_N``);
    * another logger (W&B, MLflow...), whose ``save_dir`` runs share: ``<save_dir>/fairprune/
      <its version>`` (the W&B run id...);
    * no logger (``logger=False``), or one without a version: ``<default_root_dir>/fairprune/
      version_N`` with N one more than the largest existing (Lightning's convention).
      Only this directory is the monitor's own (``True``): a run resumed from a checkpoint
      continues the file of the checkpoint's run there (`history.HistoryFile.continue_file`).

    Resolved on every process (``trainer.log_dir`` broadcasts); the version is chosen on
    global rank 0 and broadcast. Nothing is created on disk here.

    Example:
        >>> import tempfile
        >>> class _Trainer:
        ...     loggers, log_dir = [], None
        ...     default_root_dir = tempfile.mkdtemp()
        >>> path, own = run_directory(_Trainer())
        >>> path.relative_to(_Trainer.default_root_dir).as_posix(), own
        ('fairprune/version_0', True)
        >>> (path.parent / "version_3").mkdir(parents=True)
        >>> run_directory(_Trainer())[0].name
        'version_4'
    """
    root = Path(getattr(trainer, "log_dir", None) or trainer.default_root_dir)
    loggers = list(getattr(trainer, "loggers", None) or [])
    if loggers and type(loggers[0]).__name__ in ("TensorBoardLogger", "CSVLogger"):
        return root, False
    version, own = "", True
    if is_global_zero(trainer):
        try:
            version = str(loggers[0].version) if loggers else ""
        except Exception:  # a logger that cannot start: a version of our own
            version = ""
        own = version in ("", "None")
        if own:
            version = _next_version(root / "fairprune")
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None:
        version, own = strategy.broadcast((version, own))
    return root / "fairprune" / version, own


def monitored_keys(trainer: Any) -> dict[str, str]:
    """The ``callback_metrics`` keys that other parts of the fit read, and who reads each.

    The ``monitor`` of every callback that has one (`ModelCheckpoint`, `EarlyStopping`...) and
    of every LR scheduler configuration (``ReduceLROnPlateau``): Lightning raises when such a
    key is missing after validation.

    Example:
        >>> class _Stopper:
        ...     monitor = "fairprune/worst_group_accuracy"
        >>> class _Trainer:
        ...     callbacks, lr_scheduler_configs = [_Stopper(), object()], []
        >>> monitored_keys(_Trainer())
        {'fairprune/worst_group_accuracy': '_Stopper'}
    """
    out: dict[str, str] = {}
    for callback in list(getattr(trainer, "callbacks", None) or []):
        key = getattr(callback, "monitor", None)
        if isinstance(key, str):
            out.setdefault(key, type(callback).__name__)
    try:
        configs = list(getattr(trainer, "lr_scheduler_configs", None) or [])
    except Exception:  # no strategy yet
        configs = []
    for config in configs:
        key = getattr(config, "monitor", None)
        if isinstance(key, str):
            out.setdefault(key, "an LR scheduler")
    return out


def measure_at_validation(trainer: Any, prefix: str, every_n_epochs: Any) -> list[str]:
    """A monitor's keys that the fit reads at validation end; says at fit start what follows.

    With ``every_n_epochs="auto"`` and such keys the monitor measures at every validation end
    (an info line says so); with ``None`` they would be missing before the first pruning round
    and stale after it (a warning names the setting that makes them fresh). An `EarlyStopping`
    with ``check_finite=True`` on an `AT_TARGET` key (NaN before the target sparsity) would
    stop the fit at its first check: a warning says so.

    Args:
        trainer: the `Trainer` at fit start.
        prefix: the monitor's `history.metric_prefix`.
        every_n_epochs: the monitor's setting.

    Returns:
        The monitored keys under ``prefix`` (`monitored_keys`).
    """
    keys = [key for key in monitored_keys(trainer) if key.startswith(prefix)]
    for callback in list(getattr(trainer, "callbacks", None) or []):
        key = getattr(callback, "monitor", None)
        if key in keys and f"/{AT_TARGET}/" in key and getattr(callback, "check_finite", False):
            warnings.warn(
                f"{type(callback).__name__}(monitor={key!r}, check_finite=True) stops at its "
                "first check before the target sparsity, where the key is NaN; monitor "
                f"{key.replace(f'{AT_TARGET}/', '')!r} or set check_finite=False.",
                UserWarning,
                stacklevel=3,
            )
    if keys and every_n_epochs == "auto":
        rank_zero_info(
            f"FairnessMonitor: {keys} read at validation end: measuring at the end of every "
            "validation (every_n_epochs='auto')."
        )
    elif keys and every_n_epochs is None:
        warnings.warn(
            f"FairnessMonitor(every_n_epochs=None) measures only at pruning rounds, but {keys} "
            "are read at every validation end (missing before the first round, stale after "
            "it); set every_n_epochs='auto' or 1.",
            UserWarning,
            stacklevel=3,
        )
    return keys
