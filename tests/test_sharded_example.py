"""`examples/sharded.py` (README "Sharded models"): a real 2-process ModelParallelStrategy run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _ddp import free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sharded.py"


def test_sharded_example_prunes_exactly_and_measures_on_shards(tmp_path):
    env = dict(os.environ)
    env["MASTER_ADDR"] = "127.0.0.1"
    env["MASTER_PORT"] = str(free_port())
    env.setdefault("TMPDIR", str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary_2.json").read_text())
    assert summary["world_size"] == 2
    assert summary["sparsity"] == pytest.approx(0.7, abs=1e-4)
    assert summary["moments"] == ["dense", "after_round", "before_round", "after_round", "end"]
    # measured on the shards: per-class gradient norms and (finite-difference) traces
    assert len(summary["grad_norm"]) == 10
    assert all(v is not None and math.isfinite(v) for v in summary["grad_norm"])
    assert all(v is not None and math.isfinite(v) for v in summary["hessian_trace"])
    assert len(summary["hessian_lambda_max"]) == 10
    assert all(v is not None and math.isfinite(v) for v in summary["hessian_lambda_max"])
    # both processes report the same global sparsity, from different local shards (each
    # process writes its own file: their stdout lines may interleave)
    ranks = [json.loads((tmp_path / f"rank{r}_of_2.json").read_text()) for r in (0, 1)]
    assert [r["sparsity"] for r in ranks] == [summary["sparsity"]] * 2
    assert ranks[0]["local"].keys() == ranks[1]["local"].keys()
    assert ranks[0]["local"] != ranks[1]["local"]
