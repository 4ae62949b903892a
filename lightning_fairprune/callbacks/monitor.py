"""`FairnessMonitor`: who lost accuracy, and why, around every pruning round.

The monitor reacts to the pruning-round protocol of `IterativePruning`
(`lightning_fairprune.callbacks.events`) and measures, on a fairness dataloader, per-group
recall and accuracy, the recall-distortion quantities of [GOOD] (B, B̃, I, α against the dense
reference) and the disparate-impact factors of [TRAN] (per-group loss and excessive loss,
gradient norm, Hutchinson Hessian trace, and the second-order *predicted* excessive loss of the
round's pruning step). What a measurement is lives in the plain-torch cores
(`lightning_fairprune.monitoring`, `lightning_fairprune.records`); this module decides *when*
to measure and keeps the history.

Moments (the ``"moment"`` field of every record):

* ``"dense"``: in ``on_before_pruning_round`` of round 0, the dense model θ*; the reference of
  every relative quantity.
* ``"after_round"``: in ``on_pruning_round``, the immediate damage of the round (pruned θ̄,
  before any fine-tuning). Carries ``predicted_excess_loss`` = g_aᵀδ + ½δᵀH_aδ for the round's
  step δ = θ̄ − θ_pre, with g_a and H_a taken at the pre-round weights θ_pre.
* ``"before_round"``: in ``on_before_pruning_round`` of rounds ≥ 1, after the fine-tuning that
  followed the previous round (what the papers report).
* ``"periodic"``: every ``every_n_epochs`` training epochs, or at every validation end when
  another callback monitors one of the monitor's keys (``every_n_epochs="auto"``).
* ``"end"``: in ``on_train_end``.

The same weights are never measured twice: a moment that comes at the same global step as the
previous measurement, with no pruning round in between (the end-of-epoch ``"periodic"`` and the
next epoch's ``"dense"``/``"before_round"``, or ``"end"``), is recorded from that measurement
(`lightning_fairprune.records.restamp`) and logged once per key and step.

``excess_loss`` is R(a) against the *dense* reference; the realized loss change of one round
(comparable to ``predicted_excess_loss``) is the ``loss`` of its ``after_round`` record minus the
``loss`` of the ``dense``/``before_round`` record of the same round, both in the history.
Measurements are isolated (`lightning_fairprune.measure.isolated`): training is bit-for-bit
unaffected.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

import lightning_fairprune.logging as fp_logging
from lightning_fairprune.callbacks.events import PruningEvent, find_pruner, schedule_complete
from lightning_fairprune.checks import check_bool, check_choice, check_instance, check_int
from lightning_fairprune.diagnostics.sharded_pass import GATE_MEMORY
from lightning_fairprune.distributed import local_tensor
from lightning_fairprune.fairness_data import FairnessBatches, FairnessData, GroupSpec
from lightning_fairprune.history import (
    HistoryFile,
    check_distinct_prefixes,
    history_filename,
    metric_prefix,
    to_plain,
)
from lightning_fairprune.measure import isolated, precision_context
from lightning_fairprune.monitoring import (
    MeasureOptions,
    default_weight_names,
    sum_across_processes,
)
from lightning_fairprune.progress import progress_enabled
from lightning_fairprune.records import (
    MOMENTS,
    PARITY_NOTE,
    PREFIXED_MOMENTS,
    Record,
    RecordContext,
    callback_scalars,
    dense_reference,
    restamp,
)

__all__ = ["FairnessMonitor"]


class FairnessMonitor(Callback):
    """Measure per-group fairness and its factors around every pruning round.

    Attach it to a `Trainer` together with `IterativePruning` (any callback that follows the
    pruning-round protocol works). See the module docstring for the moments, and the README's
    `FairnessMonitor` section for the fields of each record in `history`.

    The fairness data is `data` (a `FairnessData`: the given ``dataloader``, else the
    trainer's validation dataloader; batches ``(x, y)`` mean groups = classes, ``(x, y, g)``
    carry a protected attribute). At fit start, before any training, the monitor checks every
    batch and resolves `groups` (a `GroupSpec`). What it measures is `options` (a
    `MeasureOptions`): per group the accuracy and, for binary tasks, TPR, FPR and selection
    rate with Wilson intervals, the fairness summaries as fairlearn defines them, the papers'
    recall-distortion and disparate-impact quantities, and ``metrics=``. The scalars of the
    latest measurement are in ``trainer.callback_metrics`` (`records.callback_scalars`: for
    ``ModelCheckpoint`` and ``EarlyStopping``; ``fairprune-<name>/`` for a named monitor).

    Args:
        dataloader: fairness dataloader; ``None`` uses the validation dataloader.
        num_groups: number of groups G (one size per attribute for intersectional groups);
            default: the number of classes when the groups are the classes.
        max_batches: at most this many batches per measurement (per process); ``None``: all.
        group_fn: ``fn(batch) -> (inputs, targets, groups)``; overrides the batch parsing.
        input_key: key of the inputs in a dict batch.
        target_key: key of the class targets in a dict batch.
        group_key: key(s) of the group ids in a dict batch; ``None``: groups = classes.
        group_names: names of the groups (logger keys, tables, plots; `FairnessData`).
        pos_label: positive class of a binary task; ``None`` treats two classes as multiclass.
        confidence: level of the Wilson intervals of every rate.
        min_group_size: smaller groups (default 30: one sample moves a rate by 3.3 points)
            are flagged in ``small_groups`` and warned about once.
        metrics: torchmetrics metrics computed per group, ``{name: Metric}``: a clone per group
            updated with that group's samples only; one more forward pass per measurement, and
            one at fit start, where a metric that raises on a group's samples is an error.
        metrics_input: what the ``metrics`` get with the targets: ``"preds"`` (class ids) or
            ``"probs"`` (probabilities; of the positive class for two classes and a
            ``pos_label``, as binary AUROC expects).
        params: parameters of the gradient norms, Hessian traces and predicted excessive loss:
            ``None`` (the pruner's, else the Conv/Linear weights), ``"all"``, or fnmatch
            patterns on the parameter FQNs.
        num_probes: Rademacher probes of the Hutchinson Hessian trace; ``0`` disables it.
        lambda_max_iterations: power iterations for each group's top Hessian eigenvalue
            (``hessian_lambda_max``; one more pass each); ``0`` (default) disables it.
        gradient_norms: measure the per-group gradient norms.
        predict_excess_loss: compute the predicted excessive loss at every ``after_round``.
        seed: seed of the Hutchinson probes (the same probes at every measurement).
        every_n_epochs: also measure (moment ``"periodic"``) at the end of every n-th training
            epoch (right after its validation); ``None``: never; ``"auto"`` (default): at the
            end of every validation when a callback (``ModelCheckpoint``, ``EarlyStopping``) or
            an LR scheduler monitors one of this monitor's keys (said at fit start), else never.
            With a monitored key, the first validation end always has a measurement.
        measure_end: measure at the end of training (moment ``"end"``).
        history_path: JSON-lines file of the history; default: in the run's own directory
            (`lightning_fairprune.logging.run_directory`; a resumed run continues its
            checkpoint's file). Written by global rank 0 only.
        loss_fn: per-sample loss ``fn(logits, targets) -> Tensor[N]``; default cross-entropy.
        forward_fn: ``fn(model, inputs) -> logits``; default ``model(inputs)``.
        log: send the scalars of each record to the trainer's loggers; on global rank 0 also
            `settings` to the run config in ``setup`` and the final numbers to the W&B summary.
        name: distinguishes several monitors in one trainer (state key, metric keys
            ``fairprune-<name>/...``, history file ``fairprune_history-<name>.jsonl``, the
            records' ``"monitor"``); two monitors of one trainer need distinct names.
        gate_memory: FSDP2-sharded models only: bytes the frozen activation gates of the
            finite-difference curvature may take (default 1 GiB); above it they are recomputed
            per chunk (the same numbers); ``None``: no limit.

    Example:
        >>> monitor = FairnessMonitor(num_probes=0, max_batches=2)
        >>> monitor.history
        []
        >>> FairnessMonitor(num_probes=-1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `num_probes` to be an int >= 0, but got -1
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | None = None,
        *,
        num_groups: int | Sequence[int] | None = None,
        max_batches: int | None = None,
        group_fn: Callable[[Any], tuple[Any, Tensor, Tensor]] | None = None,
        input_key: str = "x",
        target_key: str = "y",
        group_key: str | Sequence[str] | None = "group",
        group_names: Sequence[str] | Mapping[Any, Any] | None = None,
        pos_label: int | None = 1,
        confidence: float = 0.95,
        min_group_size: int = 30,
        metrics: Mapping[str, Any] | None = None,
        metrics_input: str = "preds",
        params: str | Sequence[str] | None = None,
        num_probes: int = 8,
        lambda_max_iterations: int = 0,
        gradient_norms: bool = True,
        predict_excess_loss: bool = True,
        seed: int = 0,
        every_n_epochs: int | str | None = "auto",
        measure_end: bool = True,
        history_path: str | os.PathLike[str] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        log: bool = True,
        name: str | None = None,
        gate_memory: int | None = GATE_MEMORY,
    ) -> None:
        super().__init__()
        self.data = FairnessData(  # validates the data arguments and the group names
            dataloader,
            num_groups=num_groups,
            max_batches=max_batches,
            group_fn=group_fn,
            input_key=input_key,
            target_key=target_key,
            group_key=group_key,
            group_names=group_names,
        )
        self.options = MeasureOptions(  # what a measurement measures, validated
            params=params,
            num_probes=num_probes,
            lambda_max_iterations=lambda_max_iterations,
            gradient_norms=gradient_norms,
            predict_excess_loss=predict_excess_loss,
            seed=seed,
            loss_fn=loss_fn,
            forward_fn=forward_fn,
            gate_memory=gate_memory,
            pos_label=pos_label,
            confidence=confidence,
            min_group_size=min_group_size,
            metrics=metrics,
            metrics_input=metrics_input,
        )
        self._init_output(every_n_epochs, measure_end, history_path, log, name)
        self._init_state()

    def _init_output(
        self,
        every_n_epochs: int | str | None,
        measure_end: bool,
        history_path: str | os.PathLike[str] | None,
        log: bool,
        name: str | None,
    ) -> None:
        if every_n_epochs != "auto":
            check_int(every_n_epochs, "every_n_epochs", 1, allow_none=True)
        self.every_n_epochs = every_n_epochs
        self.measure_end = check_bool(measure_end, "measure_end")
        self.history_path = None if history_path is None else Path(history_path)
        # Lightning replaces `callback.log` with the module's `log` method at fit start
        # (`_attach_model_logging_functions`): the flag lives in `_log_enabled`
        self.log = self._log_enabled = check_bool(log, "log")
        self.name = check_instance(name, "name", str, "a str or None")

    def _init_state(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.groups: GroupSpec | None = None
        self.param_names: list[str] | None = None
        self._dense: dict[str, Any] | None = None
        self._pre_round: dict[str, Tensor] | None = None
        self._file: HistoryFile | None = None
        self._warned_small = False
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Forget what belongs to one fit (the measurement cache, what was logged, said...)."""
        self._cache: tuple[tuple[int, ...], Record] | None = None
        self._rounds_heard = 0  # pruning rounds announced: the weights changed
        self._last_event: PruningEvent | None = None  # the latest round (the model's cost)
        self._logged: tuple[int, set[str]] = (-1, set())
        self._monitored: list[str] = []  # this monitor's keys that others read
        self._at_validation = False
        self._published = False
        self._said_parity = False
        self._fitting = False
        self._periodic_epoch: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def history_file(self) -> Path | None:
        """Where the history is written (known from ``setup`` on)."""
        return None if self._file is None else self._file.path

    @property
    def dense_reference(self) -> dict[str, Any] | None:
        """The dense reference (plain values: recall, norm_balance, loss, accuracy), or None."""
        return None if self._dense is None else dict(self._dense)

    @override
    def state_dict(self) -> dict[str, Any]:
        groups = self.groups
        return {
            "history": to_plain(self.history),
            "dense": to_plain(self._dense),
            "num_classes": None if groups is None else groups.num_classes,
            "num_groups": self.data.num_groups if groups is None else groups.num_groups,
            "param_names": None if self.param_names is None else list(self.param_names),
            "history_file": None if self._file is None else str(self._file.path),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or "history" not in state_dict:
            raise ValueError(
                "Expected a FairnessMonitor state dict with a 'history' entry, but got "
                f"{type(state_dict).__name__} with keys "
                f"{sorted(state_dict) if isinstance(state_dict, Mapping) else None}"
            )
        given, saved = self.data.num_groups, state_dict.get("num_groups")
        if given is not None and saved not in (None, given):
            raise ValueError(
                f"Expected the checkpoint's FairnessMonitor `num_groups` to equal {given}, but "
                f"got {saved}"
            )
        self.history = [dict(r) for r in state_dict["history"]]
        dense = state_dict.get("dense")
        self._dense = None if dense is None else dict(dense)
        count = saved if saved is not None else given
        classes = state_dict.get("num_classes")
        names = None if count is None else tuple(self.data.names_for(count))
        self.groups = None if count is None else GroupSpec(count, classes, names)
        params = state_dict.get("param_names")
        self.param_names = None if params is None else list(params)
        if self._file is not None:
            self._file.synced = False
            self._file.continue_file(state_dict.get("history_file"))  # the same run goes on

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_distinct_prefixes(
            [cb.name for cb in getattr(trainer, "callbacks", []) if isinstance(cb, FairnessMonitor)]
        )
        if self.history_path is not None:
            self._file = HistoryFile(self.history_path)
        else:  # resolved on every process (it broadcasts)
            run_dir, own = fp_logging.run_directory(trainer)
            self._file = HistoryFile(run_dir / history_filename(self.name), own=own)
        self.data.reset()
        self._warned_small = False
        self._reset_fit_state()
        if self._log_enabled and fp_logging.is_global_zero(trainer):
            section = "monitor" if self.name is None else f"monitor-{self.name}"
            fp_logging.log_config(trainer, section, self.settings())

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_data(trainer, pl_module)
        self.check_metrics(trainer, pl_module)
        self._fitting = True
        self._monitored = fp_logging.measure_at_validation(
            trainer, metric_prefix(self.name), self.every_n_epochs
        )
        self._at_validation = self.every_n_epochs == "auto" and bool(self._monitored)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fitting, self._cache = False, None

    def check_metrics(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> None:
        """Run the ``metrics=`` once over the fairness data, before any training.

        Raises:
            ValueError: naming the metric and the group whose samples it raised on.
        """
        if not self.options.metrics:
            return
        with isolated(pl_module, mode="eval"), precision_context(trainer):
            batches = self._batches(trainer, pl_module)  # type: ignore[arg-type]
            groups = self._groups(pl_module, batches)
            self.options.user_metrics(pl_module, batches, groups, sum_across_processes(trainer))
        self.data.reset()

    def check_data(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> None:
        """Validate the whole fairness data before any training and resolve `groups`.

        See `FairnessData.check`.

        Raises:
            ValueError: naming what is wrong, on every process.
        """
        count = None if self.groups is None else self.groups.num_groups
        forward_fn = self.options.forward_fn
        self.groups = self.data.check(
            trainer, pl_module, "FairnessMonitor", forward_fn=forward_fn, num_groups=count
        )

    def settings(self) -> dict[str, Any]:
        """The constructor settings as plain JSON values (callables by qualified name).

        Example:
            >>> s = FairnessMonitor(num_probes=2, params=["fc.*"]).settings()
            >>> s["num_probes"], s["params"], s["dataloader"], s["loss_fn"]
            (2, ['fc.*'], None, None)
        """
        return {
            **self.data.settings(),
            **self.options.settings(),
            "every_n_epochs": self.every_n_epochs,
            "measure_end": self.measure_end,
            "history_path": None if self.history_path is None else str(self.history_path),
            "log": self._log_enabled,
            "name": self.name,
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        periodic = isinstance(self.every_n_epochs, int) or self._at_validation
        if find_pruner(trainer) is None and not periodic and not self.history:
            warnings.warn(
                "FairnessMonitor found no pruning callback (IterativePruning) in "
                "`trainer.callbacks`: it will only measure at the end of training, with no "
                "dense reference. Add IterativePruning, or set `every_n_epochs`.",
                UserWarning,
                stacklevel=2,
            )

    def on_before_pruning_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent
    ) -> None:
        """Measure the dense reference (round 0) or the fine-tuned model (later rounds)."""
        moment = "dense" if event.round_index == 0 else "before_round"
        if moment == "before_round" and self._dense is None:
            warnings.warn(
                f"FairnessMonitor has no dense reference at pruning round {event.round_index}; "
                "the quantities relative to it are recorded as None.",
                UserWarning,
                stacklevel=2,
            )
        self.measure(trainer, pl_module, moment, event)
        self._snapshot(pl_module)

    def on_pruning_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent
    ) -> None:
        """Measure the immediate damage of the round, with its predicted excessive loss."""
        self._rounds_heard += 1  # new weights: nothing measured before is reused
        self._last_event = event
        try:
            self.measure(trainer, pl_module, "after_round", event)
        finally:
            self._pre_round = None

    def _periodic_due(self, trainer: pl.Trainer) -> bool:
        epoch, every = trainer.current_epoch, self.every_n_epochs
        return isinstance(every, int) and (epoch + 1) % every == 0 and self._periodic_epoch != epoch

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # measure before ModelCheckpoint/EarlyStopping act on this validation (at its end, or
        # at `on_train_epoch_end`, where they run after the other callbacks)
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # (the stage is "validate" here: `trainer.training` is False)
        progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
        ends_epoch = bool(getattr(progress, "is_last_batch", True))  # not `val_check_interval`'s
        due = ends_epoch and self._periodic_due(trainer)
        # with a key others read: every validation ("auto"), or at least the first one
        if due or self._at_validation or (self._monitored and not self._published):
            if ends_epoch:
                self._periodic_epoch = trainer.current_epoch
            self.measure(trainer, pl_module, "periodic")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # no validation at all: ModelCheckpoint/EarlyStopping read here
        unvalidated = self._at_validation and not sum(trainer.num_val_batches or [0])
        if self._periodic_due(trainer) or (
            unvalidated and self._periodic_epoch != trainer.current_epoch
        ):
            self._periodic_epoch = trainer.current_epoch
            self.measure(trainer, pl_module, "periodic")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_end:
            self.measure(trainer, pl_module, "end")
        if self._log_enabled and fp_logging.is_global_zero(trainer):
            fp_logging.log_summary(trainer, self.history)

    def measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        moment: str,
        event: PruningEvent | None = None,
    ) -> dict[str, Any]:
        """Take one measurement now, append it to `history`, write and log it.

        Safe to call from any training-side hook (it enables gradients and leaves inference
        mode itself); under DDP every process must call it at the same point.

        Args:
            trainer: the running trainer.
            pl_module: the module being trained.
            moment: one of `lightning_fairprune.records.MOMENTS`.
            event: the pruning event of the round, for the pruning moments.

        Returns:
            The new history record (`lightning_fairprune.records.Record.to_dict`).

        Example:
            >>> _ = torch.manual_seed(0)
            >>> x, y = torch.randn(12, 4), torch.tensor([0, 1, 2] * 4)
            >>> monitor = FairnessMonitor([(x, y)], num_probes=2, log=False)
            >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False)
            >>> record = monitor.measure(trainer, nn.Linear(4, 3), "dense")
            >>> record["moment"], record["support"], record["alpha"]
            ('dense', [4, 4, 4], 1.0)
            >>> len(record["hessian_trace"]), record["excess_loss"]
            (3, [0.0, 0.0, 0.0])
        """
        check_choice(moment, "moment", MOMENTS)
        key = self._weights_key(trainer, pl_module)
        if key is not None and self._cache is not None and self._cache[0] == key:
            # the same weights at the same step: not measured again
            record = restamp(self._cache[1], self._context(trainer, pl_module, moment, event))
        else:
            with isolated(pl_module, mode="eval"), precision_context(trainer):
                record = self._measure(trainer, pl_module, moment, event)
        self._cache = None if key is None else (key, record)
        values = record.to_dict()
        self.history.append(values)
        if moment == "dense":
            self._dense = dense_reference(record)
        self._write(trainer)
        note = self.options.small_groups_note(values)
        if note is not None and not self._warned_small:
            self._warned_small = True
            warnings.warn(note, UserWarning, stacklevel=2)
        if values["groups_are_classes"] and values["fairness"] and not self._said_parity:
            self._said_parity = True
            rank_zero_info(PARITY_NOTE)
        self._publish(trainer, values)
        if self._log_enabled:
            self._log(trainer, values)
        return values

    def _weights_key(self, trainer: pl.Trainer, model: nn.Module) -> tuple[int, ...] | None:
        """What identifies the measured weights within a fit (``None`` outside a fit)."""
        if not self._fitting:
            return None
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        batches = getattr(getattr(getattr(loop, "batch_progress", None), "total", None), "ready", 0)
        return (id(model), int(trainer.global_step), int(batches), self._rounds_heard)

    def _publish(self, trainer: pl.Trainer, record: Mapping[str, Any]) -> None:
        """Put the record's `records.callback_scalars` into ``trainer.callback_metrics``.

        ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` read them there (NaN where the
        latest measured model has no value; ``fairprune/at_target/...`` NaN before the target).
        """
        metrics = getattr(trainer, "callback_metrics", None)
        if not isinstance(metrics, dict):
            return
        at_target = schedule_complete(trainer)
        for key, value in callback_scalars(record, at_target=at_target).items():
            metrics[key] = torch.tensor(value, dtype=torch.float32)
        self._published = True

    def _groups(self, model: nn.Module, batches: FairnessBatches) -> GroupSpec:
        """The groups: resolved at fit start, else now (no forward when G is known)."""
        if self.groups is not None:
            return self.groups
        return self.data.resolve_groups(
            model, batches, "FairnessMonitor", forward_fn=self.options.forward_fn, classes=False
        )

    def _measure(
        self,
        trainer: pl.Trainer,
        model: pl.LightningModule,
        moment: str,
        event: PruningEvent | None,
    ) -> Record:
        batches = self._batches(trainer, model)
        record, self.groups = self.options.measure(
            model,
            batches,
            self._groups(model, batches),
            self._context(trainer, model, moment, event),
            params=self._parameter_names(trainer, model),
            pre=self._pre_round if moment == "after_round" else None,
            reduce_fn=sum_across_processes(trainer),
            progress=progress_enabled(trainer),
        )
        return record

    def _context(
        self, trainer: pl.Trainer, model: nn.Module, moment: str, event: PruningEvent | None
    ) -> RecordContext:
        """Where a measurement belongs (moment, round, step, sparsity, dense reference)."""
        return RecordContext(
            moment=moment,
            round_index=self._round(trainer, moment, event),
            epoch=int(trainer.current_epoch),
            global_step=int(trainer.global_step),
            sparsity=self._sparsity(trainer, model, moment, event),
            dense=self._dense,
            monitor=self.name,
            event=event if event is not None else self._last_event,  # its cost: the model now
        )

    def _snapshot(self, model: nn.Module) -> None:
        """Keep θ_pre of the measured parameters for the predicted excessive loss."""
        if not self.options.predict_excess_loss or self.param_names is None:
            self._pre_round = None
            return
        named = dict(model.named_parameters())  # FSDP2: the local shards
        self._pre_round = {n: local_tensor(named[n]).detach().clone() for n in self.param_names}

    def _round(self, trainer: pl.Trainer, moment: str, event: PruningEvent | None) -> int:
        if event is not None:
            return int(event.round_index) + (1 if moment == "after_round" else 0)
        pruner = find_pruner(trainer)
        if pruner is not None:
            return int(pruner.rounds_done)
        return sum(1 for r in self.history if r.get("moment") == "after_round")

    def _sparsity(
        self, trainer: pl.Trainer, model: nn.Module, moment: str, event: PruningEvent | None
    ) -> float:
        before = moment in ("dense", "before_round")
        if event is not None and (before or event.realized_sparsity is not None):
            return float(event.previous_sparsity if before else event.realized_sparsity)
        pruner = find_pruner(trainer)
        if pruner is not None:
            return float(pruner.current_sparsity)
        named = dict(model.named_parameters())
        kept = [named[n] for n in self.param_names or default_weight_names(model) if n in named]
        total = sum(p.numel() for p in kept)
        return sum(int((p == 0).sum()) for p in kept) / total if total else 0.0

    def _batches(self, trainer: pl.Trainer, model: pl.LightningModule) -> FairnessBatches:
        return self.data.batches(
            trainer, model, num_groups=getattr(self.groups, "num_groups", None)
        )

    def _parameter_names(self, trainer: pl.Trainer, model: nn.Module) -> list[str]:
        """The measured parameters, resolved once (by default the pruner's, else Conv/Linear)."""
        if self.param_names is None:
            pruner = find_pruner(trainer)
            pruned = None if pruner is None else list(pruner.parameter_names)
            self.param_names = self.options.parameter_names(model, pruned)
        return self.param_names

    def _write(self, trainer: pl.Trainer) -> None:
        if fp_logging.is_global_zero(trainer) and self._file is not None:
            self._file.write(self.history)

    def _log(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        # a logger holds one value per key and step: a second record at one step under the
        # same keys (the same weights restamped, e.g. "end" right after "periodic") is in the
        # history and the summary, but not logged again
        step, moment = int(trainer.global_step), str(record.get("moment"))
        kind = moment if moment in PREFIXED_MOMENTS else ""
        if self._logged[0] != step:
            self._logged = (step, set())
        if kind in self._logged[1]:
            return
        self._logged[1].add(kind)
        fp_logging.log_round(trainer, record, self.history)
