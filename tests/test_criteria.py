from __future__ import annotations

import pytest
import torch

from lightning_fairprune.pruning.criteria import (
    CRITERIA,
    compute_scores,
    gradient_scores,
    magnitude_scores,
    random_scores,
    undecayed_scores,
)
from lightning_fairprune.pruning.select import global_masks

W = {
    "a": torch.tensor([[1.0, -2.0], [0.5, -0.25]]),
    "b": torch.tensor([3.0, -0.1, 0.0]),
}
G = {
    "a": torch.tensor([[0.5, 0.25], [-4.0, 2.0]]),
    "b": torch.tensor([0.01, 10.0, 5.0]),
}


def test_magnitude_by_hand():
    s = magnitude_scores(W)
    assert s["a"].tolist() == [[1.0, 2.0], [0.5, 0.25]]
    assert s["b"].tolist() == pytest.approx([3.0, 0.1, 0.0])
    # no-copy variant returns the (detached) weights themselves
    assert magnitude_scores(W, copy=False)["a"].data_ptr() == W["a"].data_ptr()


def test_gradient_by_hand():
    s = gradient_scores(W, G)
    # |θ g|: 0.5, 0.5, 2.0, 0.5 ; 0.03, 1.0, 0.0
    assert s["a"].tolist() == [[0.5, 0.5], [2.0, 0.5]]
    assert s["b"].tolist() == pytest.approx([0.03, 1.0, 0.0])


def test_undecayed_by_hand_with_decay():
    eps = 0.5
    s = undecayed_scores(W, G, eps)
    # |-θ g + ε θ²|
    # a: -0.5+0.5=0 ; 0.5+2.0=2.5 ; 2.0+0.125=2.125 ; 0.5+0.03125=0.53125
    # b: -0.03+4.5=4.47 ; 1.0+0.005=1.005 ; 0
    assert s["a"].flatten().tolist() == pytest.approx([0.0, 2.5, 2.125, 0.53125])
    assert s["b"].tolist() == pytest.approx([4.47, 1.005, 0.0])
    # differs from the gradient criterion, and changes which weights are pruned
    assert not torch.allclose(s["a"], gradient_scores(W, G)["a"])
    m_up = global_masks(s, 3 / 7)
    m_gp = global_masks(gradient_scores(W, G), 3 / 7)
    assert not all(torch.equal(m_up[n], m_gp[n]) for n in W)


def test_undecayed_without_decay_equals_gradient():
    s0 = undecayed_scores(W, G, 0.0)
    sg = gradient_scores(W, G)
    for name in W:
        assert torch.equal(s0[name], sg[name])


def test_undecayed_per_parameter_decay():
    s = undecayed_scores(W, G, {"a": 0.0, "b": 0.5})
    assert torch.equal(s["a"], gradient_scores(W, G)["a"])
    assert s["b"].tolist() == pytest.approx([4.47, 1.005, 0.0])
    with pytest.raises(ValueError, match="weight_decay"):
        undecayed_scores(W, G, {"a": 0.1})
    with pytest.raises(ValueError, match="weight_decay"):
        undecayed_scores(W, G, -1.0)


def test_random_seeded_reproducible_and_distinct():
    a = random_scores(W, seed=3)
    b = random_scores(W, seed=3)
    c = random_scores(W, seed=4)
    for name in W:
        assert torch.equal(a[name], b[name])
        assert a[name].shape == W[name].shape
        assert ((a[name] >= 0) & (a[name] < 1)).all()
    assert not torch.equal(a["a"], c["a"])
    # independent of the global RNG state
    torch.manual_seed(123)
    assert torch.equal(random_scores(W, seed=3)["b"], a["b"])


def test_compute_scores_registry_and_callable():
    builtin = {"magnitude", "gradient", "undecayed", "random"}
    fair = {"fairgrape", "fairprune", "worst_group"}
    assert builtin | fair <= set(CRITERIA)
    assert {n for n in builtin if CRITERIA[n].needs_gradients} == {"gradient", "undecayed"}
    assert {n for n in builtin | fair if CRITERIA[n].needs_group_statistics} == fair
    assert not any(CRITERIA[n].supports_sharding for n in fair)
    assert torch.equal(compute_scores("magnitude", W)["a"], W["a"].abs())
    assert torch.equal(compute_scores("gradient", W, G)["b"], gradient_scores(W, G)["b"])
    assert torch.equal(
        compute_scores("undecayed", W, G, weight_decay=0.5)["a"], undecayed_scores(W, G, 0.5)["a"]
    )
    assert torch.equal(compute_scores("random", W, seed=7)["a"], random_scores(W, 7)["a"])

    def squares(params, grads):
        return {n: p**2 for n, p in params.items()}

    assert torch.equal(compute_scores(squares, W)["a"], W["a"] ** 2)


def test_compute_scores_errors():
    with pytest.raises(ValueError, match="Expected `criterion` to be one of"):
        compute_scores("hessian", W)
    with pytest.raises(ValueError, match="grads"):
        compute_scores("gradient", W)
    with pytest.raises(ValueError, match="'b'"):
        gradient_scores(W, {"a": G["a"]})
    with pytest.raises(ValueError, match="shape"):
        gradient_scores(W, {"a": G["a"], "b": torch.zeros(2)})
    with pytest.raises(ValueError, match="missing"):
        compute_scores(lambda p, g: {"a": p["a"]}, W)
    with pytest.raises(ValueError, match="shape"):
        compute_scores(lambda p, g: {n: torch.zeros(1) for n in p}, W)
    with pytest.raises(TypeError, match="floating"):
        compute_scores(
            lambda p, g: {n: torch.zeros(t.shape, dtype=torch.long) for n, t in p.items()}, W
        )
    with pytest.raises(TypeError, match="criterion"):
        compute_scores(42, W)  # type: ignore[arg-type]
