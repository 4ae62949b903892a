"""The LightningCLI entry point, the ready configs and the W&B sweep config."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))
sys.path.insert(0, str(EXAMPLES))

from cli import main  # noqa: E402
from fairprune_examples import LeNet, stratified_split  # noqa: E402

from lightning_fairprune.callbacks.equalizer import GroupEqualizer  # noqa: E402
from lightning_fairprune.callbacks.monitor import FairnessMonitor  # noqa: E402
from lightning_fairprune.callbacks.pruning import IterativePruning  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when both `args` and pytest's own sys.argv are present
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Shrink any config to a seconds-long run writing under tmp_path."""
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=cli",
        "--trainer.max_epochs=4",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.init_args.max_per_class=16",
        "--monitor.num_probes=0",
        "--monitor.predict_excess_loss=false",
        "--monitor.max_batches=1",
    ]


def prunable_sparsity(model: torch.nn.Module) -> float:
    weights = [
        m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    weights = weights[:-1]  # the classifier is not pruned by default
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def test_cubic_equalized_config_end_to_end(tmp_path):
    args = ["fit", "--config", str(EXAMPLES / "configs" / "cubic_equalized.yaml")]
    args += [*tiny_overrides(tmp_path), "--pruning.start=1", "--pruning.num_rounds=3"]
    args += ["--equalizer.init_args.every_n_steps=1"]
    cli = main(args)
    callbacks = {type(cb): cb for cb in cli.trainer.callbacks}
    pruning, monitor = callbacks[IterativePruning], callbacks[FairnessMonitor]
    equalizer = callbacks[GroupEqualizer]
    assert isinstance(cli.model, LeNet)
    assert cli.model.group_loss is not None

    # pruning happened on the cubic schedule: 3 rounds at epochs 1, 2, 3 to exactly 90%
    assert pruning.rounds_done == 3
    assert pruning.current_sparsity == pytest.approx(0.9)
    total = (
        sum(
            m.weight.numel()
            for m in cli.model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
        )
        - cli.model.classifier[-1].weight.numel()
    )
    assert prunable_sparsity(cli.model) == pytest.approx(round(0.9 * total) / total)

    # the monitor measured the dense model, every round and the end; history on disk
    moments = [r["moment"] for r in monitor.history]
    assert moments == ["dense", "after_round", "before_round", "after_round", "before_round",
                       "after_round", "end"]  # fmt: skip
    assert [r["sparsity"] for r in monitor.history][-1] == pytest.approx(0.9)
    lines = (Path(cli.trainer.log_dir) / "fairprune_history.jsonl").read_text().splitlines()
    assert [json.loads(line)["moment"] for line in lines] == moments

    # the equalizer drove the model's loss once pruning began
    assert equalizer.state_dict()["active"] is True
    assert float(cli.model.group_loss.multipliers.abs().sum()) > 0


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses_and_instantiates(config, tmp_path):
    if config.stem == "wandb":  # an add-on: combine it with a full config
        args = ["--config", str(EXAMPLES / "configs" / "one_shot_undecayed.yaml")]
    else:
        args = []
    args += ["--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    cli = main(args, run=False)
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    assert IterativePruning in kinds
    assert FairnessMonitor in kinds
    assert (GroupEqualizer in kinds) == (cli.model.group_loss is not None)
    raw = yaml.safe_load(config.read_text())
    pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, IterativePruning))
    if "pruning" in raw:
        assert pruning.plan.targets[-1] == pytest.approx(raw["pruning"]["final_sparsity"])
        assert pruning.plan.num_rounds == raw["pruning"].get("num_rounds", 1)
    if config.stem == "wandb":
        assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["CSVLogger", "WandbLogger"]


def test_user_trainer_callbacks_are_kept_next_to_the_equalizer(tmp_path):
    args = ["--config", str(EXAMPLES / "configs" / "cubic_equalized.yaml")]
    args += [f"--trainer.default_root_dir={tmp_path}"]
    args += ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"]
    cli = main(args, run=False)
    kinds = [type(cb).__name__ for cb in cli.trainer.callbacks]
    for name in ("LearningRateMonitor", "GroupEqualizer", "IterativePruning", "FairnessMonitor"):
        assert kinds.count(name) == 1, kinds
    # and without the equalizer section, no equalizer (and nothing None) reaches the Trainer
    args = ["--config", str(EXAMPLES / "configs" / "one_shot_undecayed.yaml")]
    args += [f"--trainer.default_root_dir={tmp_path}"]
    args += ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"]
    kinds = [type(cb).__name__ for cb in main(args, run=False).trainer.callbacks]
    assert "GroupEqualizer" not in kinds
    assert kinds.count("LearningRateMonitor") == 1


def sweep_runs(sweep: dict) -> list[dict]:
    """Parameter combinations covering every listed value (and the range ends) once."""
    options = {}
    for name, spec in sweep["parameters"].items():
        if "values" in spec:
            options[name] = spec["values"]
        elif "value" in spec:
            options[name] = [spec["value"]]
        else:
            options[name] = [spec["min"], spec["max"]]
    width = max(len(v) for v in options.values())
    return [{name: vals[i % len(vals)] for name, vals in options.items()} for i in range(width)]


def test_sweep_config_is_valid_and_its_commands_parse(tmp_path, monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

    sweep = load_sweep_config(str(EXAMPLES / "sweep.yaml"))
    assert sweep is not None
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert sweep["metric"]["goal"] in {"maximize", "minimize"}
    assert sweep["metric"]["name"] == "fairprune/worst_group_accuracy"
    assert (ROOT / sweep["program"]).exists()
    swept = {name.split(".")[0] for name in sweep["parameters"]}
    assert swept == {"pruning", "equalizer"}
    for spec in sweep["parameters"].values():
        assert ("values" in spec) != ("min" in spec and "max" in spec)
    try:  # the official schema check, when the optional `sweeps` package is installed
        import sweeps

        assert sweeps.schema_violations_from_proposed_config(sweep) == []
    except ImportError:
        pass

    # expand the command exactly as the agent does and parse it with the CLI
    command = sweep["command"]
    assert command[:4] == ["${env}", "${interpreter}", "${program}", "fit"]
    assert command[-1] == "${args}"
    monkeypatch.chdir(ROOT)
    for params in sweep_runs(sweep):
        flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
        argv = command[4:-1] + flags["args"] + [f"--trainer.default_root_dir={tmp_path}"]
        cli = main(argv, run=False)  # no subcommand with run=False
        pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, IterativePruning))
        equalizer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GroupEqualizer))
        assert pruning.plan.targets[-1] == pytest.approx(params["pruning.final_sparsity"])
        assert pruning.plan.num_rounds == params["pruning.num_rounds"]
        assert cli.config["pruning"]["schedule"] == params["pruning.schedule"]
        assert cli.config["pruning"]["criterion"] == params["pruning.criterion"]
        assert equalizer.dual_lr == pytest.approx(params["equalizer.init_args.dual_lr"])
        assert "WandbLogger" in [type(lg).__name__ for lg in cli.trainer.loggers]


def test_stratified_split_keeps_validation_balanced_and_subsamples_minority():
    y = torch.arange(10).repeat_interleave(50)
    train, val = stratified_split(y, 0.2, seed=3, minority={3: 0.1, 8: 0.5})
    assert len(set(train.tolist())) == len(train) == 40 * 8 + 4 + 20
    assert len(set(val.tolist())) == len(val) == 100
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.bincount(y[val], minlength=10).tolist() == [10] * 10
    counts = torch.bincount(y[train], minlength=10).tolist()
    assert counts == [40, 40, 40, 4, 40, 40, 40, 40, 20, 40]
    assert len(set(y[val[:20]].tolist())) > 5  # classes interleaved, not sorted
    again = stratified_split(y, 0.2, seed=3, minority={3: 0.1, 8: 0.5})
    assert torch.equal(train, again[0])
    assert torch.equal(val, again[1])
    with pytest.raises(ValueError, match="minority class 3"):
        stratified_split(y, 0.2, seed=0, minority={3: 0.0})


def test_sweep_runs_cover_every_value():
    sweep = {"parameters": {"a": {"values": [1, 2, 3]}, "b": {"min": 0.1, "max": 0.5}}}
    runs = sweep_runs(sweep)
    assert {r["a"] for r in runs} == {1, 2, 3}
    assert {r["b"] for r in runs} == {0.1, 0.5}
    assert len(list(itertools.chain(runs))) == 3


def test_demo_fast_writes_history_wandb_run_and_report(tmp_path, monkeypatch):
    import demo
    from _wandb_reader import read_wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "demo"
    result = demo.main(["--fast", "--no-progress-bar", "--probes", "2", "--out", str(out)])
    history = result["history"]
    assert [r["moment"] for r in history][:2] == ["dense", "after_round"]
    assert len(history) == 11  # dense + 5 x after_round + 4 x before_round + end
    assert history[-1]["sparsity"] == pytest.approx(0.98, abs=1e-4)
    assert result["summary"]["fairprune/final/sparsity"] == history[-1]["sparsity"]
    report = result["report"]
    assert report.rows[0]["sparsity"] == history[-1]["sparsity"]
    assert all(p.exists() and p.stat().st_size > 5000 for p in report.figures)
    assert (out / "report" / "report.md").exists()
    run = read_wandb_run(out / "wandb")
    # one W&B row per record (dense and after-round records under their own key prefix)
    rows = [row for row in run.history if any(k.endswith("/moment_code") for k in row)]
    assert len(rows) == 11
    assert run.config["fairprune/demo"]["final_sparsity"] == 0.98
