"""Pruning schedules: pure functions from progress to the cumulative target sparsity.

A schedule answers "what fraction of the prunable weights must be zero after this pruning
event?". Every built-in schedule has the signature

``fn(progress: float, final_sparsity: float, initial_sparsity: float = 0.0) -> float``

where ``progress = k / n`` for round ``k = 1..n`` of an ``n``-round schedule, so round ``n``
returns exactly ``final_sparsity``. Progress outside ``[0, 1]`` is clamped (the Zhu & Gupta
schedule is defined as clamped). The values are *cumulative* sparsities, not fractions of the
remaining weights; :func:`fraction_of_remaining` converts to the latter (the ``amount`` of
``torch.nn.utils.prune`` and of Lightning's ``ModelPruning``).

Formulas (``s_i`` = initial, ``s_f`` = final sparsity, ``p`` = progress):

* ``one_shot``: ``s_f``
* ``linear``: ``s_i + (s_f - s_i) * p``
* ``cubic`` (Zhu & Gupta 2017): ``s_f + (s_i - s_f) * (1 - p) ** 3``
* ``geometric`` (each round removes the same fraction of the remaining weights):
  ``1 - (1 - s_i) * ((1 - s_f) / (1 - s_i)) ** p``; with ``s_i = 0`` and ``n`` rounds this is
  ``s_k = 1 - (1 - q) ** k`` with ``q = 1 - (1 - s_f) ** (1 / n)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
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

__all__ = [
    "INTERVALS",
    "SCHEDULES",
    "RoundPlan",
    "ScheduleFn",
    "check_sparsity_sequence",
    "compression_ratio_to_sparsity",
    "cubic",
    "fraction_of_remaining",
    "geometric",
    "geometric_num_rounds",
    "geometric_values_from_rate",
    "linear",
    "one_shot",
    "resolve_schedule",
    "schedule_values",
    "sparsity_to_compression_ratio",
]

ScheduleFn = Callable[..., float]
"""A schedule: ``fn(progress, final_sparsity, initial_sparsity=0.0) -> float``."""

_TOL = 1e-12


def _check_args(progress: float, final_sparsity: float, initial_sparsity: float) -> float:
    if not is_real(progress) or math.isnan(progress):
        raise ValueError(f"Expected `progress` to be a real number in [0, 1], but got {progress!r}")
    final = check_sparsity(final_sparsity, "final_sparsity")
    initial = check_sparsity(initial_sparsity, "initial_sparsity")
    if initial > final:
        raise ValueError(
            f"Expected `initial_sparsity` to be at most `final_sparsity` ({final}), "
            f"but got {initial_sparsity!r}"
        )
    return min(max(float(progress), 0.0), 1.0)


def one_shot(progress: float, final_sparsity: float, initial_sparsity: float = 0.0) -> float:
    """Prune to the final sparsity at once, whatever the progress.

    Args:
        progress: position in the schedule, ``k / n`` (ignored apart from validation).
        final_sparsity: target cumulative sparsity in ``[0, 1)``.
        initial_sparsity: sparsity before the schedule starts (validated only).

    Returns:
        ``final_sparsity``.

    Example:
        >>> one_shot(0.25, 0.9)
        0.9
    """
    _check_args(progress, final_sparsity, initial_sparsity)
    return float(final_sparsity)


def linear(progress: float, final_sparsity: float, initial_sparsity: float = 0.0) -> float:
    """Sparsity rising linearly from ``initial_sparsity`` to ``final_sparsity``.

    Args:
        progress: position in the schedule, ``k / n``; clamped to ``[0, 1]``.
        final_sparsity: target cumulative sparsity in ``[0, 1)``.
        initial_sparsity: sparsity at progress 0.

    Returns:
        ``s_i + (s_f - s_i) * progress``.

    Example:
        >>> linear(0.5, 0.8)
        0.4
    """
    p = _check_args(progress, final_sparsity, initial_sparsity)
    if p >= 1.0:
        return float(final_sparsity)
    return float(initial_sparsity) + (float(final_sparsity) - float(initial_sparsity)) * p


def cubic(progress: float, final_sparsity: float, initial_sparsity: float = 0.0) -> float:
    """Zhu & Gupta (2017) gradual schedule: fast pruning early, slow near the end.

    ``s = s_f + (s_i - s_f) * (1 - progress) ** 3``, with progress clamped to ``[0, 1]``.

    Args:
        progress: position in the schedule, ``(t - t_0) / (n * dt)``.
        final_sparsity: target cumulative sparsity in ``[0, 1)``.
        initial_sparsity: sparsity at progress 0.

    Returns:
        The cumulative target sparsity.

    Example:
        >>> round(cubic(0.5, 0.8), 10)
        0.7
    """
    p = _check_args(progress, final_sparsity, initial_sparsity)
    if p >= 1.0:
        return float(final_sparsity)
    s_f, s_i = float(final_sparsity), float(initial_sparsity)
    return s_f + (s_i - s_f) * (1.0 - p) ** 3


def geometric(progress: float, final_sparsity: float, initial_sparsity: float = 0.0) -> float:
    """Every round removes the same fraction of the remaining weights (lottery-ticket style).

    ``s = 1 - (1 - s_i) * ((1 - s_f) / (1 - s_i)) ** progress``. With ``n`` equally spaced
    rounds and ``s_i = 0`` this is ``1 - (1 - q) ** k`` where ``q = 1 - (1 - s_f) ** (1/n)``.

    Args:
        progress: position in the schedule, ``k / n``; clamped to ``[0, 1]``.
        final_sparsity: target cumulative sparsity in ``[0, 1)``.
        initial_sparsity: sparsity at progress 0.

    Returns:
        The cumulative target sparsity.

    Example:
        >>> round(geometric(0.5, 0.75), 6)
        0.5
    """
    p = _check_args(progress, final_sparsity, initial_sparsity)
    if p >= 1.0:
        return float(final_sparsity)
    s_f, s_i = float(final_sparsity), float(initial_sparsity)
    return 1.0 - (1.0 - s_i) * ((1.0 - s_f) / (1.0 - s_i)) ** p


SCHEDULES: dict[str, ScheduleFn] = {
    "one_shot": one_shot,
    "linear": linear,
    "cubic": cubic,
    "geometric": geometric,
}
"""Built-in schedules by name."""


def resolve_schedule(schedule: str | ScheduleFn) -> ScheduleFn:
    """Return the schedule function for a name in :data:`SCHEDULES` or a callable.

    Names are case-insensitive and ``-`` is accepted for ``_`` (``"one-shot"``).

    Args:
        schedule: ``"one_shot"``, ``"linear"``, ``"cubic"``, ``"geometric"`` or a callable
            ``fn(progress, final_sparsity, initial_sparsity) -> float``.

    Returns:
        The callable.

    Raises:
        ValueError: for an unknown name.
        TypeError: for anything that is neither a string nor callable.

    Example:
        >>> resolve_schedule("One-Shot") is one_shot
        True
    """
    if isinstance(schedule, str):
        key = schedule.strip().lower().replace("-", "_")
        if key not in SCHEDULES:
            raise ValueError(
                f"Expected `schedule` to be one of {sorted(SCHEDULES)} or a callable, "
                f"but got {schedule!r}"
            )
        return SCHEDULES[key]
    if callable(schedule):
        return schedule
    raise TypeError(
        f"Expected `schedule` to be a string in {sorted(SCHEDULES)} or a callable, "
        f"but got {schedule!r} of type {type(schedule).__name__}"
    )


def check_sparsity_sequence(values: Sequence[float], name: str = "schedule") -> None:
    """Check that a sequence of cumulative sparsities is valid.

    Each value must be a finite real number in ``[0, 1)`` and the sequence must be
    non-decreasing (masks only shrink).

    Args:
        values: cumulative sparsities in round order.
        name: what to call the sequence in error messages.

    Raises:
        ValueError: naming ``name``, the offending value and its position.

    Example:
        >>> check_sparsity_sequence([0.2, 0.5, 0.5, 0.9])
        >>> check_sparsity_sequence([0.5, 0.4], "my_schedule")
        Traceback (most recent call last):
        ...
        ValueError: Expected `my_schedule` to be non-decreasing, but value 1 is 0.4 after 0.5
    """
    previous = -math.inf
    for i, value in enumerate(values):
        if not is_real(value) or not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"Expected every value of `{name}` to be a float in [0, 1), "
                f"but value {i} is {value!r}"
            )
        if value < previous - _TOL:
            raise ValueError(
                f"Expected `{name}` to be non-decreasing, but value {i} is {value!r} "
                f"after {previous!r}"
            )
        previous = max(previous, float(value))


def schedule_values(
    schedule: str | ScheduleFn,
    num_rounds: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
) -> list[float]:
    """Cumulative target sparsities of rounds ``1..num_rounds``.

    Round ``k`` gets ``schedule(k / num_rounds, final_sparsity, initial_sparsity)``. The result
    is validated with :func:`check_sparsity_sequence` (a user callable that decreases or
    leaves ``[0, 1)`` raises ``ValueError``).

    Args:
        schedule: a name in :data:`SCHEDULES` or a callable with the schedule signature.
        num_rounds: number of pruning rounds, ``>= 1``.
        final_sparsity: target sparsity of the last round, in ``[0, 1)``.
        initial_sparsity: sparsity before the first round, in ``[0, final_sparsity]``.

    Returns:
        A list of ``num_rounds`` floats.

    Example:
        >>> schedule_values("linear", 4, 0.8)
        [0.2, 0.4, 0.6000000000000001, 0.8]
        >>> [round(v, 4) for v in schedule_values("cubic", 2, 0.8)]
        [0.7, 0.8]
    """
    fn = resolve_schedule(schedule)
    if not isinstance(num_rounds, int) or isinstance(num_rounds, bool) or num_rounds < 1:
        raise ValueError(f"Expected `num_rounds` to be an int >= 1, but got {num_rounds!r}")
    final = check_sparsity(final_sparsity, "final_sparsity")
    initial = check_sparsity(initial_sparsity, "initial_sparsity")
    if initial > final:
        raise ValueError(
            f"Expected `initial_sparsity` to be at most `final_sparsity` ({final}), "
            f"but got {initial_sparsity!r}"
        )
    values = [fn(k / num_rounds, final, initial) for k in range(1, num_rounds + 1)]
    name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "schedule")
    check_sparsity_sequence(values, name)
    return [float(v) for v in values]


def geometric_num_rounds(rate: float, final_sparsity: float) -> int:
    """Number of rounds needed to reach ``final_sparsity`` removing ``rate`` of the rest each time.

    The smallest ``n >= 1`` with ``1 - (1 - rate) ** n >= final_sparsity`` (up to a 1e-9
    tolerance, so that e.g. rate 0.5 reaches 0.75 in exactly 2 rounds).

    Args:
        rate: fraction of the remaining weights removed per round, in ``(0, 1)``.
        final_sparsity: target cumulative sparsity in ``[0, 1)``.

    Returns:
        The number of rounds (1 when ``final_sparsity`` is 0).

    Example:
        >>> geometric_num_rounds(0.2, 0.9)
        11
        >>> geometric_num_rounds(0.5, 0.75)
        2
    """
    if not is_real(rate) or not 0.0 < rate < 1.0:
        raise ValueError(f"Expected `rate` to be a float in (0, 1), but got {rate!r}")
    final = check_sparsity(final_sparsity, "final_sparsity")
    if final == 0.0:
        return 1
    n = math.log(1.0 - final) / math.log(1.0 - rate)
    return max(1, math.ceil(n - 1e-9))


def geometric_values_from_rate(
    rate: float, final_sparsity: float, initial_sparsity: float = 0.0
) -> list[float]:
    """Lottery-ticket schedule: remove ``rate`` of the remaining weights per round until ``s_f``.

    ``s_k = 1 - (1 - s_i) * (1 - rate) ** k``, capped at ``final_sparsity``; the last value is
    exactly ``final_sparsity``.

    Args:
        rate: fraction of the remaining weights removed per round, in ``(0, 1)``.
        final_sparsity: target cumulative sparsity in ``[0, 1)``.
        initial_sparsity: sparsity before the first round.

    Returns:
        Cumulative target sparsities of every round.

    Example:
        >>> [round(v, 4) for v in geometric_values_from_rate(0.5, 0.8)]
        [0.5, 0.75, 0.8]
    """
    final = check_sparsity(final_sparsity, "final_sparsity")
    initial = check_sparsity(initial_sparsity, "initial_sparsity")
    if initial > final:
        raise ValueError(
            f"Expected `initial_sparsity` to be at most `final_sparsity` ({final}), "
            f"but got {initial_sparsity!r}"
        )
    if not is_real(rate) or not 0.0 < rate < 1.0:
        raise ValueError(f"Expected `rate` to be a float in (0, 1), but got {rate!r}")
    remaining_target = (1.0 - final) / (1.0 - initial)
    n = (
        1
        if final == initial
        else max(1, math.ceil(math.log(remaining_target) / math.log(1.0 - rate) - 1e-9))
    )
    values = [min(final, 1.0 - (1.0 - initial) * (1.0 - rate) ** k) for k in range(1, n)]
    values.append(final)
    return values


def fraction_of_remaining(previous: float, target: float) -> float:
    """Convert cumulative sparsities to the fraction of the remaining weights to prune.

    ``a = (s_t - s_{t-1}) / (1 - s_{t-1})``: the ``amount`` that ``torch.nn.utils.prune`` and
    Lightning's ``ModelPruning`` expect.

    Args:
        previous: cumulative sparsity before the round, in ``[0, 1)``.
        target: cumulative sparsity after the round, in ``[previous, 1)``.

    Returns:
        The fraction of the still-unpruned weights to remove.

    Example:
        >>> fraction_of_remaining(0.5, 0.75)
        0.5
    """
    prev = check_sparsity(previous, "previous")
    tgt = check_sparsity(target, "target")
    if tgt < prev:
        raise ValueError(
            f"Expected `target` to be at least `previous` ({prev}), but got {target!r}"
        )
    return (tgt - prev) / (1.0 - prev)


def compression_ratio_to_sparsity(ratio: float, total_params: int, prunable_params: int) -> float:
    """Convert a whole-model compression ratio to a sparsity of the prunable weights.

    ``t = total / (total - removed)`` counts every parameter of the model, and all removed
    weights come from the prunable ones, so ``sparsity = total * (1 - 1 / t) / prunable``.

    Args:
        ratio: compression ratio ``t >= 1`` (``t = 1`` means no pruning).
        total_params: number of parameters of the whole model.
        prunable_params: number of prunable parameters (``<= total_params``).

    Returns:
        The sparsity of the prunable weights, in ``[0, 1)``.

    Raises:
        ValueError: if the ratio is below 1 or not finite, the counts are inconsistent, or
            the ratio is unreachable by pruning only the prunable weights (sparsity ``>= 1``).

    Example:
        >>> compression_ratio_to_sparsity(4.0, total_params=1000, prunable_params=900)
        0.8333333333333334
    """
    if not is_real(ratio) or not math.isfinite(ratio) or ratio < 1.0:
        raise ValueError(
            f"Expected `compression_ratio` to be a finite float >= 1, but got {ratio!r}"
        )
    for name, value in (("total_params", total_params), ("prunable_params", prunable_params)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}")
    if prunable_params > total_params:
        raise ValueError(
            f"Expected `prunable_params` to be at most `total_params` ({total_params}), "
            f"but got {prunable_params}"
        )
    sparsity = total_params * (1.0 - 1.0 / float(ratio)) / prunable_params
    if sparsity >= 1.0:
        max_ratio = (
            total_params / (total_params - prunable_params)
            if total_params > prunable_params
            else math.inf
        )
        raise ValueError(
            f"Expected `compression_ratio` to be reachable by pruning the {prunable_params} "
            f"prunable of {total_params} parameters (ratio < {max_ratio:.6g}), but got {ratio!r}, "
            f"which needs a sparsity of {sparsity:.6g} >= 1"
        )
    return sparsity


def sparsity_to_compression_ratio(
    sparsity: float, total_params: int, prunable_params: int
) -> float:
    """Inverse of :func:`compression_ratio_to_sparsity`.

    Args:
        sparsity: fraction of the prunable weights that are zero, in ``[0, 1)``.
        total_params: number of parameters of the whole model.
        prunable_params: number of prunable parameters.

    Returns:
        ``total / (total - sparsity * prunable)``.

    Example:
        >>> sparsity_to_compression_ratio(0.5, total_params=100, prunable_params=100)
        2.0
    """
    s = check_sparsity(sparsity, "sparsity")
    for name, value in (("total_params", total_params), ("prunable_params", prunable_params)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Expected `{name}` to be an int >= 1, but got {value!r}")
    if prunable_params > total_params:
        raise ValueError(
            f"Expected `prunable_params` to be at most `total_params` ({total_params}), "
            f"but got {prunable_params}"
        )
    return total_params / (total_params - s * prunable_params)


# --------------------------------------------------------------------------------------------
# the round plan: which round runs when, to which target
# --------------------------------------------------------------------------------------------
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

        # ---- the schedule ------------------------------------------------------------------
        self.schedule_fn: Callable[[int], float] | None = None
        if schedule is None:
            several = (self.num_rounds_arg or 1) > 1 or end is not None or rate is not None
            self.schedule_name = "geometric" if several else "one_shot"
        elif isinstance(schedule, str):
            self.schedule_name = _schedule_key(schedule)
        elif callable(schedule):
            self.schedule_name = _callable_name(schedule)
            self.schedule_fn = schedule
        else:
            raise TypeError(
                f"Expected `schedule` to be a string in {sorted(SCHEDULES)}, None or a "
                f"callable, but got {schedule!r} of type {type(schedule).__name__}"
            )
        self.schedule = schedule if schedule is not None else self.schedule_name

        # ---- the final target --------------------------------------------------------------
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

        # ---- number of rounds --------------------------------------------------------------
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
        self._horizon_rounds: int | None = None

        # ---- resolved values and state -----------------------------------------------------
        self.final: float | None = self.final_sparsity
        self._targets: list[float] | None = None
        self._resolve_targets()
        self.rounds_done = 0
        self.last_target = 0.0

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
