"""`examples/protected_attribute.py` (real protected-attribute data, named intersectional
groups, W&B offline, ModelCheckpoint on a fairness metric), run quickly and checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fairlearn.metrics import MetricFrame, true_positive_rate
from sklearn.metrics import accuracy_score

from lightning_fairprune.history import read_history

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_protected_attribute_example(tmp_path, monkeypatch):
    import protected_attribute as example
    from _wandb_reader import read_wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    result = example.main(["--fast", "--wandb", "--out", str(tmp_path)])
    monitor, checkpoint, pruning = result["monitor"], result["checkpoint"], result["pruning"]
    names = [
        "colour=White & sex=Male",
        "colour=White & sex=Female",
        "colour=Black & sex=Male",
        "colour=Black & sex=Female",
    ]
    history = read_history(monitor.history_file)
    assert history == monitor.history
    assert all(r["group_names"] == names for r in history)
    # one dense epoch, then rounds spread over the rest (cubic, no num_rounds); the model is
    # pruned after training, never at step 0
    assert pruning.plan.event_points == [1, 2, 3]
    assert pruning.history[0]["global_step"] > 0
    assert history[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    # the kept checkpoint is the best measured epoch by worst-group accuracy
    periodic = [r for r in history if r["moment"] == "periodic"]
    best = max(periodic, key=lambda r: r["fairness"]["worst_group_accuracy"])
    assert checkpoint.best_model_score.item() == pytest.approx(
        best["fairness"]["worst_group_accuracy"], abs=1e-6
    )
    # the final record's numbers equal fairlearn's on the trained model's predictions
    data = example.load_data(0)["val"]
    model = result["trainer"].lightning_module.eval()
    with torch.no_grad():
        pred = model(data["x"]).argmax(1).numpy()
    groups = (data["colour"] * 2 + data["sex"]).numpy()
    y = data["y"].numpy()
    frame = MetricFrame(
        metrics={"accuracy": accuracy_score, "tpr": true_positive_rate},
        y_true=y,
        y_pred=pred,
        sensitive_features=groups,
    )
    final = history[-1]
    for g in range(4):
        assert final["group_accuracy"][g] == pytest.approx(frame.by_group.loc[g, "accuracy"])
        assert final["tpr"][g] == pytest.approx(frame.by_group.loc[g, "tpr"])
    # W&B offline: the run holds the named per-group keys and the callbacks' settings
    run = read_wandb_run(next(tmp_path.rglob("wandb")))
    assert run.rows_with("fairprune/group_accuracy/colour-Black_sex-Male")
    assert run.config["fairprune/pruning"]["schedule"] == "cubic"
    assert run.config["fairprune/monitor"]["group_key"] == ["colour", "sex"]
