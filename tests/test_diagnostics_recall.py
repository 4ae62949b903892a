"""Group counts, recall, intensification and disparity against sklearn / numpy references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, recall_score

from lightning_fairprune.diagnostics import (
    accuracy,
    disparity,
    excessive_loss,
    group_counts,
    group_recall,
    intensification_alpha,
    intensification_ratio,
    normalized_recall_balance,
    recall_balance,
)


def _random_predictions(n: int, num_classes: int, absent: tuple[int, ...], seed: int):
    gen = torch.Generator().manual_seed(seed)
    present = [c for c in range(num_classes) if c not in absent]
    y = torch.tensor(present)[torch.randint(len(present), (n,), generator=gen)]
    logits = torch.randn(n, num_classes, generator=gen)
    # make the model right ~60% of the time so recalls differ across classes
    right = torch.rand(n, generator=gen) < 0.6
    logits[right, y[right]] += 5.0
    return logits, y


def test_class_recall_matches_sklearn_with_absent_class():
    logits, y = _random_predictions(300, 6, absent=(4,), seed=1)
    support, correct = group_counts(logits, y, num_classes=6)
    with pytest.warns(UserWarning, match=r"group\(s\) \[4\]"):
        recall = group_recall(support, correct)
    preds = logits.argmax(1).numpy()
    ref = recall_score(y.numpy(), preds, labels=list(range(6)), average=None, zero_division=0)
    present = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(recall.numpy()[present], ref[present], rtol=0, atol=1e-12)
    assert math.isnan(recall[4])  # missing, not 0 and not another class's value
    assert accuracy(support, correct) == pytest.approx(accuracy_score(y.numpy(), preds), abs=1e-12)
    assert support.dtype == torch.float64
    assert support.sum() == 300


def test_protected_attribute_recall_matches_sklearn_per_group():
    logits, y = _random_predictions(400, 5, absent=(), seed=2)
    gen = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 3, (400,), generator=gen)  # group 3 of 4 is absent
    support, correct = group_counts(logits, y, groups, num_groups=4, num_classes=5)
    with pytest.warns(UserWarning, match="have no samples"):
        recall = group_recall(support, correct)
    preds = logits.argmax(1).numpy()
    for a in range(3):
        sel = groups.numpy() == a
        assert recall[a].item() == pytest.approx(
            accuracy_score(y.numpy()[sel], preds[sel]), abs=1e-12
        )
        # per-class rows of the group give sklearn's per-class recall within the group
        ref = recall_score(
            y.numpy()[sel], preds[sel], labels=list(range(5)), average=None, zero_division=0
        )
        np.testing.assert_allclose((correct[a] / support[a]).numpy(), ref, atol=1e-12)
    assert math.isnan(recall[3])


def test_streaming_batches_lacking_groups_are_not_misattributed():
    """torchmetrics issue 3489: a batch without some group must not shift counts."""
    logits, y = _random_predictions(240, 4, absent=(), seed=4)
    groups = torch.cat([torch.zeros(80), torch.full((80,), 2), torch.ones(80)]).long()
    whole = group_counts(logits, y, groups, num_groups=3, num_classes=4)
    parts = [
        group_counts(logits[s : s + 80], y[s : s + 80], groups[s : s + 80], 3, 4)
        for s in (0, 80, 160)
    ]  # every batch holds a single group
    support = sum(p[0] for p in parts)
    correct = sum(p[1] for p in parts)
    torch.testing.assert_close(support, whole[0], rtol=0, atol=0)
    torch.testing.assert_close(correct, whole[1], rtol=0, atol=0)
    recall = group_recall(support, correct)
    preds = logits.argmax(1).numpy()
    for a in range(3):
        sel = groups.numpy() == a
        assert recall[a].item() == pytest.approx(accuracy_score(y.numpy()[sel], preds[sel]))


def test_integer_predictions_and_inferred_sizes():
    preds = torch.tensor([0, 2, 1, 1])
    y = torch.tensor([0, 1, 1, 2])
    support, correct = group_counts(preds, y)
    assert support.shape == (3, 3)
    torch.testing.assert_close(
        group_recall(support, correct), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    )


def test_balance_intensification_and_alpha_against_numpy():
    recall_ref = np.array([0.95, 0.80, 0.60, 0.90, np.nan])
    recall_now = np.array([0.97, 0.70, 0.35, 0.92, 0.5])
    acc_ref, acc_now = 0.82, 0.74
    b = recall_balance(torch.tensor(recall_now), acc_now)
    np.testing.assert_allclose(b.numpy(), recall_now - acc_now)
    nrb_ref = normalized_recall_balance(torch.tensor(recall_ref), acc_ref)
    nrb_now = normalized_recall_balance(recall_now.tolist(), acc_now)
    np.testing.assert_allclose(nrb_now.numpy(), (recall_now - acc_now) / acc_now)
    ratio = intensification_ratio(nrb_now, nrb_ref)
    np.testing.assert_allclose(
        ratio.numpy()[:4],
        ((recall_now - acc_now) / acc_now / ((recall_ref - acc_ref) / acc_ref))[:4],
    )
    assert math.isnan(ratio[4])
    # alpha: least squares through the origin over present groups, via numpy lstsq
    x = ((recall_ref - acc_ref) / acc_ref)[:4]
    yv = ((recall_now - acc_now) / acc_now)[:4]
    ref_alpha = np.linalg.lstsq(x[:, None], yv, rcond=None)[0][0]
    assert intensification_alpha(nrb_now, nrb_ref) == pytest.approx(ref_alpha, rel=1e-12)
    # a pure scaling gives exactly that scale
    assert intensification_alpha([0.3, -0.6], [0.1, -0.2]) == pytest.approx(3.0)
    assert math.isnan(intensification_alpha([0.1, 0.2], [0.0, float("nan")]))


def test_excessive_loss_and_disparity():
    torch.testing.assert_close(
        excessive_loss([0.5, float("nan")], torch.tensor([0.2, 0.1])),
        torch.tensor([0.3, math.nan], dtype=torch.float64),
        equal_nan=True,
    )
    d = disparity([0.9, float("nan"), 0.45, 0.6], higher_is_worse=False)
    assert d == {"max": 0.9, "min": 0.45, "gap": pytest.approx(0.45), "ratio": 2.0,
                 "worst": 2, "best": 0}  # fmt: skip
    d = disparity([1.0, 3.0])
    assert (d["worst"], d["best"], d["ratio"]) == (1, 0, 3.0)
    empty = disparity([float("nan")])
    assert empty["worst"] is None
    assert math.isnan(empty["gap"])


def test_missing_group_warns_once_and_accuracy_of_nothing():
    support = torch.zeros(3, 2)
    support[0, 0] = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group_recall(support, support.clone())
    assert len(caught) == 1
    assert "[1, 2]" in str(caught[0].message)
    with pytest.warns(UserWarning, match="no samples"):
        assert math.isnan(accuracy(torch.zeros(2, 2), torch.zeros(2, 2)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(targets=torch.tensor([0, -1])), "got ids from -1 to 0"),
        (dict(targets=torch.tensor([0.0, 1.0])), "integer tensor of class labels"),
        (dict(targets=torch.tensor([0, 5])), r"in \[0, 3\)"),
        (dict(groups=torch.tensor([0, 2]), num_groups=2), r"group ids in \[0, 2\)"),
        (dict(groups=torch.tensor([0, -3]), num_groups=2), "got ids from -3 to 0"),
        (dict(groups=torch.tensor([0.0, 1.0]), num_groups=2), "integer tensor of group ids"),
        (dict(targets=torch.tensor([0, 1, 2])), "same length"),
        (dict(num_groups=0), "an int >= 1"),
    ],
)
def test_bad_input(kwargs, match):
    args = (
        dict(preds_or_logits=torch.randn(2, 3), targets=torch.tensor([0, 1]), num_classes=3)
        | kwargs
    )
    with pytest.raises(ValueError, match=match):
        group_counts(**args)


def test_logits_width_must_match_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        group_counts(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), num_classes=4)
