"""Argument validation: one helper per concept, one message shape.

Every check raises at once with a message of the form
``"Expected `name` to be <what>, but got <value>"`` (the argument's name, what is expected,
and the value received), so that a wrong argument surfaces at construction or at fit start
with a message that says how to fix it. The cores, the callbacks and the loss modules all
use these helpers instead of each writing its own variant.

Example:
    >>> check_int(3, "num_rounds", minimum=1)
    3
    >>> check_sparsity(1.0, "final_sparsity")
    Traceback (most recent call last):
    ...
    ValueError: Expected `final_sparsity` to be a float in [0, 1), but got 1.0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_disjoint",
    "check_each",
    "check_instance",
    "check_int",
    "check_labels",
    "check_logits",
    "check_name_list",
    "check_real",
    "check_sparsity",
    "check_vector",
    "is_int",
    "is_real",
]

T = TypeVar("T")


def is_int(value: object) -> bool:
    """Whether ``value`` is a Python or NumPy integer (``bool`` excluded).

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (int or float, NumPy scalars too; ``bool`` excluded).

    Example:
        >>> is_real(0.5), is_real(2), is_real(True), is_real("0.5")
        (True, True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(
    value: object,
    name: str,
    minimum: int | None = None,
    *,
    maximum: int | None = None,
    allow_none: bool = False,
) -> Any:
    """Return ``value`` as an ``int`` (or ``None`` if allowed) after checking its range.

    Args:
        value: the argument.
        name: the argument's name, for the message.
        minimum: smallest allowed value (inclusive), or ``None``.
        maximum: largest allowed value (inclusive), or ``None``.
        allow_none: accept ``None`` (returned as is).

    Returns:
        ``int(value)``, or ``None``.

    Raises:
        ValueError: for a non-integer (``bool`` included) or a value out of range.

    Example:
        >>> check_int(None, "max_batches", 1, allow_none=True) is None
        True
        >>> check_int(0, "frequency", 1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `frequency` to be an int >= 1, but got 0
    """
    if value is None and allow_none:
        return None
    ok = is_int(value)
    if ok and minimum is not None and int(value) < minimum:  # type: ignore[call-overload]
        ok = False
    if ok and maximum is not None and int(value) > maximum:  # type: ignore[call-overload]
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            what = f"an int in [{minimum}, {maximum}]"
        elif minimum is not None:
            what = f"an int >= {minimum}"
        elif maximum is not None:
            what = f"an int <= {maximum}"
        else:
            what = "an int"
        if allow_none:
            what = "None or " + what
        raise ValueError(f"Expected `{name}` to be {what}, but got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_real(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> Any:
    """Return ``value`` as a finite ``float`` (or ``None`` if allowed) in the given interval.

    Args:
        value: the argument.
        name: the argument's name.
        low: lower bound or ``None``.
        high: upper bound or ``None``.
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
        allow_none: accept ``None``.

    Returns:
        ``float(value)``, or ``None``.

    Raises:
        ValueError: for a non-number, a non-finite number or one outside the interval.

    Example:
        >>> check_real(0.01, "dual_lr", low=0.0)
        0.01
        >>> check_real(0.0, "rate", low=0.0, high=1.0, low_open=True, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: Expected `rate` to be a float in (0, 1), but got 0.0
    """
    if value is None and allow_none:
        return None
    ok = is_real(value) and math.isfinite(float(value))  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        if low is not None and (v < low or (low_open and v == low)):
            ok = False
        if high is not None and (v > high or (high_open and v == high)):
            ok = False
    if not ok:
        if low is not None and high is not None:
            what = (
                f"a float in {'(' if low_open else '['}{_fmt(low)}, "
                f"{_fmt(high)}{')' if high_open else ']'}"
            )
        elif low is not None:
            what = f"a finite float {'>' if low_open else '>='} {_fmt(low)}"
        elif high is not None:
            what = f"a finite float {'<' if high_open else '<='} {_fmt(high)}"
        else:
            what = "a finite float"
        if allow_none:
            what = "None or " + what
        raise ValueError(f"Expected `{name}` to be {what}, but got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def check_sparsity(value: object, name: str = "sparsity", *, allow_none: bool = False) -> Any:
    """Return a sparsity as a ``float`` in ``[0, 1)``: the one validator of sparsity values.

    A sparsity of 1 would prune every weight, so it is excluded.

    Example:
        >>> check_sparsity(0.9, "final_sparsity")
        0.9
        >>> check_sparsity(float("nan"), "target")
        Traceback (most recent call last):
        ...
        ValueError: Expected `target` to be a float in [0, 1), but got nan
    """
    if value is None and allow_none:
        return None
    if not is_real(value) or not 0.0 <= float(value) < 1.0:  # type: ignore[arg-type]
        what = ("None or " if allow_none else "") + "a float in [0, 1)"
        raise ValueError(f"Expected `{name}` to be {what}, but got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a ``bool``.

    Example:
        >>> check_bool("yes", "log")
        Traceback (most recent call last):
        ...
        TypeError: Expected `log` to be a bool, but got 'yes'
    """
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {value!r}")
    return value


def check_callable(value: T, name: str, *, allow_none: bool = True) -> T:
    """Return ``value`` if it is callable (or ``None`` when allowed).

    Example:
        >>> check_callable(3, "loss_fn")
        Traceback (most recent call last):
        ...
        TypeError: Expected `loss_fn` to be callable or None, but got 3
    """
    if value is None and allow_none:
        return value
    if not callable(value):
        what = "callable or None" if allow_none else "callable"
        raise TypeError(f"Expected `{name}` to be {what}, but got {value!r}")
    return value


def check_instance(value: T, name: str, types: type | tuple[type, ...], what: str) -> T:
    """Return ``value`` if it is ``None`` or an instance of ``types`` (``what`` names them).

    Example:
        >>> check_instance(3, "name", str, "a str or None")
        Traceback (most recent call last):
        ...
        TypeError: Expected `name` to be a str or None, but got int
    """
    if value is not None and not isinstance(value, types):
        raise TypeError(f"Expected `{name}` to be {what}, but got {type(value).__name__}")
    return value


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``.

    Example:
        >>> check_choice("epoch", "interval", ("epoch", "step"))
        'epoch'
        >>> check_choice("batch", "interval", ("epoch", "step"))
        Traceback (most recent call last):
        ...
        ValueError: Expected `interval` to be one of ('epoch', 'step'), but got 'batch'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {tuple(choices)}, but got {value!r}")
    return value


def check_name_list(value: object, name: str) -> list[str] | None:
    """Normalize an optional string, type, or list of strings/types to a list of strings.

    Types are replaced by their class name (selection by module type).

    Example:
        >>> check_name_list(["Linear", torch.nn.Conv2d], "include_types")
        ['Linear', 'Conv2d']
        >>> check_name_list([3], "exclude_names")
        Traceback (most recent call last):
        ...
        TypeError: Expected `exclude_names` to be a list of strings (class names or glob patterns), but got [3]
    """  # noqa: E501
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
                    f"Expected `{name}` to be a list of strings (class names or glob "
                    f"patterns), but got {list(value)!r}"
                )
        return out
    raise TypeError(f"Expected `{name}` to be a string or a list of strings, but got {value!r}")


def _is_integer_tensor(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def check_labels(
    t: object,
    name: str,
    *,
    upper: int | None = None,
    n: int | None = None,
    what: str = "labels",
    upper_name: str | None = None,
    values: bool = True,
) -> Tensor:
    """Check a 1-D integer tensor of ids in ``[0, upper)`` (class labels or group ids).

    The one validator of label-like tensors: targets, group ids, predictions.

    Args:
        t: the tensor.
        name: its name for the message (``targets``, ``groups``...).
        upper: exclusive upper bound of the ids, or ``None``.
        n: required length, or ``None``.
        what: what the ids are ("class labels", "group ids").
        upper_name: the argument that set ``upper`` (e.g. ``num_groups``), named in the message.
        values: check the ids' range (reads the values: one device synchronization);
            ``False`` checks type, dtype and shape only.

    Returns:
        The tensor (unchanged).

    Raises:
        TypeError: for a non-tensor.
        ValueError: for a float/bool dtype, a wrong shape or an id out of range.

    Example:
        >>> check_labels(torch.tensor([0, 2]), "groups", upper=2, what="group ids",
        ...              upper_name="num_groups")
        Traceback (most recent call last):
        ...
        ValueError: Expected `groups` to hold group ids in [0, 2) (`num_groups`=2), but got ids from 0 to 2
        >>> check_labels(torch.tensor([0.0, 1.0]), "groups", what="group ids")
        Traceback (most recent call last):
        ...
        ValueError: Expected `groups` to be a 1-D integer tensor of group ids, but got dtype torch.float32
    """  # noqa: E501
    if not isinstance(t, Tensor):
        raise TypeError(
            f"Expected `{name}` to be a torch.Tensor of {what}, but got {type(t).__name__}"
        )
    if not _is_integer_tensor(t):
        raise ValueError(
            f"Expected `{name}` to be a 1-D integer tensor of {what}, but got dtype {t.dtype}"
        )
    if t.ndim != 1 or (n is not None and t.shape[0] != n):
        count = f" ({n})" if n is not None else ""
        raise ValueError(
            f"Expected `{name}` to be a 1-D integer tensor with one id per sample{count}, but "
            f"got shape {tuple(t.shape)}"
        )
    if values and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (upper is not None and hi >= upper):
            source = f" (`{upper_name}`={upper})" if upper_name else ""
            where = f"in [0, {upper}){source}" if upper is not None else "that are non-negative"
            raise ValueError(
                f"Expected `{name}` to hold {what} {where}, but got ids from {lo} to {hi}"
            )
    return t


def check_vector(
    value: object,
    name: str,
    *,
    size: int | None = None,
    low: float | None = None,
    what: str = "values",
    nonempty: bool = False,
    nonzero: bool = False,
) -> Tensor:
    """Return a 1-D tensor of finite numbers as detached float64 (weights, counts, sums).

    Args:
        value: a tensor or a sequence of numbers.
        name: the argument's name.
        size: required length, or ``None``.
        low: smallest allowed entry, or ``None``.
        what: what the entries are ("class weights", "per-group counts"...).
        nonempty: refuse an empty vector.
        nonzero: refuse a vector whose entries are all 0.

    Returns:
        The float64 tensor (on the input's device).

    Raises:
        ValueError: for anything else, naming the argument and what was expected.

    Example:
        >>> check_vector([30, 10], "counts", low=0.0, what="counts")
        tensor([30., 10.], dtype=torch.float64)
        >>> check_vector([1.0, -2.0], "weight", low=0.0, what="class weights")
        Traceback (most recent call last):
        ...
        ValueError: Expected `weight` to be a 1-D tensor of finite class weights >= 0, but got [1.0, -2.0]
    """  # noqa: E501
    try:
        t = (
            value.detach()
            if isinstance(value, Tensor)
            else torch.as_tensor(value, dtype=torch.float64)
        )
    except (TypeError, ValueError, RuntimeError):
        t = None
    ok = t is not None and t.dim() == 1 and (t.is_floating_point() or _is_integer_tensor(t))
    if ok:
        assert t is not None
        t = t.to(torch.float64)
        ok = bool(torch.isfinite(t).all())
        ok = ok and (size is None or t.numel() == size) and (not nonempty or t.numel() > 0)
        ok = ok and (low is None or not bool((t < low).any()))
        ok = ok and (not nonzero or bool((t != 0).any()))
    if not ok:
        bound = f" >= {_fmt(low)}" if low is not None else ""
        shape = f" of shape ({size},)" if size is not None else ""
        raise ValueError(
            f"Expected `{name}` to be a {'non-empty ' if nonempty else ''}1-D tensor of finite "
            f"{what}{bound}{shape}{', not all 0' if nonzero else ''}, but got "
            f"{value.tolist() if isinstance(value, Tensor) else value!r}"
        )
    return t  # type: ignore[return-value]


def check_logits(outputs: object, targets: Tensor, owner: str) -> int:
    """Return the number of classes ``C`` of ``(N, C)`` class logits (``C >= 2``).

    For what needs a classifier (per-sample cross-entropy, per-class groups): a regression
    output ``(N,)`` or ``(N, 1)`` is refused, and so are targets outside ``[0, C)``.

    Args:
        outputs: the model's outputs on one batch.
        targets: that batch's class targets.
        owner: what needs the logits (e.g. ``"criterion='fairprune'"``), for the message.

    Example:
        >>> check_logits(torch.zeros(4, 3), torch.tensor([0, 2, 1, 0]), "criterion='fairprune'")
        3
        >>> check_logits(torch.zeros(4, 1), torch.tensor([0, 1, 1, 0]), "criterion='fairprune'")
        Traceback (most recent call last):
        ...
        ValueError: Expected the model to return class logits of shape (N, C) with C >= 2 for criterion='fairprune' (a classifier), but got shape (4, 1)
    """  # noqa: E501
    shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
    n = int(targets.shape[0]) if isinstance(targets, Tensor) and targets.ndim else None
    if not isinstance(outputs, Tensor) or outputs.ndim != 2 or outputs.shape[1] < 2:
        raise ValueError(
            "Expected the model to return class logits of shape (N, C) with C >= 2 for "
            f"{owner} (a classifier), but got shape {shape}"
        )
    classes = int(outputs.shape[1])
    check_labels(targets, "targets", upper=classes, n=n, what="class labels of the model")
    if n != outputs.shape[0]:
        raise ValueError(
            f"Expected the model to return one row of logits per sample ({n}) for {owner}, but "
            f"got shape {shape}"
        )
    return classes


def check_disjoint(sets: Mapping[str, Iterable[str]], what: str, *, hint: str = "") -> None:
    """Raise when two of the named sets share an element (the first such pair is named).

    Args:
        sets: label -> elements (e.g. a callback -> the parameter names it prunes).
        what: what the elements are, for the message.
        hint: appended to the message (how to fix it).

    Example:
        >>> check_disjoint({"a": ["x", "y"], "b": ["z"]}, "pruned parameters")
        >>> check_disjoint({"a": ["x", "y"], "b": ["y"]}, "pruned parameters")
        Traceback (most recent call last):
        ...
        ValueError: Expected the pruned parameters of a and b to be disjoint, but they share 1: ['y']
    """  # noqa: E501
    items = [(label, set(elements)) for label, elements in sets.items()]
    for i, (a, first) in enumerate(items):
        for b, second in items[i + 1 :]:
            shared = sorted(first & second)
            if shared:
                few = ", ".join(map(repr, shared[:5])) + (", ..." if len(shared) > 5 else "")
                raise ValueError(
                    f"Expected the {what} of {a} and {b} to be disjoint, but they share "
                    f"{len(shared)}: [{few}]{hint}"
                )


def check_each(values: Sequence[tuple[str, object]], check: Callable[[object, str], Any]) -> None:
    """Apply ``check(value, name)`` to each ``(name, value)`` pair (a loop helper).

    Example:
        >>> check_each([("a", True), ("b", 1)], check_bool)
        Traceback (most recent call last):
        ...
        TypeError: Expected `b` to be a bool, but got 1
    """
    for name, value in values:
        check(value, name)
