"""`GroupEqualizer`: the callback that drives a `GroupEqualizedLoss` during training.

A callback cannot replace the loss Lightning back-propagates, so the user's ``training_step``
calls the loss module (primal side) and this callback owns everything else: the dual-ascent
schedule, the warm-up, the "start once pruning has begun" switch, the all-reduce across
processes, logging and checkpointing of its counters.
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

from lightning_fairprune.callbacks.events import PruningEvent, pruning_has_started
from lightning_fairprune.checks import check_int, check_real
from lightning_fairprune.history import to_plain
from lightning_fairprune.logging import log_config, log_scalars
from lightning_fairprune.losses import GroupEqualizedLoss

__all__ = ["GroupEqualizer"]


class GroupEqualizer(Callback):
    """Projected dual ascent on the multipliers of a `GroupEqualizedLoss`.

    After every ``every_n_steps`` optimizer steps (micro-batches of gradient accumulation do
    not count), the callback

    1. sums the per-group loss sums and counts the loss module accumulated since the last dual
       step over all processes (``trainer.strategy.reduce(..., reduce_op="sum")``), so every
       rank computes the same violations and holds identical multipliers;
    2. if the constraint is active, applies ``λ_a ← max(0, λ_a + dual_lr · c_a)``
       (`GroupEqualizedLoss.dual_step`);
    3. once active, at the Trainer's logging cadence (``log_every_n_steps``), logs
       ``fairprune/lambda/<group>`` and ``fairprune/violation/<group>`` (absent groups are not
       logged), and resets the accumulators.

    The constraint becomes active once it is *eligible* (from the start of training, or with
    ``start_after_pruning=True`` from the first pruning round: the ``on_pruning_round`` event
    of `lightning_fairprune.callbacks.events`, or a `Pruner` with ``rounds_done > 0``) and
    ``warmup_steps`` further optimizer steps have passed. Until then the loss module returns its
    plain mean loss. Every pruning round also resets the accumulators (losses measured before
    the round describe another model).

    λ lives in the loss module's buffer, so it is saved and restored with the model weights.
    This callback's ``state_dict`` holds plain values (step counters, the active flag and the
    sums accumulated since the last dual step, summed over processes), so a run resumed with
    ``ckpt_path`` continues exactly like an uninterrupted one.

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

    Example:
        >>> equalizer = GroupEqualizer(dual_lr=0.05, every_n_steps=2, warmup_steps=10)
        >>> equalizer.state_dict()["active"]
        False
    """

    def __init__(
        self,
        dual_lr: float = 0.01,
        every_n_steps: int = 1,
        warmup_steps: int = 0,
        start_after_pruning: bool = False,
        loss: GroupEqualizedLoss | None = None,
        loss_attr: str | None = None,
        log: bool = True,
        group_names: Any = None,
    ) -> None:
        super().__init__()
        check_real(dual_lr, "dual_lr", low=0.0)
        check_int(every_n_steps, "every_n_steps", 1)
        check_int(warmup_steps, "warmup_steps", 0)
        if loss is not None and not isinstance(loss, GroupEqualizedLoss):
            raise TypeError(
                f"Expected `loss` to be a GroupEqualizedLoss, but got {type(loss).__name__}"
            )
        if loss is not None and loss_attr is not None:
            raise ValueError("Expected at most one of `loss` and `loss_attr`, but got both")
        if loss_attr is not None and (not isinstance(loss_attr, str) or not loss_attr):
            raise ValueError(f"Expected `loss_attr` to be a non-empty str, but got {loss_attr!r}")
        self.dual_lr = float(dual_lr)
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self.start_after_pruning = bool(start_after_pruning)
        self._log_enabled = bool(log)  # not `self.log`: Lightning overwrites it
        self.loss_attr = loss_attr
        self.group_names = group_names
        self._given_loss = loss
        self.loss: GroupEqualizedLoss | None = loss
        # plain-value state (checkpointed)
        self.active = False
        self.eligible_since: int | None = None  # global step at which the constraint got eligible
        self.steps_since_dual = 0
        self.num_dual_steps = 0
        self._last_global_step: int | None = None
        self._pending: tuple[list[float], list[float]] | None = None
        # most recent measurement, for users and tests
        self.last_violations: list[float | None] = []
        self.last_multipliers: list[float] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(loss_attr=self.loss_attr)

    # ------------------------------------------------------------------ resolution
    def find_loss(self, pl_module: pl.LightningModule) -> GroupEqualizedLoss:
        """Return the `GroupEqualizedLoss` this callback drives (see the class arguments)."""
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
            if not isinstance(found, GroupEqualizedLoss):
                raise TypeError(
                    f"Expected `{type(pl_module).__name__}.{self.loss_attr}` to be a "
                    f"GroupEqualizedLoss, but got {type(found).__name__}"
                )
            return found
        candidates = [
            (name, m) for name, m in pl_module.named_modules() if isinstance(m, GroupEqualizedLoss)
        ]
        if len(candidates) == 1:
            return candidates[0][1]
        if not candidates:
            raise ValueError(
                f"GroupEqualizer expected {type(pl_module).__name__} to own a GroupEqualizedLoss "
                "submodule (e.g. `self.criterion = GroupEqualizedLoss(num_groups)`, called in "
                "`training_step`), but found none; pass `loss=` or `loss_attr=`"
            )
        names = [name for name, _ in candidates]
        raise ValueError(
            f"GroupEqualizer expected exactly one GroupEqualizedLoss in "
            f"{type(pl_module).__name__}, but found {len(names)}: {names}; pass `loss_attr=` "
            "(one GroupEqualizer per loss)"
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.loss = self.find_loss(pl_module)
        if self._log_enabled and bool(getattr(trainer, "is_global_zero", True)):
            log_config(trainer, "equalizer", self.settings())

    def _require_loss(self) -> GroupEqualizedLoss:
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
        self.active = self.eligible_since is not None and (
            step - self.eligible_since >= self.warmup_steps
        )
        self._require_loss().active = self.active

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = self._require_loss()
        loss.reset_accumulators()
        if self._pending is not None:
            if trainer.global_rank == 0:
                loss.set_accumulated(*self._pending)
            self._pending = None
        self._last_global_step = int(trainer.global_step)
        self._update_activation(trainer)

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

    def on_pruning_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent
    ) -> None:
        """Listener hook: pruning has begun (eligibility) and the accumulated losses are stale."""
        if self.eligible_since is None:
            self.eligible_since = int(trainer.global_step)
        self._require_loss().reset_accumulators()
        self.steps_since_dual = 0
        self._update_activation(trainer)

    def _global_sums(self, trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = self._require_loss().accumulated
        g = sums.shape[0]
        stacked = torch.cat([sums, counts])
        if int(getattr(trainer, "world_size", 1)) > 1:
            stacked = trainer.strategy.reduce(stacked, reduce_op="sum")
        return stacked[:g], stacked[g:]

    def dual_update(self, trainer: pl.Trainer) -> torch.Tensor:
        """All-reduce the sums, apply the dual step if active, log; return the violations."""
        loss = self._require_loss()
        sums, counts = self._global_sums(trainer)
        if self.active:
            violations = loss.dual_step(self.dual_lr, sums, counts)
            self.num_dual_steps += 1
        else:
            violations = loss.violations(sums, counts)
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
            "loss": None if loss is None else type(loss).__name__,
            "constraint": getattr(loss, "constraint", None),
            "num_groups": getattr(loss, "num_groups", None),
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
        }

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
            sums, counts = self._global_sums(trainer)
            states[self.state_key]["pending_loss_sums"] = sums.tolist()
            states[self.state_key]["pending_counts"] = counts.tolist()

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
