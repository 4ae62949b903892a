"""The measurement history: plain JSON values, the JSON-lines file, views over many records.

A `FairnessMonitor` history is a list of records (`lightning_fairprune.records.Record`, kept
as plain dicts: `Record.to_dict`), oldest first. This module converts values to plain JSON
(`to_plain`, `number`), appends and reads the JSON-lines history file (`HistoryFile`,
`read_history`, tolerant of corrupted lines) and gives the views over a whole history
(`dense_record`, `latest_per_sparsity`, `recall_curves`). What one record holds and how it is
flattened into scalars and tables is `lightning_fairprune.records`. It imports no Lightning
and no logger.

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

from torch import Tensor

__all__ = [
    "HISTORY_FILENAME",
    "HISTORY_GLOB",
    "HistoryFile",
    "check_distinct_prefixes",
    "dense_record",
    "group_list",
    "history_filename",
    "latest_per_sparsity",
    "metric_prefix",
    "monitor_slug",
    "number",
    "qualified_name",
    "read_history",
    "recall_curves",
    "to_plain",
]

#: Default file name of the JSON-lines history, written in the run's log directory.
HISTORY_FILENAME = "fairprune_history.jsonl"

#: Pattern matching every history file name (named monitors included).
HISTORY_GLOB = "fairprune_history*.jsonl"


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
        >>> import torch
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


# --------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------
def monitor_slug(name: str) -> str:
    """A monitor name made safe for file names and metric keys.

    Example:
        >>> monitor_slug("val set/A")
        'val_set_A'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "monitor"


def history_filename(name: str | None = None) -> str:
    """The history file name of a monitor: one file per monitor name.

    Example:
        >>> history_filename(), history_filename("val set/A")
        ('fairprune_history.jsonl', 'fairprune_history-val_set_A.jsonl')
    """
    if name is None:
        return HISTORY_FILENAME
    return f"fairprune_history-{monitor_slug(name)}.jsonl"


def metric_prefix(name: str | None = None) -> str:
    """The prefix of a monitor's metric keys: ``fairprune/``, or ``fairprune-<name>/``.

    The name is slugged as in `history_filename`, so that two
    monitors in one trainer never share a key (`check_distinct_prefixes`).

    Example:
        >>> metric_prefix(), metric_prefix("race x sex")
        ('fairprune/', 'fairprune-race_x_sex/')
    """
    return "fairprune/" if name is None else f"fairprune-{monitor_slug(name)}/"


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
# views over a history
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
