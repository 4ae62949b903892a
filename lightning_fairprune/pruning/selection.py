"""Which parameters are prunable: selection by module type and fully-qualified-name pattern."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence

from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["DEFAULT_PRUNABLE_TYPES", "NORM_TYPES", "find_classifier", "select_parameters"]

DEFAULT_PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear)
"""Module types whose weights are prunable by default (every Conv/ConvTranspose, Linear)."""

NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)
"""Normalization module types (BatchNorm*, InstanceNorm*, LayerNorm, GroupNorm, RMSNorm)."""

TypeSpec = str | type
"""A module type: a class, or a class-name glob matched against the module's class hierarchy."""


def _as_list(value: object, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, type)):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    raise TypeError(
        f"Expected `{name}` to be a string, a class or a list of them, but got {value!r}"
    )


def _check_types(specs: list, name: str) -> None:
    for spec in specs:
        if isinstance(spec, str):
            continue
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            continue
        raise TypeError(
            f"Expected every entry of `{name}` to be an nn.Module subclass or a class name, "
            f"but got {spec!r}"
        )


def _check_patterns(patterns: list, name: str) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"Expected every entry of `{name}` to be a glob string, but got {pattern!r}"
            )


def _type_matches(module: nn.Module, specs: Sequence[TypeSpec]) -> bool:
    mro = type(module).__mro__
    for spec in specs:
        if isinstance(spec, type):
            if isinstance(module, spec):
                return True
        elif any(fnmatch.fnmatchcase(cls.__name__, spec) for cls in mro):
            return True
    return False


def _name_matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def find_classifier(model: nn.Module) -> str | None:
    """Name of the classifier: the last ``nn.Linear`` module in registration order.

    Args:
        model: the model.

    Returns:
        The module's fully-qualified name, or ``None`` if the model has no Linear module.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> find_classifier(net)
        '2'
    """
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def select_parameters(
    model: nn.Module,
    include_types: TypeSpec | Sequence[TypeSpec] | None = None,
    exclude_types: TypeSpec | Sequence[TypeSpec] | None = None,
    include_names: str | Sequence[str] | None = None,
    exclude_names: str | Sequence[str] | None = None,
    prune_classifier: bool = False,
    prune_bias: bool = False,
    prune_norm: bool = False,
) -> dict[str, nn.Parameter]:
    """Select the prunable parameters of a model.

    Rules, applied in this order:

    1. A module is a candidate if its type matches ``include_types`` (default: every
       Conv/ConvTranspose and Linear module; with ``prune_norm`` also normalization layers)
       and does not match ``exclude_types``. A type is a class (subclasses match) or a string
       glob matched against the names of the classes in the module's hierarchy
       (``"Conv2d"``, ``"Conv*"``), so configurations stay YAML-friendly.
    2. Of each candidate module, its own parameters are taken; ``bias`` only if
       ``prune_bias``. The classifier (the last ``nn.Linear`` in registration order) is
       skipped unless ``prune_classifier``.
    3. If ``include_names`` is given, only parameters whose fully-qualified name matches one
       of its globs are kept; parameters matching ``exclude_names`` are dropped.

    Shared parameters appear once, under the first name ``model.named_parameters()`` gives.

    Args:
        model: the model.
        include_types: module types to prune (default Conv and Linear).
        exclude_types: module types never to prune.
        include_names: FQN globs; when given, only matching parameters are pruned.
        exclude_names: FQN globs of parameters never to prune.
        prune_classifier: also prune the last Linear layer.
        prune_bias: also prune biases.
        prune_norm: also prune normalization layers (their weights; biases with ``prune_bias``).

    Returns:
        Ordered mapping FQN -> parameter, in ``model.named_parameters()`` order.

    Raises:
        ValueError: if no parameter matches the selection.
        TypeError: for malformed arguments.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
        ...                     nn.Linear(4, 8), nn.Linear(8, 2))
        >>> list(select_parameters(net))
        ['0.weight', '3.weight']
        >>> list(select_parameters(net, prune_classifier=True, prune_bias=True,
        ...                        exclude_names=["0.*"]))
        ['3.weight', '3.bias', '4.weight', '4.bias']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}")
    inc_types = _as_list(include_types, "include_types")
    exc_types = _as_list(exclude_types, "exclude_types")
    inc_names = _as_list(include_names, "include_names")
    exc_names = _as_list(exclude_names, "exclude_names")
    _check_types(inc_types, "include_types")
    _check_types(exc_types, "exclude_types")
    _check_patterns(inc_names, "include_names")
    _check_patterns(exc_names, "exclude_names")
    if include_types is None:
        inc_types = list(DEFAULT_PRUNABLE_TYPES)
    if prune_norm:
        inc_types = [*inc_types, *NORM_TYPES]

    modules = list(model.named_modules())
    for spec in inc_types:
        if isinstance(spec, str) and not any(_type_matches(m, [spec]) for _, m in modules):
            warnings.warn(
                f"`include_types` entry {spec!r} matches no module of the model",
                UserWarning,
                stacklevel=2,
            )

    classifier = None if prune_classifier else find_classifier(model)
    selected: set[int] = set()
    for module_name, module in modules:
        if module_name == classifier and classifier is not None:
            continue
        if not _type_matches(module, inc_types) or _type_matches(module, exc_types):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param_name == "bias" and not prune_bias:
                continue
            selected.add(id(param))

    result: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if id(param) not in selected:
            continue
        if inc_names and not _name_matches(name, inc_names):
            continue
        if exc_names and _name_matches(name, exc_names):
            continue
        result[name] = param
    if not result:
        raise ValueError(
            "Expected the parameter selection to match at least one parameter, but none matched "
            f"(include_types={include_types!r}, exclude_types={exclude_types!r}, "
            f"include_names={include_names!r}, exclude_names={exclude_names!r}, "
            f"prune_classifier={prune_classifier}, prune_bias={prune_bias}, "
            f"prune_norm={prune_norm}); model parameters: "
            f"{[n for n, _ in model.named_parameters()][:20]}"
        )
    return result
