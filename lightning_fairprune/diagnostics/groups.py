"""Group names, intersectional (product) groups and logger-safe slugs.

`normalize_group_names` turns a list, a mapping id -> name or None into G unique names;
`combine_groups` builds intersectional groups (one product id per sample from several
attribute id tensors, with readable names such as ``"race=black & sex=F"``) and
`split_groups` inverts it; `product_group_names` names the product groups and `group_slugs`
makes names safe for logger keys. `lightning_fairprune.fairness_data.FairnessData`, the
monitor and the history use them. Plain torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from torch import Tensor

from lightning_fairprune.checks import check_int, check_labels

__all__ = [
    "CombinedGroups",
    "combine_groups",
    "group_slugs",
    "normalize_group_names",
    "product_group_names",
    "split_groups",
]


def normalize_group_names(
    group_names: Sequence[str] | Mapping[int, str] | None, num_groups: int
) -> list[str]:
    """A list of ``num_groups`` unique names from a list, a mapping id -> name, or None.

    None gives ``g0, g1, ...``; a mapping may name only some ids (the others get ``g<id>``).

    Args:
        group_names: the names.
        num_groups: number of groups G.

    Returns:
        ``list[str]`` of length G.

    Raises:
        ValueError: wrong length, ids outside ``[0, G)``, empty or duplicate names.
        TypeError: names that are not strings, or ids that are not ints.

    Example:
        >>> normalize_group_names({1: "black"}, 3)
        ['g0', 'black', 'g2']
        >>> normalize_group_names(["a", "b"], 2)
        ['a', 'b']
    """
    check_int(num_groups, "num_groups", 1)
    if group_names is None:
        return [f"g{i}" for i in range(num_groups)]
    if isinstance(group_names, Mapping):
        names = [f"g{i}" for i in range(num_groups)]
        for key, name in group_names.items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise TypeError(f"Expected `group_names` keys to be int group ids, but got {key!r}")
            if not 0 <= key < num_groups:
                raise ValueError(
                    f"Expected `group_names` keys in [0, {num_groups}), but got {key!r}"
                )
            names[key] = name
    elif isinstance(group_names, Sequence) and not isinstance(group_names, (str, bytes)):
        names = list(group_names)
        if len(names) != num_groups:
            raise ValueError(
                f"Expected `group_names` to have {num_groups} names (one per group), but got"
                f" {len(names)}: {names!r}"
            )
    else:
        raise TypeError(
            "Expected `group_names` to be a list of names or a mapping id -> name, but got"
            f" {group_names!r}"
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"Expected `group_names` to hold strings, but got {name!r}")
        if not name.strip():
            raise ValueError(f"Expected `group_names` to hold non-empty names, but got {name!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Expected `group_names` to be unique, but got duplicates {dupes}")
    return names


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def group_slugs(group_names: Sequence[str]) -> list[str]:
    """Logger-key-safe, unique slugs of group names (letters, digits, ``_``, ``.``, ``-``).

    ``=`` becomes ``-``, every other run of unsafe characters (spaces, ``&``, ``/``) becomes
    ``_``; a slug that collides with an earlier one gets ``_<index>`` appended.

    Args:
        group_names: names, e.g. from `normalize_group_names`.

    Returns:
        ``list[str]`` of the same length.

    Example:
        >>> group_slugs(["race=black & sex=F", "a/b", "a b"])
        ['race-black_sex-F', 'a_b', 'a_b_2']
    """
    slugs: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(group_names):
        if not isinstance(name, str):
            raise TypeError(f"Expected `group_names` to hold strings, but got {name!r}")
        slug = _UNSAFE.sub("_", name.replace("=", "-")).strip("_") or f"g{i}"
        if slug in seen:
            slug = f"{slug}_{i}"
        seen.add(slug)
        slugs.append(slug)
    return slugs


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise ValueError(f"Expected `sizes` to be a non-empty list of ints, but got {sizes!r}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"Expected `sizes` to hold positive ints, but got {sizes!r}")
    return list(sizes)


def product_group_names(
    sizes: Sequence[int],
    names: Sequence[str] | None = None,
    value_names: Sequence[Sequence[str] | Mapping[int, str] | None] | None = None,
) -> list[str]:
    """Readable names of the product groups of several attributes, in product-id order.

    The id of values ``(v_0, ..., v_{k-1})`` is mixed radix with the first attribute most
    significant: ``((v_0·s_1) + v_1)·s_2 + ...``. A name reads ``"race=black & sex=F"``.

    Args:
        sizes: number of values of each attribute.
        names: attribute names (default ``a0, a1, ...``).
        value_names: per attribute, value names as for `normalize_group_names` (None:
            the value ids ``0, 1, ...``).

    Returns:
        ``prod(sizes)`` names.

    Example:
        >>> product_group_names([2, 2], ["race", "sex"], [["white", "black"], ["M", "F"]])
        ['race=white & sex=M', 'race=white & sex=F', 'race=black & sex=M', 'race=black & sex=F']
    """
    sizes = _check_sizes(sizes)
    k = len(sizes)
    if names is None:
        names = [f"a{i}" for i in range(k)]
    if isinstance(names, (str, bytes)) or len(names) != k:
        raise ValueError(f"Expected `names` to have {k} attribute names, but got {names!r}")
    if value_names is None:
        value_names = [None] * k
    if len(value_names) != k:
        raise ValueError(
            f"Expected `value_names` to have {k} entries (one per attribute), but got"
            f" {value_names!r}"
        )
    values = []
    for s, vn in zip(sizes, value_names, strict=True):
        values.append([str(i) for i in range(s)] if vn is None else normalize_group_names(vn, s))
    out = [""]
    for attr, vals in zip(names, values, strict=True):
        out = [
            f"{prefix} & {attr}={v}" if prefix else f"{attr}={v}" for prefix in out for v in vals
        ]
    return out


class CombinedGroups(NamedTuple):
    """Product group ids and names returned by `combine_groups`."""

    ids: Tensor
    names: list[str]
    num_groups: int


def combine_groups(
    attributes: Sequence[Tensor],
    sizes: Sequence[int],
    names: Sequence[str] | None = None,
    value_names: Sequence[Sequence[str] | Mapping[int, str] | None] | None = None,
) -> CombinedGroups:
    """Intersectional groups: one product id per sample from several attribute id tensors.

    Args:
        attributes: one integer tensor ``[N]`` per attribute, values in ``[0, sizes[i])``.
        sizes: number of values of each attribute.
        names: attribute names (see `product_group_names`).
        value_names: value names per attribute (see `product_group_names`).

    Returns:
        ``CombinedGroups(ids, names, num_groups)``: int64 ids ``[N]`` (mixed radix, first
        attribute most significant), all ``prod(sizes)`` names, and their number.

    Example:
        >>> import torch
        >>> c = combine_groups([torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])], [2, 2],
        ...                    ["race", "sex"], [["white", "black"], ["M", "F"]])
        >>> c.ids.tolist(), [c.names[i] for i in c.ids.tolist()]
        ([1, 2, 3], ['race=white & sex=F', 'race=black & sex=M', 'race=black & sex=F'])
    """
    sizes = _check_sizes(sizes)
    if isinstance(attributes, Tensor) or not isinstance(attributes, Sequence):
        raise TypeError(
            f"Expected `attributes` to be a list of 1-D tensors, but got {type(attributes)}"
        )
    if len(attributes) != len(sizes):
        raise ValueError(
            f"Expected `attributes` to have {len(sizes)} tensors (one per size), but got"
            f" {len(attributes)}"
        )
    ids: Tensor | None = None
    for i, (a, s) in enumerate(zip(attributes, sizes, strict=True)):
        check_labels(a, f"attributes[{i}]", upper=s, what="attribute values")
        if ids is not None and a.shape != ids.shape:
            raise ValueError(
                f"Expected `attributes` of the same length, but got {tuple(a.shape)} at index"
                f" {i} and {tuple(ids.shape)} before"
            )
        ids = a.long() if ids is None else ids * s + a.long()
    assert ids is not None  # sizes is non-empty
    group_names = product_group_names(sizes, names, value_names)
    return CombinedGroups(ids, group_names, len(group_names))


def split_groups(ids: Tensor, sizes: Sequence[int]) -> tuple[Tensor, ...]:
    """Inverse of `combine_groups`: attribute value ids from product group ids.

    Args:
        ids: product ids ``[N]`` in ``[0, prod(sizes))``.
        sizes: number of values of each attribute.

    Returns:
        One int64 tensor ``[N]`` per attribute.

    Example:
        >>> import torch
        >>> [t.tolist() for t in split_groups(torch.tensor([1, 2, 3]), [2, 2])]
        [[0, 1, 1], [1, 0, 1]]
    """
    sizes = _check_sizes(sizes)
    check_labels(ids, "ids", upper=math.prod(sizes), what="product group ids")
    rest = ids.long()
    out = []
    for s in reversed(sizes):
        out.append(rest % s)
        rest = rest // s
    return tuple(reversed(out))
