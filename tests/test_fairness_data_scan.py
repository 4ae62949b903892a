"""`FairnessData.scan`: the whole fairness data checked once before training, forward-free."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from _ddp import run_ddp
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune.fairness_data import FairnessData


def _batches(num_batches=4, n=6, num_groups=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        x = torch.randn(n, 3, generator=gen)
        y = torch.randint(0, 2, (n,), generator=gen)
        g = torch.randint(0, num_groups, (n,), generator=gen)
        out.append((x, y, g))
    return out


def test_counts_equal_a_naive_count_over_every_batch():
    batches = _batches(num_batches=5, num_groups=4)
    scan = FairnessData(batches, num_groups=4).scan(None)
    naive = [0] * 4
    for _, _, g in batches:
        for v in g.tolist():
            naive[v] += 1
    assert scan.counts == naive
    assert scan.num_batches == 5
    assert scan.groups_from_batch


def test_a_bad_group_id_in_the_last_batch_names_the_batch_and_the_id():
    batches = _batches(num_batches=4, num_groups=4)
    batches[3][2][4] = 9  # group 9 of 4, in the last batch only
    with pytest.raises(
        ValueError, match=r"ids from 0 to 9 in fairness batch 3 \(offending ids: \[9\]\)"
    ):
        FairnessData(batches, num_groups=4).scan(None)


def test_class_groups_are_checked_against_the_resolved_number_of_groups():
    batches = [(x, y, None) for x, y, _ in _batches(num_batches=3)]
    batches = [(x, y) for x, y, _ in batches]
    batches[2][1][0] = 5  # class 5 of a 2-class model
    with pytest.raises(ValueError, match=r"fairness batch 2 \(offending ids: \[5\]\)"):
        FairnessData(batches).scan(None, num_groups=2)


def test_nan_inputs_name_the_batch_and_the_group_of_the_sample():
    batches = _batches(num_batches=4, num_groups=4)
    x, _, g = batches[2]
    rows = [i for i in range(len(g)) if int(g[i]) == int(g[0])][:1]
    x[rows[0], 1] = float("nan")
    with pytest.raises(
        ValueError, match=rf"batch 2 has NaN .* 1 sample\(s\) of group\(s\) \[{int(g[0])}\]"
    ):
        FairnessData(batches, num_groups=4).scan(None)


def test_nested_inputs_are_walked_for_non_finite_values():
    data = FairnessData(
        [{"x": {"a": torch.zeros(3, 2), "b": torch.tensor([[1.0], [float("inf")], [0.0]])},
          "y": torch.tensor([0, 1, 0]), "group": torch.tensor([0, 2, 1])}],
        num_groups=3,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"batch 0 has NaN or infinite .* group\(s\) \[2\]"):
        data.scan(None)


def test_groups_with_no_samples_are_reported():
    batches = _batches(num_batches=3, num_groups=3)  # ids 0..2 of num_groups=5
    with pytest.warns(UserWarning, match=r"groups 3, 4 of 5 have no samples .*3 batches scanned"):
        scan = FairnessData(batches, num_groups=5).scan(None)
    assert scan.empty_groups == [3, 4]


def test_max_batches_bounds_the_scan():
    batches = _batches(num_batches=4, num_groups=4)
    batches[3][2][0] = 9  # beyond max_batches=3: never measured, so not scanned either
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan = FairnessData(batches, num_groups=4, max_batches=3).scan(None)
    naive = torch.bincount(torch.cat([g for _, _, g in batches[:3]]), minlength=4).tolist()
    assert scan.num_batches == 3
    assert scan.counts == naive


def test_the_scan_leaves_the_loaders_rng_alone():
    x, y, g = (torch.cat(t) for t in zip(*_batches(num_batches=4), strict=True))
    loader = DataLoader(TensorDataset(x, y, g), batch_size=5, shuffle=True)
    torch.manual_seed(3)
    expected = [b[1].tolist() for b in loader]
    torch.manual_seed(3)
    FairnessData(loader, num_groups=4).scan(None)
    assert [b[1].tolist() for b in loader] == expected


def test_two_processes_agree_on_a_bad_batch_and_on_the_counts(tmp_path):
    script = Path(__file__).with_name("ddp_scan_script.py")
    ranks = run_ddp(script, tmp_path, timeout=120)
    batches = _batches(num_batches=6, num_groups=4, seed=1)
    naive = torch.bincount(torch.cat([g for _, _, g in batches]), minlength=4).tolist()
    for rank, result in enumerate(ranks):
        # each process scans every other batch of a derived loader; the counts are global
        assert result["strided_counts"] == naive, rank
        assert result["strided_batches"] == 6
        # a bad batch (index 3) only rank 1 sees: both processes raise, neither hangs
        expected = "in fairness batch 3" if rank == 1 else "1 other process(es) failed a check"
        assert expected in result["bad_error"], rank


def test_intersectional_column_with_the_default_group_key():
    """A [N, 2] group column under the default `group_key` (reported: 'zip() argument 2 is
    shorter' in every batch); ids are the row-major products, names a0/a1."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=gen), torch.randint(0, 2, (10,), generator=gen)
    g = torch.stack([torch.randint(0, 2, (10,), generator=gen), torch.randint(0, 3, (10,))], 1)
    data = FairnessData(DataLoader(TensorDataset(x, y, g), batch_size=4), num_groups=[2, 3])
    ids = torch.cat([b[2] for b in data.batches(None, torch.nn.Linear(3, 2))])
    assert ids.tolist() == (g[:, 0] * 3 + g[:, 1]).tolist()
    assert data.attribute_names == ["a0", "a1"]
