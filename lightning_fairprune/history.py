"""The measurement record's one home: its fields, construction, file and derived views.

A *record* is one `FairnessMonitor` measurement as plain JSON values (a ``dict``): when it
was taken (``moment``, ``round``, ``epoch``, ``global_step``, ``sparsity``), per-group lists
(``support``, ``recall``, ``loss``, ``grad_norm``, ``hessian_trace``...) and the quantities
relative to the dense reference (``recall_dense``, ``intensification``, ``alpha``,
``excess_loss``). The README lists every field.

This module builds records from a measurement (`make_record`, `fill_relative`), converts
values to plain JSON (`to_plain`), appends/reads the JSON-lines history file (`HistoryFile`,
`read_history`, tolerant of corrupted lines), and derives every view the loggers and the
report show (`record_scalars`, `group_table`, `recall_curves`, `summary_values`,
`latest_per_sparsity`). It imports no Lightning and no logger: `logging`, `report` and the
monitor import it, so a new record field touches this file and its test only.

Rules that hold everywhere:

* **the dense record** of a history is its *last* ``"dense"`` record (the reference the monitor
  measured against most recently);
* **curves over sparsity** keep, at each sparsity level, the *latest* record (after
  fine-tuning when the monitor measured both right after the round and later);
* **history files** are ``fairprune_history.jsonl``, or ``fairprune_history-<name>.jsonl`` for
  a monitor with a ``name`` (two monitors never share a file); every record carries its
  monitor's name in ``"monitor"``;
* **metric keys** start with ``fairprune/`` for an unnamed monitor and ``fairprune-<name>/``
  for a named one (`metric_prefix`): two monitors never share a key.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GROUP_TABLE_COLUMNS",
    "HISTORY_FILENAME",
    "HISTORY_GLOB",
    "MOMENTS",
    "MOMENT_CODES",
    "PARITY_NOTE",
    "PARITY_SUMMARIES",
    "PER_GROUP_KEYS",
    "PREFIXED_MOMENTS",
    "RATE_KEYS",
    "HistoryFile",
    "check_distinct_prefixes",
    "check_record",
    "dense_record",
    "dense_reference",
    "disparity_stat",
    "fill_relative",
    "group_keys",
    "group_list",
    "group_table",
    "headline_scalars",
    "history_filename",
    "latest_per_sparsity",
    "logged_scalars",
    "make_record",
    "metric_prefix",
    "number",
    "qualified_name",
    "read_history",
    "recall_curves",
    "record_scalars",
    "restamp",
    "summary_values",
    "to_plain",
    "worst_group",
]

#: Default file name of the JSON-lines history, written in the run's log directory.
HISTORY_FILENAME = "fairprune_history.jsonl"

#: Pattern matching every history file name (named monitors included).
HISTORY_GLOB = "fairprune_history*.jsonl"

#: The moments a record can be taken at, in the order they can happen in a round.
MOMENTS: tuple[str, ...] = ("dense", "after_round", "before_round", "periodic", "end")

#: Numeric code of each record moment, logged as ``fairprune/moment_code``.
MOMENT_CODES: dict[str, int] = {moment: code for code, moment in enumerate(MOMENTS)}

#: Per-group list fields of a record logged as ``fairprune/<field>/<group>``.
PER_GROUP_KEYS: tuple[str, ...] = (
    "group_accuracy",
    "recall",
    "intensification",
    "excess_loss",
    "grad_norm",
    "hessian_trace",
    "hessian_trace_se",
    "hessian_lambda_max",
    "tpr",
    "fpr",
    "selection_rate",
)

#: Per-group rates recorded with Wilson intervals (``<rate>_ci``: ``[lower, upper]`` per group).
RATE_KEYS: tuple[str, ...] = ("group_accuracy", "tpr", "fpr", "selection_rate")

#: Record moments whose scalars are logged under their own prefix (``fairprune/<moment>/...``),
#: so that two measurements at one global step never write the same key twice.
PREFIXED_MOMENTS: tuple[str, ...] = ("dense", "after_round")

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

#: Per-group fields relative to the dense reference (undefined before it exists).
_RELATIVE_KEYS: tuple[str, ...] = ("intensification", "excess_loss")

#: Columns of the per-group table (W&B table, report).
GROUP_TABLE_COLUMNS: list[str] = [
    "group",
    "support",
    "group_accuracy_dense",
    "group_accuracy",
    "group_accuracy_lower",
    "group_accuracy_upper",
    "tpr",
    "fpr",
    "selection_rate",
    "norm_balance_dense",
    "norm_balance",
    "intensification",
    "excess_loss",
    "predicted_excess_loss",
    "grad_norm",
    "hessian_trace",
    "hessian_lambda_max",
]


# --------------------------------------------------------------------------------------------
# plain values
# --------------------------------------------------------------------------------------------
def qualified_name(value: Any) -> str | None:
    """``module.qualname`` of a callable (its type's for other objects); ``None`` stays.

    Example:
        >>> qualified_name(math.sqrt), qualified_name(None)
        ('math.sqrt', None)
    """
    if value is None:
        return None
    target = value if callable(value) and hasattr(value, "__qualname__") else type(value)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}" if module else str(name)


def to_plain(value: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy: tensors and NumPy values as numbers/lists, NaN/inf as ``None``.

    Containers become dicts (string keys) and lists; types and other callables become their
    qualified names; anything else its ``repr``. Used for records, checkpoint state and
    logger configs alike.

    Example:
        >>> to_plain({"a": torch.tensor([1.0, float("nan")]), 2: (3, math.inf), "f": math.sqrt})
        {'a': [1.0, None], '2': [3, None], 'f': 'math.sqrt'}
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if _depth > 8:
        return repr(value)
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        return to_plain(value.item() if value.ndim == 0 else value.tolist(), _depth + 1)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, _depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return [to_plain(v, _depth + 1) for v in sorted(value, key=repr)]
    if isinstance(value, type) or callable(value):
        return qualified_name(value)
    item = getattr(value, "item", None)  # NumPy scalars
    if callable(item) and getattr(value, "ndim", None) == 0:
        return to_plain(item(), _depth + 1)
    tolist = getattr(value, "tolist", None)  # NumPy arrays
    if callable(tolist):
        return to_plain(tolist(), _depth + 1)
    return repr(value)


def number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (missing, NaN, inf, bool or not a number).

    Example:
        >>> number("0.5"), number(None), number(float("nan")), number(2)
        (None, None, None, 2.0)
    """
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def group_list(record: Mapping[str, Any], key: str) -> list[Any]:
    """The per-group list ``record[key]`` (empty when missing or not a list).

    Example:
        >>> group_list({"recall": [0.5, None]}, "recall"), group_list({}, "recall")
        ([0.5, None], [])
    """
    values = record.get(key)
    if values is None or isinstance(values, (str, bytes, Mapping)):
        return []
    try:
        return list(values)
    except TypeError:
        return []


def check_record(record: Any, name: str = "record") -> None:
    """Raise ``TypeError`` unless ``record`` is a mapping (a history record)."""
    if not isinstance(record, Mapping):
        raise TypeError(
            f"Expected `{name}` to be a dict (a FairnessMonitor history record), "
            f"but got {type(record).__name__}"
        )


def _f64(values: Sequence[Any]) -> Tensor:
    return torch.tensor(
        [math.nan if number(v) is None else float(v) for v in values], dtype=torch.float64
    )


# --------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------
def make_record(
    measurement: Any,
    *,
    moment: str,
    round_index: int,
    epoch: int,
    global_step: int,
    sparsity: float,
    num_groups: int,
    predicted: Tensor | None = None,
    dense: Mapping[str, Any] | None = None,
    monitor: str | None = None,
    group_names: Sequence[str] | None = None,
    groups_are_classes: bool = True,
    pos_label: int | None = 1,
    confidence: float = 0.95,
    min_group_size: int | None = None,
) -> dict[str, Any]:
    """Build a record from a `GroupMeasurement` (plain values; relative fields filled).

    Per-group rates follow the fairness field's definitions (those of fairlearn):
    ``group_accuracy`` is the accuracy within each group; ``recall`` is kept only when the
    groups are the classes (then it is each class's recall, the same numbers); for binary
    tasks ``tpr``, ``fpr`` and ``selection_rate`` per group. Each rate has a Wilson interval
    (``<rate>_ci``), and ``fairness`` holds the summaries (worst-group accuracy, accuracy
    difference, demographic parity difference and ratio, and for binary tasks worst-group
    TPR, equal-opportunity and equalized-odds differences; the `PARITY_SUMMARIES` only when the
    groups are not the classes). See `lightning_fairprune.diagnostics.group_metrics`.

    Args:
        measurement: the measurement (``recall``, ``accuracy``, ``support``, ``mean_loss``,
            optionally ``confusion``, ``grad_norms``, ``hessian_trace``,
            ``hessian_trace_stderr``, ``hessian_lambda_max``).
        moment: one of `MOMENTS`.
        round_index: the round the record belongs to.
        epoch: training epoch.
        global_step: optimizer steps so far.
        sparsity: realized sparsity of the pruned parameters.
        num_groups: number of groups.
        predicted: per-group predicted excess loss of the round (``after_round`` only).
        dense: the dense reference (`dense_reference`), or ``None`` (the record is its own
            reference when ``moment == "dense"``).
        monitor: the monitor's name (``None`` for an unnamed monitor).
        group_names: names of the groups (default ``g0, g1, ...``).
        groups_are_classes: whether the groups are the class labels.
        pos_label: positive class of binary tasks (``None``: treat two classes as multiclass).
        confidence: level of the Wilson intervals.
        min_group_size: groups with fewer samples are listed in ``small_groups`` (default
            `lightning_fairprune.diagnostics.group_metrics.SMALL_GROUP_SIZE`).

    Returns:
        The record.

    Raises:
        ValueError: for an unknown moment, or a dense reference with another number of groups.
    """
    from lightning_fairprune.diagnostics import disparity, normalized_recall_balance
    from lightning_fairprune.diagnostics import recall_balance as _balance
    from lightning_fairprune.diagnostics.group_metrics import (
        SMALL_GROUP_SIZE,
        group_metrics,
        wilson_interval,
    )
    from lightning_fairprune.diagnostics.groups import normalize_group_names

    if moment not in MOMENTS:
        raise ValueError(f"Expected `moment` to be one of {MOMENTS}, but got {moment!r}")
    m = measurement
    names = normalize_group_names(group_names, num_groups)
    group_acc = m.recall.double()
    accuracy = float(m.accuracy)
    support = m.support.sum(dim=1) if m.support.ndim == 2 else m.support
    correct = m.correct.sum(dim=1) if getattr(m, "correct", None) is not None else None
    loss = m.mean_loss.double()
    grad_norm = getattr(m, "grad_norms", None)
    trace = getattr(m, "hessian_trace", None)
    trace_se = getattr(m, "hessian_trace_stderr", None)
    lam = getattr(m, "hessian_lambda_max", None)
    confusion = getattr(m, "confusion", None)
    min_size = SMALL_GROUP_SIZE if min_group_size is None else int(min_group_size)
    record: dict[str, Any] = {
        "moment": moment,
        "monitor": monitor,
        "round": int(round_index),
        "epoch": int(epoch),
        "global_step": int(global_step),
        "sparsity": float(sparsity),
        "accuracy": to_plain(accuracy),
        "num_groups": int(num_groups),
        "group_names": list(names),
        "groups_are_classes": bool(groups_are_classes),
        "support": [round(float(s)) for s in support.tolist()],
        "small_groups": [g for g, n in enumerate(support.tolist()) if 0 < n < min_size],
        "group_accuracy": to_plain(group_acc),
        "group_accuracy_ci": None,
        "recall": to_plain(group_acc) if groups_are_classes else None,
        "tpr": None,
        "tpr_ci": None,
        "fpr": None,
        "fpr_ci": None,
        "selection_rate": None,
        "selection_rate_ci": None,
        "fairness": None,
        "group_accuracy_dense": None,
        "recall_dense": None,
        "balance": to_plain(_balance(group_acc, accuracy)),
        "norm_balance": to_plain(normalized_recall_balance(group_acc, accuracy)),
        "intensification": None,
        "alpha": None,
        "loss": to_plain(loss),
        "excess_loss": None,
        "predicted_excess_loss": None if predicted is None else to_plain(predicted),
        "grad_norm": None if grad_norm is None else to_plain(grad_norm),
        "hessian_trace": None if trace is None else to_plain(trace),
        "hessian_trace_se": None if trace_se is None else to_plain(trace_se),
        "hessian_lambda_max": None if lam is None else to_plain(lam),
        "metrics": None,
    }
    if confusion is not None:
        metrics = group_metrics(
            confusion, pos_label=pos_label, confidence=confidence, min_group_size=min_size
        )
        for key, value in (
            ("group_accuracy", metrics.accuracy),
            ("tpr", metrics.tpr),
            ("fpr", metrics.fpr),
            ("selection_rate", metrics.selection_rate),
        ):
            if value is not None:
                record[key] = to_plain(value.value)
                record[f"{key}_ci"] = to_plain(torch.stack([value.lower, value.upper], dim=-1))
        left_out = PARITY_SUMMARIES if groups_are_classes else ()  # gaps on the label itself
        record["fairness"] = to_plain(
            {k: v for k, v in metrics.summary.items() if k not in left_out}
        )
    elif correct is not None:
        lower, upper = wilson_interval(correct, support, confidence)
        record["group_accuracy_ci"] = to_plain(torch.stack([lower, upper], dim=-1))
    record["disparity"] = {
        "group_accuracy": to_plain(disparity(group_acc, higher_is_worse=False)),
        "recall": to_plain(disparity(group_acc, higher_is_worse=False))
        if groups_are_classes
        else None,
        "grad_norm": None if grad_norm is None else to_plain(disparity(grad_norm)),
        "hessian_trace": None if trace is None else to_plain(disparity(trace)),
        "hessian_lambda_max": None if lam is None else to_plain(disparity(lam)),
        "loss": to_plain(disparity(loss)),
    }
    reference = dense_reference(record) if moment == "dense" else dense
    fill_relative(record, reference)
    return record


def dense_reference(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a dense record that later records are compared with.

    Example:
        >>> sorted(dense_reference({"group_accuracy": [1.0], "norm_balance": [0.0],
        ...                         "loss": [0.1], "accuracy": 1.0, "support": [3]}))
        ['accuracy', 'loss', 'norm_balance', 'recall', 'support']
    """
    accuracy_per_group = record.get("group_accuracy", record.get("recall"))
    return {
        "recall": accuracy_per_group,  # the key of earlier versions' checkpoints
        "norm_balance": record.get("norm_balance"),
        "loss": record.get("loss"),
        "accuracy": record.get("accuracy"),
        "support": record.get("support"),
    }


def fill_relative(record: dict[str, Any], dense: Mapping[str, Any] | None) -> None:
    """Fill the fields relative to the dense reference in place.

    ``group_accuracy_dense`` (and ``recall_dense`` when groups are classes),
    ``intensification`` I = B̃ / B̃_dense per group, its slope ``alpha`` and ``excess_loss``.
    I is *undefined* (``None``) for a group whose dense balance is too close to zero for the
    ratio to mean anything (|B̃_dense| < 0.02, or below one sample's effect 1 / (n·A); see
    `lightning_fairprune.diagnostics.group_metrics.guarded_intensification_ratio`).
    Nothing happens without a dense reference (the fields stay ``None``).

    Raises:
        ValueError: if the reference has another number of groups than the record.
    """
    from lightning_fairprune.diagnostics import excessive_loss, intensification_alpha
    from lightning_fairprune.diagnostics.group_metrics import guarded_intensification_ratio

    if dense is None:
        return
    reference = dense.get("recall", dense.get("group_accuracy"))
    if len(reference) != record["num_groups"]:
        raise ValueError(
            f"Expected {len(reference)} groups as in the dense reference, but the "
            f"measurement has {record['num_groups']}"
        )
    nrb, nrb_ref = _f64(record["norm_balance"]), _f64(dense["norm_balance"])
    record["group_accuracy_dense"] = list(reference)
    if record.get("groups_are_classes", True):
        record["recall_dense"] = list(reference)
    support = dense.get("support")
    acc = number(dense.get("accuracy"))
    if acc is None or acc <= 0:  # no size-aware limit without a positive dense accuracy
        support = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        record["intensification"] = to_plain(
            guarded_intensification_ratio(
                nrb,
                nrb_ref,
                support_ref=None if support is None else _f64(support),
                acc_ref=acc if support is not None else None,
            )
        )
        record["alpha"] = to_plain(float(intensification_alpha(nrb, nrb_ref)))
    record["excess_loss"] = to_plain(excessive_loss(_f64(record["loss"]), _f64(dense["loss"])))


def restamp(
    record: Mapping[str, Any],
    *,
    moment: str,
    round_index: int,
    epoch: int,
    sparsity: float,
    dense: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The same measurement recorded at another moment (the same weights at the same step).

    A copy of ``record`` with the new ``moment``, ``round``, ``epoch`` and ``sparsity``; the
    fields relative to the dense reference are filled again (against itself for
    ``moment="dense"``), and ``predicted_excess_loss`` is kept only for ``"after_round"``.

    Example:
        >>> rec = {"moment": "periodic", "round": 0, "epoch": 1, "sparsity": 0.0,
        ...        "num_groups": 2, "accuracy": 0.75, "group_accuracy": [1.0, 0.5],
        ...        "norm_balance": [0.25, -0.25], "loss": [0.1, 0.9], "support": [2, 2],
        ...        "alpha": None, "excess_loss": None, "predicted_excess_loss": None}
        >>> dense = restamp(rec, moment="dense", round_index=0, epoch=2, sparsity=0.0, dense=None)
        >>> dense["moment"], dense["epoch"], dense["alpha"], dense["excess_loss"], rec["alpha"]
        ('dense', 2, 1.0, [0.0, 0.0], None)
    """
    if moment not in MOMENTS:
        raise ValueError(f"Expected `moment` to be one of {MOMENTS}, but got {moment!r}")
    out = json.loads(json.dumps(to_plain(record)))  # a deep copy of plain values
    out.update(moment=moment, round=int(round_index), epoch=int(epoch), sparsity=float(sparsity))
    if moment != "after_round":
        out["predicted_excess_loss"] = None
    for key in ("group_accuracy_dense", "recall_dense", "alpha", *_RELATIVE_KEYS):
        out[key] = None
    fill_relative(out, dense_reference(out) if moment == "dense" else dense)
    return out


# --------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "monitor"


def history_filename(name: str | None = None) -> str:
    """The history file name of a monitor: one file per monitor name.

    Example:
        >>> history_filename(), history_filename("val set/A")
        ('fairprune_history.jsonl', 'fairprune_history-val_set_A.jsonl')
    """
    if name is None:
        return HISTORY_FILENAME
    return f"fairprune_history-{_slug(name)}.jsonl"


def metric_prefix(name: str | None = None) -> str:
    """The prefix of a monitor's metric keys: ``fairprune/``, or ``fairprune-<name>/``.

    The name is slugged as in `history_filename`, so that two monitors in one trainer never
    share a key (`check_distinct_prefixes`).

    Example:
        >>> metric_prefix(), metric_prefix("race x sex")
        ('fairprune/', 'fairprune-race_x_sex/')
    """
    return "fairprune/" if name is None else f"fairprune-{_slug(name)}/"


def check_distinct_prefixes(names: Sequence[str | None]) -> None:
    """Raise ``ValueError`` if two monitors' metric keys (and history files) would collide.

    Example:
        >>> check_distinct_prefixes([None, "attr"])
        >>> try:
        ...     check_distinct_prefixes(["a b", "a/b"])
        ... except ValueError as err:
        ...     print(str(err)[-66:])
        got names ['a b', 'a/b'], which share the keys 'fairprune-a_b/...'
    """
    seen: dict[str, list[str | None]] = {}
    for name in names:
        seen.setdefault(metric_prefix(name), []).append(name)
    for prefix, group in seen.items():
        if len(group) > 1:
            raise ValueError(
                "Expected every FairnessMonitor of a trainer to have its own `name` (its metric "
                f"keys and history file follow it), but got names {group}, which share the "
                f"keys '{prefix}...'"
            )


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    r"""Read a JSON-lines history, skipping (with a warning naming file:line) bad lines.

    Blank lines are ignored; a line that is not valid JSON or not a JSON object is skipped
    with a `UserWarning` of the form ``"<path>:<line>: ..."``; the rest is kept.

    Args:
        path: a history file.

    Returns:
        The records, in file order.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "fairprune_history.jsonl"
        >>> _ = f.write_text('{"sparsity": 0.0}\n{"spars\n\n{"sparsity": 0.5}\n')
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     records = read_history(f)
        >>> records, str(caught[0].message).endswith("jsonl:2: skipped a corrupted line "
        ...                                          "(not valid JSON: Unterminated string "
        ...                                          "starting at: line 1 column 2 (char 1))")
        ([{'sparsity': 0.0}, {'sparsity': 0.5}], True)
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                warnings.warn(
                    f"{path}:{lineno}: skipped a corrupted line (not valid JSON: {err})",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            if not isinstance(value, dict):
                warnings.warn(
                    f"{path}:{lineno}: skipped a line that is not a JSON object "
                    f"(got {type(value).__name__})",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            records.append(value)
    return records


class HistoryFile:
    """A JSON-lines history file: rewritten whole once per run, then appended record by record.

    The first `write` of a run replaces the file with the whole history (a resumed run's
    history includes the records before the interruption), atomically through a temporary
    file; later writes append one line. I/O errors become one `RuntimeWarning` each and are
    otherwise ignored: the records stay in memory and in checkpoints.

    ``own=True`` says that the file's directory is a ``version_N`` the monitor chose itself
    (no logger gave the run a directory): `continue_file` then lets a resumed run go on
    writing the file of the checkpoint's run instead of starting a new version.

    Example:
        >>> import tempfile
        >>> f = HistoryFile(Path(tempfile.mkdtemp()) / "h.jsonl")
        >>> f.write([{"moment": "dense", "value": float("nan")}])
        >>> f.write([{"moment": "dense"}, {"moment": "end"}])
        >>> [r["moment"] for r in read_history(f.path)], read_history(f.path)[0]["value"]
        (['dense', 'end'], None)
    """

    def __init__(self, path: str | os.PathLike[str], *, own: bool = False) -> None:
        self.path = Path(path)
        self.own = own
        self.synced = False

    def continue_file(self, saved: str | os.PathLike[str] | None) -> None:
        """Go on writing ``saved`` (a checkpoint's file) if it is this run's in another version.

        Only for an `own` file, and only when ``saved`` has the same name in a sibling
        ``version_N`` directory (the same root, so the same run directory settings); the next
        `write` then replaces it with the resumed history (the records after the checkpoint
        go, the history continues from it).

        Example:
            >>> f = HistoryFile("/runs/fairprune/version_1/h.jsonl", own=True)
            >>> f.continue_file("/runs/fairprune/version_0/h.jsonl")
            >>> f.path.as_posix()
            '/runs/fairprune/version_0/h.jsonl'
            >>> f.continue_file("/elsewhere/fairprune/version_0/h.jsonl")
            >>> f.path.as_posix()
            '/runs/fairprune/version_0/h.jsonl'
        """
        if not self.own or saved is None:
            return
        saved = Path(saved)
        if (
            saved.name == self.path.name
            and saved.parent.parent == self.path.parent.parent
            and re.fullmatch(r"version_\d+", saved.parent.name)
        ):
            self.path = saved
            self.synced = False

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write the history: all of it the first time, else its last record."""
        if not records:
            return
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not self.synced:
                tmp = path.with_name(path.name + ".tmp")
                with tmp.open("w", encoding="utf-8") as fh:
                    for rec in records:
                        fh.write(json.dumps(to_plain(rec), allow_nan=False) + "\n")
                os.replace(tmp, path)
                self.synced = True
            else:
                with path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(to_plain(records[-1]), allow_nan=False) + "\n")
        except OSError as err:
            warnings.warn(
                f"FairnessMonitor could not write its history to {str(path)!r} "
                f"({type(err).__name__}: {err}); the history is kept in memory and in "
                "checkpoints.",
                RuntimeWarning,
                stacklevel=3,
            )


# --------------------------------------------------------------------------------------------
# derived views
# --------------------------------------------------------------------------------------------
def dense_record(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The dense record of a history: its last ``"dense"`` record, or ``None``.

    Example:
        >>> dense_record([{"moment": "dense", "i": 0}, {"moment": "dense", "i": 1}])["i"]
        1
    """
    for rec in reversed(list(history)):
        if isinstance(rec, Mapping) and rec.get("moment") == "dense":
            return rec
    return None


def worst_group(
    record: Mapping[str, Any], key: str | None = None
) -> tuple[int | None, float | None]:
    """``(group, value)`` of the lowest ``record[key]`` over groups with a value.

    ``key`` defaults to ``"group_accuracy"`` (``"recall"`` in records of earlier versions).

    Example:
        >>> worst_group({"recall": [0.9, None, 0.7]})
        (2, 0.7)
        >>> worst_group({"group_accuracy": [0.6, 0.8], "recall": None})
        (0, 0.6)
    """
    if key is None:
        key = "group_accuracy" if group_list(record, "group_accuracy") else "recall"
    present = [(v, g) for g, v in enumerate(number(x) for x in group_list(record, key))]
    present = [(v, g) for v, g in present if v is not None]
    if not present:
        return None, None
    value, group = min(present)
    return group, value


def disparity_stat(record: Mapping[str, Any], quantity: str, stat: str = "gap") -> float | None:
    """A disparity statistic of a record: from its summary, else from the per-group list.

    Example:
        >>> disparity_stat({"recall": [0.9, 0.6]}, "recall")
        0.30000000000000004
    """
    summary = (record.get("disparity") or {}).get(quantity)
    if isinstance(summary, Mapping) and number(summary.get(stat)) is not None:
        return number(summary.get(stat))
    values = [v for v in (number(x) for x in group_list(record, quantity)) if v is not None]
    if not values:
        return None
    if stat == "gap":
        return max(values) - min(values)
    if stat == "ratio":
        return max(values) / min(values) if min(values) > 0 else None
    return None


def group_keys(record: Mapping[str, Any]) -> list[str]:
    """Logger-safe keys of the record's groups: slugs of ``group_names`` (``g0, g1...``).

    Example:
        >>> group_keys({"num_groups": 2, "group_names": ["race=black & sex=F", "other"]})
        ['race-black_sex-F', 'other']
        >>> group_keys({"recall": [0.5, 0.7]})
        ['g0', 'g1']
    """
    from lightning_fairprune.diagnostics.groups import group_slugs

    names = group_list(record, "group_names")
    if names:
        return group_slugs([str(n) for n in names])
    count = record.get("num_groups")
    if not isinstance(count, int):
        count = max((len(group_list(record, k)) for k in PER_GROUP_KEYS), default=0)
    return [f"g{a}" for a in range(count)]


def record_scalars(
    record: Mapping[str, Any], *, undefined: float | None = None
) -> dict[str, float]:
    """Flatten one record into its scalars, keyed under its monitor's `metric_prefix`.

    Keys (for an unnamed monitor; ``fairprune-<name>/`` instead of ``fairprune/`` for a named
    one): ``fairprune/accuracy``, ``fairprune/alpha``, ``fairprune/worst_group_accuracy``
    (lowest accuracy within a group, over groups with samples), ``fairprune/worst_group_recall``
    (the same, when the groups are the classes), ``fairprune/moment_code`` (see
    `MOMENT_CODES`), ``fairprune/<summary>`` for the fairness summaries
    (``demographic_parity_difference``...), ``fairprune/<field>/<group>`` for the
    `PER_GROUP_KEYS` with ``<group>`` the slug of the group's name (`group_keys`),
    ``fairprune/<rate>_lower|_upper/<group>`` for the Wilson bounds of the `RATE_KEYS`, and
    ``fairprune/disparity/<quantity>/gap|ratio``. Missing and non-finite values are left out
    (the record keeps them), or, with ``undefined`` given, set to it, together with α and the
    per-group fields relative to a dense reference the record does not have yet: the key set
    then does not depend on what one measurement happened to see. The sparsity is not among
    them: the pruner logs it.

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
    check_record(record)
    accuracy_key = "group_accuracy" if group_list(record, "group_accuracy") else "recall"
    out: dict[str, Any] = {
        "accuracy": record.get("accuracy"),
        "alpha": record.get("alpha"),
        "worst_group_accuracy": worst_group(record, accuracy_key)[1],
        "moment_code": MOMENT_CODES.get(str(record.get("moment"))),
    }
    if group_list(record, "recall"):
        out["worst_group_recall"] = worst_group(record, "recall")[1]
    fairness = record.get("fairness")
    if isinstance(fairness, Mapping):
        for name, value in fairness.items():
            if name != "worst_group_accuracy":
                out[name] = value
    keys = group_keys(record)
    for key in PER_GROUP_KEYS:
        values = group_list(record, key)
        if not values and key in _RELATIVE_KEYS and undefined is not None:
            values = [None] * len(keys)  # no dense reference yet
        for group, value in enumerate(values):
            if group < len(keys):
                out[f"{key}/{keys[group]}"] = value
    user = record.get("metrics")
    if isinstance(user, Mapping):
        for name, values in user.items():
            if isinstance(values, (list, tuple)):
                for group, value in enumerate(values):
                    if group < len(keys):
                        out[f"{name}/{keys[group]}"] = value
    for key in RATE_KEYS:
        for group, bounds in enumerate(group_list(record, f"{key}_ci")):
            if group < len(keys) and isinstance(bounds, (list, tuple)) and len(bounds) == 2:
                out[f"{key}_lower/{keys[group]}"] = bounds[0]
                out[f"{key}_upper/{keys[group]}"] = bounds[1]
    disparity = record.get("disparity") or {}
    if isinstance(disparity, Mapping):
        for quantity, summary in disparity.items():
            if isinstance(summary, Mapping):
                for stat in ("gap", "ratio"):
                    out[f"disparity/{quantity}/{stat}"] = summary.get(stat)
    prefix = metric_prefix(record.get("monitor"))
    flat = {prefix + k: number(v) for k, v in out.items()}
    if undefined is None:
        return {k: v for k, v in flat.items() if v is not None}
    return {k: undefined if v is None else v for k, v in flat.items()}


def logged_scalars(
    record: Mapping[str, Any], *, undefined: float | None = None
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
    scalars = record_scalars(record, undefined=undefined)
    moment = record.get("moment")
    if moment not in PREFIXED_MOMENTS:
        return scalars
    prefix = metric_prefix(record.get("monitor"))
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


def _dense_norm_balance(
    record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]
) -> list[float | None]:
    """B̃ of the dense reference per group: from the dense record, else B̃ / I."""
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


def group_table(
    record: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = ()
) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-group table of one record (``None`` where missing).

    The first column is the group's name. ``norm_balance_dense`` (B̃ of the dense model) comes
    from the dense record of ``history`` (`dense_record`); without one it is B̃ / I of this
    record. Records of earlier versions (``recall`` only) fill the accuracy columns.

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
    check_record(record)
    columns = list(GROUP_TABLE_COLUMNS)
    fields = {name: group_list(record, name) for name in columns[1:]}
    if not fields["group_accuracy"]:
        fields["group_accuracy"] = group_list(record, "recall")
    if not fields["group_accuracy_dense"]:
        fields["group_accuracy_dense"] = group_list(record, "recall_dense")
    bounds = group_list(record, "group_accuracy_ci")
    fields["group_accuracy_lower"] = [
        b[0] if isinstance(b, (list, tuple)) else None for b in bounds
    ]
    fields["group_accuracy_upper"] = [
        b[1] if isinstance(b, (list, tuple)) else None for b in bounds
    ]
    fields["norm_balance_dense"] = _dense_norm_balance(record, history)
    names = group_list(record, "group_names")
    num_groups = record.get("num_groups")
    if not isinstance(num_groups, int):
        num_groups = max((len(v) for v in fields.values()), default=0)
    rows: list[list[Any]] = []
    for group in range(num_groups):
        row: list[Any] = [str(names[group]) if group < len(names) else f"g{group}"]
        for name in columns[1:]:
            values = fields[name]
            value = number(values[group]) if group < len(values) else None
            if name == "support" and value is not None:
                value = int(value)
            row.append(value)
        rows.append(row)
    return columns, rows


def latest_per_sparsity(
    records: Sequence[Mapping[str, Any]], key: str | None = None
) -> dict[float, Mapping[str, Any]]:
    """The latest record at each sparsity level (only records with ``key``, if given).

    Example:
        >>> hist = [{"sparsity": 0.5, "i": 0}, {"sparsity": 0.5, "i": 1}, {"sparsity": 0.0}]
        >>> {s: r.get("i") for s, r in sorted(latest_per_sparsity(hist).items())}
        {0.0: None, 0.5: 1}
    """
    latest: dict[float, Mapping[str, Any]] = {}
    for rec in records:
        if not isinstance(rec, Mapping):
            continue
        sparsity = number(rec.get("sparsity"))
        if sparsity is None or (key is not None and not group_list(rec, key)):
            continue
        latest[sparsity] = rec
    return latest


def recall_curves(
    history: Sequence[Mapping[str, Any]],
) -> tuple[list[list[float]], list[list[float]], list[str]]:
    """Per-group accuracy (recall for class groups) against sparsity, one point per level.

    At each sparsity level the latest record wins (`latest_per_sparsity`). Points where a group
    had no samples are left out of that group's series.

    Returns:
        ``(xs, ys, labels)``: per group the sparsities, the values and the group's name.

    Example:
        >>> hist = [{"sparsity": 0.0, "recall": [1.0, 0.9]},
        ...         {"sparsity": 0.5, "recall": [0.9, 0.5]},
        ...         {"sparsity": 0.5, "recall": [0.95, None]}]
        >>> recall_curves(hist)
        ([[0.0, 0.5], [0.0]], [[1.0, 0.95], [0.9]], ['g0', 'g1'])
    """
    key = "group_accuracy" if any(group_list(r, "group_accuracy") for r in history) else "recall"
    latest = latest_per_sparsity(history, key)
    num_groups = max((len(group_list(r, key)) for r in latest.values()), default=0)
    xs: list[list[float]] = [[] for _ in range(num_groups)]
    ys: list[list[float]] = [[] for _ in range(num_groups)]
    for sparsity in sorted(latest):
        for group, value in enumerate(group_list(latest[sparsity], key)):
            value_ = number(value)
            if value_ is not None:
                xs[group].append(sparsity)
                ys[group].append(value_)
    names = next((group_list(r, "group_names") for r in reversed(list(latest.values()))), [])
    labels = [str(names[a]) if a < len(names) else f"g{a}" for a in range(num_groups)]
    return xs, ys, labels


def summary_values(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The run summary of a history: its last record's headline numbers.

    Keys ``fairprune/final/<name>`` for ``sparsity``, ``accuracy``, ``worst_group_recall``,
    ``worst_group_accuracy``, ``alpha``, the fairness summaries and
    ``disparity/<quantity>/gap|ratio`` (per-group values left out); plus
    ``fairprune/dense/accuracy``, ``fairprune/dense/worst_group_accuracy`` and
    ``fairprune/dense/worst_group_recall`` from the dense record, ``fairprune/final/sparsity``
    and ``fairprune/num_records``. Missing values are left out. A named monitor's records give
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
