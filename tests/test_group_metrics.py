"""Group fairness metrics checked against fairlearn's MetricFrame, scipy and naive loops."""

from __future__ import annotations

import functools
import itertools
import math
import re

import numpy as np
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, recall_score

from lightning_fairprune.diagnostics import (
    GroupConfusion,
    PerGroupMetric,
    combine_groups,
    confusion_to_counts,
    group_confusion,
    group_counts,
    group_metrics,
    group_slugs,
    guarded_intensification_ratio,
    intensification_ratio,
    normalize_group_names,
    product_group_names,
    split_groups,
    wilson_interval,
)

try:  # newer fairlearn releases only; otherwise the test uses MetricFrame.difference() only
    from fairlearn.metrics import equal_opportunity_difference
except ImportError:  # pragma: no cover
    equal_opportunity_difference = None

# fairlearn warns when a metric is a functools.partial (no __name__); harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Supplied 'func' had no __name__")

# ---------------------------------------------------------------------------------------------
# Data: random labels with an absent group, a one-sample group and a group without positives
# ---------------------------------------------------------------------------------------------

G = 6  # group 3: no positives (binary); group 4: absent; group 5: exactly one sample


def _data(seed: int, num_classes: int, n: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = rng.choice([0, 1, 2, 3], size=n, p=[0.5, 0.3, 0.15, 0.05])
    groups[rng.integers(n)] = 5
    y = rng.integers(0, num_classes, size=n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, num_classes, size=n))
    if num_classes == 2:
        y[groups == 3] = 0  # TPR undefined in group 3
    return y, pred, groups


def _conf(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, num_classes: int) -> torch.Tensor:
    return group_confusion(
        torch.from_numpy(pred), torch.from_numpy(y), torch.from_numpy(groups), G, num_classes
    )


def _by_group(frame: MetricFrame, name: str) -> np.ndarray:
    """fairlearn's per-group values placed at group ids 0..G-1 (NaN for groups it never saw)."""
    out = np.full(G, np.nan)
    for g, v in frame.by_group[name].items():
        out[int(g)] = v
    return out


def _close(ours: torch.Tensor | float, ref: np.ndarray | float) -> None:
    np.testing.assert_allclose(np.asarray(ours, dtype=float), np.asarray(ref, dtype=float))


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


def test_confusion_matches_naive_loop_for_every_input_form():
    rng = np.random.default_rng(1)
    n = 50
    y, groups = rng.integers(0, 2, n), rng.integers(0, 3, n)
    probs = rng.random(n)
    naive = np.zeros((3, 2, 2), dtype=np.int64)
    for t, p, g in zip(y, (probs >= 0.3).astype(int), groups, strict=True):
        naive[g, t, p] += 1
    yt, gt = torch.from_numpy(y), torch.from_numpy(groups)
    p = torch.from_numpy(probs)
    logits = torch.logit(p)  # outside [0, 1]: sigmoid(logit(p)) = p
    two_col = torch.stack(
        [
            torch.zeros(n, dtype=torch.float64),
            logits - torch.logit(torch.tensor(0.3, dtype=torch.float64)),
        ],
        1,
    )
    for preds, kw in [
        (p, {"threshold": 0.3}),
        (p[:, None], {"threshold": 0.3}),
        (logits, {"threshold": 0.3}),
        (torch.from_numpy((probs >= 0.3).astype(np.int64)), {}),
        (two_col, {}),  # argmax: class 1 iff logit(p) > logit(0.3)
    ]:
        np.testing.assert_array_equal(group_confusion(preds, yt, gt, 3, 2, **kw).numpy(), naive)


def test_streaming_halves_sum_to_one_pass_and_to_group_counts():
    y, pred, groups = _data(2, num_classes=3, n=90)
    yt, pt, gt = (torch.from_numpy(a) for a in (y, pred, groups))
    one_pass = group_confusion(pt, yt, gt, G, 3)
    ranks = []
    for half, validate in ((slice(0, 45), True), (slice(45, 90), False)):  # two "processes"
        m = GroupConfusion(G, 3, validate=validate)
        for b in range(3):
            s = slice(half.start + 15 * b, half.start + 15 * (b + 1))
            m.update(pt[s], yt[s], gt[s])
        ranks.append(m.compute())
    total = ranks[0] + ranks[1]  # what an all-reduce(sum) gives
    assert total.dtype == torch.int64
    torch.testing.assert_close(total, one_pass, rtol=0, atol=0)
    naive = np.zeros((G, 3, 3), dtype=np.int64)
    np.add.at(naive, (groups, y, pred), 1)
    np.testing.assert_array_equal(one_pass.numpy(), naive)
    # the same counts as the recall-distortion path
    support, correct = group_counts(pt, yt, gt, num_groups=G, num_classes=3)
    s2, c2 = confusion_to_counts(one_pass)
    torch.testing.assert_close(s2, support)
    torch.testing.assert_close(c2, correct)


def test_state_dict_round_trip_and_reset():
    m = GroupConfusion(2, 2)
    m.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1]))
    other = GroupConfusion(2, 2)
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(other.compute(), m.compute())
    m.reset()
    assert int(m.compute().sum()) == 0
    with pytest.raises(ValueError, match=r"state\['confusion'\]"):
        GroupConfusion(3, 2).load_state_dict(other.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": torch.tensor([0.0, 1.0])}, "Expected `groups` to be a 1-D integer tensor"),
        ({"groups": torch.tensor([0, 3])}, r"Expected `groups` to hold group ids in \[0, 3\)"),
        ({"groups": torch.tensor([0, -1])}, "Expected `groups` to hold group ids in"),
        ({"groups": torch.tensor([0])}, "same length"),
        ({"targets": torch.tensor([0, 2])}, r"Expected `targets` to hold class labels in \[0, 2\)"),
        ({"preds_or_logits": torch.zeros(2, 3)}, "`num_classes`=2"),
        ({"threshold": 1.5}, r"Expected `threshold` to be a float in \[0, 1\], but got 1.5"),
    ],
)
def test_bad_input_names_argument_value_and_expectation(kwargs, match):
    args = {
        "preds_or_logits": torch.tensor([0, 1]),
        "targets": torch.tensor([0, 1]),
        "groups": torch.tensor([0, 1]),
        "num_groups": 3,
        "num_classes": 2,
    } | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        group_confusion(**args)


# ---------------------------------------------------------------------------------------------
# Binary metrics against fairlearn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pos_label", [1, 0])
def test_binary_zero_division_zero_reproduces_fairlearn_exactly(seed, pos_label):
    y, pred, groups = _data(seed, num_classes=2)
    m = group_metrics(_conf(y, pred, groups, 2), pos_label=pos_label, zero_division=0.0)
    tpr = functools.partial(true_positive_rate, pos_label=pos_label)
    fpr = functools.partial(false_positive_rate, pos_label=pos_label)
    sel = functools.partial(selection_rate, pos_label=pos_label)
    mf = MetricFrame(
        metrics={"acc": accuracy_score, "tpr": tpr, "fpr": fpr, "sel": sel, "n": count},
        y_true=y,
        y_pred=pred,
        sensitive_features=groups,
    )
    _close(m.accuracy.value, _by_group(mf, "acc"))
    _close(m.tpr.value, _by_group(mf, "tpr"))
    _close(m.fpr.value, _by_group(mf, "fpr"))
    _close(m.selection_rate.value, _by_group(mf, "sel"))
    _close(m.count[m.present], mf.by_group["n"].to_numpy())
    assert m.present.tolist() == [True, True, True, True, False, True]
    diff, ratio, gmin = mf.difference(), mf.ratio(), mf.group_min()
    s = m.summary
    _close(s["demographic_parity_difference"], diff["sel"])
    _close(s["demographic_parity_ratio"], ratio["sel"])
    _close(s["equal_opportunity_difference"], diff["tpr"])
    _close(s["equalized_odds_difference"], max(diff["tpr"], diff["fpr"]))
    _close(s["worst_group_accuracy"], gmin["acc"])
    _close(s["worst_group_tpr"], gmin["tpr"])
    _close(s["accuracy_difference"], diff["acc"])
    assert m.worst_group == int(mf.by_group["acc"].idxmin())
    if pos_label == 1:  # fairlearn's summary functions take pos_label 1 only
        kw = {"sensitive_features": groups}
        _close(s["demographic_parity_difference"], demographic_parity_difference(y, pred, **kw))
        _close(s["demographic_parity_ratio"], demographic_parity_ratio(y, pred, **kw))
        _close(s["equalized_odds_difference"], equalized_odds_difference(y, pred, **kw))
        if equal_opportunity_difference is not None:
            eod = equal_opportunity_difference(y, pred, **kw)
            _close(s["equal_opportunity_difference"], eod)


@pytest.mark.parametrize("seed", [0, 3])
def test_binary_default_marks_undefined_rates_nan_and_summarizes_defined_groups(seed):
    y, pred, groups = _data(seed, num_classes=2)
    m = group_metrics(_conf(y, pred, groups, 2))
    mf = MetricFrame(
        metrics={"tpr": true_positive_rate, "fpr": false_positive_rate, "sel": selection_rate},
        y_true=y,
        y_pred=pred,
        sensitive_features=groups,
    )
    # independent denominators from numpy: positives / negatives per group
    pos = np.array([(y[groups == g] == 1).sum() for g in range(G)])
    neg = np.array([(y[groups == g] == 0).sum() for g in range(G)])
    ref_tpr = np.where(pos > 0, _by_group(mf, "tpr"), np.nan)
    ref_fpr = np.where(neg > 0, _by_group(mf, "fpr"), np.nan)
    assert math.isnan(ref_tpr[3])
    assert _by_group(mf, "tpr")[3] == 0.0
    _close(m.tpr.value, ref_tpr)
    _close(m.fpr.value, ref_fpr)
    _close(m.selection_rate.value, _by_group(mf, "sel"))

    def gap(v: np.ndarray) -> float:
        return float(np.nanmax(v) - np.nanmin(v))

    _close(m.summary["equal_opportunity_difference"], gap(ref_tpr))
    _close(m.summary["worst_group_tpr"], np.nanmin(ref_tpr))
    _close(m.summary["equalized_odds_difference"], max(gap(ref_tpr), gap(ref_fpr)))
    _close(m.summary["demographic_parity_difference"], mf.difference()["sel"])


def test_one_sample_group_and_all_absent():
    # group 0: one positive predicted positive; group 1: one negative predicted positive
    conf = group_confusion(torch.tensor([1, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), 3, 2)
    m = group_metrics(conf, zero_division=0.0)
    y, p, g = np.array([1, 0]), np.array([1, 1]), np.array([0, 1])
    mf = MetricFrame(
        metrics={"tpr": true_positive_rate, "fpr": false_positive_rate, "acc": accuracy_score},
        y_true=y,
        y_pred=p,
        sensitive_features=g,
    )
    _close(m.tpr.value[:2], mf.by_group["tpr"].to_numpy())
    _close(m.fpr.value[:2], mf.by_group["fpr"].to_numpy())
    _close(m.accuracy.value[:2], mf.by_group["acc"].to_numpy())
    _close(
        m.summary["equalized_odds_difference"],
        equalized_odds_difference(y, p, sensitive_features=g),
    )
    assert math.isnan(float(m.accuracy.value[2]))
    # default: each one-sample group has one undefined rate, so TPR/FPR gaps are over 1 group
    d = group_metrics(conf)
    assert d.summary["equal_opportunity_difference"] == 0.0
    assert d.summary["equalized_odds_difference"] == 0.0
    empty = group_metrics(torch.zeros(2, 2, 2, dtype=torch.int64))
    assert all(math.isnan(v) for v in empty.summary.values())
    assert empty.worst_group is None


# ---------------------------------------------------------------------------------------------
# Multiclass against fairlearn / sklearn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_against_fairlearn(seed):
    c = 4
    y, pred, groups = _data(seed, num_classes=c)
    m = group_metrics(_conf(y, pred, groups, c))
    assert m.tpr is None
    assert m.fpr is None
    assert m.selection_rate is None
    recall = functools.partial(
        recall_score, labels=list(range(c)), average=None, zero_division=np.nan
    )
    mf = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=groups)
    acc = np.full(G, np.nan)
    for g, v in mf.by_group.items():
        acc[int(g)] = v
    _close(m.accuracy.value, acc)
    _close(m.summary["worst_group_accuracy"], mf.group_min())
    rec = MetricFrame(metrics=recall, y_true=y, y_pred=pred, sensitive_features=groups)
    for g in range(G):
        ref = rec.by_group[g] if (groups == g).any() else np.full(c, np.nan)
        _close(m.class_recall.value[g], ref)
    diffs, ratios = [], []
    for k in range(c):
        sel = MetricFrame(
            metrics=functools.partial(selection_rate, pos_label=k),
            y_true=y,
            y_pred=pred,
            sensitive_features=groups,
        )
        out = np.full(G, np.nan)
        for g, v in sel.by_group.items():
            out[int(g)] = v
        _close(m.class_selection_rate.value[:, k], out)
        yk, pk = (y == k).astype(int), (pred == k).astype(int)
        diffs.append(demographic_parity_difference(yk, pk, sensitive_features=groups))
        ratios.append(demographic_parity_ratio(yk, pk, sensitive_features=groups))
    _close(m.summary["demographic_parity_difference"], max(diffs))
    _close(m.summary["demographic_parity_ratio"], min(ratios))


def test_two_classes_as_multiclass_dp_equals_binary_dp():
    y, pred, groups = _data(5, num_classes=2)
    conf = _conf(y, pred, groups, 2)
    multi, binary = group_metrics(conf, pos_label=None), group_metrics(conf)
    ref = demographic_parity_difference(y, pred, sensitive_features=groups)
    _close(multi.summary["demographic_parity_difference"], ref)
    _close(binary.summary["demographic_parity_difference"], ref)


# ---------------------------------------------------------------------------------------------
# Wilson intervals and small groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(confidence):
    cases = [(0, 1), (1, 1), (0, 5), (3, 7), (20, 43), (43, 43), (500, 1000)]
    k = torch.tensor([a for a, _ in cases])
    n = torch.tensor([b for _, b in cases])
    lo, hi = wilson_interval(k, n, confidence)
    for i, (a, b) in enumerate(cases):
        ci = binomtest(a, b).proportion_ci(confidence_level=confidence, method="wilson")
        assert float(lo[i]) == pytest.approx(ci.low, abs=1e-12)
        assert float(hi[i]) == pytest.approx(ci.high, abs=1e-12)
    lo0, hi0 = wilson_interval(torch.tensor([0]), torch.tensor([0]))
    assert math.isnan(float(lo0))
    assert math.isnan(float(hi0))
    with pytest.raises(ValueError, match="Expected `confidence` to be a float in"):
        wilson_interval(k, n, 1.0)


def test_metric_intervals_and_small_flags():
    y, pred, groups = _data(4, num_classes=2)
    m = group_metrics(_conf(y, pred, groups, 2), confidence=0.9, min_group_size=10)
    sizes = np.bincount(groups, minlength=G)
    np.testing.assert_array_equal(m.small.numpy(), (sizes > 0) & (sizes < 10))
    boundary = torch.zeros(3, 2, 2, dtype=torch.int64)
    boundary[0, 0, 0], boundary[1, 1, 1] = 9, 10  # sizes 9, 10 and an absent group
    assert group_metrics(boundary, min_group_size=10).small.tolist() == [True, False, False]
    for g in range(G):
        pos = y[groups == g] == 1
        tp = int((pred[groups == g][pos] == 1).sum())
        if pos.sum() == 0:
            assert math.isnan(float(m.tpr.lower[g]))
            assert math.isnan(float(m.tpr.upper[g]))
            continue
        ci = binomtest(tp, int(pos.sum())).proportion_ci(0.9, method="wilson")
        assert float(m.tpr.lower[g]) == pytest.approx(ci.low, abs=1e-12)
        assert float(m.tpr.upper[g]) == pytest.approx(ci.high, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Records for logging
# ---------------------------------------------------------------------------------------------


def test_record_scalars_and_table_of_group_metrics_use_names_and_skip_absent_groups():
    # one flattening: the metrics reach the logger keys through the record
    from types import SimpleNamespace

    from lightning_fairprune.records import RecordContext, group_table, make_record, record_scalars

    y, pred, groups = _data(0, num_classes=2)
    names = ["white", "black", "east asian", "south/asian", "other", "indigenous"]
    m = group_metrics(_conf(y, pred, groups, 2))
    measurement = SimpleNamespace(accuracy=float((y == pred).mean()), mean_loss=torch.zeros(G))
    context = RecordContext("end", group_names=names, groups_are_classes=False)
    record = make_record(measurement, m, context).to_dict()
    d = record_scalars(record)
    assert all(re.fullmatch(r"fairprune/[a-z_]+(/[A-Za-z0-9_.\-]+){0,2}", k) for k in d)
    assert d["fairprune/tpr/east_asian"] == pytest.approx(
        recall_score(y[groups == 2], pred[groups == 2])
    )
    assert d["fairprune/tpr_lower/black"] == float(m.tpr.lower[1])
    assert not any(k.endswith("/other") for k in d)  # absent group 4: no value is logged
    assert d["fairprune/equalized_odds_difference"] == m.summary["equalized_odds_difference"]
    columns, rows = group_table(record)
    assert [r[0] for r in rows] == names
    support = columns.index("support")
    assert rows[3][support] == int((groups == 3).sum())
    assert rows[4][support] == 0
    counts = [int((groups == g).sum()) for g in range(G)]
    assert record["small_groups"] == [g for g, n in enumerate(counts) if 0 < n < 30]


# ---------------------------------------------------------------------------------------------
# Intensification guard
# ---------------------------------------------------------------------------------------------


def test_guard_returns_nan_near_zero_balance_and_leaves_recall_unchanged():
    # the user's case: dense recall 0.843 at accuracy 0.842 -> B̃_ref = 0.0012
    acc_ref, acc_t = 0.842, 0.80
    rec_ref = torch.tensor([0.843, 0.60, 0.95])
    rec_t = torch.tensor([0.805, 0.50, 0.92])
    nrb_ref = (rec_ref.double() - acc_ref) / acc_ref
    nrb_t = (rec_t.double() - acc_t) / acc_t
    raw = intensification_ratio(nrb_t, nrb_ref)
    assert float(raw[0]) > 4  # recall.py unchanged: the huge, meaningless ratio
    guarded = guarded_intensification_ratio(nrb_t, nrb_ref)
    assert math.isnan(float(guarded[0]))
    torch.testing.assert_close(guarded[1:], raw[1:])
    # support-aware: with 43 samples one sample moves B̃ by 1/(43*0.842) = 0.0276 > 0.02
    support = [43, 5000, 5000]
    ref = [0.025, 0.025, 0.3]
    out = guarded_intensification_ratio(
        [0.05, 0.05, 0.6], ref, support_ref=support, acc_ref=acc_ref
    )
    expected = []
    for b_t, b, n in zip([0.05, 0.05, 0.6], ref, support, strict=True):
        limit = max(0.02, 1 / (n * acc_ref))
        expected.append(b_t / b if abs(b) >= limit else math.nan)
    _close(out, np.array(expected))
    with pytest.raises(ValueError, match="`support_ref` and `acc_ref`"):
        guarded_intensification_ratio([0.1], [0.1], support_ref=[3])


# ---------------------------------------------------------------------------------------------
# Names, intersections, slugs
# ---------------------------------------------------------------------------------------------


def test_normalize_group_names_and_errors():
    assert normalize_group_names(None, 2) == ["g0", "g1"]
    assert normalize_group_names({0: "a", 2: "c"}, 3) == ["a", "g1", "c"]
    with pytest.raises(ValueError, match=r"Expected `group_names` to have 3 names.*\['a'\]"):
        normalize_group_names(["a"], 3)
    with pytest.raises(ValueError, match=r"keys in \[0, 2\), but got 5"):
        normalize_group_names({5: "x"}, 2)
    with pytest.raises(ValueError, match=r"unique, but got duplicates \['a'\]"):
        normalize_group_names(["a", "a"], 2)
    with pytest.raises(TypeError, match="hold strings, but got 3"):
        normalize_group_names(["a", 3], 2)
    with pytest.raises(TypeError, match="list of names or a mapping"):
        normalize_group_names("ab", 2)


def test_combine_groups_against_brute_force_and_inverse():
    rng = np.random.default_rng(0)
    sizes = [3, 2, 4]
    attrs = [rng.integers(0, s, 40) for s in sizes]
    vnames = [["white", "black", "other"], {1: "F", 0: "M"}, None]
    c = combine_groups([torch.from_numpy(a) for a in attrs], sizes, ["race", "sex", "age"], vnames)
    combos = list(itertools.product(*(range(s) for s in sizes)))  # lexicographic = mixed radix
    assert c.num_groups == len(combos) == len(c.names)
    for i in range(40):
        key = tuple(int(a[i]) for a in attrs)
        assert int(c.ids[i]) == combos.index(key)
        race, sex = vnames[0][key[0]], vnames[1][key[1]]
        assert c.names[int(c.ids[i])] == f"race={race} & sex={sex} & age={key[2]}"
    back = split_groups(c.ids, sizes)
    for a, b in zip(attrs, back, strict=True):
        np.testing.assert_array_equal(b.numpy(), a)
    assert product_group_names([2], ["x"]) == ["x=0", "x=1"]
    with pytest.raises(
        ValueError, match=r"Expected `attributes\[1\]` to hold attribute values in \[0, 2\)"
    ):
        combine_groups([torch.tensor([0]), torch.tensor([2])], [2, 2])
    with pytest.raises(ValueError, match="Expected `sizes` to hold positive ints"):
        combine_groups([torch.tensor([0])], [0])


def test_slugs_are_key_safe_and_unique():
    names = product_group_names([2, 2], ["race", "sex"], [["white", "black"], ["M", "F"]])
    names += ["a b", "a/b", "é", "  "]
    slugs = group_slugs(names)
    assert slugs[3] == "race-black_sex-F"
    assert len(set(slugs)) == len(slugs)
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+", s) for s in slugs)


# ---------------------------------------------------------------------------------------------
# Any torchmetrics metric per group, and torchmetrics issue #3489
# ---------------------------------------------------------------------------------------------


def test_per_group_metric_right_where_torchmetrics_group_stat_rates_misattributes():
    from torchmetrics.classification import BinaryGroupStatRates, BinaryStatScores

    batches = [  # batch 1 holds only group 2; batch 2 holds groups 0 and 1
        (torch.tensor([1, 0, 1]), torch.tensor([1, 0, 0]), torch.tensor([2, 2, 2])),
        (torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]), torch.tensor([0, 1, 0, 1])),
    ]
    naive = np.zeros((3, 4), dtype=np.int64)  # tp, fp, tn, fn per group
    for p, t, g in batches:
        for pi, ti, gi in zip(p.tolist(), t.tolist(), g.tolist(), strict=True):
            naive[gi, [pi and ti, pi and not ti, not pi and not ti, not pi and ti].index(True)] += 1
    tm = BinaryGroupStatRates(num_groups=3)
    ours = PerGroupMetric(BinaryStatScores(), num_groups=3)
    conf = GroupConfusion(3, 2)
    for p, t, g in batches:
        tm.update(p, t, g)
        ours.update(p, t, groups=g)
        conf.update(p, t, g)
    tm_counts = torch.stack([tm.tp, tm.fp, tm.tn, tm.fn], 1).numpy()
    assert not np.array_equal(tm_counts, naive)  # torchmetrics 1.9: group 2's batch went to group 0
    for g, v in enumerate(ours.compute()):
        np.testing.assert_array_equal(v[:4].numpy(), naive[g])  # [tp, fp, tn, fn, support]
    c = conf.compute()
    ours_conf = torch.stack([c[:, 1, 1], c[:, 0, 1], c[:, 0, 0], c[:, 1, 0]], 1).numpy()
    np.testing.assert_array_equal(ours_conf, naive)


def test_per_group_metric_against_sklearn_with_absent_group():
    from torchmetrics.classification import MulticlassAccuracy

    y, pred, groups = _data(1, num_classes=3)
    m = PerGroupMetric(MulticlassAccuracy(num_classes=3, average="micro"), num_groups=G)
    for s in (slice(0, 50), slice(50, 120)):
        m.update(
            torch.from_numpy(pred[s]), torch.from_numpy(y[s]), groups=torch.from_numpy(groups[s])
        )
    values = m.compute()
    for g in range(G):
        if (groups == g).any():
            assert float(values[g]) == pytest.approx(
                accuracy_score(y[groups == g], pred[groups == g])
            )
        else:
            assert math.isnan(values[g])
    m.reset()
    assert int(m.counts.sum()) == 0
    with pytest.raises(TypeError, match="Expected `metric` to be a torchmetrics Metric"):
        PerGroupMetric(object(), 2)
