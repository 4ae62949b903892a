"""What a pruning round reads from the Trainer: the run's length, and the inputs criteria ask for.

`IterativePruning` builds a `~lightning_fairprune.pruning.criteria.CriterionContext` whose
lazy suppliers come from here: the mean task-loss gradient of training batches
(`training_gradients`), the optimizers' weight decays, and per-group statistics of the
fairness data (`group_statistics_of`, dry-run on one batch at fit start by
`check_group_data`). `broadcast_masks` gives every data-parallel process rank 0's masks, and
`fit_plan` fits a `RoundPlan` to the Trainer's run. These are the Lightning-side adapters of
plain-torch cores (`lightning_fairprune.measure.task_gradients`, the statistics pass,
`FairnessData`); they keep no state.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_fairprune.diagnostics.statistics import GroupStatistics, group_statistics
from lightning_fairprune.distributed import is_sharded
from lightning_fairprune.fairness_data import FairnessData, agree
from lightning_fairprune.measure import (
    isolated,
    precision_context,
    prepare_batch,
    rng_restored,
    task_gradients,
)
from lightning_fairprune.plan import RoundPlan
from lightning_fairprune.pruning.criteria import Criterion, optimizer_weight_decays

__all__ = [
    "broadcast_masks",
    "check_automatic_optimization",
    "check_group_data",
    "first_training_input",
    "fit_plan",
    "group_statistics_of",
    "training_gradients",
    "weight_decays",
    "world_size",
]


def world_size(trainer: Any) -> int:
    """The Trainer's number of processes (1 without a trainer)."""
    return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1


def check_automatic_optimization(pl_module: Any, owner: str) -> None:
    """Refuse manual optimization for ``owner``, whose gradients come from ``training_step``."""
    if not getattr(pl_module, "automatic_optimization", True):
        raise ValueError(
            f"Expected automatic optimization with {owner} (its gradients come from "
            "`training_step`), but the module uses manual optimization; use "
            "criterion='magnitude' or 'random'"
        )


def fit_plan(plan: RoundPlan, trainer: Any) -> None:
    """`RoundPlan.fit_to_run` with the Trainer's limits and loader length."""
    try:
        estimated = float(trainer.estimated_stepping_batches)
    except Exception:  # no train dataloader to estimate from
        estimated = float("inf")
    plan.fit_to_run(
        max_epochs=trainer.max_epochs,
        max_steps=trainer.max_steps,
        estimated_steps=estimated,
        batches_per_epoch=trainer.num_training_batches,
        accumulate=trainer.accumulate_grad_batches,
    )


def broadcast_masks(
    trainer: Any, masks: dict[str, Tensor], params: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Rank 0's masks on every process (identical masks whatever the local data).

    Sharded (FSDP2) parameters keep their masks: every process selected its own shard of the
    same global masks.
    """
    if world_size(trainer) <= 1 or is_sharded(params):
        return masks
    cpu_masks = {k: v.detach().cpu() for k, v in masks.items()}
    cpu_masks = trainer.strategy.broadcast(cpu_masks, src=0)
    return {k: v.to(params[k].device) for k, v in cpu_masks.items()}


def training_gradients(
    trainer: Any,
    pl_module: nn.Module,
    params: Mapping[str, Tensor],
    num_batches: int,
    owner: str,
) -> dict[str, Tensor]:
    """Mean task-loss gradient of ``params`` over ``num_batches`` training batches.

    ``training_step`` runs in the modes the modules train in, on batches converted as in
    training (precision plugin, device), inside `lightning_fairprune.measure.isolated`
    (modes, buffers, ``.grad``, ``requires_grad`` and RNG states restored). Data-parallel
    gradients are averaged over the processes (sharded ones: FSDP's backward did).

    Raises:
        RuntimeError: without a training dataloader (and the errors of `task_gradients`).
    """
    loader = getattr(trainer, "train_dataloader", None)
    if trainer is None or loader is None:
        raise RuntimeError(
            f"{owner} needs `trainer.train_dataloader`, which is not available; prune from a "
            "training hook (the default schedule does) or use a criterion without gradients"
        )
    iterable: Any = loader
    loaders: list[Any] = [loader]
    if isinstance(loader, (Mapping, list, tuple)):
        from lightning.pytorch.utilities.combined_loader import CombinedLoader

        combined = CombinedLoader(loader, "max_size_cycle")
        iterable, loaders = (item[0] for item in combined), list(combined.flattened)
    strategy = trainer.strategy
    no_sync = getattr(getattr(strategy, "model", None), "no_sync", None)
    grads = task_gradients(
        pl_module,
        iterable,
        params,
        step_fn=pl_module.training_step,  # type: ignore[arg-type]
        num_batches=num_batches,
        prepare=lambda batch: prepare_batch(batch, trainer, transfer_hooks=True),
        context=lambda: precision_context(trainer, autocast=True),
        scaler=getattr(getattr(strategy, "precision_plugin", None), "scaler", None),
        loaders=loaders,
        no_sync=no_sync if callable(no_sync) else None,
        owner=owner,
    )
    if world_size(trainer) > 1 and not is_sharded(params):
        grads = {k: strategy.reduce(v, reduce_op="mean") for k, v in grads.items()}
    return grads


def weight_decays(
    trainer: Any, params: Mapping[str, Tensor], given: float | None, criterion: str
) -> dict[str, float]:
    """ε per parameter: ``given``, else the optimizer param group's ``weight_decay``.

    Warns when every ε is 0 (the undecayed criterion then equals the gradient criterion).
    """
    if given is not None:
        return dict.fromkeys(params, given)
    decays = optimizer_weight_decays(getattr(trainer, "optimizers", None) or [], params)
    if not any(decays.values()):
        warnings.warn(
            f"IterativePruning: criterion={criterion!r} found no weight decay in the "
            "optimizers and `weight_decay` was not given; with ε = 0 the undecayed criterion "
            "equals the gradient criterion abs(θ·g). Pass `weight_decay=` to set ε.",
            UserWarning,
            stacklevel=2,
        )
    return decays


def first_training_input(trainer: Any, required: bool = True) -> Any:
    """The inputs of the first sample of the first training batch (``None`` without loader).

    The batch is drawn with every RNG state restored (`rng_restored`), so training sees the
    same batches; it is converted as training batches are (`prepare_batch`).

    Raises:
        ValueError: if ``required`` and the batch is neither a tensor nor an
            ``(inputs, targets, ...)`` sequence (else ``None``).
    """
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None or isinstance(loader, (Mapping, list, tuple)):
        return None
    with rng_restored(loaders=[loader]):
        batch = next(iter(loader))
    batch = prepare_batch(batch, trainer)
    inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(inputs, Tensor):
        if not required:
            return None
        raise ValueError(
            "Expected the training batches to be tensors or (inputs, targets, ...) sequences of "
            "tensors to take an example input from, but got "
            f"{type(inputs).__name__}; pass `example_input`"
        )
    return inputs[:1]


def _data(trainer: Any, data: FairnessData | None, owner: str) -> FairnessData:
    """``data``, else the whole training dataloader with groups = classes."""
    if data is not None:
        return data
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None or isinstance(loader, (Mapping, list, tuple)):
        raise ValueError(
            f"Expected `group_data` for {owner}, or one training dataloader to derive it from "
            f"(groups = classes), but got {'none' if loader is None else type(loader).__name__}"
            ": pass `group_data=FairnessData(loader, num_groups=...)`"
        )
    return FairnessData(loader)


def group_statistics_of(
    trainer: Any,
    pl_module: nn.Module,
    params: Mapping[str, Tensor],
    data: FairnessData | None,
    *,
    curvature: str,
    seed: int,
    owner: str,
    dry_run: bool = False,
) -> GroupStatistics:
    """Per-group statistics of ``params`` on the group data (``dry_run``: one batch, local).

    Sums over samples, all-reduced across processes (so every process computes the same
    masks), measured in eval mode inside `lightning_fairprune.measure.isolated`.
    """
    data = _data(trainer, data, owner)
    reduce_fn = None
    if world_size(trainer) > 1 and not dry_run:
        strategy = trainer.strategy

        def reduce_fn(t: Tensor) -> Tensor:
            return strategy.reduce(t, reduce_op="sum")

    loaders = [data.dataloader] if data.dataloader is not None else []
    with isolated(pl_module, mode="eval", loaders=loaders):
        batches: Any = data.batches(trainer, pl_module)
        num_groups = data.num_groups
        if num_groups is None or dry_run:  # the classes: from the logits of one batch
            num_groups = data.resolve_groups(pl_module, batches, owner).num_groups
        return group_statistics(
            pl_module,
            [batches.first()] if dry_run else batches,
            num_groups,
            params=dict(params),
            curvature=curvature,
            seed=seed,
            reduce_fn=reduce_fn,
        )


def check_group_data(
    trainer: Any,
    pl_module: nn.Module,
    params: Mapping[str, Tensor],
    data: FairnessData | None,
    criterion: Criterion,
    options: Any,
    curvature: str,
) -> None:
    """Before the first step, find what would fail at the first round of ``criterion``.

    Runs the statistics pass on one batch (model outputs, number of groups), checks the
    criterion's options against the number of groups, then scans the whole ``data``
    (`FairnessData.scan`: ids, non-finite inputs, empty groups); isolated from training,
    every process reaching the same verdict.
    """
    owner = "IterativePruning's `group_data`"
    name = f"criterion={criterion.name!r}"
    error: ValueError | None = None
    num_groups = 0
    try:
        stats = group_statistics_of(
            trainer,
            pl_module,
            params,
            data,
            curvature=curvature,
            seed=0,
            owner=name,
            dry_run=True,
        )
        num_groups = stats.num_groups
        criterion.check_options(options, num_groups)
    except ValueError as err:
        error = err
        if data is None:
            error = ValueError(
                f"IterativePruning({name}) derives its group data from the training "
                f"dataloader (groups = classes): {err}. Pass `group_data=FairnessData(loader, "
                "num_groups=...)` for batches with a protected attribute."
            )
    agree(trainer, pl_module, error, owner)  # one process's bad batch: raise on all
    if data is not None:
        data.scan(trainer, pl_module, num_groups=num_groups, owner=owner)
        data.reset()
