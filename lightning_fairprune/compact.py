"""A physically smaller copy of a pruned model, and how to save and load it.

:func:`compact` removes every pruned channel (with the norm entries, depthwise filters and
input slices coupled to it) from a deep copy of the model, through Torch-Pruning's pruning
functions (the ``structured`` extra), and checks that the copy's outputs equal the masked
model's. Linear weights pruned to the 2:4 pattern become
``torch.sparse.to_sparse_semi_structured`` tensors on GPUs that accelerate them; elsewhere they
stay dense, with a ``UserWarning``.

**Saving and loading.** A compact model has a new architecture (fewer channels), so a plain
``model.state_dict()`` no longer fits the class's constructor. Save the compact model's
``state_dict()`` (plain tensors, ``torch.load(weights_only=True)`` safe) and load it into a
freshly built dense model with :func:`load_compact`, which resizes every layer to the saved
shapes (``torch.save(model)`` of the whole module also works, but needs
``weights_only=False`` and the model's classes importable at load time):

Example:
    >>> import io
    >>> from lightning_fairprune.pruning.structured import channel_groups, channel_masks
    >>> def make():
    ...     torch.manual_seed(0)
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                          nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                          nn.Flatten(), nn.Linear(8, 2)).eval()
    >>> net, x = make(), torch.randn(4, 3, 8, 8)
    >>> groups = channel_groups(net, x)
    >>> keep = [torch.arange(8) % 2 == 0 for _ in groups]  # prune every other channel
    >>> masks = channel_masks(groups, dict(net.named_parameters()), keep)
    >>> small = compact(net, x, masks=masks)
    >>> small[0].out_channels, small[3].in_channels, small[7].in_features
    (4, 4, 4)
    >>> buffer = io.BytesIO()
    >>> torch.save(small.state_dict(), buffer)
    >>> _ = buffer.seek(0)
    >>> loaded = load_compact(make(), torch.load(buffer, weights_only=True))
    >>> bool(torch.equal(loaded(x), small(x)))
    True
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils._pytree import tree_leaves

from lightning_fairprune.checks import check_bool, check_real
from lightning_fairprune.measure import isolated
from lightning_fairprune.pruning.enforce import apply_masks
from lightning_fairprune.pruning.structured import (
    ChannelGroup,
    channel_groups,
    dead_channels,
    forward_example,
    import_torch_pruning,
)

__all__ = ["compact", "load_compact", "semi_structured_support"]

_HALF = (torch.float16, torch.bfloat16)


def semi_structured_support(device: torch.device | str) -> str | None:
    """Why ``to_sparse_semi_structured`` cannot accelerate on ``device`` (``None`` if it can).

    Semi-structured (2:4) sparse kernels need a CUDA GPU of compute capability 8.0 or more
    (Ampere and later).

    Example:
        >>> semi_structured_support("cpu")
        'the 2:4 sparse kernels need a CUDA GPU of compute capability >= 8.0, not cpu'
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the 2:4 sparse kernels need a CUDA GPU of compute capability >= 8.0, not {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (
            f"the 2:4 sparse kernels need compute capability >= 8.0, "
            f"but {device} has {major}.{minor}"
        )
    return None


def _is_two_four(weight: Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive inputs, and some non-zero."""
    if weight.dim() != 2 or weight.shape[1] % 4 or weight.is_sparse:
        return False
    nonzero = (weight.detach() != 0).reshape(-1, 4).sum(-1)
    return bool((nonzero <= 2).all()) and bool(nonzero.any())


def _semi_structured(model: nn.Module) -> None:
    """Convert 2:4 Linear weights where the GPU accelerates them; warn where they stay dense."""
    eligible = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and _is_two_four(m.weight)
    ]
    dense: list[str] = []
    reasons: set[str] = set()
    for name, module in eligible:
        weight = module.weight
        reason = semi_structured_support(weight.device)
        if reason is None and weight.dtype not in _HALF:
            reason = f"its weights are {weight.dtype}: cast the model to float16/bfloat16 first"
        if reason is None:
            try:
                sparse = torch.sparse.to_sparse_semi_structured(weight.detach())
            except (RuntimeError, ValueError, NotImplementedError) as err:
                reason = f"to_sparse_semi_structured refused: {err}"
            else:
                module.weight = nn.Parameter(sparse, requires_grad=False)
                continue
        dense.append(name)
        reasons.add(reason)
    if dense:
        warnings.warn(
            f"The 2:4-sparse Linear layers {dense} stay dense (same outputs, no speed-up): "
            f"{'; '.join(sorted(reasons))}",
            UserWarning,
            stacklevel=3,
        )


def _outputs(model: nn.Module, example_inputs: Any) -> list[Tensor]:
    with isolated(model), torch.no_grad():
        out = forward_example(model, example_inputs)
    return [t.detach().clone() for t in tree_leaves(out) if isinstance(t, Tensor)]


def _check_same(before: list[Tensor], after: list[Tensor], atol: float | None) -> None:
    if len(before) != len(after):
        raise RuntimeError(
            f"compact changed the model's outputs: {len(before)} tensors before, {len(after)} after"
        )
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        if a.shape != b.shape:
            raise RuntimeError(
                f"compact changed output {i}: shape {tuple(a.shape)} became {tuple(b.shape)}"
            )
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise RuntimeError(f"compact changed output {i} (non-float values differ)")
            continue
        tol = atol if atol is not None else (1e-2 if a.dtype in _HALF else 1e-4)
        diff = (a.double() - b.double()).abs()
        bound = tol + tol * a.double().abs()
        if bool((diff > bound).any()):
            raise RuntimeError(
                f"compact changed output {i}: max abs difference {float(diff.max()):.3g} "
                f"exceeds the tolerance {tol:g} (relative and absolute). An operation that mixes "
                "channels outside the supported layers (e.g. a mean over the channel dimension) "
                "is coupled to a pruned channel; exclude its layers from pruning"
            )


def compact(
    module: nn.Module,
    example_inputs: Any,
    *,
    masks: Mapping[str, Tensor] | None = None,
    groups: Sequence[ChannelGroup] | None = None,
    check: bool = True,
    atol: float | None = None,
    semi_structured: bool = True,
) -> nn.Module:
    """A physically smaller deep copy of a channel-pruned model (the input is untouched).

    On the copy, ``masks`` are applied (zeroing the pruned weights; without masks the weights
    are taken as they are), then every channel whose consumers all read zeros
    (:func:`~lightning_fairprune.pruning.structured.dead_channels`) is removed together with
    everything coupled to it (producer weights and biases, BatchNorm entries and running
    statistics, depthwise filters, the input slices of the next layers), using
    Torch-Pruning's pruning functions. One channel of a fully pruned group stays. The copy's
    outputs are then compared with the masked model's in eval mode (``check``).

    **N:M.** With ``semi_structured``, Linear weights that follow the 2:4 pattern become
    ``torch.sparse.to_sparse_semi_structured`` tensors (fewer bytes, faster matmuls) when they
    are float16/bfloat16 on a CUDA GPU of compute capability 8.0 or more. Anywhere else (CPU,
    older GPUs, float32 weights, shapes the kernels refuse) they stay dense, with a
    ``UserWarning`` saying so: the outputs are the same, the speed is not. Convolutions always
    stay dense.

    Args:
        module: the model or one of its submodules; a LightningModule works (its trainer is not
            copied).
        example_inputs: one input batch for ``module`` (a tensor, a tuple of positional
            arguments or a dict of keyword arguments); it runs up to four forward passes
            (trace, groups, check), so a batch of one or a few samples is best.
        masks: FQN (relative to ``module``) -> bool mask, e.g. from
            :func:`~lightning_fairprune.pruning.structured.channel_masks`; ``None`` to find
            the pruned channels from zero weights.
        groups: the channel groups of ``module`` (default: found by
            :func:`~lightning_fairprune.pruning.structured.channel_groups` with its defaults).
        check: compare the compact outputs with the masked model's and raise if they differ.
        atol: tolerance of the check (absolute and relative; default 1e-4, 1e-2 for
            float16/bfloat16 outputs).
        semi_structured: convert 2:4 Linear weights where supported.

    Returns:
        The compact copy, in the training mode of ``module``.

    Raises:
        ImportError: without torch-pruning (``pip install lightning_fairprune[structured]``).
        ValueError: for masks that do not fit the parameters.
        RuntimeError: if ``check`` finds different outputs.
    """
    tp = import_torch_pruning()
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be an nn.Module, but got {type(module).__name__}")
    check = check_bool(check, "check")
    semi_structured = check_bool(semi_structured, "semi_structured")
    atol = check_real(atol, "atol", low=0.0, allow_none=True)
    model = copy.deepcopy(module)
    params = dict(model.named_parameters())
    if masks is not None:
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise ValueError(
                f"Expected every name of `masks` to be a parameter of `module`, but got {unknown}"
            )
        with torch.no_grad():
            apply_masks({n: params[n] for n in masks}, masks)
    if groups is None:
        groups = channel_groups(model, example_inputs)
    reference = _outputs(model, example_inputs) if check else []
    requires_grad = {n: p.requires_grad for n, p in params.items()}

    dead = dead_channels(groups, params)
    todo = []
    for group, d in zip(groups, dead, strict=True):
        if bool(d.all()):
            d = d.clone()
            d[0] = False  # a layer keeps at least one channel
        if bool(d.any()):
            todo.append((group, d))
    inexact = [g.root for g, _ in todo if not g.exact]
    if todo:
        with isolated(model, grad_params=list(model.parameters())):
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=forward_example, verbose=False
            )
        for group, d in todo:
            root = model.get_submodule(group.root)
            idxs = d[group.root_channel].nonzero().flatten().tolist()
            pruner = graph.get_pruner_of_module(root)
            graph.get_pruning_group(root, pruner.prune_out_channels, idxs).prune()
    for name, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(requires_grad.get(name, True))
    if semi_structured:
        _semi_structured(model)
    if check and inexact:
        warnings.warn(
            f"compact removed channels of the groups rooted at {inexact}, which are coupled to "
            "LayerNorm/GroupNorm statistics: the compact model's outputs differ from the "
            "masked model's, and are not checked",
            UserWarning,
            stacklevel=2,
        )
    elif check:
        _check_same(reference, _outputs(model, example_inputs), atol)
    return model


# ----------------------------------------------------------------------------- loading
def _own(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {
        k[len(prefix) :]: v
        for k, v in state_dict.items()
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    }


def _resize(module: nn.Module, own: Mapping[str, Tensor], name: str) -> None:
    """Set a layer's size attributes from the saved tensors' shapes."""
    weight = own.get("weight")
    if isinstance(module, _ConvNd) and weight is not None:
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if depthwise:
            channels = weight.shape[0]
            module.in_channels = module.out_channels = module.groups = channels
        elif module.transposed:
            module.in_channels = weight.shape[0]
            module.out_channels = weight.shape[1] * module.groups
        else:
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape
    elif isinstance(
        module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    ):
        source = weight if weight is not None else own.get("running_mean")
        if source is not None:
            module.num_features = source.shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.PReLU) and weight is not None:
        module.num_parameters = weight.shape[0]
    else:
        raise ValueError(
            "Expected `state_dict` to differ from `model` only in the channel counts of "
            f"supported layers, but module {name!r} of type {type(module).__name__} has "
            "tensors of other shapes"
        )


def load_compact(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load a compact model's ``state_dict`` into a freshly built dense model, in place.

    Every layer whose saved tensors have other shapes (fewer channels) is resized first: its
    size attributes (``out_channels``, ``in_features``, ``num_features``...) and its parameters
    and buffers. Then the state dict is loaded strictly. Semi-structured sparse weights are not
    supported here: save before they are converted (on the CPU they are never converted).

    Args:
        model: a dense model of the architecture that was compacted.
        state_dict: ``compact(...).state_dict()``, e.g. read with
            ``torch.load(path, weights_only=True)``.

    Returns:
        ``model``, resized and loaded.

    Raises:
        ValueError: if a layer's tensors differ in a way that channel pruning cannot explain.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> small = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> load_compact(net, small.state_dict())[0]
        Linear(in_features=4, out_features=3, bias=True)
    """
    for mname, module in model.named_modules():
        own = _own(state_dict, f"{mname}." if mname else "")
        tensors = {
            **dict(module.named_parameters(recurse=False)),
            **dict(module.named_buffers(recurse=False)),
        }
        changed = [k for k, t in tensors.items() if k in own and own[k].shape != t.shape]
        if not changed:
            continue
        _resize(module, own, mname)
        for key, old in tensors.items():
            if key not in own or own[key].shape == old.shape:
                continue
            new = torch.empty(own[key].shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[key] = new
    model.load_state_dict(state_dict)
    return model
