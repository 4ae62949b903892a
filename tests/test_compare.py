"""`compare_recipes` / `lightning_fairprune.compare`: paired recipe comparison on synthetic
histories written to disk, where the truth is known; statistics against SciPy and NumPy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from scipy import stats

from lightning_fairprune.compare import (
    compare_histories,
    curve_at,
    max_excess_accuracy_gap,
    run_curve,
)
from lightning_fairprune.history import HISTORY_FILENAME
from lightning_fairprune.paired import (
    bootstrap_interval,
    student_t_cdf,
    student_t_ppf,
    wilcoxon_signed_rank,
)
from lightning_fairprune.report import compare_recipes, main

SPARSITIES = [0.0, 0.5, 0.7, 0.8, 0.9]


def records_of(accuracy, worst, dense_groups=None, after_round_accuracy=0.05):
    """A history over SPARSITIES: accuracy[k] and worst-group accuracy worst[k] at level k.

    Group 1 is the worst group (value worst[k]), group 0 sits above it. Every pruned level also
    gets an "after_round" record (immediate damage, accuracy 0.05) that must be ignored and a
    "periodic" record before the "before_round" one (the latest wins).
    """
    records = []
    for k, sparsity in enumerate(SPARSITIES):
        groups = [min(1.0, worst[k] + 0.2), worst[k]]
        if k == 0:
            groups = dense_groups or groups
            records.append(
                {
                    "moment": "dense",
                    "round": 0,
                    "sparsity": sparsity,
                    "accuracy": accuracy[k],
                    "group_accuracy": groups,
                }
            )
            continue
        records.append(
            {
                "moment": "after_round",
                "round": k,
                "sparsity": sparsity,
                "accuracy": after_round_accuracy,
                "group_accuracy": [0.0, 0.0],
            }
        )
        records.append(
            {
                "moment": "periodic",
                "round": k,
                "sparsity": sparsity,
                "accuracy": 0.5,
                "group_accuracy": [0.5, 0.01],
            }
        )
        moment = "end" if k == len(SPARSITIES) - 1 else "before_round"
        records.append(
            {
                "moment": moment,
                "round": k,
                "sparsity": sparsity,
                "accuracy": accuracy[k],
                "group_accuracy": groups,
            }
        )
    return records


def write_run(root: Path, records) -> Path:
    root.mkdir(parents=True)
    (root / HISTORY_FILENAME).write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def study(tmp_path, n=12, effects=None, seed=0):
    """Recipes whose worst-group accuracy is f(accuracy) + effect + seed noise.

    Accuracy falls with sparsity differently per recipe and seed; the worst group is a linear
    function of accuracy (so interpolation at matched accuracy is exact) plus the recipe's
    effect and a per-seed, per-recipe noise. Returns {label: [run dirs]} and the true
    per-seed values at any accuracy level through `truth(label, i, level)`.
    """
    effects = effects or {"base": 0.0, "better": 0.10, "null": 0.0}
    rng = np.random.default_rng(seed)
    dirs, params = {}, {}
    for label, effect in effects.items():
        dirs[label] = []
        for i in range(n):
            dense = 0.95 + 0.01 * rng.standard_normal()
            drops = np.array([0.0, 0.01, 0.03, 0.07, 0.15]) * (1 + 0.2 * rng.random())
            acc = dense - drops
            noise = 0.02 * rng.standard_normal()
            worst = 0.7 + 1.5 * (acc - 0.9) + effect + noise
            params[label, i] = (effect, noise)
            run = write_run(tmp_path / label / f"seed_{i}", records_of(list(acc), list(worst)))
            dirs[label].append(run)

    def truth(label, i, level):
        effect, noise = params[label, i]
        return 0.7 + 1.5 * (level - 0.9) + effect + noise

    return dirs, truth


def test_known_difference_is_recovered_and_null_is_not(tmp_path):
    dirs, truth = study(tmp_path)
    result = compare_recipes(dirs, "worst_group_accuracy", baseline="base", at="accuracy")
    rows = {row["recipe"]: row for row in result.rows}
    (level,) = result.levels
    true_delta = {
        label: np.mean([truth(label, i, level) - truth("base", i, level) for i in range(12)])
        for label in ("better", "null")
    }
    better, null = rows["better"], rows["null"]
    assert better["delta"] == pytest.approx(true_delta["better"], abs=1e-9)  # exact interpolation
    assert abs(better["delta"] - 0.10) < 0.02
    assert better["ci_low"] > 0
    assert better["ci_high"] > better["ci_low"]
    assert better["p_value"] < 0.01
    assert better["wins"] == 12
    assert null["ci_low"] < 0 < null["ci_high"]
    assert null["p_value"] > 0.05
    assert null["delta"] == pytest.approx(true_delta["null"], abs=1e-9)
    # the rows say what they are: n, the baseline first, corrected p = min(1, m p_raw)
    assert [r["recipe"] for r in result.rows] == ["base", "better", "null"]
    assert rows["base"]["delta"] is None
    assert rows["base"]["n"] == 12
    assert result.comparisons == 2
    assert better["p_value"] == pytest.approx(min(1.0, 2 * better["p_raw"]))
    assert f"matched accuracy {level:.4f}" in result.notes[0]
    assert "Bonferroni over m = 2" in result.table()


def test_null_rejection_rate_is_nominal_and_the_effect_is_found():
    """200 simulated studies (in memory): under the null, the 95% t interval excludes 0 and
    Wilcoxon rejects at 0.05 about 5% of the time; with the +0.10 effect, always."""
    rng = np.random.default_rng(7)
    ci_rejects = p_rejects = found = 0
    for _ in range(200):
        runs = {"base": [], "null": [], "better": []}
        for label, effect in (("base", 0.0), ("null", 0.0), ("better", 0.1)):
            for _ in range(12):
                acc = [0.95, 0.94, 0.92, 0.88, 0.8]
                worst = list(
                    0.7 + 1.5 * (np.array(acc) - 0.9) + effect + 0.03 * rng.standard_normal()
                )
                runs[label].append(records_of(acc, worst))
        result = compare_histories(runs, at="sparsity", correction=None)
        null, better = result.rows[1], result.rows[2]
        ci_rejects += not null["ci_low"] < 0 < null["ci_high"]
        p_rejects += null["p_value"] < 0.05
        found += better["ci_low"] > 0 and better["p_value"] < 0.05
    assert 2 <= ci_rejects <= 18
    assert 2 <= p_rejects <= 18
    assert found == 200


def test_matched_accuracy_interpolation_equals_numpy(tmp_path):
    dirs, _ = study(tmp_path, n=3)
    result = compare_recipes(dirs, "worst_group_accuracy", baseline="base", at="accuracy")
    level = result.levels[0]
    lowest = []
    for label, runs in dirs.items():
        for i, run in enumerate(runs):
            recs = [json.loads(x) for x in (run / HISTORY_FILENAME).read_text().splitlines()]
            kept = [r for r in recs if r["moment"] in ("dense", "before_round", "end")]
            acc = np.array([r["accuracy"] for r in kept])
            worst = np.array([min(r["group_accuracy"]) for r in kept])
            lowest.append(acc.min())
            # accuracy decreases with sparsity here: numpy's interp on the reversed arrays
            expected = np.interp(level, acc[::-1], worst[::-1])
            assert result.values[label][0][i] == pytest.approx(expected, abs=1e-12)
            sparsity = np.interp(level, acc[::-1], np.array(SPARSITIES)[::-1])
            assert result.rows[list(dirs).index(label)]["n"] == 3
            assert curve_at(result.curves[label][i], "accuracy", level)["sparsity"] == (
                pytest.approx(sparsity)
            )
    # the default level: the lowest accuracy every run reaches (after_round's 0.05 ignored)
    assert level == pytest.approx(max(lowest))


def test_sparsest_bracketing_pair_when_accuracy_is_not_monotone():
    # accuracy 0.9 -> 0.8 -> 0.85 -> 0.7: level 0.82 is crossed twice; the sparsest pair wins
    recs = records_of([0.9, 0.8, 0.85, 0.7, 0.6], [0.5, 0.4, 0.45, 0.3, 0.2])
    curve = run_curve(recs, "worst_group_accuracy")
    assert curve.sparsity == SPARSITIES
    point = curve_at(curve, "accuracy", 0.82)
    t = (0.82 - 0.85) / (0.7 - 0.85)  # between sparsity 0.7 and 0.8
    assert point["value"] == pytest.approx(0.45 + t * (0.3 - 0.45))
    assert point["sparsity"] == pytest.approx(0.7 + t * 0.1)
    assert curve_at(curve, "accuracy", 0.95) is None
    assert curve_at(curve, "sparsity", 0.75)["value"] == pytest.approx(
        np.interp(0.75, SPARSITIES, curve.value)
    )


def test_equal_sparsity_levels_given_and_common(tmp_path):
    dirs, _ = study(tmp_path, n=4)
    default = compare_recipes(dirs, at="sparsity")
    assert default.levels == [0.9]  # the highest sparsity every run reaches
    common = compare_recipes(dirs, at="sparsity", level="common", correction=None)
    assert common.levels == SPARSITIES[1:]
    assert common.comparisons == 1
    # a level realized as 0.8997 in one run and 0.9 in the others is still common
    recs = records_of([0.95, 0.94, 0.92, 0.88, 0.8], [0.7] * 5)
    for r in recs:
        r["sparsity"] = 0.8997 if r["sparsity"] == 0.9 else r["sparsity"]
    other = [records_of([0.95, 0.94, 0.92, 0.88, 0.8], [0.6] * 5) for _ in range(2)]
    result = compare_histories({"a": [recs, other[0]], "b": other}, at="sparsity", level="common")
    assert result.levels == [*SPARSITIES[1:4], 0.8997]
    given = compare_recipes(dirs, at="sparsity", level=[0.6, 0.85])
    assert given.comparisons == 2 * 2  # two recipes x two levels
    run = dirs["better"][2]
    recs = [json.loads(x) for x in (run / HISTORY_FILENAME).read_text().splitlines()]
    kept = [r for r in recs if r["moment"] in ("dense", "before_round", "end")]
    worst = [min(r["group_accuracy"]) for r in kept]
    assert given.values["better"][1][2] == pytest.approx(np.interp(0.85, SPARSITIES, worst))
    assert [r["level"] for r in given.rows] == [0.6] * 3 + [0.85] * 3


def test_unpaired_inputs_refused(tmp_path):
    dirs, _ = study(tmp_path, n=3)
    with pytest.raises(ValueError, match=r"same number of runs.*'base': 3, 'better': 2, 'null': 3"):
        compare_recipes({"base": dirs["base"], "better": dirs["better"][:2], "null": dirs["null"]})
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=r"better\[1\]: .*empty: no fairprune_history.jsonl") as e:
        compare_recipes({"base": dirs["base"][:2], "better": [dirs["better"][0], empty]})
    assert "base[" not in str(e.value)
    with pytest.raises(ValueError, match=r"better\[0\]: .*missing: no such directory"):
        compare_recipes({"base": dirs["base"][:1] * 2, "better": [missing, empty]})
    with pytest.raises(ValueError, match=r"at least 2 runs \(seeds\) per recipe, but got 1"):
        compare_recipes({"base": dirs["base"][:1], "better": dirs["better"][:1]})
    with pytest.raises(ValueError, match=r"Expected `recipes` to be a dict"):
        compare_recipes({"base": dirs["base"]})
    with pytest.raises(ValueError, match=r"runs of recipe 'base' to be a list"):
        compare_recipes({"base": str(dirs["base"][0]), "better": dirs["better"]})
    with pytest.raises(ValueError, match=r"Expected `baseline` to be one of"):
        compare_recipes(dirs, baseline="nope")
    with pytest.raises(ValueError, match=r"`at` to be one of \('accuracy', 'sparsity'\)"):
        compare_recipes(dirs, at="loss")
    with pytest.raises(ValueError, match=r"no trained-model record with it"):
        compare_recipes(dirs, metric="no_such_metric")
    # a directory with two runs (two versions) is ambiguous
    both = tmp_path / "both"
    for v, run in enumerate(dirs["better"][:2]):
        (both / f"version_{v}").mkdir(parents=True)
        (both / f"version_{v}" / HISTORY_FILENAME).write_text((run / HISTORY_FILENAME).read_text())
    with pytest.raises(ValueError, match=r"better\[0\]: .*holds 2 histories"):
        compare_recipes({"base": dirs["base"][:2], "better": [both, dirs["better"][1]]})


def test_no_common_accuracy_level_refused(tmp_path):
    high = [
        write_run(tmp_path / f"h{i}", records_of([0.95, 0.94, 0.93, 0.92, 0.91], [0.8] * 5))
        for i in range(2)
    ]
    low = [
        write_run(tmp_path / f"l{i}", records_of([0.85, 0.8, 0.75, 0.7, 0.6], [0.5] * 5))
        for i in range(2)
    ]
    with pytest.raises(
        ValueError, match=r"accuracy level that every run reaches, but there is none"
    ):
        compare_recipes({"high": high, "low": low})
    with pytest.raises(ValueError, match=r"accuracy 0.9300 is not reached by low\[0\].*low\[1\]"):
        compare_recipes({"high": high, "low": low}, level=0.93)
    # at equal sparsity they compare fine
    result = compare_recipes({"high": high, "low": low}, at="sparsity")
    assert result.rows[1]["delta"] == pytest.approx(0.5 - 0.8)
    with pytest.raises(ValueError, match=r"metric='accuracy' with at='accuracy'"):
        compare_recipes({"high": high, "low": low}, metric="accuracy")


def test_max_excess_accuracy_gap_against_a_loop(tmp_path):
    dirs, _ = study(tmp_path, n=3)
    result = compare_recipes(dirs, "max_excess_accuracy_gap", at="sparsity", level="common")
    for label, runs in dirs.items():
        for i, run in enumerate(runs):
            recs = [json.loads(x) for x in (run / HISTORY_FILENAME).read_text().splitlines()]
            dense = recs[0]
            for j, sparsity in enumerate(SPARSITIES[1:]):
                rec = [r for r in recs if r["sparsity"] == sparsity][-1]
                gaps = []
                for a, d in zip(rec["group_accuracy"], dense["group_accuracy"], strict=True):
                    gaps.append((d - a) - (dense["accuracy"] - rec["accuracy"]))
                assert result.values[label][j][i] == pytest.approx(max(gaps))
    assert "lower is better" in result.notes[-1]
    assert max_excess_accuracy_gap({"accuracy": 0.9, "group_accuracy": [0.9]}, None) is None


def test_wilcoxon_equals_scipy():
    rng = np.random.default_rng(1)
    for n in [*range(1, 21), 30, 49, 50, 51, 60, 120]:
        d = rng.normal(0.3, 1.0, n)  # continuous: no ties, no zeros
        assert wilcoxon_signed_rank(d) == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-10)
    for n in (5, 7):  # ties and zeros: SciPy permutes exactly up to 13 pairs (slowly)
        d = np.round(rng.normal(0.3, 1.0, n), 1)
        d[0] = 0.0
        d[1] = -d[2]
        assert wilcoxon_signed_rank(d) == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-10)
    for n in (12, 16):  # ties up to 50 pairs: exact, against brute force over 2**n sign flips
        d = np.round(rng.normal(0.2, 1.0, n), 1)
        d[3] = 0.0
        nonzero = d[d != 0]
        ranks = stats.rankdata(np.abs(nonzero))
        signs = (np.arange(2 ** len(nonzero))[:, None] >> np.arange(len(nonzero))) & 1
        null = signs @ ranks
        observed = ranks[nonzero > 0].sum()
        expected = min(
            1.0, 2 * min(np.mean(null <= observed + 1e-9), np.mean(null >= observed - 1e-9))
        )
        assert wilcoxon_signed_rank(d) == pytest.approx(expected, rel=1e-12)
    d = np.round(rng.normal(0.2, 1.0, 80), 1)  # ties above 50: normal approximation
    assert wilcoxon_signed_rank(d) == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-10)
    assert wilcoxon_signed_rank([0.0, 0.0]) == 1.0


def test_student_t_and_intervals_equal_scipy_and_numpy():
    for df in (1, 2, 3, 7, 19, 60):
        for q in (0.5, 0.9, 0.975, 0.995, 0.99975, 0.1):
            assert student_t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-9, abs=1e-12)
        assert student_t_cdf(1.3, df) == pytest.approx(stats.t.cdf(1.3, df), rel=1e-12)
    rng = np.random.default_rng(3)
    d = rng.normal(0.1, 0.05, 9)
    result = compare_histories(
        {
            "a": [records_of([0.9] * 5, [0.5] * 5)] * 9,
            "b": [records_of([0.9] * 5, [0.5 + x] * 5) for x in d],
        },
        at="sparsity",
    )
    low, high = stats.t.interval(0.95, 8, loc=d.mean(), scale=stats.sem(d))
    assert (result.rows[1]["ci_low"], result.rows[1]["ci_high"]) == (
        pytest.approx(low, abs=1e-9),
        pytest.approx(high, abs=1e-9),
    )  # one comparison: no correction
    # the bootstrap: the percentiles of the means of the seeded resamples, as NumPy computes them
    import torch

    index = torch.randint(0, 9, (2000, 9), generator=torch.Generator().manual_seed(5)).numpy()
    means = d[index].mean(axis=1)
    lo, hi = bootstrap_interval(list(d), 0.9, n_resamples=2000, seed=5)
    assert (lo, hi) == (
        pytest.approx(np.percentile(means, 5)),
        pytest.approx(np.percentile(means, 95)),
    )
    boot = compare_histories(
        {
            "a": [records_of([0.9] * 5, [0.5] * 5)] * 9,
            "b": [records_of([0.9] * 5, [0.5 + x] * 5) for x in d],
        },
        at="sparsity",
        ci="bootstrap",
        seed=5,
        n_resamples=2000,
        confidence=0.9,
    )
    assert (boot.rows[1]["ci_low"], boot.rows[1]["ci_high"]) == (
        pytest.approx(lo),
        pytest.approx(hi),
    )
    assert "seed 5" in boot.notes[1]


def test_bonferroni_widens_the_intervals(tmp_path):
    dirs, _ = study(tmp_path, n=5)
    corrected = compare_recipes(dirs, at="sparsity", level="common")
    plain = compare_recipes(dirs, at="sparsity", level="common", correction=None)
    m = corrected.comparisons
    assert m == 2 * 4
    for a, b in zip(corrected.rows, plain.rows, strict=True):
        if a["delta"] is None:
            continue
        assert a["p_value"] == pytest.approx(min(1.0, m * b["p_raw"]))
        half_a, half_b = a["ci_high"] - a["delta"], b["ci_high"] - b["delta"]
        ratio = stats.t.ppf(1 - 0.025 / m, 4) / stats.t.ppf(0.975, 4)
        assert half_a == pytest.approx(ratio * half_b)


def test_cli_compare_prints_the_table_and_draws_the_curves(tmp_path, capsys):
    dirs, _ = study(tmp_path / "runs", n=4)
    out = tmp_path / "out"
    argv = ["compare"]
    for label, runs in dirs.items():
        argv += ["--recipe", label, *map(str, runs)]
    code = main([*argv, "--baseline", "base", "--at", "accuracy", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["recipe", "accuracy", "n"]
    assert lines[2].startswith("base (baseline)")
    assert lines[3].split()[0] == "better"
    table = json.loads((out / "compare.json").read_text())
    assert [r["recipe"] for r in table["rows"]] == ["base", "better", "null"]
    for name in ("worst_group_accuracy_vs_accuracy.png", "worst_group_accuracy_vs_sparsity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # unpaired: refused with the counts, exit status 2
    code = main(
        [
            "compare",
            "--recipe",
            "a",
            *map(str, dirs["base"]),
            "--recipe",
            "b",
            str(dirs["better"][0]),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert "'a': 4, 'b': 1" in capsys.readouterr().err
    code = main(
        [
            "compare",
            "--recipe",
            "a",
            *map(str, dirs["base"]),
            "--recipe",
            "b",
            *map(str, dirs["better"]),
            "--level",
            "0.2",
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert "is not reached by" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--recipe", "a", "--out", str(out)])
    assert "no run directory" in capsys.readouterr().err


def test_comparison_figures_are_readable(tmp_path):
    from lightning_fairprune.figures import comparison_figures

    dirs, _ = study(tmp_path, n=4)
    result = compare_recipes(dirs, at="accuracy")
    figures = comparison_figures(result)
    assert set(figures) == {
        "worst_group_accuracy_vs_accuracy.png",
        "worst_group_accuracy_vs_sparsity.png",
    }
    for fig in figures.values():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        legend = ax.get_legend()
        labels = [t.get_text() for t in legend.get_texts()]
        assert labels[:3] == ["base (baseline)", "better", "null"]
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
        assert fig.bbox.contains(*legend.get_window_extent(renderer).p1)
        title = ax.title.get_window_extent(renderer)
        assert fig.bbox.x0 <= title.x0
        assert title.x1 <= fig.bbox.x1
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 3  # one CI band per recipe
        assert "compared point (side by side): mean, 95% CI" in labels
        # the compared points: at each recipe's mean matched coordinate, the mean metric
        points = [
            line for line in ax.get_lines() if line.get_marker() == "D" and len(line.get_xdata())
        ]
        assert sorted(float(line.get_ydata()[0]) for line in points) == pytest.approx(
            sorted(row["mean"] for row in result.rows)
        )


def test_per_seed_matching_when_seeds_differ_more_than_recipes():
    """Seeds 0.05 apart in accuracy, pruning costs 0.02: no level is common to all runs, but
    each seed's runs share one; the per-seed comparison recovers the effect exactly."""
    runs = {"base": [], "better": []}
    curves = {}
    for label, effect, drop in (("base", 0.0, 0.02), ("better", 0.08, 0.015)):
        for i in range(4):
            acc = list(0.95 - 0.05 * i - drop * np.array([0.0, 0.2, 0.5, 0.8, 1.0]))
            worst = list(0.5 + 2.0 * (np.array(acc) - 0.9) + effect)
            runs[label].append(records_of(acc, worst))
            curves[label, i] = (acc, worst)
    with pytest.raises(ValueError, match=r"there is none.*level='per_seed'"):
        compare_histories(runs)
    result = compare_histories(runs, level="per_seed")
    expected_levels = [max(min(curves[label, i][0]) for label in runs) for i in range(4)]
    assert result.seed_levels == [expected_levels]
    assert result.levels == [pytest.approx(np.mean(expected_levels))]
    for label in runs:
        for i in range(4):
            acc, worst = curves[label, i]
            expected = np.interp(expected_levels[i], acc[::-1], worst[::-1])
            assert result.values[label][0][i] == pytest.approx(expected, abs=1e-12)
    assert result.rows[1]["delta"] == pytest.approx(0.08)
    assert "per seed" in result.notes[0]
    # a seed whose runs share no level is refused, naming it
    runs["better"][2] = records_of([0.7, 0.69, 0.68, 0.67, 0.66], [0.3] * 5)
    with pytest.raises(
        ValueError, match=r"none for seed 2\. Ranges: base\[2\]: \[0\.8300, 0\.8500\]; better\[2\]"
    ):
        compare_histories(runs, level="per_seed")
    with pytest.raises(ValueError, match=r"'per_seed' \(with at='accuracy'\)"):
        compare_histories(runs, at="sparsity", level="per_seed")
