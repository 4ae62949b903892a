"""`IterativePruning`: a Lightning callback that prunes on a schedule, with exact sparsity.

The callback is thin: the plain-torch cores decide *what* can be pruned
(:mod:`lightning_fairprune.pruning.selection`), how weights are *scored*
(:mod:`lightning_fairprune.pruning.criteria`), how scores become *masks* with exactly the
requested sparsity (:mod:`lightning_fairprune.pruning.masks`) and *how much over time*
(:mod:`lightning_fairprune.schedules`). The callback owns the timing (epochs or optimizer
steps), the gradients of gradient-based criteria, distributed agreement, rewinding,
checkpointing, logging and the announcement of every round to other callbacks.

Differences from Lightning's ``ModelPruning``:

* the target is the *cumulative* fraction of prunable weights that are zero (or a whole-model
  compression ratio), and the realized sparsity equals it exactly;
* rounds happen at the start of an epoch or at an optimizer step, not only at epoch ends;
* the masks are bool tensors, and pruned weights are kept at exactly zero by one in-place
  operation after every optimizer step (no second copy of the weights and no forward
  pre-hook recomputing ``weight_orig * mask`` on every forward);
* masks, schedule position and rewind weights are part of the checkpoint, so a resumed run
  continues exactly where the interrupted one stopped;
* sparsity goes to every attached Lightning logger, and other callbacks are told about each
  round (:mod:`lightning_fairprune.callbacks.events`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_fairprune.callbacks.events import PruningEvent, pruned_parameter_sets
from lightning_fairprune.checks import (
    check_bool,
    check_choice,
    check_disjoint,
    check_int,
    check_name_list,
    check_real,
    check_sparsity,
    is_int,
)
from lightning_fairprune.diagnostics.statistics import GroupStatistics, group_statistics
from lightning_fairprune.fairness_data import FairnessData, agree
from lightning_fairprune.logging import log_config, log_scalars
from lightning_fairprune.measure import (
    isolated,
    precision_context,
    prepare_batch,
    task_gradients,
)
from lightning_fairprune.pruning.criteria import NEEDS_GRADIENTS, compute_scores, magnitude_scores
from lightning_fairprune.pruning.fair_criteria import FAIR_CRITERIA, check_fair_options, fair_masks
from lightning_fairprune.pruning.masks import (
    MaskEnforcer,
    apply_masks,
    check_masks_fit,
    global_masks,
    layerwise_masks,
    load_masks,
    local_tensor,
    pack_mask,
    save_masks,
    unpack_mask,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.pruning.masks import sparsity_report as _sparsity_report
from lightning_fairprune.pruning.selection import select_parameters
from lightning_fairprune.pruning.sharded import (
    gather_full_masks,
    gather_full_tensors,
    is_sharded,
    shard_full_masks,
    shard_full_tensors,
    shard_spec,
    sharded_counts,
    sharded_global_masks,
    sharded_layerwise_masks,
)
from lightning_fairprune.schedules import RoundPlan

__all__ = ["IterativePruning"]

_SCORE_CRITERIA = ("magnitude", "gradient", "undecayed", "random")
_CRITERIA = (*_SCORE_CRITERIA, *FAIR_CRITERIA)
_SCOPES = ("global", "layerwise")
_STATE_VERSION = 2
_OVERLAP = (
    "; each pruning callback counts and enforces its own masks, so overlapping ones report a "
    "sparsity the model does not have: narrow `include_names`/`exclude_names`"
)


def _callable_name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", type(fn).__name__))


class IterativePruning(Callback):
    """Prune a LightningModule on a schedule, by epoch or by optimizer step.

    Each round computes a score per prunable weight, keeps the highest-scoring ones so that
    exactly ``round(target * N)`` of the ``N`` prunable weights are zero (already pruned
    weights stay pruned), zeroes the pruned weights and their optimizer state, and from then
    on re-zeroes them after every optimizer step. Round ``k`` of ``n`` (``k = 1..n``) runs at
    ``start + (k - 1) * frequency`` (epochs or optimizer steps) with the cumulative target
    ``schedule(k / n)``: epoch rounds run at the start of the epoch, before it trains; step
    rounds run at the first batch after that many optimizer steps (the beginning of an
    accumulation cycle).

    Args:
        final_sparsity: cumulative fraction of the prunable weights that are zero after the
            last round, in ``[0, 1)``. Give exactly one of this and ``compression_ratio``
            (neither with a callable ``schedule``).
        compression_ratio: whole-model compression ``t = params before / params after``
            (``>= 1``), converted to a sparsity of the prunable weights at setup.
        schedule: ``"one_shot"``, ``"geometric"`` (same fraction of the remaining weights per
            round), ``"linear"``, ``"cubic"`` (Zhu & Gupta), a callable
            ``fn(t) -> cumulative sparsity`` evaluated at each event point ``t`` (an epoch or
            a step, in ``interval`` units; it must stay in ``[0, 1)`` and never decrease), or
            ``None`` (default): ``"one_shot"`` for one round, ``"geometric"`` (iterative
            pruning: the same fraction of the remaining weights each round) as soon as
            ``num_rounds > 1``, ``end`` or ``rate`` asks for several rounds.
        initial_sparsity: sparsity at progress 0 of a named schedule (the first round prunes
            to ``schedule(1 / n)``).
        num_rounds: number of rounds. Default: 1 for ``"one_shot"``; derived from ``rate`` for
            ``"geometric"`` with a rate; else ``(end - start) // frequency + 1`` with ``end``;
            a gradual schedule with neither spreads its rounds over the run the Trainer will do
            (``max_epochs``, or the optimizer steps it estimates), leaving the last quarter
            after ``start`` for fine-tuning (`RoundPlan.resolve_horizon`); a callable schedule
            without ``end`` or ``num_rounds`` runs every ``frequency`` until training stops.
        rate: only for ``"geometric"``: fraction of the remaining weights removed per round
            (lottery-ticket style, e.g. 0.2); it determines the number of rounds.
        interval: ``"epoch"`` or ``"step"`` (optimizer steps, i.e. ``trainer.global_step``).
        start: first event point (epoch index or optimizer-step count). Default ``None``:
            after one epoch of training (epoch 1; with ``interval="step"`` the optimizer steps
            of one epoch), so that the first round, and the dense reference a
            `FairnessMonitor` measures before it, are a trained model; 0 with
            ``pretrained=True``. A round that runs before any optimizer step of the fit warns,
            unless ``pretrained=True``.
        pretrained: the model is already trained when the fit starts (weights loaded from a
            checkpoint or a model zoo): ``start`` defaults to 0 and a round before any
            optimizer step is deliberate (no warning).
        end: last allowed event point (inclusive), or ``None``.
        frequency: distance between event points, ``>= 1``.
        criterion: ``"magnitude"`` (abs(θ)), ``"gradient"`` (abs(θ·g)), ``"undecayed"``
            (abs(-θ·g + ε·θ²)), ``"random"`` (seeded), a fairness-aware criterion
            (``"fairgrape"``: FairGRAPE's balanced greedy over per-group Taylor importance;
            ``"fairprune"``: FairPrune's per-group OBD saliency with its β trade-off;
            ``"worst_group"``: ours, minimax over per-group second-order damage forecasts,
            meant for many small rounds; see
            :mod:`lightning_fairprune.pruning.fair_criteria`), or a callable
            ``fn(params, grads) -> scores`` (dicts keyed by parameter name).
        scope: ``"global"`` (one threshold over all prunable weights) or ``"layerwise"``
            (every parameter reaches the target sparsity on its own).
        gradient_batches: number of training batches whose mean task-loss gradient the
            gradient-based criteria use (train mode, current weights); not used by the
            fairness-aware criteria (see ``group_data``).
        weight_decay: ε of the undecayed criterion. Default: the ``weight_decay`` of the
            optimizer param group holding each parameter.
        seed: seed of the random criterion (round ``r`` uses ``seed + r``; identical on every
            process).
        needs_gradients: whether a callable criterion needs the gradients (default: its
            attribute ``needs_gradients`` if present, else ``False``).
        include_types: module class names whose parameters are prunable (default Conv*/Linear).
        exclude_types: module class names never pruned.
        include_names: fnmatch patterns on parameter names to prune.
        exclude_names: fnmatch patterns on parameter names never pruned.
        prune_classifier: also prune the last Linear layer.
        prune_bias: also prune biases.
        prune_norm: also prune normalization parameters.
        rewind: ``None``; ``"init"`` (the weights when fit starts); or an event point (epoch or
            step, in ``interval`` units, at most ``start``): after every round the surviving
            weights are reset to their values at that point (lottery tickets). Stores one
            copy of the prunable weights only when asked for.
        make_permanent: at the end of fit, detach the mask enforcement and release masks and
            rewind weights (the pruned weights are already exactly zero).
        verbose: print one line per round (rank 0).
        name: distinguishes several pruning callbacks in one trainer (checkpoint state key).
        group_data: for the fairness-aware criteria, where the per-group statistics come from:
            a `lightning_fairprune.fairness_data.FairnessData` (a loader of ``(x, y, g)``
            batches with ``num_groups``, or ``group_fn``, ``max_batches``: the same path as
            `FairnessMonitor`'s). Default: the whole training dataloader, groups = classes.
            Per-group statistics are sums over each group's samples, and the groups a fair
            criterion protects are the small ones: one batch of 64 holds a handful of a
            minority class, so its Taylor/OBD importances would be noise. The whole loader
            costs one statistics pass over the training data per round; to bound it (or to
            use held-out data), pass ``FairnessData(loader, max_batches=k)``. Given data is
            scanned entirely at fit start (`FairnessData.scan`: ids, non-finite inputs, empty
            groups); the statistics pass, options and model outputs are dry-run on one batch
            then, isolated from training.
        curvature: per-group diagonal curvature of the fairness-aware criteria: ``"fisher"``
            (default for fairprune and worst_group), ``"hutchinson"`` or ``"none"`` (default
            for fairgrape, which needs none).
        criterion_options: keyword options of the fairness-aware criterion (fairgrape:
            ``batch``; fairprune: ``beta``, ``worst``, ``others``; worst_group:
            ``iterations``, ``eta``, ``clip``, ``swaps``); names and values are checked at
            construction (`check_fair_options`), group ids (``worst``) at fit start.

    Example:
        >>> pruning = IterativePruning(0.9, schedule="geometric", num_rounds=3, start=1)
        >>> pruning.event_points, [round(s, 3) for s in pruning.targets]
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
        criterion: str | Callable[..., Mapping[str, Tensor]] = "magnitude",
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
    ) -> None:
        super().__init__()
        # ---- the round plan (schedule arguments, targets, event points, position) ---------
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

        # ---- criterion ---------------------------------------------------------------------
        if isinstance(criterion, str):
            if criterion not in _CRITERIA:
                raise ValueError(
                    f"Expected `criterion` to be one of {_CRITERIA} or a callable, but got "
                    f"{criterion!r}"
                )
            self._criterion_name: str = criterion
            uses_grads = criterion in NEEDS_GRADIENTS
            if needs_gradients is not None:
                raise ValueError(
                    "Expected `needs_gradients` only with a callable `criterion`, but got "
                    f"needs_gradients={needs_gradients!r} with criterion={criterion!r}"
                )
        elif callable(criterion):
            self._criterion_name = _callable_name(criterion)
            uses_grads = bool(
                getattr(criterion, "needs_gradients", False)
                if needs_gradients is None
                else needs_gradients
            )
        else:
            raise TypeError(
                f"Expected `criterion` to be one of {_CRITERIA} or a callable, but got "
                f"{criterion!r} of type {type(criterion).__name__}"
            )
        self.criterion = criterion
        self.needs_gradients = uses_grads and criterion not in FAIR_CRITERIA
        self.fair = criterion in FAIR_CRITERIA
        if group_data is not None and not isinstance(group_data, FairnessData):
            raise TypeError(
                "Expected `group_data` to be a lightning_fairprune.FairnessData (a loader with "
                f"`num_groups`, `group_fn`, ...) or None, but got {type(group_data).__name__}"
            )
        if not self.fair and (
            group_data is not None or curvature is not None or criterion_options is not None
        ):
            raise ValueError(
                "Expected `group_data`, `curvature` and `criterion_options` only with a "
                f"fairness-aware criterion {FAIR_CRITERIA}, but got criterion={criterion!r}"
            )
        if curvature is None:
            curvature = "none" if criterion == "fairgrape" else "fisher"
        self.curvature = check_choice(curvature, "curvature", ("fisher", "hutchinson", "none"))
        if criterion in ("fairprune", "worst_group") and self.curvature == "none":
            raise ValueError(
                f"Expected `curvature` 'fisher' or 'hutchinson' with criterion={criterion!r} "
                "(its saliencies use the per-group diagonal curvature), but got 'none'"
            )
        if criterion_options is not None and not isinstance(criterion_options, Mapping):
            raise TypeError(
                f"Expected `criterion_options` to be a mapping, but got {criterion_options!r}"
            )
        self.group_data = group_data
        self.criterion_options = dict(criterion_options or {})
        if self.fair:
            check_fair_options(str(criterion), self.criterion_options)
        self.scope = check_choice(scope, "scope", _SCOPES)
        self.gradient_batches = check_int(gradient_batches, "gradient_batches", 1)
        self.weight_decay = check_real(weight_decay, "weight_decay", low=0.0, allow_none=True)
        self.seed = check_int(seed, "seed", 0)

        # ---- selection ---------------------------------------------------------------------
        self.selection: dict[str, Any] = {
            "include_types": check_name_list(include_types, "include_types"),
            "exclude_types": check_name_list(exclude_types, "exclude_types"),
            "include_names": check_name_list(include_names, "include_names"),
            "exclude_names": check_name_list(exclude_names, "exclude_names"),
            "prune_classifier": bool(prune_classifier),
            "prune_bias": bool(prune_bias),
            "prune_norm": bool(prune_norm),
        }

        # ---- rewinding and the end ---------------------------------------------------------
        if rewind is not None and rewind != "init" and (not is_int(rewind) or rewind < 0):
            raise ValueError(
                f"Expected `rewind` to be None, 'init' or an int >= 0 (an {interval} index), "
                f"but got {rewind!r}"
            )
        self.rewind = rewind
        self._check_rewind()
        self.make_permanent = check_bool(make_permanent, "make_permanent")
        self.verbose = check_bool(verbose, "verbose")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Expected `name` to be a str or None, but got {name!r}")
        self.name = name

        # ---- resolved at setup -------------------------------------------------------------
        self._fqns: list[str] | None = None
        self._pl_module: nn.Module | None = None

        # ---- state (checkpointed; the plan keeps the schedule position) --------------------
        self._masks: dict[str, Tensor] = {}
        self._sharded = False  # DTensor (FSDP2) parameters: masks hold the local shards
        self._global_counts: dict[str, tuple[int, int]] = {}  # sharded: (pruned, total)
        self._manual_rounds = 0
        self._rewind_weights: dict[str, Tensor] | None = None
        self._history: list[dict[str, Any]] = []
        self._pending_state: dict[str, Any] | None = None
        self._pending_masks: dict[str, Tensor] | None = None

        self._enforcers: list[tuple[MaskEnforcer, list[str]]] = []
        self._enforced_optimizers: list[int] = []
        self._warned_decay = False

    # ------------------------------------------------------------------ identity
    @property
    @override
    def state_key(self) -> str:
        # what is pruned identifies the callback; the schedule and the target do not, so that
        # a run resumed with another target finds its state (`on_load_checkpoint` also finds
        # the keys of earlier versions)
        return self._generate_state_key(
            name=self.name, selection={k: v for k, v in self.selection.items() if v}
        )

    # ------------------------------------------------------------------ the plan's arguments
    @property
    def final_sparsity(self) -> float | None:
        """The ``final_sparsity`` argument (``None`` with a compression ratio or a callable)."""
        return self.plan.final_sparsity

    @property
    def compression_ratio(self) -> float | None:
        """The ``compression_ratio`` argument."""
        return self.plan.compression_ratio

    @property
    def schedule(self) -> Any:
        """The ``schedule`` argument (its resolved name when it was left unset)."""
        return self.plan.schedule

    @property
    def initial_sparsity(self) -> float:
        """The ``initial_sparsity`` argument."""
        return self.plan.initial_sparsity

    @property
    def rate(self) -> float | None:
        """The ``rate`` argument."""
        return self.plan.rate

    @property
    def interval(self) -> str:
        """``"epoch"`` or ``"step"``."""
        return self.plan.interval

    @property
    def start(self) -> int | None:
        """The first event point (``None`` until a step plan's default is resolved)."""
        return self.plan.start

    @property
    def end(self) -> int | None:
        """The last allowed event point."""
        return self.plan.end

    @property
    def frequency(self) -> int:
        """Event points between rounds."""
        return self.plan.frequency

    # ------------------------------------------------------------------ public properties
    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks: parameter name -> bool tensor (``True`` = kept)."""
        return self._masks

    @property
    def parameter_names(self) -> list[str]:
        """Names of the prunable parameters (known from ``setup`` on; empty before).

        Example:
            >>> pruning = IterativePruning(0.5)
            >>> pruning.prune_now(None, nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)))
            >>> pruning.parameter_names
            ['0.weight']
        """
        return list(self._fqns or [])

    def pruned_parameters(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The prunable parameters of ``pl_module`` by name: the tensors `masks` apply to.

        Looked up fresh in the order of `parameter_names` (strategies may replace parameters,
        e.g. FSDP2's DTensors); selected now if no fit or round has run yet.

        Example:
            >>> model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
            >>> params = IterativePruning(0.5).pruned_parameters(model)
            >>> list(params), params["0.weight"] is model[0].weight
            (['0.weight'], True)
        """
        return self._params(pl_module)

    @property
    def schedule_complete(self) -> bool:
        """Whether the schedule is done (every round ran, or an extra round reached the target).

        ``False`` after a fit that EarlyStopping, ``max_steps`` or an interruption ended early:
        the fit-end warning says how far it got. An open-ended callable schedule is never
        complete.
        """
        return self.plan.finished

    @property
    def rounds_done(self) -> int:
        """Number of scheduled rounds run so far (manual ``prune_now(sparsity=...)`` excluded)."""
        return self.plan.rounds_done

    @property
    def num_rounds(self) -> int | None:
        """Number of scheduled rounds.

        ``None`` for an open-ended callable schedule, or before a compression ratio or the
        length of the run is resolved at fit start.
        """
        return self.plan.num_rounds

    @property
    def targets(self) -> list[float] | None:
        """Cumulative target sparsity of each scheduled round (``None`` if not known yet)."""
        return self.plan.targets

    @property
    def event_points(self) -> list[int] | None:
        """Epochs or steps at which the scheduled rounds run (``None`` if not known yet)."""
        return self.plan.event_points

    @property
    def current_sparsity(self) -> float:
        """Realized fraction of the prunable weights that are pruned (0.0 before any round)."""
        if not self._masks:
            return 0.0
        if self._sharded:  # counted over all shards when the masks were set
            total = sum(t for _, t in self._global_counts.values())
            return sum(z for z, _ in self._global_counts.values()) / total if total else 0.0
        total = sum(m.numel() for m in self._masks.values())
        kept = sum(int(m.sum()) for m in self._masks.values())
        return (total - kept) / total if total else 0.0

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per round: round, scheduled, epoch, global_step, target, sparsity."""
        return list(self._history)

    def settings(self) -> dict[str, Any]:
        """The constructor settings as plain values (for logger configs).

        Example:
            >>> s = IterativePruning(0.9, num_rounds=3).settings()
            >>> s["final_sparsity"], s["schedule"], s["num_rounds"], s["criterion"]
            (0.9, 'geometric', 3, 'magnitude')
        """
        out = self.plan.settings()
        out.update(
            criterion=self._criterion_name,
            scope=self.scope,
            gradient_batches=self.gradient_batches,
            weight_decay=self.weight_decay,
            seed=self.seed,
            rewind=self.rewind,
            make_permanent=self.make_permanent,
            name=self.name,
            curvature=self.curvature if self.fair else None,
            criterion_options=self.criterion_options or None,
            **{k: v for k, v in self.selection.items()},
        )
        return out

    # ------------------------------------------------------------------ setup / resolution
    def _select(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        params = select_parameters(pl_module, **self.selection)
        if not params:
            raise ValueError(
                "Expected the parameter selection of `IterativePruning` to match at least one "
                f"parameter of {type(pl_module).__name__}, but got none with {self.selection}"
            )
        return params

    def _params(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """Prunable parameters by name, looked up fresh (strategies may move them)."""
        if self._fqns is None:
            self._setup_module(pl_module)
        assert self._fqns is not None
        named = dict(pl_module.named_parameters())
        params = {name: named[name] for name in self._fqns}
        # strategies shard the model after `setup` (ModelParallelStrategy's configure_model)
        self._sharded = is_sharded(params)
        return params

    def _setup_module(self, pl_module: nn.Module) -> None:
        params = self._select(pl_module)
        self._fqns = list(params)
        self._pl_module = pl_module
        self._sharded = is_sharded(params)
        if self.plan.compression_ratio is not None:
            total = sum(p.numel() for p in pl_module.parameters())
            prunable = sum(p.numel() for p in params.values())
            self.plan.resolve_compression(total, prunable)
        if self._pending_masks is not None:
            pending, self._pending_masks = self._pending_masks, None
            source = "imported masks"
            self._set_masks(pl_module, self._localize(pl_module, pending, source), source=source)
        if self._pending_state is not None:
            pending_state, self._pending_state = self._pending_state, None
            self.load_state_dict(pending_state)

    def _horizon(self, trainer: pl.Trainer) -> tuple[int | None, str]:
        """The run's length in event points and how it was derived (for messages)."""
        if self.interval == "epoch":
            limit = trainer.max_epochs
            if limit is None or limit < 0:
                return None, "max_epochs"
            return int(limit), "max_epochs"
        max_steps = trainer.max_steps
        try:
            estimated = float(trainer.estimated_stepping_batches)
        except Exception:  # no train dataloader to estimate from
            estimated = math.inf
        no_max_steps = max_steps is None or max_steps < 0
        if math.isfinite(estimated) and (no_max_steps or estimated < max_steps):
            epochs = trainer.max_epochs
            return int(estimated), f"the optimizer steps of max_epochs={epochs}"
        if max_steps is not None and max_steps >= 0:
            return int(max_steps), "max_steps"
        return None, "max_steps"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._setup_module(pl_module)
        if bool(getattr(trainer, "is_global_zero", True)):
            section = "pruning" if self.name is None else f"pruning-{self.name}"
            log_config(trainer, section, self.settings())
        if self.interval == "epoch":
            self._plan_run(trainer)
        if (
            self.needs_gradients
            and not pl_module.automatic_optimization
            and self._criterion_name in _CRITERIA
        ):
            raise ValueError(
                f"Expected automatic optimization with criterion={self._criterion_name!r} "
                "(its gradients come from `training_step`), but the module uses manual "
                "optimization; use criterion='magnitude' or 'random'"
            )

    def _plan_run(self, trainer: pl.Trainer) -> None:
        """Fit the plan to the run: spread rounds, check callables, warn if it cannot finish."""
        if self.plan.needs_start:  # a step plan's default start: one epoch of steps
            self.plan.resolve_start(trainer.num_training_batches, trainer.accumulate_grad_batches)
            self._check_rewind()
        limit, unit = self._horizon(trainer)
        if self.plan.needs_horizon:
            if limit is None:
                raise ValueError(
                    f"Expected `num_rounds` or `end` for schedule={self.plan.schedule_name!r}, "
                    f"or a trainer with a finite {unit} over which to spread the rounds, but "
                    "got neither"
                )
            self.plan.resolve_horizon(limit)
        self.plan.prevalidate(limit)
        self.plan.warn_incomplete(limit, unit)

    def _check_rewind(self) -> None:
        start = self.plan.start
        if is_int(self.rewind) and start is not None and self.rewind > start:
            raise ValueError(
                f"Expected `rewind` to be at most `start` ({start}): the weights must be stored "
                f"before the first round, but got {self.rewind!r}"
            )

    # ------------------------------------------------------------------ hooks
    def _check_sharding_support(self) -> None:
        """Refuse a fairness-aware criterion on FSDP2-sharded parameters (clear error).

        FairGRAPE's greedy is sequential over single weights (a collective per step across
        shards) and the Fisher curvature needs per-sample gradients, which FSDP2's
        reduce-scatter hooks do not give; the fairness-aware criteria are not sharded.
        """
        if self._sharded and self._criterion_name in FAIR_CRITERIA:
            raise ValueError(
                f"Expected criterion={self._criterion_name!r} on unsharded parameters: the "
                "fairness-aware criteria do not support FSDP2-sharded models; use "
                "'magnitude', 'gradient', 'undecayed' or 'random'"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelParallelStrategy has sharded the model (configure_model) by now: refuse what
        # cannot run on shards before the first training step, not at the first round
        self._params(pl_module)
        self._check_sharding_support()
        check_disjoint(pruned_parameter_sets(trainer), "pruned parameters", hint=_OVERLAP)
        if self.rewind == "init" and self._rewind_weights is None:
            self._capture_rewind(pl_module)
        self._ensure_enforcers(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "step":  # the number of optimizer steps is known from here on
            self._plan_run(trainer)
        if self.fair and not self.plan.complete:  # the train loader is known from here on
            self._fair_dry_run(trainer, pl_module)
        self._ensure_enforcers(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_enforcers(trainer, pl_module)
        if self.interval != "epoch":
            return
        self._maybe_capture_rewind(pl_module, trainer.current_epoch)
        self._run_due_rounds(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.interval != "step":
            return
        self._maybe_capture_rewind(pl_module, trainer.global_step)
        self._run_due_rounds(trainer, pl_module, trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.plan.warn_unfinished(self.current_sparsity)
        self._remove_enforcers()
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
        self._remove_enforcers()

    # ------------------------------------------------------------------ rounds
    def _run_due_rounds(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: int) -> None:
        while self.plan.due(now):
            target = self.plan.target(self.plan.rounds_done)
            self._prune(trainer, pl_module, target, scheduled=True)

    def prune_now(
        self,
        trainer: pl.Trainer | None,
        pl_module: nn.Module,
        sparsity: float | None = None,
    ) -> None:
        """Run a pruning round now.

        Without ``sparsity`` this runs the next scheduled round (and advances the schedule);
        with it, an extra round to that cumulative sparsity that leaves the schedule where
        it is. ``trainer`` may be ``None`` for criteria that need no gradients (no logging,
        listeners or optimizer state then).

        Args:
            trainer: the `Trainer` (or ``None``).
            pl_module: the model to prune.
            sparsity: cumulative target in ``[current sparsity, 1)``, or ``None``.

        Raises:
            ValueError: for a sparsity outside ``[0, 1)`` or below the current target, or
                when the schedule is complete and no sparsity is given.

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
        if self._fqns is None:
            self._setup_module(pl_module)
        if sparsity is None:
            n = self.num_rounds
            if n is not None and self.plan.rounds_done >= n:
                raise ValueError(
                    f"Expected `sparsity` when the schedule is complete ({n} rounds done), but "
                    "got None"
                )
            target = self.plan.target(self.plan.rounds_done)
            self._prune(trainer, pl_module, target, scheduled=True)
            return
        target = check_sparsity(sparsity, "sparsity")
        if target < self.current_sparsity - 1e-12:
            raise ValueError(
                f"Expected `sparsity` to be at least the current sparsity "
                f"{self.current_sparsity:.6g} (masks only shrink), but got {sparsity!r}"
            )
        self._prune(trainer, pl_module, target, scheduled=False)

    def _prune(
        self,
        trainer: pl.Trainer | None,
        pl_module: nn.Module,
        target: float,
        scheduled: bool,
    ) -> None:
        params = self._params(pl_module)
        previous = self.current_sparsity
        round_index = self.plan.rounds_done + self._manual_rounds
        epoch = int(getattr(trainer, "current_epoch", 0) or 0)
        step = int(getattr(trainer, "global_step", 0) or 0)
        event = PruningEvent(
            round_index=round_index,
            num_rounds=self.num_rounds,
            target_sparsity=float(target),
            previous_sparsity=float(previous),
            epoch=epoch,
            global_step=step,
            criterion=self._criterion_name,
            parameter_names=tuple(params),
        )
        if getattr(trainer, "training", False):  # in a fit (not a stub or no trainer)
            self.plan.warn_untrained(step)
        self._announce(trainer, pl_module, "on_before_pruning_round", event)

        masks = self.compute_masks(trainer, pl_module, params, target, round_index)
        self._set_masks(pl_module, masks, source="round")
        rewound = self._rewind_weights is not None
        if rewound:
            self._rewind(params)
        elif self.rewind is not None:
            warnings.warn(
                f"IterativePruning: round {round_index} ran before the rewind point "
                f"{self.rewind!r} was reached; its survivors are not rewound.",
                UserWarning,
                stacklevel=2,
            )
        if trainer is not None:
            for optimizer in list(getattr(trainer, "optimizers", None) or []):
                zero_pruned_optimizer_state(optimizer, params, self._masks)
            self._ensure_enforcers(trainer, pl_module, force=True)

        if not scheduled:
            self._manual_rounds += 1
        self.plan.record_round(target, scheduled=scheduled)
        layer = self._layer_sparsity()
        realized = self.current_sparsity
        self._history.append(
            {
                "round": round_index,
                "scheduled": scheduled,
                "epoch": epoch,
                "global_step": step,
                "target": float(target),
                "sparsity": realized,
                "rewound": rewound,
            }
        )
        done = dataclasses.replace(
            event, realized_sparsity=realized, layer_sparsity=layer, rewound=rewound
        )
        if trainer is not None:
            metrics: dict[str, float] = {
                "fairprune/sparsity": realized,
                "fairprune/target_sparsity": float(target),
                "fairprune/round": float(round_index + 1),
            }
            metrics.update({f"fairprune/sparsity/{k}": v for k, v in layer.items()})
            log_scalars(trainer, metrics)
        if self.verbose and bool(getattr(trainer, "is_global_zero", True)):
            print(
                f"IterativePruning: round {round_index + 1} at {self.interval} "
                f"{epoch if self.interval == 'epoch' else step}: sparsity {realized:.4f} "
                f"(target {target:.4f})"
            )
        self._announce(trainer, pl_module, "on_pruning_round", done)

    def _announce(
        self, trainer: pl.Trainer | None, pl_module: nn.Module, hook: str, event: PruningEvent
    ) -> None:
        """Call ``hook(trainer, pl_module, event)`` on every other callback that defines it."""
        if trainer is None:
            return
        for callback in list(getattr(trainer, "callbacks", None) or []):
            if callback is self:
                continue
            fn = getattr(callback, hook, None)
            if callable(fn):
                fn(trainer, pl_module, event)

    def compute_masks(
        self,
        trainer: pl.Trainer | None,
        pl_module: nn.Module,
        params: Mapping[str, Tensor],
        target: float,
        round_index: int = 0,
    ) -> dict[str, Tensor]:
        """Scores -> masks for one round, identical on every process (broadcast from rank 0).

        Overridable: a subclass can change how masks are computed while keeping the
        schedule, enforcement, checkpointing and logging.

        Args:
            trainer: the `Trainer` (``None`` outside a fit for criteria without gradients).
            pl_module: the model.
            params: the prunable parameters by name.
            target: cumulative target sparsity.
            round_index: index of the round (seeds the random criterion).

        Returns:
            Bool masks by parameter name, on the parameters' devices.

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
            >>> with torch.no_grad():
            ...     _ = model[0].weight.copy_(torch.tensor([[1.0, -4.0], [3.0, 0.5]]))
            >>> pruning = IterativePruning(0.5)
            >>> params = {"0.weight": model[0].weight}
            >>> pruning.compute_masks(None, model, params, 0.5)["0.weight"]
            tensor([[False,  True],
                    [ True, False]])
        """
        if self.fair:
            masks = self._fair_masks(trainer, pl_module, params, target, round_index)
            return self._agree(trainer, masks, params)
        grads: dict[str, Tensor] | None = None
        decay: float | dict[str, float] = 0.0
        if self.needs_gradients:
            if trainer is None:
                raise ValueError(
                    f"Expected a `trainer` for criterion={self._criterion_name!r} (its "
                    "gradients come from training batches), but got None"
                )
            grads = self._task_gradients(trainer, pl_module, params)
            if self._criterion_name == "undecayed":
                decay = self._weight_decays(trainer, params)
        with torch.no_grad():
            if self.criterion == "magnitude":  # the weights themselves: no score copy
                scores = magnitude_scores(params, copy=False)
            else:
                scores = compute_scores(
                    self.criterion,
                    dict(params),
                    grads=grads,
                    weight_decay=decay,
                    seed=self.seed + round_index,
                )
            del grads
            current = self._masks or None
            if self._sharded:
                scores = self._local_scores(params, scores)
                if self.scope == "global":
                    masks = sharded_global_masks(scores, target, current_masks=current)
                else:
                    masks = sharded_layerwise_masks(scores, target, current_masks=current)
                return masks  # every process selected its own shard of the same global masks
            if self.scope == "global":
                masks = global_masks(scores, target, current_masks=current)
            else:
                masks = layerwise_masks(scores, target, current_masks=current)
            del scores
        return self._agree(trainer, masks, params)

    @staticmethod
    def _agree(
        trainer: pl.Trainer | None, masks: dict[str, Tensor], params: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Rank 0's masks on every process (identical masks whatever the local data)."""
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        if world > 1 and trainer is not None:
            cpu_masks = {k: v.detach().cpu() for k, v in masks.items()}
            cpu_masks = trainer.strategy.broadcast(cpu_masks, src=0)
            masks = {k: v.to(params[k].device) for k, v in cpu_masks.items()}
        return masks

    def _fair_masks(
        self,
        trainer: pl.Trainer | None,
        pl_module: nn.Module,
        params: Mapping[str, Tensor],
        target: float,
        round_index: int,
    ) -> dict[str, Tensor]:
        """Masks of a fairness-aware criterion from per-group statistics on the group data.

        The statistics (per-group gradient sums and diagonal curvature) are sums over samples,
        all-reduced across processes, so every process computes the same masks. They are
        measured in eval mode inside `lightning_fairprune.measure.isolated` (module modes,
        buffers, RNG and loader generators restored).
        """
        self._check_sharding_support()
        stats = self._group_statistics(trainer, pl_module, params, self.seed + round_index)
        with torch.no_grad():
            return fair_masks(
                self._criterion_name,
                params,
                stats,
                target,
                current_masks=self._masks or None,
                scope=self.scope,
                **self.criterion_options,
            )

    def _group_data(self, trainer: pl.Trainer | None) -> FairnessData:
        """``group_data``, else the whole training dataloader with groups = classes."""
        if self.group_data is not None:
            return self.group_data
        loader = getattr(trainer, "train_dataloader", None)
        if loader is None or isinstance(loader, (Mapping, list, tuple)):
            raise ValueError(
                f"Expected `group_data` for criterion={self._criterion_name!r}, or one training "
                f"dataloader to derive it from (groups = classes), but got "
                f"{'none' if loader is None else type(loader).__name__}: pass "
                "`group_data=FairnessData(loader, num_groups=...)`"
            )
        return FairnessData(loader)

    def _group_statistics(
        self,
        trainer: pl.Trainer | None,
        pl_module: nn.Module,
        params: Mapping[str, Tensor],
        seed: int,
        dry_run: bool = False,
    ) -> GroupStatistics:
        """Per-group statistics on the group data (``dry_run``: its first batch, local only)."""
        data = self._group_data(trainer)
        loaders = [data.dataloader] if data.dataloader is not None else []
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        reduce_fn = None
        if world > 1 and trainer is not None and not dry_run:
            strategy = trainer.strategy

            def reduce_fn(t: Tensor) -> Tensor:
                return strategy.reduce(t, reduce_op="sum")

        with isolated(pl_module, mode="eval", loaders=loaders):
            batches: Any = data.batches(trainer, pl_module)
            num_groups = data.num_groups
            if num_groups is None or dry_run:  # the classes: from the logits of one batch
                owner = f"criterion={self._criterion_name!r}"
                num_groups = data.resolve_groups(pl_module, batches, owner).num_groups
            if dry_run:
                batches = [batches.first()]
            stats = group_statistics(
                pl_module,
                batches,
                num_groups,
                params=dict(params),
                curvature=self.curvature,
                seed=seed,
                reduce_fn=reduce_fn,
            )
        return stats

    def _fair_dry_run(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Before the first step, find what would fail at the first round of a fair criterion.

        Runs the statistics pass on one batch (model outputs, number of groups) and checks the
        criterion's options against the number of groups, then scans the whole ``group_data``
        (`FairnessData.scan`: every batch's ids, non-finite inputs, empty groups); every step
        isolated from training, every process reaching the same verdict.
        """
        data, owner = self.group_data, "IterativePruning's `group_data`"
        error: ValueError | None = None
        try:
            params = self._params(pl_module)
            stats = self._group_statistics(trainer, pl_module, params, self.seed, dry_run=True)
            check_fair_options(self._criterion_name, self.criterion_options, stats.num_groups)
        except ValueError as err:
            error = err
            if data is None:
                error = ValueError(
                    f"IterativePruning(criterion={self._criterion_name!r}) derives its group "
                    f"data from the training dataloader (groups = classes): {err}. Pass "
                    "`group_data=FairnessData(loader, num_groups=...)` for batches with a "
                    "protected attribute."
                )
        agree(trainer, pl_module, error, owner)  # one process's bad batch: raise on all
        if data is not None:
            data.scan(trainer, pl_module, num_groups=stats.num_groups, owner=owner)
            data.reset()

    # ------------------------------------------------------------------ gradients
    def _task_gradients(
        self, trainer: pl.Trainer, pl_module: nn.Module, params: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Mean task-loss gradient over ``gradient_batches`` training batches.

        The pass runs ``training_step`` in the modes the modules train in (a module the user
        froze in eval mode stays so), on batches converted as in training (precision plugin,
        device), inside `lightning_fairprune.measure.isolated`: module modes, buffers
        (BatchNorm statistics), ``.grad``, ``requires_grad`` and RNG states are restored
        afterwards. Selected parameters that are frozen (``requires_grad=False``) get a
        gradient for this pass only.

        Raises:
            RuntimeError: without a training dataloader, when it yields no batch, when
                ``training_step`` returns no loss, or when a selected parameter receives no
                gradient at all (it is not used by ``training_step``): its score would be 0 and
                it would be pruned first.
        """
        loader = getattr(trainer, "train_dataloader", None)
        if loader is None:
            raise RuntimeError(
                f"IterativePruning: criterion={self._criterion_name!r} needs "
                "`trainer.train_dataloader`, which is not available yet; prune from a training "
                "hook (the default schedule does) or use a criterion without gradients"
            )
        if isinstance(loader, (Mapping, list, tuple)):
            from lightning.pytorch.utilities.combined_loader import CombinedLoader

            combined = CombinedLoader(loader, "max_size_cycle")
            iterable: Any = (item[0] for item in combined)
            loaders: list[Any] = list(combined.flattened)
        else:
            iterable = loader
            loaders = [loader]
        strategy = trainer.strategy
        precision = getattr(strategy, "precision_plugin", None)
        no_sync = getattr(getattr(strategy, "model", None), "no_sync", None)
        grads = task_gradients(
            pl_module,
            iterable,
            params,
            step_fn=pl_module.training_step,  # type: ignore[arg-type]
            num_batches=self.gradient_batches,
            prepare=lambda batch: prepare_batch(batch, trainer, transfer_hooks=True),
            context=lambda: precision_context(trainer, autocast=True),
            scaler=getattr(precision, "scaler", None),
            loaders=loaders,
            no_sync=no_sync if callable(no_sync) else None,
            owner=f"IterativePruning (criterion={self._criterion_name!r})",
        )
        if int(getattr(trainer, "world_size", 1) or 1) > 1 and not self._sharded:
            # (sharded gradients are already averaged over the processes by FSDP's backward)
            grads = {k: strategy.reduce(v, reduce_op="mean") for k, v in grads.items()}
        return grads

    def _weight_decays(self, trainer: pl.Trainer, params: Mapping[str, Tensor]) -> dict[str, float]:
        """ε per parameter: the ``weight_decay`` argument, else the optimizer's param group."""
        if self.weight_decay is not None:
            return dict.fromkeys(params, self.weight_decay)
        by_id = {id(p): name for name, p in params.items()}
        decays = dict.fromkeys(params, 0.0)
        for optimizer in list(getattr(trainer, "optimizers", None) or []):
            for group in optimizer.param_groups:
                value = float(group.get("weight_decay", 0.0) or 0.0)
                for p in group["params"]:
                    name = by_id.get(id(p))
                    if name is not None:
                        decays[name] = value
        if not any(decays.values()) and not self._warned_decay:
            self._warned_decay = True
            warnings.warn(
                "IterativePruning: criterion='undecayed' found no weight decay in the "
                "optimizers and `weight_decay` was not given; with ε = 0 the undecayed "
                "criterion equals the gradient criterion abs(θ·g). Pass `weight_decay=` to set ε.",
                UserWarning,
                stacklevel=2,
            )
        return decays

    # ------------------------------------------------------------------ masks and enforcement
    def _set_masks(self, pl_module: nn.Module, masks: Mapping[str, Tensor], source: str) -> None:
        """Validate, store and apply masks (they only shrink the kept set)."""
        params = self._params(pl_module)
        self._sharded = is_sharded(params)
        targets = {k: local_tensor(p) for k, p in params.items()} if self._sharded else params
        self._check_fit(masks, targets, source)
        new = {k: masks[k].to(device=targets[k].device, dtype=torch.bool) for k in params}
        if self._masks:
            new = {k: v & self._masks[k].to(v.device) for k, v in new.items()}
        self._masks = new
        apply_masks(params, self._masks)
        if self._sharded:
            self._count_shards(params)

    @staticmethod
    def _check_fit(masks: Mapping[str, Tensor], targets: Mapping[str, Tensor], source: str) -> None:
        try:
            check_masks_fit(masks, targets)
        except (ValueError, TypeError) as err:
            raise ValueError(f"IterativePruning: the {source} do not fit the model: {err}") from err

    def _local_scores(
        self, params: Mapping[str, Tensor], scores: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Scores of sharded parameters as local shards (a full-shape score is cut down)."""
        out: dict[str, Tensor] = {}
        for name, score in scores.items():
            param = params[name]
            if is_sharded(score) or not is_sharded(param):
                out[name] = score
                continue
            spec = shard_spec(param)  # a full-shape score (e.g. random): this shard's part
            local = local_tensor(param)
            flat = score.reshape(-1)[spec.offset : spec.offset + spec.local_numel]
            out[name] = flat.to(local.device).view(local.shape)
        return out

    def _count_shards(self, params: Mapping[str, Tensor]) -> None:
        """Pruned and total weights per parameter over all shards (one all-reduce)."""
        self._global_counts = sharded_counts(self._masks, params)

    def _full_masks(self) -> dict[str, Tensor]:
        """The full (unsharded) masks on the CPU; a collective when the model is sharded."""
        if not self._sharded:
            return {k: v.detach().cpu() for k, v in self._masks.items()}
        assert self._pl_module is not None
        return gather_full_masks(self._masks, self._params(self._pl_module))

    def _layer_sparsity(self) -> dict[str, float]:
        if self._sharded:
            # the same arithmetic as for unsharded masks (bitwise equal values)
            return {k: 1.0 - float(t - z) / t for k, (z, t) in self._global_counts.items()}
        return {k: 1.0 - float(m.sum()) / m.numel() for k, m in self._masks.items()}

    def _ensure_enforcers(
        self, trainer: pl.Trainer, pl_module: nn.Module, force: bool = False
    ) -> None:
        """(Re-)register one `MaskEnforcer` per optimizer holding prunable parameters."""
        if not self._masks:
            return
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        if not optimizers:
            return
        ids = [id(o) for o in optimizers]
        if self._enforcers and ids == self._enforced_optimizers:
            if force:  # same optimizers, new masks
                for enforcer, names in self._enforcers:
                    enforcer.update({k: self._masks[k] for k in names})
            return
        self._remove_enforcers()
        params = self._params(pl_module)
        for optimizer in optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = {k: p for k, p in params.items() if id(p) in held}
            if mine:
                masks = {k: self._masks[k] for k in mine}
                self._enforcers.append((MaskEnforcer(optimizer, mine, masks), list(mine)))
        self._enforced_optimizers = ids

    def _remove_enforcers(self) -> None:
        for enforcer, _ in self._enforcers:
            enforcer.remove()
        self._enforcers = []
        self._enforced_optimizers = []

    # ------------------------------------------------------------------ rewinding
    def _capture_rewind(self, pl_module: nn.Module) -> None:
        # sharded parameters: the local shards (no gather), like the masks
        params = self._params(pl_module)
        self._rewind_weights = {k: local_tensor(p).detach().clone() for k, p in params.items()}

    def _maybe_capture_rewind(self, pl_module: nn.Module, now: int) -> None:
        if is_int(self.rewind) and self._rewind_weights is None and now == self.rewind:
            self._capture_rewind(pl_module)

    def _rewind(self, params: Mapping[str, Tensor]) -> None:
        assert self._rewind_weights is not None
        with torch.no_grad():
            for name, p in params.items():
                local = local_tensor(p)
                local.copy_(self._rewind_weights[name].to(local.device))
        apply_masks(params, self._masks)

    # ------------------------------------------------------------------ the end
    def make_pruning_permanent(self, pl_module: nn.Module | None = None) -> None:
        """Stop enforcing the masks and release masks and rewind weights.

        The pruned weights are already exactly zero and stay so until the next optimizer
        step; nothing in the model refers to the callback afterwards.

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
        self._remove_enforcers()
        if pl_module is not None and self._masks:
            apply_masks(self._params(pl_module), self._masks)
        self._masks = {}
        self._rewind_weights = None

    def export_masks(self, path: str | Path) -> None:
        """Save the masks with ``torch.save`` (loadable with ``weights_only=True``).

        The file holds the full masks (one bool tensor per parameter). With sharded (FSDP2)
        parameters, call it on every process: the shards are gathered and the first process
        writes the file.

        Args:
            path: destination file.

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
        if not self._masks:
            raise ValueError("Expected masks to export, but no pruning round has run yet")
        if not self._sharded:
            save_masks({k: v.detach().cpu() for k, v in self._masks.items()}, path)
            return
        full = self._full_masks()  # sharded: call on every process; the first one writes
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            save_masks(full, path)

    def import_masks(self, path: str | Path, pl_module: nn.Module | None = None) -> None:
        """Load masks saved by `export_masks` and apply them (now, or at setup).

        Imported masks are the starting point of the schedule: later rounds prune further.

        Args:
            path: file written by `export_masks` (or `save_masks`).
            pl_module: the model; without it the masks are applied at ``setup``.

        Raises:
            ValueError: if the masks do not fit the selected parameters.
        """
        masks = load_masks(path)  # the full form; cut to the local shards when sharded
        if pl_module is None and self._pl_module is None:
            self._pending_masks = masks
            return
        module = pl_module if pl_module is not None else self._pl_module
        assert module is not None
        if self._fqns is None:
            self._setup_module(module)
        source = "imported masks"
        self._set_masks(module, self._localize(module, masks, source), source=source)

    def _localize(
        self, pl_module: nn.Module, masks: Mapping[str, Tensor], source: str
    ) -> dict[str, Tensor]:
        """Full masks -> local-shard masks for sharded parameters (unchanged otherwise).

        Sharded, the masks are checked against the full shapes, so every process accepts or
        refuses them alike (a check of the local shapes could pass on the process whose
        shard is the whole tensor and fail on the others, which would then miss the
        collectives that follow).
        """
        params = self._params(pl_module)
        if not is_sharded(params):
            return dict(masks)
        self._check_fit(masks, params, source)  # DTensor shapes are the full shapes
        return shard_full_masks(masks, params)

    def sparsity_report(self, pl_module: nn.Module | None = None) -> dict[str, Any]:
        """Per-layer and overall sparsity of the pruned model (see `masks.sparsity_report`).

        Args:
            pl_module: the model (default: the one seen at setup / the last round).

        Returns:
            The report dict of :func:`lightning_fairprune.pruning.masks.sparsity_report`.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            >>> pruning = IterativePruning(0.5)
            >>> pruning.prune_now(None, model)
            >>> pruning.sparsity_report()["sparsity"]
            0.5
        """
        module = pl_module if pl_module is not None else self._pl_module
        if module is None:
            raise ValueError("Expected `pl_module` (the callback has not seen a model yet)")
        params = self._params(module)
        masks = self._masks or {k: p.detach() != 0 for k, p in params.items()}
        return _sparsity_report(module, masks)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            **self.plan.state_dict(),
            "manual_rounds": self._manual_rounds,
            **self._masks_state(),
            "rewind_weights": self._rewind_state(),
            "history": [dict(h) for h in self._history],
        }

    def _rewind_state(self) -> dict[str, Tensor] | None:
        """The rewind weights in full form on the CPU (sharded: gathered one tensor at a time).

        Like the masks, the entry is the same on every process and restores on any world
        size; under sharding it costs one full copy of the pruned weights in CPU memory.
        """
        if self._rewind_weights is None:
            return None
        if not self._sharded:
            return {k: v.detach().cpu() for k, v in self._rewind_weights.items()}
        assert self._pl_module is not None
        return gather_full_tensors(self._rewind_weights, self._params(self._pl_module))

    def _masks_state(self) -> dict[str, Any]:
        """The masks' checkpoint entries: ``masks`` (bool), or ``packed_masks`` when sharded.

        For sharded parameters the full masks are packed 1 bit per weight
        (``{name: {"bits": uint8, "shape": [...]}}``), the same on every process, so full and
        distributed checkpoints both restore on any world size.
        """
        if not self._sharded:
            return {"masks": {k: v.detach().cpu() for k, v in self._masks.items()}}
        full = self._full_masks()
        return {
            "masks": {},
            "packed_masks": {
                k: {"bits": pack_mask(v.reshape(-1)), "shape": list(v.shape)}
                for k, v in full.items()
            },
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls this before `load_state_dict`: if the checkpoint holds this callback's
        # state under another key (one written by an earlier version, whose key included the
        # schedule and the target), take the one entry of an IterativePruning that no other
        # callback of the trainer claims.
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        claimed = {cb.state_key for cb in getattr(trainer, "callbacks", None) or []}
        candidates = [
            key
            for key in states
            if isinstance(key, str) and key.startswith(type(self).__name__) and key not in claimed
        ]
        if len(candidates) == 1:
            states[self.state_key] = states[candidates[0]]
        elif len(candidates) > 1:
            warnings.warn(
                f"IterativePruning: the checkpoint holds {len(candidates)} pruning states "
                f"({candidates}) and none under this callback's key {self.state_key!r}; its "
                "state is not restored. Give each pruning callback the `name` it had.",
                UserWarning,
                stacklevel=2,
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._pl_module is None:  # before setup: apply when the model is known
            self._pending_state = dict(state_dict)
            return
        masks = state_dict.get("masks") or {}
        packed = state_dict.get("packed_masks") or {}
        if packed and not masks:
            masks = {
                k: unpack_mask(v["bits"], math.prod(v["shape"])).view(v["shape"])
                for k, v in packed.items()
            }
        if masks:
            self._masks = {}
            source = "checkpoint masks"
            masks = self._localize(self._pl_module, masks, source)
            self._set_masks(self._pl_module, masks, source=source)
        else:
            self._masks = {}
        rewind = state_dict.get("rewind_weights")
        if rewind is not None:
            params = self._params(self._pl_module)
            try:
                if is_sharded(params):  # the full form, cut to this process's shards
                    if set(rewind) != set(params):
                        raise ValueError(
                            f"Expected rewind weights for {sorted(params)}, but got "
                            f"{sorted(rewind)}"
                        )
                    self._rewind_weights = shard_full_tensors(rewind, params)
                else:
                    check_masks_fit(
                        {k: torch.ones_like(v, dtype=torch.bool) for k, v in rewind.items()},
                        params,
                    )
                    self._rewind_weights = {k: rewind[k].to(params[k].device) for k in params}
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"IterativePruning: the checkpoint rewind weights do not fit the model: {err}"
                ) from err
        self._manual_rounds = int(state_dict.get("manual_rounds", 0))
        self._history = [dict(h) for h in state_dict.get("history", [])]
        self.plan.load_state_dict(state_dict)
