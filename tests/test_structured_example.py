"""`examples/structured.py --fast`: the whole structured-pruning flow, run and checked.

References: the masked model for the compact one, `model_cost` of the compact model for the
recorded cost, the pruner's events for the monitor's records, and the offline W&B run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning_fairprune import model_cost

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_structured_example(tmp_path, monkeypatch):
    import structured as example
    from _wandb_reader import read_wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    result = example.main(["--fast", "--wandb", "--out", str(tmp_path)])
    pruning, monitor, compact_model = result["pruning"], result["monitor"], result["compact"]
    assert pruning.rounds_done == 3
    assert pruning.current_sparsity == 0.5  # layerwise: half the channels of every group
    assert result["difference"] <= 1e-4  # the compact model computes the masked model
    example_input = torch.zeros(1, 1, 28, 28)
    cost = model_cost(compact_model, example_input)
    assert pruning.history[-1]["cost"] == cost == result["costs"]["compact"]
    assert cost["params"] <= 0.30 * result["costs"]["dense"]["params"]
    # every monitor record carries the cost of the model it measured
    after = [r for r in monitor.history if r["moment"] == "after_round"]
    assert [r["flops"] for r in after] == [h["cost"]["flops"] for h in pruning.history]
    assert monitor.history[0]["flops"] == pruning.history[0]["previous_cost"]["flops"]
    assert monitor.history[-1]["moment"] == "end"
    # the end record measured the model as the last round left it
    assert monitor.history[-1]["flops"] == pruning.history[-1]["cost"]["flops"]
    # W&B offline: FLOPs and the worst group's accuracy, to plot one against the other
    run = read_wandb_run(next(tmp_path.rglob("wandb")))
    flops = [row["fairprune/flops"] for row in run.rows_with("fairprune/flops")]
    assert flops == [h["cost"]["flops"] for h in pruning.history]
    assert run.rows_with("fairprune/after_round/worst_group_accuracy")
    assert run.config["fairprune/pruning"]["structure"] == "channel"
    assert set(result["latency"]) == {64, 1}
