from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lightning_fairprune.diagnostics import GroupStatistics, group_statistics, rademacher_probes
from lightning_fairprune.measure import isolated
from lightning_fairprune.pruning import fair_criteria as fc
from lightning_fairprune.pruning.fair_criteria import (
    fair_masks,
    fairgrape_masks,
    fairprune_masks,
    forecast_group_damage,
    worst_group_masks,
)
from lightning_fairprune.pruning.select import num_to_prune


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    ).double()


def tiny_data(n: int = 14, g: int = 3):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    groups = torch.arange(n) % g
    return x, y, groups


def naive_per_sample_grads(model, names, x, y):
    params = dict(model.named_parameters())
    out = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gr = torch.autograd.grad(loss, [params[n] for n in names])
        out.append([t.detach() for t in gr])
    return out


def test_group_statistics_vs_naive_loops():
    model = tiny_net()
    x, y, groups = tiny_data()
    names = [n for n, _ in model.named_parameters()]
    # two batches, chunk size smaller than a batch: sums must not depend on chunking
    batches = [(x[:9], y[:9], groups[:9]), (x[9:], y[9:], groups[9:])]
    stats = group_statistics(model, batches, 3, curvature="fisher", chunk_size=4)
    per = naive_per_sample_grads(model, names, x, y)
    for a in range(3):
        idx = (groups == a).nonzero().flatten().tolist()
        assert stats.counts[a].item() == len(idx)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum")
        assert stats.loss_sums[a].item() == pytest.approx(loss.item(), rel=1e-12)
        for j, n in enumerate(names):
            gsum = sum(per[i][j] for i in idx)
            fsum = sum(per[i][j] ** 2 for i in idx)
            torch.testing.assert_close(stats.grad_sums[n][a], gsum, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(stats.curvature_sums[n][a], fsum, rtol=1e-10, atol=1e-12)
    # the mean gradient is the gradient of the group's mean loss (torch.func on the group)
    means = stats.grad_means()
    for a in range(3):
        idx = groups == a
        params = {n: p.detach() for n, p in model.named_parameters()}
        grad = torch.func.grad(
            lambda p, idx=idx: nn.functional.cross_entropy(
                torch.func.functional_call(model, p, (x[idx],)), y[idx]
            )
        )(params)
        for n in names:
            torch.testing.assert_close(means[n][a], grad[n], rtol=1e-10, atol=1e-12)


def test_default_groups_are_classes():
    model = tiny_net()
    x, y, _ = tiny_data()
    s2 = group_statistics(model, [(x, y)], 3, curvature="none")
    s3 = group_statistics(model, [(x, y, y)], 3, curvature="none")
    assert s2.curvature_sums is None
    assert torch.equal(s2.counts, torch.bincount(y, minlength=3).double())
    for n in s2.grad_sums:
        torch.testing.assert_close(s2.grad_sums[n], s3.grad_sums[n])


def test_hutchinson_diag_vs_exact_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=gen)
    groups = torch.tensor([0, 1] * 5)
    k = 3
    stats = group_statistics(model, [(x, y, groups)], 2, curvature="hutchinson", num_probes=k)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def unflat(v):
        parts = torch.split(v, sizes)
        return {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}

    # the same probes as documented: the package's rademacher_probes, parameters in order
    probes = list(rademacher_probes(k, sum(sizes), seed=0, dtype=torch.float64))
    for a in range(2):
        idx = groups == a

        def loss(v, idx=idx):
            out = torch.func.functional_call(model, unflat(v), (x[idx],))
            return nn.functional.cross_entropy(out, y[idx], reduction="sum")

        hess = torch.func.hessian(loss)(flat0)
        expected = sum(v * (hess @ v) for v in probes) / k
        got = torch.cat([stats.curvature_sums[n][a].reshape(-1) for n in names])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # unbiased: with many probes the estimate approaches the exact diagonal
    many = group_statistics(model, [(x, y, groups)], 2, curvature="hutchinson", num_probes=3000)
    idx = groups == 0
    hess = torch.func.hessian(
        lambda v: nn.functional.cross_entropy(
            torch.func.functional_call(model, unflat(v), (x[idx],)), y[idx], reduction="sum"
        )
    )(flat0)
    got = torch.cat([many.curvature_sums[n][0].reshape(-1) for n in names])
    off = (hess - torch.diag(torch.diag(hess))).pow(2).sum(1).sqrt()  # SD of one probe
    assert bool((got - torch.diag(hess)).abs().le(5 * off / 3000**0.5 + 1e-12).all())


def test_statistics_restore_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    running = model[1].running_mean.clone()
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    rng = torch.get_rng_state()
    with isolated(model, mode="eval", grad_params=list(model.parameters())):
        assert not model.training
        assert model[0].weight.requires_grad
        model[1].running_mean.add_(5.0)  # even a buffer changed inside is restored
        torch.rand(3)
    stats = group_statistics(model, [(x, y)], 2)
    assert stats.counts.tolist() == [4.0, 4.0]
    assert model.training
    assert model[1].training
    assert not model[0].weight.requires_grad
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))
    assert torch.equal(model[1].running_mean, running)
    assert torch.equal(torch.get_rng_state(), rng)


def test_statistics_all_reduce_equals_one_process():
    model = tiny_net()
    x, y, groups = tiny_data()
    whole = group_statistics(model, [(x, y, groups)], 3)
    half_a = group_statistics(model, [(x[:6], y[:6], groups[:6])], 3)
    half_b = group_statistics(model, [(x[6:], y[6:], groups[6:])], 3)
    # the "other process" contributes half_b: an all-reduce of the flat buffer
    flat_b = torch.cat(
        [half_b.loss_sums, half_b.counts]
        + [t.reshape(-1) for t in half_b.grad_sums.values()]
        + [t.reshape(-1) for t in half_b.curvature_sums.values()]
    )
    reduced = half_a.reduce(lambda t: t + flat_b)
    torch.testing.assert_close(reduced.counts, whole.counts)
    torch.testing.assert_close(reduced.loss_sums, whole.loss_sums)
    for n in whole.grad_sums:
        torch.testing.assert_close(reduced.grad_sums[n], whole.grad_sums[n])
        torch.testing.assert_close(reduced.curvature_sums[n], whole.curvature_sums[n])
    params = dict(model.named_parameters())
    for name in ("fairgrape", "fairprune", "worst_group"):
        m1 = fair_masks(name, params, reduced, 0.4)
        m2 = fair_masks(name, params, whole, 0.4)
        assert all(torch.equal(m1[n], m2[n]) for n in params)


# --------------------------------------------------------------------------- synthetic stats


def synthetic(g: int, shapes: dict, seed: int, curvature: bool = True):
    gen = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    grads = {n: torch.randn((g, *s), generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    curv = (
        {n: torch.rand((g, *s), generator=gen, dtype=torch.float64) * 2 for n, s in shapes.items()}
        if curvature
        else None
    )
    counts = torch.arange(1, g + 1, dtype=torch.float64) * 2
    losses = torch.rand(g, generator=gen, dtype=torch.float64) * counts
    return params, GroupStatistics(grads, losses, counts, curv, "fisher" if curv else "none")


def flat(d: dict) -> np.ndarray:
    return np.concatenate([t.reshape(-1).numpy() for t in d.values()])


def naive_fairgrape(imp: np.ndarray, cand: np.ndarray, n_keep: int, batch: int) -> set[int]:
    """FairGRAPE's greedy as in their code, written with plain loops."""
    g = imp.shape[0]
    idx = np.nonzero(cand)[0]
    sub = imp[:, idx]
    target = sub.sum(1) / sub.sum()
    orders = [sorted(range(len(idx)), key=lambda j, a=a: (-sub[a, j], j)) for a in range(g)]
    kept: list[int] = []
    selected = np.zeros(g)
    prop = np.full(g, 1.0 / g)
    ptr = [0] * g
    since = 0
    race = 0
    while len(kept) < n_keep:
        if since == 0:
            race = int(np.argmin(prop - target))
        since = since + 1 if since < batch - 1 else 0
        while orders[race][ptr[race]] in kept:
            ptr[race] += 1
        j = orders[race][ptr[race]]
        kept.append(j)
        selected += sub[:, j]
        prop = selected / selected.sum()
    return {int(idx[j]) for j in kept}


@pytest.mark.parametrize("batch", [1, 3])
def test_fairgrape_matches_naive_greedy(batch):
    shapes = {"a": (4, 5), "b": (7,)}
    params, stats = synthetic(3, shapes, seed=2, curvature=False)
    current = {"a": torch.rand(4, 5, generator=torch.Generator().manual_seed(5)) > 0.2}
    current["b"] = torch.ones(7, dtype=torch.bool)
    imp = np.stack(
        [
            flat({n: (params[n] * stats.grad_sums[n][a] / stats.counts[a]) ** 2 for n in shapes})
            for a in range(3)
        ]
    )
    n = imp.shape[1]
    s = 0.55
    masks = fairgrape_masks(params, stats, s, current, batch=batch)
    kept = set(np.nonzero(flat(masks))[0].tolist())
    assert kept == naive_fairgrape(imp, flat(current).astype(bool), n - num_to_prune(s, n), batch)
    # layerwise: their per-layer greedy with per-layer targets
    lw = fairgrape_masks(params, stats, s, current, scope="layerwise", batch=batch)
    start = 0
    for name, shape in shapes.items():
        k = int(np.prod(shape))
        sub_keep = naive_fairgrape(
            imp[:, start : start + k],
            current[name].reshape(-1).numpy(),
            k - num_to_prune(s, k),
            batch,
        )
        assert set(np.nonzero(lw[name].reshape(-1).numpy())[0].tolist()) == sub_keep
        start += k


def test_fairgrape_keeps_group_shares_better_than_magnitude_of_sum():
    # hand case: group 1's importance sits on weights that the summed importance ranks low
    grads = {"w": torch.tensor([[3.0, 2.5, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.5]])}
    stats = GroupStatistics(grads, torch.zeros(2), torch.ones(2))
    masks = fairgrape_masks({"w": torch.ones(5)}, stats, 0.6)  # keep 2
    # targets: I0 = 9+6.25+4 = 19.25, I1 = 1.25 -> group 0 first (0.5 < 0.94), keeps w0;
    # then shares (1, 0) -> group 1 keeps w3
    assert masks["w"].tolist() == [True, False, False, True, False]


def naive_fairprune(params, stats, beta, worst, others, s, cand):
    g = stats.num_groups
    sal = [
        flat(
            {n: 0.5 * stats.curvature_sums[n][a] / stats.counts[a] * params[n] ** 2 for n in params}
        )
        for a in range(g)
    ]
    rest = [a for a in range(g) if a != worst]
    w = stats.counts.numpy()[rest] / stats.counts.numpy()[rest].sum()
    s_rest = (
        sum(w[i] * sal[a] for i, a in enumerate(rest))
        if others == "mean"
        else np.max([sal[a] for a in rest], axis=0)
    )
    pri = s_rest - beta * sal[worst]
    n = pri.size
    k = num_to_prune(s, n) - int((~cand).sum())
    order = sorted([i for i in range(n) if cand[i]], key=lambda i: (-pri[i], i))
    pruned = set(order[:k]) | set(np.nonzero(~cand)[0].tolist())
    return pruned


@pytest.mark.parametrize(("beta", "others"), [(0.0, "mean"), (0.5, "mean"), (1.0, "max")])
def test_fairprune_vs_hand(beta, others):
    shapes = {"a": (3, 4), "b": (5,)}
    params, stats = synthetic(4, shapes, seed=7)
    worst = int(torch.argmax(stats.loss_sums / stats.counts))
    cand = np.ones(17, dtype=bool)
    cand[[1, 13]] = False
    current = {"a": torch.from_numpy(cand[:12].reshape(3, 4)), "b": torch.from_numpy(cand[12:])}
    masks = fairprune_masks(params, stats, 0.5, current, beta=beta, others=others)
    pruned = set(np.nonzero(~flat(masks).astype(bool))[0].tolist())
    assert pruned == naive_fairprune(params, stats, beta, worst, others, 0.5, cand)
    # the worst group can be given explicitly
    m2 = fairprune_masks(params, stats, 0.5, current, beta=beta, others=others, worst=0)
    assert set(np.nonzero(~flat(m2).astype(bool))[0].tolist()) == naive_fairprune(
        params, stats, beta, 0, others, 0.5, cand
    )


def test_fairprune_two_groups_is_the_paper_formula():
    curv = {"w": torch.tensor([[4.0, 1.0, 2.0, 0.5], [1.0, 4.0, 2.0, 0.0]])}
    stats = GroupStatistics({"w": torch.zeros(2, 4)}, torch.tensor([0.1, 0.8]), torch.ones(2), curv)
    theta = torch.tensor([1.0, 1.0, 1.0, 2.0])
    # S0 = [2, .5, 1, 1], S1 = [.5, 2, 1, 0]; P = S0 - 0.5 S1 = [1.75, -.5, .5, 1]
    masks = fairprune_masks({"w": theta}, stats, 0.5, beta=0.5)
    assert masks["w"].tolist() == [False, True, True, False]


# --------------------------------------------------------------------------- worst group


def brute_force_minimax(delta: np.ndarray, cand: np.ndarray, k: int) -> float:
    idx = np.nonzero(cand)[0]
    best = np.inf
    for combo in itertools.combinations(idx.tolist(), k):
        best = min(best, delta[:, list(combo)].sum(1).max())
    return float(best)


@pytest.mark.parametrize("seed", range(6))
def test_worst_group_vs_brute_force_on_12_weights(seed):
    shapes = {"a": (2, 3), "b": (6,)}
    params, stats = synthetic(3, shapes, seed=seed)
    delta = np.stack(
        [
            np.maximum(
                0.0,
                flat({n: -stats.grad_sums[n][a] / stats.counts[a] * params[n] for n in shapes})
                + flat(
                    {
                        n: 0.5 * stats.curvature_sums[n][a] / stats.counts[a] * params[n] ** 2
                        for n in shapes
                    }
                ),
            )
            for a in range(3)
        ]
    )
    cand = np.ones(12, dtype=bool)
    cand[[0, 7]] = False
    current = {"a": torch.from_numpy(cand[:6].reshape(2, 3)), "b": torch.from_numpy(cand[6:])}
    s = 0.5  # prune 6: 2 already + 4 new
    res = worst_group_masks(params, stats, s, current, iterations=200, swaps=20)
    pruned = ~flat(res.masks).astype(bool)
    assert int(pruned.sum()) == 6
    assert pruned[~cand].all()
    newly = pruned & cand
    value = delta[:, newly].sum(1)
    np.testing.assert_allclose(res.damage.numpy(), value, rtol=1e-12)
    opt = brute_force_minimax(delta, cand, 4)
    # certified bounds: dual bound <= OPT <= ours; never worse than uniform group weights
    assert res.lower_bound <= opt + 1e-12
    assert value.max() >= opt - 1e-12
    uniform = delta.mean(0)
    order = sorted(np.nonzero(cand)[0].tolist(), key=lambda i: (uniform[i], i))[:4]
    assert value.max() <= delta[:, order].sum(1).max() + 1e-12
    # documented rounding bound: within G * max single-weight forecast of the LP bound
    assert value.max() <= res.lower_bound + 3 * delta.max() + 1e-12
    # and on these tiny instances the best iterate reaches the exact optimum
    assert value.max() == pytest.approx(opt, rel=1e-9)


def test_forecast_group_damage_matches_definition():
    params, stats = synthetic(2, {"w": (5,)}, seed=3)
    after = {"w": torch.tensor([True, False, True, False, True])}
    got = forecast_group_damage(params, stats, None, after)
    g = stats.grad_sums["w"] / stats.counts[:, None]
    h = stats.curvature_sums["w"] / stats.counts[:, None]
    th = params["w"]
    expected = (-g * th + 0.5 * h * th**2)[:, [1, 3]].sum(1)
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------- common contract


@pytest.mark.parametrize("name", ["fairgrape", "fairprune", "worst_group"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_exact_sparsity_current_masks_and_determinism(name, scope):
    shapes = {"a": (6, 7), "b": (13,), "c": (2, 2, 3)}
    params, stats = synthetic(3, shapes, seed=11)
    gen = torch.Generator().manual_seed(4)
    current = {n: torch.rand(s, generator=gen) > 0.15 for n, s in shapes.items()}
    for s in (0.3, 0.6, 0.93):
        masks = fair_masks(name, params, stats, s, current, scope=scope)
        again = fair_masks(name, params, stats, s, current, scope=scope)
        for n in shapes:
            assert masks[n].dtype == torch.bool
            assert masks[n].shape == params[n].shape
            assert torch.equal(masks[n], again[n])
            assert not bool((masks[n] & ~current[n]).any())  # never un-prune
        if scope == "global":
            total = sum(p.numel() for p in params.values())
            pruned = sum(int((~m).sum()) for m in masks.values())
            assert pruned == num_to_prune(s, total)
        else:
            for n, p in params.items():
                assert int((~masks[n]).sum()) == max(
                    num_to_prune(s, p.numel()), int((~current[n]).sum())
                )
        current = masks


def test_bad_inputs_name_argument_and_value():
    params, stats = synthetic(2, {"w": (4,)}, seed=0, curvature=False)
    with pytest.raises(ValueError, match="Expected `name` to be one of"):
        fair_masks("fairest", params, stats, 0.5)
    with pytest.raises(ValueError, match="Expected `scope` to be one of"):
        fair_masks("fairgrape", params, stats, 0.5, scope="rows")
    with pytest.raises(ValueError, match="Expected options of 'fairgrape'"):
        fair_masks("fairgrape", params, stats, 0.5, beta=1.0)
    with pytest.raises(ValueError, match="Expected `sparsity` to be a float in"):
        fair_masks("fairgrape", params, stats, 1.5)
    with pytest.raises(ValueError, match="curvature='none'"):
        fair_masks("worst_group", params, stats, 0.5)
    with pytest.raises(ValueError, match="Expected `beta` to be a finite float >= 0"):
        fair_masks("fairprune", params, synthetic(2, {"w": (4,)}, 0)[1], 0.5, beta=-1.0)
    with pytest.raises(ValueError, match="Expected `batch` to be an int >= 1, but got 0"):
        fairgrape_masks(params, stats, 0.5, batch=0)
    with pytest.raises(ValueError, match="Expected `curvature` to be one of"):
        group_statistics(nn.Linear(2, 2), [], 2, curvature="gauss")
    with pytest.raises(ValueError, match="at least one batch"):
        group_statistics(nn.Linear(2, 2), [], 2)
    with pytest.raises(ValueError, match=r"`groups` to hold group ids in \[0, 2\)"):
        group_statistics(
            nn.Linear(2, 2), [(torch.randn(2, 2), torch.tensor([0, 1]), torch.tensor([0, 5]))], 2
        )
    assert fc.FAIR_CRITERIA == ("fairgrape", "fairprune", "worst_group")
