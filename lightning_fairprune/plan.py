"""`RoundPlan`: when the pruning rounds run and to which cumulative sparsity.

The *scheduler* half of pruning (``torch.ao.pruning``'s sparsifier/scheduler split): the
schedule functions of :mod:`lightning_fairprune.schedules` give the targets, the plan knows
the event point (epoch or optimizer step) of every round, which rounds are due, fits itself to
the length of the run, and keeps its position as plain values for checkpoints. No weights,
no Lightning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from lightning_fairprune.checks import (
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_sparsity,
    is_int,
    is_real,
)
from lightning_fairprune.schedules import (
    SCHEDULES,
    check_sparsity_sequence,
    compression_ratio_to_sparsity,
    geometric_values_from_rate,
    schedule_values,
)

__all__ = ["INTERVALS", "RoundPlan"]

_TOL = 1e-12

INTERVALS: tuple[str, ...] = ("epoch", "step")
"""Units of event points: training epochs or optimizer steps."""

_GRADUAL = ("linear", "cubic", "geometric")


def _schedule_key(schedule: object) -> str:
    key = str(schedule).strip().lower().replace("-", "_")
    if key not in SCHEDULES:
        raise ValueError(
            f"Expected `schedule` to be one of {sorted(SCHEDULES)}, None or a callable "
            f"epoch-or-step -> cumulative sparsity, but got {schedule!r}"
        )
    return key


def _callable_name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", type(fn).__name__))


class RoundPlan:
    """When the pruning rounds run and to which cumulative sparsity: the schedule's state.

    The plan is the *scheduler* half of pruning (in the spirit of ``torch.ao.pruning``'s
    sparsifier/scheduler split): it validates the schedule arguments, knows the target of every
    round and the event point (epoch or optimizer step) at which it runs, says which rounds are
    due now, and keeps its position (``rounds_done``, ``last_target``) as plain values for
    checkpoints. It knows nothing about weights or Lightning.

    Round ``k`` of ``n`` (``k = 1..n``) runs at event point ``start + (k - 1) * frequency``
    with the cumulative target ``schedule(k / n)``.

    Args:
        final_sparsity: cumulative sparsity after the last round, in ``[0, 1)``. Exactly one of
            this and ``compression_ratio`` (neither with a callable ``schedule``).
        compression_ratio: whole-model compression ``t >= 1``; converted by
            `resolve_compression` once the parameter counts are known.
        schedule: ``"one_shot"``, ``"geometric"``, ``"linear"``, ``"cubic"``, a callable
            ``fn(event_point) -> cumulative sparsity``, or ``None`` (default): ``"one_shot"``
            for a single round, ``"geometric"`` (the same fraction of the remaining weights
            every round, as in iterative magnitude pruning) when ``num_rounds > 1``, ``end``
            or ``rate`` asks for several rounds.
        initial_sparsity: sparsity at progress 0 of a named schedule.
        num_rounds: number of rounds. Without it (and without ``end``/``rate``) a gradual
            schedule spreads its rounds over the training run: see `resolve_horizon`.
        rate: only for ``"geometric"``: fraction of the remaining weights per round.
        interval: ``"epoch"`` or ``"step"`` (optimizer steps).
        start: first event point; ``None``: after one epoch of training (epoch 1, or for
            ``interval="step"`` the optimizer steps of one epoch, set by `resolve_start` once
            the training loader is known), so that the first round prunes a trained model;
            0 when ``pretrained``.
        pretrained: the model is trained before the first event point (loaded weights): a
            first round before any optimizer step is deliberate (`warn_untrained` is silent)
            and ``start`` defaults to 0.
        end: last allowed event point (inclusive), or ``None``.
        frequency: distance between event points, ``>= 1``.
        tail_fraction: fraction of the run after ``start`` kept free of rounds for
            fine-tuning when the rounds are spread over the run (default 0.25).

    Example:
        >>> plan = RoundPlan(0.9, schedule="geometric", num_rounds=3, start=1)
        >>> plan.event_points, [round(s, 3) for s in plan.targets]
        ([1, 2, 3], [0.536, 0.785, 0.9])
        >>> plan.due(now=1), plan.due(now=0)
        (True, False)
        >>> plan.record_round(plan.target(0)); plan.rounds_done
        1
        >>> RoundPlan(0.8, num_rounds=4).schedule_name  # several rounds: geometric by default
        'geometric'
        >>> spread = RoundPlan(0.8, schedule="cubic")  # no num_rounds: spread over the run
        >>> spread.needs_horizon
        True
        >>> spread.resolve_horizon(10); spread.event_points
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> RoundPlan(0.5, start=None).start  # after one epoch of training
        1
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
        start: int | None = 0,
        end: int | None = None,
        frequency: int = 1,
        tail_fraction: float = 0.25,
        pretrained: bool = False,
    ) -> None:
        self.interval = check_choice(interval, "interval", INTERVALS)
        self.pretrained = check_bool(pretrained, "pretrained")
        self.start_arg = check_int(start, "start", 0, allow_none=True)
        self.start: int | None = self.start_arg
        if start is None and (self.pretrained or self.interval == "epoch"):
            self.start = 0 if self.pretrained else 1  # else: after one epoch of training
        self.frequency = check_int(frequency, "frequency", 1)
        if end is not None and not is_int(end):
            raise ValueError(f"Expected `end` to be None or an int >= `start`, but got {end!r}")
        self.end = None if end is None else int(end)
        self.num_rounds_arg = check_int(num_rounds, "num_rounds", 1, allow_none=True)
        self.tail_fraction = check_real(
            tail_fraction, "tail_fraction", low=0.0, high=1.0, high_open=True
        )
        self._init_schedule(schedule, rate)
        self._init_target(final_sparsity, compression_ratio, initial_sparsity)
        self._init_rounds(rate, num_rounds)
        self._horizon_rounds: int | None = None
        self.final: float | None = self.final_sparsity
        self._targets: list[float] | None = None
        self._resolve_targets()
        self.rounds_done = 0
        self.last_target = 0.0

    def _init_schedule(self, schedule: object, rate: float | None) -> None:
        self.schedule_fn: Callable[[int], float] | None = None
        if schedule is None:
            several = (self.num_rounds_arg or 1) > 1 or self.end is not None or rate is not None
            self.schedule_name = "geometric" if several else "one_shot"
        elif isinstance(schedule, str):
            self.schedule_name = _schedule_key(schedule)
        elif callable(schedule):
            self.schedule_name = _callable_name(schedule)
            self.schedule_fn = schedule  # type: ignore[assignment]
        else:
            raise TypeError(
                f"Expected `schedule` to be a string in {sorted(SCHEDULES)}, None or a "
                f"callable, but got {schedule!r} of type {type(schedule).__name__}"
            )
        self.schedule = schedule if schedule is not None else self.schedule_name

    def _init_target(
        self,
        final_sparsity: float | None,
        compression_ratio: float | None,
        initial_sparsity: float,
    ) -> None:
        if self.schedule_fn is not None:
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
        self.final_sparsity = (
            None if final_sparsity is None else check_sparsity(final_sparsity, "final_sparsity")
        )
        self.compression_ratio = (
            None
            if compression_ratio is None
            else check_real(compression_ratio, "compression_ratio", low=1.0)
        )
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.final_sparsity is not None and self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"Expected `initial_sparsity` to be at most `final_sparsity` "
                f"({self.final_sparsity}), but got {initial_sparsity!r}"
            )

    def _init_rounds(self, rate: float | None, num_rounds: int | None) -> None:
        if rate is not None:
            if self.schedule_name != "geometric":
                raise ValueError(
                    f"Expected `rate` only with schedule='geometric', but got rate={rate!r} "
                    f"with schedule={self.schedule_name!r}"
                )
            rate = check_real(rate, "rate", low=0.0, high=1.0, low_open=True, high_open=True)
            if num_rounds is not None:
                raise ValueError(
                    "Expected at most one of `rate` and `num_rounds` (the rate determines the "
                    f"number of rounds), but got rate={rate!r}, num_rounds={num_rounds!r}"
                )
        self.rate = rate
        if self.schedule_name == "one_shot" and num_rounds not in (None, 1):
            raise ValueError(
                f"Expected `num_rounds` to be None or 1 with schedule='one_shot', but got "
                f"{num_rounds!r}; leave `schedule` unset (geometric) or choose a gradual one"
            )
        self._check_end()

    # ---------------------------------------------------------------- resolution
    def _check_end(self) -> None:
        """``end`` against ``start`` and ``num_rounds`` (once ``start`` is known)."""
        if self.end is None or self.start is None:
            return
        if self.end < self.start:
            raise ValueError(
                f"Expected `end` to be None or an int >= `start` ({self.start}), but got "
                f"{self.end!r}"
            )
        if self.num_rounds_arg is not None:
            last = self.start + (self.num_rounds_arg - 1) * self.frequency
            if last > self.end:
                raise ValueError(
                    f"Expected `num_rounds` rounds from `start`={self.start} every "
                    f"`frequency`={self.frequency} to end by `end`={self.end}, but got "
                    f"num_rounds={self.num_rounds_arg} (last round at {last})"
                )

    @property
    def needs_start(self) -> bool:
        """Whether the first event point waits for the length of an epoch (`resolve_start`)."""
        return self.start is None

    def resolve_start(self, batches_per_epoch: float, accumulate: int = 1) -> None:
        """Set the default ``start`` of a step plan: after one epoch of optimizer steps.

        Args:
            batches_per_epoch: training batches in one epoch (``inf``: a loader without length).
            accumulate: batches per optimizer step (the last, partial, cycle also steps).

        Raises:
            ValueError: for a loader without length, or if ``end`` or ``num_rounds`` do not
                fit after that start.

        Example:
            >>> plan = RoundPlan(0.5, interval="step", start=None, num_rounds=2, frequency=5)
            >>> plan.event_points is None
            True
            >>> plan.resolve_start(23, accumulate=2); plan.event_points
            [12, 17]
        """
        if self.start is not None:
            return
        if not math.isfinite(float(batches_per_epoch)):
            raise ValueError(
                "Expected `start` with interval='step' when the training dataloader has no "
                "length (the default start is one epoch of optimizer steps), but got None"
            )
        steps = math.ceil(float(batches_per_epoch) / max(1, int(accumulate)))
        self.start = max(1, steps)
        self._check_end()
        self._resolve_targets()

    @property
    def spread_over_run(self) -> bool:
        """Whether the rounds are spread over the run (a gradual schedule without a count)."""
        return (
            self.schedule_name in _GRADUAL
            and self.num_rounds_arg is None
            and self.end is None
            and self.rate is None
        )

    @property
    def needs_horizon(self) -> bool:
        """Whether the number of rounds waits for the length of the run (`resolve_horizon`)."""
        return self.spread_over_run and self._horizon_rounds is None

    def resolve_horizon(self, horizon: int) -> None:
        """Spread the rounds of a gradual schedule over a run of ``horizon`` event points.

        The rounds run every ``frequency`` from ``start`` up to (not including) the last
        ``tail_fraction`` of the run after ``start``, which is left for fine-tuning: the last
        round is at most ``start + ceil((1 - tail_fraction) * (horizon - start)) - 1``.

        Args:
            horizon: number of event points the run has (``max_epochs`` for epochs, the
                estimated number of optimizer steps for steps).

        Raises:
            ValueError: if the run ends before ``start``.

        Example:
            >>> plan = RoundPlan(0.5, schedule="linear", interval="step", start=10, frequency=5)
            >>> plan.resolve_horizon(50); plan.event_points  # rounds up to step 39
            [10, 15, 20, 25, 30, 35]
        """
        if not self.needs_horizon:
            return
        if self.start is None:
            raise RuntimeError("`resolve_start` must come before `resolve_horizon`")
        horizon = check_int(horizon, "horizon", 1)
        if horizon <= self.start:
            raise ValueError(
                f"Expected the run to last beyond `start`={self.start} {self.interval}s to "
                f"spread the {self.schedule_name!r} rounds over it, but it has {horizon}; set "
                "`num_rounds` or `end`, an earlier `start`, or train longer"
            )
        last = self.start + max(
            0, math.ceil((1.0 - self.tail_fraction) * (horizon - self.start)) - 1
        )
        self._horizon_rounds = (last - self.start) // self.frequency + 1
        self._resolve_targets()

    def run_length(
        self, max_epochs: int | None, max_steps: int | None, estimated_steps: float
    ) -> tuple[int | None, str]:
        """The run's length in event points, and how it was derived (for messages).

        Args:
            max_epochs: the trainer's ``max_epochs`` (``None`` or negative: unlimited).
            max_steps: the trainer's ``max_steps`` (``None`` or negative: unlimited).
            estimated_steps: the optimizer steps the trainer estimates (``inf`` if unknown).

        Example:
            >>> RoundPlan(0.5, interval="step", start=3).run_length(4, -1, 40.0)
            (40, 'the optimizer steps of max_epochs=4')
        """
        if self.interval == "epoch":
            if max_epochs is None or max_epochs < 0:
                return None, "max_epochs"
            return int(max_epochs), "max_epochs"
        no_max_steps = max_steps is None or max_steps < 0
        if math.isfinite(estimated_steps) and (no_max_steps or estimated_steps < max_steps):
            return int(estimated_steps), f"the optimizer steps of max_epochs={max_epochs}"
        if not no_max_steps:
            return int(max_steps), "max_steps"  # type: ignore[arg-type]
        return None, "max_steps"

    def fit_to_run(
        self,
        *,
        max_epochs: int | None,
        max_steps: int | None,
        estimated_steps: float,
        batches_per_epoch: float,
        accumulate: int = 1,
    ) -> None:
        """Fit the plan to a run: default start, rounds spread, callables checked, warnings.

        Raises:
            ValueError: a spread schedule without a finite run, or a callable schedule that
                returns bad values within the run.

        Example:
            >>> plan = RoundPlan(0.8, schedule="cubic")
            >>> plan.fit_to_run(max_epochs=9, max_steps=-1, estimated_steps=90.0,
            ...                 batches_per_epoch=10)
            >>> plan.event_points  # the last quarter of the run is left for fine-tuning
            [0, 1, 2, 3, 4, 5, 6]
        """
        if self.needs_start:  # a step plan's default start: one epoch of steps
            self.resolve_start(batches_per_epoch, accumulate)
        limit, unit = self.run_length(max_epochs, max_steps, estimated_steps)
        if self.needs_horizon:
            if limit is None:
                raise ValueError(
                    f"Expected `num_rounds` or `end` for schedule={self.schedule_name!r}, or a "
                    f"trainer with a finite {unit} over which to spread the rounds, but got "
                    "neither"
                )
            self.resolve_horizon(limit)
        self.prevalidate(limit)
        self.warn_incomplete(limit, unit)

    def resolve_compression(self, total_params: int, prunable_params: int) -> None:
        """Turn ``compression_ratio`` into the final sparsity of the prunable weights."""
        if self.compression_ratio is None:
            return
        final = compression_ratio_to_sparsity(self.compression_ratio, total_params, prunable_params)
        if self.initial_sparsity > final:
            raise ValueError(
                f"Expected `initial_sparsity` to be at most the sparsity {final:.6g} of "
                f"`compression_ratio`={self.compression_ratio}, but got {self.initial_sparsity!r}"
            )
        self.final = final
        self._resolve_targets()

    def retarget(self, final_sparsity: float) -> None:
        """Change the final sparsity, keeping the position (a resumed run with a new target).

        Raises:
            ValueError: if the new target is below what earlier rounds already pruned.
        """
        final = check_sparsity(final_sparsity, "final_sparsity")
        if final < self.last_target - _TOL:
            raise ValueError(
                f"Expected `final_sparsity` to be at least the sparsity {self.last_target:.6g} "
                f"already reached (masks only shrink), but got {final_sparsity!r}"
            )
        self.final = final
        self._resolve_targets()

    def _count(self) -> int | None:
        if self.num_rounds_arg is not None:
            return self.num_rounds_arg
        if self._horizon_rounds is not None:
            return self._horizon_rounds
        if self.schedule_name == "one_shot":
            return 1
        if self.end is not None and self.start is not None:
            return (self.end - self.start) // self.frequency + 1
        return None

    def _resolve_targets(self) -> None:
        if self.schedule_fn is not None or self.final is None:
            self._targets = None
            return
        if self.rate is not None:
            targets = geometric_values_from_rate(self.rate, self.final, self.initial_sparsity)
        else:
            n = self._count()
            if n is None:
                self._targets = None
                return
            targets = schedule_values(self.schedule_name, n, self.final, self.initial_sparsity)
        check_sparsity_sequence(targets, "schedule")
        self._targets = targets

    # ---------------------------------------------------------------- the plan
    @property
    def num_rounds(self) -> int | None:
        """Number of scheduled rounds (``None``: open-ended or not resolved yet)."""
        if self._targets is not None:
            return len(self._targets)
        return self._count()

    @property
    def targets(self) -> list[float] | None:
        """Cumulative target of every scheduled round (``None`` if not known yet)."""
        return None if self._targets is None else list(self._targets)

    @property
    def event_points(self) -> list[int] | None:
        """Epochs or steps at which the scheduled rounds run (``None`` if open-ended)."""
        n = self.num_rounds
        if n is None or self.start is None:
            return None
        return [self.event_point(k) for k in range(n)]

    @property
    def complete(self) -> bool:
        """Whether every scheduled round has run."""
        n = self.num_rounds
        return n is not None and self.rounds_done >= n

    @property
    def finished(self) -> bool:
        """Whether the schedule is done: every round ran, or an extra round reached the target.

        An open-ended callable schedule (no ``num_rounds``, no ``end``) is never finished.
        """
        reached = self.final is not None and self.last_target >= self.final - _TOL
        return self.complete or (self.num_rounds is not None and reached)

    def warn_untrained(self, global_step: int) -> None:
        """Warn when the first round comes before any optimizer step, unless ``pretrained``.

        Example:
            >>> with warnings.catch_warnings(record=True) as seen:
            ...     warnings.simplefilter("always")
            ...     RoundPlan(0.5, start=0).warn_untrained(global_step=0)
            ...     RoundPlan(0.5, start=0, pretrained=True).warn_untrained(global_step=0)
            >>> [str(w.message)[:56] for w in seen]
            ['IterativePruning: round 1 runs before any optimizer step']
        """
        if global_step != 0 or self.rounds_done or self.last_target or self.pretrained:
            return
        warnings.warn(
            "IterativePruning: round 1 runs before any optimizer step of the fit: the model it "
            "prunes (and the dense reference a FairnessMonitor measures) is untrained. Let it "
            "train first (the default `start` is one epoch), or pass `pretrained=True` if its "
            "weights are already trained.",
            UserWarning,
            stacklevel=3,
        )

    def warn_unfinished(self, sparsity: float) -> None:
        """Warn (``UserWarning``) when `unfinished_message` has something to say."""
        message = self.unfinished_message(sparsity)
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=3)

    def unfinished_message(self, sparsity: float) -> str | None:
        """A warning text when a fit ends before the schedule finished, else ``None``.

        Args:
            sparsity: the sparsity reached.

        Example:
            >>> plan = RoundPlan(0.9, num_rounds=4, start=1)
            >>> plan.record_round(plan.target(0))
            >>> print(plan.unfinished_message(0.4377))  # doctest: +ELLIPSIS
            IterativePruning: the fit ended after 1 of 4 pruning rounds, at sparsity 0.4377 of the target 0.9: the schedule did not complete (`schedule_complete` is False) ...
        """  # noqa: E501
        n = self.num_rounds
        if n is None or self.finished:
            return None
        target = f"{self.final:.4g}" if self.final is not None else "its last round's"
        return (
            f"IterativePruning: the fit ended after {self.rounds_done} of {n} pruning rounds, "
            f"at sparsity {sparsity:.4g} of the target {target}: the schedule did not complete "
            "(`schedule_complete` is False) because the fit stopped first (EarlyStopping, "
            "max_epochs/max_steps or an interruption). To finish, run the remaining rounds "
            "with `prune_now(trainer, model)` (once per round; `prune_now(trainer, model, "
            "sparsity=...)` jumps to a target) and fine-tune, or resume the fit from its last "
            "checkpoint with a longer run."
        )

    def event_point(self, k: int) -> int:
        """Event point of round ``k`` (0-based)."""
        if self.start is None:
            raise RuntimeError(
                "The round plan's `start` is not resolved yet: it is one epoch of optimizer "
                "steps (`resolve_start`), known once training starts"
            )
        return self.start + k * self.frequency

    def target(self, k: int) -> float:
        """Cumulative target of round ``k`` (0-based); a callable schedule is validated here.

        Raises:
            ValueError: if a callable schedule returns a value outside ``[0, 1)`` or below
                the last target.
            RuntimeError: if the plan still needs `resolve_horizon` or `resolve_compression`.
        """
        if self._targets is not None:
            return self._targets[k]
        if self.schedule_fn is None:
            raise RuntimeError(
                "The round plan is not resolved yet: it needs the length of the run "
                "(`resolve_horizon`) or the parameter counts (`resolve_compression`)"
            )
        t = self.event_point(k)
        value = self.schedule_fn(t)
        if not is_real(value) or not 0.0 <= float(value) < 1.0:  # type: ignore[arg-type]
            raise ValueError(
                f"Expected the callable `schedule` to return a float in [0, 1), but "
                f"schedule({t}) returned {value!r}"
            )
        if float(value) < self.last_target - _TOL:  # type: ignore[arg-type]
            raise ValueError(
                f"Expected the callable `schedule` to be non-decreasing, but schedule({t}) "
                f"returned {value!r} after {self.last_target!r} (masks only shrink)"
            )
        return float(value)  # type: ignore[arg-type]

    def next_target(self) -> float:
        """Target of the next scheduled round.

        Raises:
            ValueError: when the schedule is complete.
        """
        n = self.num_rounds
        if n is not None and self.rounds_done >= n:
            raise ValueError(
                f"Expected `sparsity` when the schedule is complete ({n} rounds done), but got None"
            )
        return self.target(self.rounds_done)

    def extra_target(self, sparsity: object, current: float) -> float:
        """Target of an extra round: at least ``current`` (masks only shrink), in ``[0, 1)``.

        Example:
            >>> RoundPlan(0.5).extra_target(0.2, current=0.3)
            Traceback (most recent call last):
            ...
            ValueError: Expected `sparsity` to be at least the current sparsity 0.3 (masks only shrink), but got 0.2
        """  # noqa: E501
        target = check_sparsity(sparsity, "sparsity")
        if target < current - _TOL:
            raise ValueError(
                f"Expected `sparsity` to be at least the current sparsity {current:.6g} (masks "
                f"only shrink), but got {sparsity!r}"
            )
        return target

    def check_rewind(self, rewind: object) -> Any:
        """A rewind point: ``None``, ``"init"`` or an event point at most ``start``.

        Example:
            >>> RoundPlan(0.5, start=2).check_rewind(3)
            Traceback (most recent call last):
            ...
            ValueError: Expected `rewind` to be at most `start` (2): the weights must be stored before the first round, but got 3
        """  # noqa: E501
        if rewind is not None and rewind != "init" and (not is_int(rewind) or rewind < 0):
            raise ValueError(
                f"Expected `rewind` to be None, 'init' or an int >= 0 (an {self.interval} "
                f"index), but got {rewind!r}"
            )
        if is_int(rewind) and self.start is not None and rewind > self.start:  # type: ignore[operator]
            raise ValueError(
                f"Expected `rewind` to be at most `start` ({self.start}): the weights must be "
                f"stored before the first round, but got {rewind!r}"
            )
        return rewind

    def warn_not_rewound(self, rewind: object, round_index: int) -> None:
        """Warn that a round ran before its rewind point (its survivors are not rewound)."""
        warnings.warn(
            f"IterativePruning: round {round_index} ran before the rewind point {rewind!r} was "
            "reached; its survivors are not rewound.",
            UserWarning,
            stacklevel=3,
        )

    def due(self, now: int) -> bool:
        """Whether the next round is due at event point ``now`` (catch-up rounds included)."""
        if self.complete or self.needs_horizon or self.start is None:
            return False
        point = self.event_point(self.rounds_done)
        if self.end is not None and point > self.end:
            return False
        return point <= now

    def record_round(self, target: float, scheduled: bool = True) -> None:
        """Advance the position after a round to ``target`` (``scheduled=False``: an extra one)."""
        if scheduled:
            self.rounds_done += 1
        self.last_target = max(self.last_target, float(target))

    def prevalidate(self, limit: int | None) -> None:
        """Evaluate a callable schedule at every event point before ``limit`` (before training)."""
        if self.schedule_fn is None or self.start is None:
            return
        n = self.num_rounds
        if n is None:
            if limit is None or limit < 0:
                return
            n = max(0, (limit - 1 - self.start) // self.frequency + 1)
        check_sparsity_sequence([self.schedule_fn(self.event_point(k)) for k in range(n)])

    def incomplete_message(self, limit: int | None, unit: str) -> str | None:
        """A warning text if the last round falls at or after ``limit`` event points, else None.

        Example:
            >>> RoundPlan(0.5, num_rounds=3, interval="step", frequency=10).incomplete_message(
            ...     15, "max_steps")
            'IterativePruning: the last of 3 rounds is scheduled at step 20, but the run ends after 15 steps (max_steps); the schedule will not complete in this fit (2 of 3 rounds would run).'
        """  # noqa: E501
        points = self.event_points
        if not points or limit is None or limit < 0 or points[-1] <= limit - 1:
            return None
        runs = sum(1 for p in points if p <= limit - 1)
        return (
            f"IterativePruning: the last of {len(points)} rounds is scheduled at "
            f"{self.interval} {points[-1]}, but the run ends after {limit} {self.interval}s "
            f"({unit}); the schedule "
            f"will not complete in this fit ({runs} of {len(points)} rounds would run)."
        )

    def warn_incomplete(self, limit: int | None, unit: str) -> None:
        """Warn (``UserWarning``) when `incomplete_message` has something to say."""
        message = self.incomplete_message(limit, unit)
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=3)

    # ---------------------------------------------------------------- identity and state
    def settings(self) -> dict[str, Any]:
        """The plan's arguments as plain values (for logger configs).

        Example:
            >>> RoundPlan(0.5).settings()["schedule"]
            'one_shot'
        """
        return {
            "final_sparsity": self.final_sparsity,
            "compression_ratio": self.compression_ratio,
            "schedule": self.schedule_name,
            "initial_sparsity": self.initial_sparsity,
            "num_rounds": self.num_rounds,
            "rate": self.rate,
            "interval": self.interval,
            "start": self.start,
            "end": self.end,
            "frequency": self.frequency,
            "pretrained": self.pretrained,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position and resolved target as plain values."""
        return {
            "rounds_done": self.rounds_done,
            "last_target": self.last_target,
            "final_sparsity": self.final,
            "num_rounds": self.num_rounds,
            "horizon_rounds": self._horizon_rounds,
            "start": self.start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position; a different saved final target keeps the new one (warned).

        Raises:
            ValueError: if the new final target is below the sparsity already reached.
        """
        self.rounds_done = int(state.get("rounds_done", 0))
        self.last_target = float(state.get("last_target", 0.0))
        start = state.get("start")
        if start is not None and self.start_arg is None and self.interval == "step":
            self.start = int(start)  # the default start the run resolved
        horizon = state.get("horizon_rounds")
        if horizon is not None and self.spread_over_run:  # the saved spread wins
            self._horizon_rounds = int(horizon)
            self._resolve_targets()
        saved = state.get("final_sparsity")
        if saved is not None and self.final is not None and abs(float(saved) - self.final) > 1e-9:
            self.retarget(self.final)
            warnings.warn(
                f"IterativePruning: the checkpoint was written with final sparsity {saved}, this "
                f"callback targets {self.final}; continuing from round {self.rounds_done} with "
                "the new target.",
                UserWarning,
                stacklevel=3,
            )
