"""`IterativePruning`: a Lightning callback that prunes on a schedule, with exact sparsity.

Glue: *when* comes from the round plan (:mod:`lightning_fairprune.plan`), *what* from a
criterion of the registry (:mod:`lightning_fairprune.pruning.criteria`), *which* parameters
and units from a `PruningTarget` (weights, channels, N:M), and the masks live in a `MaskState`
that hides FSDP2 sharding; the Trainer-side inputs come from
:mod:`lightning_fairprune.callbacks.training`. Unlike Lightning's ``ModelPruning``, targets
are cumulative and exact, rounds run by epoch or step, pruned weights stay exactly zero with
no second copy of the weights, and masks, plan and rewind weights are checkpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_fairprune.callbacks.events import PruningEvent, announce, pruned_parameter_sets
from lightning_fairprune.callbacks.training import (
    broadcast_masks,
    check_automatic_optimization,
    check_group_data,
    first_training_input,
    fit_plan,
    group_statistics_of,
    training_gradients,
    weight_decays,
)
from lightning_fairprune.checks import (
    check_bool,
    check_choice,
    check_disjoint,
    check_instance,
    check_int,
    check_name_list,
    check_real,
    is_int,
)
from lightning_fairprune.fairness_data import FairnessData
from lightning_fairprune.logging import log_config, log_scalars
from lightning_fairprune.plan import RoundPlan
from lightning_fairprune.pruning.criteria import (
    Criterion,
    CriterionContext,
    check_curvature,
    check_support,
    resolve_criterion,
)
from lightning_fairprune.pruning.state import MaskState
from lightning_fairprune.pruning.target import PruningTarget

__all__ = ["IterativePruning"]

_STATE_VERSION = 3
_OVERLAP = (
    "; each pruning callback counts and enforces its own masks, so overlapping ones report a "
    "sparsity the model does not have: narrow `include_names`/`exclude_names`"
)


class IterativePruning(Callback):
    """Prune a LightningModule on a schedule, by epoch or by optimizer step.

    Each round scores the prunable units (weights, channels or N:M blocks), keeps the best so
    that exactly ``round(target * N)`` of the ``N`` units are pruned (pruned ones stay pruned),
    zeroes them and their optimizer state, and re-zeroes them after every optimizer step.
    Round ``k`` of ``n`` runs at ``start + (k - 1) * frequency`` (epochs: at the epoch's
    start; steps: at the first batch after that many optimizer steps) with the cumulative
    target ``schedule(k / n)``. The plan is `plan` (a `RoundPlan`: ``targets``,
    ``event_points``, ...), the masks, counts and rewind weights `mask_state` (a `MaskState`).

    Args:
        final_sparsity: cumulative pruned fraction of the prunable units after the last
            round, in ``[0, 1)``; or ``compression_ratio`` (params before / after, weights).
        compression_ratio, schedule, initial_sparsity, num_rounds, rate, interval, start,
            pretrained, end, frequency: `RoundPlan`'s arguments: the schedule (``"one_shot"``,
            ``"geometric"``, ``"linear"``, ``"cubic"``, a callable of the event point, or
            ``None``: one-shot for one round, else geometric), rounds by ``"epoch"`` or
            optimizer ``"step"`` from ``start`` (default: after one epoch, 0 if
            ``pretrained``) every ``frequency``; with neither ``num_rounds``, ``rate`` nor
            ``end`` a gradual schedule spreads its rounds over the run.
        criterion: a name in `lightning_fairprune.pruning.CRITERIA` (``"magnitude"``,
            ``"gradient"``, ``"undecayed"``, ``"random"``, ``"fairgrape"``, ``"fairprune"``,
            ``"worst_group"``, registered ones), a `Criterion`, or ``fn(params, grads)``.
        scope: ``"global"`` (one threshold) or ``"layerwise"`` (each layer at the target).
        gradient_batches, weight_decay, seed, needs_gradients: what criteria get: training
            batches of the mean task-loss gradient; ε of ``"undecayed"`` (default: the
            optimizers'); the random seed (``seed + round``); whether a callable needs
            gradients (default: its ``needs_gradients`` attribute).
        include_types, exclude_types, include_names, exclude_names, prune_classifier,
            prune_bias, prune_norm: what is prunable (`select_parameters`; Conv*/Linear
            weights but the classifier by default).
        rewind: ``None``, ``"init"`` or an event point ``<= start``: survivors reset to those
            weights after every round (lottery tickets).
        make_permanent: at fit end, stop enforcing and release masks and rewind weights.
        verbose: print one line per round (rank 0).
        name: distinguishes several pruning callbacks (checkpoint state key).
        group_data, curvature, criterion_options: for criteria that need per-group
            statistics: a `FairnessData` (default: the training loader, groups = classes;
            scanned and dry-run at fit start) and the diagonal curvature; the criterion's
            typed options (e.g. fairprune's ``beta``; checked at construction).
        structure: ``"weight"``, ``"channel"`` (output channels of Conv/Linear layers with
            everything coupled to them, by Torch-Pruning's dependency graph; the target is a
            fraction of the prunable channels) or ``"n:m"`` (at most n of every m consecutive
            input weights kept; target ``1 - n/m``). Masks cover all coupled parameters.
        example_input: an input batch for the channels' graph, the cost (params, FLOPs) of
            every round and ``compact_path``; default ``example_input_array``, else (channels,
            ``compact_path``) the first sample of the first training batch (RNG restored).
        compact_path: at fit end (rank 0), write ``compact(model).state_dict()`` here
            (load it with `lightning_fairprune.load_compact`).

    Example:
        >>> pruning = IterativePruning(0.9, schedule="geometric", num_rounds=3, start=1)
        >>> pruning.plan.event_points, [round(s, 3) for s in pruning.plan.targets]
        ([1, 2, 3], [0.536, 0.785, 0.9])
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> pruning = IterativePruning(0.5, prune_classifier=True)
        >>> pruning.prune_now(None, model)
        >>> zeros = int((model[0].weight == 0).sum() + (model[2].weight == 0).sum())
        >>> pruning.current_sparsity, zeros
        (0.5, 12)
    """

    def __init__(
        self,
        final_sparsity: float | None = None,
        *,
        compression_ratio: float | None = None,
        schedule: str | Callable[[int], float] | None = None,
        initial_sparsity: float = 0.0,
        num_rounds: int | None = None,
        rate: float | None = None,
        interval: str = "epoch",
        start: int | None = None,
        pretrained: bool = False,
        end: int | None = None,
        frequency: int = 1,
        criterion: str | Criterion | Callable[..., Mapping[str, Tensor]] = "magnitude",
        scope: str = "global",
        gradient_batches: int = 1,
        weight_decay: float | None = None,
        seed: int = 0,
        needs_gradients: bool | None = None,
        include_types: Sequence[str] | None = None,
        exclude_types: Sequence[str] | None = None,
        include_names: Sequence[str] | None = None,
        exclude_names: Sequence[str] | None = None,
        prune_classifier: bool = False,
        prune_bias: bool = False,
        prune_norm: bool = False,
        rewind: str | int | None = None,
        make_permanent: bool = False,
        verbose: bool = False,
        name: str | None = None,
        group_data: FairnessData | None = None,
        curvature: str | None = None,
        criterion_options: Mapping[str, Any] | None = None,
        structure: str = "weight",
        example_input: Any = None,
        compact_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        lists = (include_types, exclude_types, include_names, exclude_names)
        self._init_selection(lists, (prune_classifier, prune_bias, prune_norm))
        self.target = PruningTarget(structure, self.selection, example_input)
        final_sparsity = self.target.final_sparsity(
            final_sparsity, compression_ratio, callable(schedule)
        )
        self.plan = RoundPlan(
            final_sparsity,
            compression_ratio=compression_ratio,
            schedule=schedule,
            initial_sparsity=initial_sparsity,
            num_rounds=num_rounds,
            rate=rate,
            interval=interval,
            start=start,
            end=end,
            frequency=frequency,
            pretrained=pretrained,
        )
        self._init_criterion(criterion, needs_gradients, group_data, curvature, criterion_options)
        self.scope = check_choice(scope, "scope", ("global", "layerwise"))
        self.gradient_batches = check_int(gradient_batches, "gradient_batches", 1)
        self.weight_decay = check_real(weight_decay, "weight_decay", low=0.0, allow_none=True)
        self.seed = check_int(seed, "seed", 0)
        self.rewind = self.plan.check_rewind(rewind)
        self.make_permanent = check_bool(make_permanent, "make_permanent")
        self.verbose = check_bool(verbose, "verbose")
        self.name = check_instance(name, "name", str, "a str or None")
        self.compact_path = check_instance(compact_path, "compact_path", (str, Path), "a path")
        self.mask_state = MaskState(owner="IterativePruning")
        self._pl_module: nn.Module | None = None
        self._cost: dict[str, int] | None = None  # of the model as it is now
        self._started = False
        self._manual_rounds = 0
        self._events: list[PruningEvent] = []

    def _init_criterion(
        self,
        criterion: Any,
        needs_gradients: bool | None,
        group_data: FairnessData | None,
        curvature: str | None,
        options: Mapping[str, Any] | None,
    ) -> None:
        self.criterion: Criterion = resolve_criterion(criterion, needs_gradients)
        check_support(self.criterion, self.target.structure)
        what = "a lightning_fairprune.FairnessData (a loader with `num_groups`, ...) or None"
        self.group_data = check_instance(group_data, "group_data", FairnessData, what)
        self.curvature = check_curvature(self.criterion, curvature, group_data)
        self.criterion_options = dict(options) if isinstance(options, Mapping) else options
        self.options = self.criterion.make_options(options)  # names and values checked now

    def _init_selection(self, lists: tuple[Any, ...], flags: tuple[Any, ...]) -> None:
        names = ("include_types", "exclude_types", "include_names", "exclude_names")
        self.selection: dict[str, Any] = {
            k: check_name_list(v, k) for k, v in zip(names, lists, strict=True)
        }
        switches = ("prune_classifier", "prune_bias", "prune_norm")
        self.selection.update({k: check_bool(v, k) for k, v in zip(switches, flags, strict=True)})

    # ------------------------------------------------------------------ identity and views
    @property
    @override
    def state_key(self) -> str:
        # what is pruned identifies it (not the schedule: a resumed run may change the target)
        return self._generate_state_key(
            name=self.name, selection={k: v for k, v in self.selection.items() if v}
        )

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks: parameter name -> bool tensor (``True`` = kept; local shards)."""
        return self.mask_state.masks

    @property
    def parameter_names(self) -> list[str]:
        """Names of the masked parameters (known from ``setup`` on; empty before)."""
        return list(self.target.names or [])

    @property
    def current_sparsity(self) -> float:
        """Realized pruned fraction of the prunable weights (channels, for channels)."""
        return self.target.sparsity(self.masks, self.mask_state.sparsity)

    @property
    def rounds_done(self) -> int:
        """Number of scheduled rounds run so far (extra ``prune_now(sparsity=...)`` excluded)."""
        return self.plan.rounds_done

    @property
    def schedule_complete(self) -> bool:
        """Whether the schedule is done (``False`` after a fit that stopped early)."""
        return self.plan.finished

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per round: the `PruningEvent` of the round as plain values."""
        return [event.to_dict() for event in self._events]

    def pruned_parameters(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The prunable parameters of ``pl_module`` by name: the tensors `masks` apply to.

        Example:
            >>> model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
            >>> params = IterativePruning(0.5).pruned_parameters(model)
            >>> list(params), params["0.weight"] is model[0].weight
            (['0.weight'], True)
        """
        return self._params(pl_module)

    def settings(self) -> dict[str, Any]:
        """The constructor settings as plain values (for logger configs).

        Example:
            >>> s = IterativePruning(0.9, num_rounds=3).settings()
            >>> s["final_sparsity"], s["schedule"], s["num_rounds"], s["criterion"]
            (0.9, 'geometric', 3, 'magnitude')
        """
        return {
            **self.plan.settings(),
            "criterion": self.criterion.name,
            "scope": self.scope,
            "gradient_batches": self.gradient_batches,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "rewind": self.rewind,
            "make_permanent": self.make_permanent,
            "name": self.name,
            "curvature": self.curvature if self.criterion.needs_group_statistics else None,
            "criterion_options": self.criterion_options or None,
            "structure": str(self.target.structure),
            "compact_path": None if self.compact_path is None else str(self.compact_path),
            **self.selection,
        }

    # ------------------------------------------------------------------ setup
    def _params(self, pl_module: nn.Module, trainer: Any = None) -> dict[str, nn.Parameter]:
        """Masked parameters by name, looked up fresh (strategies replace them)."""
        first = not self.target.bound
        wanted = self.target.needs_example or self.compact_path is not None
        example = partial(first_training_input, trainer) if wanted and trainer is not None else None
        params = self.target.params(pl_module, example)
        if first:
            self._pl_module = pl_module
            if self.plan.compression_ratio is not None:
                total = sum(p.numel() for p in pl_module.parameters())
                self.plan.resolve_compression(total, sum(p.numel() for p in params.values()))
        self.mask_state.bind(params)
        return params

    def _start(self, trainer: pl.Trainer, pl_module: nn.Module, training: bool) -> None:
        """Bind the parameters once an example input is known, then the fit-start checks."""
        if not (training or self.target.ready(pl_module)):
            return  # the example input comes from the first training batch (on_train_start)
        params = self._params(pl_module, trainer)
        if not self._started:
            self._started = True
            check_disjoint(pruned_parameter_sets(trainer), "pruned parameters", hint=_OVERLAP)
            if self.rewind == "init" and self.mask_state.rewind_weights is None:
                self.mask_state.capture_rewind()
            if self.compact_path is not None:
                self.target.check_compact(params)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.target.ready(pl_module):
            self._params(pl_module)
        if bool(getattr(trainer, "is_global_zero", True)):
            section = "pruning" if self.name is None else f"pruning-{self.name}"
            log_config(trainer, section, self.settings())
        if self.plan.interval == "epoch":
            self._fit_plan(trainer)
        if self.criterion.needs_gradients:
            check_automatic_optimization(pl_module, f"criterion={self.criterion.name!r}")

    def _fit_plan(self, trainer: pl.Trainer) -> None:
        fit_plan(self.plan, trainer)
        self.plan.check_rewind(self.rewind)  # against the resolved start

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # strategies have sharded the model (configure_model) by now: refuse what cannot run
        # on shards before the first training step, not at the first round
        check_support(self.criterion, self.target.structure, dict(pl_module.named_parameters()))
        self._start(trainer, pl_module, training=False)
        self.mask_state.enforce(trainer.optimizers)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan.interval == "step":  # the number of optimizer steps is known from here on
            self._fit_plan(trainer)
        self._start(trainer, pl_module, training=True)  # the training batches are known now
        if self.criterion.needs_group_statistics and not self.plan.complete:
            fair = (self.group_data, self.criterion, self.options, self.curvature)
            check_group_data(trainer, pl_module, self._params(pl_module), *fair)
        self.mask_state.enforce(trainer.optimizers)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mask_state.enforce(trainer.optimizers)
        if self.plan.interval == "epoch":
            self._run_due_rounds(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.plan.interval == "step":
            self._run_due_rounds(trainer, pl_module, trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.plan.warn_unfinished(self.current_sparsity)
            if self.compact_path is not None and self.target.bound:
                self.target.save_compact(pl_module, self.mask_state.full(), self.compact_path)
        self._started = False
        self.mask_state.release()
        if self.make_permanent:
            self.make_pruning_permanent(pl_module)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:  # Ctrl+C
            self.plan.warn_unfinished(self.current_sparsity)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.mask_state.release()

    # ------------------------------------------------------------------ rounds
    def _run_due_rounds(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: int) -> None:
        # called every step with interval="step": look the parameters up only when needed
        if is_int(self.rewind) and self.mask_state.rewind_weights is None and now == self.rewind:
            self._params(pl_module)
            self.mask_state.capture_rewind()
        while self.plan.due(now):
            self._prune(trainer, pl_module, self.plan.next_target(), True)

    def prune_now(
        self, trainer: pl.Trainer | None, pl_module: nn.Module, sparsity: float | None = None
    ) -> None:
        """Run a pruning round now: the next scheduled one, or an extra one to ``sparsity``.

        An extra round leaves the schedule where it is. ``trainer`` may be ``None`` for
        criteria that need no training batches (no logging, listeners or optimizer state).

        Args:
            trainer: the `Trainer` (or ``None``).
            pl_module: the model to prune.
            sparsity: cumulative target in ``[current sparsity, 1)``, or ``None``.

        Raises:
            ValueError: a sparsity outside ``[0, 1)`` or below the current one, or none when
                the schedule is complete.

        Example:
            >>> model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
            >>> pruning = IterativePruning(0.8)
            >>> pruning.prune_now(None, model, sparsity=0.3)
            >>> pruning.current_sparsity, pruning.rounds_done
            (0.3, 0)
            >>> pruning.prune_now(None, model)  # the scheduled (one-shot) round
            >>> pruning.current_sparsity, pruning.rounds_done
            (0.8, 1)
        """
        self._params(pl_module)
        if sparsity is None:
            self._prune(trainer, pl_module, self.plan.next_target(), True)
        else:
            target = self.plan.extra_target(sparsity, self.current_sparsity)
            self._prune(trainer, pl_module, target, False)

    def _prune(
        self, trainer: pl.Trainer | None, pl_module: nn.Module, target: float, scheduled: bool
    ) -> None:
        params = self._params(pl_module)
        state = self.mask_state
        before = self._cost if self._cost is not None else self.target.cost(pl_module, self.masks)
        event = PruningEvent(
            round_index=self.plan.rounds_done + self._manual_rounds,
            num_rounds=self.plan.num_rounds,
            target_sparsity=float(target),
            previous_sparsity=float(self.current_sparsity),
            epoch=int(getattr(trainer, "current_epoch", 0) or 0),
            global_step=int(getattr(trainer, "global_step", 0) or 0),
            criterion=self.criterion.name,
            parameter_names=tuple(params),
            scheduled=scheduled,
            structure=str(self.target.structure),
            previous_cost=before,
        )
        if getattr(trainer, "training", False):  # in a fit (not a stub or no trainer)
            self.plan.warn_untrained(event.global_step)
        announce(trainer, pl_module, "on_before_pruning_round", event, sender=self)
        state.set(self.compute_masks(trainer, pl_module, params, target, event.round_index))
        rewound = state.rewind_weights is not None
        if rewound:
            state.rewind()
        elif self.rewind is not None:
            self.plan.warn_not_rewound(self.rewind, event.round_index)
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        state.zero_optimizer_state(optimizers)
        state.enforce(optimizers, force=True)
        self._manual_rounds += 0 if scheduled else 1
        self.plan.record_round(target, scheduled=scheduled)
        self._cost = self.target.cost(pl_module, self.masks)
        done = dataclasses.replace(
            event,
            realized_sparsity=self.current_sparsity,
            layer_sparsity=state.layer_sparsity(),
            rewound=rewound,
            cost=self._cost,
        )
        self._events.append(done)
        if trainer is not None:
            log_scalars(trainer, done.metrics())
        if self.verbose and bool(getattr(trainer, "is_global_zero", True)):
            print(done.summary(self.plan.interval))
        announce(trainer, pl_module, "on_pruning_round", done, sender=self)

    def compute_masks(
        self,
        trainer: pl.Trainer | None,
        pl_module: nn.Module,
        params: Mapping[str, Tensor],
        target: float,
        round_index: int = 0,
    ) -> dict[str, Tensor]:
        """The criterion's masks for one round, identical on every process.

        Overridable: a subclass can change how masks are computed while keeping the
        schedule, enforcement, checkpointing and logging.

        Args:
            trainer: the `Trainer` (``None`` outside a fit for criteria without batches).
            pl_module: the model.
            params: the masked parameters by name.
            target: cumulative target sparsity.
            round_index: index of the round (seeds the random criterion).

        Returns:
            Bool masks by parameter name (local shards when sharded).

        Example:
            >>> import torch
            >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
            >>> with torch.no_grad():
            ...     _ = model[0].weight.copy_(torch.tensor([[1.0, -4.0], [3.0, 0.5]]))
            >>> pruning = IterativePruning(0.5)
            >>> params = {"0.weight": model[0].weight}
            >>> pruning.compute_masks(None, model, params, 0.5)["0.weight"]
            tensor([[False,  True],
                    [ True, False]])
        """
        ctx = self._context(trainer, pl_module, params, target, round_index)
        masks = self.criterion.masks(ctx)
        del ctx
        return broadcast_masks(trainer, masks, params)

    # ------------------------------------------------------------------ what criteria ask for
    def _context(
        self,
        trainer: Any,
        pl_module: nn.Module,
        params: Mapping[str, Tensor],
        target: float,
        r: int,
    ) -> CriterionContext:
        """Round ``r``'s criterion context; its suppliers run only if the criterion asks."""
        state, name, seed = self.mask_state, f"criterion={self.criterion.name!r}", self.seed + r
        owner = f"IterativePruning ({name})"
        grads = partial(training_gradients, trainer, pl_module, params, self.gradient_batches)
        stats = partial(group_statistics_of, trainer, pl_module, params, self.group_data)
        return CriterionContext(
            params,
            target,
            scope=self.scope,
            current_masks=state.masks or None,
            seed=seed,
            options=self.options,
            curvature=self.curvature,
            gradients=partial(grads, owner),
            weight_decays=partial(weight_decays, trainer, params, self.weight_decay, name),
            group_statistics=partial(stats, curvature=self.curvature, seed=seed, owner=name),
            units=self.target.units,
            distribute=state.distribute,
            owner=f"criterion {self.criterion.name!r}",
        )

    # ------------------------------------------------------------------ masks in and out
    def make_pruning_permanent(self, pl_module: nn.Module | None = None) -> None:
        """Stop enforcing the masks; release masks and rewind weights (weights stay zero).

        Args:
            pl_module: the model (re-applies the masks once more before releasing them).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            >>> pruning = IterativePruning(0.5)
            >>> pruning.prune_now(None, model)
            >>> pruning.make_pruning_permanent(model)
            >>> pruning.masks, float((model[0].weight == 0).float().mean())
            ({}, 0.5)
        """
        if pl_module is not None:
            self._params(pl_module)
            self.mask_state.apply()
        self.mask_state.clear()

    def export_masks(self, path: str | Path) -> None:
        """Save the full masks with ``torch.save`` (loadable with ``weights_only=True``).

        With sharded (FSDP2) parameters, call it on every process: the shards are gathered
        and the first process writes the file.

        Example:
            >>> import tempfile, os
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            >>> pruning = IterativePruning(0.25)
            >>> pruning.prune_now(None, model)
            >>> path = os.path.join(tempfile.mkdtemp(), "masks.pt")
            >>> pruning.export_masks(path)
            >>> other = IterativePruning(0.5)
            >>> other.import_masks(path, model)
            >>> other.current_sparsity
            0.25
        """
        self.mask_state.save(path)

    def import_masks(self, path: str | Path, pl_module: nn.Module | None = None) -> None:
        """Apply masks saved by `export_masks` (now, or at setup); later rounds prune further.

        Raises:
            ValueError: if the masks do not fit the selected parameters.
        """
        module = pl_module if pl_module is not None else self._pl_module
        if module is not None:
            self._params(module)
        self.mask_state.load(path)

    def sparsity_report(self, pl_module: nn.Module | None = None) -> dict[str, Any]:
        """Per-layer and overall sparsity of the pruned model (`pruning.sparsity_report`).

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            >>> pruning = IterativePruning(0.5)
            >>> pruning.prune_now(None, model)
            >>> pruning.sparsity_report()["sparsity"], pruning.sparsity_report()["layers"].keys()
            (0.5, dict_keys(['0.weight']))
        """
        module = pl_module if pl_module is not None else self._pl_module
        if module is None:
            raise ValueError("Expected `pl_module` (the callback has not seen a model yet)")
        self._params(module)
        return self.mask_state.report(module)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            **self.plan.state_dict(),
            "manual_rounds": self._manual_rounds,
            **self.mask_state.state_dict(),
            "history": self.history,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mask_state.load_state_dict(state_dict)  # at setup when the model is not known
        self._manual_rounds = int(state_dict.get("manual_rounds", 0))
        self._events = [PruningEvent.from_dict(h) for h in state_dict.get("history", [])]
        self.plan.load_state_dict(state_dict)
