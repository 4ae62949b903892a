from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lightning_fairprune.pruning.select as masks_mod
from lightning_fairprune.pruning import (
    MaskEnforcer,
    apply_masks,
    check_masks_fit,
    global_masks,
    layerwise_masks,
    load_masks,
    masks_from_state,
    masks_to_state,
    num_to_prune,
    realized_sparsity,
    save_masks,
    sparsity_report,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.pruning.select import full_masks


def reference_masks(scores, sparsity, current=None):
    """Naive reference: full stable sort of (abs score, flat index); pruned weights are -inf."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().abs().reshape(-1).double() for n in names])
    if current is not None:
        keep = torch.cat([current[n].reshape(-1) for n in names])
        flat[~keep] = -math.inf
    k = math.floor(sparsity * flat.numel() + 0.5)
    order = torch.sort(flat, stable=True).indices  # stable: equal scores keep index order
    kept = torch.ones(flat.numel(), dtype=torch.bool)
    kept[order[:k]] = False
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = kept[offset : offset + size].view(scores[n].shape)
        offset += size
    return out


def test_global_masks_by_hand():
    scores = {
        "a": torch.tensor([[0.9, 0.2], [0.4, 0.05]]),
        "b": torch.tensor([0.3, 0.8, 0.1]),
    }
    # sorted: 0.05(a3) 0.1(b2) 0.2(a1) 0.3(b0) 0.4(a2) 0.8(b1) 0.9(a0); 7 weights
    m = global_masks(scores, 3 / 7)
    assert m["a"].tolist() == [[True, False], [True, False]]
    assert m["b"].tolist() == [True, True, False]
    m = global_masks(scores, 5 / 7)
    assert m["a"].tolist() == [[True, False], [False, False]]
    assert m["b"].tolist() == [False, True, False]
    assert all(v.dtype == torch.bool for v in m.values())
    # negative scores are compared by absolute value
    m = global_masks({"a": -scores["a"], "b": scores["b"]}, 3 / 7)
    assert m["a"].tolist() == [[True, False], [True, False]]


def test_ties_broken_by_lowest_flat_index():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    m = global_masks(scores, 0.4)  # round(0.4 * 10) = 4: a's first 4 flat entries
    assert m["a"].tolist() == [[False, False, False], [False, True, True]]
    assert m["b"].tolist() == [True, True, True, True]
    m = global_masks(scores, 0.7)  # 7: all of a, first of b
    assert m["b"].tolist() == [False, True, True, True]
    # all-equal scores with a previous mask: pruned ones count first, then lowest index
    current = {
        "a": torch.ones(2, 3, dtype=torch.bool),
        "b": torch.tensor([True, False, True, True]),
    }
    m = global_masks(scores, 0.3, current)
    assert m["a"].tolist() == [[False, False, True], [True, True, True]]
    assert m["b"].tolist() == [True, False, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_global_masks_match_full_sort_reference(dtype, monkeypatch):
    monkeypatch.setattr(masks_mod, "_CHUNK", 5)  # exercise chunk boundaries
    gen = torch.Generator().manual_seed(1)
    for trial in range(12):
        shapes = [(3, 4), (7,), (2, 2, 3)]
        if trial % 3 == 0:  # many ties, zeros and negative values
            scores = {
                f"p{i}": torch.randint(-3, 4, s, generator=gen).to(dtype)
                for i, s in enumerate(shapes)
            }
        else:
            scores = {
                f"p{i}": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shapes)
            }
        if trial == 4:
            scores["p1"][2] = math.inf
        sparsity = float(torch.rand(1, generator=gen)) * 0.99
        current = None
        if trial % 2:
            current = reference_masks(scores, sparsity * float(torch.rand(1, generator=gen)))
        got = global_masks(scores, sparsity, current)
        expected = reference_masks(scores, sparsity, current)
        for name in scores:
            assert torch.equal(got[name], expected[name]), (trial, name)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.731, 0.9, 0.999])
def test_exact_realized_sparsity(sparsity):
    gen = torch.Generator().manual_seed(2)
    scores = {
        "conv": torch.randn(8, 3, 3, 3, generator=gen),
        "fc": torch.randn(50, 40, generator=gen),
        "tiny": torch.randn(3, generator=gen),
    }
    total = sum(s.numel() for s in scores.values())
    m = global_masks(scores, sparsity)
    pruned = sum(int((~v).sum()) for v in m.values())
    assert pruned == round(sparsity * total) == num_to_prune(sparsity, total)
    lw = layerwise_masks(scores, sparsity)
    for name, s in scores.items():
        assert int((~lw[name]).sum()) == math.floor(sparsity * s.numel() + 0.5)
        assert torch.equal(lw[name], reference_masks({name: s}, sparsity)[name])


def test_masks_only_shrink_across_rounds():
    gen = torch.Generator().manual_seed(3)
    w = {"a": torch.randn(20, 10, generator=gen), "b": torch.randn(30, generator=gen)}
    m1 = global_masks(w, 0.5)
    # weights change after fine-tuning: the pruned ones get large scores
    w2 = {n: torch.where(m1[n], t, torch.full_like(t, 100.0)) for n, t in w.items()}
    m2 = global_masks(w2, 0.7, m1)
    for n in w:
        assert not (m2[n] & ~m1[n]).any()  # nothing revived
    assert realized_sparsity(m2) == pytest.approx(num_to_prune(0.7, 230) / 230)
    assert torch.equal(m2["a"], reference_masks(w2, 0.7, m1)["a"])
    with pytest.warns(UserWarning, match="already pruned"):
        m3 = global_masks(w2, 0.2, m2)
    assert all(torch.equal(m3[n], m2[n]) for n in w)


def test_layerwise_by_hand_and_per_layer_targets():
    scores = {"a": torch.tensor([0.5, 0.1, 0.9, 0.2]), "b": torch.tensor([0.3, 0.1, 0.7])}
    m = layerwise_masks(scores, 0.5)  # a: 2, b: round(1.5) = 2
    assert m["a"].tolist() == [True, False, True, False]
    assert m["b"].tolist() == [False, False, True]
    m = layerwise_masks(scores, {"a": 0.25, "b": 0.0})
    assert m["a"].tolist() == [True, False, True, True]
    assert m["b"].tolist() == [True, True, True]
    with pytest.raises(ValueError, match="missing"):
        layerwise_masks(scores, {"a": 0.5})
    with pytest.raises(ValueError, match=r"sparsity\['b'\]"):
        layerwise_masks(scores, {"a": 0.5, "b": 1.0})


def test_mask_errors():
    scores = {"a": torch.tensor([0.5, float("nan")])}
    with pytest.raises(ValueError, match="'a' contains NaN"):
        global_masks(scores, 0.5)
    with pytest.raises(ValueError, match=r"Expected `sparsity` to be a float in \[0, 1\)"):
        global_masks({"a": torch.ones(2)}, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        global_masks({"a": torch.ones(2)}, -0.1)
    with pytest.raises(TypeError, match="floating"):
        global_masks({"a": torch.ones(2, dtype=torch.long)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        global_masks({"a": torch.ones(2)}, 0.5, {"a": torch.ones(3, dtype=torch.bool)})


def test_check_masks_fit_messages():
    params = {"fc.weight": torch.zeros(4, 3), "fc2.weight": torch.zeros(2)}
    good = full_masks(params)
    check_masks_fit(good, params)
    with pytest.raises(
        ValueError, match=r"mask of 'fc.weight' to have shape \(4, 3\), but got \(3, 4\)"
    ):
        check_masks_fit({**good, "fc.weight": torch.ones(3, 4, dtype=torch.bool)}, params)
    with pytest.raises(ValueError, match=r"missing=\['fc2.weight'\], unexpected=\['x'\]"):
        check_masks_fit({"fc.weight": good["fc.weight"], "x": good["fc2.weight"]}, params)
    with pytest.raises(ValueError, match=r"torch\.bool"):
        check_masks_fit({**good, "fc2.weight": torch.ones(2)}, params)


def test_apply_masks_in_place():
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, float("inf")]]))
    ptr = w.data_ptr()
    apply_masks({"w": w}, {"w": torch.tensor([[True, False], [True, False]])})
    assert w.data_ptr() == ptr
    assert w.detach().tolist() == [[1.0, 0.0], [3.0, 0.0]]
    assert w.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_apply_masks_equals_masked_fill_bit_for_bit(dtype, monkeypatch):
    import lightning_fairprune.pruning.enforce as masks_module

    monkeypatch.setattr(masks_module, "_AND_CHUNK", 7)  # chunk edges inside every tensor
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(5, 9, generator=gen) * 3).to(dtype)
    base[0, :3] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
    mask = torch.rand(5, 9, generator=gen) > 0.5
    mask[0, :3] = False
    ref = base.clone().masked_fill_(~mask, 0)
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[base.element_size()]
    for make in (lambda: base.clone(), lambda: base.t().clone().t()):  # contiguous or not
        w = nn.Parameter(make())
        apply_masks({"w": w}, {"w": mask})
        assert torch.equal(w.detach().view(int_dtype), ref.view(int_dtype))


def _train(opt_name, enforce, steps=50):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    m = global_masks({n: p.detach() for n, p in params.items()}, 0.6)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    # build up optimizer state before pruning, so momentum would revive pruned weights
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    apply_masks(params, m)
    enforcer = MaskEnforcer(opt, params, m) if enforce else None
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return params, m, enforcer, opt


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_mask_enforcer_keeps_pruned_weights_zero(opt_name):
    params, m, enforcer, _ = _train(opt_name, enforce=True)
    for n, p in params.items():
        assert (p.detach()[~m[n]] == 0).all()
        assert (p.detach()[m[n]] != 0).all()
    # without the enforcer the pruned weights move away from zero (the test can fail)
    params, m, _, _ = _train(opt_name, enforce=False)
    assert any((p.detach()[~m[n]] != 0).any() for n, p in params.items())
    # remove() stops enforcing
    params, m, enforcer, opt = _train(opt_name, enforce=True, steps=1)
    enforcer.remove()
    assert not enforcer.active
    for p in params.values():
        p.grad = torch.ones_like(p)
    opt.step()
    assert any((p.detach()[~m[n]] != 0).any() for n, p in params.items())


def test_mask_enforcer_update():
    w = nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    enf = MaskEnforcer(opt, {"w": w}, full_masks({"w": w}))
    w.grad = torch.ones(4)
    opt.step()
    assert (w.detach() != 0).all()
    enf.update({"w": torch.tensor([True, False, False, True])})
    opt.step()
    assert w.detach().tolist() == pytest.approx([0.8, 0.0, 0.0, 0.8])
    with pytest.raises(ValueError, match="shape"):
        enf.update({"w": torch.ones(3, dtype=torch.bool)})


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_zero_pruned_optimizer_state(opt_name):
    params, m, _, opt = _train(opt_name, enforce=True, steps=2)
    keys = ["momentum_buffer"] if opt_name == "sgd" else ["exp_avg", "exp_avg_sq"]
    for n, p in params.items():
        for key in keys:
            assert (opt.state[p][key][~m[n]] != 0).any()
    before = {n: {k: opt.state[p][k].clone() for k in keys} for n, p in params.items()}
    touched = zero_pruned_optimizer_state(opt, params, m)
    assert touched == len(keys) * len(params)
    for n, p in params.items():
        for key in keys:
            state = opt.state[p][key]
            assert (state[~m[n]] == 0).all()
            assert torch.equal(state[m[n]], before[n][key][m[n]])


def test_sparsity_report_by_hand():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # 12+3+6+2 = 23
    masks = {
        "0.weight": torch.tensor([[True, False, False, False]] * 3),  # 9 of 12 pruned
        "2.weight": torch.tensor([[True, True, False], [True, True, True]]),  # 1 of 6
    }
    report = sparsity_report(model, masks)
    assert report["layers"]["0.weight"] == {"zeros": 9, "total": 12, "sparsity": 0.75}
    assert report["layers"]["2.weight"] == {"zeros": 1, "total": 6, "sparsity": 1 / 6}
    assert report["zeros"] == 10
    assert report["total"] == 18
    assert report["sparsity"] == pytest.approx(10 / 18)
    assert report["model_total"] == 23
    assert report["model_zeros"] == 10
    assert report["model_sparsity"] == pytest.approx(10 / 23)
    assert report["compression_ratio"] == pytest.approx(23 / 13)
    # without masks: exact zeros of every parameter
    with torch.no_grad():
        model[0].weight.zero_()
        model[2].bias.zero_()
    report = sparsity_report(model)
    assert set(report["layers"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert report["layers"]["0.weight"]["zeros"] == 12
    assert report["model_zeros"] == 14
    assert report["compression_ratio"] == pytest.approx(23 / 9)
    with pytest.raises(ValueError, match="nope"):
        sparsity_report(model, {"nope": torch.ones(1, dtype=torch.bool)})


def test_save_load_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(4)
    m = global_masks(
        {"a.weight": torch.randn(5, 4, generator=gen), "b": torch.randn(3, generator=gen)}, 0.5
    )
    path = tmp_path / "masks.pt"
    save_masks(m, path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(m)
    loaded = load_masks(path)
    for n in m:
        assert loaded[n].dtype == torch.bool
        assert torch.equal(loaded[n], m[n])
    # the checkpoint form: packed 1 bit per weight (numpy.packbits layout), restored bitwise
    state = masks_to_state(m)
    assert state["a.weight"]["shape"] == [5, 4]
    assert state["b"]["bits"].numel() == 1
    flat = m["a.weight"].reshape(-1).numpy()
    assert state["a.weight"]["bits"].tolist() == np.packbits(flat).tolist()
    restored = masks_from_state(state)
    assert all(torch.equal(restored[n], m[n]) for n in m)
    with pytest.raises(ValueError, match="mask state of 'b'"):
        masks_from_state({"b": m["b"]})
    torch.save({"a": torch.ones(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bool tensors"):
        load_masks(tmp_path / "bad.pt")


def test_two_rounds_match_torch_prune_global_unstructured():
    from torch.nn.utils import prune

    torch.manual_seed(5)
    ours = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10))
    theirs = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10))
    theirs.load_state_dict(ours.state_dict())
    params = {"0.weight": ours[0].weight, "1.weight": ours[1].weight}
    masks, previous = None, 0.0
    for target in (0.5, 0.8):
        masks = global_masks({n: p.detach() for n, p in params.items()}, target, masks)
        apply_masks(params, masks)
        prune.global_unstructured(
            [(theirs[0], "weight"), (theirs[1], "weight")],
            pruning_method=prune.L1Unstructured,
            amount=(target - previous) / (1 - previous),
        )
        previous = target
        assert torch.equal(theirs[0].weight_mask.bool(), masks["0.weight"])
        assert torch.equal(theirs[1].weight_mask.bool(), masks["1.weight"])
        assert torch.equal(theirs[1].weight, ours[1].weight)
