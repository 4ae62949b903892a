"""Structured pruning cores: whole channels with everything coupled to them, and N:M patterns.

**Structures.** :func:`parse_structure` reads the ``structure`` argument: ``"weight"``
(individual weights, :mod:`lightning_fairprune.pruning.select`), ``"channel"`` (whole output
channels of Conv/Linear layers, this module) or ``"n:m"`` such as ``"2:4"`` (at most ``n``
non-zeros in every ``m`` consecutive input weights, :mod:`lightning_fairprune.pruning.nm`).

**Channel groups.** Removing output channel ``k`` of a convolution also removes entry ``k`` of
the BatchNorm after it, input slice ``k`` of every layer that reads it, and, through a residual
addition, channel ``k`` of every other layer added to it. :func:`channel_groups` finds these
couplings with the dependency graph of Torch-Pruning (``torch-pruning``, the ``structured``
extra; imported only when called) and returns plain :class:`ChannelGroup` descriptions keyed
by parameter name: for every coupled parameter, the dimension and the index of each channel's
entries. Everything after that is plain torch and works from the descriptions alone:

* :func:`group_scores` reduces any per-parameter score dict to one score per channel (the
  L2 norm of the group for magnitudes, a sum for gradient-based or fairness-aware scores);
* :func:`select_channels` picks the channels to prune, globally or per group, with exact
  counts and deterministic ties;
* :func:`channel_masks` expands the kept channels into ``dict[name, BoolTensor]`` masks of the
  same shape as each parameter, so the weight-mask machinery (``MaskEnforcer``, ``apply_masks``,
  checkpoints, DDP) enforces channel pruning unchanged;
* :func:`dead_channels` reads the pruned channels back from masks or weights (resume,
  :func:`lightning_fairprune.compact.compact`).

Masking a channel zeroes its producer's weights and bias, the affine parameters of the norms
it passes through and the input slices of every layer that consumes it. The consumer slices
alone already make the channel's contribution exactly zero, whatever happens to it in between
(a BatchNorm's running statistics, ``sigmoid(0) = 0.5``, a residual addition), so removing the
channel physically (``compact``) gives the same outputs as the masked model. The exceptions are
normalizations whose statistics mix channels (LayerNorm, GroupNorm with several channels per
group): a zero channel changes their mean and variance, so a compacted model would differ from
the masked one. Groups coupled to them are left out by default (``prune_norm_coupled``).

Example:
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
    ...                     nn.Conv2d(4, 6, 3), nn.Flatten(), nn.LazyLinear(2))
    >>> x = torch.randn(2, 1, 6, 6)
    >>> _ = net(x)  # materialize the lazy layer
    >>> groups = channel_groups(net, x)
    >>> [(g.root, g.num_channels) for g in groups]
    [('0', 4), ('3', 6)]
    >>> params = dict(net.named_parameters())
    >>> scores = group_scores(groups, {n: p.detach().abs() for n, p in params.items()})
    >>> keep = select_channels(scores, 0.5, scope="layerwise")
    >>> [int(k.sum()) for k in keep]
    [2, 3]
    >>> masks = channel_masks(groups, params, keep)
    >>> sorted(masks)
    ['0.bias', '0.weight', '1.bias', '1.weight', '3.bias', '3.weight', '5.weight']
    >>> int(masks['5.weight'].sum()) == 2 * 3 * 2 * 2  # 2 outputs x 3 channels x 2 x 2 pixels
    True
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils._pytree import tree_leaves

from lightning_fairprune.checks import check_bool, check_choice, check_sparsity
from lightning_fairprune.measure import isolated
from lightning_fairprune.pruning.select import num_to_prune
from lightning_fairprune.pruning.selection import TypeSpec, select_parameters

__all__ = [
    "INSTALL_HINT",
    "ChannelGroup",
    "CoupledSlice",
    "Structure",
    "channel_groups",
    "channel_masks",
    "dead_channels",
    "forward_example",
    "group_parameter_names",
    "group_scores",
    "import_torch_pruning",
    "parse_structure",
    "select_channels",
]

INSTALL_HINT = "pip install lightning_fairprune[structured]"
"""How to install the optional dependency of channel pruning (Torch-Pruning)."""

_NM = re.compile(r"(\d+):(\d+)")
_REDUCTIONS = ("l2", "l1", "sum")
_SCOPES = ("global", "layerwise")
_SUPPORTED = (
    "Conv (plain, depthwise or grouped), Linear, BatchNorm, InstanceNorm (without running "
    "statistics), LayerNorm, GroupNorm, PReLU and parameter-free operations"
)


def import_torch_pruning() -> Any:
    """Import Torch-Pruning, or raise an ``ImportError`` that says how to install it.

    Example:
        >>> import_torch_pruning().__name__
        'torch_pruning'
    """
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "Channel pruning and `compact` need the optional dependency torch-pruning; "
            f"install it with `{INSTALL_HINT}`"
        ) from err
    return torch_pruning


# ----------------------------------------------------------------------------- structure
@dataclasses.dataclass(frozen=True)
class Structure:
    """A parsed ``structure`` argument.

    Attributes:
        kind: ``"weight"``, ``"channel"`` or ``"nm"``.
        n: kept weights per block (``"nm"`` only, else 0).
        m: block length (``"nm"`` only, else 0).
    """

    kind: Literal["weight", "channel", "nm"]
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_structure(structure: object) -> Structure:
    """Parse ``"weight"``, ``"channel"`` or ``"n:m"`` (``0 < n < m``) into a :class:`Structure`.

    Args:
        structure: the string (or an already parsed :class:`Structure`, returned as is).

    Returns:
        The parsed structure.

    Raises:
        ValueError: for anything else.

    Example:
        >>> parse_structure("2:4")
        Structure(kind='nm', n=2, m=4)
        >>> str(parse_structure("channel"))
        'channel'
        >>> parse_structure("channels")
        Traceback (most recent call last):
        ...
        ValueError: Expected `structure` to be 'weight', 'channel' or 'n:m' (e.g. '2:4'), but got 'channels'
    """  # noqa: E501
    if isinstance(structure, Structure):
        return structure
    if structure in ("weight", "channel"):
        return Structure(structure)  # type: ignore[arg-type]
    match = _NM.fullmatch(structure) if isinstance(structure, str) else None
    if match is None:
        raise ValueError(
            "Expected `structure` to be 'weight', 'channel' or 'n:m' (e.g. '2:4'), "
            f"but got {structure!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(
            f"Expected `structure` 'n:m' to have 0 < n < m (e.g. '2:4'), but got {structure!r}"
        )
    return Structure("nm", n, m)


# ----------------------------------------------------------------------------- descriptions
@dataclasses.dataclass(frozen=True)
class CoupledSlice:
    """The entries of one parameter that belong to the channels of a group.

    Entry ``index[i]`` along dimension ``dim`` of parameter ``name`` belongs to channel
    ``channel[i]`` of the group. A channel may own several entries (a convolution flattened
    into a Linear layer: one input feature per pixel), and every pair appears once.

    Attributes:
        name: the parameter's fully-qualified name.
        dim: the dimension indexed.
        index: int64 positions along ``dim``.
        channel: int64 group channel of each position (same length as ``index``).
        consumer: whether these are input slices of a Conv/Linear layer reading the channel
            (zero consumer entries make a channel's contribution exactly zero).
    """

    name: str
    dim: int
    index: Tensor
    channel: Tensor
    consumer: bool

    def to_state(self) -> dict[str, Any]:
        """Plain values (``torch.load(weights_only=True)`` safe)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "index": self.index.clone(),
            "channel": self.channel.clone(),
            "consumer": self.consumer,
        }


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together, described by parameter name.

    Attributes:
        root: name of the module whose output channels define the group.
        num_channels: number of channels (pruning units) of the group.
        root_channel: group channel of each output channel of ``root`` (length: the root's
            output channels). Equal to ``arange`` except for grouped convolutions and
            GroupNorms, whose channel ``j`` is the ``j``-th channel of *every* group (so every
            group keeps the same number of channels, as their shapes require).
        slices: the coupled entries, one :class:`CoupledSlice` per parameter and dimension.
        modules: names of the modules whose parameters are coupled (for messages).
        exact: ``False`` if a normalization that mixes channels (LayerNorm, GroupNorm with
            several channels per group) is coupled: removing a channel then changes outputs.
    """

    root: str
    num_channels: int
    root_channel: Tensor
    slices: tuple[CoupledSlice, ...]
    modules: tuple[str, ...]
    exact: bool = True

    def to_state(self) -> dict[str, Any]:
        """Plain values (``torch.load(weights_only=True)`` safe); see :meth:`from_state`."""
        return {
            "root": self.root,
            "num_channels": self.num_channels,
            "root_channel": self.root_channel.clone(),
            "slices": [s.to_state() for s in self.slices],
            "modules": list(self.modules),
            "exact": self.exact,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ChannelGroup:
        """Rebuild a group from :meth:`to_state`.

        Example:
            >>> g = ChannelGroup("fc", 2, torch.arange(2), (), ("fc",))
            >>> ChannelGroup.from_state(g.to_state()).root
            'fc'
        """
        return cls(
            root=state["root"],
            num_channels=int(state["num_channels"]),
            root_channel=state["root_channel"],
            slices=tuple(CoupledSlice(**s) for s in state["slices"]),
            modules=tuple(state["modules"]),
            exact=bool(state["exact"]),
        )


def group_parameter_names(groups: Sequence[ChannelGroup]) -> list[str]:
    """Names of every parameter coupled to the groups, in first-appearance order.

    Example:
        >>> s = CoupledSlice("fc.weight", 0, torch.arange(2), torch.arange(2), False)
        >>> group_parameter_names([ChannelGroup("fc", 2, torch.arange(2), (s,), ("fc",))])
        ['fc.weight']
    """
    return list(dict.fromkeys(s.name for g in groups for s in g.slices))


def forward_example(module: nn.Module, example_inputs: Any) -> Any:
    """Call ``module`` on example inputs: a tensor, a tuple/list of arguments or a dict of them.

    Example:
        >>> forward_example(nn.Identity(), (torch.ones(1),)).tolist()
        [1.0]
    """
    if isinstance(example_inputs, Mapping):
        return module(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return module(*example_inputs)
    return module(example_inputs)


# ----------------------------------------------------------------------------- graph
class _Unsupported(Exception):
    """A coupled module this module cannot describe (raised as a TypeError if it matters)."""


def _tp_name(module: object, names: Mapping[int, str]) -> str | None:
    return names.get(id(module))


def _param_entries(
    module: nn.Module,
    param_names: Mapping[int, str],
    is_out: bool,
    idxs: Tensor,
    chans: Tensor,
    tp: Any,
) -> tuple[list[tuple[str, int, Tensor, Tensor, bool]], bool]:
    """(param entries, exact) of one dependency of a group on a real module."""
    out: list[tuple[str, int, Tensor, Tensor, bool]] = []

    def add(pname: str, dim: int, index: Tensor, consumer: bool = False) -> None:
        param = getattr(module, pname, None)
        if param is not None:  # a shared parameter under its first name
            out.append((param_names[id(param)], dim, index, chans, consumer))

    exact = True
    if isinstance(module, _ConvNd):
        if tp.ops.module2type(module) == tp.ops.OPTYPE.DEPTHWISE_CONV:
            if module.in_channels != module.out_channels:
                raise _Unsupported("a depthwise convolution with a channel multiplier")
            add("weight", 0, idxs)
            add("bias", 0, idxs)
        elif module.transposed:
            if module.groups != 1:
                raise _Unsupported("a grouped transposed convolution")
            if is_out:
                add("weight", 1, idxs)
                add("bias", 0, idxs)
            else:
                add("weight", 0, idxs, consumer=True)
        elif is_out:
            add("weight", 0, idxs)
            add("bias", 0, idxs)
        else:
            per_group = module.in_channels // module.groups
            if module.groups > 1:
                _check_grouped_input(module, idxs, chans)
            add("weight", 1, idxs % per_group, consumer=True)
    elif isinstance(module, nn.Linear):
        if is_out:
            add("weight", 0, idxs)
            add("bias", 0, idxs)
        else:
            add("weight", 1, idxs, consumer=True)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        add("weight", 0, idxs)
        add("bias", 0, idxs)
    elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if module.track_running_stats:
            raise _Unsupported("an InstanceNorm with running statistics")
        add("weight", 0, idxs)
        add("bias", 0, idxs)
    elif isinstance(module, nn.LayerNorm):
        exact = False
        last = len(module.normalized_shape) - 1
        add("weight", last, idxs)
        add("bias", last, idxs)
    elif isinstance(module, nn.GroupNorm):
        exact = module.num_groups == module.num_channels
        add("weight", 0, idxs)
        add("bias", 0, idxs)
    elif isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            add("weight", 0, idxs)
    else:
        raise _Unsupported("a layer type that channel pruning does not support")
    return out, exact


def _check_grouped_input(module: _ConvNd, idxs: Tensor, chans: Tensor) -> None:
    """Input channels of a grouped conv must be pruned alike in every group."""
    per_group = module.in_channels // module.groups
    owner = torch.full((module.in_channels,), -1, dtype=torch.int64)
    owner[idxs] = chans
    cols = owner.view(module.groups, per_group)
    present = (cols >= 0).any(0)
    alike = ((cols == cols[:1]) & (cols[:1] >= 0)).all(0)
    if bool((present & ~alike).any()):
        raise _Unsupported(
            f"a grouped convolution (groups={module.groups}) whose input channels are not "
            "pruned alike in every group (e.g. fed by a concatenation)"
        )


def _merge(
    entries: list[tuple[str, int, Tensor, Tensor, bool]],
    shapes: Mapping[str, torch.Size],
    num_channels: int,
) -> tuple[CoupledSlice, ...]:
    """One slice per (parameter, dim): the union of the (index, channel) pairs, sorted."""
    by_key: dict[tuple[str, int], list[tuple[Tensor, Tensor, bool]]] = {}
    for name, dim, index, chan, consumer in entries:
        by_key.setdefault((name, dim), []).append((index, chan, consumer))
    slices = []
    for (name, dim), parts in by_key.items():
        size = shapes[name][dim]
        index = torch.cat([p[0] for p in parts]).to(torch.int64)
        chan = torch.cat([p[1] for p in parts]).to(torch.int64)
        keys = torch.unique(chan * size + index)
        consumer = any(p[2] for p in parts)
        slices.append(CoupledSlice(name, dim, keys % size, keys // size, consumer))
    return tuple(slices)


def _selected_modules(
    model: nn.Module,
    include_types: Any,
    exclude_types: Any,
    include_names: Any,
    exclude_names: Any,
) -> set[int]:
    """The ids of the Conv/Linear modules whose output channels the selection allows to prune."""
    chosen = select_parameters(
        model,
        include_types=include_types,
        exclude_types=exclude_types,
        include_names=include_names,
        exclude_names=exclude_names,
        prune_classifier=True,
    )
    ids = {id(p) for p in chosen.values()}
    selected: set[int] = set()
    for mname, module in model.named_modules():
        own = [p for _, p in module.named_parameters(recurse=False) if id(p) in ids]
        if not own:
            continue
        if not isinstance(module, (_ConvNd, nn.Linear)):
            raise TypeError(
                "Expected the selection (`include_types` / `include_names`) to name Conv or "
                f"Linear modules for channel pruning, but it selects {mname!r} of type "
                f"{type(module).__name__}"
            )
        selected.add(id(module))
    return selected


def channel_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    include_types: TypeSpec | Sequence[TypeSpec] | None = None,
    exclude_types: TypeSpec | Sequence[TypeSpec] | None = None,
    include_names: str | Sequence[str] | None = None,
    exclude_names: str | Sequence[str] | None = None,
    prune_norm_coupled: bool = False,
) -> list[ChannelGroup]:
    """Find the prunable channel groups of a model with Torch-Pruning's dependency graph.

    The model is traced once on ``example_inputs`` (in eval mode; every module mode, buffer,
    gradient and RNG state is restored afterwards). Each group is rooted at the output
    channels of a Conv/Linear layer and holds every parameter coupled to them: the producers
    added together by residual connections, the norms and depthwise convolutions they pass
    through, the concatenations that place them, and the input slices of the layers that read
    them. A group is prunable, and returned, when

    * none of its channels is an output of the model (the classifier's outputs are never
      pruned; its input features are pruned with the layer before it);
    * every Conv/Linear whose output channels it removes is selected by the arguments below
      (the rules of :func:`~lightning_fairprune.pruning.selection.select_parameters`);
    * it has at least two channels; and
    * no LayerNorm/GroupNorm statistics are coupled, unless ``prune_norm_coupled`` (then
      :attr:`ChannelGroup.exact` is ``False``: compacting changes the outputs).

    Args:
        model: the model (an ``nn.Module`` or a LightningModule).
        example_inputs: one input batch: a tensor, a tuple of positional arguments or a dict
            of keyword arguments of ``model``'s forward.
        include_types: module types whose output channels may be pruned (default Conv and
            Linear).
        exclude_types: module types whose output channels are never pruned.
        include_names: FQN globs of the parameters of prunable modules.
        exclude_names: FQN globs of parameters whose modules are never pruned.
        prune_norm_coupled: also return groups coupled to LayerNorm/GroupNorm statistics.

    Returns:
        The groups, ordered by the registration order of their root modules.

    Raises:
        ImportError: without torch-pruning (``pip install lightning_fairprune[structured]``).
        TypeError: if a prunable group is coupled to a layer this module cannot describe
            (the message names the module and its type), or the selection names a module that
            is neither Conv nor Linear.
        ValueError: if no group is prunable.
    """
    tp = import_torch_pruning()
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, but got {type(model).__name__}")
    prune_norm_coupled = check_bool(prune_norm_coupled, "prune_norm_coupled")
    selected = _selected_modules(model, include_types, exclude_types, include_names, exclude_names)
    names = {id(m): n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    param_names = {id(p): n for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    outputs: list[Tensor] = []

    def forward_fn(m: nn.Module, inputs: Any) -> Any:
        out = forward_example(m, inputs)
        outputs.extend(t for t in tree_leaves(out) if isinstance(t, Tensor))
        return out

    with isolated(model, grad_params=list(model.parameters())):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs, forward_fn=forward_fn, verbose=False
        )
        output_fns = {t.grad_fn for t in outputs if t.grad_fn is not None}
        raw = list(graph.get_all_groups())

    groups: list[ChannelGroup] = []
    inexact: list[str] = []
    for tp_group in raw:
        group = _describe(tp_group, graph, tp, names, param_names, shapes, selected, output_fns)
        if group is None:
            continue
        if not group.exact and not prune_norm_coupled:
            inexact.append(group.root)
            continue
        groups.append(group)
    if inexact:
        warnings.warn(
            f"The channel groups rooted at {inexact} are coupled to LayerNorm/GroupNorm "
            "statistics, which a removed channel would change: they are left unpruned "
            "(pass prune_norm_coupled=True to prune them; compact's outputs then differ "
            "from the masked model's)",
            UserWarning,
            stacklevel=2,
        )
    if not groups:
        raise ValueError(
            "Expected the model to have at least one prunable channel group (Conv/Linear "
            "output channels that are not model outputs, selected, with two or more "
            f"channels), but found none among the modules {list(names.values())[:20]}"
        )
    groups.sort(key=lambda g: order[g.root])
    return groups


def _describe(
    tp_group: Any,
    graph: Any,
    tp: Any,
    names: Mapping[int, str],
    param_names: Mapping[int, str],
    shapes: Mapping[str, torch.Size],
    selected: set[int],
    output_fns: set[Any],
) -> ChannelGroup | None:
    """A ChannelGroup from a Torch-Pruning group, or None if it is not prunable."""
    items = list(tp_group.items)
    root_module = items[0].dep.target.module
    root = names[id(root_module)]
    ties = 1
    for item in items:
        node, handler = item.dep.target, item.dep.handler
        is_out = graph.is_out_channel_pruning_fn(handler)
        if is_out and (node.grad_fn in output_fns or node.type == tp.ops.OPTYPE.OUTPUT):
            return None  # these channels are model outputs
        module = node.module
        if isinstance(module, (_ConvNd, nn.Linear)) and is_out and id(module) not in selected:
            return None
        if isinstance(module, _ConvNd) and module.groups > 1:
            if tp.ops.module2type(module) != tp.ops.OPTYPE.DEPTHWISE_CONV:
                ties = math.lcm(ties, module.groups)
        elif isinstance(module, nn.GroupNorm):
            ties = math.lcm(ties, module.num_groups)
    total = len(items[0].idxs)
    if total % ties:
        raise TypeError(
            f"Expected the {total} channels of {root!r} to divide into the {ties} groups of the "
            "grouped convolutions/GroupNorms coupled to them, but they do not"
        )
    num_channels = total // ties
    if num_channels < 2:
        return None
    entries: list[tuple[str, int, Tensor, Tensor, bool]] = []
    modules: list[str] = []
    exact = True
    for item in items:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        if isinstance(module, nn.Parameter):
            owner = param_names.get(id(module), "?")
            raise TypeError(
                f"Expected every layer coupled to the channels of {root!r} to be one of: "
                f"{_SUPPORTED}, but the bare parameter {owner!r} (used outside a supported "
                "module) is coupled to them; exclude the layers around it with "
                "`exclude_names` / `exclude_types`"
            )
        mname = _tp_name(module, names)
        if mname is None:
            continue  # a parameter-free operation of the graph (add, cat, reshape...)
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.int64)
        chans = torch.as_tensor(list(item.root_idxs), dtype=torch.int64) % num_channels
        try:
            found, ok = _param_entries(
                module, param_names, graph.is_out_channel_pruning_fn(handler), idxs, chans, tp
            )
        except _Unsupported as err:
            raise TypeError(
                f"Expected every layer coupled to the channels of {root!r} to be one of: "
                f"{_SUPPORTED}, but module {mname!r} of type {type(module).__name__} is "
                f"coupled to them ({err}); exclude it or its neighbours with `exclude_names` "
                "/ `exclude_types`"
            ) from None
        exact = exact and ok
        entries.extend(found)
        if found and mname not in modules:
            modules.append(mname)
    root_channel = torch.arange(total, dtype=torch.int64) % num_channels
    slices = _merge(entries, shapes, num_channels)
    return ChannelGroup(root, num_channels, root_channel, slices, tuple(modules), exact)


# ----------------------------------------------------------------------------- scores
def _per_position(t: Tensor, s: CoupledSlice, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` of the selected entries, summed over every dimension but ``s.dim``."""
    sel = t.index_select(s.dim, s.index.to(t.device))
    return fn(sel.movedim(s.dim, 0).reshape(len(s.index), -1)).sum(1)


def group_scores(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, Tensor],
    reduce: str = "l2",
) -> list[Tensor]:
    """One score per channel of every group, from per-parameter scores.

    Only the parameters present in ``scores`` count (pass the weights alone to score a channel
    by its weights). ``reduce``:

    * ``"l2"``: the Euclidean norm of the channel's entries, ``sqrt(sum s^2)`` (the group
      magnitude of Torch-Pruning's ``GroupMagnitudeImportance`` for ``s = |w|``);
    * ``"l1"``: ``sum |s|``;
    * ``"sum"``: ``sum s`` (saliencies that add up: gradient, undecayed, random, the
      fairness-aware criteria).

    Args:
        groups: from :func:`channel_groups`.
        scores: FQN -> score tensor of the parameter's shape.
        reduce: ``"l2"``, ``"l1"`` or ``"sum"``.

    Returns:
        One float64 tensor of length ``num_channels`` per group.

    Raises:
        ValueError: for a bad ``reduce``, a score of the wrong shape, or a group with no scored
            parameter.

    Example:
        >>> s = CoupledSlice("w", 1, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]), True)
        >>> g = ChannelGroup("fc", 2, torch.arange(2), (s,), ("fc",))
        >>> group_scores([g], {"w": torch.tensor([[3., 4., 1.], [0., 0., 2.]])})[0].tolist()
        [5.0, 2.23606797749979]
    """
    check_choice(reduce, "reduce", _REDUCTIONS)
    fn: Callable[[Tensor], Tensor] = {
        "l2": torch.square,
        "l1": torch.abs,
        "sum": lambda x: x,
    }[reduce]
    result = []
    for group in groups:
        device = None
        acc: Tensor | None = None
        for s in group.slices:
            t = scores.get(s.name)
            if t is None:
                continue
            if acc is None:
                device = t.device
                acc = torch.zeros(group.num_channels, dtype=torch.float64, device=device)
            per = _per_position(t.detach().to(torch.float64), s, fn)
            acc.index_add_(0, s.channel.to(device), per)
        if acc is None:
            raise ValueError(
                f"Expected `scores` to hold at least one parameter of the channel group rooted "
                f"at {group.root!r} ({[s.name for s in group.slices]}), but it holds none"
            )
        result.append(acc.sqrt_() if reduce == "l2" else acc)
    return result


def _check_keep(
    keep: Sequence[Tensor] | None, sizes: Sequence[int], name: str
) -> list[Tensor] | None:
    if keep is None:
        return None
    keep = list(keep)
    if len(keep) != len(sizes):
        raise ValueError(
            f"Expected `{name}` to hold one bool tensor per group ({len(sizes)}), "
            f"but got {len(keep)}"
        )
    for i, (k, size) in enumerate(zip(keep, sizes, strict=True)):
        if not isinstance(k, Tensor) or k.dtype != torch.bool or tuple(k.shape) != (size,):
            got = f"{k.dtype} {tuple(k.shape)}" if isinstance(k, Tensor) else type(k).__name__
            raise ValueError(
                f"Expected `{name}`[{i}] to be a bool tensor of shape ({size},), but got {got}"
            )
    return keep


def select_channels(
    scores: Sequence[Tensor],
    target: float,
    scope: str = "global",
    current_keep: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Choose the channels to keep: the lowest scores are pruned, with exact counts.

    **Counts.** ``"global"``: ``min(round(target * N), N - G)`` channels are pruned over all
    groups together (``N`` channels in ``G`` groups); ``"layerwise"``:
    ``min(round(target * C), C - 1)`` in each group of ``C`` channels. The cap keeps at least
    one channel in every group (a layer cannot lose all its channels), and only binds at
    targets close to 1 or for tiny groups. Rounding is half up, as for weights.

    **Order.** Scores are compared as they are (not their absolute values); channels already
    pruned in ``current_keep`` stay pruned and rank first; among equal scores the channel with
    the lower flat index (groups in order, then channel index) is pruned first. In the global
    scope each group's best channel is kept out of the ranking, which is the optimal
    choice under the one-channel rule. If more channels are already pruned than the target asks,
    no channel comes back.

    Args:
        scores: one 1-D tensor of channel scores per group (:func:`group_scores`).
        target: fraction of channels to prune, in ``[0, 1)``.
        scope: ``"global"`` or ``"layerwise"``.
        current_keep: keep vectors of the previous round, or ``None``.

    Returns:
        One bool keep vector (``True`` = kept) per group, on the CPU.

    Raises:
        ValueError: for a bad target/scope/keep, or a NaN score of a channel not yet pruned.

    Example:
        >>> s = [torch.tensor([3., 1., 2.]), torch.tensor([0.5, 5.])]
        >>> [k.tolist() for k in select_channels(s, 0.4)]
        [[True, False, True], [False, True]]
        >>> [k.tolist() for k in select_channels(s, 0.4, scope="layerwise")]
        [[True, False, True], [False, True]]
    """
    target = check_sparsity(target, "target")
    check_choice(scope, "scope", _SCOPES)
    keys = [torch.as_tensor(s).detach().to("cpu", torch.float64).reshape(-1) for s in scores]
    sizes = [len(k) for k in keys]
    current = _check_keep(current_keep, sizes, "current_keep")
    if any(size == 0 for size in sizes):
        raise ValueError(f"Expected every group to have channels, but got sizes {sizes}")
    for i, key in enumerate(keys):
        live = key if current is None else key[current[i].cpu()]
        if bool(live.isnan().any()):
            raise ValueError(f"Expected channel scores without NaN, but group {i} has NaN scores")
        if current is not None:
            if not bool(current[i].any()):
                raise ValueError(f"Expected `current_keep`[{i}] to keep at least one channel")
            keys[i] = key.masked_fill(~current[i].cpu(), -math.inf)
    already = [0] * len(keys) if current is None else [int((~c).sum()) for c in current]
    keep = [torch.ones(size, dtype=torch.bool) for size in sizes]
    if scope == "layerwise":
        for i, key in enumerate(keys):
            count = max(min(num_to_prune(target, sizes[i]), sizes[i] - 1), already[i])
            order = torch.sort(key, stable=True).indices
            keep[i][order[:count]] = False
        return keep
    total = sum(sizes)
    count = max(min(num_to_prune(target, total), total - len(sizes)), sum(already))
    flat = torch.cat(keys)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    best = torch.stack(
        [torch.sort(key, stable=True).indices[-1] + offsets[i] for i, key in enumerate(keys)]
    )
    candidate = torch.ones(total, dtype=torch.bool)
    candidate[best] = False
    positions = candidate.nonzero().flatten()
    order = positions[torch.sort(flat[positions], stable=True).indices]
    pruned = torch.zeros(total, dtype=torch.bool)
    pruned[order[:count]] = True
    for i in range(len(sizes)):
        keep[i] = ~pruned[offsets[i] : offsets[i + 1]]
    return keep


# ----------------------------------------------------------------------------- masks
def channel_masks(
    groups: Sequence[ChannelGroup],
    params: Mapping[str, Tensor],
    keep: Sequence[Tensor],
) -> dict[str, Tensor]:
    """Expand per-group keep vectors into per-parameter bool masks.

    Every parameter coupled to a group gets a mask of its own shape and device (``True`` =
    kept): a pruned channel's producer weights and bias, its norm weights and biases, the
    depthwise filters it passes through and the input slices of every layer reading it are
    ``False``. Zeroing by these masks makes the channel's contribution exactly zero.

    Args:
        groups: from :func:`channel_groups`.
        params: FQN -> parameter (or any tensor of its shape), holding every coupled name.
        keep: one bool keep vector per group (:func:`select_channels`).

    Returns:
        FQN -> bool mask, for every parameter in :func:`group_parameter_names` order.

    Raises:
        ValueError: if a coupled parameter is missing or of another shape, or ``keep`` does
            not match the groups.

    Example:
        >>> out = CoupledSlice("a.weight", 0, torch.arange(2), torch.arange(2), False)
        >>> inp = CoupledSlice("b.weight", 1, torch.arange(2), torch.arange(2), True)
        >>> g = ChannelGroup("a", 2, torch.arange(2), (out, inp), ("a", "b"))
        >>> m = channel_masks([g], {"a.weight": torch.ones(2, 3), "b.weight": torch.ones(1, 2)},
        ...                   [torch.tensor([True, False])])
        >>> m["a.weight"].tolist(), m["b.weight"].tolist()
        ([[True, True, True], [False, False, False]], [[True, False]])
    """
    keep_list = _check_keep(keep, [g.num_channels for g in groups], "keep")
    assert keep_list is not None
    masks: dict[str, Tensor] = {}
    for name in group_parameter_names(groups):
        if name not in params:
            raise ValueError(
                f"Expected `params` to hold every parameter coupled to the channel groups, "
                f"but {name!r} is missing"
            )
        masks[name] = torch.ones(params[name].shape, dtype=torch.bool, device=params[name].device)
    for group, k in zip(groups, keep_list, strict=True):
        pruned = ~k.cpu()
        if not bool(pruned.any()):
            continue
        for s in group.slices:
            mask = masks[s.name]
            if s.dim >= mask.dim() or (len(s.index) and int(s.index.max()) >= mask.shape[s.dim]):
                raise ValueError(
                    f"Expected `params`[{s.name!r}] to have the shape the channel groups were "
                    f"built for, but got {tuple(mask.shape)}"
                )
            sel = pruned[s.channel]
            if bool(sel.any()):
                mask.index_fill_(s.dim, s.index[sel].to(mask.device), False)
    return masks


def dead_channels(groups: Sequence[ChannelGroup], tensors: Mapping[str, Tensor]) -> list[Tensor]:
    """Which channels are pruned, read from masks or weights: all their consumer entries zero.

    A channel whose every consumer entry (input slice of a Conv/Linear reading it) present in
    ``tensors`` is zero (``False`` for masks) contributes nothing to the output and is reported
    dead; a channel with no consumer entry in ``tensors`` is reported alive.

    Args:
        groups: from :func:`channel_groups`.
        tensors: FQN -> bool mask or weight.

    Returns:
        One bool vector per group, ``True`` = dead (so ``~dead`` are the keep vectors).

    Example:
        >>> inp = CoupledSlice("b.weight", 1, torch.arange(2), torch.arange(2), True)
        >>> g = ChannelGroup("a", 2, torch.arange(2), (inp,), ("b",))
        >>> dead_channels([g], {"b.weight": torch.tensor([[0.5, 0.0]])})[0].tolist()
        [False, True]
    """
    result = []
    for group in groups:
        alive = torch.zeros(group.num_channels, dtype=torch.int64)
        seen = torch.zeros(group.num_channels, dtype=torch.bool)
        for s in group.slices:
            t = tensors.get(s.name)
            if not s.consumer or t is None:
                continue
            nonzero = _per_position(t.detach() != 0, s, lambda x: x.to(torch.int64))
            alive.index_add_(0, s.channel, nonzero.cpu())
            seen[s.channel] = True
        result.append(seen & (alive == 0))
    return result
