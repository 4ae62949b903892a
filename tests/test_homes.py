"""Unit tests of the homes of the architecture issue, without `Trainer.fit`.

checks (argument validation), plan.RoundPlan (the round plan), measure (isolation),
fairness_data (the fairness-data path), history (the file) and callbacks.events (the
pruner protocol). The record itself: tests/test_records.py.
"""

from __future__ import annotations

import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune.callbacks.events import Pruner, PruningEvent, find_pruner
from lightning_fairprune.checks import check_int, check_labels, check_real, check_sparsity
from lightning_fairprune.fairness_data import FairnessData
from lightning_fairprune.history import (
    HistoryFile,
    dense_record,
    history_filename,
    latest_per_sparsity,
    read_history,
    to_plain,
)
from lightning_fairprune.measure import isolated, loader_generators, prepare_batch
from lightning_fairprune.plan import RoundPlan
from lightning_fairprune.records import record_scalars
from lightning_fairprune.schedules import schedule_values


# ------------------------------------------------------------------ checks
@pytest.mark.parametrize("bad", [True, 1.5, "3", None, -1])
def test_check_int_rejects_non_ints_and_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"Expected `n` to be an int >= 0, but got {bad!r}"):
        check_int(bad, "n", 0)


def test_check_int_accepts_numpy_ints_and_returns_python_int():
    value = check_int(np.int64(3), "n", 1)
    assert value == 3
    assert type(value) is int


@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan, math.inf, "0.5", True])
def test_check_sparsity_is_the_one_sparsity_validator(bad):
    with pytest.raises(ValueError, match=r"to be a float in \[0, 1\), but got"):
        check_sparsity(bad, "s")
    assert check_sparsity(np.float32(0.25), "s") == 0.25


def test_check_real_intervals():
    assert check_real(None, "x", low=0.0, allow_none=True) is None
    with pytest.raises(ValueError, match=r"`x` to be None or a finite float >= 0, but got -1"):
        check_real(-1, "x", low=0.0, allow_none=True)
    with pytest.raises(ValueError, match=r"`x` to be a float in \(0, 1\]"):
        check_real(0.0, "x", low=0.0, high=1.0, low_open=True)


def test_check_labels_covers_dtype_shape_and_range():
    ok = torch.tensor([0, 1, 2])
    assert check_labels(ok, "y", upper=3) is ok
    with pytest.raises(ValueError, match="1-D integer tensor of class labels"):
        check_labels(ok.float(), "y", what="class labels")
    with pytest.raises(ValueError, match=r"one id per sample \(4\)"):
        check_labels(ok, "g", n=4)
    with pytest.raises(
        ValueError, match=r"in \[0, 2\) \(`num_groups`=2\), but got ids from 0 to 2"
    ):
        check_labels(ok, "g", upper=2, upper_name="num_groups")
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        check_labels([0, 1], "g")


# ------------------------------------------------------------------ RoundPlan
def test_round_plan_targets_and_points_match_the_schedule_functions():
    plan = RoundPlan(0.8, schedule="cubic", num_rounds=4, start=2, frequency=3)
    assert plan.event_points == [2, 5, 8, 11]
    assert plan.targets == schedule_values("cubic", 4, 0.8)


def test_round_plan_due_rounds_catch_up_and_stop_at_end():
    plan = RoundPlan(0.5, schedule="linear", end=4, frequency=2)
    assert plan.num_rounds == 3  # points 0, 2, 4
    ran = []
    for now in range(10):
        while plan.due(now):
            ran.append((now, plan.target(plan.rounds_done)))
            plan.record_round(ran[-1][1])
    assert [n for n, _ in ran] == [0, 2, 4]
    assert ran[-1][1] == 0.5
    assert plan.complete
    catch_up = RoundPlan(0.5, schedule="linear", num_rounds=3)
    count = 0
    while catch_up.due(10):  # resumed late: every missed round is due
        catch_up.record_round(catch_up.target(catch_up.rounds_done))
        count += 1
    assert count == 3


def test_round_plan_default_schedule_follows_the_number_of_rounds():
    assert RoundPlan(0.5).schedule_name == "one_shot"
    assert RoundPlan(0.5, num_rounds=1).schedule_name == "one_shot"
    plan = RoundPlan(0.75, num_rounds=2)
    assert plan.schedule_name == "geometric"
    assert plan.targets == pytest.approx([0.5, 0.75])
    assert RoundPlan(0.75, rate=0.5).targets == pytest.approx([0.5, 0.75])


def test_round_plan_horizon_leaves_a_fine_tuning_tail():
    plan = RoundPlan(0.9, schedule="linear", interval="step", frequency=10)
    assert plan.needs_horizon
    assert not plan.due(0)
    with pytest.raises(RuntimeError, match="not resolved"):
        plan.target(0)
    plan.resolve_horizon(100)
    # last allowed point: ceil(0.75 * 100) - 1 = 74 -> rounds at 0, 10, ..., 70
    assert plan.event_points == list(range(0, 71, 10))
    assert plan.targets[-1] == 0.9
    with pytest.raises(ValueError, match="beyond `start`=5"):
        RoundPlan(0.9, schedule="cubic", start=5).resolve_horizon(5)


def test_round_plan_state_round_trip_and_retarget():
    plan = RoundPlan(0.5, num_rounds=3)
    plan.record_round(plan.target(0))
    plan.record_round(plan.target(1))
    state = json.loads(json.dumps(plan.state_dict()))  # plain values only
    fresh = RoundPlan(0.5, num_rounds=3)
    fresh.load_state_dict(state)
    assert (fresh.rounds_done, fresh.last_target) == (2, plan.last_target)
    moved = RoundPlan(0.9, num_rounds=3)
    with pytest.warns(UserWarning, match="final sparsity 0.5, this callback targets 0.9"):
        moved.load_state_dict(state)
    assert moved.rounds_done == 2
    assert moved.target(2) == 0.9
    lower = RoundPlan(0.2, num_rounds=3)
    with pytest.raises(ValueError, match="already reached"):
        lower.load_state_dict(state)


def test_round_plan_validates_a_callable_schedule_when_asked():
    plan = RoundPlan(schedule=lambda t: 0.1 * t, num_rounds=3)
    assert [plan.target(k) for k in range(3)] == [0.0, 0.1, 0.2]
    bad = RoundPlan(schedule=lambda t: 1.5, num_rounds=2)
    with pytest.raises(ValueError, match=r"return a float in \[0, 1\), but schedule\(0\)"):
        bad.target(0)
    with pytest.raises(ValueError, match="non-decreasing"):
        RoundPlan(schedule=lambda t: 0.5 - 0.1 * t, num_rounds=3).prevalidate(None)


# ------------------------------------------------------------------ measure.isolated
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.lin(x)))


def test_isolated_restores_modes_buffers_grads_flags_and_every_rng():
    torch.manual_seed(0)
    net = _Net().train()
    net.bn.eval()  # frozen by the user
    net.lin.bias.requires_grad_(False)
    net.lin.weight.grad = torch.full_like(net.lin.weight, 7.0)
    gen = torch.Generator().manual_seed(3)
    loader = DataLoader(list(range(8)), shuffle=True, generator=gen)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), list(iter(loader)))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    gen.manual_seed(3)
    with (
        torch.inference_mode(),
        isolated(net, mode="keep", grad_params=[net.lin.bias], loaders=[loader]),
    ):
        assert torch.is_grad_enabled()
        assert not torch.is_inference_mode_enabled()
        assert net.lin.weight.grad is None
        assert net.lin.bias.requires_grad
        net.bn.train()
        net(torch.randn(16, 3)).sum().backward()  # updates BN statistics, draws dropout RNG
        assert net.lin.bias.grad is not None
        _ = (random.random(), np.random.rand(), list(iter(loader)))
    after = (random.random(), np.random.rand(), torch.rand(1).item(), list(iter(loader)))
    assert after == expected
    assert net.training
    assert not net.bn.training
    assert net.lin.bias.requires_grad is False
    assert net.lin.bias.grad is None
    assert torch.equal(net.lin.weight.grad, torch.full_like(net.lin.weight, 7.0))
    for name, value in net.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_isolated_eval_mode_and_restores_on_error():
    net = _Net().train()
    modes = []

    def measure() -> None:
        with isolated(net):
            modes.extend([net.training, net.bn.training])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure()
    assert modes == [False, False]
    assert net.training
    assert net.bn.training


def test_loader_generators_and_prepare_batch_with_a_trainer_like_object():
    gen = torch.Generator()
    assert loader_generators(DataLoader([1, 2], shuffle=True, generator=gen)) == [gen]

    class Plugin:
        def convert_input(self, batch):
            return [t.double() if t.is_floating_point() else t for t in batch]

    class Strategy:
        root_device = torch.device("cpu")

    class Trainer:
        precision_plugin = Plugin()
        strategy = Strategy()

    x, y = prepare_batch([torch.zeros(2), torch.tensor([1, 0])], Trainer())
    assert x.dtype == torch.float64
    assert y.dtype == torch.int64


# ------------------------------------------------------------------ fairness_data
def test_fairness_data_parses_validates_and_caps_batches():
    x = torch.randn(10, 2)
    y = torch.arange(10) % 3
    g = torch.arange(10) % 2
    loader = DataLoader(TensorDataset(x, y, g), batch_size=3)
    data = FairnessData(loader, num_groups=2, max_batches=2)
    batches = list(data.batches(None, device=torch.device("cpu")))
    assert len(batches) == 2
    assert torch.equal(batches[1][2], g[3:6])
    assert torch.equal(batches[0][1], y[:3])
    by_class = FairnessData(DataLoader(TensorDataset(x, y), batch_size=5))
    _xb, yb, gb = by_class.batches(None).first()
    assert torch.equal(gb, yb)
    with pytest.raises(ValueError, match=r"group ids in \[0, 1\).*ids from 0 to 1"):
        FairnessData(loader, num_groups=1).batches(None).first()


def test_fairness_data_dict_batches_and_group_fn():
    batch = {"img": torch.zeros(4, 2), "label": torch.tensor([0, 1, 0, 1]), "sex": torch.ones(4)}
    data = FairnessData([batch], num_groups=2, input_key="img", target_key="label", group_key="sex")
    with pytest.raises(ValueError, match="1-D integer tensor of group ids"):
        data.batches(None).first()
    fixed = FairnessData(
        [batch], num_groups=2, group_fn=lambda b: (b["img"], b["label"], b["sex"].long())
    )
    assert fixed.batches(None).first()[2].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"keys \['sex'\]"):
        FairnessData([{"x": 1, "y": 2}], group_key="sex").batches(None).first()


# ------------------------------------------------------------------ history
def test_history_file_rewrites_once_then_appends_and_reads_past_corruption(tmp_path):
    path = tmp_path / history_filename("a/b")
    assert path.name == "fairprune_history-a_b.jsonl"
    records = [{"moment": "dense", "x": float("nan")}]
    file = HistoryFile(path)
    file.write(records)
    records.append({"moment": "end", "x": torch.tensor(2.0)})
    file.write(records)
    with path.open("a") as fh:
        fh.write('{"broken\n[1, 2]\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = read_history(path)
    assert back == [{"moment": "dense", "x": None}, {"moment": "end", "x": 2.0}]
    assert len(caught) == 2
    # a new HistoryFile (a resumed run) rewrites the whole history once
    HistoryFile(path).write(records)
    assert read_history(path) == back


def test_one_rule_for_dense_record_and_latest_per_sparsity():
    history = [
        {"moment": "dense", "sparsity": 0.0, "accuracy": 0.9, "recall": [1.0]},
        {"moment": "after_round", "sparsity": 0.5, "accuracy": 0.5, "recall": [0.5]},
        {"moment": "before_round", "sparsity": 0.5, "accuracy": 0.8, "recall": [0.8]},
        {"moment": "dense", "sparsity": 0.0, "accuracy": 0.95, "recall": [1.0]},
    ]
    assert dense_record(history) is history[-1]
    latest = latest_per_sparsity(history)
    assert latest[0.5] is history[2]
    assert latest[0.0] is history[3]
    assert record_scalars(history[1])["fairprune/worst_group_recall"] == 0.5


def test_to_plain_is_json_safe():
    value = {"t": torch.tensor([[1.0, math.inf]]), "n": np.float32(0.5), "fn": math.sqrt}
    assert json.loads(json.dumps(to_plain(value), allow_nan=False)) == {
        "t": [[1.0, None]],
        "n": 0.5,
        "fn": "math.sqrt",
    }


# ------------------------------------------------------------------ events
def test_pruner_protocol_is_what_other_callbacks_rely_on():
    from lightning_fairprune import IterativePruning

    pruning = IterativePruning(0.5)
    assert isinstance(pruning, Pruner)

    class Trainer:
        callbacks = (object(), pruning)

    assert find_pruner(Trainer()) is pruning

    class OnlyRounds:  # duck-typing on one attribute no longer counts as a pruner
        rounds_done = 3

    class Other:
        callbacks = (OnlyRounds(),)

    assert find_pruner(Other()) is None


def test_pruning_event_carries_parameter_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    seen = []

    class Listener:
        def on_pruning_round(self, trainer, pl_module, event):
            seen.append(event)

    from lightning_fairprune import IterativePruning

    pruning = IterativePruning(0.5, prune_classifier=True)

    class Trainer:
        callbacks = (pruning, Listener())
        optimizers = ()
        loggers = ()
        current_epoch = 0
        global_step = 0
        is_global_zero = True
        world_size = 1

    pruning.prune_now(Trainer(), model)
    assert isinstance(seen[0], PruningEvent)
    assert seen[0].parameter_names == ("0.weight", "1.weight")
    assert seen[0].to_dict()["parameter_names"] == ["0.weight", "1.weight"]


def test_round_plan_keeps_its_saved_horizon_when_resumed_under_another_run_length():
    first = RoundPlan(0.8, schedule="cubic")
    first.resolve_horizon(4)  # rounds at 0, 1, 2
    first.record_round(first.target(0))
    state = first.state_dict()
    resumed = RoundPlan(0.8, schedule="cubic")
    resumed.resolve_horizon(8)  # the resumed fit has max_epochs=8 ...
    resumed.load_state_dict(state)  # ... but the schedule already spread over 4 epochs wins
    assert resumed.event_points == first.event_points == [0, 1, 2]
    assert resumed.targets == first.targets
    assert resumed.rounds_done == 1
