"""End-to-end check of benchmarks/reproduce_recall_distortion.py in --quick mode."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_recall_distortion.py"


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check_p(p):
    assert p is None or (isinstance(p, float) and math.isnan(p)) or 0.0 <= p <= 1.0


def test_quick_run_writes_consistent_json(tmp_path):
    out = tmp_path / "rd"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workers", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for key in (
        "config",
        "runs",
        "alpha",
        "consecutive_tests",
        "criteria_tests",
        "tran",
        "group_equalized",
        "dense",
    ):
        assert key in res
    cfg = res["config"]
    assert len(res["runs"]) == len(cfg["seeds"]) >= 2
    assert (out / "table.md").exists()
    assert (out / "recall_distortion_digits_alpha.png").stat().st_size > 0

    for run in res["runs"]:
        assert all(0.0 <= r <= 1.0 for r in run["dense"]["recall"])
        assert len(run["pruned"]) == len(cfg["ratios"]) * len(cfg["criteria"])
        for rec in run["pruned"] + run["gel"]:
            assert _finite(rec["alpha"])
            assert all(0.0 <= r <= 1.0 for r in rec["recall"] + rec["recall_before_ft"])
            assert 0.0 <= rec["accuracy"] <= 1.0
            assert abs(rec["realized_sparsity"] - rec["sparsity"]) < 1e-3
            assert rec["masks_enforced"]
        assert len(run["gel"]) == len(cfg["gel_ratios"])

    assert cfg["grad_batch_size"] == 128

    def alphas(crit, t):
        return np.array(
            [
                rec["alpha"]
                for run in res["runs"]
                for rec in run["pruned"]
                if rec["criterion"] == crit and rec["ratio"] == t
            ]
        )

    # the statistics recomputed from the raw per-model alphas with scipy
    for crit in cfg["criteria"]:
        for t in cfg["ratios"]:
            s = res["alpha"][f"{crit}@{t}"]
            ci = s["alpha_ci99"]
            a = alphas(crit, t)
            n = len(a)
            half = stats.t.ppf(0.995, n - 1) * a.std(ddof=1) / math.sqrt(n)
            assert ci["n"] == n == len(cfg["seeds"])
            assert ci["mean"] == pytest.approx(a.mean(), rel=1e-9)
            assert ci["low"] == pytest.approx(a.mean() - half, rel=1e-9, abs=1e-12)
            assert ci["high"] == pytest.approx(a.mean() + half, rel=1e-9, abs=1e-12)
            expected = "below" if ci["high"] < 1 else "above" if ci["low"] > 1 else "overlapping"
            assert s["position"] == expected
    m = len(res["consecutive_tests"])
    assert m == len(cfg["criteria"]) * (len(cfg["ratios"]) - 1)
    for rec in res["consecutive_tests"]:
        lo, hi = alphas(rec["criterion"], rec["from"]), alphas(rec["criterion"], rec["to"])
        p = stats.ttest_rel(hi, lo, alternative="greater").pvalue
        assert rec["mean_diff"] == pytest.approx((hi - lo).mean(), rel=1e-9, abs=1e-12)
        assert rec["p"] == pytest.approx(p, rel=1e-9)
        assert rec["p_bonferroni"] == pytest.approx(min(1.0, p * m), rel=1e-9)
    m = len(res["criteria_tests"])
    for rec in res["criteria_tests"]:
        a, b = alphas(rec["a"], rec["ratio"]), alphas(rec["b"], rec["ratio"])
        p = stats.ttest_rel(a, b).pvalue
        assert rec["mean_diff"] == pytest.approx((a - b).mean(), rel=1e-9, abs=1e-12)
        assert rec["p"] == pytest.approx(p, rel=1e-9)
        assert rec["p_bonferroni"] == pytest.approx(min(1.0, p * m), rel=1e-9)

    for rec in res["consecutive_tests"] + res["criteria_tests"]:
        _check_p(rec["p"])
        _check_p(rec["p_bonferroni"])
        if math.isfinite(rec["p"]):
            assert rec["p_bonferroni"] >= rec["p"]
    for gel in res["group_equalized"].values():
        _check_p(gel["p_two_sided"])
    for entry in res["tran"].values():
        for corr in entry.values():
            rho = corr["pooled"]["rho"]
            assert -1.0 <= rho <= 1.0
            assert corr["pooled"]["low"] <= rho <= corr["pooled"]["high"]
