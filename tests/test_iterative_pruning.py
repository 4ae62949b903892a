"""IterativePruning in real `Trainer.fit` runs on the digits data (tests/_models.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _ddp import run_ddp
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_fairprune.callbacks.events import PruningEvent
from lightning_fairprune.callbacks.pruning import IterativePruning
from lightning_fairprune.callbacks.training import weight_decays
from lightning_fairprune.pruning import masks_to_state

PRUNABLE = ["features.0.weight", "features.2.weight", "fc.weight"]


def _prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {k: named[k] for k in PRUNABLE}


def _num_prunable(model: nn.Module) -> int:
    return sum(p.numel() for p in _prunable(model).values())


def _zeros(model: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in _prunable(model).values())


class Recorder(Callback):
    """A listener: records the protocol calls and the state of the model at each."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, PruningEvent, int, int]] = []
        self.after_weights: list[dict[str, torch.Tensor]] = []
        self.rng_before: list[torch.Tensor] = []
        self.rng_after: list[torch.Tensor] = []
        self.batch_idx: int | None = None
        self.round_batches: list[int | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_idx = batch_idx

    def on_train_epoch_end(self, trainer, pl_module):
        self.batch_idx = None

    def on_before_pruning_round(self, trainer, pl_module, event):
        self.calls.append(("before", event, _zeros(pl_module), trainer.global_step))
        self.rng_before.append(torch.get_rng_state())

    def on_pruning_round(self, trainer, pl_module, event):
        self.calls.append(("after", event, _zeros(pl_module), trainer.global_step))
        self.after_weights.append({k: v.detach().clone() for k, v in _prunable(pl_module).items()})
        self.rng_after.append(torch.get_rng_state())
        self.round_batches.append(self.batch_idx)


class MemoryLogger(Logger):
    """A minimal Lightning logger that keeps every logged metric."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))


def _fit(tmp_path, model, callbacks, dm=None, ckpt_path=None, **kwargs):
    trainer_kwargs = quiet_trainer_kwargs(tmp_path)
    trainer_kwargs.update(limit_val_batches=0, num_sanity_val_steps=0)
    trainer_kwargs.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, datamodule=dm or DigitsDataModule(batch_size=32, n=240), ckpt_path=ckpt_path)
    return trainer


def _expected_zeros(target: float, n: int) -> int:
    return math.floor(target * n + 0.5)


# --------------------------------------------------------------------------- schedules in fit
def test_epoch_rounds_linear_sgd_momentum_listener_and_logger(tmp_path):
    model = SmallCNN(optimizer="sgd", momentum=0.9)
    n = _num_prunable(model)
    pruning = IterativePruning(0.6, schedule="linear", num_rounds=3, start=1)
    recorder = Recorder()
    logger = MemoryLogger()
    _fit(tmp_path, model, [pruning, recorder], max_epochs=5, logger=logger)

    targets = [0.2, 0.4, 0.6]
    # protocol: before/after alternate, before sees pre-round weights, after the pruned ones
    kinds = [c[0] for c in recorder.calls]
    assert kinds == ["before", "after"] * 3
    for r, target in enumerate(targets):
        (_, before, zeros_before, _), (_, after, zeros_after, _) = recorder.calls[2 * r : 2 * r + 2]
        assert before.round_index == after.round_index == r
        assert before.epoch == after.epoch == 1 + r
        assert before.realized_sparsity is None
        assert before.layer_sparsity == {}
        assert after.target_sparsity == pytest.approx(target)
        assert after.num_rounds == 3
        assert after.criterion == "magnitude"
        expected = _expected_zeros(target, n)
        assert zeros_after == expected
        assert after.realized_sparsity == expected / n
        assert zeros_before == (_expected_zeros(targets[r - 1], n) if r else 0)
        assert set(after.layer_sparsity) == set(PRUNABLE)
        assert not before.rewound
        assert not after.rewound
    # every round ran at the start of its epoch, before any batch of it
    assert recorder.round_batches == [None, None, None]
    # after 2 more epochs of SGD with momentum and weight decay the pruned weights are still 0
    assert _zeros(model) == _expected_zeros(0.6, n)
    masks = pruning.masks
    for name, p in _prunable(model).items():
        assert torch.all(p[~masks[name]] == 0)
        assert not torch.any(p[masks[name]] == 0)
    assert pruning.rounds_done == 3
    assert pruning.current_sparsity == _expected_zeros(0.6, n) / n
    # the logger received the round metrics at the round's global step
    rows = [(step, m) for step, m in logger.rows if "fairprune/sparsity" in m]
    assert [m["fairprune/round"] for _, m in rows] == [1.0, 2.0, 3.0]
    assert [m["fairprune/target_sparsity"] for _, m in rows] == pytest.approx(targets)
    steps_per_epoch = 192 // 32
    assert [s for s, _ in rows] == [steps_per_epoch * e for e in (1, 2, 3)]
    last = rows[-1][1]
    assert last["fairprune/sparsity"] == _expected_zeros(0.6, n) / n
    for name in PRUNABLE:
        layer = _prunable(model)[name]
        assert last[f"fairprune/sparsity/{name}"] == pytest.approx(
            float((layer == 0).sum()) / layer.numel()
        )


def test_step_rounds_accumulation_adamw(tmp_path):
    model = SmallCNN(optimizer="adamw", lr=0.01, weight_decay=0.01)
    n = _num_prunable(model)
    pruning = IterativePruning(
        0.8, schedule="cubic", num_rounds=3, interval="step", start=2, frequency=3
    )
    recorder = Recorder()
    # 192 train samples / 32 = 6 batches per epoch; accumulate 2 -> 3 optimizer steps per epoch
    # the recorder comes first so that it sees each batch index before the pruning callback
    _fit(tmp_path, model, [recorder, pruning], max_steps=12, accumulate_grad_batches=2)
    afters = [c for c in recorder.calls if c[0] == "after"]
    assert [c[1].global_step for c in afters] == [2, 5, 8]
    # each round ran at the first batch of an accumulation cycle
    assert all(b is not None and b % 2 == 0 for b in recorder.round_batches)
    targets = [0.8 + (0.0 - 0.8) * (1 - k / 3) ** 3 for k in (1, 2, 3)]
    assert [c[1].target_sparsity for c in afters] == pytest.approx(targets)
    assert [c[2] for c in afters] == [_expected_zeros(t, n) for t in targets]
    # AdamW moved every weight after the last round (4 more steps), yet pruned ones are 0
    assert _zeros(model) == _expected_zeros(0.8, n)
    changed = any(
        not torch.equal(recorder.after_weights[-1][k], p.detach())
        for k, p in _prunable(model).items()
    )
    assert changed


class DropoutCNN(SmallCNN):
    """SmallCNN with dropout: the gradient batches consume the global RNG in train mode."""

    def forward(self, x):
        h = self.features(x).flatten(1)
        h = nn.functional.dropout(torch.relu(self.fc(h)), p=0.5, training=self.training)
        return self.classifier(h)


def test_gradient_criterion_matches_hand_computation_and_keeps_rng(tmp_path):
    torch.manual_seed(0)
    model = DropoutCNN()
    dm = DigitsDataModule(batch_size=32, n=240)  # shuffled with its own generator

    class Reference(Callback):
        def on_before_pruning_round(self, trainer, pl_module, event):
            loader = trainer.train_dataloader
            self.gen_before = loader.generator.get_state()
            params = _prunable(pl_module)
            grads = None
            # same RNG states as the callback will use: first batch of a fresh iterator,
            # dropout active (train mode), mean over 2 batches
            with torch.random.fork_rng(devices=[]):
                it = iter(loader)
                total = 0
                for _ in range(2):
                    x, y = next(it)
                    loss = nn.functional.cross_entropy(pl_module(x), y)
                    g = torch.autograd.grad(loss, list(params.values()))
                    total = [a + b for a, b in zip(total, g, strict=True)] if total else list(g)
                grads = [t / 2 for t in total]
            loader.generator.set_state(self.gen_before)
            scores = torch.cat(
                [
                    (p.detach() * g).abs().flatten()
                    for p, g in zip(params.values(), grads, strict=True)
                ]
            )
            k = _expected_zeros(event.target_sparsity, scores.numel())
            order = torch.argsort(scores, stable=True)
            keep = torch.ones_like(scores, dtype=torch.bool)
            keep[order[:k]] = False
            self.expected = keep
            self.grad_before = pl_module.fc.weight.grad

        def on_pruning_round(self, trainer, pl_module, event):
            self.gen_after = trainer.train_dataloader.generator.get_state()
            self.grad_after = pl_module.fc.weight.grad

    ref = Reference()
    recorder = Recorder()
    pruning = IterativePruning(0.5, criterion="gradient", start=1, gradient_batches=2)
    _fit(tmp_path, model, [pruning, ref, recorder], dm=dm, max_epochs=2)
    got = torch.cat([pruning.masks[k].flatten() for k in PRUNABLE])
    assert torch.equal(got, ref.expected)
    # training's randomness is untouched: global RNG and the loader's generator are restored,
    # and so is the .grad the round found
    assert torch.equal(recorder.rng_before[0], recorder.rng_after[0])
    assert torch.equal(ref.gen_before, ref.gen_after)
    assert ref.grad_after is ref.grad_before


def test_undecayed_weight_decay_per_parameter_and_warning(tmp_path):
    model = SmallCNN(weight_decay=0.0)
    pruning = IterativePruning(0.3, criterion="undecayed", start=1)
    with pytest.warns(UserWarning, match="equals the gradient criterion"):
        _fit(tmp_path, model, [pruning], max_epochs=2)
    assert _zeros(model) == _expected_zeros(0.3, _num_prunable(model))

    class TwoGroups(SmallCNN):
        def configure_optimizers(self):
            return torch.optim.SGD(
                [
                    {"params": self.features.parameters(), "weight_decay": 0.1},
                    {"params": [*self.fc.parameters(), *self.classifier.parameters()]},
                ],
                lr=0.05,
                weight_decay=0.0,
            )

    class Decays(Callback):
        def on_pruning_round(self, trainer, pl_module, event):
            self.decays = weight_decays(trainer, _prunable(pl_module), None, "undecayed")

    pruning = IterativePruning(0.3, criterion="undecayed", start=1)
    spy = Decays()
    _fit(tmp_path, TwoGroups(), [pruning, spy], max_epochs=2)
    assert spy.decays == {"features.0.weight": 0.1, "features.2.weight": 0.1, "fc.weight": 0.0}


def test_bf16_mixed_gradient_criterion(tmp_path):
    model = SmallCNN()
    n = _num_prunable(model)
    pruning = IterativePruning(0.7, schedule="geometric", rate=0.5, criterion="gradient")
    _fit(tmp_path, model, [pruning], max_epochs=4, precision="bf16-mixed")
    assert pruning.plan.num_rounds == 2
    assert pruning.plan.targets == pytest.approx([0.5, 0.7])
    assert _zeros(model) == _expected_zeros(0.7, n)
    for name, p in _prunable(model).items():
        assert torch.all(p[~pruning.masks[name]] == 0)


def test_layerwise_scope_and_compression_ratio(tmp_path):
    model = SmallCNN()
    total = sum(p.numel() for p in model.parameters())
    n = _num_prunable(model)
    pruning = IterativePruning(compression_ratio=3.0, scope="layerwise", start=0)
    _fit(tmp_path, model, [pruning], max_epochs=1)
    target = total * (1 - 1 / 3.0) / n
    for name, p in _prunable(model).items():
        assert int((p == 0).sum()) == _expected_zeros(target, p.numel()), name
    report = pruning.sparsity_report()
    assert report["compression_ratio"] == pytest.approx(3.0, rel=1e-3)


def test_callable_schedule_open_ended(tmp_path):
    model = SmallCNN()
    n = _num_prunable(model)
    pruning = IterativePruning(schedule=lambda epoch: min(0.2 * epoch, 0.5), frequency=2, start=0)
    _fit(tmp_path, model, [pruning], max_epochs=5)
    assert pruning.plan.num_rounds is None
    assert [h["epoch"] for h in pruning.history] == [0, 2, 4]
    assert [h["realized_sparsity"] for h in pruning.history] == [
        _expected_zeros(t, n) / n for t in (0.0, 0.4, 0.5)
    ]


# --------------------------------------------------------------------------- rewinding
def test_rewind_to_init_resets_survivors(tmp_path):
    torch.manual_seed(1)
    model = SmallCNN()
    init = {k: v.detach().clone() for k, v in _prunable(model).items()}
    pruning = IterativePruning(0.5, schedule="linear", num_rounds=2, start=1, rewind="init")
    recorder = Recorder()
    _fit(tmp_path, model, [pruning, recorder], max_epochs=3)
    for weights in recorder.after_weights:
        for name, w in weights.items():
            mask = w != 0
            assert torch.equal(w, init[name] * mask)
    # listeners learn that the survivors were rewound (and the before-events say not yet)
    assert [(kind, ev.rewound) for kind, ev, *_ in recorder.calls] == [
        ("before", False),
        ("after", True),
        ("before", False),
        ("after", True),
    ]
    assert [h["rewound"] for h in pruning.history] == [True, True]
    # the second round pruned by magnitude of the trained weights, not of the rewound ones
    assert len(recorder.after_weights) == 2
    assert not torch.equal(
        recorder.after_weights[0]["fc.weight"] != 0, recorder.after_weights[1]["fc.weight"] != 0
    )


def test_rewind_to_epoch(tmp_path):
    model = SmallCNN()

    class Snap(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.w = {k: v.detach().clone() for k, v in _prunable(pl_module).items()}

    snap, recorder = Snap(), Recorder()
    pruning = IterativePruning(0.4, start=2, rewind=1)
    _fit(tmp_path, model, [snap, pruning, recorder], max_epochs=3)
    assert recorder.calls[-1][1].rewound
    for name, w in recorder.after_weights[0].items():
        assert torch.equal(w, snap.w[name] * (w != 0))


# --------------------------------------------------------------------------- checkpoints
def _resume_setup():
    return IterativePruning(
        0.75, schedule="geometric", num_rounds=4, start=0, criterion="gradient", rewind="init"
    )


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_mid_schedule_equals_uninterrupted(tmp_path):
    dm_kwargs = dict(batch_size=32, n=240, shuffle=False)
    torch.manual_seed(3)
    model_a = SmallCNN()
    init_state = {k: v.clone() for k, v in model_a.state_dict().items()}
    pruning_a = _resume_setup()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _fit(
        tmp_path,
        model_a,
        [pruning_a, ckpt],
        dm=DigitsDataModule(**dm_kwargs),
        max_epochs=5,
        enable_checkpointing=True,
    )
    path = sorted((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))[0]
    state = torch.load(path, weights_only=True)
    saved = state["callbacks"][pruning_a.state_key]
    assert saved["rounds_done"] == 2
    assert set(saved["masks"]) == set(PRUNABLE)  # the one checkpoint form: packed, 1 bit
    assert saved["masks"]["fc.weight"]["bits"].dtype == torch.uint8
    assert saved["masks"]["fc.weight"]["bits"].numel() == 32 * 256 // 8

    model_b = SmallCNN()
    model_b.load_state_dict(init_state)  # overwritten by the checkpoint anyway
    pruning_b = _resume_setup()
    _fit(
        tmp_path / "b",
        model_b,
        [pruning_b, ModelCheckpoint(dirpath=tmp_path / "ckpt_b", save_top_k=-1, every_n_epochs=1)],
        dm=DigitsDataModule(**dm_kwargs),
        max_epochs=5,
        ckpt_path=str(path),
        enable_checkpointing=True,
    )
    assert pruning_b.rounds_done == pruning_a.rounds_done == 4
    assert [h["epoch"] for h in pruning_b.history] == [0, 1, 2, 3]
    for name in PRUNABLE:
        assert torch.equal(pruning_a.masks[name], pruning_b.masks[name])
        rewind_a, rewind_b = (
            pruning_a.mask_state.rewind_weights,
            pruning_b.mask_state.rewind_weights,
        )
        assert torch.equal(rewind_a[name], rewind_b[name])
    for (name, a), b in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoint_masks_must_fit(tmp_path):
    model = SmallCNN()
    pruning = IterativePruning(0.5, start=0)
    _fit(tmp_path, model, [pruning], max_epochs=1)
    state = pruning.state_dict()
    state["masks"].update(masks_to_state({"fc.weight": torch.ones(3, 3, dtype=torch.bool)}))
    fresh = IterativePruning(0.5)
    fresh.setup(pl.Trainer(**quiet_trainer_kwargs(tmp_path)), SmallCNN(), "fit")
    with pytest.raises(ValueError, match=r"checkpoint masks do not fit.*fc\.weight.*\(32, 256\)"):
        fresh.load_state_dict(state)


def test_export_import_masks_and_make_permanent(tmp_path):
    model = SmallCNN()
    pruning = IterativePruning(0.5, make_permanent=True)
    _fit(tmp_path, model, [pruning], max_epochs=1)
    assert pruning.masks == {}  # released at the end of fit
    other = IterativePruning(0.9, start=1)
    other.prune_now(None, model, sparsity=0.5)
    path = tmp_path / "masks.pt"
    other.export_masks(path)
    loaded = torch.load(path, weights_only=True)
    model2 = SmallCNN()
    third = IterativePruning(0.8, start=1)
    third.import_masks(path)  # pending until setup
    trainer = _fit(tmp_path, model2, [third], max_epochs=2)
    assert trainer.current_epoch == 2
    for name in PRUNABLE:
        assert torch.all(dict(model2.named_parameters())[name][~loaded[name]] == 0)
    assert third.current_sparsity == _expected_zeros(0.8, _num_prunable(model2)) / _num_prunable(
        model2
    )


# --------------------------------------------------------------------------- distributed
def test_ddp_identical_masks(tmp_path):
    script = Path(__file__).parent / "ddp_pruning_script.py"
    r0, r1 = run_ddp(script, tmp_path)
    assert r0["rank"] == 0
    assert r1["rank"] == 1
    # the rank-dependent criterion really gave different local scores: the broadcast matters
    assert r0["local_scores"]
    assert r0["local_scores"] != r1["local_scores"]
    for key in ("random", "gradient", "rank_dependent", "worst_group"):
        assert r0[key]["rounds"] == 1
        assert r0[key]["hashes"] == r1[key]["hashes"], key
        assert r0[key]["sparsity"] == r1[key]["sparsity"]
    assert r0["weights_hash"] == r1["weights_hash"]
    assert r0["pruned_nonzero"] == r1["pruned_nonzero"] == 0


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"final_sparsity": 1.0}, r"`final_sparsity` to be a float in \[0, 1\), but got 1.0"),
        ({"final_sparsity": -0.1}, r"`final_sparsity` to be a float in \[0, 1\)"),
        ({"compression_ratio": 0.5}, r"`compression_ratio` to be a finite float >= 1, but got 0.5"),
        ({"final_sparsity": 0.5, "compression_ratio": 2.0}, "exactly one of"),
        ({}, "exactly one of"),
        ({"final_sparsity": 0.5, "schedule": "exponential"}, "`schedule` to be one of"),
        ({"final_sparsity": 0.5, "criterion": "hessian"}, "`criterion` to be one of"),
        ({"final_sparsity": 0.5, "scope": "per-layer"}, "`scope` to be one of"),
        ({"final_sparsity": 0.5, "interval": "batch"}, "`interval` to be one of"),
        ({"final_sparsity": 0.5, "start": -1}, "`start` to be None or an int >= 0"),
        ({"final_sparsity": 0.5, "frequency": 0}, "`frequency` to be an int >= 1"),
        ({"final_sparsity": 0.5, "start": 3, "end": 2}, "`end` to be None or an int >= `start`"),
        ({"final_sparsity": 0.5, "num_rounds": 3, "schedule": "one_shot"}, "`num_rounds` to be"),
        (
            {"final_sparsity": 0.5, "schedule": "linear", "num_rounds": 5, "end": 2, "start": 0},
            "last round at 4",
        ),
        ({"final_sparsity": 0.5, "schedule": "linear", "rate": 0.2}, "`rate` only with"),
        ({"final_sparsity": 0.5, "schedule": "geometric", "rate": 1.5}, r"`rate` to be a float"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "`initial_sparsity` to be at most"),
        ({"final_sparsity": 0.5, "rewind": "start"}, "`rewind` to be None, 'init' or an int"),
        ({"final_sparsity": 0.5, "rewind": 3, "start": 1}, "`rewind` to be at most `start`"),
        ({"final_sparsity": 0.5, "gradient_batches": 0}, "`gradient_batches` to be an int >= 1"),
        (
            {"final_sparsity": 0.5, "weight_decay": -1.0},
            "`weight_decay` to be None or a finite float >= 0",
        ),
        ({"final_sparsity": 0.5, "include_types": [3]}, "`include_types` to be a list of strings"),
        ({"schedule": lambda e: 0.1, "final_sparsity": 0.5}, "neither `final_sparsity`"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        IterativePruning(**kwargs)


def test_callable_schedule_prevalidated_at_setup(tmp_path):
    pruning = IterativePruning(schedule=lambda epoch: 0.5 - 0.1 * epoch, end=3)
    with pytest.raises(ValueError, match="`schedule` to be non-decreasing"):
        _fit(tmp_path, SmallCNN(), [pruning], max_epochs=4)
    pruning = IterativePruning(schedule=lambda epoch: 0.5 * epoch)  # open-ended: max_epochs
    with pytest.raises(ValueError, match=r"every value of `schedule` to be a float in \[0, 1\)"):
        _fit(tmp_path, SmallCNN(), [pruning], max_epochs=4)


def test_callable_schedule_checked_when_evaluated():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    values = iter([0.5, 0.25])
    pruning = IterativePruning(schedule=lambda t: next(values), frequency=1, start=0)
    pruning.prune_now(None, model)
    with pytest.raises(ValueError, match=r"non-decreasing, but schedule\(1\) returned 0.25"):
        pruning.prune_now(None, model)
    pruning = IterativePruning(schedule=lambda t: 1.0, start=0)
    with pytest.raises(ValueError, match=r"return a float in \[0, 1\), but schedule\(0\) returned"):
        pruning.prune_now(None, model)


def test_no_parameter_matches_selection(tmp_path):
    pruning = IterativePruning(0.5, include_names=["encoder.*"])
    with pytest.raises(ValueError, match="match at least one parameter"):
        _fit(tmp_path, SmallCNN(), [pruning], max_epochs=1)


def test_unreachable_compression_ratio(tmp_path):
    pruning = IterativePruning(compression_ratio=1000.0)
    with pytest.raises(ValueError, match="`compression_ratio` to be reachable"):
        _fit(tmp_path, SmallCNN(), [pruning], max_epochs=1)


def test_prune_now_lower_sparsity_rejected():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    pruning = IterativePruning(0.8)
    pruning.prune_now(None, model, sparsity=0.5)
    with pytest.raises(ValueError, match=r"`sparsity` to be at least the current sparsity 0\.5"):
        pruning.prune_now(None, model, sparsity=0.25)
    pruning.prune_now(None, model)
    with pytest.raises(ValueError, match="`sparsity` when the schedule is complete"):
        pruning.prune_now(None, model)


def test_state_key_distinguishes_instances():
    a = IterativePruning(0.5, include_names=["features.*"])
    b = IterativePruning(0.5, include_names=["fc.*"])
    assert a.state_key != b.state_key
    assert a.state_key == IterativePruning(0.5, include_names=["features.*"]).state_key
