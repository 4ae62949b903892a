"""The figures of `lightning_fairprune.report`: matplotlib ``Figure`` objects, no files.

Each builder returns ``{file name: Figure}``; `lightning_fairprune.report` saves them. The
figures use matplotlib's object-oriented API with the Agg canvas (no global backend change;
matplotlib is imported only when a figure is built: ``pip install lightning_fairprune[report]``).

Readability rules every builder follows (tested in ``tests/test_report.py``):

* legends sit *outside* the axes (to the right of a panel, or one figure legend to the right
  of a multi-run figure), so they never cover data;
* titles are short and wrapped, and the layout is constrained, so nothing is cut;
* groups are named by their names (``group_names`` of the records, ``g0, g1...`` otherwise);
  the worst group of the final record is drawn thicker and marked "worst"; with more than
  `MAX_NAMED_GROUPS` groups the worst ones are named and the others drawn in grey.

Per run: ``<run>_recall_vs_sparsity.png`` (per-group accuracy, recall for class groups, with
Wilson intervals), ``<run>_overview.png`` (that, accuracy and worst-group accuracy, α, gradient
norm and Hessian trace disparities) and, when the records have them, ``<run>_fairness.png``:
per-group TPR with Wilson intervals (binary tasks) and the parity gaps (demographic parity,
equalized odds, equal opportunity and accuracy differences) against sparsity. The gaps are
not drawn when the groups are the classes (they mean nothing there). Across runs:
``alpha_vs_sparsity.png``, ``disparity_vs_sparsity.png``, ``comparison.png`` and, when some run
has them, ``parity_vs_sparsity.png``. For `lightning_fairprune.compare.Comparison` s:
``<metric>_vs_accuracy.png`` and ``<metric>_vs_sparsity.png`` (mean and confidence band over
the seeds of each recipe).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from lightning_fairprune.compare import Comparison, curve_band
from lightning_fairprune.history import dense_record, group_list, latest_per_sparsity, number
from lightning_fairprune.paired import t_interval
from lightning_fairprune.records import disparity_stat, worst_group

__all__ = [
    "MAX_NAMED_GROUPS",
    "PARITY_GAPS",
    "comparison_figures",
    "group_curves",
    "report_figures",
    "run_figures",
]

#: With more groups, only the worst ones (at the final record) are named in a legend.
MAX_NAMED_GROUPS = 8

#: Parity summaries of the records' ``fairness`` field drawn against sparsity, with labels.
PARITY_GAPS: tuple[tuple[str, str], ...] = (
    ("demographic_parity_difference", "demographic parity difference"),
    ("equalized_odds_difference", "equalized odds difference"),
    ("equal_opportunity_difference", "equal opportunity difference"),
    ("accuracy_difference", "accuracy difference"),
)


class RunLike(Protocol):
    """What the builders read of a run (`lightning_fairprune.report.Run`)."""

    name: str
    records: list[dict[str, Any]]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def safe_name(name: str) -> str:
    """A file-name-safe version of a run name.

    Example:
        >>> safe_name("exp/version_0 [attr]")
        'exp_version_0_attr'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def _title(ax: Any, text: str, width: int = 52) -> None:
    ax.set_title(textwrap.fill(text, width), fontsize=10)


def _legend_outside(ax: Any, handles: list[Any] | None = None) -> None:
    """A legend to the right of ``ax``, outside its data area (the layout makes room)."""
    if handles is None:
        handles = ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            fontsize=7,
        )


def _figure_legend(fig: Any, axes: Sequence[Any]) -> None:
    """One legend for all panels (unique labels), to the right of the figure."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right upper", fontsize=7)


def _curve(records: Sequence[Mapping[str, Any]], getter: Callable[[Any], Any]) -> tuple[list, list]:
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


def _after_round(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r.get("moment") == "after_round"]


def _accuracy_key(records: Sequence[Mapping[str, Any]]) -> str:
    return "group_accuracy" if any(group_list(r, "group_accuracy") for r in records) else "recall"


def _names(records: Sequence[Mapping[str, Any]], count: int) -> list[str]:
    names = next(
        (group_list(r, "group_names") for r in reversed(records) if group_list(r, "group_names")),
        [],
    )
    return [str(names[g]) if g < len(names) else f"g{g}" for g in range(count)]


def _disparity(record: Mapping[str, Any], quantity: str) -> float | None:
    """`disparity_stat`; ``"accuracy"``: of the group accuracies (recall in older records)."""
    if quantity == "accuracy":
        value = disparity_stat(record, "group_accuracy")
        return disparity_stat(record, "recall") if value is None else value
    return disparity_stat(record, quantity)


def _note_if_empty(ax: Any) -> None:
    if not ax.get_lines():
        ax.text(
            0.5,
            0.5,
            "not in the records",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="grey",
        )


def _parity(record: Mapping[str, Any], key: str) -> float | None:
    fairness = record.get("fairness")
    return number(fairness.get(key)) if isinstance(fairness, Mapping) else None


def _parity_keys(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The parity gaps present in the records (none when the groups are the classes)."""
    if any(r.get("groups_are_classes") for r in records):
        return []
    return [
        (k, label) for k, label in PARITY_GAPS if any(_parity(r, k) is not None for r in records)
    ]


def group_curves(
    records: Sequence[Mapping[str, Any]], key: str | None = None
) -> list[dict[str, Any]]:
    """Each group's rate against sparsity, with its Wilson interval, one point per level.

    At each sparsity level the latest record holding ``key`` wins; points where a group has no
    value are left out of its curve.

    Args:
        records: a run's history.
        key: a per-group rate: ``"group_accuracy"`` (default; ``"recall"`` in records of
            earlier versions), ``"tpr"``, ``"fpr"`` or ``"selection_rate"``.

    Returns:
        One dict per group: ``name``, ``sparsity``, ``value`` and ``below`` / ``above`` (the
        half-widths of the ``<key>_ci`` interval; 0 where a record has none).

    Example:
        >>> recs = [{"sparsity": 0.0, "group_names": ["a", "b"], "tpr": [0.8, 0.6],
        ...          "tpr_ci": [[0.7, 0.9], [0.5, 0.7]]},
        ...         {"sparsity": 0.5, "group_names": ["a", "b"], "tpr": [0.7, None]}]
        >>> [(c["name"], c["sparsity"], c["value"]) for c in group_curves(recs, "tpr")]
        [('a', [0.0, 0.5], [0.8, 0.7]), ('b', [0.0], [0.6])]
        >>> [round(v, 6) for v in group_curves(recs, "tpr")[0]["below"]]
        [0.1, 0.0]
    """
    key = _accuracy_key(records) if key is None else key
    bounds_key = "group_accuracy_ci" if key in ("group_accuracy", "recall") else f"{key}_ci"
    latest = latest_per_sparsity(records, key)
    count = max((len(group_list(r, key)) for r in latest.values()), default=0)
    curves = [
        {"name": name, "sparsity": [], "value": [], "below": [], "above": []}
        for name in _names(list(latest.values()), count)
    ]
    for sparsity in sorted(latest):
        record = latest[sparsity]
        bounds = group_list(record, bounds_key)
        for group, raw in enumerate(group_list(record, key)):
            value = number(raw)
            if value is None:
                continue
            pair = bounds[group] if group < len(bounds) else None
            ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and None not in pair
            curve = curves[group]
            curve["sparsity"].append(sparsity)
            curve["value"].append(value)
            curve["below"].append(max(0.0, value - float(pair[0])) if ok else 0.0)  # type: ignore[index]
            curve["above"].append(max(0.0, float(pair[1]) - value) if ok else 0.0)  # type: ignore[index]
    return curves


# --------------------------------------------------------------------------------------------
# panels
# --------------------------------------------------------------------------------------------
def _plot_groups(ax: Any, run: RunLike, key: str | None = None) -> None:
    """Per-group rate against sparsity: names, sizes, Wilson bars, the worst group marked."""
    from matplotlib.lines import Line2D

    key = _accuracy_key(run.records) if key is None else key
    curves = group_curves(run.records, key)
    dense = dense_record(run.records) or run.records[0]
    support = [number(v) for v in group_list(dense, "support")]
    worst, _ = worst_group(run.records[-1], key)
    present = [g for g, c in enumerate(curves) if c["sparsity"]]
    named = set(present)
    if len(present) > MAX_NAMED_GROUPS:
        named = set(sorted(present, key=lambda g: curves[g]["value"][-1])[:MAX_NAMED_GROUPS])
    handles = []
    for group in present:
        curve = curves[group]
        if group not in named:
            ax.plot(curve["sparsity"], curve["value"], color="0.75", linewidth=0.8, zorder=1)
            continue
        label = curve["name"]
        if group < len(support) and support[group] is not None:
            label += f" (n={int(support[group])})"
        if group == worst:
            label += " - worst"
        handles.append(
            ax.errorbar(
                curve["sparsity"],
                curve["value"],
                yerr=[curve["below"], curve["above"]],
                marker="o",
                markersize=3,
                capsize=2,
                label=label,
                linewidth=2.4 if group == worst else 1.2,
            )
        )
    if len(present) > len(named):
        handles.append(
            Line2D([], [], color="0.75", label=f"{len(present) - len(named)} other groups")
        )
    what = {
        "group_accuracy": "accuracy within group",
        "recall": "recall",
        "tpr": "TPR",
        "fpr": "FPR",
        "selection_rate": "selection rate",
    }.get(key, key)
    if key == "group_accuracy" and any(r.get("groups_are_classes") for r in run.records):
        what = "recall"
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{what} (95% Wilson interval)")
    _title(ax, f"Per-group {what} vs sparsity")
    ax.grid(alpha=0.3)
    _legend_outside(ax, handles)


def _plot_accuracy(ax: Any, run: RunLike) -> None:
    key = _accuracy_key(run.records)
    group, _ = worst_group(run.records[-1], key)
    count = max((len(group_list(r, key)) for r in run.records), default=0)
    worst_label = "worst-group accuracy"
    if group is not None:
        worst_label += f" (final worst: {_names(run.records, count)[group]})"
    immediate = _after_round(run.records)
    for label, getter, color in (
        ("accuracy", lambda r: number(r.get("accuracy")), "tab:blue"),
        (worst_label, lambda r: worst_group(r)[1], "tab:orange"),
    ):
        x, y = _curve(run.records, getter)
        ax.plot(x, y, "-", color=color, marker="o", markersize=3, label=label)
        x, y = _curve(immediate, getter)
        if x:
            ax.plot(
                x,
                y,
                ":",
                color=color,
                marker="x",
                markersize=4,
                label=f"{label.split(' (')[0]}, right after each round",
            )
    ax.set_xlabel("sparsity")
    _title(ax, "Accuracy and worst-group accuracy vs sparsity")
    ax.grid(alpha=0.3)
    _legend_outside(ax)


def _plot_alpha(ax: Any, runs: Sequence[RunLike], immediate: bool = False) -> None:
    for run in runs:
        x, y = _curve(run.records, lambda r: number(r.get("alpha")))
        color = None
        if x:
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=run.name)
            color = line.get_color()
        x, y = _curve(_after_round(run.records), lambda r: number(r.get("alpha")))
        if immediate and x:
            ax.plot(
                x, y, ":", marker="x", markersize=4, color=color, label="right after each round"
            )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("alpha")
    _title(ax, "Intensification slope alpha (>1: gaps widen)")
    ax.grid(alpha=0.3)


def _plot_curvature_gaps(ax: Any, run: RunLike) -> None:
    """Gradient-norm (left axis) and Hessian-trace (right axis) gaps; coloured axes, no legend."""
    drawn = False
    for axis, quantity, label, color in (
        (ax, "grad_norm", "gradient-norm gap", "tab:blue"),
        (ax.twinx(), "hessian_trace", "Hessian-trace gap", "tab:red"),
    ):
        x, y = _curve(run.records, lambda r, q=quantity: disparity_stat(r, q))
        if x:
            axis.plot(x, y, marker="o", markersize=3, color=color)
            drawn = True
        axis.set_ylabel(f"{label} (max - min over groups)", color=color, fontsize=8)
        axis.tick_params(axis="y", colors=color)
    ax.set_xlabel("sparsity")
    _title(ax, "Gradient-norm and Hessian-trace disparity")
    ax.grid(alpha=0.3)
    if not drawn:
        _note_if_empty(ax)


def _plot_parity(ax: Any, runs: Sequence[RunLike], keys: Sequence[tuple[str, str]]) -> None:
    """Parity gaps against sparsity: one line per gap (one run) or per run (one gap)."""
    for run in runs:
        for key, label in keys:
            x, y = _curve(run.records, lambda r, k=key: _parity(r, k))
            if x:
                ax.plot(x, y, marker="o", markersize=3, label=run.name if len(keys) == 1 else label)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("max - min over groups")
    title = "Parity gaps vs sparsity" if len(keys) > 1 else f"{keys[0][1].capitalize()} vs sparsity"
    _title(ax, title)
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def run_figures(run: RunLike) -> dict[str, Any]:
    """The per-run figures (see the module docstring), keyed by file name."""
    name = safe_name(run.name)
    figures: dict[str, Any] = {}
    fig, axes = _figure(size=(8.0, 4.4))
    _plot_groups(axes[0, 0], run)
    fig.suptitle(textwrap.fill(run.name, 80), fontsize=11)
    figures[f"{name}_recall_vs_sparsity.png"] = fig

    fig, axes = _figure(2, 2, size=(15.0, 8.5))
    _plot_groups(axes[0, 0], run)
    _plot_accuracy(axes[0, 1], run)
    _plot_alpha(axes[1, 0], [run], immediate=True)
    _legend_outside(axes[1, 0])
    _plot_curvature_gaps(axes[1, 1], run)
    fig.suptitle(textwrap.fill(f"lightning_fairprune report: {run.name}", 100))
    figures[f"{name}_overview.png"] = fig

    has_tpr = any(group_list(r, "tpr") for r in run.records)
    gaps = _parity_keys(run.records)
    if has_tpr or gaps:
        fig, axes = _figure(
            int(has_tpr) + int(bool(gaps)), 1, size=(15.0 if has_tpr and gaps else 8.0, 4.6)
        )
        if has_tpr:
            _plot_groups(axes[0, 0], run, "tpr")
        if gaps:
            _plot_parity(axes[0, -1], [run], gaps)
            _legend_outside(axes[0, -1])
        fig.suptitle(textwrap.fill(f"Fairness of {run.name}", 100), fontsize=11)
        figures[f"{name}_fairness.png"] = fig
    return figures


def report_figures(runs: Sequence[RunLike], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every figure of a report: per run (`run_figures`) and across runs, keyed by file name.

    Args:
        runs: the runs.
        rows: their summary rows (`lightning_fairprune.report.summarize_run`, with the
            ``pareto_accuracy`` / ``pareto_wgr`` flags).
    """
    figures: dict[str, Any] = {}
    for run in runs:
        figures.update(run_figures(run))
    fig, axes = _figure(size=(8.0, 4.4))
    _plot_alpha(axes[0, 0], runs)
    if len(runs) > 1:
        _legend_outside(axes[0, 0])
    figures["alpha_vs_sparsity.png"] = fig

    fig, axes = _figure(3, 1, size=(16.0, 4.4))
    for ax, (quantity, title) in zip(
        axes[0],
        (
            ("accuracy", "Group-accuracy (recall) disparity"),
            ("grad_norm", "Gradient-norm disparity"),
            ("hessian_trace", "Hessian-trace disparity"),
        ),
        strict=True,
    ):
        for run in runs:
            x, y = _curve(run.records, lambda r, q=quantity: _disparity(r, q))
            if x:
                ax.plot(x, y, marker="o", markersize=3, label=run.name)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("max - min over groups")
        _title(ax, title)
        ax.grid(alpha=0.3)
        _note_if_empty(ax)
    if len(runs) > 1:
        _figure_legend(fig, axes[0])
    figures["disparity_vs_sparsity.png"] = fig

    keys = [k for k in PARITY_GAPS[:2] if any(k in _parity_keys(run.records) for run in runs)]
    if keys:
        fig, axes = _figure(len(keys), 1, size=(6.0 * len(keys) + 2.5, 4.4))
        for ax, key in zip(axes[0], keys, strict=True):
            _plot_parity(ax, runs, [key])
        _figure_legend(fig, axes[0])
        figures["parity_vs_sparsity.png"] = fig
    figures["comparison.png"] = _comparison(runs, rows)
    return figures


def _comparison(runs: Sequence[RunLike], rows: Sequence[Mapping[str, Any]]) -> Any:
    fig, axes = _figure(2, 1, size=(14.0, 4.8))
    panels = (
        ("accuracy", lambda r: number(r.get("accuracy")), "pareto_accuracy"),
        ("worst-group accuracy", lambda r: worst_group(r)[1], "pareto_wgr"),
    )
    for ax, (label, getter, flag) in zip(axes[0], panels, strict=True):
        for run, row in zip(runs, rows, strict=True):
            x, y = _curve(run.records, getter)
            (line,) = ax.plot(x, y, linewidth=1, alpha=0.6)
            fx, fy = row["sparsity"], getter(run.records[-1])
            if fx is None or fy is None:
                continue
            best = bool(row.get(flag))
            ax.plot(
                [fx],
                [fy],
                marker="*" if best else "o",
                markersize=15 if best else 6,
                color=line.get_color(),
                markeredgecolor="black" if best else None,
                linestyle="none",
                label=run.name,
            )
        ax.set_xlabel("sparsity")
        ax.set_ylabel(label)
        _title(ax, f"{label.capitalize()} vs sparsity")
        ax.grid(alpha=0.3)
    _figure_legend(fig, axes[0])
    fig.suptitle(
        "Final record of each run marked; star = Pareto-best (no run at least as sparse "
        "and as good)",
        fontsize=10,
    )
    return fig


def comparison_figures(comparison: Comparison, confidence: float = 0.95) -> dict[str, Any]:
    """The recipe curves of a `Comparison`: metric vs accuracy and vs sparsity, with CIs.

    For each recipe: every seed's curve (thin); on a grid over the range all its seeds cover,
    the mean over seeds of the interpolated metric (`lightning_fairprune.compare.curve_at`,
    thick) and its pointwise Student t interval at ``confidence`` (band; none when the seeds
    share no range); and the compared point (diamond: the mean matched accuracy or sparsity
    and the mean metric, with the t interval of the metric over seeds). Intervals are not
    corrected for multiple comparisons (the table is the test); the compared level is dashed.

    Returns:
        ``{"<metric>_vs_accuracy.png": Figure, "<metric>_vs_sparsity.png": Figure}``.
    """
    figures: dict[str, Any] = {}
    n = len(next(iter(comparison.curves.values())))
    labels = list(comparison.curves)
    for axis in ("accuracy", "sparsity"):
        fig, axes = _figure(size=(9.5, 5.0))
        ax = axes[0, 0]
        for k, (label, curves) in enumerate(comparison.curves.items()):
            color = f"C{k % 10}"
            name = label + (" (baseline)" if label == comparison.baseline else "")
            for curve in curves:  # every seed, thin
                xs = curve.accuracy if axis == "accuracy" else curve.sparsity
                ax.plot(
                    xs, curve.value, color=color, linewidth=0.6, alpha=0.3, marker=".", markersize=2
                )
            band = curve_band(curves, axis, confidence=confidence)
            if band is None or len(band["x"]) < 2:  # the seeds share no range: no band
                ax.plot([], [], color=color, linewidth=0.6, label=f"{name} (seeds share no range)")
            else:
                ax.plot(band["x"], band["mean"], color=color, linewidth=2.0, label=name)
                ax.fill_between(
                    band["x"], band["low"], band["high"], color=color, alpha=0.2, linewidth=0
                )
        lo_x, hi_x = ax.get_xlim()
        for row in comparison.rows:  # the compared points, side by side (dodged)
            k = labels.index(row["recipe"])
            j = comparison.levels.index(row["level"])
            low, high = t_interval(comparison.values[row["recipe"]][j], confidence)
            x = row[axis] + (k - (len(labels) - 1) / 2) * 0.012 * (hi_x - lo_x)
            ax.errorbar(
                [x],
                [row["mean"]],
                yerr=[[row["mean"] - low], [high - row["mean"]]],
                marker="D",
                markersize=6,
                capsize=3,
                markeredgecolor="black",
                color=f"C{k % 10}",
                linestyle="none",
                zorder=5,
            )
        ax.plot(
            [],
            [],
            marker="D",
            color="grey",
            markeredgecolor="black",
            linestyle="none",
            label=f"compared point (side by side): mean, {confidence:.0%} CI",
        )
        if comparison.at == axis:
            per_seed = "" if len(set(comparison.seed_levels[0])) == 1 else " (mean over seeds)"
            for level in comparison.levels:
                ax.axvline(
                    level,
                    color="black",
                    linestyle="--",
                    linewidth=0.9,
                    label=f"compared at {axis} {level:.3f}{per_seed}",
                )
        ax.set_xlabel(axis)
        ax.set_ylabel(comparison.metric)
        _title(
            ax,
            f"{comparison.metric} vs {axis}: each seed (thin), mean over {n} seeds "
            f"(thick) with its {confidence:.0%} CI band",
            width=80,
        )
        ax.grid(alpha=0.3)
        _legend_outside(ax)
        figures[f"{safe_name(comparison.metric)}_vs_{axis}.png"] = fig
    return figures
