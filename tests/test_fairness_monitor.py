"""FairnessMonitor in real `Trainer.fit` runs with IterativePruning, against references."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _ddp import run_ddp
from _models import (
    CaptureLogger,
    DigitsDataModule,
    SmallCNN,
    digits_tensors,
    quiet_trainer_kwargs,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from sklearn.metrics import accuracy_score, recall_score
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_fairprune.callbacks.monitor import FairnessMonitor
from lightning_fairprune.callbacks.pruning import IterativePruning
from lightning_fairprune.history import HISTORY_FILENAME

SCHEMA_KEYS = {
    "params",  # the pruner's cost of the model (IterativePruning's PruningEvent), or None
    "flops",
    "moment",
    "monitor",
    "round",
    "epoch",
    "global_step",
    "sparsity",
    "accuracy",
    "num_groups",
    "support",
    "recall",
    "recall_dense",
    "balance",
    "norm_balance",
    "intensification",
    "alpha",
    "loss",
    "excess_loss",
    "predicted_excess_loss",
    "grad_norm",
    "hessian_trace",
    "hessian_trace_se",
    "hessian_lambda_max",
    "disparity",
    "group_names",
    "groups_are_classes",
    "small_groups",
    "group_accuracy",
    "group_accuracy_ci",
    "tpr",
    "tpr_ci",
    "fpr",
    "fpr_ci",
    "selection_rate",
    "selection_rate_ci",
    "fairness",
    "group_accuracy_dense",
    "norm_balance_dense",
    "metrics",
}
PRUNED = ["features.0.weight", "features.2.weight", "fc.weight"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is 20-50x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class WeightSpy(Callback):
    """Listener (after the monitor) that snapshots the weights at both pruning hooks."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def _snap(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_before_pruning_round(self, trainer, pl_module, event) -> None:
        self.before[event.round_index] = self._snap(pl_module)

    def on_pruning_round(self, trainer, pl_module, event) -> None:
        self.after[event.round_index] = self._snap(pl_module)


def _logits(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = SmallCNN()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(x)


def _naive_predicted(pre, post, x, y, groups, num_groups) -> list[float]:
    """g_aᵀδ + ½ δᵀH_aδ at θ_pre by plain double-backward, one group at a time."""
    model = SmallCNN()
    model.load_state_dict(pre)
    model.eval()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    delta = [post[n] - pre[n] for n in PRUNED]
    out = []
    for a in range(num_groups):
        sel = groups == a
        logits = functional_call(model, params, (x[sel],))
        loss = nn.functional.cross_entropy(logits, y[sel])
        grads = torch.autograd.grad(loss, [params[n] for n in PRUNED], create_graph=True)
        gd = sum((g * d).sum() for g, d in zip(grads, delta, strict=True))
        hd = torch.autograd.grad(gd, [params[n] for n in PRUNED])
        quad = sum((h * d).sum() for h, d in zip(hd, delta, strict=True))
        out.append(float(gd.detach()) + 0.5 * float(quad))
    return out


# --------------------------------------------------------------------------------------------
# one shared real fit: IterativePruning with 3 rounds + FairnessMonitor (classes as groups)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor_fit")
    pl.seed_everything(0)
    dm = DigitsDataModule(n=300, batch_size=16)
    pruning = IterativePruning(0.6, schedule="linear", num_rounds=3, start=2)
    monitor = FairnessMonitor(num_probes=2)
    spy = WeightSpy()
    logger = CaptureLogger(str(tmp))
    kwargs = quiet_trainer_kwargs(tmp)
    kwargs["logger"] = logger
    trainer = pl.Trainer(max_epochs=5, callbacks=[pruning, monitor, spy], **kwargs)
    trainer.fit(SmallCNN(lr=0.01, optimizer="adam"), datamodule=dm)
    return {
        "tmp": tmp,
        "dm": dm,
        "pruning": pruning,
        "monitor": monitor,
        "spy": spy,
        "logger": logger,
    }


def test_fit_records_dense_and_every_round(fitted):
    history = fitted["monitor"].history
    pruning = fitted["pruning"]
    moments = [(r["moment"], r["round"], r["epoch"]) for r in history]
    assert moments == [
        ("dense", 0, 2),
        ("after_round", 1, 2),
        ("before_round", 1, 3),
        ("after_round", 2, 3),
        ("before_round", 2, 4),
        ("after_round", 3, 4),
        ("end", 3, 5),
    ]
    for record in history:
        assert set(record) == SCHEMA_KEYS
        assert set(record["disparity"]) == {
            "group_accuracy",
            "recall",
            "grad_norm",
            "hessian_trace",
            "hessian_lambda_max",
            "loss",
        }
        assert record["hessian_lambda_max"] is None  # not asked for
        assert record["num_groups"] == 10
        assert len(record["recall"]) == len(record["hessian_trace"]) == 10
        assert record["recall_dense"] == history[0]["recall"]
    # sparsity labels: realized sparsity of each round, unchanged by fine-tuning
    realized = [h["realized_sparsity"] for h in pruning.history]
    assert [r["sparsity"] for r in history] == [0.0, *np.repeat(realized, 2).tolist()]
    assert realized == pytest.approx([0.2, 0.4, 0.6], abs=1e-3)
    # the zeros in the weights agree with the recorded final sparsity
    named = dict(fitted["spy"].after[2])
    zeros = sum(int((named[n] == 0).sum()) for n in PRUNED)
    total = sum(named[n].numel() for n in PRUNED)
    assert history[-1]["sparsity"] == pytest.approx(zeros / total, abs=1e-12)
    # the dense record is its own reference
    dense = history[0]
    assert dense["alpha"] == pytest.approx(1.0)
    assert all(e == 0.0 for e in dense["excess_loss"])
    assert dense["predicted_excess_loss"] is None
    # only after_round records predict the damage; B, B̃ and R(a) follow their formulas
    for record in history:
        assert (record["predicted_excess_loss"] is not None) == (record["moment"] == "after_round")
        acc = record["accuracy"]
        for a in range(10):
            assert record["balance"][a] == pytest.approx(record["recall"][a] - acc)
            assert record["norm_balance"][a] == pytest.approx((record["recall"][a] - acc) / acc)
            assert record["excess_loss"][a] == pytest.approx(
                record["loss"][a] - dense["loss"][a], abs=1e-12
            )
        nrb, ref = np.array(record["norm_balance"]), np.array(dense["norm_balance"])
        assert record["alpha"] == pytest.approx(float(nrb @ ref / (ref @ ref)))
    # the curvature parameters are those the pruner prunes
    assert fitted["monitor"].param_names == PRUNED == list(pruning.masks)


def test_dense_recall_matches_sklearn(fitted):
    dm, spy = fitted["dm"], fitted["spy"]
    x, y = dm.val_set.tensors
    for record, state in (
        (fitted["monitor"].history[0], spy.before[0]),
        (fitted["monitor"].history[1], spy.after[0]),
    ):
        pred = _logits(state, x).argmax(1).numpy()
        expected = recall_score(y.numpy(), pred, labels=list(range(10)), average=None)
        np.testing.assert_allclose(record["recall"], expected, rtol=0, atol=1e-12)
        assert record["accuracy"] == pytest.approx(accuracy_score(y.numpy(), pred), abs=1e-12)
        assert record["support"] == np.bincount(y.numpy(), minlength=10).tolist()
    # the model had learnt something: the check is not about a constant predictor
    assert len(set(fitted["monitor"].history[0]["recall"])) > 2


def test_predicted_excess_loss_uses_the_rounds_step(fitted):
    """R̂(a) of round k = g_aᵀδ + ½δᵀH_aδ at θ_pre with δ = θ̄ − θ_pre (naive autograd)."""
    dm, spy = fitted["dm"], fitted["spy"]
    x, y = dm.val_set.tensors
    after = [r for r in fitted["monitor"].history if r["moment"] == "after_round"]
    for k, record in enumerate(after):
        expected = _naive_predicted(spy.before[k], spy.after[k], x, y, y, 10)
        np.testing.assert_allclose(record["predicted_excess_loss"], expected, rtol=1e-3, atol=1e-7)
    # the realized step of round 0 equals the excess loss vs dense, and the prediction is close
    realized = np.array(after[0]["excess_loss"])
    assert (
        np.abs(realized - np.array(after[0]["predicted_excess_loss"])).max()
        < 0.5 * np.abs(realized).max() + 1e-4
    )


def test_history_jsonl_round_trips_and_logger_gets_scalars(fitted):
    history = fitted["monitor"].history
    # a logger whose save_dir runs share: the history is in <save_dir>/fairprune/<version>
    path = Path(fitted["tmp"]) / "fairprune" / "0" / HISTORY_FILENAME
    assert fitted["monitor"].history_file == path
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    # every record went to the logger, in order, with the contract's keys; the dense and
    # after-round records under their own prefix, so that no step holds a key twice
    prefix = {"dense": "fairprune/dense/", "after_round": "fairprune/after_round/"}
    rows = [(s, m) for s, m in fitted["logger"].rows if any(k.endswith("moment_code") for k in m)]
    assert len(rows) == len(history)
    codes = {"dense": 0, "after_round": 1, "before_round": 2, "periodic": 3, "end": 4}
    seen: dict[int, set[str]] = {}
    for (step, metrics), record in zip(rows, history, strict=True):
        pre = prefix.get(record["moment"], "fairprune/")
        assert step == record["global_step"]
        assert not seen.setdefault(step, set()) & set(metrics), "a key logged twice at one step"
        seen[step] |= set(metrics)
        assert metrics[f"{pre}moment_code"] == codes[record["moment"]]
        assert metrics[f"{pre}accuracy"] == pytest.approx(record["accuracy"])
        for a in range(10):
            assert metrics[f"{pre}recall/g{a}"] == pytest.approx(record["recall"][a])
            assert metrics[f"{pre}group_accuracy/g{a}"] == pytest.approx(record["recall"][a])
            assert metrics[f"{pre}grad_norm/g{a}"] == pytest.approx(record["grad_norm"][a])
        assert metrics[f"{pre}worst_group_recall"] == pytest.approx(min(record["recall"]))
        assert metrics[f"{pre}worst_group_accuracy"] == pytest.approx(min(record["recall"]))
        assert f"{pre}sparsity" not in metrics  # the pruner logs the sparsity


# --------------------------------------------------------------------------------------------
# training is not disturbed
# --------------------------------------------------------------------------------------------
class DropoutCNN(SmallCNN):
    """SmallCNN with dropout: any change of RNG state or train/eval mode changes training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.dropout(self.features(x).flatten(1), 0.3, training=self.training)
        return self.classifier(torch.relu(self.fc(h)))


def _train(tmp_path: Path, monitor: FairnessMonitor | None) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    callbacks: list = [IterativePruning(0.5, schedule="linear", num_rounds=2, start=1)]
    if monitor is not None:
        callbacks.append(monitor)
    trainer = pl.Trainer(
        max_epochs=3, limit_train_batches=3, callbacks=callbacks, **quiet_trainer_kwargs(tmp_path)
    )
    model = DropoutCNN(lr=0.1)
    trainer.fit(model, datamodule=DigitsDataModule(n=200, batch_size=32))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_is_bit_identical_with_and_without_monitor(tmp_path):
    plain = _train(tmp_path / "plain", None)
    monitor = FairnessMonitor(num_probes=2, every_n_epochs=1, max_batches=1)
    monitored = _train(tmp_path / "monitored", monitor)
    assert [r["moment"] for r in monitor.history] == [
        "periodic",
        "dense",
        "after_round",
        "periodic",
        "before_round",
        "after_round",
        "periodic",
        "end",
    ]
    assert plain.keys() == monitored.keys()
    for key in plain:
        assert torch.equal(plain[key], monitored[key]), key


def test_measure_restores_mode_grads_and_rng(tmp_path):
    model = SmallCNN().train()
    model.features[0].eval()  # a mixed train/eval state must come back as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    x, y = digits_tensors(n=40)
    monitor = FairnessMonitor(DataLoader(TensorDataset(x, y), batch_size=16), num_probes=2)
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path))

    def draws() -> tuple:
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    for seed_all in (torch.manual_seed, random.seed, np.random.seed):
        seed_all(123)
    expected = draws()
    for seed_all in (torch.manual_seed, random.seed, np.random.seed):
        seed_all(123)
    with torch.inference_mode():  # as in a validation hook: the monitor must leave it
        record = monitor.measure(trainer, model, "end")
    assert draws() == expected
    assert record["grad_norm"] is not None
    assert record["hessian_trace"] is not None
    assert all(math.isfinite(v) for v in record["grad_norm"])
    assert [m.training for m in (model, model.features[0], model.features[2])] == [1, 0, 1]
    for n, p in model.named_parameters():
        assert p.grad is grads[n]
        assert bool((p.grad == 0.5).all())


def test_measure_consumes_no_global_rng(tmp_path):
    x, y = digits_tensors(n=40)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # draws a seed
    monitor = FairnessMonitor(loader, num_probes=2)
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path))
    model = SmallCNN()
    torch.manual_seed(7)
    monitor.measure(trainer, model, "periodic")
    after = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(4))


# --------------------------------------------------------------------------------------------
# protected attribute from the batch, dict batches, group_fn
# --------------------------------------------------------------------------------------------
def test_protected_attribute_group_accuracy_matches_sklearn(tmp_path):
    dm = DigitsDataModule(n=200, with_groups=True)
    dm.setup()
    x, y, g = dm.val_set.tensors
    model = SmallCNN()
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).numpy()
    model.train()
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path))
    expected = [accuracy_score(y[g == a].numpy(), pred[(g == a).numpy()]) for a in (0, 1)]
    batches = {
        "tuple": FairnessMonitor(dm.val_dataloader(), num_groups=2, num_probes=0),
        "dict": FairnessMonitor(
            [
                {"img": x[:20], "label": y[:20], "attr": g[:20]},
                {"img": x[20:], "label": y[20:], "attr": g[20:]},
            ],
            num_groups=2,
            input_key="img",
            target_key="label",
            group_key="attr",
            num_probes=0,
        ),
        "group_fn": FairnessMonitor(
            [(x, g, y)],  # a different structure, untangled by group_fn
            num_groups=2,
            group_fn=lambda b: (b[0], b[2], b[1]),
            num_probes=0,
        ),
    }
    for name, monitor in batches.items():
        record = monitor.measure(trainer, model, "dense")
        np.testing.assert_allclose(record["group_accuracy"], expected, atol=1e-12, err_msg=name)
        # the groups are not the classes: accuracy within a group is not called recall
        assert record["recall"] is None, name
        assert record["groups_are_classes"] is False
        assert record["support"] == [int((g == 0).sum()), int((g == 1).sum())], name
        assert record["hessian_trace"] is None
        assert record["grad_norm"] is not None
        assert record["disparity"]["hessian_trace"] is None


def test_missing_group_is_none_not_zero(tmp_path):
    x, y = digits_tensors(n=40)
    g = torch.where(y < 5, 0, 2)  # group 1 never appears
    monitor = FairnessMonitor([(x, y, g)], num_groups=3, num_probes=2)
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="no samples"):
        record = monitor.measure(trainer, SmallCNN(), "dense")
    assert record["support"][1] == 0
    for key in ("group_accuracy", "loss", "grad_norm", "hessian_trace"):
        assert record[key][1] is None, key
        assert None not in (record[key][0], record[key][2]), key
    assert record["intensification"][1] is None  # also None where B̃_dense ≈ 0 (guarded)
    json.dumps(record, allow_nan=False)


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------
def test_resume_keeps_history_and_dense_reference(tmp_path):
    def trainer_for(root: Path, max_epochs: int, monitor: FairnessMonitor) -> pl.Trainer:
        kwargs = quiet_trainer_kwargs(root)
        kwargs["enable_checkpointing"] = True
        return pl.Trainer(
            max_epochs=max_epochs,
            limit_train_batches=2,
            callbacks=[
                IterativePruning(0.5, schedule="linear", num_rounds=2, start=1),
                monitor,
                ModelCheckpoint(dirpath=root / "ckpt", save_last=True),
            ],
            **kwargs,
        )

    dm = DigitsDataModule(n=150, batch_size=32, shuffle=False)
    first = FairnessMonitor(num_probes=0, max_batches=1)
    pl.seed_everything(0)
    trainer_for(tmp_path / "a", 2, first).fit(SmallCNN(lr=0.1), datamodule=dm)
    assert [r["moment"] for r in first.history] == ["dense", "after_round", "end"]
    ckpt = tmp_path / "a" / "ckpt" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)  # plain values only
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("FairnessMonitor"))
    assert saved["history"] == first.history[:2]  # saved at the epoch end, before "end"

    second = FairnessMonitor(num_probes=0, max_batches=1)
    pl.seed_everything(0)
    trainer_for(tmp_path / "b", 4, second).fit(SmallCNN(lr=0.1), datamodule=dm, ckpt_path=ckpt)
    moments = [r["moment"] for r in second.history]
    assert moments == ["dense", "after_round", "before_round", "after_round", "end"]
    assert second.history[:2] == first.history[:2]
    dense_recall = first.history[0]["recall"]
    assert all(r["recall_dense"] == dense_recall for r in second.history)
    assert second.history[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    # the new run (another root directory) has its own file, holding the restored records too
    assert second.history_file == tmp_path / "b" / "fairprune" / "version_0" / HISTORY_FILENAME
    lines = second.history_file.read_text().splitlines()
    assert [json.loads(line) for line in lines] == second.history


def test_ddp_iterable_loader_empty_on_one_process_is_a_clear_error_on_both(tmp_path):
    import subprocess
    import sys

    import ddp_monitor_script

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env["MASTER_PORT"] = str(29500 + ((os.getpid() + 7) % 2000))
    proc = subprocess.run(
        [sys.executable, ddp_monitor_script.__file__, str(tmp_path), "2", "empty-on-rank-1"],
        capture_output=True,
        text=True,
        timeout=180,  # a deadlock in a collective would hit this instead of the error
        env=env,
    )
    assert proc.returncode != 0
    assert "no batches on 1 of 2 processes; pass a `dataloader`" in proc.stderr
    assert not list(tmp_path.glob("rank*.json"))  # neither process got through the fit


# --------------------------------------------------------------------------------------------
# DDP: 2 processes on their shards == 1 process on the union
# --------------------------------------------------------------------------------------------
def test_ddp_two_processes_equal_one(tmp_path):
    import ddp_monitor_script

    ranks = run_ddp(Path(ddp_monitor_script.__file__), tmp_path / "ddp", "2", timeout=240)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["history"] == ranks[1]["history"]  # identical on every process
    single = ddp_monitor_script.run(str(tmp_path / "single"), 1)
    history, reference = ranks[0]["history"], single["history"]
    assert (
        [r["moment"] for r in history]
        == [r["moment"] for r in reference]
        == [
            "dense",
            "after_round",
            "before_round",
            "after_round",
            "end",
        ]
    )
    # the default data (datamodule's val_dataloader(), sharded by the monitor by batch index)
    default, default_ref = ranks[0]["default_history"], single["default_history"]
    assert default == ranks[1]["default_history"]
    assert [r["moment"] for r in default] == [r["moment"] for r in history]
    for got, want in zip(default, default_ref, strict=True):
        assert got["support"] == want["support"]
        assert sum(got["support"]) == 24
        assert got["recall"] == want["recall"]
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4, atol=1e-6)
        assert got["hessian_trace"] is None
    for got, want in zip(history, reference, strict=True):
        for key in ("support", "recall", "accuracy", "sparsity", "round", "num_groups"):
            assert got[key] == want[key], key
        assert sum(got["support"]) == 150
        for key in (
            "loss",
            "excess_loss",
            "grad_norm",
            "hessian_trace",
            "hessian_trace_se",
            "predicted_excess_loss",
        ):
            if want[key] is None:
                assert got[key] is None, key
            else:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_without_pruner_warns_and_measures_the_end(tmp_path):
    monitor = FairnessMonitor(num_probes=0, max_batches=1)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, callbacks=[monitor], **quiet_trainer_kwargs(tmp_path)
    )
    with pytest.warns(UserWarning, match="no pruning callback"):
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=100))
    (record,) = monitor.history
    assert record["moment"] == "end"
    assert record["round"] == 0
    assert record["sparsity"] == 0.0
    for key in ("recall_dense", "intensification", "alpha", "excess_loss"):
        assert record[key] is None, key
    assert monitor.dense_reference is None


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_probes": -1}, "`num_probes`"),
        ({"max_batches": 0}, "`max_batches`"),
        ({"num_groups": 0}, "`num_groups`"),
        ({"every_n_epochs": 0}, "`every_n_epochs`"),
        ({"params": "weights"}, "`params`"),
        ({"params": []}, "`params`"),
        ({"gate_memory": -1}, r"`gate_memory` to be None or an int >= 0, but got -1"),
        ({"gate_memory": 1.5}, "`gate_memory`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FairnessMonitor(**kwargs)


def test_bad_argument_types():
    with pytest.raises(TypeError, match="`dataloader`"):
        FairnessMonitor(dataloader=3)
    with pytest.raises(TypeError, match="`group_fn`"):
        FairnessMonitor(group_fn="groups")
    with pytest.raises(TypeError, match="`params`"):
        FairnessMonitor(params=[1, 2])


class _Stream(torch.utils.data.IterableDataset):
    """An iterable-style dataset (no ``len``)."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return zip(self.x, self.y, strict=True)


def _measure(tmp_path, loader, **kwargs):
    monitor = FairnessMonitor(loader, num_probes=0, **kwargs)
    return monitor.measure(pl.Trainer(**quiet_trainer_kwargs(tmp_path)), SmallCNN(), "dense")


def test_bad_data(tmp_path):
    x, y = digits_tensors(n=20)
    g = (y % 2).long()
    empty = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        _measure(tmp_path, empty)
    with pytest.raises(ValueError, match="at least one batch"):
        _measure(tmp_path, [])
    with pytest.raises(ValueError, match="no batches; pass a `dataloader`"):
        _measure(tmp_path, DataLoader(_Stream(x[:0], y[:0]), batch_size=4))  # no len()
    with pytest.raises(ValueError, match="of 4 items"):
        _measure(tmp_path, [(x, y, g, g)])
    with pytest.raises(ValueError, match="Expected a batch"):
        _measure(tmp_path, [x])
    with pytest.raises(ValueError, match=r"keys \['group'\]"):
        _measure(tmp_path, [{"x": x, "y": y}])
    with pytest.raises(ValueError, match=r"group ids in \[0, 2\).*got ids from 0 to 4"):
        _measure(tmp_path, [(x, y, torch.where(y < 5, 0, 4))], num_groups=2)
    with pytest.raises(ValueError, match=r"group ids in \[0, 2\).*got ids from -1 to 1"):
        _measure(tmp_path, [(x, y, torch.where(y < 5, -1, 1))], num_groups=2)
    with pytest.raises(ValueError, match="`num_groups` to be given"):
        _measure(tmp_path, [(x, y, g)])
    with pytest.raises(ValueError, match="integer tensor of class"):
        _measure(tmp_path, [(x, y.float())])
    with pytest.raises(ValueError, match="one id per sample"):
        _measure(tmp_path, [(x, y, g[:5])], num_groups=2)
    with pytest.raises(ValueError, match="`group_fn` to return"):
        _measure(tmp_path, [(x, y)], group_fn=lambda b: b[0])
    with pytest.raises(ValueError, match="select at least one"):
        _measure(tmp_path, [(x, y)], params=["no.such.*"])
    with pytest.raises(ValueError, match="`moment`"):
        FairnessMonitor([(x, y)]).measure(
            pl.Trainer(**quiet_trainer_kwargs(tmp_path)), SmallCNN(), "later"
        )


def test_no_fairness_dataloader_in_fit(tmp_path):
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        callbacks=[IterativePruning(0.5, start=0), FairnessMonitor(num_probes=0)],
        **quiet_trainer_kwargs(tmp_path),
    )
    x, y = digits_tensors(n=32)
    with pytest.raises(ValueError, match="fairness dataloader"):
        trainer.fit(SmallCNN(), train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=16))


class _StubTrainer:
    def __init__(self, tmp_path, rank_zero=True):
        self.is_global_zero = rank_zero
        self.log_dir = str(tmp_path)
        self.default_root_dir = str(tmp_path)
        self.loggers = []
        self.callbacks = []


@pytest.mark.parametrize(("log", "rank_zero", "expected"), [
    (True, True, 1), (False, True, 0), (True, False, 0),
])  # fmt: skip
def test_config_and_summary_logged_once_on_rank_zero_only(
    tmp_path, monkeypatch, log, rank_zero, expected
):
    from lightning_fairprune import logging as fp_logging

    calls = []
    monkeypatch.setattr(fp_logging, "log_config", lambda *a: calls.append(("config", a)))
    monkeypatch.setattr(fp_logging, "log_summary", lambda *a: calls.append(("summary", a)))
    monitor = FairnessMonitor(num_probes=3, measure_end=False, log=log)
    trainer = _StubTrainer(tmp_path, rank_zero=rank_zero)
    monitor.setup(trainer, nn.Linear(2, 2), "fit")
    monitor.history.append({"moment": "end", "sparsity": 0.5, "accuracy": 0.75})
    monitor.on_train_end(trainer, nn.Linear(2, 2))
    assert [kind for kind, _ in calls] == ["config", "summary"] * expected
    if expected:
        assert calls[0][1] == (trainer, "monitor", monitor.settings())
        assert calls[0][1][2]["num_probes"] == 3
        assert calls[1][1] == (trainer, monitor.history)


def test_lambda_max_option_records_logs_and_matches_the_core(tmp_path):
    from lightning_fairprune.diagnostics import group_hessian_lambda_max
    from lightning_fairprune.records import GROUP_TABLE_COLUMNS, record_scalars

    x, y = digits_tensors(n=300)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    monitor = FairnessMonitor(
        loader, num_probes=0, lambda_max_iterations=8, params=["fc.*"], seed=3, log=False
    )
    model = SmallCNN()
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path))
    record = monitor.measure(trainer, model, "end")
    params = {n: p for n, p in model.named_parameters() if n.startswith("fc.")}
    expected = group_hessian_lambda_max(
        model, [(bx, by) for bx, by in loader], 10, iterations=8, seed=3, params=params
    )
    assert record["hessian_lambda_max"] == pytest.approx(expected.tolist(), rel=1e-6)
    assert record["hessian_trace"] is None
    lam = np.array(record["hessian_lambda_max"])
    assert record["disparity"]["hessian_lambda_max"]["gap"] == pytest.approx(lam.max() - lam.min())
    scalars = record_scalars(record)
    assert scalars["fairprune/hessian_lambda_max/g3"] == pytest.approx(lam[3])
    assert "fairprune/disparity/hessian_lambda_max/gap" in scalars
    assert "hessian_lambda_max" in GROUP_TABLE_COLUMNS
    assert monitor.settings()["lambda_max_iterations"] == 8
    assert monitor.settings()["gate_memory"] == 1 << 30  # the diagnostics' GATE_MEMORY
    # off by default: nothing computed, nothing logged
    off = FairnessMonitor(loader, num_probes=0).measure(trainer, model, "end")
    assert off["hessian_lambda_max"] is None
    assert not any("lambda_max" in k for k in record_scalars(off))
    with pytest.raises(ValueError, match=r"`lambda_max_iterations`.*-1"):
        FairnessMonitor(lambda_max_iterations=-1)
