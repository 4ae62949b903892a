"""`examples/compare_recipes.py --fast`: every recipe config through the LightningCLI, paired
seeds, compared (worst-group accuracy and max excess accuracy gap)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_fairprune import (
    ConstrainedGapLoss,
    GroupEqualizedLoss,
    GroupEqualizer,
    GroupWeightedLoss,
    inverse_frequency_weights,
)
from lightning_fairprune.history import read_history

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compare_recipes.py"])


def test_recipe_configs_are_found_plain_first():
    import compare_recipes as example

    found = example.recipes()
    assert next(iter(found)) == "plain"
    assert set(found) == {
        "plain",
        "weighted",
        "equalized",
        "constrained_gap",
        "constrained_gap_heldout",
    }
    with pytest.raises(SystemExit):
        example.main(["--recipes", "nope"])


def test_compare_recipes_example_fast(tmp_path, capsys):
    import compare_recipes as example

    result = example.main(["--fast", "--out", str(tmp_path)])
    run_dirs, models = result["run_dirs"], result["models"]
    labels = list(example.recipes())
    assert list(run_dirs) == labels
    finals = {}
    for label in labels:
        assert len(run_dirs[label]) == 2  # two paired seeds
        for seed, run_dir in enumerate(run_dirs[label]):
            assert run_dir == tmp_path / label / f"seed_{seed}"
            (history,) = run_dir.rglob("fairprune_history*.jsonl")  # one history per run
            records = read_history(history)
            assert records[-1]["moment"] == "end"
            assert records[-1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
            finals[label, seed] = records[-1]["group_accuracy"]
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert config["seed_everything"] == seed  # paired: seed i in every recipe
            assert config["data"]["init_args"]["seed"] == seed
            assert config["pruning"]["num_rounds"] == 2  # --fast
    # each recipe's loss, built from its YAML and driven as configured
    for seed in range(2):
        (model, trainer) = models["plain"][seed]
        assert model.group_loss is None
        model, trainer = models["weighted"][seed]
        assert isinstance(model.group_loss, GroupWeightedLoss)
        counts = torch.bincount(trainer.datamodule.train_set.tensors[1], minlength=10)
        assert torch.allclose(model.group_loss.multipliers, inverse_frequency_weights(counts))
        model, trainer = models["equalized"][seed]
        assert isinstance(model.group_loss, GroupEqualizedLoss)
        for label, heldout in (("constrained_gap", False), ("constrained_gap_heldout", True)):
            model, trainer = models[label][seed]
            assert isinstance(model.group_loss, ConstrainedGapLoss)
            assert model.group_loss.dense_reference() is not None
            (equalizer,) = [c for c in trainer.callbacks if isinstance(c, GroupEqualizer)]
            assert equalizer.heldout is heldout
            assert equalizer.num_dual_steps > 0
        for label in ("weighted", "equalized"):  # applied: a different model than plain's
            assert finals[label, seed] != finals["plain", seed]
    # both comparisons printed and written with their figures
    out = capsys.readouterr().out
    for metric, comparison in result["comparisons"].items():
        assert comparison.baseline == "plain"
        assert [row["recipe"] for row in comparison.rows] == labels
        assert comparison.table() in out
        folder = tmp_path / "compare" / metric
        assert {p.name for p in folder.iterdir()} >= {
            "compare.txt",
            "compare.json",
            f"{metric}_vs_accuracy.png",
            f"{metric}_vs_sparsity.png",
        }
        saved = json.loads((folder / "compare.json").read_text())
        assert saved["rows"] == json.loads(json.dumps(comparison.rows))
