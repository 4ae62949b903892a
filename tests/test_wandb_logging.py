"""W&B logging on real offline runs, read back from the ``run-<id>.wandb`` file."""

from __future__ import annotations

import csv
import math
import warnings

import lightning.pytorch as pl
import pytest
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from _wandb_reader import read_wandb_run
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_fairprune.history import recall_curves
from lightning_fairprune.logging import log_config, log_round, log_summary
from lightning_fairprune.records import (
    GROUP_TABLE_COLUMNS,
    group_table,
    logged_scalars,
    summary_values,
)

NUM_ROUNDS = 4  # record 0 is the dense reference, then one record per pruning round


def record_rows(run) -> list[dict]:
    """The W&B rows of monitor records (whatever their moment's prefix), in order."""
    return [row for row in run.history if any(k.endswith("/moment_code") for k in row)]


def synthetic_record(k: int, global_step: int) -> dict:
    """A history record with the monitor's schema; group 2 is missing in round 2."""
    sparsity = [0.0, 0.5, 0.75, 0.9][k]
    recall = [[0.96, 0.9, 0.84], [0.95, 0.85, 0.7], [0.94, 0.8, None], [0.93, 0.7, 0.5]][k]
    dense_recall = [0.96, 0.9, 0.84]
    support = [40, 30, 10]
    present = [r for r in recall if r is not None]
    accuracy = sum(r * s for r, s in zip(recall, support, strict=True) if r is not None) / sum(
        s for r, s in zip(recall, support, strict=True) if r is not None
    )
    dense_acc = sum(r * s for r, s in zip(dense_recall, support, strict=True)) / sum(support)
    nb = [None if r is None else (r - accuracy) / accuracy for r in recall]
    nb_dense = [(r - dense_acc) / dense_acc for r in dense_recall]
    ratio = [None if b is None else b / d for b, d in zip(nb, nb_dense, strict=True)]
    pairs = [(d, b) for d, b in zip(nb_dense, nb, strict=True) if b is not None]
    alpha = sum(d * b for d, b in pairs) / sum(d * d for d, _ in pairs) if k else None
    grad = [0.1 * (k + 1), 0.2 * (k + 1), None if recall[2] is None else 0.5 * (k + 1)]
    trace = [1.0 + k, 2.0 + k, None if recall[2] is None else 4.0 + 2 * k]
    loss = [0.1 + 0.1 * k, 0.2 + 0.2 * k, None if recall[2] is None else 0.3 + 0.4 * k]
    excess = [None if v is None else v - v0 for v, v0 in zip(loss, [0.1, 0.2, 0.3], strict=True)]
    grads = [v for v in grad if v is not None]
    return {
        "moment": "dense" if k == 0 else "after_round",
        "round": k,
        "epoch": k,
        "global_step": global_step,
        "sparsity": sparsity,
        "accuracy": accuracy,
        "num_groups": 3,
        "support": support,
        "recall": recall,
        "recall_dense": dense_recall,
        "balance": [None if r is None else r - accuracy for r in recall],
        "norm_balance": nb,
        "intensification": ratio,
        "alpha": alpha,
        "loss": loss,
        "excess_loss": excess,
        "predicted_excess_loss": None,
        "grad_norm": grad,
        "hessian_trace": trace,
        "hessian_trace_se": None,
        "disparity": {
            "recall": {
                "max": max(present),
                "min": min(present),
                "gap": max(present) - min(present),
                "ratio": max(present) / min(present),
                "worst": recall.index(min(present)),
                "best": recall.index(max(present)),
            },
            "grad_norm": {"gap": max(grads) - min(grads), "ratio": max(grads) / min(grads)},
        },
    }


class SyntheticMonitor(pl.Callback):
    """Stands in for the FairnessMonitor: one record per epoch through `log_round`."""

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.summary: dict = {}

    def setup(self, trainer, pl_module, stage):
        log_config(trainer, "SyntheticMonitor", {"num_rounds": NUM_ROUNDS, "fn": math.sqrt})

    def on_train_epoch_end(self, trainer, pl_module):
        record = synthetic_record(trainer.current_epoch, trainer.global_step)
        self.history.append(record)
        log_round(trainer, record, self.history)

    def on_fit_end(self, trainer, pl_module):
        self.summary = log_summary(trainer, self.history)


@pytest.fixture
def wandb_env(monkeypatch):
    # WandbLogger(offline=True) writes os.environ["WANDB_MODE"]; restore it afterwards
    monkeypatch.setenv("WANDB_MODE", "offline")
    import wandb

    yield wandb
    wandb.finish()


def fit(tmp_path, loggers, callback=None):
    callback = callback or SyntheticMonitor()
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(logger=loggers, max_epochs=NUM_ROUNDS, limit_val_batches=0)
    trainer = pl.Trainer(callbacks=[callback], **kwargs)
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=160, batch_size=64))
    return trainer, callback


def expected_history(trainer_steps: list[int]) -> list[dict]:
    return [synthetic_record(k, step) for k, step in enumerate(trainer_steps)]


def test_offline_run_holds_scalars_tables_charts_summary_and_config(tmp_path, wandb_env):
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fairprune-test")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no logging failure allowed
        _, monitor = fit(tmp_path, [wandb_logger, csv_logger])
    wandb_logger.experiment.finish()

    history = monitor.history
    assert len(history) == NUM_ROUNDS
    assert history == expected_history([r["global_step"] for r in history])
    run = read_wandb_run(tmp_path / "wandb")

    # scalars: one W&B row per record, every value exact, at the trainer's global step; the
    # dense and after-round records under their own prefix (no key twice at one step)
    rows = record_rows(run)
    assert len(rows) == NUM_ROUNDS
    for row, record in zip(rows, history, strict=True):
        scalars = logged_scalars(record)
        assert {k: row[k] for k in scalars} == scalars
        pre = f"fairprune/{record['moment']}/"
        assert row["trainer/global_step"] == record["global_step"]
        assert row[f"{pre}recall/g1"] == record["recall"][1]
        assert row[f"{pre}worst_group_recall"] == min(r for r in record["recall"] if r)
    assert "fairprune/after_round/recall/g2" not in rows[2]  # missing group: left out, not 0
    assert rows[1]["fairprune/after_round/alpha"] == history[1]["alpha"]
    assert rows[3]["fairprune/after_round/disparity/grad_norm/ratio"] == pytest.approx(2.0 / 0.4)
    assert rows[0]["fairprune/dense/moment_code"] == 0
    assert [r["fairprune/after_round/moment_code"] for r in rows[1:]] == [1, 1, 1]

    # per-group table: one per record, the last equals the reference rows
    refs = run.table_refs("fairprune/groups")
    assert len(refs) == NUM_ROUNDS
    table = run.load_table(refs[-1])
    assert table["columns"] == GROUP_TABLE_COLUMNS
    assert table["data"] == group_table(history[-1], history)[1]
    assert table["data"][2][:4] == ["g2", 10, 0.84, 0.5]
    middle = run.load_table(refs[2])["data"]
    assert middle[2][3] is None  # group 2 missing in round 2 stays missing

    # bar chart of accuracy within each group, dense vs now
    bars = run.load_table(run.table_refs("fairprune/group_accuracy_dense_vs_now_table")[-1])
    assert dict(bars["data"]) == {
        "g0 dense": 0.96, "g0 now": 0.93, "g1 dense": 0.9, "g1 now": 0.7,
        "g2 dense": 0.84, "g2 now": 0.5,
    }  # fmt: skip

    # recall vs sparsity line series: grows by one point per round
    series_refs = run.table_refs("fairprune/group_accuracy_vs_sparsity_table")
    lengths = [len(run.load_table(ref)["data"]) for ref in series_refs]
    assert lengths == [3, 6, 8, 11]
    last = run.load_table(series_refs[-1])
    col = {name: i for i, name in enumerate(last["columns"])}
    points = {(r[col["lineKey"]], r[col["step"]], r[col["lineVal"]]) for r in last["data"]}
    xs, ys, keys = recall_curves(history)
    assert points == {(keys[g], x, y) for g in range(3) for x, y in zip(xs[g], ys[g], strict=True)}

    # scatter of B-tilde now vs dense, with alpha in the title
    scatter = run.load_table(run.table_refs("fairprune/norm_balance_scatter_table")[-1])
    nb_dense = GROUP_TABLE_COLUMNS.index("norm_balance_dense")
    nb_now = GROUP_TABLE_COLUMNS.index("norm_balance")
    assert [row[1:] for row in scatter["data"]] == [
        [r[nb_dense], r[nb_now]] for r in group_table(history[-1], history)[1]
    ]
    panel = run.config["_wandb.visualize.fairprune/norm_balance_scatter"]["panel_config"]
    assert f"alpha = {history[-1]['alpha']:.3f}" in panel["stringSettings"]["title"]

    # summary and config
    assert monitor.summary == summary_values(history)
    for key, value in monitor.summary.items():
        assert run.summary[key] == pytest.approx(value), key
    assert run.summary["fairprune/final/sparsity"] == 0.9
    assert run.summary["fairprune/final/worst_group_recall"] == 0.5
    assert run.config["fairprune/SyntheticMonitor"] == {"num_rounds": 4, "fn": "math.sqrt"}

    # other loggers get the scalars
    csv_path = next((tmp_path / "csv").rglob("metrics.csv"))
    with csv_path.open() as handle:
        csv_rows = [
            r
            for r in csv.DictReader(handle)
            if r.get("fairprune/dense/accuracy") or r.get("fairprune/after_round/accuracy")
        ]
    values = [
        float(r.get("fairprune/dense/accuracy") or r["fairprune/after_round/accuracy"])
        for r in csv_rows
    ]
    assert values == pytest.approx([r["accuracy"] for r in history])


def test_wandb_table_failure_is_one_warning_and_scalars_survive(tmp_path, wandb_env, monkeypatch):
    def broken_table(*args, **kwargs):
        raise RuntimeError("table service down")

    monkeypatch.setattr(wandb_env, "Table", broken_table)
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fairprune-test")
    with pytest.warns(RuntimeWarning, match="tables and charts") as caught:
        trainer, monitor = fit(tmp_path, [wandb_logger])
    wandb_logger.experiment.finish()
    ours = [w for w in caught if "lightning_fairprune" in str(w.message)]
    assert len(ours) == 1
    assert "table service down" in str(ours[0].message)
    assert trainer.current_epoch == NUM_ROUNDS
    history = monitor.history
    assert history == expected_history([r["global_step"] for r in history])
    run = read_wandb_run(tmp_path / "wandb")
    assert [
        row[f"fairprune/{r['moment']}/accuracy"]
        for row, r in zip(record_rows(run), history, strict=True)
    ] == [r["accuracy"] for r in history]
    assert run.table_refs("fairprune/groups") == []
    assert run.summary["fairprune/final/accuracy"] == history[-1]["accuracy"]


def test_wandb_log_failure_is_one_warning_and_history_is_whole(tmp_path, wandb_env, monkeypatch):
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fairprune-test")
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("wandb unreachable")

    monkeypatch.setattr(wandb_logger.experiment, "log", broken_log)
    with pytest.warns(RuntimeWarning, match="logging to W&B failed") as caught:
        trainer, monitor = fit(tmp_path, [wandb_logger, csv_logger])
    wandb_logger.experiment.finish()
    ours = [w for w in caught if "lightning_fairprune" in str(w.message)]
    assert len(ours) == 1
    assert len(calls) == NUM_ROUNDS  # tried every round, warned once
    assert trainer.current_epoch == NUM_ROUNDS
    assert monitor.history == expected_history([r["global_step"] for r in monitor.history])
    csv_path = next((tmp_path / "csv").rglob("metrics.csv"))
    assert csv_path.read_text().count("\n") >= NUM_ROUNDS + 1  # the CSV logger still got them


def test_no_logger_at_all(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, monitor = fit(tmp_path, False)
    assert len(monitor.history) == NUM_ROUNDS
    assert monitor.summary["fairprune/final/sparsity"] == 0.9


class _NeverStartingWandb:
    """A logger whose W&B run never starts (``wandb.init`` failing)."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def experiment(self):
        self.calls += 1
        raise RuntimeError("wandb.init failed: no network")

    def log_metrics(self, metrics, step):
        self.experiment.log(metrics)


# detected by class name, like the real one
BrokenWandbLogger = type("WandbLogger", (_NeverStartingWandb,), {})


class _Trainer:
    def __init__(self, loggers, rank_zero=True):
        self.loggers = loggers
        self.global_step = 5
        self.is_global_zero = rank_zero


class _Recorder:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))


def test_failing_wandb_init_warns_once_per_kind_and_other_loggers_continue():
    broken, recorder = BrokenWandbLogger(), _Recorder()
    trainer = _Trainer([broken, recorder])
    history = [synthetic_record(0, 5), synthetic_record(1, 5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(2):
            log_round(trainer, history[k], history[: k + 1])
        log_config(trainer, "X", {"a": 1})
        log_summary(trainer, history)
        log_summary(trainer, history)
    assert all(w.category is RuntimeWarning for w in caught)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "logging to W&B failed" in messages[0]
    assert "could not be started" in messages[1]
    assert [step for step, _ in recorder.rows] == [5, 5]
    assert recorder.rows[1][1] == logged_scalars(history[1])


def test_only_rank_zero_logs():
    recorder = _Recorder()
    record = synthetic_record(1, 5)
    log_round(_Trainer([recorder], rank_zero=False), record, [record])
    assert recorder.rows == []
    log_round(_Trainer([recorder]), record, [record])
    assert len(recorder.rows) == 1


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="Expected `record` to be a dict"):
        log_round(_Trainer([]), [0.5], [])
    with pytest.raises(ValueError, match="Expected `name` to be a non-empty string"):
        log_config(_Trainer([]), "", {})
    with pytest.raises(TypeError, match="Expected `settings` to be a mapping"):
        log_config(_Trainer([]), "X", [1])


def test_real_monitor_and_pruning_log_every_record_to_wandb(tmp_path, wandb_env):
    from lightning_fairprune.callbacks.monitor import FairnessMonitor
    from lightning_fairprune.callbacks.pruning import IterativePruning

    pruning = IterativePruning(0.8, schedule="cubic", num_rounds=2, start=1)
    monitor = FairnessMonitor(num_probes=2, max_batches=1)
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fairprune-test")
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(logger=[CSVLogger(str(tmp_path), name="csv"), wandb_logger], max_epochs=3)
    trainer = pl.Trainer(callbacks=[pruning, monitor], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=200, batch_size=64))
    log_summary(trainer, monitor.history)
    wandb_logger.experiment.finish()

    history = monitor.history
    assert [r["moment"] for r in history] == [
        "dense", "after_round", "before_round", "after_round", "end",
    ]  # fmt: skip
    run = read_wandb_run(tmp_path / "wandb")
    rows = record_rows(run)
    assert len(rows) == len(history)
    for row, record in zip(rows, history, strict=True):
        scalars = logged_scalars(record)
        assert {k: row[k] for k in scalars} == pytest.approx(scalars)
        assert row["trainer/global_step"] == record["global_step"]
    tables = [run.load_table(ref) for ref in run.table_refs("fairprune/groups")]
    assert len(tables) == len(history)
    for table, k in zip(tables, range(len(history)), strict=True):
        assert table["data"] == group_table(history[k], history[: k + 1])[1]
    assert run.summary["fairprune/final/sparsity"] == history[-1]["sparsity"]
    assert history[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert run.summary["fairprune/final/accuracy"] == pytest.approx(history[-1]["accuracy"])


def test_real_wandb_logger_whose_init_fails(tmp_path, wandb_env, monkeypatch):
    def failing_init(*args, **kwargs):
        raise wandb_env.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb_env, "init", failing_init)
    recorder = _Recorder()
    trainer = _Trainer([WandbLogger(save_dir=str(tmp_path), offline=True), recorder])
    history = [synthetic_record(0, 5), synthetic_record(1, 5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(2):
            log_round(trainer, history[k], history[: k + 1])
        log_config(trainer, "X", {"a": 1})
        assert log_summary(trainer, history) == summary_values(history)
    messages = [str(w.message) for w in caught if "lightning_fairprune" in str(w.message)]
    assert len(messages) == 2
    assert "api_key not configured" in messages[0]
    assert "could not be started" in messages[1]
    assert [metrics for _, metrics in recorder.rows] == [logged_scalars(r) for r in history]


def test_monitor_logs_its_own_config_and_final_summary(tmp_path, wandb_env):
    from lightning_fairprune.callbacks.monitor import FairnessMonitor
    from lightning_fairprune.callbacks.pruning import IterativePruning

    pruning = IterativePruning(0.5, num_rounds=1, start=1)
    monitor = FairnessMonitor(num_probes=1, max_batches=1, seed=3)
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fairprune-test")
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(logger=wandb_logger, max_epochs=2, limit_val_batches=1)
    trainer = pl.Trainer(callbacks=[pruning, monitor], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=128, batch_size=64))
    wandb_logger.experiment.finish()  # no log_summary/log_config here: the monitor does it

    history = monitor.history
    assert [r["moment"] for r in history] == ["dense", "after_round", "end"]
    last = history[-1]
    run = read_wandb_run(tmp_path / "wandb")
    assert run.summary["fairprune/final/sparsity"] == pytest.approx(last["sparsity"])
    assert last["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert run.summary["fairprune/final/accuracy"] == pytest.approx(last["accuracy"])
    worst = min(r for r in last["recall"] if r is not None)
    assert run.summary["fairprune/final/worst_group_recall"] == pytest.approx(worst)
    assert run.summary["fairprune/final/moment_code"] == 4  # measured before the summary
    assert run.summary["fairprune/num_records"] == len(history)
    assert {k: run.summary[k] for k in summary_values(history)} == pytest.approx(
        summary_values(history)
    )

    config = run.config["fairprune/monitor"]
    assert config["num_probes"] == 1
    assert config["max_batches"] == 1
    assert config["seed"] == 3
    assert config["log"] is True
    assert config["loss_fn"] is None
    assert config["params"] is None
    assert config["dataloader"] is None


def test_monitor_settings_are_plain_and_callables_named():
    import json

    from lightning_fairprune.callbacks.monitor import FairnessMonitor

    settings = FairnessMonitor(
        num_probes=2, params=("fc.*",), loss_fn=math.sqrt, history_path="h.jsonl"
    ).settings()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["loss_fn"] == "math.sqrt"
    assert settings["params"] == ["fc.*"]
    assert settings["history_path"] == "h.jsonl"
    assert settings["num_probes"] == 2


def test_monitor_with_log_false_sends_nothing_to_wandb(tmp_path, wandb_env):
    # Lightning overwrites `callback.log` with the module's `log` method at fit start:
    # `log=False` must still hold during a real fit
    from lightning_fairprune.callbacks.monitor import FairnessMonitor
    from lightning_fairprune.callbacks.pruning import IterativePruning

    pruning = IterativePruning(0.5, num_rounds=1, start=1)
    monitor = FairnessMonitor(num_probes=0, max_batches=1, log=False)
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fairprune-test")
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(logger=wandb_logger, max_epochs=2, limit_val_batches=1)
    trainer = pl.Trainer(callbacks=[pruning, monitor], **kwargs)
    trainer.fit(SmallCNN(), datamodule=DigitsDataModule(n=128, batch_size=64))
    wandb_logger.experiment.finish()

    assert len(monitor.history) == 3
    run = read_wandb_run(tmp_path / "wandb")
    assert run.rows_with("fairprune/moment_code") == []
    # the pruner's own scalars (fairprune/sparsity, ...) are there; nothing of the monitor
    monitor_keys = ("fairprune/final/", "fairprune/dense/", "fairprune/num_records")
    assert not any(k.startswith(monitor_keys) for k in run.summary)
    assert "fairprune/accuracy" not in run.summary
    assert "fairprune/monitor" not in run.config
