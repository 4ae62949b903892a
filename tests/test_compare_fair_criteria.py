"""`benchmarks/compare_fair_criteria.py`: its loop equals the package's callbacks, its data splits
are what the protocol says, and its statistics are recomputed independently (`--quick`)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_fairprune import FairnessData, GroupEqualizer, IterativePruning

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_fair_criteria as study  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fair")
    argv = ["--quick", "--out", str(out), "--datasets", "digits", "--seeds", "3"]
    res = study.main([*argv, "--fig-prefix", str(out / "fig")])
    saved = json.loads((out / "results.json").read_text())
    return res, saved, out


# ------------------------------------------------------------------ the loop = the callbacks


class _EpochPermutation(Sampler):
    """One `torch.randperm` per epoch from one generator: the benchmark loop's data order."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class _Module(pl.LightningModule):
    def __init__(self, net: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.net, self.criterion = net, criterion

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, g = batch
        return self.criterion(self.net(x), y, g)

    def configure_optimizers(self):
        return study.adam(self.net)


def _tiny_data() -> dict:
    gen = torch.Generator().manual_seed(3)
    data = {"num_groups": 3, "num_classes": 3}
    for part, n in (("tr", 96), ("va", 40), ("te", 30)):
        g = torch.tensor([0] * (n // 6) + [1] * (n // 3) + [2] * (n - n // 6 - n // 3))
        y = torch.randint(0, 3, (n,), generator=gen)
        x = torch.randn(n, 5, generator=gen) + y[:, None] * 0.8 + g[:, None] * 0.3
        data[f"x_{part}"], data[f"y_{part}"], data[f"g_{part}"] = x, y, g
    return data


@pytest.mark.parametrize(
    ("name", "timing"),
    [("cgap_ho", "throughout"), ("cgap", "final"), ("gel10", "throughout"), ("weighted", "final")],
)
def test_loop_equals_the_callbacks(name, timing):
    """The benchmark's fit = `Trainer.fit` with `IterativePruning` + `GroupEqualizer`."""
    data, seed, s = _tiny_data(), 4, 0.6
    cfg = {"rounds": 3, "frequency": 2}
    spe = math.ceil(96 / study.BATCH)
    plan = study.round_plan("rounds", s, spe, cfg)
    last = plan[-1][0]
    until = last + 5
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = study.LOSSES[name]
    if timing == "throughout":
        st, loss = study.fit_throughout(dense, data, spec, plan, until, seed)
    else:
        trunk = study.Trunk(data, study.heldout_batches(data))
        study.fit_throughout(dense, data, study.LOSSES["plain"], plan, until, seed, trunk)
        st, loss = study.fit_final(trunk, dense, data, spec, until)

    module = _Module(copy.deepcopy(dense), study.make_loss(spec, data))
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    train = TensorDataset(data["x_tr"], data["y_tr"], data["g_tr"])
    loader = DataLoader(train, batch_size=study.BATCH, sampler=_EpochPermutation(96, gen))
    part = "va" if spec.heldout else "tr"
    held = DataLoader(
        TensorDataset(data[f"x_{part}"], data[f"y_{part}"], data[f"g_{part}"]), batch_size=1000
    )
    equalizer = GroupEqualizer(
        dual_lr=spec.dual_lr,
        data=FairnessData(held, num_groups=3),
        heldout=spec.heldout,
        start_after_pruning=timing == "final",
        warmup_steps=0 if timing == "throughout" else last - plan[0][0],
        log=False,
    )
    pruning = IterativePruning(s, num_rounds=3, interval="step", frequency=2, prune_classifier=True)
    trainer = pl.Trainer(
        max_steps=until,
        callbacks=[pruning, equalizer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(module, loader)
    assert pruning.plan.targets == pytest.approx([t for _, t in plan])
    assert pruning.plan.event_points == [k for k, _ in plan]
    assert st.step == trainer.global_step == until
    for (n1, p1), (n2, p2) in zip(
        st.model.named_parameters(), module.net.named_parameters(), strict=True
    ):
        assert n1 == n2
        assert torch.allclose(p1, p2, atol=1e-5), n1
        assert torch.equal(p1 == 0, p2 == 0)
    assert study.realized_sparsity(st.masks) == pytest.approx(pruning.current_sparsity)
    if spec.dual_lr:
        assert loss.multipliers.abs().sum() > 0  # the dual steps ran
        assert torch.allclose(loss.multipliers, module.criterion.multipliers, atol=1e-5)
        # throughout: one dual step per optimizer step once the loss has its reference (cgap:
        # from round 0, after one epoch); final: from the last round on, plus the one the
        # callback takes at the end of the step that reaches the warm-up (the benchmark's
        # module docstring)
        expected = until - spe if name.startswith("cgap") else until
        assert equalizer.num_dual_steps == (
            expected if timing == "throughout" else until - last + 1
        )


# ------------------------------------------------------------------ data


def test_thickness_is_area_over_half_perimeter():
    rng = np.random.default_rng(0)
    images = (rng.random((6, 784)) > 0.8).astype(np.float32)
    images[0] = 0.0
    images[0].reshape(28, 28)[5:25, 10:13] = 1.0  # a bar 3 px wide, 20 long
    got = study.stroke_thickness(images)
    for img, w in zip(images, got, strict=True):
        ink = img.reshape(28, 28) > 0.5
        edges = 0
        for i, j in itertools.product(range(28), range(28)):
            if ink[i, j]:
                for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    a, b = i + di, j + dj
                    edges += not (0 <= a < 28 and 0 <= b < 28 and ink[a, b])
        assert w == pytest.approx(2 * ink.sum() / edges)
    assert got[0] == pytest.approx(2 * 60 / 46)  # 2·area / (2·20 + 2·3): about the width 3


@pytest.mark.parametrize("name", ["digits", "thickness", "hearts"])
def test_splits_heldout_has_the_training_imbalance(name):
    data = study.load_data(name, seed=1, quick=True)
    g = {
        p: np.bincount(data[f"g_{p}"].numpy(), minlength=data["num_groups"])
        for p in ("tr", "va", "te")
    }
    x = {p: {tuple(r) for r in data[f"x_{p}"].numpy().round(6).tolist()} for p in ("tr", "te")}
    assert len(x["tr"] & x["te"]) <= 1  # disjoint (up to duplicate images)
    share = {p: g[p] / g[p].sum() for p in g}
    assert np.allclose(share["va"], share["tr"], atol=0.08)  # held-out: same imbalance
    if name != "hearts":
        minority = (3, 8) if name == "digits" else (0,)
        for a in minority:  # 15 % kept in training and held-out data, none dropped in test
            assert share["tr"][a] < 0.5 * share["te"][a]


# ------------------------------------------------------------------ the analysis


def _interp(points, level):
    """Independent re-implementation: the sparsest bracketing adjacent pair."""
    found = None
    for (s0, a0, v0), (s1, a1, v1) in itertools.pairwise(points):
        if not min(a0, a1) <= level <= max(a0, a1):
            continue
        if a0 == a1:
            found = (v1, s1)
            continue
        xs = [a0, a1] if a0 <= a1 else [a1, a0]
        vs = [v0, v1] if a0 <= a1 else [v1, v0]
        ss = [s0, s1] if a0 <= a1 else [s1, s0]
        found = (float(np.interp(level, xs, vs)), float(np.interp(level, xs, ss)))
    return found


def test_records_metrics_and_sparsity(result):
    _, saved, out = result
    cfg = saved["config"]
    assert cfg["seeds"] == 3
    assert cfg["datasets"] == ["digits"]
    arm_list = study.arms(cfg["losses"], cfg["oneshot_losses"])
    assert study.README in arm_list
    assert "rounds/final/cgap_ho" in arm_list
    for run in saved["runs"]:
        kinds = {(r["arm"], r["sparsity"]) for r in run["records"]}
        assert kinds == set(itertools.product(arm_list, cfg["sparsities"]))
        dense = run["dense"]
        for r in run["records"]:
            assert r["realized"] == pytest.approx(r["sparsity"], abs=2e-3)
            assert r["worst"] == pytest.approx(min(r["group_acc"]))
            excess = [
                (d - a) - (dense["acc"] - r["acc"])
                for a, d in zip(r["group_acc"], dense["group_acc"], strict=True)
            ]
            assert r["gap"] == pytest.approx(max(excess), abs=1e-12)
            if r["arm"].endswith(("gel01", "gel10", "cgap", "cgap_ho")):
                assert len(r["multipliers"]) == len(r["group_acc"])
    assert (out / "docs.md").read_text().count("(README)") == 2  # two tables per dataset, level
    for path in result[0]["figures"]:
        assert Path(path).stat().st_size > 0


def test_matching_and_paired_tests_recomputed(result):
    _, saved, _ = result
    a, runs = saved["analysis"], saved["runs"]
    families: dict = {}
    for t in a["tests"]:
        families.setdefault((t["dataset"], t["match"], t["metric"]), []).append(t)
    assert len(families) == 4  # digits x (matched accuracy, equal sparsity) x 2 metrics
    for (_, match, metric), family in families.items():
        m = sum("p_raw" in t for t in family)
        assert m > 0
        for t in family:
            s, seeds, cand, base = t["level_sparsity"], [], [], []
            for run in runs:
                floor = run["chance"] + 0.25 * (run["dense"]["acc"] - run["chance"])
                recs = {(r["arm"], r["sparsity"]): r for r in run["records"]}
                b = recs[t["baseline"], s]
                if match == "sparsity":
                    c = recs[t["candidate"], s]
                    found = (c[metric], c["acc"])
                elif b["acc"] < floor:
                    found = None
                else:
                    pts = sorted(
                        (r["sparsity"], r["acc"], r[metric])
                        for r in run["records"]
                        if r["arm"] == t["candidate"]
                    )
                    kept = list(itertools.takewhile(lambda p, f=floor: p[1] >= f, pts))
                    found = _interp(kept, b["acc"])
                if found is not None:
                    seeds.append(run["seed"])
                    cand.append(found)
                    base.append((b[metric], b["acc"]))
            assert t["seeds"] == seeds
            assert t["n"] == len(seeds)
            if len(seeds) < 2:
                assert "p_raw" not in t
                continue
            diff = np.array([c[0] for c in cand]) - np.array([b[0] for b in base])
            assert t["delta"] == pytest.approx(diff.mean(), abs=1e-12)
            if match == "accuracy":
                assert t["cand_sparsity"] == pytest.approx(np.mean([c[1] for c in cand]))
                assert t["base_sparsity"] == pytest.approx(s)
            else:
                acc = np.array([c[1] for c in cand]) - np.array([b[1] for b in base])
                assert t["acc_delta"] == pytest.approx(acc.mean(), abs=1e-12)
            if diff.std() > 0:
                lo, hi = stats.t.interval(
                    0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff)
                )
                assert [t["ci_low"], t["ci_high"]] == pytest.approx([lo, hi], abs=1e-9)
            nonzero = diff[diff != 0]
            if len(nonzero) and len(set(np.abs(nonzero))) == len(nonzero):  # no ties: exact
                assert t["p_raw"] == pytest.approx(stats.wilcoxon(diff).pvalue, rel=1e-9)
            elif not len(nonzero):
                assert t["p_raw"] == 1.0
            assert t["m"] == m
            assert t["p_bonf"] == pytest.approx(min(1.0, m * t["p_raw"]))


def test_claims_follow_the_tests(result):
    _, saved, _ = result
    expected: dict = {}
    for t in saved["analysis"]["tests"]:
        key = f"{t['match']}|{t['kind']}|{t['metric']}|{t['candidate']}"
        entry = expected.setdefault(key, {"better": [], "worse": []})
        if t.get("p_bonf") is None or t["p_bonf"] >= 0.01 or t["n"] < t["of"] / 2:
            continue
        up = t["delta"] > 0 if t["metric"] == "worst" else t["delta"] < 0
        if t["match"] == "accuracy":
            fair = t["cand_sparsity"] >= t["level_sparsity"] - 0.01
        else:
            fair = t["acc_ci"][1] >= 0
        verdict = "better" if up and fair else ("worse" if not up else None)
        if verdict and t["dataset"] not in entry[verdict]:
            entry[verdict].append(t["dataset"])
    assert saved["analysis"]["claims"] == expected
