from __future__ import annotations

import math

import pytest

from lightning_fairprune.schedules import (
    SCHEDULES,
    check_sparsity_sequence,
    compression_ratio_to_sparsity,
    cubic,
    fraction_of_remaining,
    geometric,
    geometric_num_rounds,
    geometric_values_from_rate,
    linear,
    one_shot,
    resolve_schedule,
    schedule_values,
    sparsity_to_compression_ratio,
)


@pytest.mark.parametrize("n", [1, 3, 5, 10])
@pytest.mark.parametrize(("s_i", "s_f"), [(0.0, 0.9), (0.2, 0.8), (0.5, 0.5), (0.0, 0.0)])
def test_cubic_matches_zhu_gupta(n, s_i, s_f):
    # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3 with t0 = 0, dt = 1, t = k
    for k in range(0, n + 1):
        expected = s_f + (s_i - s_f) * (1 - k / n) ** 3
        assert cubic(k / n, s_f, s_i) == pytest.approx(expected, abs=1e-15)
    assert cubic(1.0, s_f, s_i) == s_f
    # clamped outside [0, 1]
    assert cubic(1.7, s_f, s_i) == s_f
    assert cubic(-0.5, s_f, s_i) == pytest.approx(s_i)


@pytest.mark.parametrize("n", [1, 2, 4, 7])
@pytest.mark.parametrize("s_f", [0.5, 0.9, 0.99])
def test_geometric_removes_fixed_fraction_of_remaining(n, s_f):
    # s_k = 1 - (1 - p)^k with p chosen so that round n reaches s_f
    p = 1 - (1 - s_f) ** (1 / n)
    values = schedule_values("geometric", n, s_f)
    expected = [1 - (1 - p) ** k for k in range(1, n + 1)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert values[-1] == s_f
    # every round removes the same fraction p of what remained
    prev = 0.0
    for v in values:
        assert fraction_of_remaining(prev, v) == pytest.approx(p, abs=1e-12)
        prev = v


def test_geometric_with_initial_sparsity():
    s_i, s_f = 0.2, 0.9
    for progress in (0.0, 0.25, 0.5, 1.0):
        expected = 1 - (1 - s_i) * ((1 - s_f) / (1 - s_i)) ** progress
        assert geometric(progress, s_f, s_i) == pytest.approx(expected, abs=1e-15)


def test_linear_and_one_shot():
    assert schedule_values("linear", 4, 0.8, 0.4) == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert linear(0.0, 0.8, 0.4) == pytest.approx(0.4)
    assert schedule_values("one_shot", 3, 0.7) == [0.7, 0.7, 0.7]
    assert one_shot(0.1, 0.3) == 0.3


def test_registry_and_resolve():
    assert set(SCHEDULES) == {"one_shot", "linear", "cubic", "geometric"}
    assert resolve_schedule("cubic") is cubic
    assert resolve_schedule("one-shot") is one_shot

    def mine(progress, final_sparsity, initial_sparsity=0.0):
        return final_sparsity * progress**2

    assert resolve_schedule(mine) is mine
    assert schedule_values(mine, 2, 0.8) == pytest.approx([0.2, 0.8])
    with pytest.raises(ValueError, match="Expected `schedule` to be one of"):
        resolve_schedule("exponential")
    with pytest.raises(TypeError, match="Expected `schedule`"):
        resolve_schedule(3)


def test_schedule_values_validates_user_callables():
    with pytest.raises(ValueError, match="non-decreasing"):
        schedule_values(lambda p, f, i=0.0: f * (1 - p) + 0.1, 3, 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        schedule_values(lambda p, f, i=0.0: 1.2 * p, 2, 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        schedule_values(lambda p, f, i=0.0: math.nan, 2, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_rounds": 0, "final_sparsity": 0.5}, "num_rounds"),
        ({"num_rounds": 2, "final_sparsity": 1.0}, "final_sparsity"),
        ({"num_rounds": 2, "final_sparsity": -0.1}, "final_sparsity"),
        ({"num_rounds": 2, "final_sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity"),
    ],
)
def test_schedule_values_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule_values("linear", **kwargs)


def test_bad_progress_and_sparsity_in_functions():
    with pytest.raises(ValueError, match="final_sparsity"):
        linear(0.5, 1.5)
    with pytest.raises(ValueError, match="progress"):
        cubic(math.nan, 0.5)


def test_check_sparsity_sequence():
    check_sparsity_sequence([0.0, 0.1, 0.1, 0.99])
    with pytest.raises(ValueError, match=r"`sched` to be non-decreasing, but value 2 is 0\.2"):
        check_sparsity_sequence([0.1, 0.3, 0.2], "sched")
    with pytest.raises(ValueError, match=r"value 1 is 1\.0"):
        check_sparsity_sequence([0.1, 1.0], "sched")
    with pytest.raises(ValueError, match="value 0 is"):
        check_sparsity_sequence(["0.1"], "sched")  # type: ignore[list-item]


def test_fraction_of_remaining():
    assert fraction_of_remaining(0.0, 0.3) == pytest.approx(0.3)
    assert fraction_of_remaining(0.5, 0.75) == pytest.approx(0.5)
    assert fraction_of_remaining(0.9, 0.9) == 0.0
    with pytest.raises(ValueError, match="target"):
        fraction_of_remaining(0.5, 0.4)


def test_geometric_num_rounds_and_rate_values():
    # smallest n with 1 - 0.8^n >= 0.9: 0.8^10 = 0.107, 0.8^11 = 0.0859
    assert geometric_num_rounds(0.2, 0.9) == 11
    assert geometric_num_rounds(0.5, 0.75) == 2
    assert geometric_num_rounds(0.5, 0.0) == 1
    values = geometric_values_from_rate(0.2, 0.9)
    assert len(values) == 11
    assert values[:10] == pytest.approx([1 - 0.8**k for k in range(1, 11)])
    assert values[-1] == 0.9
    check_sparsity_sequence(values)
    with pytest.raises(ValueError, match="`rate`"):
        geometric_num_rounds(1.0, 0.5)


def test_compression_ratio_to_sparsity():
    total, prunable = 1000, 800
    for t in (1.0, 2.0, 4.0):
        s = compression_ratio_to_sparsity(t, total, prunable)
        removed = s * prunable
        assert total / (total - removed) == pytest.approx(t)
        assert sparsity_to_compression_ratio(s, total, prunable) == pytest.approx(t)
    assert compression_ratio_to_sparsity(2.0, 100, 100) == pytest.approx(0.5)
    # 800 of 1000 prunable: the largest ratio is 1000/200 = 5 (unreachable, sparsity 1)
    with pytest.raises(ValueError, match="reachable"):
        compression_ratio_to_sparsity(5.0, total, prunable)
    with pytest.raises(ValueError, match="compression_ratio"):
        compression_ratio_to_sparsity(0.5, total, prunable)
    with pytest.raises(ValueError, match="prunable_params"):
        compression_ratio_to_sparsity(2.0, 100, 200)
