"""Compare pruning runs from their local histories: PNG plots and a text table, no W&B needed.

Every `FairnessMonitor` writes its measurements, one JSON record per line, to
``fairprune_history.jsonl`` in the run's log directory (``fairprune_history-<name>.jsonl``
for a monitor with a ``name``; each monitor is reported as its own run). This module reads
those files from one or many run directories (searched recursively) and writes:

* ``<run>_recall_vs_sparsity.png``: per-group recall against sparsity (one per run);
* ``<run>_overview.png``: per-group accuracy (recall of class groups, with Wilson
  intervals), accuracy and worst-group accuracy, the
  intensification slope α, and the gradient-norm and Hessian-trace disparities against
  sparsity (one per run);
* ``alpha_vs_sparsity.png`` and ``disparity_vs_sparsity.png``: the same quantities for all
  runs on shared axes;
* ``comparison.png``: accuracy and worst-group accuracy against sparsity for every run, with
  the final record of each run drawn as a marker and the Pareto-best runs starred;
* ``report.txt`` and ``report.md``: one table row per run (also printed).

**Pareto-best.** Each run is summarized by its final record (the last one in its file).
For a metric m (accuracy, or worst-group accuracy), run A *dominates* run B when
``sparsity_A >= sparsity_B`` and ``m_A >= m_B`` with at least one of the two strict.
The Pareto-best runs for m are those no other run dominates: no run is at least as sparse
and at least as good on m while being strictly better on one of them. Runs without a value
for m take no part. Comparisons are exact on the recorded values.

When a curve is drawn against sparsity and several records share a sparsity level (right
after a round, then after its fine-tuning), the latest record at that level is used; the
overview also draws the ``after_round`` records (the immediate damage of each round) as
dotted lines.

Usage::

    python -m lightning_fairprune.report RUN_DIR [RUN_DIR ...] --out OUT_DIR
    fairprune-report RUN_DIR [RUN_DIR ...] --out OUT_DIR

Exit status: 0 when every run directory was reported; 1 when some had no readable history
(the others are still reported); 2 when nothing could be reported or the arguments are bad.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_fairprune.history import (
    HISTORY_FILENAME,
    HISTORY_GLOB,
    dense_record,
    disparity_stat,
    group_list,
    latest_per_sparsity,
    number,
    read_history,
    recall_curves,
    worst_group,
)


def _group_values(record: Mapping[str, Any], key: str) -> list[float | None]:
    return [number(v) for v in group_list(record, key)]


def _curve(records: Sequence[Mapping[str, Any]], getter: Any) -> tuple[list[float], list[float]]:
    """``getter(record)`` against sparsity; the latest record at each sparsity level."""
    latest = latest_per_sparsity(records)
    xs: list[float] = []
    ys: list[float] = []
    for sparsity in sorted(latest):
        value = getter(latest[sparsity])
        if value is not None:
            xs.append(sparsity)
            ys.append(value)
    return xs, ys


__all__ = [
    "HISTORY_FILENAME",
    "Report",
    "Run",
    "find_histories",
    "format_table",
    "group_intervals",
    "load_runs",
    "main",
    "pareto_best",
    "read_history",
    "summarize_run",
    "write_report",
]


@dataclass
class Run:
    """One run: a display name, its history file and its records (oldest first)."""

    name: str
    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        """The last record (what the comparison uses)."""
        return self.records[-1] if self.records else {}


@dataclass
class Report:
    """What `write_report` produced."""

    runs: list[Run]
    rows: list[dict[str, Any]]
    table: str
    figures: list[Path]
    errors: list[str]


def find_histories(run_dir: str | Path) -> list[Path]:
    r"""All ``fairprune_history.jsonl`` files under ``run_dir`` (recursively, sorted).

    Args:
        run_dir: a run directory, or a history file itself.

    Returns:
        The history files found (empty when there is none).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "version_0").mkdir()
        >>> _ = (root / "version_0" / HISTORY_FILENAME).write_text("{}\n")
        >>> [p.relative_to(root).as_posix() for p in find_histories(root)]
        ['version_0/fairprune_history.jsonl']
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"Expected `run_dir` to be an existing directory, got {run_dir}")
    if run_dir.is_file():
        return [run_dir]
    return sorted(run_dir.rglob(HISTORY_GLOB))


def load_runs(run_dirs: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """Load every history under the given run directories.

    A directory holding several histories (e.g. ``version_0/`` and ``version_1/``) gives
    one run per history, named ``<dir>/<subpath>``. A directory without a readable history
    is reported in the returned error messages, and the others are still loaded.

    Args:
        run_dirs: run directories (or history files).

    Returns:
        ``(runs, errors)``.

    Example:
        >>> runs, errors = load_runs(["/nonexistent/run"])
        >>> runs, errors
        ([], ['/nonexistent/run: no such directory'])
    """
    runs: list[Run] = []
    errors: list[str] = []
    used: set[str] = set()
    for run_dir in run_dirs:
        root = Path(run_dir)
        try:
            files = find_histories(root)
        except FileNotFoundError:
            errors.append(f"{root}: no such directory")
            continue
        if not files:
            errors.append(
                f"{root}: no {HISTORY_FILENAME} found (is this the log directory of a run "
                "with a FairnessMonitor?)"
            )
            continue
        for file in files:
            records = read_history(file)
            if not records:
                errors.append(f"{file}: no readable record")
                continue
            by_monitor: dict[Any, list[dict[str, Any]]] = {}
            for record in records:  # files of older versions may mix monitors
                by_monitor.setdefault(record.get("monitor"), []).append(record)
            for monitor, monitor_records in by_monitor.items():
                base = root.resolve().name or str(root)
                if re.fullmatch(r"version_\d+", base):  # a Lightning log dir: its experiment
                    base = f"{root.resolve().parent.name}/{base}"
                relative = file.parent.relative_to(root).as_posix() if root.is_dir() else "."
                if root.is_dir() and len(files) > 1 and relative != ".":
                    base = f"{base}/{relative}"
                if monitor is not None:
                    base = f"{base} [{monitor}]"
                name, k = base, 2
                while name in used:
                    name, k = f"{base}-{k}", k + 1
                used.add(name)
                runs.append(Run(name=name, path=file, records=monitor_records))
    return runs, errors


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------


def summarize_run(run: Run) -> dict[str, Any]:
    """One table row: the final record's headline numbers and the dense reference's.

    Example:
        >>> run = Run("a", Path("h.jsonl"), [
        ...     {"moment": "dense", "round": 0, "sparsity": 0.0, "accuracy": 0.9,
        ...      "recall": [0.95, 0.85]},
        ...     {"moment": "end", "round": 3, "sparsity": 0.8, "accuracy": 0.85,
        ...      "recall": [0.93, 0.7], "alpha": 2.0}])
        >>> row = summarize_run(run)
        >>> row["worst_group"], row["worst_group_accuracy"], round(row["accuracy_gap"], 6)
        (1, 0.7, 0.23)
        >>> row["dense_accuracy"], row["alpha"]
        (0.9, 2.0)
    """
    final = run.final
    dense = dense_record(run.records)
    group, worst = worst_group(final)
    return {
        "run": run.name,
        "records": len(run.records),
        "rounds": final.get("round"),
        "sparsity": number(final.get("sparsity")),
        "accuracy": number(final.get("accuracy")),
        "dense_accuracy": number(dense.get("accuracy")) if dense else None,
        "worst_group": group,
        "worst_group_accuracy": worst,
        "dense_worst_group_accuracy": worst_group(dense)[1] if dense else None,
        "accuracy_gap": disparity_stat(final, "group_accuracy")
        if group_list(final, "group_accuracy")
        else disparity_stat(final, "recall"),
        "alpha": number(final.get("alpha")),
        "grad_norm_gap": disparity_stat(final, "grad_norm"),
        "hessian_trace_gap": disparity_stat(final, "hessian_trace"),
    }


def pareto_best(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """Which points are Pareto-best when maximizing both coordinates.

    A point is dominated when another is >= in both coordinates and > in at least one.
    Points with a missing (``None``/NaN) coordinate are never Pareto-best and dominate
    nothing.

    Args:
        points: ``(sparsity, metric)`` per run.

    Returns:
        One flag per point.

    Example:
        >>> pareto_best([(0.5, 0.9), (0.9, 0.8), (0.9, 0.7), (0.5, 0.9), (0.7, None)])
        [True, True, False, True, False]
    """
    clean = [(x, y) if number(x) is not None and number(y) is not None else None for x, y in points]
    flags = []
    for i, p in enumerate(clean):
        if p is None:
            flags.append(False)
            continue
        dominated = any(
            q is not None and q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1])
            for j, q in enumerate(clean)
            if j != i
        )
        flags.append(not dominated)
    return flags


def _mark_pareto(rows: list[dict[str, Any]]) -> None:
    for metric, flag in (("accuracy", "pareto_accuracy"), ("worst_group_accuracy", "pareto_wgr")):
        best = pareto_best([(row["sparsity"], row[metric]) for row in rows])
        for row, is_best in zip(rows, best, strict=True):
            row[flag] = is_best


_COLUMNS: list[tuple[str, str, str]] = [
    ("run", "run", "s"),
    ("records", "records", "d"),
    ("rounds", "rounds", "d"),
    ("sparsity", "sparsity", ".4f"),
    ("accuracy", "accuracy", ".4f"),
    ("dense_accuracy", "dense acc", ".4f"),
    ("worst_group_accuracy", "worst acc", ".4f"),
    ("worst_group", "worst group", "d"),
    ("dense_worst_group_accuracy", "dense worst", ".4f"),
    ("accuracy_gap", "group gap", ".4f"),
    ("alpha", "alpha", ".3f"),
    ("grad_norm_gap", "grad-norm gap", ".4g"),
    ("hessian_trace_gap", "H-trace gap", ".4g"),
    ("pareto", "pareto", "s"),
]


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    if key == "pareto":
        marks = [
            name
            for name, flag in (("acc", "pareto_accuracy"), ("wgr", "pareto_wgr"))
            if row.get(flag)
        ]
        return "+".join(marks) if marks else "-"
    value = row.get(key)
    if value is None:
        return "-"
    if fmt == "s":
        return str(value)
    return format(value, fmt)


def format_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """Render summary rows (from `summarize_run`) as fixed-width text or a Markdown table.

    The ``pareto`` column lists ``acc`` and/or ``wgr`` when the run is Pareto-best for
    (sparsity, accuracy) and/or (sparsity, worst-group accuracy); ``-`` marks a missing value.

    Example:
        >>> row = {"run": "a", "records": 2, "rounds": 1, "sparsity": 0.5, "accuracy": 0.9,
        ...        "worst_group_accuracy": 0.8, "pareto_accuracy": True, "pareto_wgr": True}
        >>> print(format_table([row], markdown=True).splitlines()[2])
        | a | 2 | 1 | 0.5000 | 0.9000 | - | 0.8000 | - | - | - | - | - | - | acc+wgr |
    """
    header = [title for _, title, _ in _COLUMNS]
    body = [[_cell(row, key, fmt) for key, _, fmt in _COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


# --------------------------------------------------------------------------------------
# Figures (matplotlib's object-oriented API with the Agg canvas: no global backend change)
# --------------------------------------------------------------------------------------


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def group_intervals(records: Sequence[Mapping[str, Any]], group: int) -> tuple[list, list]:
    """Wilson interval half-widths below/above each point of a group's curve (`recall_curves`).

    From the ``group_accuracy_ci`` of the latest record at each sparsity level; ``(0, 0)`` where
    a record has none (older histories).

    Example:
        >>> recs = [{"sparsity": 0.0, "group_accuracy": [0.8], "group_accuracy_ci": [[0.7, 0.9]]},
        ...         {"sparsity": 0.5, "group_accuracy": [0.6]}]
        >>> [[round(v, 6) for v in side] for side in group_intervals(recs, 0)]
        [[0.1, 0.0], [0.1, 0.0]]
    """
    latest = latest_per_sparsity(records)
    lower: list[float] = []
    upper: list[float] = []
    for sparsity in sorted(latest):
        record = latest[sparsity]
        values = group_list(record, "group_accuracy") or group_list(record, "recall")
        if group >= len(values) or number(values[group]) is None:
            continue
        value = float(values[group])
        bounds = group_list(record, "group_accuracy_ci")
        pair = bounds[group] if group < len(bounds) else None
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and None not in pair:
            lower.append(max(0.0, value - float(pair[0])))
            upper.append(max(0.0, float(pair[1]) - value))
        else:
            lower.append(0.0)
            upper.append(0.0)
    return lower, upper


def _plot_group_recall(ax: Any, run: Run) -> None:
    xs, ys, keys = recall_curves(run.records)
    dense = dense_record(run.records) or run.records[0]
    support = _group_values(dense, "support")
    classes = any(group_list(r, "recall") for r in run.records)
    for group, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if not x:
            continue
        label = keys[group]
        if group < len(support) and support[group] is not None:
            label += f" (n={int(support[group])})"
        lower, upper = group_intervals(run.records, group)
        ax.errorbar(x, y, yerr=[lower, upper], marker="o", markersize=3, linewidth=1.2,
                    capsize=2, label=label)  # fmt: skip
    what = "recall" if classes else "accuracy within group"
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{what} (95% Wilson interval)")
    ax.set_title(f"Per-group {what} vs sparsity: {run.name}", fontsize=10)
    ax.grid(alpha=0.3)
    if xs:
        ax.legend(fontsize=7, ncol=2 if len(xs) > 5 else 1)


def _after_round(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("moment") == "after_round"]


def _plot_accuracy(ax: Any, run: Run) -> None:
    immediate = _after_round(run.records)
    for label, getter, color in (
        ("accuracy", lambda r: number(r.get("accuracy")), "tab:blue"),
        ("worst-group accuracy", lambda r: worst_group(r)[1], "tab:orange"),
    ):
        x, y = _curve(run.records, getter)
        ax.plot(x, y, "-", color=color, marker="o", markersize=3, label=label)
        x, y = _curve(immediate, getter)
        if x:
            ax.plot(x, y, ":", color=color, marker="x", markersize=4,
                    label=f"{label}, right after each round")  # fmt: skip
    ax.set_xlabel("sparsity")
    ax.set_title("Accuracy and worst-group accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_alpha(ax: Any, runs: Sequence[Run], immediate: bool = False) -> None:
    for run in runs:
        x, y = _curve(run.records, lambda r: number(r.get("alpha")))
        if x:
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=run.name)
        x, y = _curve(_after_round(run.records), lambda r: number(r.get("alpha")))
        if immediate and x:
            ax.plot(x, y, ":", marker="x", markersize=4, color=line.get_color(),
                    label="right after each round")  # fmt: skip
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("alpha")
    ax.set_title("Intensification slope alpha (>1: gaps widen)", fontsize=10)
    ax.grid(alpha=0.3)
    if len(runs) > 1 or immediate:
        ax.legend(fontsize=7)


def _plotdisparity_stat(ax: Any, runs: Sequence[Run], quantity: str, title: str) -> None:
    for run in runs:
        x, y = _curve(run.records, lambda r: disparity_stat(r, quantity))
        if x:
            ax.plot(x, y, marker="o", markersize=3, label=run.name)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("max - min over groups")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=7)


def _save(fig: Any, path: Path, figures: list[Path]) -> None:
    fig.savefig(path, dpi=110)
    figures.append(path)


def _plot_run(run: Run, out: Path, figures: list[Path]) -> None:
    name = _safe(run.name)
    fig, axes = _figure(size=(6.5, 4.2))
    _plot_group_recall(axes[0, 0], run)
    _save(fig, out / f"{name}_recall_vs_sparsity.png", figures)

    fig, axes = _figure(2, 2, size=(11.0, 8.0))
    _plot_group_recall(axes[0, 0], run)
    _plot_accuracy(axes[0, 1], run)
    _plot_alpha(axes[1, 0], [run], immediate=True)
    ax = axes[1, 1]
    handles = []
    for axis, quantity, label, color in (
        (ax, "grad_norm", "gradient norm (left axis)", "tab:blue"),
        (ax.twinx(), "hessian_trace", "Hessian trace (right axis)", "tab:red"),
    ):
        x, y = _curve(run.records, lambda r, q=quantity: disparity_stat(r, q))
        if x:
            handles += axis.plot(x, y, marker="o", markersize=3, color=color, label=label)
        axis.set_ylabel(f"{quantity.replace('_', ' ')}: max - min over groups", fontsize=8)
    ax.set_xlabel("sparsity")
    ax.set_title("Gradient-norm and Hessian-trace disparity", fontsize=10)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8)
    fig.suptitle(f"lightning_fairprune report: {run.name}")
    _save(fig, out / f"{name}_overview.png", figures)


def _plot_comparison(runs: Sequence[Run], rows: Sequence[Mapping[str, Any]], out: Path) -> Any:
    fig, axes = _figure(2, 1, size=(11.0, 4.5))
    panels = (
        ("accuracy", lambda r: number(r.get("accuracy")), "pareto_accuracy"),
        ("worst-group accuracy", lambda r: worst_group(r)[1], "pareto_wgr"),
    )
    for ax, (label, getter, flag) in zip(axes[0], panels, strict=True):
        for run, row in zip(runs, rows, strict=True):
            x, y = _curve(run.records, getter)
            (line,) = ax.plot(x, y, linewidth=1, alpha=0.6)
            fx, fy = row["sparsity"], getter(run.final)
            if fx is None or fy is None:
                continue
            if row.get(flag):
                ax.plot([fx], [fy], marker="*", markersize=15, color=line.get_color(),
                        markeredgecolor="black", linestyle="none",
                        label=f"{run.name} (Pareto-best)")  # fmt: skip
            else:
                ax.plot([fx], [fy], marker="o", markersize=6, color=line.get_color(),
                        linestyle="none", label=run.name)  # fmt: skip
        ax.set_xlabel("sparsity")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs sparsity (final record marked; star = Pareto-best)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Report:
    r"""Read the histories under ``run_dirs`` and write the figures and tables to ``out_dir``.

    Args:
        run_dirs: run directories (searched recursively for ``fairprune_history.jsonl``).
        out_dir: where to write the PNGs, ``report.txt`` and ``report.md`` (created).

    Returns:
        A `Report` (runs, table rows, the text table, figure paths, error messages for
        directories without a readable history).

    Raises:
        ValueError: no run directory holds a readable history.

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "run").mkdir()
        >>> recs = [{"moment": "dense", "round": 0, "sparsity": 0.0, "accuracy": 0.9,
        ...          "recall": [0.95, 0.85], "alpha": None},
        ...         {"moment": "end", "round": 1, "sparsity": 0.5, "accuracy": 0.8,
        ...          "recall": [0.9, 0.7], "alpha": 2.0}]
        >>> _ = (root / "run" / HISTORY_FILENAME).write_text(
        ...     "\n".join(json.dumps(r) for r in recs))
        >>> report = write_report([root / "run"], root / "out")
        >>> sorted(p.name for p in report.figures)[:2]
        ['alpha_vs_sparsity.png', 'comparison.png']
        >>> report.rows[0]["worst_group_accuracy"], report.rows[0]["pareto_wgr"]
        (0.7, True)
    """
    runs, errors = load_runs(run_dirs)
    if not runs:
        details = "; ".join(errors) if errors else "no run directory given"
        raise ValueError(f"Expected at least one run directory with a history, but: {details}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize_run(run) for run in runs]
    _mark_pareto(rows)

    figures: list[Path] = []
    for run in runs:
        _plot_run(run, out, figures)
    fig, axes = _figure(size=(6.5, 4.2))
    _plot_alpha(axes[0, 0], runs)
    _save(fig, out / "alpha_vs_sparsity.png", figures)
    fig, axes = _figure(3, 1, size=(15.0, 4.2))
    for ax, (quantity, title) in zip(
        axes[0],
        (
            ("recall", "Recall disparity"),
            ("grad_norm", "Gradient-norm disparity"),
            ("hessian_trace", "Hessian-trace disparity"),
        ),
        strict=True,
    ):
        _plotdisparity_stat(ax, runs, quantity, title)
    _save(fig, out / "disparity_vs_sparsity.png", figures)
    _save(_plot_comparison(runs, rows, out), out / "comparison.png", figures)

    table = format_table(rows)
    notes = (
        "pareto: 'acc' / 'wgr' = no other run is at least as sparse and at least as accurate "
        "(acc) or with at least as high a worst-group accuracy (wgr), strictly better in one."
    )
    (out / "report.txt").write_text(table + "\n\n" + notes + "\n", encoding="utf-8")
    md = ["# lightning_fairprune report", "", format_table(rows, markdown=True), "", notes, ""]
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    return Report(runs=runs, rows=rows, table=table, figures=figures, errors=errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``fairprune-report`` / ``python -m lightning_fairprune.report``).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every run directory was reported, 1 when some had no readable history
        (the others are still reported), 2 when nothing could be reported.

    Example:
        >>> main(["/nonexistent/run", "--out", "/tmp/never-written"])
        2
    """
    parser = argparse.ArgumentParser(
        prog="fairprune-report",
        description="Plot and compare lightning_fairprune runs from their local "
        f"{HISTORY_FILENAME} files (no W&B account needed).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument(
        "--out", default="fairprune_report", metavar="OUT_DIR", help="output directory"
    )
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_dirs, args.out)
    except ValueError as err:
        print(f"fairprune-report: error: {err}", file=sys.stderr)
        return 2
    print(report.table)
    print(f"\nwrote {len(report.figures)} figures, report.txt and report.md to {args.out}")
    for error in report.errors:
        print(f"fairprune-report: error: {error}", file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
