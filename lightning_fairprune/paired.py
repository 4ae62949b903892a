"""Paired comparisons over seeds, without SciPy: intervals, a signed-rank test, Bonferroni.

The statistics of `lightning_fairprune.compare` (docs/compare_recipes.md). Runs are paired by
seed: for a recipe and the baseline, the paired differences ``d_i`` give `paired_difference`:
their mean, a confidence interval of the mean (`t_interval`: Student's t; `bootstrap_interval`:
percentile interval of seeded paired bootstrap means) and a two-sided Wilcoxon signed-rank
p-value (`wilcoxon_signed_rank`, exact up to 50 nonzero pairs), Bonferroni-corrected over
``comparisons``. `student_t_cdf` and `student_t_ppf` are computed from the regularized
incomplete beta function (tested against SciPy).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_fairprune.checks import check_choice, check_int, check_real, check_sample

__all__ = [
    "PairedTest",
    "bootstrap_interval",
    "paired_difference",
    "student_t_cdf",
    "student_t_ppf",
    "t_interval",
    "wilcoxon_signed_rank",
]

_EXACT_LIMIT = 50  # the Wilcoxon exact null distribution up to this many nonzero pairs


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
    check_real(q, "q", low=0.0, high=1.0, low_open=True, high_open=True)
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
    n = len(check_sample(values, "values"))
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
    n = len(check_sample(values, "values"))
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
    check_sample(baseline, "baseline", len(recipe))
    check_sample(recipe, "recipe", len(baseline))
    check_choice(ci, "ci", ("t", "bootstrap"))
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


@dataclass(frozen=True)
class PairedTest:
    """How the paired differences of a comparison are tested (validated at construction).

    Attributes:
        ci: ``"t"`` (Student's t interval) or ``"bootstrap"`` (percentile, paired).
        confidence: nominal level of one interval (before the correction).
        correction: ``"bonferroni"`` (over all the comparisons made) or ``None``.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.

    Example:
        >>> test = PairedTest()
        >>> out = test.run([0.8, 0.9, 0.85], [0.7, 0.75, 0.7], comparisons=4)
        >>> test.comparisons(4), out["p_raw"], out["p_value"]
        (4, 0.25, 1.0)
        >>> PairedTest(correction="holm")
        Traceback (most recent call last):
        ...
        ValueError: Expected `correction` to be one of ('bonferroni',) or None, but got 'holm'
    """

    ci: str = "t"
    confidence: float = 0.95
    correction: str | None = "bonferroni"
    n_resamples: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.ci, "ci", ("t", "bootstrap"))
        check_real(self.confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True)
        check_choice(self.correction, "correction", ("bonferroni",), allow_none=True)
        check_int(self.n_resamples, "n_resamples", 100)
        check_int(self.seed, "seed")

    def comparisons(self, count: int) -> int:
        """The m of the correction for ``count`` comparisons (1 without a correction)."""
        return count if self.correction == "bonferroni" else 1

    def run(
        self, recipe: Sequence[float], baseline: Sequence[float], comparisons: int
    ) -> dict[str, float | int]:
        """`paired_difference` of ``recipe`` against ``baseline`` with these settings."""
        return paired_difference(
            recipe,
            baseline,
            ci=self.ci,
            confidence=self.confidence,
            comparisons=comparisons,
            n_resamples=self.n_resamples,
            seed=self.seed,
        )

    def describe(self, comparisons: int) -> str:
        """The interval, test and correction in words (a comparison's note)."""
        interval = (
            "Student t interval of the mean paired difference"
            if self.ci == "t"
            else "percentile bootstrap interval of the mean paired difference "
            f"({self.n_resamples} resamples of the seeds, seed {self.seed})"
        )
        m = comparisons
        corrected = (
            f"Bonferroni over m = {m} comparisons: p = min(1, {m} p_raw), intervals at "
            f"{1 - (1 - self.confidence) / m:.4g}"
            if self.correction == "bonferroni"
            else "no multiple-comparison correction"
        )
        return (
            f"CI: {interval}, nominal {self.confidence:g}; p: two-sided Wilcoxon signed-rank; "
            f"{corrected}."
        )
