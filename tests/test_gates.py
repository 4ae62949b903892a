"""FrozenGates: exact record/replay of piecewise-linear ops, and what it fixes in float32.

References: the ops themselves at θ (outputs and autograd gradients), `torch.func` on a network
whose ReLUs are replaced by explicit masks, and the double-backward cores on a float64 copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import digits_tensors
from torch import nn
from torch.func import functional_call, grad

from lightning_fairprune.diagnostics import (
    FrozenGates,
    group_hessian_trace,
    predicted_excess_loss,
    sharded_group_directional,
    sharded_group_hessian_trace,
    sharded_predicted_excess_loss,
)

X = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
PRELU_W = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
SPELLINGS = {
    "F.relu": lambda t: F.relu(t),
    "nn.ReLU(inplace)": lambda t: nn.ReLU(inplace=True)(t * 1),
    "torch.relu": lambda t: torch.relu(t),
    "torch.relu_": lambda t: torch.relu_(t * 1),
    "Tensor.relu": lambda t: t.relu(),
    "Tensor.relu_": lambda t: (t * 1).relu_(),
    "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
    "leaky_relu_": lambda t: F.leaky_relu_(t * 1, 0.2),
    "nn.ReLU6": lambda t: nn.ReLU6()(t * 3),
    "hardtanh_": lambda t: F.hardtanh_(t * 1, -0.5, 0.5),
    "threshold": lambda t: F.threshold(t, 0.1, -2.0),
    "prelu": lambda t: F.prelu(t, PRELU_W),
    "clamp(min=0)": lambda t: t.clamp(min=0),
    "torch.clamp": lambda t: torch.clamp(t, -0.3, 0.4),
    "clip_": lambda t: (t * 1).clip_(-0.3, 0.4),
    "clamp_min": lambda t: torch.clamp_min(t, 0.1),
    "clamp_max": lambda t: t.clamp_max(0.1),
    "max_pool2d": lambda t: F.max_pool2d(t, 2),
    "MaxPool2d(indices)": lambda t: nn.MaxPool2d(3, 2, padding=1, return_indices=True)(t)[0],
    "max_pool1d": lambda t: F.max_pool1d(t.flatten(2), 3),
    "max_pool3d": lambda t: F.max_pool3d(t, 2),
    "adaptive_max_pool2d": lambda t: F.adaptive_max_pool2d(t, 4),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_replay_at_theta_equals_the_op(name: str) -> None:
    """At θ the replayed op has the op's output and autograd gradient, bit for bit."""
    f = SPELLINGS[name]
    gates = FrozenGates()
    weights = torch.arange(1.0, 1.0 + 6**4, dtype=torch.float64)
    x0 = X.clone().requires_grad_()
    plain = f(x0)
    (g_plain,) = torch.autograd.grad((plain * weights[: plain.numel()].view_as(plain)).sum(), x0)
    with gates.record("k"):
        rec = f(X.clone())
    x1 = X.clone().requires_grad_()
    with gates.replay("k"):
        rep = f(x1)
    (g_rep,) = torch.autograd.grad((rep * weights[: rep.numel()].view_as(rep)).sum(), x1)
    assert gates.num_gates("k") == 1
    assert torch.equal(rec, plain)
    assert torch.equal(rep, plain)
    assert torch.equal(g_rep, g_plain)


def test_replay_freezes_the_pattern_and_the_gradient_is_the_masked_networks() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.LeakyReLU(0.1))
    net = net.double()
    x = torch.randn(7, 4, dtype=torch.float64)
    gates = FrozenGates()
    with gates.record(0):
        net(x)
    with torch.no_grad():  # the recorded pattern, explicitly
        h1 = net[0](x)
        m1 = h1 > 0
        m2 = net[2](torch.where(m1, h1, 0)) > 0
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    moved = {n: p + 0.3 * torch.randn_like(p) for n, p in params.items()}  # units switch

    def masked(p: dict) -> torch.Tensor:
        h = functional_call(net[0], {"weight": p["0.weight"], "bias": p["0.bias"]}, (x,))
        h = h * m1
        h = functional_call(net[2], {"weight": p["2.weight"], "bias": p["2.bias"]}, (h,))
        return (torch.where(m2, h, 0.1 * h) ** 2).sum()

    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(moved[n])
        live = net(x)
    with gates.replay(0):
        out = net(x)
    ((out**2).sum()).backward()
    ref = grad(masked)(moved)
    for n, p in net.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-12, atol=1e-14), n
    # the pattern really changed at the moved weights: the replay is not the live network
    assert not torch.allclose(out, live)
    with torch.no_grad():
        assert bool(((net[0](x) > 0) != m1).any())


def test_max_pool_replays_the_recorded_indices() -> None:
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gates = FrozenGates()
    with gates.record(0):
        out0, idx0 = F.max_pool2d(x, 2, return_indices=True)
    y = x.clone()
    flat = y.view(2, 3, -1)
    flat.scatter_(2, idx0.flatten(2), -100.0)  # the recorded maxima are now the minima
    with gates.replay(0):
        out1, idx1 = F.max_pool2d(y, 2, return_indices=True)
    assert torch.equal(idx1, idx0)
    assert idx1.dtype == torch.int64
    assert bool((out1 == -100.0).all())
    assert torch.equal(out0, F.max_pool2d(x, 2))
    assert not torch.equal(F.max_pool2d(y, 2, return_indices=True)[1], idx0)


def test_mismatched_replay_raises() -> None:
    gates = FrozenGates()
    x = torch.randn(4, 3)
    with gates.record("a"):
        F.relu(x)
    with pytest.raises(RuntimeError, match="recorded relu of shape"), gates.replay("a"):
        F.relu(torch.randn(5, 3))
    with pytest.raises(RuntimeError, match=r"recorded relu of shape .* got max_pool"):  # noqa: SIM117
        with gates.replay("a"):
            F.max_pool1d(x[None], 2)

    def twice() -> None:
        F.relu(x)
        F.relu(x)

    with pytest.raises(RuntimeError, match=r"gated op #1 .* was not recorded"), gates.replay("a"):
        twice()
    with pytest.raises(RuntimeError, match="it ran 0 gated ops, the record has 1"):  # noqa: SIM117
        with gates.replay("a"):
            torch.tanh(x)
    with pytest.raises(KeyError, match="nothing was recorded under key 'b'"), gates.replay("b"):
        pass
    # ops outside the frozen set pass through; the mode is inactive outside record/replay
    with gates.replay("a"):
        assert torch.equal(torch.abs(x), x.abs())
        F.relu(x)
    assert torch.equal(F.relu(x), x.clamp_min(0))


def _fitted_relu_mlp() -> tuple[nn.Module, list]:
    """A float64 ReLU MLP fitted on 200 digits; groups = labels (10)."""
    torch.manual_seed(0)
    x, y = digits_tensors(200)
    x = x.flatten(1).double()
    batches = [(x[i : i + 50], y[i : i + 50], y[i : i + 50]) for i in range(0, 200, 50)]
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        for xb, yb, _ in batches:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model, batches


def test_float32_relu_live_gates_fail_frozen_gates_agree_with_double_backward() -> None:
    """The reported failure (live gates far off in float32 + ReLU), fixed by frozen gates."""
    model, batches = _fitted_relu_mlp()
    w = model[0].weight.detach()
    cut = w.abs().flatten().kthvalue(w.numel() // 2).values
    delta64 = {"0.weight": torch.where(w.abs() <= cut, -w, torch.zeros_like(w))}
    ref_pred = predicted_excess_loss(model, batches, delta64, 10)
    ref_trace = group_hessian_trace(model, batches, 10, num_probes=4).probe_values
    m32 = model.float()
    b32 = [(x.float(), y, g) for x, y, g in batches]
    delta = {"0.weight": delta64["0.weight"].float()}
    before = [p.detach().clone() for p in m32.parameters()]

    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs() / b.abs()

    live = sharded_predicted_excess_loss(m32, b32, delta, 10, gates="live")
    live_trace = sharded_group_hessian_trace(m32, b32, 10, num_probes=4, gates="live")
    assert float(rel(live, ref_pred).max()) > 1.0  # some group is off by more than 100 %
    assert float(rel(live_trace.probe_values, ref_trace).max()) > 1.0
    frozen = sharded_predicted_excess_loss(m32, b32, delta, 10)
    frozen_trace = sharded_group_hessian_trace(m32, b32, 10, num_probes=4)
    assert float(rel(frozen, ref_pred).max()) < 5e-3
    assert float(rel(frozen_trace.probe_values, ref_trace).max()) < 1e-2
    # the linear term comes from the pass at θ: the gradient itself, not (plus + minus) / 2
    res = sharded_group_directional(m32, b32, 10, delta)
    m64 = copy.deepcopy(m32).double()
    flat = delta["0.weight"].double().flatten()
    for a in range(10):
        xa = torch.cat([x[g == a] for x, _, g in b32]).double()
        ya = torch.cat([y[g == a] for _, y, g in b32])

        def loss(w0: torch.Tensor, xa: torch.Tensor = xa, ya: torch.Tensor = ya) -> torch.Tensor:
            p = {"0.weight": w0, **{n: q for n, q in m64.named_parameters() if n != "0.weight"}}
            return F.cross_entropy(functional_call(m64, p, (xa,)), ya)

        g = grad(loss)(m64[0].weight.detach()).flatten()
        want = float(g.detach() @ flat)
        assert float(res.linear[a, 0]) == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert all(torch.equal(p, b) for p, b in zip(m32.parameters(), before, strict=True))


def test_gates_argument_is_validated() -> None:
    model, batches = _fitted_relu_mlp()
    d = {"0.weight": torch.ones_like(model[0].weight)}
    match = r"Expected `gates` to be one of \('frozen', 'live'\), but got 'off'"
    with pytest.raises(ValueError, match=match):
        sharded_group_directional(model, batches, 10, d, gates="off")
    with pytest.raises(ValueError, match=match):
        sharded_group_hessian_trace(model, batches, 10, gates="off")
    with pytest.raises(ValueError, match=match):
        sharded_predicted_excess_loss(model, batches, d, 10, gates="off")
