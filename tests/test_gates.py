"""FrozenGates: exact record/replay of piecewise-linear ops, and what it fixes in float32.

References: the ops themselves at θ (outputs and autograd gradients), `torch.func` on a network
whose ReLUs are replaced by explicit masks, and the double-backward cores on a float64 copy.
"""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from _models import digits_tensors
from torch import nn
from torch.func import functional_call, grad

from lightning_fairprune.diagnostics import (
    FiniteDifference,
    FrozenGates,
    group_directional,
    group_hessian_lambda_max,
    group_hessian_trace,
    predicted_excess_loss,
)

LOGGER = "lightning_fairprune.diagnostics.sharded_pass"


def fd(**kw) -> FiniteDifference:
    """The FSDP2 backend (central differences, gates) on plain parameters."""
    return FiniteDifference(force=True, **kw)


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

    live = predicted_excess_loss(m32, b32, delta, 10, finite_difference=fd(gates="live"))
    live_trace = group_hessian_trace(m32, b32, 10, num_probes=4, finite_difference=fd(gates="live"))
    assert float(rel(live, ref_pred).max()) > 1.0  # some group is off by more than 100 %
    assert float(rel(live_trace.probe_values, ref_trace).max()) > 1.0
    frozen = predicted_excess_loss(m32, b32, delta, 10, finite_difference=fd())
    frozen_trace = group_hessian_trace(m32, b32, 10, num_probes=4, finite_difference=fd())
    assert float(rel(frozen, ref_pred).max()) < 5e-3
    assert float(rel(frozen_trace.probe_values, ref_trace).max()) < 1e-2
    # the linear term comes from the pass at θ: the gradient itself, not (plus + minus) / 2
    res = group_directional(m32, b32, 10, delta, finite_difference=fd())
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
    match = r"Expected `gates` to be one of \('frozen', 'live'\), but got 'off'"
    with pytest.raises(ValueError, match=match):
        FiniteDifference(gates="off")
    with pytest.raises(TypeError, match="Expected `force` to be a bool"):
        FiniteDifference(force=1)


# ------------------------------------------------------------ gate memory (per-chunk mode)


def _relu_pool_cnn():
    """A float32 CNN with ReLU (in place too), max pooling and a clamp; 3 uneven groups."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )
    g = torch.Generator().manual_seed(4)
    batches = []
    for n in (7, 9, 4):
        x = torch.randn(n, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        batches.append((x, y, torch.randint(0, 3, (n,), generator=g)))
    delta = {"0.weight": -0.5 * model[0].weight.detach(), "4.weight": torch.randn(10, 36) / 9}
    return model, batches, delta


def _gate_runs(model, batches, delta, gate_memory):
    kw = {"finite_difference": fd(gate_memory=gate_memory), "chunk_size": 3}
    return {
        "trace": group_hessian_trace(model, batches, 3, num_probes=2, seed=1, **kw),
        "predicted": predicted_excess_loss(model, batches, delta, 3, **kw),
        "lambda_max": group_hessian_lambda_max(model, batches, 3, iterations=2, **kw),
        "directional": group_directional(model, batches, 3, [delta, delta], **kw),
    }


def _logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, int, int]]:
    """(mode, estimate, calls, peak bytes held) per measurement, from the debug log."""
    text = caplog.text
    heads = re.findall(r"frozen gates: (\w+) \(estimated (\d+) bytes for (\d+) lockstep", text)
    peaks = re.findall(r"frozen gates: (\w+), peak (\d+) bytes held", text)
    assert len(heads) == len(peaks)
    return [
        (m, int(est), int(calls), int(peak))
        for (m, est, calls), (m2, peak) in zip(heads, peaks, strict=True)
        if m == m2
    ]


def test_per_chunk_gates_equal_stored_gates_bitwise(caplog: pytest.LogCaptureFixture) -> None:
    model, batches, delta = _relu_pool_cnn()
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        stored = _gate_runs(model, batches, delta, None)
        stored_log = _logged(caplog)
        caplog.clear()
        chunked = _gate_runs(model, batches, delta, 0)
        chunked_log = _logged(caplog)
    assert torch.equal(stored["trace"].probe_values, chunked["trace"].probe_values)
    assert torch.equal(stored["predicted"], chunked["predicted"])
    assert torch.equal(stored["lambda_max"], chunked["lambda_max"])
    for field in ("linear", "quadratic", "eps"):
        assert torch.equal(
            getattr(stored["directional"], field), getattr(chunked["directional"], field)
        )
    assert stored["directional"].gate_mode == "stored"
    assert chunked["directional"].gate_mode == "per_chunk"
    live_fd = fd(gates="live", gate_memory=0)
    live = group_directional(model, batches, 3, delta, finite_difference=live_fd)
    assert live.gate_mode == "live"
    assert not torch.equal(live.quadratic, stored["directional"].quadratic[:, :1])  # kinks count
    # what was held: stored, the gates of all the data; per chunk, one chunk's
    assert [m for m, *_ in stored_log] == ["stored"] * 4
    assert [m for m, *_ in chunked_log] == ["per_chunk"] * 4
    for (_, est, calls, peak), (_, est2, calls2, peak2) in zip(
        stored_log, chunked_log, strict=True
    ):
        assert (est, calls) == (est2, calls2)
        assert calls >= 7
        assert est // 2 < peak <= est  # the last chunk of a group is shorter
        assert 0 < peak2 <= est // calls
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_gate_memory_budget_picks_the_mode(caplog: pytest.LogCaptureFixture) -> None:
    model, batches, delta = _relu_pool_cnn()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        default = group_directional(model, batches, 3, delta, chunk_size=3, finite_difference=fd())
        ((_, estimate, _, _),) = _logged(caplog)
    assert default.gate_mode == "stored"  # a few KB within the default 1 GiB
    fits = group_directional(
        model, batches, 3, delta, chunk_size=3, finite_difference=fd(gate_memory=estimate)
    )
    over = group_directional(
        model, batches, 3, delta, chunk_size=3, finite_difference=fd(gate_memory=estimate - 1)
    )
    assert (fits.gate_mode, over.gate_mode) == ("stored", "per_chunk")
    assert torch.equal(fits.quadratic, over.quadratic)


@pytest.mark.parametrize("value", [-1, 1.5, True, "1GB"])
def test_gate_memory_is_validated(value: object) -> None:
    match = re.escape(f"Expected `gate_memory` to be None or an int >= 0, but got {value!r}")
    with pytest.raises(ValueError, match=match):
        FiniteDifference(gate_memory=value)


@pytest.mark.parametrize("gate_memory", [None, 0])
@pytest.mark.parametrize("fail_at", [2, 8, 9])
def test_weights_restored_bitwise_when_a_pass_fails(gate_memory: int | None, fail_at: int) -> None:
    """An error anywhere restores the weights bit for bit.

    7 lockstep calls per pass: forward call 2 is in the record pass at θ, 8 the first call of
    the first perturbed pass (per chunk: the no-grad forward at θ), 9 the next one (per chunk:
    the replayed forward at θ + εd).
    """
    model, batches, delta = _relu_pool_cnn()
    before = [p.detach().clone() for p in model.parameters()]
    calls: list[int] = []

    def forward_fn(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("boom")
        return net(x)

    kw = {"finite_difference": fd(gate_memory=gate_memory)}
    with pytest.raises(RuntimeError, match="boom"):
        predicted_excess_loss(model, batches, delta, 3, chunk_size=3, forward_fn=forward_fn, **kw)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    # and the next measurement runs normally, with the same result as a fresh model
    res = predicted_excess_loss(model, batches, delta, 3, **kw)
    fresh, _, _ = _relu_pool_cnn()
    assert torch.equal(res, predicted_excess_loss(fresh, batches, delta, 3, finite_difference=fd()))
