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
from collections.abc import Callable, Sequence

from lightning_fairprune.checks import (
    check_sparsity,
    is_real,
)

__all__ = [
    "SCHEDULES",
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
