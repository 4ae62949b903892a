"""A new criterion is one class and a `register` call: no edit of the callback.

Two toy criteria are defined here, registered, and run through `IterativePruning` in a real
`Trainer.fit`: a score criterion that asks the context for gradients (squared Taylor
scores), and a criterion with typed options that makes its masks itself. References: the
selection on hand-computed scores, and the options dataclass's own checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _models import DigitsDataModule, SmallCNN, quiet_trainer_kwargs

from lightning_fairprune import IterativePruning
from lightning_fairprune.pruning import (
    CRITERIA,
    Criterion,
    CriterionContext,
    ScoreCriterion,
    global_masks,
    register,
)
from lightning_fairprune.pruning.criteria import make_options

NAMES = ["features.2.weight", "fc.weight"]


class SquaredTaylor(ScoreCriterion):
    """(θ·g)²: asks for gradients, records what it got."""

    name = "test_squared_taylor"
    needs_gradients = True

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def scores(self, ctx: CriterionContext) -> dict[str, torch.Tensor]:
        grads = ctx.gradients()
        assert ctx.gradients() is grads  # supplied once, then cached
        weights = {n: p.detach().clone() for n, p in ctx.params.items()}
        self.seen.append({"grads": {n: g.clone() for n, g in grads.items()}, "w": weights})
        return {n: (weights[n] * grads[n]) ** 2 for n in ctx.params}


@dataclasses.dataclass(frozen=True)
class StrideOptions:
    stride: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.stride, int) or self.stride < 2:
            raise ValueError(f"Expected `stride` to be an int >= 2, but got {self.stride!r}")


class KeepStride:
    """Keeps every ``stride``-th weight (its own masks, typed options, no scores)."""

    name = "test_keep_stride"
    needs_gradients = False
    needs_weight_decay = False
    needs_group_statistics = False
    default_curvature = "none"
    curvatures = ("none",)
    supports_sharding = True
    structures = ("weight",)
    options_type = StrideOptions

    def make_options(self, options: Any) -> Any:
        return make_options(self.name, self.options_type, options)

    def check_options(self, options: Any, num_groups: int) -> None:
        return None

    def masks(self, ctx: CriterionContext) -> dict[str, torch.Tensor]:
        stride = ctx.options.stride
        out = {}
        for n, p in ctx.params.items():
            keep = torch.arange(p.numel()) % stride == 0
            out[n] = keep.view(p.shape)
        return out


@pytest.fixture(scope="module")
def registered() -> tuple[SquaredTaylor, KeepStride]:
    taylor, stride = SquaredTaylor(), KeepStride()
    assert isinstance(stride, Criterion)  # the protocol, no base class needed
    register(taylor, replace=True)
    register(stride, replace=True)
    yield taylor, stride
    CRITERIA.pop(taylor.name)
    CRITERIA.pop(stride.name)


class Before(pl.Callback):
    def on_before_pruning_round(self, trainer, pl_module, event):
        named = dict(pl_module.named_parameters())
        self.weights = {n: named[n].detach().clone() for n in event.parameter_names}


def _fit(tmp_path, callbacks) -> SmallCNN:
    pl.seed_everything(0)
    model = SmallCNN()
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=3, callbacks=callbacks, **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(model, datamodule=DigitsDataModule(n=200, batch_size=40))
    return model


def test_a_registered_score_criterion_runs_through_iterative_pruning(tmp_path, registered):
    taylor, _ = registered
    pruning = IterativePruning(0.6, criterion="test_squared_taylor", include_names=NAMES, start=1)
    before = Before()
    model = _fit(tmp_path, [pruning, before])
    assert len(taylor.seen) == 1
    seen = taylor.seen[0]
    for n in NAMES:  # the criterion saw the weights of the round and their gradients
        assert torch.equal(seen["w"][n], before.weights[n])
        assert seen["grads"][n].shape == seen["w"][n].shape
        assert bool(seen["grads"][n].abs().sum() > 0)
    scores = {n: (seen["w"][n] * seen["grads"][n]) ** 2 for n in NAMES}
    expected = global_masks(scores, 0.6)
    named = dict(model.named_parameters())
    for n in NAMES:
        assert torch.equal(pruning.masks[n], expected[n])
        assert bool((named[n][~expected[n]] == 0).all())
    assert pruning.history[0]["criterion"] == "test_squared_taylor"
    assert pruning.settings()["criterion"] == "test_squared_taylor"


def test_a_registered_mask_criterion_with_typed_options(tmp_path, registered):
    with pytest.raises(ValueError, match=r"options of 'test_keep_stride' among \['stride'\]"):
        IterativePruning(0.5, criterion="test_keep_stride", criterion_options={"strid": 3})
    with pytest.raises(ValueError, match="Expected `stride` to be an int >= 2, but got 1"):
        IterativePruning(0.5, criterion="test_keep_stride", criterion_options={"stride": 1})
    with pytest.raises(ValueError, match="only with a fairness-aware criterion"):
        IterativePruning(0.5, criterion="test_keep_stride", curvature="fisher")
    pruning = IterativePruning(
        0.5, criterion="test_keep_stride", criterion_options={"stride": 3}, include_names=NAMES
    )
    assert pruning.options == StrideOptions(3)
    model = _fit(tmp_path, [pruning])
    named = dict(model.named_parameters())
    for n in NAMES:
        keep = (torch.arange(named[n].numel()) % 3 == 0).view(named[n].shape)
        assert torch.equal(pruning.masks[n], keep)
        assert bool((named[n][~keep] == 0).all())


def test_register_refuses_what_is_not_a_criterion_and_name_clashes():
    with pytest.raises(TypeError, match="Criterion protocol"):
        register(object())  # type: ignore[arg-type]

    class Other(ScoreCriterion):
        name = "magnitude"

    with pytest.raises(ValueError, match="'magnitude' is registered already"):
        register(Other())
    with pytest.raises(ValueError, match=r"`criterion` to be one of \("):
        IterativePruning(0.5, criterion="not_registered")
