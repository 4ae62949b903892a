"""GroupEqualizer driven by real `Trainer.fit` runs on scikit-learn digits."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _ddp import run_ddp
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.callbacks.events import PruningEvent
from lightning_fairprune.losses import GroupEqualizedLoss

MINORITY = torch.tensor([3, 8])


class CaptureLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def series(self, key: str) -> dict[int, float]:
        return {step: m[key] for step, m in self.records if key in m}


class EqualizedCNN(SmallCNN):
    """SmallCNN whose training_step calls the group-equalized loss and records the batch sums."""

    def __init__(
        self, num_groups: int = 10, constraint: str = "signed", two_groups: bool = False, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.criterion = GroupEqualizedLoss(num_groups, constraint=constraint)
        self.two_groups = two_groups
        self.batches: list[dict] = []

    def groups_of(self, y: torch.Tensor) -> torch.Tensor:
        return torch.isin(y, MINORITY).long() if self.two_groups else y

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        groups = self.groups_of(y)
        logits = self(x)
        loss = self.criterion(logits, y, groups)
        with torch.no_grad():
            per = F.cross_entropy(logits, y, reduction="none").double()
            g = self.criterion.num_groups
            self.batches.append(
                {
                    "global_step": self.trainer.global_step,
                    "active": self.criterion.active,
                    "sums": torch.zeros(g, dtype=torch.float64).index_add(0, groups, per),
                    "counts": torch.zeros(g, dtype=torch.float64).index_add(
                        0, groups, torch.ones_like(per)
                    ),
                }
            )
        return loss


def _trainer(tmp_path, callbacks, **overrides) -> pl.Trainer:
    kwargs = quiet_trainer_kwargs(tmp_path)
    kwargs.update(limit_val_batches=0, num_sanity_val_steps=0)
    kwargs.update(overrides)
    return pl.Trainer(callbacks=callbacks, **kwargs)


def _hand_dual(groups_of_steps, lr, g, constraint="signed"):
    """Replay the dual updates from recorded batch sums (float64 reference)."""
    lam = torch.zeros(g, dtype=torch.float64)
    for sums, counts in groups_of_steps:
        present = counts > 0
        d = sums / counts.clamp_min(1e-300) - sums.sum() / counts.sum()
        v = d if constraint == "signed" else d.abs()
        lam = torch.where(present, torch.relu(lam + lr * v), lam)
    return lam


def test_dual_steps_follow_optimizer_steps_under_gradient_accumulation(tmp_path):
    # 480 training samples, batch 32: 15 batches; accumulate 2 -> 8 optimizer steps
    # (the last one after a single micro-batch); a dual step every 2 optimizer steps -> 4
    dm = DigitsDataModule(batch_size=32, shuffle=False)
    model = EqualizedCNN(lr=0.05)
    logger = CaptureLogger()
    eq = GroupEqualizer(dual_lr=0.1, every_n_steps=2)
    _trainer(
        tmp_path, [eq], max_epochs=1, accumulate_grad_batches=2, logger=logger, log_every_n_steps=1
    ).fit(model, dm)
    assert len(model.batches) == 15
    assert eq.num_dual_steps == 4
    intervals = [range(0, 4), range(4, 8), range(8, 12), range(12, 15)]
    replay = [
        (sum(model.batches[i]["sums"] for i in idx), sum(model.batches[i]["counts"] for i in idx))
        for idx in intervals
    ]
    expected = _hand_dual(replay, 0.1, 10)
    torch.testing.assert_close(model.criterion.multipliers.double(), expected, rtol=1e-5, atol=1e-7)
    assert (expected > 0).any()
    # logged at the optimizer steps of the dual updates, λ and violations per group
    lam_series = logger.series("fairprune/lambda/g3")
    assert sorted(lam_series) == [2, 4, 6, 8]
    assert lam_series[8] == pytest.approx(float(expected[3]), rel=1e-5, abs=1e-7)
    last_sums, last_counts = replay[-1]
    v_last = last_sums / last_counts.clamp_min(1e-300) - last_sums.sum() / last_counts.sum()
    for a in range(10):
        key = f"fairprune/violation/g{a}"
        if last_counts[a] > 0:
            assert logger.series(key)[8] == pytest.approx(float(v_last[a]), rel=1e-5, abs=1e-6)
        else:
            assert 8 not in logger.series(key)  # absent group: nothing logged


def test_log_false_sends_nothing_but_still_updates(tmp_path):
    # Lightning overwrites every callback's `.log` attribute during fit; the flag must survive.
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    model = EqualizedCNN(lr=0.05)
    logger = CaptureLogger()
    eq = GroupEqualizer(dual_lr=0.1, every_n_steps=1, log=False)
    _trainer(tmp_path, [eq], max_epochs=1, logger=logger).fit(model, dm)
    assert eq.num_dual_steps > 0
    assert (model.criterion.multipliers > 0).any()
    assert logger.series("fairprune/lambda/g3") == {}


def test_warmup_keeps_the_plain_loss_then_activates(tmp_path):
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    model = EqualizedCNN(lr=0.05)
    logger = CaptureLogger()
    eq = GroupEqualizer(dual_lr=0.1, every_n_steps=1, warmup_steps=3)
    _trainer(tmp_path, [eq], max_epochs=1, logger=logger, log_every_n_steps=1).fit(model, dm)
    assert [b["active"] for b in model.batches] == [False] * 3 + [True] * 5
    lam = logger.series("fairprune/lambda/g8")
    assert sorted(lam) == [3, 4, 5, 6, 7, 8]  # nothing logged before the constraint is active
    # from step 3 on: replay of the dual steps on the recorded batches 3..8
    replay = [(b["sums"], b["counts"]) for b in model.batches[2:]]
    expected = _hand_dual(replay, 0.1, 10)
    torch.testing.assert_close(model.criterion.multipliers.double(), expected, rtol=1e-5, atol=1e-7)
    assert eq.num_dual_steps == 6


class StubPruning(Callback):
    """Zeroes the smaller half of `fc.weight` at the start of one epoch; emits the protocol.

    It implements the `Pruner` protocol (masks, rounds_done, current_sparsity,
    parameter_names), which is how the equalizer finds a pruner.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.rounds_done = 0
        self.masks: dict = {}
        self.current_sparsity = 0.0
        self.parameter_names = ["fc.weight"]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        w = pl_module.fc.weight
        event = PruningEvent(
            0, 1, 0.5, 0.0, trainer.current_epoch, trainer.global_step, "magnitude"
        )
        for cb in trainer.callbacks:
            if hasattr(cb, "on_before_pruning_round"):
                cb.on_before_pruning_round(trainer, pl_module, event)
        with torch.no_grad():
            w.mul_(w.abs() > w.abs().median())
        self.rounds_done = 1
        for cb in trainer.callbacks:
            if hasattr(cb, "on_pruning_round"):
                cb.on_pruning_round(trainer, pl_module, event)


def test_start_after_pruning_waits_for_the_first_round(tmp_path):
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    model = EqualizedCNN(lr=0.05)
    eq = GroupEqualizer(dual_lr=0.1, every_n_steps=1, warmup_steps=2, start_after_pruning=True)
    _trainer(tmp_path, [StubPruning(epoch=1), eq], max_epochs=2).fit(model, dm)
    active = [b["active"] for b in model.batches]
    # epoch 0 (8 steps): inactive; pruning at step 8; active 2 steps later
    assert active == [False] * 10 + [True] * 6
    assert eq.eligible_since == 8
    replay = [(b["sums"], b["counts"]) for b in model.batches[9:]]
    expected = _hand_dual(replay, 0.1, 10)
    torch.testing.assert_close(model.criterion.multipliers.double(), expected, rtol=1e-5, atol=1e-7)


def test_existing_pruning_rounds_make_the_constraint_eligible(tmp_path):
    stub = StubPruning(epoch=99)
    stub.rounds_done = 2  # e.g. an IterativePruning restored from a checkpoint
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    model = EqualizedCNN(lr=0.05)
    eq = GroupEqualizer(dual_lr=0.1, start_after_pruning=True)
    _trainer(tmp_path, [stub, eq], max_epochs=1).fit(model, dm)
    assert all(b["active"] for b in model.batches)
    assert eq.eligible_since == 0


def _group_loss_gap(model: EqualizedCNN, dm: DigitsDataModule) -> tuple[float, float]:
    x, y = dm.train_set.tensors[0], dm.train_set.tensors[1]
    groups = model.groups_of(y)
    model.eval()
    with torch.no_grad():
        logits = model(x)
        per = F.cross_entropy(logits, y, reduction="none")
    losses = torch.stack([per[groups == a].mean() for a in range(2)])
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return (losses.max() - losses.min()).item(), accuracy


def test_equalized_training_shrinks_the_group_loss_gap(tmp_path):
    # classes 3 and 8 kept at 15% form the minority group; plain training leaves their loss far
    # above the majority's, the signed group-equalized loss brings them together
    results = {}
    for equalize in (False, True):
        pl.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=64, n=None, minority={3: 0.15, 8: 0.15}, seed=0)
        model = EqualizedCNN(num_groups=2, two_groups=True, lr=0.05)
        callbacks = [GroupEqualizer(dual_lr=0.05)] if equalize else []
        model.criterion.active = equalize
        _trainer(tmp_path, callbacks, max_epochs=6).fit(model, dm)
        results[equalize] = _group_loss_gap(model, dm)
    (gap_plain, _), (gap_eq, acc_eq) = results[False], results[True]
    assert gap_plain > 0.3
    assert gap_eq < 0.5 * gap_plain
    assert acc_eq > 0.8  # not the degenerate constant classifier (which has no gap either)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    # 8 optimizer steps per epoch, a dual step every 3: the checkpoint after epoch 2 (step 16)
    # holds one step's worth of pending sums, which must be restored for an exact resume
    def make():
        pl.seed_everything(0, verbose=False)
        return (
            EqualizedCNN(lr=0.05),
            DigitsDataModule(batch_size=64, shuffle=False),
            GroupEqualizer(dual_lr=0.1, every_n_steps=3, warmup_steps=5),
        )

    model_a, dm_a, eq_a = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    _trainer(tmp_path / "a", [eq_a, ckpt], max_epochs=4, enable_checkpointing=True).fit(
        model_a, dm_a
    )
    path = next((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))
    state = torch.load(path, weights_only=True)
    saved = state["callbacks"][eq_a.state_key]
    assert saved["steps_since_dual"] == 1
    assert sum(saved["pending_counts"]) == 32  # the last, partial batch of epoch 2
    assert "criterion.multipliers" in state["state_dict"]

    model_b, dm_b, eq_b = make()
    _trainer(tmp_path / "b", [eq_b], max_epochs=4).fit(model_b, dm_b, ckpt_path=str(path))
    assert eq_b.num_dual_steps == eq_a.num_dual_steps == 9  # steps 6, 9, ..., 30
    assert eq_b.state_dict() == eq_a.state_dict()
    torch.testing.assert_close(model_b.criterion.multipliers, model_a.criterion.multipliers)
    assert model_a.criterion.multipliers.abs().sum() > 0
    for (name, p_a), p_b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p_b, p_a, msg=name)


def test_ddp_two_processes_hold_identical_multipliers_equal_to_the_union(tmp_path):
    script = Path(__file__).parent / "ddp_equalizer_script.py"
    rank0, rank1 = run_ddp(script, tmp_path)
    assert rank0["multipliers"] == rank1["multipliers"]  # bitwise identical
    # reference: the dual steps replayed on the union of both ranks' batches
    steps = sorted({b["global_step"] for b in rank0["batches"]})
    every = rank0["every_n_steps"]
    windows = [set(steps[k : k + every]) for k in range(0, len(steps), every)]

    def union(window):
        batches = [b for r in (rank0, rank1) for b in r["batches"] if b["global_step"] in window]
        return (
            sum(torch.tensor(b["sums"], dtype=torch.float64) for b in batches),
            sum(torch.tensor(b["counts"], dtype=torch.float64) for b in batches),
        )

    full = [union(w) for w in windows if len(w) == every]
    expected = _hand_dual(full, rank0["dual_lr"], 10)
    torch.testing.assert_close(
        torch.tensor(rank0["multipliers"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-7
    )
    assert rank0["num_dual_steps"] == len(full) == 2
    # the two ranks saw different data (otherwise the reduction would not be tested)
    assert rank0["batches"][0]["sums"] != rank1["batches"][0]["sums"]
    # the checkpoint holds the pending sums of the last, incomplete window over BOTH ranks
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved = state["callbacks"][rank0["state_key"]]
    pending_sums, pending_counts = union(windows[-1])
    assert len(windows[-1]) < every
    torch.testing.assert_close(
        torch.tensor(saved["pending_loss_sums"], dtype=torch.float64),
        pending_sums,
        rtol=1e-5,
        atol=1e-6,
    )
    assert saved["pending_counts"] == pending_counts.tolist()
    assert sum(saved["pending_counts"]) == 64


# ----------------------------------------------------------------------------- bad input
def test_missing_or_ambiguous_loss_module_is_a_clear_error(tmp_path):
    dm = DigitsDataModule(batch_size=64)
    with pytest.raises(ValueError, match=r"to own a GroupEqualizedLoss.*found none"):
        _trainer(tmp_path, [GroupEqualizer()], max_epochs=1).fit(SmallCNN(), dm)

    two = EqualizedCNN()
    two.other = GroupEqualizedLoss(10)
    with pytest.raises(
        ValueError, match=r"exactly one GroupEqualizedLoss.*\['criterion', 'other'\]"
    ):
        _trainer(tmp_path, [GroupEqualizer()], max_epochs=1).fit(two, dm)
    eq = GroupEqualizer(loss_attr="other")
    assert eq.find_loss(two) is two.other

    with pytest.raises(ValueError, match="`loss_attr`='nope'"):
        GroupEqualizer(loss_attr="nope").find_loss(two)
    with pytest.raises(TypeError, match=r"`EqualizedCNN.fc` to be a GroupEqualizedLoss"):
        GroupEqualizer(loss_attr="fc").find_loss(two)
    outside = GroupEqualizedLoss(10)
    with pytest.warns(UserWarning, match="not a submodule"):
        GroupEqualizer(loss=outside).find_loss(two)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dual_lr": -0.1}, ValueError, "`dual_lr`"),
        ({"dual_lr": float("nan")}, ValueError, "`dual_lr`"),
        ({"every_n_steps": 0}, ValueError, "`every_n_steps`"),
        ({"warmup_steps": -1}, ValueError, "`warmup_steps`"),
        ({"loss": torch.nn.CrossEntropyLoss()}, TypeError, "`loss`"),
        ({"loss": GroupEqualizedLoss(2), "loss_attr": "criterion"}, ValueError, "at most one"),
    ],
)
def test_bad_callback_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GroupEqualizer(**kwargs)


def test_with_the_real_iterative_pruning(tmp_path):
    # IterativePruning prunes at the start of epoch 1 (after 8 optimizer steps); the equalizer
    # waits for that round, then the equalized loss trains the pruned model: masks stay enforced,
    # the multipliers replay exactly from the recorded batches after the round.
    from lightning_fairprune import IterativePruning

    dm = DigitsDataModule(batch_size=64, shuffle=False)
    model = EqualizedCNN(lr=0.05, weight_decay=0.0)
    pruning = IterativePruning(final_sparsity=0.7, start=1, criterion="magnitude")
    eq = GroupEqualizer(dual_lr=0.1, every_n_steps=1, start_after_pruning=True)
    _trainer(tmp_path, [pruning, eq], max_epochs=3).fit(model, dm)
    assert pruning.rounds_done == 1
    assert eq.eligible_since == 8
    active = [b["active"] for b in model.batches]
    assert active == [False] * 8 + [True] * 16
    replay = [(b["sums"], b["counts"]) for b in model.batches[8:]]
    expected = _hand_dual(replay, 0.1, 10)
    torch.testing.assert_close(model.criterion.multipliers.double(), expected, rtol=1e-5, atol=1e-7)
    assert (expected > 0).any()
    # the pruned weights are still exactly zero after 16 equalized steps, at the scheduled sparsity
    report = pruning.sparsity_report()
    assert report["sparsity"] == pytest.approx(0.7, abs=1e-3)
    for name, mask in pruning.masks.items():
        param = model.get_parameter(name)
        assert torch.count_nonzero(param.detach()[~mask]) == 0


def test_multipliers_are_logged_at_the_trainers_cadence_once_active(tmp_path):
    # 8 optimizer steps, a dual step after each, active from step 2 on (warm-up 2), logged
    # every 3 steps: the rows are at steps 3 and 6 only
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    model = EqualizedCNN(lr=0.05)
    logger = CaptureLogger()
    eq = GroupEqualizer(dual_lr=0.1, every_n_steps=1, warmup_steps=2)
    _trainer(tmp_path, [eq], max_epochs=1, logger=logger, log_every_n_steps=3).fit(model, dm)
    assert eq.num_dual_steps == 7
    assert sorted(logger.series("fairprune/lambda/g8")) == [3, 6]
    assert sorted(logger.series("fairprune/violation/g8")) == [3, 6]


def test_equalizer_names_groups_in_its_keys(tmp_path):
    dm = DigitsDataModule(batch_size=64, shuffle=False)
    model = EqualizedCNN(lr=0.05)
    logger = CaptureLogger()
    names = [f"digit {d}" for d in range(10)]
    eq = GroupEqualizer(dual_lr=0.1, group_names=names)
    _trainer(tmp_path, [eq], max_epochs=1, logger=logger, log_every_n_steps=1).fit(model, dm)
    assert sorted(logger.series("fairprune/lambda/digit_8")) == list(range(1, 9))
    assert logger.series("fairprune/lambda/g8") == {}
