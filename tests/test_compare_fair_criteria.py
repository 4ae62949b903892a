"""`benchmarks/compare_fair_criteria.py --quick`: every code path, and its statistics recomputed."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_fair_criteria as study  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fair")
    res = study.main(["--quick", "--out", str(out), "--fig-prefix", str(out / "fig")])
    saved = json.loads((out / "results.json").read_text())
    return res, saved, out


def _points(runs, d, seed, method):
    c, s, f = method
    recs = next(r for r in runs if r["dataset"] == d and r["seed"] == seed)["records"]
    pts = [
        (r["sparsity"], r["acc"], r["worst"])
        for r in recs
        if (r["criterion"], r["schedule"], r["finetune"]) == (c, s, f)
    ]
    return sorted(pts)


def _interp(points, level, floor):
    """Independent re-implementation: the sparsest bracketing adjacent pair, no collapses."""
    found = (None, None)
    for (s0, a0, w0), (s1, a1, w1) in itertools.pairwise(points):
        if min(a0, a1) < floor or not (min(a0, a1) <= level <= max(a0, a1)):
            continue
        if a0 == a1:
            found = (w0, s1)
            continue
        xs = sorted([a0, a1])
        found = (
            float(np.interp(level, xs, [w0, w1] if a0 <= a1 else [w1, w0])),
            float(np.interp(level, xs, [s0, s1] if a0 <= a1 else [s1, s0])),
        )
    return found


def test_records_sparsity_and_coverage(result):
    _, saved, out = result
    runs = saved["runs"]
    assert {r["dataset"] for r in runs} == set(study.DATASETS)
    for run in runs:
        assert run["split"] == run["seed"] % 2
        for r in run["records"]:
            assert abs(r["realized"] - r["sparsity"]) < 2e-3  # exact up to rounding of s·N
            assert 0.0 <= r["worst"] <= r["acc"] + 1e-12  # a minimum is below the mean
            assert r["worst"] == pytest.approx(min(r["group_acc"]))
        kinds = {(r["criterion"], r["schedule"], r["finetune"]) for r in run["records"]}
        assert ("worst_group", "rounds", "dro") in kinds
        assert ("fairprune", "oneshot", "gel_signed") in kinds
        assert ("undecayed", "oneshot", "plain") in kinds
    for path in (out / "table.md", *[Path(p) for p in result[0]["figures"]]):
        assert path.exists()
        assert path.stat().st_size > 0


def test_levels_matching_and_coverage_recomputed(result):
    _, saved, _ = result
    runs, a, cfg = saved["runs"], saved["analysis"], saved["config"]
    for d in cfg["datasets"]:
        druns = [r for r in runs if r["dataset"] == d]
        for sch, s in itertools.product(("oneshot", "rounds"), cfg["level_sparsities"]):
            accs = [
                r["acc"]
                for run in druns
                for r in run["records"]
                if (r["criterion"], r["schedule"], r["finetune"]) == ("magnitude", sch, "plain")
                and r["sparsity"] == s
            ]
            assert a["levels"][d][sch][str(s)] == pytest.approx(float(np.median(accs)))
        for key, by_level in a["matched"].items():
            if not key.startswith(d + "|"):
                continue
            method = tuple(key.split("|")[1:])
            for s, values in by_level.items():
                level = a["levels"][d][method[1]][s]
                for run in druns:
                    floor = run["chance"] + 0.25 * (run["dense"]["acc"] - run["chance"])
                    expect, expect_sp = _interp(_points(runs, d, run["seed"], method), level, floor)
                    got = values[str(run["seed"])]
                    got_sp = a["matched_sparsity"][key][s][str(run["seed"])]
                    if expect is None:
                        assert got is None
                        assert got_sp is None
                    else:
                        assert got == pytest.approx(expect, abs=1e-12)
                        assert got_sp == pytest.approx(expect_sp, abs=1e-12)
                covered = sum(v is not None for v in values.values()) / len(values)
                assert a["coverage"][key][s] == pytest.approx(covered)


def test_paired_tests_recomputed_with_scipy(result):
    _, saved, _ = result
    a = saved["analysis"]
    m = sum(t["p"] is not None for t in a["tests"])
    assert a["num_tests"] == m
    assert m > 0  # the quick run exercises the tests
    for t in a["tests"]:
        key_c = f"{t['dataset']}|{'|'.join(t['candidate'])}"
        key_b = f"{t['dataset']}|{'|'.join(t['baseline'])}"
        xc = a["matched"][key_c][t["level_sparsity"]]
        xb = a["matched"][key_b][t["level_sparsity"]]
        seeds = [k for k in xc if xc[k] is not None and xb[k] is not None]
        assert sorted(seeds) == sorted(t["seeds"])
        assert t["n"] == len(seeds)
        if not seeds:
            continue
        d = np.array([xc[k] - xb[k] for k in seeds])
        assert t["mean_diff"] == pytest.approx(d.mean(), abs=1e-12)
        sp = a["matched_sparsity"][key_c][t["level_sparsity"]]
        assert t["cand_sparsity"] == pytest.approx(np.mean([sp[k] for k in seeds]))
        if t["p"] is not None:
            ref = stats.ttest_rel([xc[k] for k in seeds], [xb[k] for k in seeds])
            assert t["p"] == pytest.approx(ref.pvalue, rel=1e-9)
            assert t["p_bonf"] == pytest.approx(min(1.0, ref.pvalue * m), rel=1e-9)
            lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
            assert t["ci95"] == pytest.approx([lo, hi], rel=1e-9, abs=1e-12)


def test_verdict_follows_the_tests(result):
    _, saved, _ = result
    a, cfg = saved["analysis"], saved["config"]
    for key, wins in a["verdict"].items():
        cand = key.split("|")
        expect = []
        for d in cfg["datasets"]:
            ok = False
            for s in a["levels"][d][cand[1]]:
                ts = [
                    t
                    for t in a["tests"]
                    if t["dataset"] == d and t["candidate"] == cand and t["level_sparsity"] == s
                ]
                if len(ts) == 2 and all(
                    t["p_bonf"] is not None
                    and t["p_bonf"] < 0.01
                    and t["mean_diff"] > 0
                    and t["cand_sparsity"] >= t["base_sparsity"] - 0.01
                    for t in ts
                ):
                    ok = True
            if ok:
                expect.append(d)
        assert wins == expect


def test_summary_cis_and_forecast_rows(result):
    _, saved, _ = result
    runs = saved["runs"]
    for key, cell in list(saved["summary"].items())[:40]:
        d, c, s, f, sp = key.split("|")
        vals = [
            r["worst"]
            for run in runs
            if run["dataset"] == d
            for r in run["records"]
            if (r["criterion"], r["schedule"], r["finetune"]) == (c, s, f)
            and r["sparsity"] == float(sp)
        ]
        assert cell["worst"][0] == pytest.approx(np.mean(vals))
        if len(vals) > 1 and np.std(vals) > 0:
            lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
            assert cell["worst"][1:] == pytest.approx([lo, hi])
    rows = saved["analysis"]["forecast_by_round"]
    oneshot = [r for r in rows if r["schedule"] == "oneshot"]
    assert [r["round_fraction"] for r in oneshot] == saved["config"]["sparsities"]
    for r in oneshot:
        sel = [
            f
            for run in runs
            for f in run["forecast"]
            if f["schedule"] == "oneshot" and round(f["round_fraction"], 3) == r["round_fraction"]
        ]
        pred = np.concatenate([f["predicted"] for f in sel])
        real = np.concatenate([f["realized"] for f in sel])
        ratios = real / np.where(np.abs(pred) > 1e-12, pred, np.nan)
        assert math.isclose(r["median_ratio"], np.nanmedian(ratios), rel_tol=1e-9)
