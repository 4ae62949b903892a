"""Compare pruning runs from their local histories: PNG plots and a text table, no W&B needed.

Every `FairnessMonitor` writes its measurements, one JSON record per line, to
``fairprune_history.jsonl`` in the run's log directory (``fairprune_history-<name>.jsonl``
for a monitor with a ``name``; each monitor is reported as its own run). This module reads
those files from one or many run directories (searched recursively) and writes:

* per run, ``<run>_recall_vs_sparsity.png`` (per-group accuracy, recall of class groups,
  with Wilson intervals), ``<run>_overview.png`` (that, accuracy and worst-group accuracy, the
  intensification slope α, the gradient-norm and Hessian-trace disparities) and, when the
  records have them, ``<run>_fairness.png`` (per-group TPR; demographic parity, equalized
  odds, equal opportunity and accuracy differences against sparsity);
* across runs, ``alpha_vs_sparsity.png``, ``disparity_vs_sparsity.png``,
  ``parity_vs_sparsity.png`` (when present) and ``comparison.png`` (accuracy and worst-group
  accuracy against sparsity, the final record of each run marked, the Pareto-best starred);
* ``report.txt`` and ``report.md``: one table row per run (also printed), the worst group
  named.

The figures are built by `lightning_fairprune.figures` (legends outside the data, groups by
name). `compare_recipes` (and ``fairprune-report compare``) compares *recipes* over paired
seeds at matched accuracy or equal sparsity, with confidence intervals and Wilcoxon tests
(`lightning_fairprune.compare`; docs/compare_recipes.md).

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
    fairprune-report compare --recipe plain runs/plain/seed_* --recipe weighted \
        runs/weighted/seed_* --metric worst_group_accuracy --at accuracy --out OUT_DIR

Exit status: 0 when every run directory was reported; 1 when some had no readable history
(the others are still reported); 2 when nothing could be reported or the arguments are bad
(``compare``: 0, or 2 when the comparison is refused). A run directory literally named
``compare`` is given as ``./compare``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_fairprune.checks import check_paired
from lightning_fairprune.compare import Comparison, compare_histories
from lightning_fairprune.history import (
    HISTORY_FILENAME,
    HISTORY_GLOB,
    dense_record,
    group_list,
    number,
    read_history,
)
from lightning_fairprune.records import disparity_stat, worst_group

__all__ = [
    "HISTORY_FILENAME",
    "Comparison",
    "Report",
    "Run",
    "compare_recipes",
    "find_histories",
    "format_table",
    "group_intervals",
    "load_runs",
    "main",
    "pareto_best",
    "read_history",
    "summarize_run",
    "write_comparison",
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
        >>> row["worst_group"], row["worst_group_name"], row["worst_group_accuracy"]
        (1, 'g1', 0.7)
        >>> round(row["accuracy_gap"], 6)
        0.23
        >>> row["dense_accuracy"], row["alpha"]
        (0.9, 2.0)
    """
    final = run.final
    dense = dense_record(run.records)
    group, worst = worst_group(final)
    names = group_list(final, "group_names")
    return {
        "run": run.name,
        "records": len(run.records),
        "rounds": final.get("round"),
        "sparsity": number(final.get("sparsity")),
        "accuracy": number(final.get("accuracy")),
        "dense_accuracy": number(dense.get("accuracy")) if dense else None,
        "worst_group": group,
        "worst_group_name": None
        if group is None
        else (str(names[group]) if group < len(names) else f"g{group}"),
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
    ("worst_group_name", "worst group", "s"),
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


def group_intervals(records: Sequence[Mapping[str, Any]], group: int) -> tuple[list, list]:
    """Wilson interval half-widths below/above each point of a group's accuracy curve.

    From the ``group_accuracy_ci`` of the latest record at each sparsity level; ``(0, 0)`` where
    a record has none (older histories). See `lightning_fairprune.figures.group_curves` (any
    per-group rate).

    Example:
        >>> recs = [{"sparsity": 0.0, "group_accuracy": [0.8], "group_accuracy_ci": [[0.7, 0.9]]},
        ...         {"sparsity": 0.5, "group_accuracy": [0.6]}]
        >>> [[round(v, 6) for v in side] for side in group_intervals(recs, 0)]
        [[0.1, 0.0], [0.1, 0.0]]
    """
    from lightning_fairprune.figures import group_curves

    curve = group_curves(records)[group]
    return curve["below"], curve["above"]


def _save_figures(figures: Mapping[str, Any], out: Path) -> list[Path]:
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        paths.append(out / name)
    return paths


# --------------------------------------------------------------------------------------
# Recipes over paired seeds
# --------------------------------------------------------------------------------------


def _recipe_run(run_dir: str | Path, monitor: str | None) -> tuple[Run | None, str]:
    """The one history of ``run_dir`` (for ``monitor``), or ``None`` and why not."""
    runs, errors = load_runs([run_dir])
    if monitor is not None:
        runs = [r for r in runs if r.records[0].get("monitor") == monitor]
    if len(runs) == 1:
        return runs[0], ""
    if not runs:
        why = "; ".join(errors) or f"no history of monitor {monitor!r}"
        return None, why
    found = ", ".join(f"{r.path} (monitor {r.records[0].get('monitor')!r})" for r in runs)
    return None, (
        f"{run_dir} holds {len(runs)} histories ({found}); give the directory or file of one "
        "run, or `monitor=` for a named monitor"
    )


def compare_recipes(
    recipes: Mapping[str, Sequence[str | Path]],
    metric: str = "worst_group_accuracy",
    baseline: str | None = None,
    at: str = "accuracy",
    level: float | Sequence[float] | str | None = None,
    *,
    ci: str = "t",
    confidence: float = 0.95,
    correction: str | None = "bonferroni",
    n_resamples: int = 10_000,
    seed: int = 0,
    monitor: str | None = None,
) -> Comparison:
    """Compare training recipes over paired seeds, from their run directories.

    Run ``i`` of every recipe is seed ``i``. Each run directory (or history file) must hold
    exactly one history (of ``monitor``, for named monitors). The metric is read from the
    trained-model records, matched at an accuracy level every run reaches or at equal
    sparsity, and each recipe is compared with ``baseline``: mean paired difference, its
    confidence interval (Student t, or a seeded paired bootstrap), a Wilcoxon signed-rank
    p-value, Bonferroni-corrected across recipes and levels by default. See
    `lightning_fairprune.compare` for every rule, and docs/compare_recipes.md.

    Args:
        recipes: ``{label: [run_dir of seed 0, run_dir of seed 1, ...]}``, at least 2 recipes
            with the same number (>= 2) of runs.
        metric: a record scalar (``"worst_group_accuracy"``, ``"accuracy"``,
            ``"equalized_odds_difference"``...) or ``"max_excess_accuracy_gap"``.
        baseline: the reference recipe (default: the first).
        at: ``"accuracy"`` (matched accuracy) or ``"sparsity"``.
        level: the level(s); ``None`` for the default, ``"common"`` for every sparsity level
            recorded in all runs, ``"per_seed"`` for one accuracy level per seed.
        ci: ``"t"`` or ``"bootstrap"``.
        confidence: nominal confidence of one interval.
        correction: ``"bonferroni"`` or ``None``.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.
        monitor: the named monitor whose history to read (``None``: the only one).

    Returns:
        A `lightning_fairprune.compare.Comparison` (``.rows``, ``.table()``, ``.notes``).

    Raises:
        ValueError: unpaired inputs (the recipes' run counts differ), a run directory without
            exactly one history, no level every run reaches, bad arguments.

    Example:
        >>> compare_recipes({"plain": ["a", "b"], "weighted": ["c"]})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected every recipe to have the same number ... {'plain': 2, 'weighted': 1}
    """
    check_paired(recipes, "recipes")
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    names: dict[str, list[str]] = {}
    problems = []
    for label, run_dirs in recipes.items():
        histories[label], names[label] = [], []
        for i, run_dir in enumerate(run_dirs):
            run, why = _recipe_run(run_dir, monitor)
            if run is None:
                problems.append(f"{label}[{i}]: {why}")
                continue
            histories[label].append(run.records)
            names[label].append(f"{label}[{i}] ({run_dir})")
    if problems:
        raise ValueError(
            "Expected one readable history per run directory, but " + "; ".join(problems)
        )
    return compare_histories(
        histories,
        metric,
        baseline,
        at,
        level,
        ci=ci,
        confidence=confidence,
        correction=correction,
        n_resamples=n_resamples,
        seed=seed,
        names=names,
    )


def write_comparison(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """Write a comparison's table (``compare.txt``, ``compare.md``, ``compare.json``) and figures.

    The figures (`lightning_fairprune.figures.comparison_figures`): the metric against
    accuracy and against sparsity, mean and 95% band over seeds per recipe.

    Returns:
        The paths written.
    """
    from lightning_fairprune.figures import comparison_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.txt").write_text(comparison.table() + "\n", encoding="utf-8")
    (out / "compare.md").write_text(comparison.table(markdown=True) + "\n", encoding="utf-8")
    payload = {
        "metric": comparison.metric,
        "at": comparison.at,
        "baseline": comparison.baseline,
        "levels": comparison.levels,
        "seed_levels": comparison.seed_levels,
        "ci": comparison.ci,
        "confidence": comparison.confidence,
        "correction": comparison.correction,
        "comparisons": comparison.comparisons,
        "rows": comparison.rows,
        "values": comparison.values,
        "names": comparison.names,
        "notes": comparison.notes,
    }
    (out / "compare.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    paths = [out / "compare.txt", out / "compare.md", out / "compare.json"]
    return paths + _save_figures(comparison_figures(comparison), out)


def _compare_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fairprune-report compare",
        description="Compare training recipes over paired seeds (run i of every recipe is seed "
        "i): a metric at matched accuracy or equal sparsity, mean paired difference with its "
        "CI, Wilcoxon p-values (Bonferroni-corrected), and the Pareto curves with CI bands.",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        nargs="+",
        required=True,
        metavar=("LABEL", "RUN_DIR"),
        help="a recipe label and its run "
        "directories, one per seed in seed order (repeat per recipe)",
    )
    parser.add_argument(
        "--metric",
        default="worst_group_accuracy",
        help="record scalar, or max_excess_accuracy_gap (default: %(default)s)",
    )
    parser.add_argument("--baseline", help="label of the baseline (default: the first recipe)")
    parser.add_argument("--at", choices=("accuracy", "sparsity"), default="accuracy")
    parser.add_argument(
        "--level",
        nargs="+",
        help="level(s) to compare at, 'common' (every sparsity in all runs) or 'per_seed' (one "
        "accuracy level per seed); default: see docs/compare_recipes.md",
    )
    parser.add_argument("--ci", choices=("t", "bootstrap"), default="t")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument(
        "--no-correction",
        action="store_true",
        help="no Bonferroni correction across recipes and levels",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--monitor", help="name of the monitor whose history to read")
    parser.add_argument("--out", default="fairprune_compare", metavar="OUT_DIR")
    args = parser.parse_args(argv)
    recipes: dict[str, list[str]] = {}
    for label, *run_dirs in args.recipe:
        if not run_dirs or label in recipes:
            what = "no run directory" if not run_dirs else "a repeated label"
            parser.error(
                f"Expected --recipe LABEL RUN_DIR [RUN_DIR ...] with distinct labels, "
                f"but got {what} for {label!r}"
            )
        recipes[label] = run_dirs
    level: Any = args.level
    if level is not None:
        try:
            named = level[0] if len(level) == 1 and level[0] in ("common", "per_seed") else None
            level = named or [float(v) for v in level]
        except ValueError:
            parser.error(
                f"Expected --level to be numbers, 'common' or 'per_seed', but got {args.level}"
            )
    try:
        comparison = compare_recipes(
            recipes,
            args.metric,
            args.baseline,
            args.at,
            level,
            ci=args.ci,
            confidence=args.confidence,
            correction=None if args.no_correction else "bonferroni",
            seed=args.seed,
            monitor=args.monitor,
        )
    except (ValueError, TypeError) as err:
        print(f"fairprune-report compare: error: {err}", file=sys.stderr)
        return 2
    paths = write_comparison(comparison, args.out)
    print(comparison.table())
    print(f"\nwrote {', '.join(p.name for p in paths)} to {args.out}")
    return 0


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

    from lightning_fairprune.figures import report_figures

    figures = _save_figures(report_figures(runs, rows), out)

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
        (the others are still reported), 2 when nothing could be reported. With ``compare``
        as the first argument (``fairprune-report compare --recipe ...``, see
        `compare_recipes`): 0, or 2 when the comparison is refused.

    Example:
        >>> main(["/nonexistent/run", "--out", "/tmp/never-written"])
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return _compare_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="fairprune-report",
        description="Plot and compare lightning_fairprune runs from their local "
        f"{HISTORY_FILENAME} files (no W&B account needed). To compare recipes over paired "
        "seeds with statistics: fairprune-report compare --help.",
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
