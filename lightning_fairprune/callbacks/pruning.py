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
  round (:mod:`lightning_fairprune.pruning.events`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_fairprune.callbacks.events import PruningEvent
from lightning_fairprune.logging import log_scalars
from lightning_fairprune.pruning.criteria import NEEDS_GRADIENTS, compute_scores, magnitude_scores
from lightning_fairprune.pruning.masks import (
    MaskEnforcer,
    apply_masks,
    check_masks_fit,
    global_masks,
    layerwise_masks,
    load_masks,
    save_masks,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.pruning.masks import sparsity_report as _sparsity_report
from lightning_fairprune.pruning.selection import select_parameters
from lightning_fairprune.schedules import (
    SCHEDULES,
    check_sparsity_sequence,
    compression_ratio_to_sparsity,
    geometric_values_from_rate,
    schedule_values,
)

__all__ = ["IterativePruning"]

_CRITERIA = ("magnitude", "gradient", "undecayed", "random")
_SCOPES = ("global", "layerwise")
_INTERVALS = ("epoch", "step")
_STATE_VERSION = 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(value: object, name: str, minimum: int) -> int:
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value!r}")
    return int(value)  # type: ignore[arg-type]


def _check_sparsity_arg(value: object, name: str) -> float:
    if not _is_real(value) or not math.isfinite(value) or not 0.0 <= value < 1.0:  # type: ignore[arg-type]
        raise ValueError(f"Expected `{name}` to be a float in [0, 1), but got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_names(value: object, name: str) -> list[str] | None:
    """Normalize an optional list of type names / patterns to a list of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, type):
        return [value.__name__]
    if isinstance(value, Sequence):
        out: list[str] = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, type):
                out.append(item.__name__)
            else:
                raise TypeError(
                    f"Expected `{name}` to be a list of strings (class names or glob patterns), "
                    f"but it contains {item!r} of type {type(item).__name__}"
                )
        return out
    raise TypeError(
        f"Expected `{name}` to be a string or a list of strings, but got {value!r} "
        f"of type {type(value).__name__}"
    )


def _callable_name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", type(fn).__name__))


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """Return the torch generators a DataLoader draws from, to restore them afterwards."""
    found: list[torch.Generator] = []
    candidates = [
        loader,
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]
    for obj in candidates:
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextlib.contextmanager
def _quiet_logging(pl_module: nn.Module) -> Iterator[None]:
    """Turn ``self.log`` / ``self.log_dict`` of a LightningModule into no-ops temporarily."""

    def _noop(*args: Any, **kwargs: Any) -> None:
        return None

    patched = []
    for name in ("log", "log_dict"):
        if name not in pl_module.__dict__:
            object.__setattr__(pl_module, name, _noop)
            patched.append(name)
    try:
        yield
    finally:
        for name in patched:
            pl_module.__dict__.pop(name, None)


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
            round), ``"linear"``, ``"cubic"`` (Zhu & Gupta), or a callable
            ``fn(t) -> cumulative sparsity`` evaluated at each event point ``t`` (an epoch or
            a step, in ``interval`` units); it must stay in ``[0, 1)`` and never decrease.
        initial_sparsity: sparsity at progress 0 of a named schedule (the first round prunes
            to ``schedule(1 / n)``).
        num_rounds: number of rounds. Default: 1 for ``"one_shot"``; derived from ``rate`` for
            ``"geometric"`` with a rate; else ``(end - start) // frequency + 1``; a callable
            schedule without ``end`` or ``num_rounds`` runs every ``frequency`` until training
            stops.
        rate: only for ``"geometric"``: fraction of the remaining weights removed per round
            (lottery-ticket style, e.g. 0.2); it determines the number of rounds.
        interval: ``"epoch"`` or ``"step"`` (optimizer steps, i.e. ``trainer.global_step``).
        start: first event point (epoch index or optimizer-step count).
        end: last allowed event point (inclusive), or ``None``.
        frequency: distance between event points, ``>= 1``.
        criterion: ``"magnitude"`` (abs(θ)), ``"gradient"`` (abs(θ·g)), ``"undecayed"``
            (abs(-θ·g + ε·θ²)), ``"random"`` (seeded) or a callable
            ``fn(params, grads) -> scores`` (dicts keyed by parameter name).
        scope: ``"global"`` (one threshold over all prunable weights) or ``"layerwise"``
            (every parameter reaches the target sparsity on its own).
        gradient_batches: number of training batches whose mean task-loss gradient the
            gradient-based criteria use (train mode, current weights).
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
        schedule: str | Callable[[int], float] = "one_shot",
        initial_sparsity: float = 0.0,
        num_rounds: int | None = None,
        rate: float | None = None,
        interval: str = "epoch",
        start: int = 0,
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
    ) -> None:
        super().__init__()
        # ---- schedule ----------------------------------------------------------------------
        if isinstance(schedule, str):
            key = schedule.strip().lower().replace("-", "_")
            if key not in SCHEDULES:
                raise ValueError(
                    f"Expected `schedule` to be one of {sorted(SCHEDULES)} or a callable "
                    f"epoch-or-step -> cumulative sparsity, but got {schedule!r}"
                )
            self._schedule_name = key
            self._schedule_fn: Callable[[int], float] | None = None
        elif callable(schedule):
            self._schedule_name = _callable_name(schedule)
            self._schedule_fn = schedule
        else:
            raise TypeError(
                f"Expected `schedule` to be a string in {sorted(SCHEDULES)} or a callable, "
                f"but got {schedule!r} of type {type(schedule).__name__}"
            )
        self.schedule = schedule

        if self._schedule_fn is not None:
            if final_sparsity is not None or compression_ratio is not None:
                raise ValueError(
                    "Expected neither `final_sparsity` nor `compression_ratio` with a callable "
                    "`schedule` (the callable returns the cumulative sparsity), but got "
                    f"final_sparsity={final_sparsity!r}, compression_ratio={compression_ratio!r}"
                )
        elif (final_sparsity is None) == (compression_ratio is None):
            raise ValueError(
                "Expected exactly one of `final_sparsity` and `compression_ratio`, but got "
                f"final_sparsity={final_sparsity!r}, compression_ratio={compression_ratio!r}"
            )
        if final_sparsity is not None:
            final_sparsity = _check_sparsity_arg(final_sparsity, "final_sparsity")
        if compression_ratio is not None and (
            not _is_real(compression_ratio)
            or not math.isfinite(compression_ratio)
            or compression_ratio < 1.0
        ):
            raise ValueError(
                f"Expected `compression_ratio` to be a finite float >= 1, but got "
                f"{compression_ratio!r}"
            )
        self.final_sparsity = final_sparsity
        self.compression_ratio = None if compression_ratio is None else float(compression_ratio)
        self.initial_sparsity = _check_sparsity_arg(initial_sparsity, "initial_sparsity")
        if final_sparsity is not None and self.initial_sparsity > final_sparsity:
            raise ValueError(
                f"Expected `initial_sparsity` to be at most `final_sparsity` ({final_sparsity}), "
                f"but got {initial_sparsity!r}"
            )

        # ---- timing ------------------------------------------------------------------------
        if interval not in _INTERVALS:
            raise ValueError(f"Expected `interval` to be one of {_INTERVALS}, but got {interval!r}")
        self.interval = interval
        self.start = _check_int(start, "start", 0)
        self.frequency = _check_int(frequency, "frequency", 1)
        if end is not None:
            end = _check_int(end, "end", 0)
            if end < self.start:
                raise ValueError(
                    f"Expected `end` to be None or an int >= `start` ({self.start}), "
                    f"but got {end!r}"
                )
        self.end = end
        if num_rounds is not None:
            num_rounds = _check_int(num_rounds, "num_rounds", 1)
        if rate is not None:
            if self._schedule_name != "geometric":
                raise ValueError(
                    f"Expected `rate` only with schedule='geometric', but got rate={rate!r} "
                    f"with schedule={self._schedule_name!r}"
                )
            if not _is_real(rate) or not 0.0 < rate < 1.0:
                raise ValueError(f"Expected `rate` to be a float in (0, 1), but got {rate!r}")
            if num_rounds is not None:
                raise ValueError(
                    "Expected at most one of `rate` and `num_rounds` (the rate determines the "
                    f"number of rounds), but got rate={rate!r}, num_rounds={num_rounds!r}"
                )
            rate = float(rate)
        self.rate = rate
        if self._schedule_name == "one_shot" and num_rounds not in (None, 1):
            raise ValueError(
                f"Expected `num_rounds` to be None or 1 with schedule='one_shot', but got "
                f"{num_rounds!r}"
            )
        if (
            num_rounds is None
            and end is None
            and rate is None
            and self._schedule_name in ("linear", "cubic", "geometric")
        ):
            raise ValueError(
                f"Expected `num_rounds`, `end` (or `rate` for 'geometric') with "
                f"schedule={self._schedule_name!r}, but got none of them"
            )
        if num_rounds is not None and end is not None:
            last = self.start + (num_rounds - 1) * self.frequency
            if last > end:
                raise ValueError(
                    f"Expected `num_rounds` rounds from `start`={self.start} every "
                    f"`frequency`={self.frequency} to end by `end`={end}, but got "
                    f"num_rounds={num_rounds} (last round at {last})"
                )
        self._num_rounds_arg = num_rounds

        # ---- criterion ---------------------------------------------------------------------
        if isinstance(criterion, str):
            if criterion not in _CRITERIA:
                raise ValueError(
                    f"Expected `criterion` to be one of {_CRITERIA} or a callable, but got "
                    f"{criterion!r}"
                )
            self._criterion_name = criterion
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
        self.needs_gradients = uses_grads
        if scope not in _SCOPES:
            raise ValueError(f"Expected `scope` to be one of {_SCOPES}, but got {scope!r}")
        self.scope = scope
        self.gradient_batches = _check_int(gradient_batches, "gradient_batches", 1)
        if weight_decay is not None and (
            not _is_real(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0
        ):
            raise ValueError(
                f"Expected `weight_decay` to be None or a float >= 0, but got {weight_decay!r}"
            )
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.seed = _check_int(seed, "seed", 0)

        # ---- selection ---------------------------------------------------------------------
        self.selection: dict[str, Any] = {
            "include_types": _check_names(include_types, "include_types"),
            "exclude_types": _check_names(exclude_types, "exclude_types"),
            "include_names": _check_names(include_names, "include_names"),
            "exclude_names": _check_names(exclude_names, "exclude_names"),
            "prune_classifier": bool(prune_classifier),
            "prune_bias": bool(prune_bias),
            "prune_norm": bool(prune_norm),
        }

        # ---- rewinding and the end ---------------------------------------------------------
        if rewind is not None and rewind != "init":
            if not _is_int(rewind) or rewind < 0:
                raise ValueError(
                    f"Expected `rewind` to be None, 'init' or an int >= 0 (an {interval} index), "
                    f"but got {rewind!r}"
                )
            if rewind > self.start:
                raise ValueError(
                    f"Expected `rewind` to be at most `start` ({self.start}): the weights must "
                    f"be stored before the first round, but got {rewind!r}"
                )
        self.rewind = rewind
        self.make_permanent = bool(make_permanent)
        self.verbose = bool(verbose)

        # ---- resolved at setup -------------------------------------------------------------
        self._final: float | None = final_sparsity
        self._targets: list[float] | None = None
        self._resolve_targets()
        self._fqns: list[str] | None = None
        self._pl_module: nn.Module | None = None

        # ---- state (checkpointed) ----------------------------------------------------------
        self._masks: dict[str, Tensor] = {}
        self._rounds_done = 0
        self._manual_rounds = 0
        self._last_target = 0.0
        self._rewind_weights: dict[str, Tensor] | None = None
        self._history: list[dict[str, Any]] = []
        self._pending_state: dict[str, Any] | None = None
        self._pending_masks: dict[str, Tensor] | None = None

        self._enforcers: list[tuple[MaskEnforcer, list[str]]] = []
        self._enforced_optimizers: list[int] = []
        self._warned_decay = False

    # ------------------------------------------------------------------ public properties
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            final_sparsity=self.final_sparsity,
            compression_ratio=self.compression_ratio,
            schedule=self._schedule_name,
            criterion=self._criterion_name,
            scope=self.scope,
            interval=self.interval,
            start=self.start,
            end=self.end,
            frequency=self.frequency,
            num_rounds=self._num_rounds_arg,
            rate=self.rate,
            selection={k: v for k, v in self.selection.items() if v},
        )

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

    @property
    def rounds_done(self) -> int:
        """Number of scheduled rounds run so far (manual ``prune_now(sparsity=...)`` excluded)."""
        return self._rounds_done

    @property
    def num_rounds(self) -> int | None:
        """Number of scheduled rounds.

        ``None`` for an open-ended callable schedule, or before a compression ratio is
        resolved at setup.
        """
        if self._targets is not None:
            return len(self._targets)
        return self._num_rounds_callable()

    @property
    def targets(self) -> list[float] | None:
        """Cumulative target sparsity of each scheduled round (``None`` if not known yet)."""
        return None if self._targets is None else list(self._targets)

    @property
    def event_points(self) -> list[int] | None:
        """Epochs or steps at which the scheduled rounds run (``None`` if open-ended)."""
        n = self.num_rounds
        if n is None:
            return None
        return [self.start + k * self.frequency for k in range(n)]

    @property
    def current_sparsity(self) -> float:
        """Realized fraction of the prunable weights that are pruned (0.0 before any round)."""
        if not self._masks:
            return 0.0
        total = sum(m.numel() for m in self._masks.values())
        kept = sum(int(m.sum()) for m in self._masks.values())
        return (total - kept) / total if total else 0.0

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per round: round, scheduled, epoch, global_step, target, sparsity."""
        return list(self._history)

    # ------------------------------------------------------------------ schedule helpers
    def _num_rounds_callable(self) -> int | None:
        if self._num_rounds_arg is not None:
            return self._num_rounds_arg
        if self._schedule_name == "one_shot":
            return 1
        if self.end is not None:
            return (self.end - self.start) // self.frequency + 1
        return None

    def _resolve_targets(self) -> None:
        """Compute the per-round targets of a named schedule once the final sparsity is known."""
        if self._schedule_fn is not None or self._final is None:
            self._targets = None
            return
        if self.rate is not None:
            targets = geometric_values_from_rate(self.rate, self._final, self.initial_sparsity)
        else:
            n = self._num_rounds_callable()
            if n is None:  # pragma: no cover - excluded by the constructor checks
                raise ValueError("Expected `num_rounds` or `end`")
            targets = schedule_values(self._schedule_name, n, self._final, self.initial_sparsity)
        check_sparsity_sequence(targets, "schedule")
        self._targets = targets

    def _event_point(self, k: int) -> int:
        return self.start + k * self.frequency

    def _target_of_round(self, k: int) -> float:
        """Cumulative target of scheduled round ``k`` (0-based); validates callables."""
        if self._targets is not None:
            return self._targets[k]
        assert self._schedule_fn is not None
        t = self._event_point(k)
        value = self._schedule_fn(t)
        name = f"schedule({t})"
        if not _is_real(value) or not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"Expected the callable `schedule` to return a float in [0, 1), but "
                f"{name} returned {value!r}"
            )
        if value < self._last_target - 1e-12:
            raise ValueError(
                f"Expected the callable `schedule` to be non-decreasing, but {name} returned "
                f"{value!r} after {self._last_target!r} (masks only shrink)"
            )
        return float(value)

    def _due_rounds(self, now: int) -> bool:
        n = self.num_rounds
        if n is not None and self._rounds_done >= n:
            return False
        point = self._event_point(self._rounds_done)
        if self.end is not None and point > self.end:
            return False
        return point <= now

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
        return {name: named[name] for name in self._fqns}

    def _setup_module(self, pl_module: nn.Module) -> None:
        params = self._select(pl_module)
        self._fqns = list(params)
        self._pl_module = pl_module
        if self.compression_ratio is not None:
            total = sum(p.numel() for p in pl_module.parameters())
            prunable = sum(p.numel() for p in params.values())
            self._final = compression_ratio_to_sparsity(self.compression_ratio, total, prunable)
            if self.initial_sparsity > self._final:
                raise ValueError(
                    f"Expected `initial_sparsity` to be at most the sparsity {self._final:.6g} "
                    f"of `compression_ratio`={self.compression_ratio}, but got "
                    f"{self.initial_sparsity!r}"
                )
            self._resolve_targets()
        if self._pending_masks is not None:
            pending, self._pending_masks = self._pending_masks, None
            self._set_masks(pl_module, pending, source="imported masks")
        if self._pending_state is not None:
            pending_state, self._pending_state = self._pending_state, None
            self.load_state_dict(pending_state)

    def _prevalidate_callable(self, trainer: pl.Trainer) -> None:
        """Evaluate a callable schedule at every known event point before training."""
        if self._schedule_fn is None:
            return
        n = self.num_rounds
        if n is None:
            limit = trainer.max_epochs if self.interval == "epoch" else trainer.max_steps
            if limit is None or limit < 0:
                return
            n = max(0, (limit - 1 - self.start) // self.frequency + 1)
        values = [self._schedule_fn(self._event_point(k)) for k in range(n)]
        check_sparsity_sequence(values, "schedule")

    def _warn_incomplete(self, trainer: pl.Trainer) -> None:
        points = self.event_points
        if not points:
            return
        limit = trainer.max_epochs if self.interval == "epoch" else trainer.max_steps
        if limit is None or limit < 0:
            return
        if points[-1] > limit - 1:
            unit = "max_epochs" if self.interval == "epoch" else "max_steps"
            warnings.warn(
                f"IterativePruning: the last of {len(points)} rounds is scheduled at "
                f"{self.interval} {points[-1]}, but the trainer stops at {unit}={limit}; the "
                "schedule will not complete in this fit.",
                UserWarning,
                stacklevel=2,
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._setup_module(pl_module)
        self._prevalidate_callable(trainer)
        self._warn_incomplete(trainer)
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

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rewind == "init" and self._rewind_weights is None:
            self._capture_rewind(pl_module)
        self._ensure_enforcers(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        self._remove_enforcers()
        if self.make_permanent:
            self.make_pruning_permanent(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_enforcers()

    # ------------------------------------------------------------------ rounds
    def _run_due_rounds(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: int) -> None:
        while self._due_rounds(now):
            target = self._target_of_round(self._rounds_done)
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
            if n is not None and self._rounds_done >= n:
                raise ValueError(
                    f"Expected `sparsity` when the schedule is complete ({n} rounds done), but "
                    "got None"
                )
            target = self._target_of_round(self._rounds_done)
            self._prune(trainer, pl_module, target, scheduled=True)
            return
        target = _check_sparsity_arg(sparsity, "sparsity")
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
        round_index = self._rounds_done + self._manual_rounds
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
        )
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

        if scheduled:
            self._rounds_done += 1
        else:
            self._manual_rounds += 1
        self._last_target = max(self._last_target, float(target))
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
            if self.scope == "global":
                masks = global_masks(scores, target, current_masks=current)
            else:
                masks = layerwise_masks(scores, target, current_masks=current)
            del scores
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        if world > 1:
            assert trainer is not None
            cpu_masks = {k: v.detach().cpu() for k, v in masks.items()}
            cpu_masks = trainer.strategy.broadcast(cpu_masks, src=0)
            masks = {k: v.to(params[k].device) for k, v in cpu_masks.items()}
        return masks

    # ------------------------------------------------------------------ gradients
    def _task_gradients(
        self, trainer: pl.Trainer, pl_module: nn.Module, params: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Mean task-loss gradient over ``gradient_batches`` training batches (train mode)."""
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
            generators = [g for sub in combined.flattened for g in _loader_generators(sub)]
        else:
            iterable = loader
            generators = _loader_generators(loader)
        gen_states = [g.get_state() for g in generators]
        all_params = list(pl_module.parameters())
        saved_grads = [p.grad for p in all_params]
        was_training = pl_module.training
        strategy = trainer.strategy
        precision = getattr(strategy, "precision_plugin", None)
        scaler = getattr(precision, "scaler", None)
        wrapped = getattr(strategy, "model", None)
        no_sync = getattr(wrapped, "no_sync", None)
        devices = (
            [torch.cuda.current_device()]
            if torch.cuda.is_available() and any(p.is_cuda for p in all_params)
            else []
        )
        grads: dict[str, Tensor] = {}
        count = 0
        try:
            for p in all_params:
                p.grad = None
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.random.fork_rng(devices=devices))
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.enable_grad())
                stack.enter_context(_quiet_logging(pl_module))
                if callable(no_sync):
                    stack.enter_context(no_sync())
                pl_module.train()
                iterator = iter(iterable)
                for batch_idx in range(self.gradient_batches):
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        break
                    batch = strategy.batch_to_device(batch)
                    ctx = precision.forward_context() if precision else contextlib.nullcontext()
                    with ctx:
                        out = pl_module.training_step(batch, batch_idx)  # type: ignore[operator]
                    loss = out.get("loss") if isinstance(out, Mapping) else out
                    if not isinstance(loss, Tensor):
                        raise RuntimeError(
                            "IterativePruning: the gradient-based criterion needs "
                            "`training_step` to return the loss (a tensor or a dict with "
                            f"'loss'), but it returned {type(out).__name__}"
                        )
                    if scaler is not None:
                        scaler.scale(loss.float()).backward()
                    else:
                        loss.float().backward()
                    count += 1
                del iterator
            if count == 0:
                raise RuntimeError("IterativePruning: the training dataloader yielded no batch")
            scale = float(scaler.get_scale()) if scaler is not None else 1.0
            for name, p in params.items():
                g = p.grad
                if g is None:
                    g = torch.zeros_like(p)
                elif count > 1 or scale != 1.0:
                    g = g.div_(count * scale)
                grads[name] = g.detach()
        finally:
            for p, g in zip(all_params, saved_grads, strict=True):
                p.grad = g
            pl_module.train(was_training)
            for gen, state in zip(generators, gen_states, strict=True):
                gen.set_state(state)
        if int(getattr(trainer, "world_size", 1) or 1) > 1:
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
        try:
            check_masks_fit(masks, params)
        except (ValueError, TypeError) as err:
            raise ValueError(f"IterativePruning: the {source} do not fit the model: {err}") from err
        new = {k: masks[k].to(device=params[k].device, dtype=torch.bool) for k in params}
        if self._masks:
            new = {k: v & self._masks[k].to(v.device) for k, v in new.items()}
        self._masks = new
        apply_masks(params, self._masks)

    def _layer_sparsity(self) -> dict[str, float]:
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
        params = self._params(pl_module)
        self._rewind_weights = {k: p.detach().clone() for k, p in params.items()}

    def _maybe_capture_rewind(self, pl_module: nn.Module, now: int) -> None:
        if _is_int(self.rewind) and self._rewind_weights is None and now == self.rewind:
            self._capture_rewind(pl_module)

    def _rewind(self, params: Mapping[str, Tensor]) -> None:
        assert self._rewind_weights is not None
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self._rewind_weights[name].to(p.device))
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
        save_masks({k: v.detach().cpu() for k, v in self._masks.items()}, path)

    def import_masks(self, path: str | Path, pl_module: nn.Module | None = None) -> None:
        """Load masks saved by `export_masks` and apply them (now, or at setup).

        Imported masks are the starting point of the schedule: later rounds prune further.

        Args:
            path: file written by `export_masks` (or `save_masks`).
            pl_module: the model; without it the masks are applied at ``setup``.

        Raises:
            ValueError: if the masks do not fit the selected parameters.
        """
        masks = load_masks(path)
        if pl_module is None and self._pl_module is None:
            self._pending_masks = masks
            return
        module = pl_module if pl_module is not None else self._pl_module
        assert module is not None
        if self._fqns is None:
            self._setup_module(module)
        self._set_masks(module, masks, source="imported masks")

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
            "rounds_done": self._rounds_done,
            "manual_rounds": self._manual_rounds,
            "last_target": self._last_target,
            "final_sparsity": self._final,
            "num_rounds": self.num_rounds,
            "masks": {k: v.detach().cpu() for k, v in self._masks.items()},
            "rewind_weights": None
            if self._rewind_weights is None
            else {k: v.detach().cpu() for k, v in self._rewind_weights.items()},
            "history": [dict(h) for h in self._history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._pl_module is None:  # before setup: apply when the model is known
            self._pending_state = dict(state_dict)
            return
        masks = state_dict.get("masks") or {}
        if masks:
            self._masks = {}
            self._set_masks(self._pl_module, masks, source="checkpoint masks")
        else:
            self._masks = {}
        rewind = state_dict.get("rewind_weights")
        if rewind is not None:
            params = self._params(self._pl_module)
            try:
                check_masks_fit(
                    {k: torch.ones_like(v, dtype=torch.bool) for k, v in rewind.items()}, params
                )
            except (ValueError, TypeError) as err:
                raise ValueError(
                    f"IterativePruning: the checkpoint rewind weights do not fit the model: {err}"
                ) from err
            self._rewind_weights = {k: rewind[k].to(params[k].device) for k in params}
        self._rounds_done = int(state_dict.get("rounds_done", 0))
        self._manual_rounds = int(state_dict.get("manual_rounds", 0))
        self._last_target = float(state_dict.get("last_target", 0.0))
        self._history = [dict(h) for h in state_dict.get("history", [])]
        saved_final = state_dict.get("final_sparsity")
        if (
            saved_final is not None
            and self._final is not None
            and abs(float(saved_final) - self._final) > 1e-9
        ):
            warnings.warn(
                f"IterativePruning: the checkpoint was written with final sparsity "
                f"{saved_final}, this callback targets {self._final}; continuing with the new "
                "target from the saved schedule position.",
                UserWarning,
                stacklevel=2,
            )
