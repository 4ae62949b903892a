"""benchmarks/structured_fairness.py: its FLOPs accounting against references, and a quick run."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import structured_fairness as study

from lightning_fairprune import compact, model_cost
from lightning_fairprune.history import read_history


def test_layer_flops_sum_to_the_flop_counter_and_sparse_kernels_scale_pruned_layers():
    net = study.Net()
    x = torch.randn(1, 1, 28, 28)
    flops = study.layer_flops(net, x)
    assert sum(flops.values()) == model_cost(net, x)["flops"]
    # a naive count of one layer: 2 x output elements x (in_channels x 3 x 3)
    out = net.stem(x)
    assert flops["stem.0.weight"] == 2 * out.numel() * 1 * 3 * 3
    pruned = ["stem.0.weight", "blocks.0.conv1.weight"]
    expected = sum(flops.values()) - 0.75 * (flops[pruned[0]] + flops[pruned[1]])
    assert study.sparse_kernel_flops(flops, pruned, 0.75) == pytest.approx(expected)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("chw")
    return study.main(["--quick", "--out", str(out)])


def test_quick_study_pairs_seeds_and_reads_flops_from_the_compact_model(quick):
    runs = quick["runs"]
    assert sorted(r["seed"] for r in runs) == [0, 1]
    run = runs[0]
    # the weight arm prunes every layer to the same density (the sparse-kernel FLOPs assume it)
    weight = run["weight"]
    for name, density in weight["density"].items():
        assert density == pytest.approx(1 - weight["sparsity"], abs=0.02), name
    # the channel arm's FLOPs are those of the compact model: rebuild it from the last record
    records = read_history(run["channel"]["history"])
    end = [r for r in records if r["moment"] == "end"][-1]
    curve = study.flops_curve(run, "channel", study.METRIC)
    assert curve.sparsity[-1] == pytest.approx(1 - end["flops"] / run["dense_flops"])
    assert end["flops"] < run["dense_flops"]
    # ... and the weight arm's at its end equal the sparse-kernel count of its real densities
    wcurve = study.flops_curve(run, "weight", study.METRIC)
    real = sum(f * weight["density"].get(name, 1.0) for name, f in run["layer_flops"].items())
    assert 1 - wcurve.sparsity[-1] == pytest.approx(real / run["dense_flops"], abs=0.01)
    assert wcurve.value[-1] == pytest.approx(
        [r for r in read_history(weight["history"]) if r["moment"] == "end"][-1]["fairness"][
            "worst_group_accuracy"
        ]
    )


def test_quick_study_matches_flops_by_interpolation_and_accuracy_via_compare_recipes(quick):
    res = quick["analysis"]["thickness"]
    assert res["seeds"] == 2
    assert res["arms"] == list(study.ARMS)
    assert [(p["cand"], p["base"]) for p in res["pairs"]] == list(study.PAIRS)
    runs = sorted(quick["runs"], key=lambda r: r["seed"])
    # every arm of a seed starts from the same dense model: identical dense records
    for run in runs:
        dense = [
            next(r for r in read_history(run[arm]["history"]) if r["moment"] == "dense")
            for arm in study.ARMS
        ]
        assert len({(d["accuracy"], d["fairness"]["worst_group_accuracy"]) for d in dense}) == 1
    pair = res["pairs"][0]
    for row in pair["flops"]:
        if row.get("missing"):
            continue
        # a naive reference: linear interpolation in FLOPs removed, per seed, then the mean
        for key, arm in (("cand", pair["cand"]), ("base", pair["base"])):
            values = []
            for run in runs:
                c = study.flops_curve(run, arm, study.METRIC)
                target = 1 - row["flops"]
                points = list(zip(c.sparsity, c.value, strict=True))
                for (x0, y0), (x1, y1) in itertools.pairwise(points):
                    if x0 <= target <= x1:
                        values.append(y0 + (y1 - y0) * (target - x0) / (x1 - x0))
                        break
            assert row["value"][key] == pytest.approx(sum(values) / len(values))
    assert [r["recipe"] for r in pair["accuracy"]["rows"]][:1] == ["weight"]
    assert "channel" in pair["accuracy"]["table"]


def test_compact_model_of_the_study_net_computes_the_masked_one():
    from lightning_fairprune import IterativePruning

    torch.manual_seed(0)
    net = study.Net().eval()
    x = torch.randn(4, 1, 28, 28)
    pruning = IterativePruning(0.5, structure="channel", scope="layerwise", example_input=x[:1])
    pruning.prune_now(None, net, 0.5)
    small = compact(net, x[:1], masks=pruning.masks).eval()
    with torch.no_grad():
        assert float((small(x) - net(x)).abs().max()) <= 1e-4
    assert model_cost(small, x[:1])["flops"] < model_cost(net, x[:1])["flops"]
