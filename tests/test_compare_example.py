"""`examples/compare_recipes.py --fast`: trains the recipes over paired seeds and compares them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lightning_fairprune.history import read_history

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_compare_recipes_example_fast(tmp_path, capsys):
    import compare_recipes as example

    result = example.main(["--fast", "--out", str(tmp_path)])
    comparison, run_dirs = result["comparison"], result["run_dirs"]
    labels = list(example.RECIPES)
    assert list(run_dirs) == labels
    assert [row["recipe"] for row in comparison.rows] == labels
    assert comparison.baseline == "plain"
    finals = {}
    for label in labels:
        assert len(run_dirs[label]) == 2  # two paired seeds
        for seed, run_dir in enumerate(run_dirs[label]):
            assert run_dir == tmp_path / label / f"seed_{seed}"
            (history,) = run_dir.rglob("fairprune_history*.jsonl")  # one history per run
            records = read_history(history)
            assert records[-1]["moment"] == "end"
            assert records[-1]["sparsity"] == pytest.approx(0.95, abs=1e-3)
            finals[label, seed] = records[-1]["group_accuracy"]
            dense = [r for r in records if r["moment"] == "dense"]
            finals[label, seed, "dense"] = (dense[0]["accuracy"], dense[0]["group_accuracy"])
    # paired: seed i of every recipe prunes the same dense model (the group losses start with
    # the first round); the recipes were really applied: they fine-tune to different models
    for seed in range(2):
        assert finals["plain", seed, "dense"] == finals["weighted", seed, "dense"]
        assert finals["plain", seed, "dense"] == finals["equalized", seed, "dense"]
        assert finals["plain", 0, "dense"] != finals["plain", 1, "dense"]
        assert finals["plain", seed] != finals["weighted", seed]
        assert finals["plain", seed] != finals["equalized", seed]
    # the table is printed and written with the figures
    out = capsys.readouterr().out
    table = comparison.table()
    assert table in out
    written = {p.name for p in result["written"]}
    assert {
        "compare.txt",
        "compare.json",
        "worst_group_accuracy_vs_accuracy.png",
        "worst_group_accuracy_vs_sparsity.png",
    } <= written
    saved = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(comparison.rows))
