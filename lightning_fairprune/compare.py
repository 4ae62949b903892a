"""Compare training recipes over paired seeds: a metric at matched accuracy or equal sparsity.

The core of `lightning_fairprune.report.compare_recipes` (which reads the run directories):
this module works on records in memory (curves, matching, the table), the statistics are
`lightning_fairprune.paired`; no Lightning, no matplotlib, no SciPy.

**Which records.** A run's *curve* is its trained model at each sparsity level: the records
taken at the moments ``"dense"``, ``"before_round"``, ``"periodic"`` and ``"end"``
(`CURVE_MOMENTS`: everything but ``"after_round"``, the damage of a round before any
fine-tuning), and at each sparsity level the *latest* of them (the model after the most
fine-tuning at that level: `lightning_fairprune.history.latest_per_sparsity`). Points are
ordered by sparsity.

**Metrics.** ``metric`` names any scalar of a record: a top-level number (``"accuracy"``,
``"alpha"``) or a key of `lightning_fairprune.records.record_scalars` without its
``fairprune/`` prefix (``"worst_group_accuracy"``, ``"worst_group_recall"``,
``"demographic_parity_difference"``, ``"equalized_odds_difference"``, ``"recall/<group>"``...),
or ``"max_excess_accuracy_gap"`` (`max_excess_accuracy_gap`), the metric of Hashemizadeh et
al. (ICLR 2024), computed from the record and the run's dense record.

**Matching.** ``at="sparsity"``: the metric interpolated linearly in sparsity at the level.
``at="accuracy"``: the metric where the run's accuracy (against sparsity, piecewise linear)
equals the level, linear between the two adjacent points whose accuracies bracket it; when
several pairs bracket it (accuracy is not always monotone) the *sparsest* pair is used (the
most pruned model of the run with that accuracy). A run *reaches* an accuracy level when the
level lies between its lowest and its highest accuracy. Default levels: the lowest accuracy
every run reaches (the highest of the runs' lowest accuracies), or the highest sparsity every
run reaches; ``level="common"`` (sparsity only) uses every nonzero sparsity level recorded in
all runs. A level some run does not reach is refused, naming the runs and their ranges. Seeds
often differ in accuracy more than recipes do (the dense models of two seeds can be further
apart than pruning moves either): ``level="per_seed"`` (accuracy only) matches each pair on
its own level, for seed ``i`` the lowest accuracy that run ``i`` of every recipe reaches; the
row's ``level`` is then the mean of these levels.

**Statistics.** Runs are paired by position (run ``i`` of every recipe is seed ``i``). For each
recipe and level, the paired differences ``d_i = m(recipe, i) − m(baseline, i)`` give
``delta`` = mean(d), a confidence interval of the mean difference (``ci="t"``: Student's t
interval, the default; ``ci="bootstrap"``: percentile interval of ``n_resamples`` paired
bootstrap means drawn with a seeded generator) and a two-sided Wilcoxon signed-rank p-value
(`lightning_fairprune.paired.wilcoxon_signed_rank`: zero differences dropped, exact null
distribution up to 50 nonzero pairs, ties included; normal approximation with tie correction
above). With
``correction="bonferroni"`` (the default) the m = (recipes − 1) × levels comparisons are
corrected together: ``p_value = min(1, m · p_raw)`` and the intervals are at level
``1 − (1 − confidence) / m`` (simultaneous coverage).

Example:
    >>> def run(wga, acc):  # a dense record, then two fine-tuned ones
    ...     return [{"moment": "dense", "sparsity": 0.0, "accuracy": 0.95,
    ...              "group_accuracy": [0.97, 0.93]},
    ...             {"moment": "before_round", "sparsity": 0.5, "accuracy": 0.92,
    ...              "group_accuracy": [0.95, wga - 0.02]},
    ...             {"moment": "end", "sparsity": 0.8, "accuracy": acc,
    ...              "group_accuracy": [0.95, wga]}]
    >>> result = compare_histories(
    ...     {"plain": [run(0.70, 0.90), run(0.72, 0.90), run(0.69, 0.90)],
    ...      "weighted": [run(0.80, 0.90), run(0.83, 0.90), run(0.81, 0.90)]},
    ...     metric="worst_group_accuracy", at="sparsity")
    >>> result.levels, result.rows[1]["recipe"], round(result.rows[1]["delta"], 4)
    ([0.8], 'weighted', 0.11)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_fairprune.checks import (
    check_choice,
    check_nonempty_str,
    check_paired,
    check_real,
    check_sample,
)
from lightning_fairprune.history import dense_record, group_list, latest_per_sparsity, number
from lightning_fairprune.paired import PairedTest, t_interval
from lightning_fairprune.records import record_scalars

__all__ = [
    "CURVE_MOMENTS",
    "Comparison",
    "RunCurve",
    "compare_histories",
    "curve_at",
    "curve_band",
    "max_excess_accuracy_gap",
    "metric_value",
    "run_curve",
]

#: Record moments that make a run's curve: the trained model (not ``"after_round"``).
CURVE_MOMENTS: tuple[str, ...] = ("dense", "before_round", "periodic", "end")

#: Statistic computed from a record and the run's dense record.
MAX_EXCESS_GAP = "max_excess_accuracy_gap"


# --------------------------------------------------------------------------------------------
# metrics of a record
# --------------------------------------------------------------------------------------------
def _group_accuracies(record: Mapping[str, Any]) -> list[float | None]:
    values = group_list(record, "group_accuracy") or group_list(record, "recall")
    return [number(v) for v in values]


def max_excess_accuracy_gap(
    record: Mapping[str, Any], dense: Mapping[str, Any] | None
) -> float | None:
    """``max_a [(A_dense_a − A_a) − (A_dense − A)]``: the largest excess accuracy drop of a group.

    The metric of Hashemizadeh et al. (ICLR 2024): each group's accuracy drop from the dense
    model minus the overall drop, maximized over groups (0 when every group loses exactly the
    overall drop; lower is better). Per-group accuracies are the records' ``group_accuracy``
    (``recall`` in older records); groups without a value in either record are skipped.

    Args:
        record: the record (``accuracy`` and per-group accuracies).
        dense: the run's dense record (`lightning_fairprune.history.dense_record`).

    Returns:
        The gap, or ``None`` when it cannot be computed (no dense record, missing values).

    Example:
        >>> dense = {"accuracy": 0.9, "group_accuracy": [0.95, 0.85]}
        >>> now = {"accuracy": 0.8, "group_accuracy": [0.9, 0.7]}
        >>> round(max_excess_accuracy_gap(now, dense), 6)  # group 1 lost 0.15, overall 0.1
        0.05
    """
    if dense is None:
        return None
    overall_now, overall_dense = number(record.get("accuracy")), number(dense.get("accuracy"))
    if overall_now is None or overall_dense is None:
        return None
    gaps = [
        (d - a) - (overall_dense - overall_now)
        for a, d in zip(_group_accuracies(record), _group_accuracies(dense), strict=False)
        if a is not None and d is not None
    ]
    return max(gaps) if gaps else None


def metric_value(
    record: Mapping[str, Any], metric: str, dense: Mapping[str, Any] | None = None
) -> float | None:
    """The value of ``metric`` in ``record`` (``None`` when the record has none).

    Args:
        record: a history record.
        metric: a top-level number of the record (``"accuracy"``), a key of
            `lightning_fairprune.records.record_scalars` with or without its ``fairprune/``
            prefix (``"worst_group_accuracy"``, ``"equalized_odds_difference"``...), or
            ``"max_excess_accuracy_gap"``.
        dense: the run's dense record (for ``"max_excess_accuracy_gap"``).

    Example:
        >>> rec = {"accuracy": 0.8, "group_accuracy": [0.9, 0.6],
        ...        "fairness": {"demographic_parity_difference": 0.1}}
        >>> [metric_value(rec, m) for m in ("accuracy", "worst_group_accuracy",
        ...                                  "fairprune/demographic_parity_difference", "nope")]
        [0.8, 0.6, 0.1, None]
    """
    if metric == MAX_EXCESS_GAP:
        return max_excess_accuracy_gap(record, dense)
    name = metric.removeprefix("fairprune/")
    direct = number(record.get(name))
    if direct is not None:
        return direct
    return record_scalars(record).get(f"fairprune/{name}")


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------
@dataclass
class RunCurve:
    """One run's trained model at each sparsity level (sorted by sparsity; see the module)."""

    sparsity: list[float]
    accuracy: list[float]
    value: list[float]

    def range(self, at: str) -> tuple[float, float]:
        """``(lowest, highest)`` accuracy or sparsity of the curve."""
        xs = self.accuracy if at == "accuracy" else self.sparsity
        return min(xs), max(xs)


def run_curve(records: Sequence[Mapping[str, Any]], metric: str) -> RunCurve:
    """The run's curve of ``metric`` (points without an accuracy or a value are left out).

    Example:
        >>> recs = [{"moment": "dense", "sparsity": 0.0, "accuracy": 0.9},
        ...         {"moment": "after_round", "sparsity": 0.5, "accuracy": 0.5},
        ...         {"moment": "periodic", "sparsity": 0.5, "accuracy": 0.8},
        ...         {"moment": "before_round", "sparsity": 0.5, "accuracy": 0.85}]
        >>> run_curve(recs, "accuracy")
        RunCurve(sparsity=[0.0, 0.5], accuracy=[0.9, 0.85], value=[0.9, 0.85])
    """
    dense = dense_record(records)
    kept = [r for r in records if isinstance(r, Mapping) and r.get("moment") in CURVE_MOMENTS]
    latest = latest_per_sparsity(kept)
    curve = RunCurve([], [], [])
    for sparsity in sorted(latest):
        record = latest[sparsity]
        accuracy, value = number(record.get("accuracy")), metric_value(record, metric, dense)
        if accuracy is not None and value is not None:
            curve.sparsity.append(sparsity)
            curve.accuracy.append(accuracy)
            curve.value.append(value)
    return curve


def curve_at(curve: RunCurve, at: str, level: float) -> dict[str, float] | None:
    """The curve's metric, sparsity and accuracy where its ``at`` coordinate equals ``level``.

    Linear between the sparsest pair of adjacent points whose ``at`` values bracket ``level``
    (see the module docstring); ``None`` when the curve does not reach it.

    Example:
        >>> c = RunCurve(sparsity=[0.0, 0.5, 0.9], accuracy=[0.9, 0.8, 0.6], value=[0.8, 0.7, 0.3])
        >>> {k: round(v, 6) for k, v in curve_at(c, "accuracy", 0.7).items()}
        {'value': 0.5, 'sparsity': 0.7, 'accuracy': 0.7}
        >>> curve_at(c, "sparsity", 0.95) is None
        True
    """
    xs = curve.accuracy if at == "accuracy" else curve.sparsity
    if len(xs) == 1:
        if xs[0] != level:
            return None
        return {"value": curve.value[0], "sparsity": curve.sparsity[0], "accuracy": xs[0]}
    for k in range(len(xs) - 2, -1, -1):
        lo, hi = sorted((xs[k], xs[k + 1]))
        if lo <= level <= hi:
            t = 1.0 if xs[k] == xs[k + 1] else (level - xs[k]) / (xs[k + 1] - xs[k])
            out = {}
            for key, ys in (
                ("value", curve.value),
                ("sparsity", curve.sparsity),
                ("accuracy", curve.accuracy),
            ):
                out[key] = ys[k] + t * (ys[k + 1] - ys[k])
            out["accuracy" if at == "accuracy" else "sparsity"] = float(level)
            return out
    return None


def curve_band(
    curves: Sequence[RunCurve], at: str, points: int = 60, confidence: float = 0.95
) -> dict[str, list[float]] | None:
    """Mean and pointwise Student t interval over runs of their curves, on a common grid.

    The grid spans the ``at`` range every curve covers (``None`` when there is none); at each
    grid point every curve is read with `curve_at`.

    Example:
        >>> a = RunCurve([0.0, 1.0], [0.9, 0.7], [0.8, 0.4])
        >>> b = RunCurve([0.0, 1.0], [0.9, 0.7], [0.6, 0.2])
        >>> band = curve_band([a, b], "sparsity", points=3)
        >>> band["x"], [round(v, 6) for v in band["mean"]]
        ([0.0, 0.5, 1.0], [0.7, 0.5, 0.3])
    """
    low = max(c.range(at)[0] for c in curves)
    high = min(c.range(at)[1] for c in curves)
    if low > high:
        return None
    grid = [low + (high - low) * k / (points - 1) for k in range(points)] if high > low else [low]
    band: dict[str, list[float]] = {"x": grid, "mean": [], "low": [], "high": []}
    for x in grid:
        values = [curve_at(c, at, x)["value"] for c in curves]  # type: ignore[index]
        mean = sum(values) / len(values)
        lo, hi = t_interval(values, confidence) if len(values) > 1 else (mean, mean)
        band["mean"].append(mean)
        band["low"].append(lo)
        band["high"].append(hi)
    return band


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """What `compare_histories` (and `lightning_fairprune.report.compare_recipes`) return.

    ``rows``: one per recipe and level (the baseline first, with its mean and no test), keys
    ``recipe, level, n, mean, sparsity, accuracy, delta, ci_low, ci_high, p_value, p_raw,
    wins, losses`` (``sparsity``/``accuracy``: the recipe's mean matched sparsity and accuracy
    at the level). ``values[recipe][j]`` are the per-seed values at ``levels[j]``, read at
    ``seed_levels[j][i]`` for seed ``i`` (all equal to ``levels[j]`` unless
    ``level="per_seed"``, where ``levels[j]`` is their mean);
    ``curves[recipe]`` the per-seed `RunCurve` s; ``notes`` say which level and statistics
    were used.
    """

    metric: str
    at: str
    baseline: str
    levels: list[float]
    rows: list[dict[str, Any]]
    values: dict[str, list[list[float]]]
    seed_levels: list[list[float]]
    curves: dict[str, list[RunCurve]]
    names: dict[str, list[str]]
    ci: str
    confidence: float
    correction: str | None
    comparisons: int
    notes: list[str] = field(default_factory=list)

    def table(self, markdown: bool = False) -> str:
        """The rows as a fixed-width text table (or Markdown), followed by the notes."""
        header = ["recipe", self.at, "n", "mean", "delta", "CI", "p", "wins"]
        other = "sparsity" if self.at == "accuracy" else "accuracy"
        header.insert(4, f"at {other}")
        body = []
        for row in self.rows:
            base = row["delta"] is None
            cells = [
                row["recipe"] + (" (baseline)" if base else ""),
                f"{row['level']:.4f}",
                str(row["n"]),
                f"{row['mean']:.4f}",
                f"{row[other]:.4f}",
                "-" if base else f"{row['delta']:+.4f}",
                "-" if base else f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]",
                "-" if base else f"{row['p_value']:.3g}",
                "-" if base else f"{row['wins']}/{row['n']}",
            ]
            body.append(cells)
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cells) + " |" for cells in body]
            return "\n".join([*lines, "", *[f"* {note}" for note in self.notes]])
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
            for cells in [header, ["-" * w for w in widths], *body]
        ]
        return "\n".join([*lines, "", *self.notes])


def _run_names(histories: Mapping[str, Sequence[Any]], names: Any) -> dict[str, list[str]]:
    n = check_paired(histories)
    out = {}
    for label in histories:
        given = (names or {}).get(label)
        out[label] = list(given) if given else [f"{label}[{i}]" for i in range(n)]
    return out


def _per_seed_levels(
    curves: Mapping[str, list[RunCurve]], names: Mapping[str, list[str]]
) -> tuple[list[list[float]], str]:
    """For each seed i, the lowest accuracy run i of every recipe reaches."""
    out = []
    for i in range(len(next(iter(curves.values())))):
        ranges = {label: runs[i].range("accuracy") for label, runs in curves.items()}
        low = max(lo for lo, _ in ranges.values())
        high = min(hi for _, hi in ranges.values())
        if low > high:
            listed = "; ".join(
                f"{names[k][i]}: [{lo:.4f}, {hi:.4f}]" for k, (lo, hi) in ranges.items()
            )
            raise ValueError(
                f"Expected an accuracy level that run {i} of every recipe reaches "
                f"(level='per_seed'), but there is none for seed {i}. Ranges: {listed}"
            )
        out.append(low)
    how = (
        f"matched accuracy per seed: for seed i, the lowest accuracy that run i of every recipe "
        f"reaches ({min(out):.4f} to {max(out):.4f} over the seeds, mean "
        f"{sum(out) / len(out):.4f})"
    )
    return [out], how


def _levels(
    curves: Mapping[str, list[RunCurve]], names: Mapping[str, list[str]], at: str, level: Any
) -> tuple[list[list[float]], str]:
    """The levels to compare at (per level, one per seed), and how they were chosen."""
    n = len(next(iter(curves.values())))
    if isinstance(level, str) and level == "per_seed" and at == "accuracy":
        return _per_seed_levels(curves, names)
    levels, how = _common_levels(curves, names, at, level)
    return [[value] * n for value in levels], how


def _common_levels(
    curves: Mapping[str, list[RunCurve]], names: Mapping[str, list[str]], at: str, level: Any
) -> tuple[list[float], str]:
    """Levels every run reaches, and a note saying how they were chosen."""
    ranges = {
        (label, i): curve.range(at) for label, cs in curves.items() for i, curve in enumerate(cs)
    }

    def describe() -> str:
        return "; ".join(
            f"{names[label][i]}: [{lo:.4f}, {hi:.4f}]" for (label, i), (lo, hi) in ranges.items()
        )

    low_key = max(ranges, key=lambda k: ranges[k][0])
    high_key = min(ranges, key=lambda k: ranges[k][1])
    low, high = ranges[low_key][0], ranges[high_key][1]
    if level is None:
        if low > high:
            raise ValueError(
                f"Expected an {at} level that every run reaches, but there is none: the highest "
                f"lowest {at} ({low:.4f}, {names[low_key[0]][low_key[1]]}) is above the lowest "
                f"highest {at} ({high:.4f}, {names[high_key[0]][high_key[1]]}). Ranges: "
                f"{describe()}. Match per seed (level='per_seed'), compare at the other axis, "
                "or prune the runs to a common level"
            )
        if at == "accuracy":
            return [low], (
                f"matched accuracy {low:.4f}: the lowest accuracy every run reaches "
                f"(common range [{low:.4f}, {high:.4f}])"
            )
        return [high], (
            f"sparsity {high:.4f}: the highest sparsity every run reaches "
            f"(common range [{low:.4f}, {high:.4f}])"
        )
    if isinstance(level, str):
        if level != "common" or at != "sparsity":
            raise ValueError(
                "Expected `level` to be None, a float, a list of floats, 'per_seed' (with "
                f"at='accuracy') or 'common' (with at='sparsity'), but got {level!r} with "
                f"at={at!r}"
            )
        first = next(iter(curves.values()))[0].sparsity
        common = [
            s
            for s in first
            if s > 0
            and all(
                any(abs(s - x) <= 1e-3 for x in c.sparsity) for cs in curves.values() for c in cs
            )
        ]
        if not common:
            raise ValueError(
                "Expected a nonzero sparsity level recorded in every run (level='common'), but "
                f"there is none. Ranges: {describe()}"
            )
        # a level recorded as 0.9000 in one run and 0.8997 in another: compare inside both
        common = [min(max(s, low), high) for s in common]
        listed = ", ".join(f"{s:.4f}" for s in common)
        return common, f"the sparsity levels recorded in every run (within 0.001): {listed}"
    levels = check_sample([level] if not isinstance(level, Sequence) else list(level), "level", 1)
    out = [check_real(value, "level") for value in levels]
    for value in out:
        missing = [
            names[label][i] for (label, i), (lo, hi) in ranges.items() if not lo <= value <= hi
        ]
        if missing:
            raise ValueError(
                f"Expected an {at} level that every run reaches, but {at} {value:.4f} is not "
                f"reached by {', '.join(missing)}. Ranges: {describe()}"
            )
    return out, f"{at} level(s) given: {', '.join(f'{v:.4f}' for v in out)}"


def compare_histories(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
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
    names: Mapping[str, Sequence[str]] | None = None,
) -> Comparison:
    """Compare recipes on ``metric``, paired by seed, at matched accuracy or equal sparsity.

    See the module docstring for the records, the matching and the statistics.

    Args:
        histories: ``{recipe label: [records of run 0, records of run 1, ...]}``; run ``i`` of
            every recipe is seed ``i``.
        metric: the scalar to compare (see `metric_value`).
        baseline: the recipe the others are compared with (default: the first).
        at: ``"accuracy"`` (matched accuracy) or ``"sparsity"`` (equal sparsity).
        level: the level(s) to compare at; ``None``: the default level (module docstring);
            ``"common"``: every nonzero sparsity recorded in all runs (``at="sparsity"``);
            ``"per_seed"``: one accuracy level per seed (``at="accuracy"``).
        ci: ``"t"`` or ``"bootstrap"``.
        confidence: nominal level of the intervals (before the correction).
        correction: ``"bonferroni"`` or ``None``.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.
        names: display names of the runs (default ``label[i]``), for the messages.

    Returns:
        A `Comparison`.

    Raises:
        ValueError: unpaired inputs (different run counts), fewer than 2 seeds, a run without
            the metric, no level every run reaches, bad arguments.
    """
    run_names = _run_names(histories, names)
    labels = list(histories)
    baseline = labels[0] if baseline is None else baseline
    _check_target(labels, metric, baseline, at)
    test = PairedTest(ci, confidence, correction, n_resamples, seed)
    curves = {
        label: [_run_curve(records, metric, run_names[label][i]) for i, records in enumerate(runs)]
        for label, runs in histories.items()
    }
    seed_levels, how = _levels(curves, run_names, at, level)
    matched = {label: _match(curves[label], at, seed_levels) for label in labels}
    order = [baseline, *(label for label in labels if label != baseline)]
    m = test.comparisons((len(labels) - 1) * len(seed_levels))
    levels = [_mean(per_seed) for per_seed in seed_levels]
    rows = [
        _row(label, level, matched[label][j], matched[baseline][j], test, m)
        for j, level in enumerate(levels)
        for label in order
    ]
    n = len(histories[baseline])
    notes = [
        f"{metric} of each recipe minus {baseline!r}, paired by seed (n = {n}), at {how}.",
        test.describe(m),
        f"Curves: the latest record at each sparsity among moments {', '.join(CURVE_MOMENTS)}.",
    ]
    if metric == MAX_EXCESS_GAP:
        notes.append(
            "max_excess_accuracy_gap: lower is better (a negative delta is an improvement)"
        )
    return Comparison(
        metric=metric,
        at=at,
        baseline=baseline,
        levels=levels,
        rows=rows,
        values={label: [[p["value"] for p in pts] for pts in matched[label]] for label in labels},
        seed_levels=seed_levels,
        curves=curves,
        names=run_names,
        ci=ci,
        confidence=confidence,
        correction=correction,
        comparisons=m,
        notes=notes,
    )


_TEST_KEYS = ("delta", "ci_low", "ci_high", "p_value", "p_raw", "wins", "losses")


def _mean(values: Sequence[float]) -> float:
    """The mean (exactly the value when all are equal)."""
    return values[0] if len(set(values)) == 1 else sum(values) / len(values)


def _match(
    curves: Sequence[RunCurve], at: str, seed_levels: Sequence[Sequence[float]]
) -> list[list[dict[str, float]]]:
    """Per level, each seed's curve read at that seed's level (`curve_at`)."""
    return [
        [curve_at(c, at, x) for c, x in zip(curves, per_seed, strict=True)]  # type: ignore[misc]
        for per_seed in seed_levels
    ]


def _row(
    label: str,
    level: float,
    points: Sequence[dict[str, float]],
    baseline: Sequence[dict[str, float]],
    test: PairedTest,
    comparisons: int,
) -> dict[str, Any]:
    """One table row: a recipe's means at a level, and its test against the baseline's."""
    values = [p["value"] for p in points]
    n = len(points)
    row: dict[str, Any] = {
        "recipe": label,
        "level": level,
        "n": n,
        "mean": sum(values) / n,
        "sparsity": sum(p["sparsity"] for p in points) / n,
        "accuracy": sum(p["accuracy"] for p in points) / n,
    }
    if points is baseline:  # the baseline itself: no test
        row.update(dict.fromkeys(_TEST_KEYS))
    else:
        row.update(test.run(values, [p["value"] for p in baseline], comparisons))
    return row


def _check_target(labels: list[str], metric: Any, baseline: Any, at: Any) -> None:
    """The compared metric, baseline and matched axis."""
    check_choice(baseline, "baseline", labels)
    check_nonempty_str(metric, "metric")
    check_choice(at, "at", ("accuracy", "sparsity"))
    if at == "accuracy" and metric.removeprefix("fairprune/") == "accuracy":
        raise ValueError(
            "Expected `metric` to differ from the matched quantity, but got metric='accuracy' "
            "with at='accuracy' (every difference would be 0)"
        )


def _run_curve(records: Sequence[Mapping[str, Any]], metric: str, name: str) -> RunCurve:
    curve = run_curve(records, metric)
    if not curve.value:
        raise ValueError(
            f"Expected every run to record `metric` {metric!r}, but run {name} has no "
            f"trained-model record with it (moments {CURVE_MOMENTS}; "
            "'max_excess_accuracy_gap' also needs the dense record)"
        )
    return curve
