"""Measure without disturbing training: the one isolation context.

Everything that looks at a model in the middle of training (the monitor's measurements, the
pruner's gradient pass, group-aware criteria) runs inside :func:`isolated`, which guarantees
that training afterwards is bit-for-bit what it would have been without the measurement:

* the train/eval flag of **every module** is restored module by module (a BatchNorm the user
  froze in eval mode stays in eval mode; ``model.train(was_training)`` would reset it);
* **every buffer** (BatchNorm running statistics, ``num_batches_tracked``, anything registered)
  is restored in place, so a train-mode forward pass leaves no trace;
* the parameters' ``.grad`` objects and ``requires_grad`` flags are restored (a frozen
  parameter can be given a gradient for the measurement only);
* the RNG states of torch (CPU and initialized CUDA devices), Python's `random`, NumPy, and of
  any DataLoader generator named in ``loaders`` are restored;
* gradients are enabled and inference mode is off inside (validation hooks run under
  ``torch.inference_mode()``).

:func:`prepare_batch` converts a raw batch the way the Trainer converts training batches
(precision plugin's ``convert_input``, then the strategy's ``batch_to_device``), so that
``precision="bf16-true"`` or ``"64-true"`` models get inputs of their dtype. The module is
plain torch: the trainer is duck-typed.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fairprune.checks import check_choice

__all__ = [
    "isolated",
    "loader_generators",
    "precision_context",
    "prepare_batch",
    "quiet_logging",
    "rng_restored",
    "task_gradients",
]

_MODES = ("eval", "keep")


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a DataLoader draws from (its own, its samplers'), without repeats.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> loader = torch.utils.data.DataLoader(list(range(4)), shuffle=True, generator=gen)
        >>> loader_generators(loader) == [gen]
        True
    """
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (
        loader,
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    ):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


@contextlib.contextmanager
def rng_restored(loaders: Iterable[Any] = ()) -> Iterator[None]:
    """Restore torch (CPU, initialized CUDA), Python, NumPy and loader RNG states on exit.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> with rng_restored():
        ...     _ = torch.rand(3); _ = random.random()
        >>> bool(torch.rand(1) == (torch.manual_seed(0) and torch.rand(1)))
        True
    """
    torch_state = torch.get_rng_state()
    python_state = random.getstate()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch installs
        np = None  # type: ignore[assignment]
    numpy_state = np.random.get_state() if np is not None else None
    cuda_state = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    generators = [g for loader in loaders for g in loader_generators(loader)]
    gen_states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        if numpy_state is not None and np is not None:
            np.random.set_state(numpy_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        for gen, state in zip(generators, gen_states, strict=True):
            gen.set_state(state)


@contextlib.contextmanager
def isolated(
    model: nn.Module,
    *,
    mode: str = "eval",
    grad_params: Iterable[Tensor] = (),
    loaders: Iterable[Any] = (),
) -> Iterator[None]:
    """Run a measurement on ``model`` without leaving any trace on training.

    Inside: gradients enabled, inference mode off, every ``.grad`` set to ``None``, the modules
    in eval mode (``mode="eval"``) or in the modes they had (``mode="keep"``: e.g. the task
    gradient in the training configuration), and ``requires_grad=True`` on ``grad_params``.
    On exit (also on error) every module mode, buffer, ``.grad``, ``requires_grad`` flag and
    RNG state is restored exactly.

    Args:
        model: the module measured.
        mode: ``"eval"`` or ``"keep"``.
        grad_params: parameters that must receive gradients even if frozen.
        loaders: DataLoaders iterated inside, whose generators are restored.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> _ = net[1].eval()  # the user froze the BatchNorm
        >>> _ = net[0].weight.requires_grad_(False)
        >>> before = net[1].running_mean.clone()
        >>> with isolated(net, mode="keep", grad_params=[net[0].weight]):
        ...     net[1].train()(net[0](torch.randn(8, 2))).sum().backward()
        ...     net[0].weight.grad is not None
        True
        >>> net.training, net[1].training, net[0].weight.requires_grad, net[0].weight.grad
        (True, False, False, None)
        >>> bool(torch.equal(net[1].running_mean, before))
        True
    """
    check_choice(mode, "mode", _MODES)
    modules = list(model.modules())
    modes = [m.training for m in modules]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    requires = [p.requires_grad for p in params]
    extra = [p for p in grad_params if all(p is not q for q in params)]
    extra_grads = [p.grad for p in extra]
    extra_requires = [p.requires_grad for p in extra]
    with rng_restored(loaders):
        try:
            for p in (*params, *extra):
                p.grad = None
            if mode == "eval":
                model.eval()
            with torch.inference_mode(False), torch.enable_grad():
                for p in grad_params:
                    p.requires_grad_(True)
                yield
        finally:
            for module, flag in zip(modules, modes, strict=True):
                module.training = flag
            with torch.no_grad():
                for buf, saved in buffers:
                    if buf.shape == saved.shape:
                        buf.copy_(saved)
            for p, g, r in zip(params, grads, requires, strict=True):
                p.requires_grad_(r)
                p.grad = g
            for p, g, r in zip(extra, extra_grads, extra_requires, strict=True):
                p.requires_grad_(r)
                p.grad = g


@contextlib.contextmanager
def quiet_logging(module: nn.Module) -> Iterator[None]:
    """Turn a LightningModule's ``self.log`` / ``self.log_dict`` into no-ops temporarily.

    A measurement that calls ``training_step`` must not log the step's metrics.

    Example:
        >>> class M(nn.Module):
        ...     def log(self, *a, **k): print("logged")
        >>> m = M()
        >>> with quiet_logging(m):
        ...     m.log("x", 1.0)
        >>> m.log("x", 1.0)
        logged
    """

    def _noop(*args: Any, **kwargs: Any) -> None:
        return None

    patched = []
    for name in ("log", "log_dict"):
        if name not in module.__dict__:
            object.__setattr__(module, name, _noop)
            patched.append(name)
    try:
        yield
    finally:
        for name in patched:
            module.__dict__.pop(name, None)


def prepare_batch(
    batch: Any,
    trainer: Any | None,
    device: torch.device | None = None,
    *,
    transfer_hooks: bool = False,
) -> Any:
    """Convert a raw batch like the Trainer converts training batches.

    With a trainer: its precision plugin's ``convert_input`` (floating tensors to the dtype of
    ``"bf16-true"``, ``"16-true"``, ``"64-true"``...), then either the strategy's
    ``batch_to_device`` (``transfer_hooks=True``: the LightningModule's batch-transfer hooks
    run, as for a training batch fed to ``training_step``) or a plain move of every tensor to
    ``device`` (fairness batches, whose structure the user's hooks may not expect).

    Args:
        batch: a batch as the loader yields it.
        trainer: the Trainer (duck-typed) or ``None``.
        device: target device (default with a trainer: ``trainer.strategy.root_device``).
        transfer_hooks: go through ``trainer.strategy.batch_to_device``.

    Returns:
        The converted batch.

    Example:
        >>> prepare_batch((torch.zeros(2), torch.tensor([1, 0])), None)[1].tolist()
        [1, 0]
    """
    if trainer is not None:
        plugin = getattr(trainer, "precision_plugin", None)
        convert = getattr(plugin, "convert_input", None)
        if callable(convert):
            batch = convert(batch)
        strategy = getattr(trainer, "strategy", None)
        to_device = getattr(strategy, "batch_to_device", None)
        if transfer_hooks and callable(to_device):
            return to_device(batch)
        if device is None:
            device = getattr(strategy, "root_device", None)
    if device is None:
        return batch
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def precision_context(trainer: Any | None, *, autocast: bool = False) -> Any:
    """The precision plugin's forward context (``*-true`` default dtype, or autocast).

    With ``autocast=False`` (the monitor's measurements) mixed-precision plugins are left out,
    so that measurements run in the parameters' dtype; "true" precisions still set the default
    dtype, as in training. ``autocast=True`` (the pruner's task-gradient pass) uses the plugin's
    context as ``training_step`` does.

    Example:
        >>> with precision_context(None):
        ...     torch.get_default_dtype()
        torch.float32
    """
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    forward = getattr(plugin, "forward_context", None)
    if not callable(forward):
        return contextlib.nullcontext()
    if autocast:
        return forward()
    true_precision = {"HalfPrecision", "DoublePrecision"}
    if any(cls.__name__ in true_precision for cls in type(plugin).__mro__):
        return forward()
    return contextlib.nullcontext()


def task_gradients(
    module: nn.Module,
    batches: Iterable[Any],
    params: Mapping[str, Tensor],
    *,
    step_fn: Callable[[Any, int], Any],
    num_batches: int = 1,
    prepare: Callable[[Any], Any] | None = None,
    context: Callable[[], Any] | None = None,
    scaler: Any | None = None,
    loaders: Iterable[Any] = (),
    no_sync: Callable[[], Any] | None = None,
    owner: str = "task_gradients",
) -> dict[str, Tensor]:
    """Mean task-loss gradient of ``params`` over the first ``num_batches`` batches.

    ``step_fn(batch, batch_idx)`` returns the loss (a tensor, or a mapping with ``"loss"``), as a
    LightningModule's ``training_step`` does. The pass runs inside `isolated` with the modules
    in the modes they have (``mode="keep"``: a module frozen in eval mode stays so), so module
    modes, buffers (BatchNorm statistics), ``.grad``, ``requires_grad``, the RNG states and the
    generators of ``loaders`` are restored afterwards; frozen ``params`` get a gradient for this
    pass only.

    Args:
        module: the model.
        batches: an iterable of batches (a loader).
        params: the parameters whose gradients are returned, by name.
        step_fn: ``fn(batch, batch_idx) -> loss``.
        num_batches: how many batches to average over (fewer if ``batches`` runs out).
        prepare: ``fn(batch) -> batch`` applied first (device, precision).
        context: a context manager factory around each ``step_fn`` call (autocast, dtype).
        scaler: a gradient scaler (mixed precision): the loss is scaled and the gradients
            unscaled.
        loaders: loaders iterated, whose generators are restored.
        no_sync: a context manager factory that disables gradient synchronization (DDP).
        owner: the name in error messages.

    Returns:
        Detached gradients by name (the mean over the batches).

    Raises:
        RuntimeError: when no batch comes, when ``step_fn`` returns no loss, or when a
            parameter gets no gradient (unused by ``step_fn``), naming it.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> x, y = torch.ones(4, 2), torch.zeros(4, 1)
        >>> step = lambda batch, i: ((net(batch[0]) - batch[1]) ** 2).mean()
        >>> grads = task_gradients(net, [(x, y)] * 3, {"weight": net.weight}, step_fn=step,
        ...                        num_batches=2)
        >>> expected = torch.autograd.grad(step((x, y), 0), net.weight)[0]
        >>> bool(torch.allclose(grads["weight"], expected)), net.weight.grad is None
        (True, True)
    """
    grads: dict[str, Tensor] = {}
    count = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolated(module, mode="keep", grad_params=params.values(),
                                     loaders=loaders))  # fmt: skip
        stack.enter_context(quiet_logging(module))
        if no_sync is not None:
            stack.enter_context(no_sync())
        iterator = iter(batches)
        for batch_idx in range(num_batches):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if prepare is not None:
                batch = prepare(batch)
            with context() if context is not None else contextlib.nullcontext():
                out = step_fn(batch, batch_idx)
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, Tensor):
                raise RuntimeError(
                    f"{owner}: the gradient-based criterion needs `training_step` to return the "
                    "loss (a tensor or a dict with 'loss'), but it returned "
                    f"{type(out).__name__}"
                )
            if scaler is not None:
                scaler.scale(loss.float()).backward()
            else:
                loss.float().backward()
            count += 1
        del iterator
        if count == 0:
            raise RuntimeError(f"{owner}: the training dataloader yielded no batch")
        unused = [name for name, p in params.items() if p.grad is None]
        if unused:
            raise RuntimeError(
                f"{owner}: the gradient of every pruned parameter is needed, but {unused} "
                "received none: they are not used by `training_step`, so their score would be 0 "
                "and they would be pruned first. Exclude them (`exclude_names=`) or use "
                "criterion='magnitude'."
            )
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        for name, p in params.items():
            g = p.grad.detach().clone()  # type: ignore[union-attr]
            if count > 1 or scale != 1.0:
                g.div_(count * scale)
            grads[name] = g
    return grads
