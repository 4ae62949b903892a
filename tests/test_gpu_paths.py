"""GPU-oriented code paths, forced on the CPU, against independent references.

* exact selection (`radix_select`, `global_masks`/`layerwise_masks` with ``sync_free``)
  vs a full stable sort in numpy;
* `MaskEnforcer` ``foreach`` vs ``uint8`` vs a plain ``where``;
* per-group gradient norms (``strategy="vmap"``, ``max_memory`` blocks) vs a naive float64
  loop with one backward per group;
* batched Hutchinson probes vs sequential HVPs with the same probes, and vs the exact trace
  from `torch.func.hessian`;
* ``benchmarks/bench_gpu.py --smoke`` in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_fairprune.pruning import MaskEnforcer, global_masks, layerwise_masks, num_to_prune
from lightning_fairprune.pruning.select import abs_keys, radix_select

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- selection


def _reference_masks(scores, k, current=None):
    """Prune the k smallest abs scores (already pruned first, ties by flat index): numpy sort."""
    dtype = scores[next(iter(scores))].dtype
    for s in scores.values():
        dtype = torch.promote_types(dtype, s.dtype)
    vals = np.concatenate(
        [s.detach().to(dtype).abs().double().reshape(-1).numpy() for s in scores.values()]
    )
    if current is not None:
        kept = np.concatenate([current[n].reshape(-1).numpy() for n in scores])
        vals = np.where(kept, vals, -1.0)  # already pruned: below every score
    order = np.lexsort((np.arange(vals.size), vals))  # by value, then flat index
    keep = np.ones(vals.size, dtype=bool)
    keep[order[:k]] = False
    if current is not None:
        keep &= kept
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = torch.from_numpy(keep[start : start + s.numel()].copy()).view(s.shape)
        start += s.numel()
    return out


def _random_scores(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(37, 41, generator=gen, dtype=torch.float64)
    b = torch.randn(900, generator=gen, dtype=torch.float64).round(decimals=1)  # many ties
    b[::97] = math.inf
    b[5::101] = -math.inf
    c = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    c[0] = 0.0  # ties at zero
    return {"a": a.to(dtype), "b": b.to(dtype), "c": c.to(dtype)}


def _random_current(scores, frac, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s.shape, generator=gen) >= frac for n, s in scores.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("sync_free", [False, True])
def test_global_masks_match_full_sort_every_dtype_and_path(dtype, sync_free):
    scores = _random_scores(dtype)
    total = sum(s.numel() for s in scores.values())
    for sparsity in (0.1, 0.5, 0.97):
        k = num_to_prune(sparsity, total)
        got = global_masks(scores, sparsity, sync_free=sync_free)
        ref = _reference_masks(scores, k)
        for name in scores:
            assert torch.equal(got[name], ref[name]), (name, sparsity)
        # second round on top of the first, and on unrelated current masks
        for current in (got, _random_current(scores, 0.3)) if sparsity < 0.8 else ():
            k2 = num_to_prune(0.8, total)
            got2 = global_masks(scores, 0.8, current, sync_free=sync_free)
            ref2 = _reference_masks(scores, k2, current)
            for name in scores:
                assert torch.equal(got2[name], ref2[name]), (name, sparsity)


def test_sync_free_equals_default_path_with_mixed_dtypes_and_small_chunks(monkeypatch):
    import lightning_fairprune.pruning.select as masks_mod

    monkeypatch.setattr(masks_mod, "_CHUNK", 128)  # many chunks: ties straddle chunk borders
    scores = _random_scores(torch.float32)
    scores["c"] = scores["c"].half()
    current = _random_current(scores, 0.2)
    total = sum(s.numel() for s in scores.values())
    for sparsity in (0.3, 0.6):
        a = global_masks(scores, sparsity, current, sync_free=False)
        b = global_masks(scores, sparsity, current, sync_free=True)
        ref = _reference_masks(scores, num_to_prune(sparsity, total), current)
        for name in scores:
            assert torch.equal(a[name], ref[name]), name
            assert torch.equal(b[name], ref[name]), name


@pytest.mark.parametrize("sync_free", [False, True])
def test_layerwise_masks_match_per_tensor_sort(sync_free):
    scores = _random_scores(torch.float32)
    current = _random_current(scores, 0.1)
    got = layerwise_masks(scores, 0.5, current, sync_free=sync_free)
    for name, s in scores.items():
        ref = _reference_masks({name: s}, num_to_prune(0.5, s.numel()), {name: current[name]})
        assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("digit_bits", [16, 12, 11, 5])
@pytest.mark.parametrize("sync_free", [False, True])
def test_radix_select_equals_sorted_key(digit_bits, sync_free):
    gen = torch.Generator().manual_seed(digit_bits)
    vals = torch.randn(5000, generator=gen, dtype=torch.float64).round(decimals=2)
    keys = abs_keys(vals)
    cand = torch.rand(5000, generator=gen) > 0.25
    chunks = [(keys[i : i + 700], cand[i : i + 700]) for i in range(0, 5000, 700)]
    sorted_keys = torch.sort(keys[cand]).values
    for rank in (1, 17, 2000, int(cand.sum())):
        sel = radix_select(lambda: chunks, rank, 64, digit_bits=digit_bits, sync_free=sync_free)
        expected = int(sorted_keys[rank - 1])
        assert sel.threshold == expected
        assert sel.count_equal == int((keys[cand] == expected).sum())
        assert sel.rank_in_ties == rank - int((sorted_keys < expected).sum())


def test_radix_select_with_reduce_fn_over_two_shards_gives_the_global_threshold():
    """Two 'processes' (threads) with half the keys each; reduce_fn sums their histograms."""
    gen = torch.Generator().manual_seed(0)
    vals = torch.randn(4000, generator=gen).round(decimals=2)
    keys = abs_keys(vals)
    shards = [keys[:1500], keys[1500:]]
    barrier = threading.Barrier(2)
    slots: list = [None, None]
    calls = [0, 0]
    results: list = [None, None]

    def worker(r: int) -> None:
        def reduce_fn(hist: torch.Tensor) -> torch.Tensor:
            calls[r] += 1
            slots[r] = hist.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        results[r] = radix_select(lambda: [(shards[r], None)], 2345, 32, reduce_fn=reduce_fn)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = int(torch.sort(keys).values[2344])
    assert results[0][:3] == results[1][:3]
    assert results[0].threshold == expected
    assert results[1].threshold == expected
    assert calls == [2, 2]  # two all-reduces of 65,536 counts for float32
    assert results[0].top_histogram.numel() == 1 << 16


def test_radix_select_rejects_bad_arguments():
    keys = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="Expected `rank`"):
        radix_select(lambda: [(keys, None)], 4, 32)
    with pytest.raises(ValueError, match="Expected `rank`"):
        radix_select(lambda: [(keys, None)], 0, 32)
    with pytest.raises(ValueError, match="Expected `key_bits`"):
        radix_select(lambda: [(keys, None)], 1, 8)
    with pytest.raises(ValueError, match="Expected `digit_bits`"):
        radix_select(lambda: [(keys, None)], 1, 32, digit_bits=17)
    with pytest.raises(ValueError, match="Expected `dtype`"):
        abs_keys(keys.float(), torch.int32)


def test_nan_scores_still_raise_on_both_paths():
    scores = _random_scores(torch.float32)
    scores["a"][3, 4] = math.nan
    for sync_free in (False, True):
        with pytest.raises(ValueError, match="NaN"):
            global_masks(scores, 0.5, sync_free=sync_free)


# --------------------------------------------------------------------------- enforcement


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_enforcer_foreach_equals_uint8_and_where(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(13, 7), (50,), (4, 3, 3, 3)]
    base = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    masks = {f"p{i}": torch.rand(s, generator=gen) > 0.6 for i, s in enumerate(shapes)}
    results = {}
    for mode in ("bitwise", "uint8", "foreach", "auto"):
        params = {f"p{i}": nn.Parameter(b.clone()) for i, b in enumerate(base)}
        opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
        enforcer = MaskEnforcer(opt, params, masks, mode=mode)
        for p in params.values():
            p.grad = torch.ones_like(p)
        opt.step()  # the hook enforces
        results[mode] = {n: p.detach().clone() for n, p in params.items()}
        enforcer.remove()
    for i, b in enumerate(base):
        name = f"p{i}"
        stepped = b - 0.1  # SGD's first step with unit gradients
        expected = torch.where(masks[name], stepped, torch.zeros_like(stepped))
        for mode, res in results.items():
            assert torch.equal(res[name], expected), (mode, name)
            assert int(torch.count_nonzero(res[name][~masks[name]])) == 0
    with pytest.raises(ValueError, match="Expected `mode`"):
        MaskEnforcer(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), {}, {}, mode="x")
    # the bit patterns: "bitwise" writes +0.0 (where "uint8" writes -0.0 for negatives)
    int_dtype = {torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(dtype, torch.int64)
    for i in range(len(base)):
        pruned = ~masks[f"p{i}"]
        assert int(results["bitwise"][f"p{i}"].view(int_dtype)[pruned].abs().sum()) == 0


def test_enforcer_bitwise_zeroes_nan_and_refuses_what_it_cannot_view():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    mask = torch.tensor([True, False, False, True])
    enforcer = MaskEnforcer(opt, {"w": w}, {"w": mask}, mode="bitwise")
    with torch.no_grad():
        w[1], w[2] = math.nan, -math.inf  # a blown-up pruned weight is zeroed, not kept NaN
    enforcer.enforce()
    assert w.detach().tolist() == [1.0, 0.0, 0.0, 4.0]
    assert not torch.signbit(w.detach()[1:3]).any()
    enforcer.remove()
    # a non-contiguous CPU parameter: "bitwise" refuses it by name, "auto" takes "uint8"
    t = nn.Parameter(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match=r"mode='bitwise'.*'t'"):
        MaskEnforcer(opt, {"t": t}, {"t": torch.ones(3, 4, dtype=torch.bool)}, mode="bitwise")
    keep = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    expected = torch.where(keep, t.detach(), 0.0)
    enforcer = MaskEnforcer(opt, {"t": t}, {"t": keep})
    enforcer.enforce()
    assert torch.equal(t.detach(), expected)
    assert enforcer._mode_for(t) == "uint8"


def test_enforcer_auto_takes_bitwise_for_large_cpu_tensors(monkeypatch):
    import lightning_fairprune.pruning.enforce as masks_module

    monkeypatch.setattr(masks_module, "_BITWISE_MIN", 10)
    big, small = nn.Parameter(torch.randn(12)), nn.Parameter(torch.randn(9))
    keep = {"big": torch.arange(12) % 3 > 0, "small": torch.arange(9) % 2 > 0}
    opt = torch.optim.SGD([big, small], lr=0.1)
    enforcer = MaskEnforcer(opt, {"big": big, "small": small}, keep)
    assert [p is big for p, _ in enforcer._bitwise] == [True]
    assert [p is small for p, _ in enforcer._pairs] == [True]
    enforcer.enforce()
    assert torch.equal(big.detach() != 0, keep["big"])
    assert torch.equal(small.detach() != 0, keep["small"])


# --------------------------------------------------------------------------- diagnostics


def _bn_cnn() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.train()  # train mode on purpose: the measurement must use eval statistics


def _group_data(n=70, num_groups=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    g = torch.randint(0, num_groups, (n,), generator=gen)
    g[g == 3] = 2  # group 3 absent
    return x, y, g


def _naive_norms(model, x, y, g, num_groups):
    """One backward of each group's mean loss over all its samples, eval mode, float64."""
    model.eval()
    out = []
    for a in range(num_groups):
        sel = g == a
        if not bool(sel.any()):
            out.append(math.nan)
            continue
        loss = nn.functional.cross_entropy(model(x[sel]), y[sel])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        out.append(float(torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads))))
    model.train()
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("max_memory", [None, "two_groups", "one_group"])
def test_group_gradient_norms_every_path_equals_naive_loop(strategy, max_memory):
    from lightning_fairprune.diagnostics.curvature import group_gradient_norms

    model = _bn_cnn()
    x, y, g = _group_data()
    batches = [(x[i : i + 16], y[i : i + 16], g[i : i + 16]) for i in range(0, 70, 16)]
    size = sum(p.numel() for p in model.parameters())
    budget = {None: None, "two_groups": 2 * 8 * size + 5, "one_group": 8 * size}[max_memory]
    stats = model[1].running_mean.clone()
    with pytest.warns(UserWarning, match=r"group\(s\) \[3\]"):
        res = group_gradient_norms(
            model, batches, 5, strategy=strategy, max_memory=budget, chunk_size=6
        )
    ref = _naive_norms(model, x, y, g, 5)
    torch.testing.assert_close(res.norms, ref, rtol=1e-10, atol=1e-13, equal_nan=True)
    assert res.counts.tolist() == [float((g == a).sum()) for a in range(5)]
    assert torch.equal(model[1].running_mean, stats)  # eval mode: statistics untouched
    assert model.training


def test_group_gradient_norms_budget_errors():
    from lightning_fairprune.diagnostics.curvature import group_gradient_norms

    model = _bn_cnn()
    x, y, g = _group_data()
    batches = [(x, y, g)]
    with pytest.raises(ValueError, match="Expected `max_memory` to hold at least one group"):
        group_gradient_norms(model, batches, 5, max_memory=8)
    size = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="re-iterable"):
        group_gradient_norms(model, iter(batches), 5, max_memory=2 * 8 * size)
    with pytest.raises(ValueError, match="Expected `strategy`"):
        group_gradient_norms(model, batches, 5, strategy="fast")


def test_batched_hutchinson_equals_sequential_and_exact_trace():
    from torch.func import functional_call, hessian

    from lightning_fairprune.diagnostics import group_hessian_trace, rademacher_probes

    model = _bn_cnn()
    x, y, g = _group_data(n=48, num_groups=3)
    batches = [(x[i : i + 16], y[i : i + 16], g[i : i + 16]) for i in range(0, 48, 16)]
    size = sum(p.numel() for p in model.parameters())
    loop = group_hessian_trace(model, batches, 3, num_probes=24, seed=5, strategy="loop")
    budget = 3 * 8 * size * 5  # 5 probes per double backward
    batched = group_hessian_trace(
        model, batches, 3, num_probes=24, seed=5, strategy="batched", max_memory=budget
    )
    torch.testing.assert_close(batched.probe_values, loop.probe_values, rtol=1e-10, atol=1e-12)
    # the same probes as explicit ones (probes are a pure function of the seed)
    explicit = group_hessian_trace(
        model, batches, 3, probes=rademacher_probes(24, size, 5, dtype=torch.float64)
    )
    torch.testing.assert_close(explicit.probe_values, loop.probe_values, rtol=1e-10, atol=1e-12)
    # exact trace of each group's mean-loss Hessian (eval mode) by torch.func.hessian
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for a in range(3):
        sel = g == a

        def fn(v, sel=sel):
            parts = {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes, strict=True)}
            out = functional_call(model, parts, (x[sel],))
            return nn.functional.cross_entropy(out, y[sel])

        exact = torch.trace(hessian(fn)(flat)).item()
        assert abs(batched.trace[a].item() - exact) <= 4 * batched.stderr[a].item()
    model.train()


def test_probes_identical_whatever_the_chunking_and_balanced():
    from lightning_fairprune.diagnostics import rademacher_probes

    full = rademacher_probes(8, 1000, seed=11)
    parts = torch.cat([rademacher_probes(3, 1000, 11), rademacher_probes(5, 1000, 11, start=3)])
    assert torch.equal(full, parts)
    assert not torch.equal(full, rademacher_probes(8, 1000, seed=12))
    bits = (rademacher_probes(64, 4096, seed=0) > 0).double()
    # fair coin: mean 0.5 within 5 standard errors; neighbouring entries uncorrelated
    assert abs(bits.mean().item() - 0.5) < 5 * 0.5 / math.sqrt(bits.numel())
    lag = ((2 * bits[:, 1:] - 1) * (2 * bits[:, :-1] - 1)).mean().item()
    assert abs(lag) < 5 / math.sqrt(bits[:, 1:].numel())


def test_measure_groups_batched_equals_loop_including_class_counts():
    from lightning_fairprune.diagnostics.curvature import measure_groups

    model = _bn_cnn()
    x, y, g = _group_data(n=40, num_groups=3)
    batches = [(x[i : i + 16], y[i : i + 16], g[i : i + 16]) for i in range(0, 40, 16)]
    loop = measure_groups(model, batches, 3, 3, strategy="loop")
    vm = measure_groups(model, batches, 3, 3, strategy="batched")
    assert torch.equal(vm.support, loop.support)
    assert torch.equal(vm.correct, loop.correct)
    torch.testing.assert_close(vm.grad_norms, loop.grad_norms, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(vm.loss_sums, loop.loss_sums, rtol=1e-12, atol=1e-12)
    ref = _naive_norms(model, x, y, g, 3)
    torch.testing.assert_close(vm.grad_norms, ref, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- benchmark smoke


def test_bench_gpu_smoke_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    expected = {
        "step": {"ours_over_none", "torch_prune_over_none"},
        "round": {"round1_time", "round2_time"},
        "norms": {"G10_auto_over_plain", "G100_auto_over_plain", "G100_auto_blocked_over_plain"},
        "hutchinson": {"auto_over_sequential", "loop_over_sequential"},
    }
    for section, keys in expected.items():
        ratios = summary[section]["ratios"]
        assert keys <= set(ratios), (section, ratios)
        for key, value in ratios.items():
            assert math.isfinite(value), (section, key)
            assert value > 0, (section, key)
    assert summary["step"]["zeros_kept"]
    assert all(r["masks_identical"] for r in summary["round"]["torch"])
