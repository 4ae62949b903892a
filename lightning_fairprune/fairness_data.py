"""The fairness-data path: from a loader (or ``group_fn``) to validated ``(x, y, g)`` batches.

`FairnessData` is what the monitor measures on and what group-aware pruning criteria compute
their per-group statistics on. It

* parses a batch into ``(inputs, targets, groups)``: ``(x, y)`` means groups = classes,
  ``(x, y, g)`` or a dict with ``input_key``/``target_key``/``group_key`` carries a
  protected attribute, and ``group_fn(batch) -> (x, y, g)`` handles any other structure;
* validates targets and group ids (integer dtype, one per sample, ids in ``[0, num_groups)``)
  with messages naming the argument, and refuses a protected attribute without
  ``num_groups``;
* resolves the loader once (the given one, else the trainer's validation loader, else the
  datamodule's or module's ``val_dataloader()`` sharded by batch index across processes),
  checks that no process would see an empty loader (the same clear error on every process),
  and caps every pass at ``max_batches``;
* converts batches like training batches (precision plugin, device) through
  :func:`lightning_fairprune.measure.prepare_batch`;
* names the groups and resolves their number and the number of classes for a model
  (`FairnessData.resolve_groups` -> `GroupSpec`);
* scans the whole data once before training (`FairnessData.scan`: every batch's targets and
  group ids, non-finite inputs, samples per group), forward-free, with the same verdict on
  every process.

It knows nothing about the monitor or the pruner; the trainer is duck-typed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from lightning_fairprune.checks import (
    check_callable,
    check_group_names,
    check_group_sizes,
    check_int,
    check_iterable,
    check_keys,
    check_labels,
    check_logits,
)
from lightning_fairprune.diagnostics.groups import (
    combine_groups,
    normalize_group_names,
    product_group_names,
)
from lightning_fairprune.history import qualified_name, to_plain
from lightning_fairprune.measure import isolated, precision_context, prepare_batch, rng_restored

__all__ = ["DataScan", "FairnessBatches", "FairnessData", "GroupSpec", "agree"]

GroupFn = Callable[[Any], "tuple[Any, Tensor, Tensor]"]


class FairnessData:
    """Where fairness batches come from and how they are parsed and validated.

    Args:
        dataloader: the fairness dataloader (used as is on every process: under DDP give each
            process its own shard); ``None``: the trainer's validation dataloader.
        num_groups: number of groups G (ids in ``[0, G)``); required when the batches carry
            group ids; default with groups = classes: the number of classes. For
            intersectional groups, one size per attribute (with a sequence ``group_key``, or a
            ``[N, k]`` group column): the groups are the ``prod(sizes)`` combinations (mixed
            radix ids, first attribute most significant; see
            `lightning_fairprune.diagnostics.groups.combine_groups`).
        max_batches: at most this many batches per pass (per process); ``None``: all.
        group_fn: ``fn(batch) -> (inputs, targets, groups)``; overrides the batch parsing.
        input_key: key of the inputs in a dict batch.
        target_key: key of the class targets in a dict batch.
        group_key: key of the group ids in a dict batch (a sequence of keys for
            intersectional groups); ``None``: groups = classes.
        group_names: names of the groups: a list of G names, a mapping id -> name, or for
            intersectional groups a mapping attribute key -> list of value names (product
            names then read ``"race=black & sex=F"``); default ``g0, g1, ...`` (or
            ``key=value`` products). See `names_for`.

    Example:
        >>> x, y, g = torch.randn(6, 2), torch.tensor([0, 1] * 3), torch.tensor([0, 0, 1] * 2)
        >>> data = FairnessData([(x, y, g)], num_groups=2)
        >>> batches = data.batches(None, device=torch.device("cpu"))
        >>> [tuple(t.shape) for t in next(iter(batches))], batches.groups_from_batch
        ([(6, 2), (6,), (6,)], True)
        >>> FairnessData([(x, y, g)]).batches(None).first()
        Traceback (most recent call last):
        ...
        ValueError: Expected `num_groups` to be given when the batches carry group ids (a protected attribute), but got None in fairness batch 0
    """  # noqa: E501

    def __init__(
        self,
        dataloader: Iterable[Any] | None = None,
        *,
        num_groups: int | Sequence[int] | None = None,
        max_batches: int | None = None,
        group_fn: GroupFn | None = None,
        input_key: str = "x",
        target_key: str = "y",
        group_key: str | Sequence[str] | None = "group",
        group_names: Sequence[str] | Mapping[Any, Any] | None = None,
    ) -> None:
        what = "an iterable of batches (a DataLoader) or None"
        self.dataloader = check_iterable(dataloader, "dataloader", what)
        sizes = check_group_sizes(num_groups)
        self.attribute_sizes = sizes if isinstance(num_groups, Sequence) else None
        self.num_groups: int | None = None if sizes is None else math.prod(sizes)
        self.max_batches = check_int(max_batches, "max_batches", 1, allow_none=True)
        self.group_fn = check_callable(group_fn, "group_fn")
        self.input_key = check_keys(input_key, "input_key")
        self.target_key = check_keys(target_key, "target_key")
        self.group_key = check_keys(group_key, "group_key", allow_list=True, allow_none=True)
        if isinstance(self.group_key, list) and len(self.group_key) != len(
            self.attribute_sizes or ()
        ):
            raise ValueError(
                f"Expected `num_groups` to give one size per attribute of `group_key` "
                f"{self.group_key} (intersectional groups), but got {num_groups!r}"
            )
        self.group_names = check_group_names(group_names)
        if self.num_groups is not None:
            self.names_for(self.num_groups)  # wrong names fail now, not at the first pass
        elif isinstance(group_names, Sequence):
            normalize_group_names(group_names, len(group_names))
        self._loader: Iterable[Any] | None = None
        self._stride = False

    # ---------------------------------------------------------------- parsing
    def split_batch(
        self, batch: Any, *, use_group_fn: bool = True
    ) -> tuple[Any, Tensor, Tensor | None]:
        """Return ``(inputs, targets, groups)`` of a batch; ``groups`` None means the classes.

        Args:
            batch: one batch of the loader.
            use_group_fn: apply ``group_fn`` if there is one (``False``: the built-in parsing).

        Example:
            >>> d = FairnessData(num_groups=2)
            >>> d.split_batch({"x": torch.zeros(2, 3), "y": torch.tensor([0, 1]),
            ...                "group": torch.tensor([1, 1])})[2].tolist()
            [1, 1]
            >>> d.split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))[2] is None
            True
        """
        if self.group_fn is not None and use_group_fn:
            out = self.group_fn(batch)
            if not isinstance(out, (tuple, list)) or len(out) != 3:
                raise ValueError(
                    "Expected `group_fn` to return a tuple (inputs, targets, groups), but got "
                    f"{type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
                )
            return out[0], out[1], out[2]
        if isinstance(batch, Mapping):
            missing = [k for k in (self.input_key, self.target_key) if k not in batch]
            keys = self.group_keys
            missing += [k for k in keys if k not in batch]
            if missing:
                raise ValueError(
                    f"Expected a dict batch with keys {missing} (`input_key`, `target_key`, "
                    f"`group_key`), but the batch has keys {sorted(map(str, batch))}; set the "
                    "keys, `group_key=None` for groups = classes, or pass `group_fn`"
                )
            if not keys:
                groups = None
            elif len(keys) == 1 and isinstance(self.group_key, str):
                groups = batch[keys[0]]
            else:
                groups = _stack_attributes([batch[k] for k in keys], keys)
            return batch[self.input_key], batch[self.target_key], groups
        if isinstance(batch, (tuple, list)):
            if len(batch) == 2:
                return batch[0], batch[1], None
            if len(batch) == 3:
                return batch[0], batch[1], batch[2]
            raise ValueError(
                "Expected a batch (inputs, targets) or (inputs, targets, groups), but got a "
                f"{type(batch).__name__} of {len(batch)} items; pass `group_fn`"
            )
        raise ValueError(
            "Expected a batch (inputs, targets), (inputs, targets, groups) or a dict, but got "
            f"{type(batch).__name__}; pass `group_fn(batch) -> (inputs, targets, groups)`"
        )

    @property
    def group_keys(self) -> list[str]:
        """The group key(s) as a list (empty: groups = classes)."""
        if self.group_key is None:
            return []
        return [self.group_key] if isinstance(self.group_key, str) else list(self.group_key)

    @property
    def attribute_names(self) -> list[str]:
        """One name per attribute of intersectional groups: the keys, else ``a0, a1, ...``.

        A single (default) ``group_key`` holding a ``[N, k]`` column names no attribute.

        Example:
            >>> FairnessData(num_groups=[2, 3]).attribute_names
            ['a0', 'a1']
            >>> FairnessData(num_groups=[2, 3], group_key=["race", "sex"]).attribute_names
            ['race', 'sex']
        """
        sizes = self.attribute_sizes or []
        keys = self.group_keys
        return keys if len(keys) == len(sizes) > 1 else [f"a{i}" for i in range(len(sizes))]

    def validate(
        self, x: Any, y: Any, g: Any | None, num_groups: int | None = None
    ) -> tuple[Any, Tensor, Tensor, bool]:
        """Check one parsed batch; return ``(x, y, groups, groups_from_batch)``.

        Raises:
            ValueError: for targets or groups that are not 1-D integer ids of one per sample,
                ids out of range, or group ids without ``num_groups``.
        """
        check_labels(y, "targets", what="class labels")
        groups_from_batch = g is not None
        limit = num_groups if num_groups is not None else self.num_groups
        if g is None:
            g = y
        else:
            if limit is None:
                raise ValueError(
                    "Expected `num_groups` to be given when the batches carry group ids "
                    "(a protected attribute), but got None"
                )
            if self.attribute_sizes is not None and len(self.attribute_sizes) > 1:
                g = self._combine(g, int(y.shape[0]))
            check_labels(
                g,
                "groups",
                upper=limit,
                n=int(y.shape[0]),
                what="group ids",
                upper_name="num_groups",
            )
        return x, y.long(), g.long(), groups_from_batch

    def _combine(self, g: Any, n: int) -> Tensor:
        """Product ids of a ``[N, k]`` tensor of attribute ids (intersectional groups)."""
        sizes = self.attribute_sizes or []
        if not isinstance(g, Tensor) or g.ndim != 2 or g.shape != (n, len(sizes)):
            raise ValueError(
                f"Expected the groups of a fairness batch to be a [N, {len(sizes)}] integer "
                f"tensor (one column per attribute, `num_groups`={sizes}), but got "
                f"{getattr(g, 'dtype', type(g).__name__)} of shape "
                f"{tuple(getattr(g, 'shape', ()))}"
            )
        names = self.attribute_names
        columns = []
        for i, (size, name) in enumerate(zip(sizes, names, strict=True)):
            column = g[:, i]
            check_labels(column, f"groups[:, {i}] ({name})", upper=size, n=n, what="attribute ids")
            columns.append(column.long())
        return combine_groups(columns, sizes).ids

    def check_group_column(self, groups_from_batch: bool, num_classes: int | None) -> None:
        """Refuse batches without groups when ``num_groups`` differs from the number of classes.

        A batch ``(x, y)`` means groups = classes; with ``num_groups`` given (a protected
        attribute) and another count of classes, measuring the classes would be silently
        wrong.

        Example:
            >>> FairnessData(num_groups=4).check_group_column(False, 10)
            Traceback (most recent call last):
            ...
            ValueError: Expected the fairness batches to carry group ids (`num_groups`=4 was given, but the model has 10 classes), but they have no group column: a batch (x, y) means groups = classes. Give batches (x, y, g), set `group_key`, or pass `group_fn`; or leave `num_groups` unset to measure the classes.
        """  # noqa: E501
        if groups_from_batch or self.num_groups is None or self.num_groups == num_classes:
            return
        raise ValueError(
            f"Expected the fairness batches to carry group ids (`num_groups`={self.num_groups} "
            f"was given, but the model has {num_classes} classes), but they have no group "
            "column: a batch (x, y) means groups = classes. Give batches (x, y, g), set "
            "`group_key`, or pass `group_fn`; or leave `num_groups` unset to measure the classes."
        )

    def names_for(self, num_groups: int) -> list[str]:
        """The names of ``num_groups`` groups (the ``group_names`` argument, normalized).

        Intersectional groups are named by their product (``"race=black & sex=F"``) from a
        mapping attribute -> value names, or ``key=value`` by default.

        Example:
            >>> FairnessData(num_groups=[2, 2], group_key=["r", "s"]).names_for(4)
            ['r=0 & s=0', 'r=0 & s=1', 'r=1 & s=0', 'r=1 & s=1']
            >>> FairnessData(group_names={1: "b"}).names_for(3)
            ['g0', 'b', 'g2']
        """
        names, sizes = self.group_names, self.attribute_sizes
        if sizes is not None and len(sizes) > 1:
            keys = self.attribute_names
            if names is None:
                return product_group_names(sizes, keys)
            if isinstance(names, Mapping) and all(k in names for k in keys):
                return product_group_names(sizes, keys, [names[k] for k in keys])
            num_groups = math.prod(sizes)
        return normalize_group_names(names, num_groups)

    def resolve_groups(
        self,
        model: Any,
        batches: FairnessBatches,
        owner: str = "FairnessData",
        *,
        forward_fn: Callable[[Any, Any], Any] | None = None,
        classes: bool = True,
    ) -> GroupSpec:
        """The groups of this data for ``model``: their number, the classes and the names.

        One forward pass on the first batch (without gradients) reads the number of classes
        from the logits; with ``classes=False`` and ``num_groups`` given there is none (the
        class count stays ``None``: a measurement pass reads it).

        Args:
            model: the classifier.
            batches: this data's batches (`batches`).
            owner: what needs the groups, for the messages (e.g. ``"criterion='fairprune'"``).
            forward_fn: ``fn(model, inputs) -> logits``; default ``model(inputs)``.
            classes: whether the number of classes is needed.

        Raises:
            ValueError: outputs that are not class logits ``(N, C)`` with ``C >= 2``, targets
                outside ``[0, C)``, or `check_group_column`.

        Example:
            >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
            >>> data = FairnessData([(x, y)], group_names=["a", "b", "c"])
            >>> data.resolve_groups(torch.nn.Linear(3, 3), data.batches(None))
            GroupSpec(num_groups=3, num_classes=3, names=('a', 'b', 'c'))
        """
        if not classes and self.num_groups is not None:
            return GroupSpec(self.num_groups, None, tuple(self.names_for(self.num_groups)))
        x, y, _ = batches.first()
        with torch.no_grad():
            num_classes = check_logits(
                model(x) if forward_fn is None else forward_fn(model, x), y, owner
            )
        self.check_group_column(batches.groups_from_batch, num_classes)
        num_groups = self.num_groups or num_classes
        return GroupSpec(num_groups, num_classes, tuple(self.names_for(num_groups)))

    def check(
        self,
        trainer: Any | None,
        model: Any,
        owner: str = "FairnessData",
        *,
        forward_fn: Callable[[Any, Any], Any] | None = None,
        num_groups: int | None = None,
    ) -> GroupSpec:
        """Validate the whole data for ``model`` before any training; every process agrees.

        Resolves the groups from the first batch (`resolve_groups`, one forward in eval mode,
        isolated: the loader exists and is not empty on any process, ``num_groups`` is given
        when the batches carry groups and matches them), then checks every batch of this
        process's share (`scan`: ids, ranges, non-finite inputs, empty groups). The loader is
        resolved again at the next pass.

        Args:
            trainer: the Trainer (duck-typed) or ``None``.
            model: the classifier.
            owner: the callback the data belongs to, for the messages.
            forward_fn: ``fn(model, inputs) -> logits``; default ``model(inputs)``.
            num_groups: the number of groups resolved so far (a resumed run's), or ``None``.

        Returns:
            The `GroupSpec`.

        Raises:
            ValueError: naming what is wrong, on every process.

        Example:
            >>> x, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
            >>> FairnessData([(x, y)]).check(None, torch.nn.Linear(2, 2)).num_classes
            2
        """
        error: ValueError | None = None
        spec: GroupSpec | None = None
        try:
            with isolated(model, mode="eval"), precision_context(trainer):
                batches = self.batches(trainer, model, num_groups=num_groups)
                spec = self.resolve_groups(model, batches, owner, forward_fn=forward_fn)
        except ValueError as err:
            error = err
        agree(trainer, model, error, owner)  # every process raises, or none
        spec = cast(GroupSpec, spec)  # resolved: `agree` raised otherwise
        self.scan(trainer, model, num_groups=spec.num_groups, owner=owner)
        self.reset()
        return spec

    def settings(self) -> dict[str, Any]:
        """The arguments as plain JSON values (callables by qualified name).

        Example:
            >>> FairnessData(num_groups=[5, 2], group_key=["race", "sex"]).settings()["group_key"]
            ['race', 'sex']
        """
        return {
            "dataloader": qualified_name(self.dataloader),
            "num_groups": self.num_groups,
            "max_batches": self.max_batches,
            "group_fn": qualified_name(self.group_fn),
            "input_key": self.input_key,
            "target_key": self.target_key,
            "group_key": to_plain(self.group_key),
            "group_names": to_plain(self.group_names),
        }

    # ---------------------------------------------------------------- the loader
    def resolve(self, trainer: Any | None, model: Any | None = None) -> Iterable[Any]:
        """The loader, resolved once (see the module docstring); checked not to be empty.

        Raises:
            ValueError: when there is no loader, or some process would get no batch.
        """
        if self._loader is not None:
            return self._loader
        self._stride = False
        loader: Any = self.dataloader
        if loader is None:
            loader = getattr(trainer, "val_dataloaders", None)
            reason = ""
            if loader is None:
                loader = _fit_val_dataloaders(trainer)
                self._stride = (
                    loader is not None and int(getattr(trainer, "world_size", 1) or 1) > 1
                )
            if loader is None:
                datamodule = getattr(trainer, "datamodule", None)
                source = datamodule if datamodule is not None else model
                getter = getattr(source, "val_dataloader", None)
                try:
                    loader = getter() if callable(getter) else None
                except Exception as err:  # e.g. "`val_dataloader` must be implemented"
                    reason = f" ({type(source).__name__}.val_dataloader(): {err})"
                self._stride = int(getattr(trainer, "world_size", 1) or 1) > 1
            if isinstance(loader, Mapping):
                loader = next(iter(loader.values()), None) if len(loader) else None
            elif isinstance(loader, (list, tuple)):
                if len(loader) > 1:
                    warnings.warn(
                        f"FairnessMonitor uses the first of {len(loader)} validation "
                        "dataloaders; pass `dataloader` to choose another.",
                        UserWarning,
                        stacklevel=3,
                    )
                loader = loader[0] if len(loader) else None
            if loader is None:
                raise ValueError(
                    "Expected a fairness dataloader: pass `dataloader` to FairnessMonitor or "
                    f"give the trainer a validation dataloader, but found none{reason}"
                )
        if not isinstance(loader, Iterable):
            raise TypeError(
                f"Expected the fairness dataloader to be iterable, but got {type(loader).__name__}"
            )
        self._check_not_empty(trainer, model, loader)
        self._loader = loader
        return loader

    def reset(self) -> None:
        """Forget the resolved loader (resolved again at the next pass)."""
        self._loader = None

    def _rank_world(self, trainer: Any | None) -> tuple[int, int]:
        world = int(getattr(trainer, "world_size", 1) or 1)
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        return rank, world

    def _check_not_empty(self, trainer: Any | None, model: Any | None, loader: Any) -> None:
        """Raise on every process when some process would measure no batch (no deadlock)."""
        try:
            total: int | None = len(loader)
        except TypeError:  # an iterable without len (an IterableDataset): peek at it below
            total = None
        rank, world = self._rank_world(trainer)
        if total is None:
            first = rank if self._stride and world > 1 else 0
            local = 0
            for index, _ in enumerate(loader):
                if index >= first:
                    local = 1
                    break
        elif self._stride:
            local = len(range(rank, total, world))
        else:
            local = total
        empty = 1.0 if local == 0 else 0.0
        if world > 1 and trainer is not None:
            device = next(model.parameters()).device if model is not None else None
            flag = torch.tensor([empty], dtype=torch.float32, device=device)
            empty = float(trainer.strategy.reduce(flag, reduce_op="sum").sum())
        if empty > 0:
            where = "" if world == 1 else f" on {int(empty)} of {world} processes"
            raise ValueError(
                "Expected the fairness dataloader to yield at least one batch on every "
                f"process, but it has no batches{where}"
                + (f" (len {total})" if total is not None else "")
                + "; pass a `dataloader` with data for every process"
            )

    def _offending(self, parsed: Any, limit: int | None) -> str:
        """`` (offending ids: [...])`` of a parsed batch whose ids are out of range, else ``""``."""
        if parsed is None:
            return ""
        _, y, g = parsed
        ids: list[Any] = []
        sizes = self.attribute_sizes
        if isinstance(g, Tensor) and g.ndim == 2 and sizes and g.shape[1] == len(sizes):
            bad = g[((g < 0) | (g >= torch.tensor(sizes, device=g.device))).any(1)]
            ids = sorted({tuple(int(v) for v in row) for row in bad.tolist()})
        else:
            ids_t = g if g is not None else y
            if isinstance(ids_t, Tensor) and ids_t.ndim == 1 and not ids_t.is_floating_point():
                high = limit if limit is not None else math.inf
                ids = sorted({int(v) for v in ids_t.tolist() if v < 0 or v >= high})
        return f" (offending ids: {ids[:5]}{', ...' if len(ids) > 5 else ''})" if ids else ""

    def scan(
        self,
        trainer: Any | None,
        model: Any | None = None,
        *,
        num_groups: int | None = None,
        owner: str = "FairnessData",
    ) -> DataScan:
        """Check every batch of this process's share once, before training; no forward pass.

        Each batch (at most ``max_batches``, sharded across processes as the measurement
        passes are) is parsed and its targets and group ids are validated, its floating
        inputs are checked to be finite, and the samples of every group are counted. Under
        data parallelism the counts and the verdict are all-reduced, so that a bad batch on one
        process raises on every process (no process is left waiting in a collective). The
        loader's RNG (its generator and the global RNGs a shuffling sampler draws from) is
        restored afterwards, so a scan leaves training bitwise unchanged.

        Args:
            trainer: the Trainer (duck-typed: ``world_size``, ``global_rank``,
                ``strategy.reduce``) or ``None``.
            model: the model (its device for the collectives).
            num_groups: the resolved number of groups (default: ``num_groups``); ``None``
                with groups = classes: ids are checked to be non-negative and not counted.
            owner: the callback the data belongs to, for the messages.

        Returns:
            A `DataScan`. Groups with no sample are reported with a ``UserWarning``.

        Raises:
            ValueError: naming the batch index and what is wrong: the offending group ids,
                or, for non-finite inputs, the groups of the samples that hold them.

        Example:
            >>> x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
            >>> ok, bad = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 9, 1])
            >>> FairnessData([(x, y, ok), (x, y, ok)], num_groups=3).scan(None).counts
            [2, 4, 2]
            >>> FairnessData([(x, y, ok), (x, y, bad)], num_groups=3).scan(None)
            Traceback (most recent call last):
            ...
            ValueError: Expected `groups` to hold group ids in [0, 3) (`num_groups`=3), but got ids from 0 to 9 in fairness batch 1 (offending ids: [9])
        """  # noqa: E501
        loader = self.resolve(trainer, model)
        rank, world = self._rank_world(trainer) if self._stride else (0, 1)
        limit = num_groups if num_groups is not None else self.num_groups
        counts = torch.zeros(limit or 0, dtype=torch.float64)
        scanned, from_batch, counted, error = 0, False, limit is not None, None
        with rng_restored([loader]):
            for index, batch in _shard(loader, rank, world, self.max_batches):
                try:
                    g, found = self._scan_batch(index, batch, limit, num_groups, owner)
                except ValueError as err:
                    error = err
                    break
                scanned, from_batch = scanned + 1, from_batch or found
                counted = counted and (found or num_groups is not None)
                if counted:
                    counts += torch.bincount(g.cpu(), minlength=len(counts)).to(counts.dtype)
        summed = torch.cat([counts, counts.new([scanned])])
        total = agree(trainer, model, error, owner, summed)
        counts, scanned = total[:-1], int(total[-1])
        result = DataScan(scanned, [int(c) for c in counts.tolist()] if counted else [], from_batch)
        empty = result.empty_groups
        if empty:
            several = len(empty) > 1
            warnings.warn(
                f"{owner}: group{'s' if several else ''} {', '.join(map(str, empty))} of {limit} "
                f"{'have' if several else 'has'} no samples in the fairness data ({scanned} "
                f"batch{'es' if scanned != 1 else ''} scanned); {'their' if several else 'its'} "
                "per-group numbers are undefined. Check `num_groups` and the group ids.",
                UserWarning,
                stacklevel=2,
            )
        return result

    def _scan_batch(
        self, index: int, batch: Any, limit: int | None, classes: int | None, owner: str
    ) -> tuple[Tensor, bool]:
        """Validate one raw batch; return its group ids and whether the batch carries them."""
        parsed: Any = None
        try:
            parsed = self.split_batch(batch)
            x, y, g, found = self.validate(*parsed, limit)
            if not found and classes is not None:  # groups = classes: below the resolved G
                what = "class labels (groups = classes)"
                check_labels(y, "targets", upper=classes, what=what, upper_name="num_groups")
        except (ValueError, TypeError) as err:
            bound = limit if parsed is None or parsed[2] is not None else classes
            offending = self._offending(parsed, bound)
            raise ValueError(f"{err} in fairness batch {index}{offending}") from err
        bad_rows = _nonfinite_rows(x, int(y.shape[0]))
        if bad_rows is not None:
            groups = sorted({int(v) for v in g[bad_rows.to(g.device)].tolist()})
            raise ValueError(
                f"Expected finite inputs in the fairness data of {owner}, but fairness batch "
                f"{index} has NaN or infinite values in {int(bad_rows.sum())} sample(s) of "
                f"group(s) {groups} ({'group ids' if found else 'classes (groups = classes)'})"
            )
        return g, found

    def batches(
        self,
        trainer: Any | None,
        model: Any | None = None,
        *,
        device: torch.device | None = None,
        num_groups: int | None = None,
    ) -> FairnessBatches:
        """A re-iterable view of this process's validated, converted batches.

        Args:
            trainer: the Trainer (duck-typed) or ``None``.
            model: the model (its device is the default target).
            device: target device; default: the model's.
            num_groups: the resolved number of groups (overrides the argument).
        """
        loader = self.resolve(trainer, model)
        rank, world = self._rank_world(trainer) if self._stride else (0, 1)
        if device is None and model is not None:
            device = getattr(model, "device", None)
            if not isinstance(device, torch.device):
                device = next(model.parameters()).device
        return FairnessBatches(self, loader, trainer, device, rank, world, num_groups)


def _fit_val_dataloaders(trainer: Any | None) -> Any | None:
    """Validation loaders given to ``trainer.fit(val_dataloaders=...)``, or ``None``.

    At fit start ``trainer.val_dataloaders`` is still empty: Lightning keeps the loaders in its
    validation loop's data source until it loads them. A module or datamodule there is not a
    loader (``None``: the caller asks it for ``val_dataloader()``).
    """
    loop = getattr(
        getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None
    )
    instance = getattr(getattr(loop, "_data_source", None), "instance", None)
    if instance is None or hasattr(instance, "val_dataloader"):
        return None
    return instance


def _stack_attributes(values: list[Any], keys: list[str]) -> Tensor:
    """``[N, k]`` attribute ids from one ``[N]`` tensor per key."""
    for key, value in zip(keys, values, strict=True):
        check_labels(value, f"batch[{key!r}]", what="attribute ids")
    return torch.stack([v.long() for v in values], dim=1)


@dataclass(frozen=True)
class DataScan:
    """What `FairnessData.scan` found (over all processes).

    Attributes:
        num_batches: batches scanned.
        counts: samples per group (empty when the number of groups was not known).
        groups_from_batch: whether the batches carry group ids (else groups = classes).
    """

    num_batches: int
    counts: list[int]
    groups_from_batch: bool

    @property
    def empty_groups(self) -> list[int]:
        """Ids of the groups with no sample."""
        return [g for g, c in enumerate(self.counts) if c == 0]


@dataclass(frozen=True)
class GroupSpec:
    """The groups of fairness data for a model (`FairnessData.resolve_groups`).

    Attributes:
        num_groups: number of groups G.
        num_classes: number of classes C (``None`` until a pass over the data read it).
        names: the G group names.
    """

    num_groups: int
    num_classes: int | None
    names: tuple[str, ...]


def agree(
    trainer: Any | None,
    model: Any | None,
    error: BaseException | None,
    owner: str,
    values: Tensor | None = None,
) -> Tensor:
    """Raise on every process when some process failed a check (no one left waiting).

    Call it on every process after a check that can fail on one process only (its share of
    the data differs): the process that failed raises its own error, the others a ValueError
    saying that another process failed. One all-reduce under data parallelism, which also sums
    ``values`` across processes.

    Args:
        trainer: the Trainer (duck-typed: ``world_size``, ``strategy.reduce``) or ``None``.
        model: the model (its device for the collective).
        error: this process's error, or ``None``.
        owner: whose data was checked, for the message.
        values: float64 numbers to sum across processes in the same collective.

    Returns:
        ``values`` summed over the processes (an empty tensor without ``values``).

    Example:
        >>> agree(None, None, None, "FairnessMonitor", torch.tensor([2.0])).tolist()
        [2.0]
        >>> agree(None, None, ValueError("bad batch"), "FairnessMonitor")
        Traceback (most recent call last):
        ...
        ValueError: bad batch
    """
    values = torch.zeros(0, dtype=torch.float64) if values is None else values
    failed = 1.0 if error is not None else 0.0
    others = 0
    if trainer is not None and int(getattr(trainer, "world_size", 1) or 1) > 1:
        device = next(model.parameters()).device if model is not None else None
        flat = torch.cat([values.new([failed]), values]).to(device)
        total = trainer.strategy.reduce(flat, reduce_op="sum").cpu()
        others, values = int(total[0]) - int(failed), total[1:]
    if error is not None:
        raise error
    if others:
        raise ValueError(
            f"Expected valid fairness data of {owner} on every process, but {others} other "
            "process(es) failed a check (their error names it)"
        )
    return values


def _shard(
    loader: Iterable[Any], rank: int, world: int, limit: int | None
) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` of this process's share (every ``world``-th batch), at most ``limit``."""
    count = 0
    for index, batch in enumerate(loader):
        if world > 1 and index % world != rank:
            continue
        if limit is not None and count >= limit:
            break
        count += 1
        yield index, batch


def _nonfinite_rows(x: Any, n: int) -> Tensor | None:
    """``[n]`` bool: samples with a NaN/inf in a floating input tensor (``None``: all finite).

    Nested inputs (dicts, lists, tuples) are walked; a tensor whose first dimension is not
    the batch marks every sample when it holds a non-finite value.
    """
    if isinstance(x, Tensor):
        if not (x.is_floating_point() or x.is_complex()):
            return None
        if x.ndim >= 1 and x.shape[0] == n:
            rows = ~torch.isfinite(x.reshape(n, -1)).all(1) if x.numel() else None
        else:
            rows = torch.full((n,), True) if not bool(torch.isfinite(x).all()) else None
        return None if rows is None or not bool(rows.any()) else rows.cpu()
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else ()
    found: Tensor | None = None
    for item in items:
        rows = _nonfinite_rows(item, n)
        if rows is not None:
            found = rows if found is None else found | rows
    return found


class FairnessBatches:
    """Re-iterable ``(x, y, g)`` batches of one process, validated and converted."""

    def __init__(
        self,
        data: FairnessData,
        loader: Iterable[Any],
        trainer: Any | None,
        device: torch.device | None,
        rank: int,
        world_size: int,
        num_groups: int | None,
    ) -> None:
        self.data = data
        self.loader = loader
        self.trainer = trainer
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.num_groups = num_groups
        self.groups_from_batch = False

    def _convert(self, batch: Any) -> tuple[Any, Tensor, Tensor]:
        x, y, g = self.data.split_batch(batch)
        x, y, g, from_batch = self.data.validate(x, y, g, self.num_groups)
        self.groups_from_batch = self.groups_from_batch or from_batch
        return prepare_batch((x, y, g), self.trainer, self.device)

    def first(self) -> tuple[Any, Tensor, Tensor]:
        """The first batch (validated and converted)."""
        for batch in self:
            return batch
        raise ValueError(
            "Expected the fairness dataloader to yield at least one batch, but got none"
        )

    def __iter__(self) -> Iterator[tuple[Any, Tensor, Tensor]]:
        count = 0
        for index, batch in _shard(self.loader, self.rank, self.world_size, self.data.max_batches):
            count += 1
            try:
                converted = self._convert(batch)
            except (ValueError, TypeError) as err:  # name the batch, like `FairnessData.scan`
                raise type(err)(f"{err} in fairness batch {index}") from err
            yield converted
        if count == 0 and self.world_size == 1:
            raise ValueError(
                "Expected the fairness dataloader to yield at least one batch, but got none"
            )
