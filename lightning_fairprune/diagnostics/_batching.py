"""Batch plumbing shared by the curvature diagnostics (internal).

* `split_batch`: ``(inputs, targets[, groups])`` -> the three parts, validated.
* nested-input helpers (a tensor, or tuples/lists/dicts of tensors sharing the first dim).
* `Regrouper`: reorders samples across batches into *pure-group chunks* of a fixed size, so
  that per-group forward/backward work processes every sample exactly once in full-size
  chunks (G groups cost about one pass, not G passes).
* `VmapGrads`: gradient sums of several pure-group chunks (or per-sample gradients) in one
  ``torch.func.vmap`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_labels

Nested = Any  # a Tensor, or a tuple/list/dict of Nested
LossFn = Callable[[Tensor, Tensor], Tensor]
ForwardFn = Callable[[nn.Module, Nested], Tensor]


def tree_map(fn: Callable[[Tensor], Tensor], x: Nested) -> Nested:
    """Apply ``fn`` to every tensor of a nested structure."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x)
    raise TypeError(
        "Expected model inputs to be a torch.Tensor or a tuple/list/dict of tensors, but got"
        f" {type(x)}"
    )


def first_tensor(x: Nested) -> Tensor:
    """The first tensor leaf of a nested structure."""
    if isinstance(x, Tensor):
        return x
    values = list(x.values()) if isinstance(x, Mapping) else list(x)
    for v in values:
        try:
            return first_tensor(v)
        except TypeError:
            continue
    raise TypeError(f"Expected model inputs to contain a torch.Tensor, but got {type(x)}")


def tree_cat(parts: list[Nested]) -> Nested:
    """Concatenate nested structures along dim 0."""
    head = parts[0]
    if isinstance(head, Tensor):
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if isinstance(head, Mapping):
        return {k: tree_cat([p[k] for p in parts]) for k in head}
    return type(head)(tree_cat([p[i] for p in parts]) for i in range(len(head)))


def split_batch(batch: Any) -> tuple[Nested, Tensor, Tensor]:
    """Return ``(inputs, targets, groups)`` of a batch; groups default to the targets.

    Raises:
        TypeError: when the batch is not a tuple/list ``(inputs, targets[, groups])``.
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        inputs, targets = batch[0], batch[1]
        groups = batch[2] if len(batch) == 3 else None
        if groups is None:
            groups = targets
        if not isinstance(targets, Tensor) or not isinstance(groups, Tensor):
            raise TypeError(
                "Expected each batch to be (inputs, targets, groups) with tensor targets and"
                f" groups, but got targets {type(targets)} and groups {type(groups)}"
            )
        return inputs, targets, groups
    raise TypeError(
        "Expected each batch to be a tuple (inputs, targets, groups) or (inputs, targets)"
        f" (groups = targets), but got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def check_groups(groups: Tensor, num_groups: int, n: int) -> None:
    """Raise ValueError unless ``groups`` is 1-D integer of length ``n`` in [0, num_groups)."""
    check_labels(groups, "groups", upper=num_groups, n=n, what="group ids", upper_name="num_groups")


def check_targets(targets: Tensor, n: int, num_classes: int | None) -> None:
    """Raise ValueError unless ``targets`` are integer class labels in [0, num_classes)."""
    check_labels(
        targets,
        "targets",
        upper=num_classes,
        n=n,
        what="class labels",
        upper_name=None if num_classes is None else "num_classes",
    )


class Regrouper:
    """Buffer samples per group and emit pure-group chunks of ``chunk_size`` samples.

    `push` yields full chunks while keeping at least ``chunk_size`` samples of a group in its
    buffer (so at most ``2 * chunk_size`` wait per group); `flush` yields what is left, in
    group order: one chunk of up to 1.5 ``chunk_size`` samples, or two halves of a larger
    remainder. A group with at least ``chunk_size`` samples therefore never ends with a tiny
    chunk (whose fixed per-chunk cost, e.g. K Hessian-vector products, would be wasted).
    """

    def __init__(self, num_groups: int, chunk_size: int) -> None:
        self.num_groups = num_groups
        self.chunk_size = chunk_size
        self._buf: dict[int, list[tuple[Nested, Tensor]]] = {}
        self._len: dict[int, int] = {}

    def push(
        self, inputs: Nested, targets: Tensor, groups: Tensor
    ) -> Iterator[tuple[int, Nested, Tensor]]:
        """Add one batch; yield ``(group, inputs, targets)`` for every completed chunk."""
        order = torch.argsort(groups, stable=True)
        counts = torch.bincount(groups, minlength=self.num_groups).tolist()
        xs = tree_map(lambda t: t.index_select(0, order.to(t.device)), inputs)
        ys = targets.index_select(0, order.to(targets.device))
        start = 0
        for a, c in enumerate(counts):
            if c == 0:
                continue
            part_x = tree_map(lambda t, s=start, c=c: t[s : s + c], xs)
            part_y = ys[start : start + c]
            start += c
            self._buf.setdefault(a, []).append((part_x, part_y))
            self._len[a] = self._len.get(a, 0) + c
            if self._len[a] >= 2 * self.chunk_size:
                yield from self._emit(a)

    def _emit(self, a: int) -> Iterator[tuple[int, Nested, Tensor]]:
        parts = self._buf.pop(a)
        total = self._len.pop(a)
        x = tree_cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        cs = self.chunk_size
        full = (total // cs - 1) * cs  # keep between cs and 2 cs samples buffered
        for s in range(0, full, cs):
            yield a, tree_map(lambda t, s=s: t[s : s + cs], x), y[s : s + cs]
        if full < total:
            self._buf[a] = [(tree_map(lambda t: t[full:], x), y[full:])]
            self._len[a] = total - full

    def flush(self) -> Iterator[tuple[int, Nested, Tensor]]:
        """Yield the remaining partial chunks, one per group that has samples left."""
        for a in sorted(self._buf):
            parts = self._buf.pop(a)
            self._len.pop(a)
            x = tree_cat([p[0] for p in parts])
            y = torch.cat([p[1] for p in parts])
            total = y.shape[0]
            if 2 * total <= 3 * self.chunk_size:
                yield a, x, y
            else:
                half = total // 2
                yield a, tree_map(lambda t, h=half: t[:h], x), y[:half]
                yield a, tree_map(lambda t, h=half: t[h:], x), y[half:]


def default_forward(model: nn.Module, inputs: Nested) -> Tensor:
    """``model(x)``; a tuple/list is unpacked as positional, a dict as keyword arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy ``[N]``."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


class _Forward(nn.Module):
    """``forward_fn(model, inputs)`` as a module, so `functional_call` can swap parameters."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.m = model
        self.forward_fn = forward_fn

    def forward(self, inputs: Nested) -> Tensor:
        return self.forward_fn(self.m, inputs)


def _pad_stack(parts: list[Nested], index: list[Tensor]) -> Nested:
    """Stack nested chunks to ``[B, L, ...]``, chunk j gathered at ``index[j]`` (padding)."""
    head = parts[0]
    if isinstance(head, Tensor):
        return torch.stack(
            [p.index_select(0, i.to(p.device)) for p, i in zip(parts, index, strict=True)]
        )
    if isinstance(head, Mapping):
        return {k: _pad_stack([p[k] for p in parts], index) for k in head}
    return type(head)(_pad_stack([p[i] for p in parts], index) for i in range(len(head)))


class VmapGrads:
    """Gradient sums of several pure-group chunks in one call: ``vmap`` of ``grad``.

    Chunks are padded to the longest by repeating their own samples (finite, valid inputs)
    with weight 0, so each chunk's gradient is exactly the sum over its real samples.
    `stacked` takes chunks already stacked ``[B, L, ...]`` (``L = 1``: per-sample gradients).
    """

    def __init__(
        self,
        model: nn.Module,
        forward_fn: ForwardFn,
        loss_fn: LossFn,
        named: list[tuple[str, Tensor]],
    ) -> None:
        from torch.func import functional_call, grad, vmap

        wrapped = _Forward(model, forward_fn)
        names = ["m." + n for n, _ in named]
        self.params = [p for _, p in named]

        def total(pvals: tuple[Tensor, ...], x: Nested, y: Tensor, w: Tensor) -> Any:
            out = functional_call(wrapped, dict(zip(names, pvals, strict=True)), (x,))
            losses = loss_fn(out, y)
            if not isinstance(losses, Tensor) or losses.shape != y.shape:
                raise ValueError(
                    f"Expected `loss_fn` to return per-sample losses of shape {tuple(y.shape)},"
                    " but got"
                    f" {tuple(losses.shape) if isinstance(losses, Tensor) else type(losses)}"
                )
            weighted = (losses * w).sum()
            return weighted, (weighted.detach(), out.detach())

        self.fn = vmap(grad(total, has_aux=True), in_dims=(None, 0, 0, 0))

    def stacked(self, x: Nested, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``([B, P] gradient sums, [B] loss sums, [B, L, ...] outputs)`` of stacked chunks."""
        pvals = tuple(p.detach() for p in self.params)
        grads, (totals, outs) = self.fn(pvals, x, y, w.to(self.params[0].dtype))
        b = y.shape[0]
        return torch.cat([g.detach().reshape(b, -1) for g in grads], 1), totals, outs

    def __call__(
        self, chunks: list[tuple[int, Nested, Tensor]]
    ) -> tuple[Tensor, list[int], Tensor, Tensor, Tensor]:
        lengths = [int(y.shape[0]) for _, _, y in chunks]
        width = max(lengths)
        device = chunks[0][2].device
        index = [torch.arange(width, device=device) % n for n in lengths]
        x = _pad_stack([c[1] for c in chunks], index)
        y = torch.stack([c[2].index_select(0, i) for c, i in zip(chunks, index, strict=True)])
        w = (
            torch.arange(width, device=device)[None, :]
            < torch.tensor(lengths, device=device)[:, None]
        )
        grads, totals, outs = self.stacked(x, y, w)
        ids = torch.tensor([a for a, _, _ in chunks], dtype=torch.int64)
        return ids, lengths, grads, totals, outs
