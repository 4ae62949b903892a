"""Finite-difference curvature on FSDP2-sharded models against exact Hessians.

The sharded runs live in ``fsdp_hvp_script.py`` (2 gloo CPU processes); the references are
exact per-group Hessians from `torch.func.hessian` on the gathered float64 model and the union
of both processes' data, and the double-backward backend with the same probes. On one process
the FSDP2 backend runs on plain parameters with ``FiniteDifference(force=True)``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _ddp import run_ddp
from torch import nn
from torch.func import functional_call, grad, hessian

from lightning_fairprune.diagnostics import (
    FiniteDifference,
    group_directional,
    group_hessian_lambda_max,
    group_hessian_trace,
    local_rademacher_probes,
    predicted_excess_loss,
    rademacher_probes,
)

HERE = Path(__file__).parent
FD = FiniteDifference(force=True)  # the FSDP2 backend (central differences) on plain parameters


def fd(**kw) -> FiniteDifference:
    return FiniteDifference(force=True, **kw)


def _exact(model: nn.Module, batches, names: list[str], num_groups: int, loss=None):
    """Per group: the gradient and Hessian of the mean loss over the flat selected params."""
    loss = loss or (lambda out, y: nn.functional.cross_entropy(out, y))
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    flat0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    g = torch.cat([b[2] for b in batches])
    out = []
    for a in range(num_groups):
        keep = g == a

        def f(flat: torch.Tensor, keep: torch.Tensor = keep) -> torch.Tensor:
            parts = dict(zip(names, flat.split([s.numel() for s in shapes]), strict=True))
            params = {n: parts[n].view(s) for n, s in zip(names, shapes, strict=True)}
            return loss(functional_call(model, params, (x[keep],)), y[keep])

        out.append((grad(f)(flat0), hessian(f)(flat0)))
    return out


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batches = [
        (torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,)), torch.arange(n) % 2)
        for n in (6, 5)
    ]
    return model, batches


def test_probe_offsets_equal_unsharded_slices() -> None:
    full = rademacher_probes(4, 30, seed=7, dtype=torch.float64)
    for offset, size in ((0, 30), (13, 10), (29, 1), (5, 0)):
        part = rademacher_probes(4, size, seed=7, offset=offset, dtype=torch.float64)
        assert torch.equal(part, full[:, offset : offset + size])
    assert torch.equal(rademacher_probes(2, 7, seed=7, start=2, offset=3), full[2:, 3:10].float())
    # past 2**32 elements: a slice does not depend on where the call starts or ends
    edge = 2**32 - 3
    across = rademacher_probes(2, 6, seed=1, offset=edge)
    assert torch.equal(across[:, :3], rademacher_probes(2, 3, seed=1, offset=edge))
    assert torch.equal(across[:, 3:], rademacher_probes(2, 3, seed=1, offset=2**32))
    assert not torch.equal(across[:, 3:], rademacher_probes(2, 3, seed=1))  # high bits count
    with pytest.raises(ValueError, match="Expected `offset` to be an int >= 0"):
        rademacher_probes(1, 3, offset=-1)


def test_local_probes_concatenate_to_the_flat_probe() -> None:
    model, _ = _tiny()
    named = list(model.named_parameters())
    parts = local_rademacher_probes(named, 2, seed=4)
    size = sum(p.numel() for _, p in named)
    ref = rademacher_probes(3, size, seed=4, dtype=torch.float64)[2]
    assert torch.equal(torch.cat([t.flatten() for t in parts]), ref)
    assert [t.shape for t in parts] == [p.shape for _, p in named]


def test_single_process_trace_and_predicted_equal_exact_hessians() -> None:
    model, batches = _tiny()
    names = [n for n, _ in model.named_parameters()]
    exact = _exact(model, batches, names, 2)
    size = sum(p.numel() for p in model.parameters())
    probes = rademacher_probes(3, size, seed=2, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    res = group_hessian_trace(
        model, batches, 2, num_probes=3, seed=2, chunk_size=3, finite_difference=FD
    )
    ref = torch.stack([torch.einsum("kp,pq,kq->k", probes, h, probes) for _, h in exact])
    assert torch.allclose(res.probe_values, ref, rtol=1e-6, atol=0)
    assert torch.allclose(res.trace, ref.mean(1), rtol=1e-6)
    assert torch.allclose(res.stderr, ref.std(1) / math.sqrt(3), rtol=1e-4)
    assert res.lambda_max is None
    assert res.counts.tolist() == [6.0, 5.0]
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    # predicted excess loss for a pruning-like step on one layer
    delta = {"0.weight": -model[0].weight.detach() * (model[0].weight.detach().abs() < 0.3)}
    flat = torch.cat(
        [delta.get(n, torch.zeros_like(p)).reshape(-1) for n, p in model.named_parameters()]
    )
    pred = predicted_excess_loss(model, batches, delta, 2, finite_difference=FD)
    want = torch.stack([gr @ flat + 0.5 * flat @ h @ flat for gr, h in exact])
    assert torch.allclose(pred, want, rtol=1e-6, atol=1e-12)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_quadratic_loss_is_exact_for_any_step() -> None:
    torch.manual_seed(1)
    model = nn.Linear(3, 1).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, dtype=torch.float64)
    batches = [(x, y, torch.arange(10) % 2)]

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (out.squeeze(1) - t) ** 2

    names = ["weight", "bias"]
    exact = _exact(model, batches, names, 2, loss=lambda o, t: loss(o, t).mean())
    d = {"weight": torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)}
    res = group_directional(
        model, batches, 2, d, params=names, loss_fn=loss, finite_difference=fd(eps=0.5)
    )
    flat = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    quad = torch.stack([flat @ h @ flat for _, h in exact])
    lin = torch.stack([gr @ flat for gr, _ in exact])
    assert torch.allclose(res.quadratic[:, 0], quad, rtol=1e-10)
    assert torch.allclose(res.linear[:, 0], lin, rtol=1e-10)
    norm_theta = torch.cat([model.weight.detach().flatten(), model.bias.detach()]).norm()
    assert float(res.eps[0]) == pytest.approx(0.5 * float(norm_theta) / float(flat.norm()))


def test_directional_validation() -> None:
    model, batches = _tiny()
    w = torch.ones(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Expected `eps` to be None or a float in \(0, 1\)"):
        FiniteDifference(eps=2.0)
    with pytest.raises(ValueError, match=r"Expected `directions\['0.weight'\]` to have the shape"):
        group_directional(model, batches, 2, {"0.weight": torch.ones(3)}, finite_difference=FD)
    with pytest.raises(ValueError, match="Expected the keys of `directions`"):
        group_directional(model, batches, 2, {"0.weight": w}, params=["2.weight"])
    with pytest.raises(TypeError, match="Expected `directions` to be a mapping"):
        group_directional(model, batches, 2, [], finite_difference=FD)
    with pytest.raises(ValueError, match="Expected `num_probes` to be an int >= 1"):
        group_hessian_trace(model, batches, 2, num_probes=0, finite_difference=FD)
    with pytest.raises(ValueError, match="Expected `probes` to be None"):
        group_hessian_trace(model, batches, 2, probes=torch.ones(2, 53), finite_difference=FD)
    with pytest.raises(TypeError, match="Expected `finite_difference` to be None or a"):
        group_hessian_trace(model, batches, 2, finite_difference={"force": True})


def _as_batches(rows):
    return [
        (torch.tensor(x, dtype=torch.float64), torch.tensor(y), torch.tensor(g)) for x, y, g in rows
    ]


def test_fsdp_curvature_equals_exact_hessians(tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE))
    from fsdp_diag_script import GROUPS, core_model
    from fsdp_hvp_script import LAMBDA_ITERATIONS, PROBES, SEED, conv_model

    ranks = run_ddp(HERE / "fsdp_hvp_script.py", tmp_path, "core", timeout=240)
    first, second = ranks
    model = core_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.tensor(first["full"][n], dtype=torch.float64))
    union = _as_batches(first["batches"]) + _as_batches(second["batches"])
    names = first["names"]
    named = dict(model.named_parameters())
    exact = _exact(model, union, names, GROUPS)
    size = sum(named[n].numel() for n in names)
    probes = rademacher_probes(PROBES, size, seed=SEED, dtype=torch.float64)
    values = torch.stack([torch.einsum("kp,pq,kq->k", probes, h, probes) for _, h in exact])
    delta = {n: torch.tensor(v, dtype=torch.float64) for n, v in first["delta"].items()}
    flat = torch.cat([delta[n].reshape(-1) for n in names])
    lin = torch.stack([gr @ flat for gr, _ in exact])
    quad = torch.stack([flat @ h @ flat for _, h in exact])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_trace = group_hessian_trace(model, union, GROUPS, num_probes=PROBES, seed=SEED,
                                        params=names)  # fmt: skip
        ref_all = group_hessian_trace(model, union, GROUPS, num_probes=2)
        ref_pred = predicted_excess_loss(model, union, delta, GROUPS)
        ref_lam = group_hessian_lambda_max(
            model, union, GROUPS, iterations=LAMBDA_ITERATIONS, seed=SEED, params=names
        )
    # the references agree with each other (double backward vs torch.func)
    assert torch.allclose(ref_trace.probe_values, values, rtol=1e-10)
    assert torch.allclose(ref_pred, lin + 0.5 * quad, rtol=1e-10)
    assert first["delta"] == second["delta"]
    for r in ranks:
        assert r["restored"]
        assert r["lambda_max"] is None
        assert r["counts"] == ref_trace.counts.tolist()
        got = torch.tensor(r["probe_values"], dtype=torch.float64)
        assert torch.allclose(got, values, rtol=1e-6, atol=0)
        assert r["trace"] == pytest.approx(values.mean(1).tolist(), rel=1e-6)
        assert r["stderr"] == pytest.approx(ref_trace.stderr.tolist(), rel=1e-4)
        all_values = torch.tensor(r["trace_all"], dtype=torch.float64)
        assert torch.allclose(all_values, ref_all.probe_values, rtol=1e-6, atol=0)
        assert r["predicted"] == pytest.approx((lin + 0.5 * quad).tolist(), rel=1e-6)
        linear = torch.tensor(r["linear"], dtype=torch.float64)
        quadratic = torch.tensor(r["quadratic"], dtype=torch.float64)
        assert torch.allclose(linear, torch.stack([lin, 0.5 * lin], 1), rtol=1e-6)
        assert torch.allclose(quadratic, torch.stack([quad, 0.25 * quad], 1), rtol=1e-6)
        assert r["lambda_max_power"] == pytest.approx(ref_lam.tolist(), rel=1e-6)
    # each rank's probe slices are the unsharded probe's columns at its shard's offset
    sizes = [named[n].numel() for n in names]
    full_parts = rademacher_probes(2, size, seed=SEED, dtype=torch.float64)[1].split(sizes)
    for r in ranks:
        for part, ref, off in zip(r["probe_parts"][0], full_parts, r["offsets"], strict=True):
            assert part == ref[off : off + len(part)].tolist()
    assert first["offsets"] != second["offsets"]
    # float32 CNN (ReLU, in-place ReLU, max pooling), frozen gates, against double backward
    # on a float64 copy of the gathered weights and both processes' data
    conv = conv_model().double()
    with torch.no_grad():
        for n, p in conv.named_parameters():
            p.copy_(torch.tensor(first["conv"]["full"][n], dtype=torch.float64))
    cunion = _as_batches(first["conv"]["batches"]) + _as_batches(second["conv"]["batches"])
    cdelta = {n: torch.tensor(v, dtype=torch.float64) for n, v in first["conv"]["delta"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c_trace = group_hessian_trace(conv, cunion, 3, num_probes=PROBES, seed=SEED)
        c_pred = predicted_excess_loss(conv, cunion, cdelta, 3)
        c_lam = group_hessian_lambda_max(conv, cunion, 3, iterations=LAMBDA_ITERATIONS, seed=SEED)
    for r in ranks:
        got = torch.tensor(r["conv"]["probe_values"], dtype=torch.float64)
        assert torch.allclose(got, c_trace.probe_values, rtol=1e-2, atol=0), (got, c_trace)
        assert r["conv"]["predicted"] == pytest.approx(c_pred.tolist(), rel=1e-2)
        assert r["conv"]["lambda_max"] == pytest.approx(c_lam.tolist(), rel=1e-2)
        # gates recomputed per chunk (gate_memory=0) equal the stored ones bit for bit
        assert r["conv"]["modes"] == ["stored", "per_chunk"]
        assert r["conv"]["per_chunk_equal"] == dict.fromkeys(
            ("probe_values", "predicted", "lambda_max", "linear", "quadratic"), True
        )


def _close(a, b, rel: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, rel=rel, abs=1e-9)


def test_monitor_trace_under_model_parallel_strategy(tmp_path: Path) -> None:
    ranks = run_ddp(HERE / "fsdp_hvp_script.py", tmp_path, "fsdp", timeout=400)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "fsdp_hvp_script.py"), str(tmp_path), "single"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = json.loads((tmp_path / "single.json").read_text())
    moments = [r["moment"] for r in single["records"]]
    assert moments == ["dense", "after_round", "before_round", "after_round", "end"]
    assert single["warnings"] == []
    for r in ranks:
        assert r["warnings"] == []  # λ_max is measured under FSDP2 too
        for rec, ref in zip(r["records"], single["records"], strict=True):
            assert rec["moment"] == ref["moment"]
            assert rec["support"] == ref["support"]
            assert _close(rec["grad_norm"], ref["grad_norm"], rel=1e-8)
            assert ref["hessian_trace"] is not None
            assert _close(rec["hessian_trace"], ref["hessian_trace"], rel=1e-6), rec["moment"]
            assert _close(rec["hessian_trace_se"], ref["hessian_trace_se"], rel=1e-4)
            assert _close(rec["predicted_excess_loss"], ref["predicted_excess_loss"], rel=1e-6)
            assert ref["hessian_lambda_max"] is not None
            assert _close(rec["hessian_lambda_max"], ref["hessian_lambda_max"], rel=1e-6)
    assert single["records"][1]["predicted_excess_loss"] is not None
    assert single["records"][3]["predicted_excess_loss"] is not None


def _relu_tiny():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    batches = [
        (torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,)), torch.arange(n) % 3)
        for n in (9, 7)
    ]
    return model, batches


@pytest.mark.parametrize("iterations", [1, 2, 7])
def test_lambda_max_equals_the_unsharded_iterates(iterations: int) -> None:
    model, batches = _relu_tiny()
    before = [p.detach().clone() for p in model.parameters()]
    ref = group_hessian_lambda_max(model, batches, 3, iterations=iterations, seed=4)
    got = group_hessian_lambda_max(
        model, batches, 3, iterations=iterations, seed=4, chunk_size=4, finite_difference=FD
    )
    assert got.dtype == torch.float64
    assert got.shape == (3,)
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    # another seed starts elsewhere (the start vectors are those of the unsharded path)
    other = group_hessian_lambda_max(model, batches, 3, iterations=iterations, seed=5)
    if iterations == 1:
        assert not torch.allclose(other, ref, rtol=1e-3)


def test_lambda_max_start_vectors_are_sliceable_rademacher_rows() -> None:
    """One iteration is the Rayleigh quotient of the start vector: row a of the probes / √P."""
    model, batches = _relu_tiny()
    names = [n for n, _ in model.named_parameters()]
    size = sum(p.numel() for p in model.parameters())
    rows = rademacher_probes(3, size, seed=5, dtype=torch.float64) / math.sqrt(size)
    exact = _exact(model, batches, names, 3)
    want = torch.stack([rows[a] @ h @ rows[a] for a, (_, h) in enumerate(exact)])
    for backend in (None, FD):
        got = group_hessian_lambda_max(
            model, batches, 3, iterations=1, seed=4, finite_difference=backend
        )
        assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_lambda_max_converges_to_the_exact_top_eigenvalue() -> None:
    model, batches = _tiny()
    names = [n for n, _ in model.named_parameters()]
    exact = _exact(model, batches, names, 2)
    for gates in ("frozen", "live"):
        lam = group_hessian_lambda_max(
            model, batches, 2, iterations=150, finite_difference=fd(gates=gates)
        )
        for a, (_, h) in enumerate(exact):
            eig = torch.linalg.eigvalsh(h)
            top = eig[eig.abs().argmax()]
            assert float(lam[a]) == pytest.approx(float(top), rel=1e-6), (gates, a)


def test_lambda_max_validation_and_missing_groups() -> None:
    model, batches = _tiny()
    with pytest.raises(ValueError, match="Expected `iterations` to be an int >= 1"):
        group_hessian_lambda_max(model, batches, 2, iterations=0, finite_difference=FD)
    with pytest.raises(ValueError, match=r"Expected `gates` to be one of \('frozen', 'live'\)"):
        fd(gates="none")
    with pytest.warns(UserWarning, match=r"group_hessian_lambda_max: group\(s\) \[2\]"):
        lam = group_hessian_lambda_max(model, batches, 3, iterations=2, finite_difference=FD)
    ref = group_hessian_lambda_max(model, batches, 2, iterations=2)
    assert math.isnan(float(lam[2]))
    assert torch.allclose(lam[:2], ref, rtol=1e-6)
