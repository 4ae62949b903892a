"""End-to-end check of benchmarks/reproduce_recall_distortion.py in --quick mode."""

import json
import math
import subprocess
import sys
from pathlib import Path

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

    for crit in cfg["criteria"]:
        for t in cfg["ratios"]:
            s = res["alpha"][f"{crit}@{t}"]
            ci = s["alpha_ci99"]
            assert _finite(ci["mean"])
            assert ci["low"] <= ci["mean"] <= ci["high"]
            assert s["position"] in ("below", "overlapping", "above")

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
