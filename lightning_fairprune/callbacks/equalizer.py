"""`GroupEqualizer`: the callback that drives a group loss (a `GroupLoss`) during training.

A callback cannot replace the loss Lightning back-propagates, so the user's ``training_step``
calls the loss module (primal side) and this callback owns everything else: the dual-ascent
schedule, the warm-up, the "start once pruning has begun" switch, the all-reduce across
processes, the measurements on held-out data (a dense reference, held-out dual statistics),
logging and checkpointing. The maths is the loss's (`lightning_fairprune.losses`): this
callback never asks which strategy a loss has, only what the strategy declares.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_fairprune.callbacks.events import PruningEvent, find_pruner, pruning_has_started
from lightning_fairprune.checks import check_bool, check_int, check_real
from lightning_fairprune.fairness_data import FairnessData
from lightning_fairprune.history import to_plain
from lightning_fairprune.logging import log_config, log_scalars
from lightning_fairprune.losses import GroupLoss, Statistics, measure_statistics
from lightning_fairprune.measure import precision_context, rng_restored

__all__ = ["GroupEqualizer"]


class GroupEqualizer(Callback):
    """Dual steps on the multipliers of a group loss (`GroupEqualizedLoss` or another `GroupLoss`).

    After every ``every_n_steps`` optimizer steps (micro-batches of gradient accumulation do
    not count), the callback

    1. sums the per-group statistics over all processes
       (``trainer.strategy.reduce(..., reduce_op="sum")``), so every rank computes the same
       violations and holds identical multipliers: the loss sums and counts the loss module
       accumulated since the last dual step (and its strategy's history, e.g. the replay
       buffers of `ConstrainedGapLoss`), or, with ``heldout=True``, the statistics of the
       current model measured on ``data``;
    2. if the constraint is active, applies the loss's dual step with step size ``dual_lr``
       (`GroupLoss.dual_step`: ``λ_a ← max(0, λ_a + dual_lr · c_a)`` for `GroupEqualizedLoss`;
       what the loss's strategy declares for the others);
    3. once active, at the Trainer's logging cadence (``log_every_n_steps``), logs
       ``fairprune/lambda/<group>`` and ``fairprune/violation/<group>`` (absent groups are not
       logged), and resets the accumulators.

    The constraint becomes active once it is *eligible* (from the start of training, or with
    ``start_after_pruning=True`` from the first pruning round: the ``on_pruning_round`` event
    of `lightning_fairprune.callbacks.events`, or a `Pruner` with ``rounds_done > 0``) and
    ``warmup_steps`` further optimizer steps have passed. Until then the loss module returns its
    plain mean loss. Every pruning round also makes the loss forget its accumulators and
    history (they describe another model).

    A loss whose strategy needs a dense reference (`ConstrainedGapLoss`) is not applied before
    it has one: given explicitly, or measured on ``data`` in ``on_before_pruning_round`` of
    round 0 (the dense model; at fit start when the Trainer has no pruner). The reference is
    measured here, on the data the user names, rather than read from `FairnessMonitor`: it
    uses the loss's own per-sample loss (class weights, label smoothing) and groups, and it
    should come from the data the dual step reads (training data for the replay buffer, the
    held-out split with ``heldout=True``).

    Held-out multipliers (``heldout=True``): every dual step reads the per-group statistics of
    the current model on ``data`` (a `lightning_fairprune.FairnessData` of held-out
    ``(x, y, g)`` batches) instead of the training batches, so a minority the model has
    memorized still counts. The pass runs every ``every_n_steps`` optimizer steps once the
    constraint is active, isolated (`lightning_fairprune.measure.isolated`: modes, buffers and
    RNG states restored, training is unchanged) and all-reduced over processes.

    λ lives in the loss module's buffers, so it is saved and restored with the model weights.
    This callback's ``state_dict`` holds its counters, the active flag, the sums accumulated
    since the last dual step (summed over processes) and every process's loss history (the
    replay buffers), so a run resumed with ``ckpt_path`` continues exactly like an
    uninterrupted one (for the history: on as many processes).

    Args:
        dual_lr: dual step size η_λ >= 0 (default 0.01). Keep it small: with the absolute or
            one-sided constraint the multipliers only grow, and in benchmarks/README.md a step
            of 0.05 per optimizer step made a 97%-sparse LeNet collapse.
        every_n_steps: optimizer steps between dual steps (>= 1).
        warmup_steps: optimizer steps after eligibility before the constraint is applied.
        start_after_pruning: become eligible only once pruning has begun.
        loss: the loss module to drive (default: found among ``pl_module.modules()``).
        loss_attr: dotted attribute name of the loss module in the LightningModule.
        log: log the multipliers and violations through the Trainer's loggers (once the
            constraint is active, every ``log_every_n_steps`` optimizer steps of the Trainer),
            and the settings into every logger's hyperparameters.
        group_names: names of the groups for the logger keys (as for `FairnessMonitor`);
            default ``g0, g1, ...``.
        data: a `FairnessData` of ``(x, y, g)`` batches: where a dense reference is measured
            and, with ``heldout=True``, the dual statistics.
        heldout: dual steps read the statistics measured on ``data`` (adaptive losses only).

    Example:
        >>> equalizer = GroupEqualizer(dual_lr=0.05, every_n_steps=2, warmup_steps=10)
        >>> equalizer.state_dict()["active"]
        False
        >>> from lightning_fairprune import FairnessData
        >>> x, y, g = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
        >>> held_out = FairnessData([(x, y, g)], num_groups=2)  # e.g. a validation DataLoader
        >>> GroupEqualizer(data=held_out, heldout=True, every_n_steps=50).settings()["heldout"]
        True
    """

    def __init__(
        self,
        dual_lr: float = 0.01,
        every_n_steps: int = 1,
        warmup_steps: int = 0,
        start_after_pruning: bool = False,
        loss: GroupLoss | None = None,
        loss_attr: str | None = None,
        log: bool = True,
        group_names: Any = None,
        data: FairnessData | None = None,
        heldout: bool = False,
    ) -> None:
        super().__init__()
        check_real(dual_lr, "dual_lr", low=0.0)
        check_int(every_n_steps, "every_n_steps", 1)
        check_int(warmup_steps, "warmup_steps", 0)
        if loss is not None and not isinstance(loss, GroupLoss):
            raise TypeError(
                "Expected `loss` to be a GroupEqualizedLoss (or another GroupLoss), but got "
                f"{type(loss).__name__}"
            )
        if loss is not None and loss_attr is not None:
            raise ValueError("Expected at most one of `loss` and `loss_attr`, but got both")
        if loss_attr is not None and (not isinstance(loss_attr, str) or not loss_attr):
            raise ValueError(f"Expected `loss_attr` to be a non-empty str, but got {loss_attr!r}")
        if data is not None and not isinstance(data, FairnessData):
            raise TypeError(f"Expected `data` to be a FairnessData, but got {type(data).__name__}")
        if check_bool(heldout, "heldout") and data is None:
            raise ValueError(
                "Expected `data` (a FairnessData of held-out (x, y, g) batches) with "
                "heldout=True, but got None"
            )
        self.data = data
        self.heldout = heldout
        self.dual_lr = float(dual_lr)
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self.start_after_pruning = bool(start_after_pruning)
        self._log_enabled = bool(log)  # not `self.log`: Lightning overwrites it
        self.loss_attr = loss_attr
        self.group_names = group_names
        self._given_loss = loss
        self.loss: GroupLoss | None = loss
        # plain-value state (checkpointed)
        self.active = False
        self.eligible_since: int | None = None  # global step at which the constraint got eligible
        self.steps_since_dual = 0
        self.num_dual_steps = 0
        self._last_global_step: int | None = None
        self._pending: tuple[list[float], list[float]] | None = None
        self._pending_history: dict[str, torch.Tensor] | None = None
        # most recent measurement, for users and tests
        self.last_violations: list[float | None] = []
        self.last_multipliers: list[float] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(loss_attr=self.loss_attr)

    # ------------------------------------------------------------------ resolution
    def find_loss(self, pl_module: pl.LightningModule) -> GroupLoss:
        """Return the `GroupLoss` this callback drives (see the class arguments)."""
        if self._given_loss is not None:
            if not any(m is self._given_loss for m in pl_module.modules()):
                warnings.warn(
                    "The `loss` given to GroupEqualizer is not a submodule of "
                    f"{type(pl_module).__name__}: its multipliers will not be moved to the "
                    "device nor saved in checkpoints. Assign it as an attribute of the "
                    "LightningModule (e.g. `self.criterion = GroupEqualizedLoss(...)`).",
                    UserWarning,
                    stacklevel=2,
                )
            return self._given_loss
        if self.loss_attr is not None:
            try:
                found = operator.attrgetter(self.loss_attr)(pl_module)
            except AttributeError:
                raise ValueError(
                    f"Expected `loss_attr`={self.loss_attr!r} to name an attribute of "
                    f"{type(pl_module).__name__}, but it has none"
                ) from None
            if not isinstance(found, GroupLoss):
                raise TypeError(
                    f"Expected `{type(pl_module).__name__}.{self.loss_attr}` to be a "
                    f"GroupEqualizedLoss (or another GroupLoss), but got {type(found).__name__}"
                )
            return found
        candidates = [
            (name, m) for name, m in pl_module.named_modules() if isinstance(m, GroupLoss)
        ]
        if len(candidates) == 1:
            return candidates[0][1]
        if not candidates:
            raise ValueError(
                f"GroupEqualizer expected {type(pl_module).__name__} to own a GroupEqualizedLoss "
                "or another GroupLoss submodule (e.g. `self.criterion = "
                "GroupEqualizedLoss(num_groups)`, called in `training_step`), but found none; "
                "pass `loss=` or `loss_attr=`"
            )
        names = [name for name, _ in candidates]
        raise ValueError(
            f"GroupEqualizer expected exactly one GroupEqualizedLoss (or other GroupLoss) in "
            f"{type(pl_module).__name__}, but found {len(names)}: {names}; pass `loss_attr=` "
            "(one GroupEqualizer per loss)"
        )

    def __repr__(self) -> str:
        options = f"dual_lr={self.dual_lr}, every_n_steps={self.every_n_steps}"
        if self.loss_attr is not None:
            options += f", loss_attr={self.loss_attr!r}"
        elif self._given_loss is not None:
            options += f", loss={type(self._given_loss).__name__}(...)"
        return f"GroupEqualizer({options})"

    def _refuse_second_driver(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Two equalizers on one loss would each run the dual steps: refuse at fit start."""
        callbacks = list(getattr(trainer, "callbacks", None) or [])
        for other in callbacks:
            if other is self or not isinstance(other, GroupEqualizer):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    theirs = other.find_loss(pl_module)
                except (TypeError, ValueError):
                    continue
            if theirs is self.loss:
                names = [n for n, m in pl_module.named_modules() if m is theirs] or ["(external)"]
                raise ValueError(
                    "Expected one GroupEqualizer per loss, but "
                    f"trainer.callbacks[{callbacks.index(self)}] {self!r} and "
                    f"trainer.callbacks[{callbacks.index(other)}] {other!r} both drive "
                    f"`{names[0]}` ({type(theirs).__name__}): each would run its own dual steps, "
                    "twice the steps in all. Keep one, or give each its own loss (`loss_attr=`)."
                )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.loss = loss = self.find_loss(pl_module)
        self._refuse_second_driver(trainer, pl_module)
        if self.heldout and not loss.strategy.has_dual_step:
            raise ValueError(
                f"Expected a loss with a dual step for heldout=True, but {type(loss).__name__} "
                f"({loss.strategy!r}) has none"
            )
        if self.data is not None and self.data.num_groups not in (None, loss.num_groups):
            raise ValueError(
                f"Expected `data` with num_groups={loss.num_groups} (the loss's), but got "
                f"{self.data.num_groups}"
            )
        loss.driven = True
        if self._log_enabled and bool(getattr(trainer, "is_global_zero", True)):
            log_config(trainer, "equalizer", self.settings())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.loss is not None:
            self.loss.driven = False  # used alone afterwards, it keeps nothing that grows

    def _require_loss(self) -> GroupLoss:
        if self.loss is None:
            raise RuntimeError("GroupEqualizer has no loss module yet: `setup` has not run")
        return self.loss

    # ------------------------------------------------------------------ activation logic
    def pruning_has_started(self, trainer: pl.Trainer) -> bool:
        """Whether the trainer's pruner (the `Pruner` protocol) has run a scheduled round."""
        return pruning_has_started(trainer)

    def _update_activation(self, trainer: pl.Trainer) -> None:
        step = int(trainer.global_step)
        if self.eligible_since is None and (
            not self.start_after_pruning or self.pruning_has_started(trainer)
        ):
            self.eligible_since = step
        loss = self._require_loss()
        self.active = (
            self.eligible_since is not None
            and step - self.eligible_since >= self.warmup_steps
            and not loss.reference_missing
        )
        loss.active = self.active

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = self._require_loss()
        loss.forget()
        if self._pending is not None:
            if trainer.global_rank == 0:
                loss.set_accumulated(*self._pending)
            self._pending = None
        self._restore_history(trainer)
        if self.data is not None:  # bad keys or ids surface now, not at the first dual step
            batches = self.data.batches(trainer, pl_module, num_groups=loss.num_groups)
            with rng_restored([batches.loader]):
                batches.first()
        if loss.reference_missing:
            self._start_reference(trainer, pl_module)
        self._last_global_step = int(trainer.global_step)
        self._update_activation(trainer)

    def _start_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At fit start: refuse a reference that cannot come; measure it without a pruner."""
        name = type(self._require_loss()).__name__
        if self.data is None:
            raise ValueError(
                f"Expected `data` (a FairnessData to measure the dense reference of {name} on) "
                "or a reference set on the loss (`set_reference`), but got data=None"
            )
        pruner = find_pruner(trainer)
        if pruner is None:
            self.take_reference(trainer, pl_module)
        elif int(pruner.rounds_done) > 0:
            raise ValueError(
                f"Expected {name}'s dense reference before pruning, but the pruner has run "
                f"{int(pruner.rounds_done)} round(s) already: set it with `set_reference`"
            )

    def take_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the loss's reference on ``data`` now (isolated, all-reduced)."""
        self._require_loss().take_reference(self.measure(trainer, pl_module))

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Statistics:
        """The loss's `Statistics` of the current model on ``data``, summed over processes."""
        loss = self._require_loss()
        if self.data is None:
            raise RuntimeError("GroupEqualizer has no `data` to measure on")
        batches = self.data.batches(trainer, pl_module, num_groups=loss.num_groups)
        with precision_context(trainer):
            stats = measure_statistics(loss, pl_module, batches, loaders=[batches.loader])
        return self._reduce(trainer, stats)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = int(trainer.global_step)
        if self._last_global_step is None:
            self._last_global_step = step
        new_steps = step - self._last_global_step
        if new_steps <= 0:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self._last_global_step = step
        self.after_optimizer_steps(trainer, new_steps)

    def after_optimizer_steps(self, trainer: pl.Trainer, num_steps: int = 1) -> None:
        """Count ``num_steps`` optimizer steps; run the dual step when one is due."""
        self._update_activation(trainer)
        self.steps_since_dual += num_steps
        if self.steps_since_dual >= self.every_n_steps:
            self.steps_since_dual = 0
            self.dual_update(trainer)

    def on_before_pruning_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent
    ) -> None:
        """Listener hook: before round 0 the weights are the dense model's (the reference)."""
        if event.round_index == 0 and self._require_loss().reference_missing:
            self.take_reference(trainer, pl_module)

    def on_pruning_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent
    ) -> None:
        """Listener hook: pruning has begun (eligibility) and the loss's statistics are stale."""
        if self.eligible_since is None:
            self.eligible_since = int(trainer.global_step)
        self._require_loss().forget()
        self.steps_since_dual = 0
        self._update_activation(trainer)

    @staticmethod
    def _reduce(trainer: pl.Trainer, stats: Statistics) -> Statistics:
        """Sum `Statistics` over processes (one collective)."""
        if int(getattr(trainer, "world_size", 1)) <= 1:
            return stats
        keys = list(stats)
        total = trainer.strategy.reduce(torch.stack([stats[k] for k in keys]), reduce_op="sum")
        return dict(zip(keys, total.unbind(0), strict=True))

    def dual_update(self, trainer: pl.Trainer) -> torch.Tensor:
        """All-reduce the statistics, apply the dual step if active, log; return violations."""
        loss = self._require_loss()
        if self.active and self.heldout:
            stats = self.measure(trainer, trainer.lightning_module)
        else:
            stats = self._reduce(trainer, loss.statistics())
        if self.active:
            violations = loss.dual_step(self.dual_lr, statistics=stats)
            self.num_dual_steps += 1
        else:
            violations = loss.violations(statistics=stats)
            loss.reset_accumulators()
        lam = loss.multipliers.detach().double().cpu().tolist()
        viol = [None if math.isnan(v) else v for v in violations.cpu().tolist()]
        self.last_violations = viol
        self.last_multipliers = lam
        if self._log_enabled and self.active and self._log_due(trainer):
            keys = self._group_keys(len(lam))
            metrics: dict[str, float | None] = {}
            for key, value in zip(keys, lam, strict=True):
                metrics[f"fairprune/lambda/{key}"] = value
            for key, value in zip(keys, viol, strict=True):
                metrics[f"fairprune/violation/{key}"] = value
            log_scalars(trainer, metrics)
        return violations

    @staticmethod
    def _log_due(trainer: pl.Trainer) -> bool:
        """The Trainer's cadence: every ``log_every_n_steps`` optimizer steps."""
        every = int(getattr(trainer, "log_every_n_steps", 1) or 1)
        return int(trainer.global_step) % max(1, every) == 0

    def _group_keys(self, num_groups: int) -> list[str]:
        from lightning_fairprune.diagnostics.groups import group_slugs, normalize_group_names

        return group_slugs(normalize_group_names(self.group_names, num_groups))

    def settings(self) -> dict[str, Any]:
        """The constructor settings and the loss's form, as plain values.

        Example:
            >>> GroupEqualizer(dual_lr=0.05).settings()["dual_lr"]
            0.05
        """
        loss = self.loss
        return {
            "dual_lr": self.dual_lr,
            "every_n_steps": self.every_n_steps,
            "warmup_steps": self.warmup_steps,
            "start_after_pruning": self.start_after_pruning,
            "loss_attr": self.loss_attr,
            "group_names": to_plain(self.group_names),
            "heldout": self.heldout,
            "data": None if self.data is None else type(self.data).__name__,
            "loss": None if loss is None else type(loss).__name__,
            "num_groups": None if loss is None else loss.num_groups,
            **({} if loss is None else loss.strategy.settings()),
        }

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        sums, counts = (
            self.loss.accumulated if self.loss is not None else (torch.zeros(0), torch.zeros(0))
        )
        return {
            "active": self.active,
            "eligible_since": self.eligible_since,
            "steps_since_dual": self.steps_since_dual,
            "num_dual_steps": self.num_dual_steps,
            "pending_loss_sums": sums.tolist(),
            "pending_counts": counts.tolist(),
            "history": self._history(None),
        }

    def _history(self, trainer: pl.Trainer | None) -> dict[str, torch.Tensor] | None:
        """The loss's per-process history, stacked over processes (one row each), on the CPU."""
        local = {} if self.loss is None else self.loss.local_state()
        if not local:
            return None
        if trainer is None or int(getattr(trainer, "world_size", 1)) <= 1:
            return {k: v.detach().cpu().unsqueeze(0) for k, v in local.items()}
        device = trainer.strategy.root_device
        return {k: trainer.strategy.all_gather(v.to(device)).cpu() for k, v in local.items()}

    def _restore_history(self, trainer: pl.Trainer) -> None:
        history, self._pending_history = self._pending_history, None
        if history is None:
            return
        saved, world = next(iter(history.values())).shape[0], int(trainer.world_size)
        if saved != world:
            warnings.warn(
                f"GroupEqualizer: the loss history (replay buffers) was saved by {saved} "
                f"processes and is resumed on {world}: it starts empty.",
                UserWarning,
                stacklevel=2,
            )
            return
        rank = int(trainer.global_rank)
        self._require_loss().load_local_state({k: v[rank] for k, v in history.items()})

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # `state_dict` ran before this hook with this rank's local sums; under data parallelism
        # store the sums over all processes instead (this hook runs on every rank).
        states = checkpoint.get("callbacks")
        if self.loss is None or not isinstance(states, dict) or self.state_key not in states:
            return
        if int(getattr(trainer, "world_size", 1)) > 1:
            loss_sums, counts = self.loss.accumulated
            total = self._reduce(trainer, {"loss": loss_sums, "count": counts})
            states[self.state_key]["pending_loss_sums"] = total["loss"].tolist()
            states[self.state_key]["pending_counts"] = total["count"].tolist()
            states[self.state_key]["history"] = self._history(trainer)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.active = bool(state_dict["active"])
        since = state_dict["eligible_since"]
        self.eligible_since = None if since is None else int(since)
        self.steps_since_dual = int(state_dict["steps_since_dual"])
        self.num_dual_steps = int(state_dict["num_dual_steps"])
        sums = list(state_dict.get("pending_loss_sums", []))
        counts = list(state_dict.get("pending_counts", []))
        self._pending = (sums, counts) if sums else None
        self._pending_history = state_dict.get("history")
