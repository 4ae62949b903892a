"""Per-group gradient norms, Hutchinson traces and predicted excess loss vs exact autograd."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from lightning_fairprune.diagnostics import group_counts, group_recall
from lightning_fairprune.diagnostics.curvature import (
    group_gradient_norms,
    group_hessian_lambda_max,
    group_hessian_trace,
    measure_groups,
    predicted_excess_loss,
)

NUM_CLASSES = 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, NUM_CLASSES)).double()


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, NUM_CLASSES),
    ).double()
    # non-trivial running statistics, then leave the model in TRAIN mode on purpose
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
        model[1].weight.uniform_(0.5, 1.5)
    return model.train()


def _data(model_kind: str, n: int = 60, num_groups: int = 4, seed: int = 0, absent=()):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 4) if model_kind == "mlp" else (n, 1, 6, 6)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    present = torch.tensor([a for a in range(num_groups) if a not in absent])
    g = present[torch.randint(len(present), (n,), generator=gen)]
    return x, y, g


def _batches(x, y, g, batch_size):
    return [(x[s : s + batch_size], y[s : s + batch_size], g[s : s + batch_size])
            for s in range(0, len(y), batch_size)]  # fmt: skip


def _flat_params(model, names):
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in names])


def _group_loss_fn(model, names, x, y):
    """Mean CE of (x, y) as a function of the flat vector of the named parameters (eval)."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def fn(flat):
        parts = {n: v.view(s) for n, v, s in zip(names, flat.split(sizes), shapes, strict=True)}
        out = functional_call(model, parts, (x,), strict=False)
        return nn.functional.cross_entropy(out, y)

    return fn


def _exact(model, names, x, y, g, num_groups):
    """Per-group (grad, Hessian) of the group's mean loss by plain autograd / torch.func."""
    was = model.training
    model.eval()
    flat = _flat_params(model, names)
    out = {}
    for a in range(num_groups):
        sel = g == a
        if not bool(sel.any()):
            continue
        fn = _group_loss_fn(model, names, x[sel], y[sel])
        out[a] = (torch.func.grad(fn)(flat), hessian(fn)(flat))
    model.train(was)
    return out


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_gradient_norms_match_naive_per_group_loop(kind, chunk_size):
    model = _mlp() if kind == "mlp" else _cnn()
    x, y, g = _data(kind)
    names = [n for n, _ in model.named_parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)  # must survive untouched
    bn_state = {k: v.clone() for k, v in model.state_dict().items()}
    training = [m.training for m in model.modules()]

    res = group_gradient_norms(model, _batches(x, y, g, 16), 4, chunk_size=chunk_size)
    assert [m.training for m in model.modules()] == training
    for p in model.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.25))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, bn_state[k], rtol=0, atol=0)

    # naive reference: for each group, one autograd.grad of the mean loss over ALL its samples
    model.eval()
    for a in range(4):
        sel = g == a
        loss = nn.functional.cross_entropy(model(x[sel]), y[sel])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        ref = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in grads]))
        assert res.norms[a].item() == pytest.approx(ref.item(), rel=1e-10)
        assert res.counts[a].item() == int(sel.sum())
        assert res.mean_loss[a].item() == pytest.approx(loss.item(), rel=1e-10)
    assert names  # sanity of the fixture


def test_gradient_norms_selected_params_and_missing_group():
    model = _mlp()
    x, y, g = _data("mlp", absent=(2,))
    sel_names = ["2.weight"]
    frozen = dict(model.named_parameters())["2.weight"]
    frozen.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"group\(s\) \[2\] have no samples"):
        res = group_gradient_norms(model, _batches(x, y, g, 10), 4, params=sel_names)
    assert not frozen.requires_grad  # restored
    assert math.isnan(res.norms[2])
    assert res.counts[2] == 0
    exact = _exact(model, sel_names, x, y, g, 4)
    for a, (grad, _) in exact.items():
        assert res.norms[a].item() == pytest.approx(grad.norm().item(), rel=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hutchinson_standard_basis_equals_exact_trace(kind):
    model = _mlp() if kind == "mlp" else _cnn()
    x, y, g = _data(kind, n=30, num_groups=3)
    names = [n for n, _ in model.named_parameters()]
    size = sum(p.numel() for p in model.parameters())
    # sqrt(P) * standard basis: E[v vᵀ] = I as for Rademacher probes, and the mean over the P
    # probes is exactly Tr(H) (each probe value is P times a diagonal entry of H)
    basis = math.sqrt(size) * torch.eye(size, dtype=torch.float64)
    res = group_hessian_trace(model, _batches(x, y, g, 12), 3, probes=basis, chunk_size=9)
    exact = _exact(model, names, x, y, g, 3)
    for a, (_, hess) in exact.items():
        assert res.trace[a].item() == pytest.approx(torch.trace(hess).item(), abs=1e-5)
        torch.testing.assert_close(
            res.probe_values[a], size * torch.diagonal(hess), atol=1e-8, rtol=0
        )
    assert res.num_probes == size
    assert model.training  # both fixtures start in train mode: restored


def test_random_probe_estimate_within_four_standard_errors():
    model = _cnn()
    x, y, g = _data("cnn", n=40, num_groups=3)
    names = [n for n, _ in model.named_parameters()]
    res = group_hessian_trace(model, _batches(x, y, g, 20), 3, num_probes=32, seed=3)
    exact = _exact(model, names, x, y, g, 3)
    for a, (_, hess) in exact.items():
        err = abs(res.trace[a].item() - torch.trace(hess).item())
        assert res.stderr[a] > 0
        assert err <= 4 * res.stderr[a].item()
    # the same seed gives the same probes, whatever the chunking
    again = group_hessian_trace(model, _batches(x, y, g, 7), 3, num_probes=32, seed=3)
    torch.testing.assert_close(again.trace, res.trace, rtol=1e-10, atol=1e-12)


def test_tolerance_mode_adds_probes_and_power_iteration_finds_lambda_max():
    model = _mlp()
    x, y, g = _data("mlp", n=50, num_groups=2)
    names = [n for n, _ in model.named_parameters()]
    batches = _batches(x, y, g, 25)
    res = group_hessian_trace(
        model, batches, 2, num_probes=4, tolerance=0.2, max_probes=64, power_iterations=30
    )
    assert 4 < res.num_probes < 64
    assert res.num_probes % 4 == 0
    rel = res.stderr / res.trace.abs()
    assert bool((rel <= 0.2).all())
    # one pass fewer would not have met the tolerance
    fewer = group_hessian_trace(model, batches, 2, num_probes=res.num_probes - 4)
    assert bool((fewer.stderr / fewer.trace.abs() > 0.2).any())
    exact = _exact(model, names, x, y, g, 2)
    for a, (_, hess) in exact.items():
        eig = torch.linalg.eigvalsh(hess)
        top = eig[eig.abs().argmax()].item()
        assert res.lambda_max[a].item() == pytest.approx(top, rel=1e-3)
        assert abs(res.trace[a].item() - torch.trace(hess).item()) <= 4 * res.stderr[a].item()
    with pytest.raises(ValueError, match="re-iterable"):
        group_hessian_trace(model, iter(batches), 2, tolerance=0.1)


def test_predicted_excess_loss_matches_exact_taylor_terms():
    model = _cnn()
    x, y, g = _data("cnn", n=45, num_groups=3)
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(5)
    delta = {
        "0.weight": -named["0.weight"].detach() * (torch.rand(2, 1, 3, 3, generator=gen) < 0.5),
        "4.weight": 0.05 * torch.randn(3, 32, generator=gen, dtype=torch.float64),
    }
    res = predicted_excess_loss(model, _batches(x, y, g, 10), delta, 3, chunk_size=4)
    names = list(delta)
    exact = _exact(model, names, x, y, g, 3)
    d = torch.cat([delta[n].reshape(-1) for n in names])
    for a, (grad, hess) in exact.items():
        ref = grad @ d + 0.5 * d @ hess @ d
        assert res[a].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)


def test_measure_groups_one_pass_agrees_with_separate_functions():
    model = _cnn()
    x, y, g = _data("cnn", n=50, num_groups=4, absent=(1,))
    batches = _batches(x, y, g, 16)
    delta = {"4.weight": 0.01 * torch.ones(3, 32, dtype=torch.float64)}
    with pytest.warns(UserWarning, match=r"\[1\]"):
        m = measure_groups(model, batches, 4, NUM_CLASSES, num_probes=8, delta=delta, seed=2)
    with pytest.warns(UserWarning, match=r"\[1\]"):
        gn = group_gradient_norms(model, batches, 4)
    with pytest.warns(UserWarning, match=r"\[1\]"):
        ht = group_hessian_trace(model, batches, 4, num_probes=8, seed=2)
    with pytest.warns(UserWarning, match=r"\[1\]"):
        pe = predicted_excess_loss(model, batches, delta, 4, params=None)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    support, correct = group_counts(logits, y, g, num_groups=4, num_classes=NUM_CLASSES)
    torch.testing.assert_close(m.support, support, rtol=0, atol=0)
    torch.testing.assert_close(m.correct, correct, rtol=0, atol=0)
    torch.testing.assert_close(m.recall, group_recall(support, correct, warn=False), equal_nan=True)
    kw = dict(rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(m.grad_norms, gn.norms, **kw)
    torch.testing.assert_close(m.hessian_trace, ht.trace, **kw)
    torch.testing.assert_close(m.hessian_trace_stderr, ht.stderr, **kw)
    torch.testing.assert_close(m.predicted_excess_loss, pe, **kw)
    torch.testing.assert_close(m.mean_loss, gn.mean_loss, **kw)
    assert m.missing == [1]
    # cheap mode: no gradients at all, whole batches under no_grad
    with pytest.warns(UserWarning, match=r"\[1\]"):
        cheap = measure_groups(model, batches, 4, None, gradients=False)
    assert cheap.grad_norms is None
    assert cheap.hessian_trace is None
    torch.testing.assert_close(cheap.support, support, rtol=0, atol=0)
    torch.testing.assert_close(cheap.mean_loss, m.mean_loss, **kw)


def test_reduce_fn_two_shards_equal_single_process():
    """Simulated all-reduce: shard A's sums + shard B's sums == one process over all data."""
    model = _cnn()
    x, y, g = _data("cnn", n=64, num_groups=3)
    full = _batches(x, y, g, 16)
    shard_a, shard_b = full[0::2], full[1::2]  # like a DistributedSampler split
    delta = {"0.weight": 0.1 * torch.ones(2, 1, 3, 3, dtype=torch.float64)}
    kw = dict(num_probes=6, seed=4, delta=delta)

    recorded: list[torch.Tensor] = []
    measure_groups(
        model, shard_b, 3, NUM_CLASSES, reduce_fn=lambda t: recorded.append(t) or t, **kw
    )
    calls = iter(recorded)
    combined = measure_groups(
        model, shard_a, 3, NUM_CLASSES, reduce_fn=lambda t: t + next(calls), **kw
    )
    single = measure_groups(model, full, 3, NUM_CLASSES, **kw)
    tol = dict(rtol=1e-9, atol=1e-12)
    for field in ("support", "correct", "counts", "loss_sums", "recall", "grad_norms",
                  "hessian_trace", "hessian_trace_stderr", "predicted_excess_loss"):  # fmt: skip
        torch.testing.assert_close(getattr(combined, field), getattr(single, field), **tol)
    assert combined.accuracy == pytest.approx(single.accuracy)
    # same for the standalone functions
    rec2: list[torch.Tensor] = []
    group_gradient_norms(model, shard_b, 3, reduce_fn=lambda t: rec2.append(t) or t)
    it2 = iter(rec2)
    gn = group_gradient_norms(model, shard_a, 3, reduce_fn=lambda t: t + next(it2))
    torch.testing.assert_close(gn.norms, group_gradient_norms(model, full, 3).norms, **tol)


def _nan_model():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda m, b: group_gradient_norms(m, b, 2), ValueError, r"group ids in \[0, 2\)"),
        (lambda m, b: group_gradient_norms(m, [], 4), ValueError, "at least one batch"),
        (lambda m, b: group_gradient_norms(m, b, 4, params=[]), ValueError, "at least one param"),
        (lambda m, b: group_gradient_norms(m, b, 4, params=["nope"]), ValueError, "unknown"),
        (lambda m, b: group_gradient_norms(_nan_model(), b, 4), ValueError, "finite losses"),
        (lambda m, b: group_gradient_norms(m, [(b[0][0],)], 4), TypeError, "tuple"),
        (lambda m, b: group_hessian_trace(m, b, 4, num_probes=0), ValueError, "num_probes"),
        (lambda m, b: group_hessian_trace(m, b, 4, probes=torch.ones(2, 3)), ValueError, "probes"),
        (lambda m, b: predicted_excess_loss(m, b, {"x": torch.ones(1)}, 4), ValueError, "unknown"),
        (
            lambda m, b: predicted_excess_loss(m, b, {"0.weight": torch.ones(2)}, 4),
            ValueError,
            "shape",
        ),
        (
            lambda m, b: group_gradient_norms(m, [(b[0][0], -b[0][1], b[0][2])], 4),
            ValueError,
            "non-negative, but got ids from -",
        ),
        (
            lambda m, b: group_gradient_norms(m, [(b[0][0], b[0][1].double(), b[0][2])], 4),
            ValueError,
            "integer tensor of class labels",
        ),
        (
            lambda m, b: group_gradient_norms(m, [(b[0][0], b[0][1], b[0][2].double())], 4),
            ValueError,
            "integer tensor of group ids",
        ),
        (
            lambda m, b: measure_groups(m, [(b[0][0], b[0][1] + 3, b[0][2])], 4, 3),
            ValueError,
            r"class labels in \[0, 3\)",
        ),
    ],
)
def test_bad_input(call, exc, match):
    model = _mlp()
    x, y, g = _data("mlp", n=20)
    y = y.clone()
    y[0] = 1
    with pytest.raises(exc, match=match):
        call(model, _batches(x, y, g, 10))


def test_regrouper_emits_every_sample_once_in_pure_group_chunks():
    from lightning_fairprune.diagnostics._batching import Regrouper

    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(500)
    g = torch.randint(0, 7, (500,), generator=gen)
    reg = Regrouper(7, 16)
    chunks = []
    for s in range(0, 500, 16):
        chunks += list(reg.push({"x": ids[s : s + 16]}, ids[s : s + 16], g[s : s + 16]))
    chunks += list(reg.flush())
    seen = torch.cat([c[2] for c in chunks])
    assert sorted(seen.tolist()) == list(range(500))
    for a, x, y in chunks:
        torch.testing.assert_close(x["x"], y)
        assert bool((g[y] == a).all())
        assert 8 <= len(y) <= 24  # every group has >= 16 samples: no tiny remainder chunks


def test_float32_row_norms_match_float64_reference_in_blocks_and_beyond_range():
    from lightning_fairprune.diagnostics.passes import row_norms as _row_norms

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 5000, generator=gen)
    rows[1] *= 1e-20  # squares are float32 subnormals: recomputed in float64
    rows[3] *= 1e-12  # small but normal squares
    rows[2] *= 1e25  # squares overflow float32: recomputed in float64
    rows[4] = 0.0
    ref = torch.linalg.vector_norm(rows.double(), dim=1)
    for block in (1 << 22, 5000, 1):  # all rows at once, one row per block, block < a row
        out = _row_norms(rows, block_elems=block)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    assert _row_norms(rows[1:2]).item() == pytest.approx(ref[1].item(), rel=1e-12)


def test_group_hessian_lambda_max_matches_the_exact_top_eigenvalue():
    model = _mlp()
    x, y, g = _data("mlp", n=50, num_groups=2)
    names = [n for n, _ in model.named_parameters()]
    batches = _batches(x, y, g, 25)
    lam = group_hessian_lambda_max(model, batches, 2, iterations=30, seed=4)
    assert lam.dtype == torch.float64
    for a, (_, hess) in _exact(model, names, x, y, g, 2).items():
        eig = torch.linalg.eigvalsh(hess)
        assert lam[a].item() == pytest.approx(eig[eig.abs().argmax()].item(), rel=1e-3)
    # the same iteration as group_hessian_trace(power_iterations=...), bit for bit
    same = group_hessian_trace(model, batches, 2, num_probes=1, power_iterations=30, seed=4)
    assert torch.equal(lam, same.lambda_max)
    # an absent group is NaN (with a warning), not a number
    x3, y3, g3 = _data("mlp", n=50, num_groups=3, absent=(1,))
    with pytest.warns(UserWarning, match=r"group\(s\) \[1\]"):
        lam3 = group_hessian_lambda_max(model, _batches(x3, y3, g3, 25), 3, iterations=2)
    assert math.isnan(lam3[1].item())
    assert not math.isnan(lam3[0].item())
    with pytest.raises(ValueError, match="`iterations` to be an int >= 1, but got 0"):
        group_hessian_lambda_max(model, batches, 2, iterations=0)
    with pytest.raises(ValueError, match="re-iterable"):
        group_hessian_lambda_max(model, iter(batches), 2, iterations=3)
