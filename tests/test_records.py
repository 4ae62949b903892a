"""The record: declared once (`lightning_fairprune.records.Record`), every view derived from it.

A field's declaration is the only place that says where it goes; these tests build a record
from the declaration itself, so a new field is covered the moment it is declared.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

from lightning_fairprune.diagnostics.counts import group_confusion
from lightning_fairprune.diagnostics.group_metrics import group_metrics
from lightning_fairprune.history import HistoryFile, read_history, to_plain
from lightning_fairprune.records import (
    GROUP_TABLE_COLUMNS,
    MOMENTS,
    PER_GROUP_KEYS,
    RATE_KEYS,
    RELATIVE_KEYS,
    Record,
    RecordContext,
    dense_reference,
    group_table,
    make_record,
    record_scalars,
    restamp,
    with_reference,
)

NAMES = ["white", "black & F", "other"]
SLUGS = ["white", "black_F", "other"]


def _value(name: str, kind: str | None, offset: float) -> object:
    """A distinct plain value for a field of the given scalar kind (3 groups)."""
    per_group = [offset + 0.1, offset + 0.2, offset + 0.3]
    if kind == "value":
        return offset
    if kind == "interval":
        return [[v - 0.01, v + 0.01] for v in per_group]
    if kind == "entries":
        return {f"{name}_summary": offset}
    if kind == "per_group_entries":
        return {f"{name}_metric": per_group}
    if kind == "disparity":
        return {"loss": {"gap": offset, "ratio": offset + 1.0}}
    return per_group


def _full_record() -> Record:
    """Every declared field set (the identity fields by hand, the others from their kind)."""
    given = {
        "moment": "before_round",
        "monitor": "attr",
        "round": 2,
        "epoch": 5,
        "global_step": 40,
        "sparsity": 0.5,
        "num_groups": 3,
        "group_names": NAMES,
        "groups_are_classes": False,
        "small_groups": [2],
        "support": [40, 35, 12],
    }
    values = {
        f.name: given.get(f.name, _value(f.name, f.metadata.get("scalar"), 1.0 + k))
        for k, f in enumerate(fields(Record))
    }
    return Record(**values)


def test_every_declared_field_reaches_the_json_history_the_scalars_and_the_table(tmp_path):
    record = _full_record()
    # the JSON-lines history: written, read back, the same record
    file = HistoryFile(tmp_path / "h.jsonl")
    file.write([record.to_dict()])
    (line,) = read_history(file.path)
    assert list(line) == [f.name for f in fields(Record)]
    assert Record.from_dict(line) == record
    assert json.loads(json.dumps(line)) == line
    # the scalars: every field with a scalar kind, under the named monitor's prefix
    scalars = record_scalars(line)
    pre = "fairprune-attr/"
    for f in fields(Record):
        kind, value = f.metadata.get("scalar"), getattr(record, f.name)
        if kind == "value":
            assert scalars[pre + f.name] == value, f.name
        elif kind == "per_group":
            for slug, v in zip(SLUGS, value, strict=True):
                assert scalars[f"{pre}{f.name}/{slug}"] == v, f.name
        elif kind == "interval":
            rate = f.name.removesuffix("_ci")
            for slug, (lo, hi) in zip(SLUGS, value, strict=True):
                assert scalars[f"{pre}{rate}_lower/{slug}"] == lo, f.name
                assert scalars[f"{pre}{rate}_upper/{slug}"] == hi, f.name
        elif kind == "entries":
            for key, v in value.items():
                assert scalars[pre + key] == v, f.name
        elif kind == "per_group_entries":
            for metric, values in value.items():
                for slug, v in zip(SLUGS, values, strict=True):
                    assert scalars[f"{pre}{metric}/{slug}"] == v, f.name
        elif kind == "disparity":
            for quantity, summary in value.items():
                assert scalars[f"{pre}disparity/{quantity}/gap"] == summary["gap"], f.name
        else:
            assert kind is None, f"{f.name}: unknown scalar kind {kind!r}"
    # the per-group table: every table field, in declaration order
    columns, rows = group_table(line)
    assert columns == GROUP_TABLE_COLUMNS
    assert [row[0] for row in rows] == NAMES
    by_column = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
    for f in fields(Record):
        if not f.metadata.get("table"):
            continue
        value = getattr(record, f.name)
        if f.name.endswith("_ci"):
            rate = f.name.removesuffix("_ci")
            assert by_column[f"{rate}_lower"] == [b[0] for b in value], f.name
            assert by_column[f"{rate}_upper"] == [b[1] for b in value], f.name
        else:
            assert by_column[f.name] == pytest.approx(value), f.name
    # the relative fields: cleared without a dense reference
    cleared = with_reference(record, None)
    assert all(getattr(cleared, name) is None for name in RELATIVE_KEYS)


def test_derived_key_lists_are_the_ones_the_views_used_before():
    # the lists the loggers, the W&B table and the report used when they were written by hand
    assert set(PER_GROUP_KEYS) == {
        "group_accuracy", "recall", "intensification", "excess_loss", "grad_norm",
        "hessian_trace", "hessian_trace_se", "hessian_lambda_max", "tpr", "fpr",
        "selection_rate",
    }  # fmt: skip
    assert RATE_KEYS == ("group_accuracy", "tpr", "fpr", "selection_rate")
    assert GROUP_TABLE_COLUMNS == [
        "group", "support", "group_accuracy_dense", "group_accuracy", "group_accuracy_lower",
        "group_accuracy_upper", "tpr", "fpr", "selection_rate", "norm_balance_dense",
        "norm_balance", "intensification", "excess_loss", "predicted_excess_loss", "grad_norm",
        "hessian_trace", "hessian_lambda_max",
    ]  # fmt: skip
    assert set(RELATIVE_KEYS) == {
        "group_accuracy_dense", "recall_dense", "norm_balance_dense", "intensification",
        "alpha", "excess_loss",
    }  # fmt: skip


def _metrics(correct: list[int], support: list[int]):
    """`GroupMetrics` of class groups (binary) with ``correct`` of ``support`` right."""
    targets, preds = [], []
    for group, (right, n) in enumerate(zip(correct, support, strict=True)):
        targets += [group] * n
        preds += [group] * right + [1 - group] * (n - right)
    y, p = torch.tensor(targets), torch.tensor(preds)
    return group_metrics(group_confusion(p, y, y, num_groups=2, num_classes=2))


def test_make_record_fills_relative_fields_against_the_dense_reference():
    dense_m = SimpleNamespace(accuracy=0.75, mean_loss=torch.tensor([0.1, 0.9]))
    dense = make_record(dense_m, _metrics([4, 2], [4, 4]), RecordContext("dense"))
    assert dense.group_accuracy == [1.0, 0.5] == dense.recall
    assert dense.alpha == 1.0
    assert dense.excess_loss == [0.0, 0.0]
    assert dense.support == [4, 4]
    assert dense.small_groups == [0, 1]  # fewer than 30 samples each
    # the rates and their Wilson intervals come from the group metrics, unchanged
    metrics = _metrics([4, 1], [4, 4])
    pruned = make_record(
        SimpleNamespace(accuracy=0.625, mean_loss=torch.tensor([0.2, 1.5])),
        metrics,
        RecordContext(
            "end", round_index=1, epoch=1, global_step=9, sparsity=0.5, monitor="m",
            dense={k: dense_reference(dense)[k] for k in ("recall", "norm_balance", "loss",
                                                          "accuracy")},  # no size limit
        ),
    )  # fmt: skip
    for key, rate in (("group_accuracy", metrics.accuracy), ("tpr", metrics.tpr)):
        assert getattr(pruned, key) == to_plain(rate.value)  # NaN (undefined) as None
        assert getattr(pruned, f"{key}_ci") == to_plain(torch.stack([rate.lower, rate.upper], -1))
    assert pruned.tpr[0] is None  # group 0 (class 0) has no positives: TPR undefined
    # class groups: the parity gaps compare groups on the label itself and are left out
    assert set(pruned.fairness) == {"worst_group_accuracy", "accuracy_difference"}
    # B̃ = (recall - acc) / acc; I = B̃ / B̃_dense per group (hand computation)
    nb = [(1.0 - 0.625) / 0.625, (0.25 - 0.625) / 0.625]
    nb_dense = [(1.0 - 0.75) / 0.75, (0.5 - 0.75) / 0.75]
    assert pruned.norm_balance == pytest.approx(nb)
    assert pruned.norm_balance_dense == pytest.approx(nb_dense)
    assert pruned.intensification == pytest.approx(
        [a / b for a, b in zip(nb, nb_dense, strict=True)]
    )
    assert pruned.excess_loss == pytest.approx([0.1, 0.6])
    assert pruned.monitor == "m"
    assert pruned.recall_dense == [1.0, 0.5]
    assert pruned.disparity["group_accuracy"]["gap"] == pytest.approx(0.75)
    assert pruned.disparity["grad_norm"] is None  # not measured
    with pytest.raises(ValueError, match=r"`moment` to be one of"):
        make_record(dense_m, metrics, RecordContext("later"))


def test_restamp_is_the_same_measurement_at_another_moment():
    m = SimpleNamespace(
        accuracy=0.75, mean_loss=torch.tensor([0.1, 0.9]), predicted_excess_loss=torch.ones(2)
    )
    after = make_record(m, _metrics([4, 2], [4, 4]), RecordContext("after_round", epoch=3))
    assert after.predicted_excess_loss == [1.0, 1.0]
    dense = restamp(after, RecordContext("dense", epoch=4, sparsity=0.25))
    assert (dense.moment, dense.epoch, dense.sparsity) == ("dense", 4, 0.25)
    assert dense.predicted_excess_loss is None  # only an after-round record predicts
    assert (dense.alpha, dense.excess_loss) == (1.0, [0.0, 0.0])  # its own reference
    assert dense.group_accuracy == after.group_accuracy
    assert MOMENTS.index(dense.moment) == 0


def test_records_of_earlier_versions_stay_readable(tmp_path):
    # recall only (no group_accuracy, no norm_balance_dense), as the first versions wrote
    old_dense = {"moment": "dense", "sparsity": 0.0, "accuracy": 0.8, "num_groups": 2,
                 "recall": [0.9, 0.7], "norm_balance": [0.125, -0.125]}  # fmt: skip
    old = {"moment": "end", "sparsity": 0.5, "accuracy": 0.7, "num_groups": 2,
           "recall": [0.85, 0.55], "recall_dense": [0.9, 0.7], "norm_balance": [0.2, -0.2],
           "intensification": [1.6, 1.6], "retired_key": 1}  # fmt: skip
    path = tmp_path / "fairprune_history.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (old_dense, old)) + "\n")
    history = read_history(path)
    record = Record.from_dict(history[1])  # unknown keys ignored, missing ones None
    assert record.recall == [0.85, 0.55]
    assert record.group_accuracy is None
    columns, rows = group_table(history[1], history)
    row = dict(zip(columns, rows[1], strict=True))
    assert row["group_accuracy"] == 0.55  # from `recall`
    assert row["group_accuracy_dense"] == 0.7  # from `recall_dense`
    assert row["norm_balance_dense"] == -0.125  # from the history's dense record
    scalars = record_scalars(history[1])
    assert scalars["fairprune/worst_group_accuracy"] == 0.55
    assert not any(math.isnan(v) for v in scalars.values())


def test_a_new_field_is_one_declaration(tmp_path, monkeypatch):
    # declare two fields the way a new one is declared: a cost read from the pruning event
    # and a per-group table column; nothing else changes, and both reach every view
    from dataclasses import dataclass, field

    from lightning_fairprune import records

    @dataclass(kw_only=True)
    class Extended(records.Record):
        latency: float | None = field(
            default=None,
            metadata=records.view(
                scalar="value", from_event=lambda e, m: e.cost_at(m).get("latency")
            ),
        )
        margin: list | None = field(
            default=None, metadata=records.view(scalar="per_group", table=True)
        )

    monkeypatch.setattr(records, "Record", Extended)
    costs = {"dense": {"latency": 80}, "after_round": {"latency": 40}}
    event = SimpleNamespace(cost_at=lambda moment: costs[moment])
    m = SimpleNamespace(accuracy=0.75, mean_loss=torch.tensor([0.1, 0.9]))
    dense = make_record(m, _metrics([4, 2], [4, 4]), RecordContext("dense", event=event))
    assert dense.latency == 80
    after = restamp(dense, RecordContext("after_round", event=event))
    assert after.latency == 40
    assert restamp(dense, RecordContext("end")).latency is None  # no event at this moment
    after.margin = [0.5, -0.25]
    file = HistoryFile(tmp_path / "h.jsonl")
    file.write([after.to_dict()])
    (line,) = read_history(file.path)
    assert Extended.from_dict(line) == after
    scalars = record_scalars(line)
    assert scalars["fairprune/latency"] == 40
    assert (scalars["fairprune/margin/g0"], scalars["fairprune/margin/g1"]) == (0.5, -0.25)
    columns, rows = group_table(line)
    assert [row[columns.index("margin")] for row in rows] == [0.5, -0.25]
