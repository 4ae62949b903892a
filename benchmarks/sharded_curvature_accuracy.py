"""Accuracy of the finite-difference curvature of the FSDP2 backend against double backward.

For {ReLU MLP, tanh MLP, small CNN with ReLU + max pooling} x {float64, float32} x
{live, frozen gates} x a few relative steps r, prints the maximum relative error of

* the Hutchinson probe values v_kᵀH_a v_k (`group_hessian_trace`, K = 4), and
* the predicted excess loss g_aᵀδ + ½ δᵀH_aδ of a magnitude-pruning step δ (half of the first
  layer's weights; `predicted_excess_loss`),

per group (G = 10 groups: the digit labels), against the double-backward cores
(`group_hessian_trace`, `predicted_excess_loss`) on a float64 copy of the same weights. The
models are trained briefly on scikit-learn's digits (8x8, 200 samples) so the curvature is that
of a fitted network. Single process: ``FiniteDifference(force=True)`` runs the FSDP2 backend on
plain modules; the numbers do not depend on the sharding, which the tests check separately.

Usage: ``python benchmarks/sharded_curvature_accuracy.py`` (well under a minute on 2 CPU cores).
"""

from __future__ import annotations

import time
import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_fairprune.diagnostics import (
    FiniteDifference,
    group_hessian_trace,
    predicted_excess_loss,
)
from lightning_fairprune.diagnostics.sharded_pass import default_relative_step

PROBES = 4
STEPS = (1e-5, 1e-4, 1e-3, 2e-3, 4.9e-3, 2e-2)
GROUPS = 10


def data() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.data[:200], dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target[:200])
    return [(x[i : i + 50], y[i : i + 50], y[i : i + 50]) for i in range(0, 200, 50)]


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "relu_mlp": nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)),
        "tanh_mlp": nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)),
        "relu_cnn": nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        ),
    }


def fit(model: nn.Module, batches: list) -> nn.Module:
    model = model.double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        for x, y, _ in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def prune_step(model: nn.Module) -> dict[str, torch.Tensor]:
    name, w = next((n, p) for n, p in model.named_parameters() if p.ndim > 1)
    w = w.detach()
    cut = w.abs().flatten().kthvalue(w.numel() // 2).values
    return {name: torch.where(w.abs() <= cut, -w, torch.zeros_like(w))}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got - ref).abs() / ref.abs().clamp_min(1e-12)).max())


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    batches = data()
    rows = []
    start = time.perf_counter()
    for name, model in models().items():
        model = fit(model, batches)
        delta64 = prune_step(model)
        ref_trace = group_hessian_trace(model, batches, GROUPS, num_probes=PROBES).probe_values
        ref_pred = predicted_excess_loss(model, batches, delta64, GROUPS)
        for dtype in (torch.float64, torch.float32):
            m = model.to(dtype)
            b = [(x.to(dtype), y, g) for x, y, g in batches]
            delta = {n: t.to(dtype) for n, t in delta64.items()}
            for gates in ("live", "frozen"):
                steps = sorted({default_relative_step(dtype, gates), *STEPS})
                for r in steps:
                    kw = dict(finite_difference=FiniteDifference(eps=r, gates=gates, force=True))
                    tr = group_hessian_trace(m, b, GROUPS, num_probes=PROBES, **kw)
                    pred = predicted_excess_loss(m, b, delta, GROUPS, **kw)
                    default = r == default_relative_step(dtype, gates)
                    rows.append(
                        (
                            name,
                            str(dtype).removeprefix("torch."),
                            gates,
                            f"{r:.2g}" + (" (default)" if default else ""),
                            rel_err(tr.probe_values, ref_trace),
                            rel_err(pred, ref_pred),
                        )
                    )
            model = model.double()
        worst = int((ref_pred.abs()).argmin())
        print(f"# {name}: smallest |predicted excess loss| group {worst}: {ref_pred[worst]:.3g}")
    print()
    print("| model | dtype | gates | r | trace probes: max rel. err. | predicted: max rel. err. |")
    print("|---|---|---|---|---|---|")
    for name, dtype, gates, r, e_tr, e_pred in rows:
        print(f"| {name} | {dtype} | {gates} | {r} | {e_tr:.1e} | {e_pred:.1e} |")
    print(f"\n{time.perf_counter() - start:.1f} s, torch {torch.__version__}")


if __name__ == "__main__":
    main()
