"""Compare training recipes over paired seeds: a metric at matched accuracy or equal sparsity.

The statistics core of `lightning_fairprune.report.compare_recipes` (which reads the run
directories); this module works on records in memory, imports no Lightning, no matplotlib and
no SciPy.

**Which records.** A run's *curve* is its trained model at each sparsity level: the records
taken at the moments ``"dense"``, ``"before_round"``, ``"periodic"`` and ``"end"``
(`CURVE_MOMENTS`: everything but ``"after_round"``, the damage of a round before any
fine-tuning), and at each sparsity level the *latest* of them (the model after the most
fine-tuning at that level: `lightning_fairprune.history.latest_per_sparsity`). Points are
ordered by sparsity.

**Metrics.** ``metric`` names any scalar of a record: a top-level number (``"accuracy"``,
``"alpha"``) or a key of `lightning_fairprune.history.record_scalars` without its
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
(`wilcoxon_signed_rank`: zero differences dropped, exact null distribution up to 50 nonzero
pairs, ties included; normal approximation with tie correction above). With
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

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fairprune.checks import check_choice, check_int, check_real
from lightning_fairprune.history import (
    dense_record,
    group_list,
    latest_per_sparsity,
    number,
    record_scalars,
)

__all__ = [
    "CURVE_MOMENTS",
    "Comparison",
    "RunCurve",
    "bootstrap_interval",
    "check_paired",
    "compare_histories",
    "curve_at",
    "curve_band",
    "max_excess_accuracy_gap",
    "metric_value",
    "paired_difference",
    "run_curve",
    "student_t_cdf",
    "student_t_ppf",
    "t_interval",
    "wilcoxon_signed_rank",
]

#: Record moments that make a run's curve: the trained model (not ``"after_round"``).
CURVE_MOMENTS: tuple[str, ...] = ("dense", "before_round", "periodic", "end")

#: Statistic computed from a record and the run's dense record.
MAX_EXCESS_GAP = "max_excess_accuracy_gap"

_EXACT_LIMIT = 50  # the Wilcoxon exact null distribution up to this many nonzero pairs


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
            `lightning_fairprune.history.record_scalars` with or without its ``fairprune/``
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
# distributions (no SciPy)
# --------------------------------------------------------------------------------------------
def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (continued fraction, Numerical Recipes 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result / a


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom.

    Example:
        >>> round(student_t_cdf(2.0, 5), 6)  # scipy.stats.t.cdf(2, 5)
        0.94903
    """
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def student_t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF).

    Example:
        >>> round(student_t_ppf(0.975, 4), 6)  # scipy.stats.t.ppf(0.975, 4)
        2.776445
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"Expected `q` to be a float in (0, 1), but got {q!r}")
    if q < 0.5:
        return -student_t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def wilcoxon_signed_rank(differences: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of ``differences`` (no SciPy).

    Zero differences are dropped (Wilcoxon's method); the ranks of tied absolute differences
    are their mean ranks. With at most 50 nonzero differences the p-value is exact: the
    statistic ``R+`` (sum of the ranks of the positive differences) against its distribution
    over the ``2**n`` sign assignments of these ranks, ``p = min(1, 2 min(P(R+ <= r),
    P(R+ >= r)))``. Above 50, the normal approximation with the tie correction of the
    variance and no continuity correction. This equals ``scipy.stats.wilcoxon(d).pvalue``
    without ties or zeros (and with them up to 13 pairs, where SciPy permutes exactly; from 14
    to 50 pairs with ties SciPy uses the normal approximation, this test stays exact).

    Args:
        differences: the paired differences.

    Returns:
        The p-value (1.0 when every difference is zero).

    Example:
        >>> wilcoxon_signed_rank([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # all 6 positive: 2 / 2**6
        0.03125
    """
    d = [float(x) for x in differences if float(x) != 0.0]
    n = len(d)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    doubled = [0] * n  # twice the mean ranks: integers
    ties: list[int] = []
    start = 0
    while start < n:
        end = start
        while end + 1 < n and abs(d[order[end + 1]]) == abs(d[order[start]]):
            end += 1
        for j in range(start, end + 1):
            doubled[order[j]] = start + end + 2  # 2 × mean of ranks start+1 .. end+1
        ties.append(end - start + 1)
        start = end + 1
    r_plus2 = sum(r for r, x in zip(doubled, d, strict=True) if x > 0)
    if n <= _EXACT_LIMIT:
        counts = [0] * (sum(doubled) + 1)
        counts[0] = 1
        top = 0
        for r in doubled:
            for s in range(top, -1, -1):
                if counts[s]:
                    counts[s + r] += counts[s]
            top += r
        total = 2**n
        below = sum(counts[: r_plus2 + 1]) / total
        above = sum(counts[r_plus2:]) / total
        return min(1.0, 2.0 * min(below, above))
    mean = n * (n + 1) / 4.0
    var = (n * (n + 1) * (2 * n + 1) - sum(t**3 - t for t in ties) / 2.0) / 24.0
    z = (r_plus2 / 2.0 - mean) / math.sqrt(var)
    return min(1.0, 2.0 * _normal_sf(abs(z)))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student's t confidence interval of the mean of ``values`` (at least 2).

    Example:
        >>> [round(v, 4) for v in t_interval([1.0, 2.0, 3.0])]  # 2 ± t(0.975, 2) · 1/√3
        [-0.4841, 4.4841]
    """
    n = len(values)
    if n < 2:
        raise ValueError(f"Expected at least 2 values for a t interval, but got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_ppf(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (``n_resamples`` seeded resamples).

    Resampling the paired differences resamples the pairs. The quantiles interpolate linearly
    (NumPy's default).

    Example:
        >>> lo, hi = bootstrap_interval([0.1, 0.2, 0.3, 0.4], seed=0)
        >>> 0.1 <= lo < 0.25 < hi <= 0.4
        True
    """
    n = len(values)
    if n < 2:
        raise ValueError(f"Expected at least 2 values for a bootstrap interval, but got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    data = torch.tensor(list(values), dtype=torch.float64)
    index = torch.randint(0, n, (int(n_resamples), n), generator=generator)
    means = data[index].mean(dim=1)
    alpha = 1.0 - confidence
    bounds = torch.quantile(means, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64))
    return float(bounds[0]), float(bounds[1])


def paired_difference(
    recipe: Sequence[float],
    baseline: Sequence[float],
    *,
    ci: str = "t",
    confidence: float = 0.95,
    comparisons: int = 1,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float | int]:
    """Mean paired difference ``recipe − baseline``, its interval and the Wilcoxon p-value.

    Args:
        recipe: the recipe's values, one per seed.
        baseline: the baseline's values, same seeds in the same order.
        ci: ``"t"`` (Student's t interval) or ``"bootstrap"`` (percentile, paired).
        confidence: nominal level of one interval.
        comparisons: number of comparisons m for Bonferroni: the interval is at level
            ``1 − (1 − confidence) / m`` and ``p_value = min(1, m · p_raw)`` (1: uncorrected).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``delta``, ``ci_low``, ``ci_high``, ``p_value``, ``p_raw``, ``wins`` (seeds where the
        recipe is higher), ``losses`` (lower).

    Example:
        >>> out = paired_difference([0.8, 0.9, 0.85], [0.7, 0.75, 0.7])
        >>> round(out["delta"], 4), out["wins"], out["p_raw"]
        (0.1333, 3, 0.25)
    """
    if len(recipe) != len(baseline):
        raise ValueError(
            f"Expected paired values (as many recipe values as baseline values), but got "
            f"{len(recipe)} and {len(baseline)}"
        )
    d = [float(a) - float(b) for a, b in zip(recipe, baseline, strict=True)]
    level = 1.0 - (1.0 - confidence) / comparisons
    if ci == "t":
        low, high = t_interval(d, level)
    else:
        low, high = bootstrap_interval(d, level, n_resamples, seed)
    p_raw = wilcoxon_signed_rank(d)
    return {
        "delta": sum(d) / len(d),
        "ci_low": low,
        "ci_high": high,
        "p_value": min(1.0, comparisons * p_raw),
        "p_raw": p_raw,
        "wins": sum(x > 0 for x in d),
        "losses": sum(x < 0 for x in d),
    }


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


def check_paired(recipes: Any, name: str = "histories") -> int:
    """Check ``{label: [run, ...]}``: at least 2 recipes, equal run counts (>= 2); return it.

    Example:
        >>> check_paired({"a": [1, 2], "b": [3]}, "recipes")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected every recipe to have the same number of runs ... {'a': 2, 'b': 1}
    """
    if not isinstance(recipes, Mapping) or len(recipes) < 2:
        raise ValueError(
            f"Expected `{name}` to be a dict {{recipe label: [run, ...]}} with at least 2 "
            f"recipes, but got {recipes!r:.200}"
        )
    counts = {}
    for label, runs in recipes.items():
        if not isinstance(label, str) or not label:
            raise ValueError(
                f"Expected every recipe label to be a non-empty str, but got {label!r}"
            )
        if isinstance(runs, (str, bytes, Mapping)) or not isinstance(runs, Sequence):
            raise ValueError(
                f"Expected the runs of recipe {label!r} to be a list (one per seed), but got "
                f"{type(runs).__name__}"
            )
        counts[label] = len(runs)
    if len(set(counts.values())) != 1:
        raise ValueError(
            "Expected every recipe to have the same number of runs (runs are paired by position: "
            f"run i of every recipe is seed i), but got {counts}"
        )
    n = next(iter(counts.values()))
    if n < 2:
        raise ValueError(f"Expected at least 2 runs (seeds) per recipe, but got {n}")
    return n


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
    levels = [level] if not isinstance(level, Sequence) else list(level)
    if not levels:
        raise ValueError("Expected `level` to hold at least one level, but got []")
    for value in levels:
        check_real(value, "level")
    out = [float(v) for v in levels]
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
    _check_options(labels, metric, baseline, at, ci, confidence, correction, n_resamples)
    curves = {
        label: [_run_curve(records, metric, run_names[label][i]) for i, records in enumerate(runs)]
        for label, runs in histories.items()
    }
    seed_levels, how = _levels(curves, run_names, at, level)
    levels = [
        per_seed[0] if len(set(per_seed)) == 1 else sum(per_seed) / len(per_seed)
        for per_seed in seed_levels
    ]
    others = [label for label in labels if label != baseline]
    m = len(others) * len(levels) if correction == "bonferroni" else 1
    matched = {
        label: [
            [curve_at(c, at, x) for c, x in zip(curves[label], per_seed, strict=True)]
            for per_seed in seed_levels
        ]
        for label in labels
    }
    values = {
        label: [[p["value"] for p in points] for points in matched[label]]  # type: ignore[index]
        for label in labels
    }
    rows: list[dict[str, Any]] = []
    for j, lvl in enumerate(levels):
        for label in [baseline, *others]:
            points: list[dict[str, float]] = matched[label][j]  # type: ignore[assignment]
            n = len(points)
            row: dict[str, Any] = {
                "recipe": label,
                "level": lvl,
                "n": n,
                "mean": sum(values[label][j]) / n,
                "sparsity": sum(p["sparsity"] for p in points) / n,
                "accuracy": sum(p["accuracy"] for p in points) / n,
            }
            if label == baseline:
                row.update(dict.fromkeys(_TEST_KEYS))
            else:
                row.update(
                    paired_difference(
                        values[label][j],
                        values[baseline][j],
                        ci=ci,
                        confidence=confidence,
                        comparisons=m,
                        n_resamples=n_resamples,
                        seed=seed,
                    )
                )
            rows.append(row)
    notes = _notes(
        metric,
        baseline,
        len(histories[baseline]),
        how,
        ci,
        confidence,
        correction,
        m,
        n_resamples,
        seed,
    )
    return Comparison(
        metric=metric,
        at=at,
        baseline=baseline,
        levels=levels,
        rows=rows,
        values=values,
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


def _check_options(
    labels: list[str],
    metric: Any,
    baseline: Any,
    at: Any,
    ci: Any,
    confidence: Any,
    correction: Any,
    n_resamples: Any,
) -> None:
    if baseline not in labels:
        raise ValueError(f"Expected `baseline` to be one of {labels}, but got {baseline!r}")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"Expected `metric` to be the name of a record scalar, but got {metric!r}")
    check_choice(at, "at", ("accuracy", "sparsity"))
    if at == "accuracy" and metric.removeprefix("fairprune/") == "accuracy":
        raise ValueError(
            "Expected `metric` to differ from the matched quantity, but got metric='accuracy' "
            "with at='accuracy' (every difference would be 0)"
        )
    check_choice(ci, "ci", ("t", "bootstrap"))
    check_real(confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True)
    if correction not in ("bonferroni", None):
        raise ValueError(
            f"Expected `correction` to be 'bonferroni' or None, but got {correction!r}"
        )
    check_int(n_resamples, "n_resamples", 100)


def _run_curve(records: Sequence[Mapping[str, Any]], metric: str, name: str) -> RunCurve:
    curve = run_curve(records, metric)
    if not curve.value:
        raise ValueError(
            f"Expected every run to record `metric` {metric!r}, but run {name} has no "
            f"trained-model record with it (moments {CURVE_MOMENTS}; "
            "'max_excess_accuracy_gap' also needs the dense record)"
        )
    return curve


def _notes(
    metric: str,
    baseline: str,
    n: int,
    how: str,
    ci: str,
    confidence: float,
    correction: str | None,
    m: int,
    n_resamples: int,
    seed: int,
) -> list[str]:
    """What the comparison did, in words (printed under the table)."""
    interval = (
        "Student t interval of the mean paired difference"
        if ci == "t"
        else f"percentile bootstrap interval of the mean paired difference ({n_resamples} "
        f"resamples of the seeds, seed {seed})"
    )
    corrected = (
        f"Bonferroni over m = {m} comparisons: p = min(1, {m} p_raw), intervals at "
        f"{1 - (1 - confidence) / m:.4g}"
        if correction == "bonferroni"
        else "no multiple-comparison correction"
    )
    notes = [
        f"{metric} of each recipe minus {baseline!r}, paired by seed (n = {n}), at {how}.",
        f"CI: {interval}, nominal {confidence:g}; p: two-sided Wilcoxon signed-rank; {corrected}.",
        f"Curves: the latest record at each sparsity among moments {', '.join(CURVE_MOMENTS)}.",
    ]
    if metric == MAX_EXCESS_GAP:
        notes.append(
            "max_excess_accuracy_gap: lower is better (a negative delta is an improvement)"
        )
    return notes
