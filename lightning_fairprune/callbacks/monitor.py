"""`FairnessMonitor`: who lost accuracy, and why, around every pruning round.

The monitor reacts to the pruning-round protocol of `IterativePruning`
(`lightning_fairprune.pruning.events`) and measures, on a fairness dataloader, per-group
recall and accuracy, the recall-distortion quantities of [GOOD] (B, B̃, I, α against the dense
reference) and the disparate-impact factors of [TRAN] (per-group loss and excessive loss,
gradient norm, Hutchinson Hessian trace, and the second-order *predicted* excessive loss of the
round's pruning step). The numbers come from the plain-torch core in
`lightning_fairprune.diagnostics`; this module only decides *when* to measure, *on what*, and
keeps the history.

Moments (the ``"moment"`` field of every record):

* ``"dense"``: in ``on_before_pruning_round`` of round 0, the dense model θ*; the reference of
  every relative quantity.
* ``"after_round"``: in ``on_pruning_round``, the immediate damage of the round (pruned θ̄,
  before any fine-tuning). Carries ``predicted_excess_loss`` = g_aᵀδ + ½δᵀH_aδ for the round's
  step δ = θ̄ − θ_pre, with g_a and H_a taken at the pre-round weights θ_pre.
* ``"before_round"``: in ``on_before_pruning_round`` of rounds ≥ 1, after the fine-tuning that
  followed the previous round (what the papers report).
* ``"periodic"``: every ``every_n_epochs`` training epochs (optional).
* ``"end"``: in ``on_train_end``.

``excess_loss`` is R(a) against the *dense* reference; the realized loss change of one round
(comparable to ``predicted_excess_loss``) is the ``loss`` of its ``after_round`` record minus the
``loss`` of the ``dense``/``before_round`` record of the same round, both in the history.

Every measurement runs with gradients enabled and outside inference mode, with the model in
eval mode, and restores the train/eval mode of every module, the parameters' ``.grad`` and the
RNG states (torch CPU and CUDA, Python, NumPy), so training is bit-for-bit unaffected.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_fairprune import logging as fp_logging
from lightning_fairprune.callbacks.events import PruningEvent

__all__ = ["HISTORY_FILENAME", "MOMENTS", "FairnessMonitor", "preserve_training_state"]

#: Default file name of the JSON-lines history, written in the run's log directory.
HISTORY_FILENAME = "fairprune_history.jsonl"

#: The moments a record can be taken at, in the order they can happen in a round.
MOMENTS: tuple[str, ...] = ("dense", "after_round", "before_round", "periodic", "end")

BatchSplitter = Callable[[Any], "tuple[Any, Tensor, Tensor]"]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Convert tensors/numpy/containers to JSON-safe Python values (NaN and inf -> None)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        value = value.item() if value.ndim == 0 else value.tolist()
        return _plain(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return _plain(item())
    tolist = getattr(value, "tolist", None)  # numpy arrays
    if callable(tolist):
        return _plain(tolist())
    return value


def _qualified_name(value: Any) -> str | None:
    """``module.qualname`` of a callable (its type's for other objects); ``None`` stays."""
    if value is None:
        return None
    target = value if callable(value) and hasattr(value, "__qualname__") else type(value)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{name}" if module else str(name)


def _f64(values: Sequence[float | None]) -> Tensor:
    """A float64 tensor of plain values (None -> NaN)."""
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


def _check_int(value: Any, name: str, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"Expected `{name}` to be {expected}, but got {value!r}")


def _find_pruner(trainer: pl.Trainer) -> Any | None:
    """The pruning callback attached to ``trainer`` (duck-typed), or ``None``."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if type(callback).__name__ == "IterativePruning":
            return callback
    for callback in getattr(trainer, "callbacks", None) or []:
        if hasattr(callback, "masks") and hasattr(callback, "rounds_done"):
            return callback
    return None


def _pruner_parameter_names(pruner: Any, model: nn.Module) -> list[str] | None:
    """FQNs of the parameters ``pruner`` prunes, from its public attributes, if it says."""
    for attr in ("parameter_names", "param_names", "pruned_parameter_names"):
        names = getattr(pruner, attr, None)
        if callable(names):
            names = names()
        if names:
            return [str(n) for n in names]
    for attr in ("parameters", "params", "selected_parameters"):
        params = getattr(pruner, attr, None)
        if isinstance(params, Mapping) and params:
            return [str(n) for n in params]
    masks = getattr(pruner, "masks", None)
    if isinstance(masks, Mapping) and masks:
        return [str(n) for n in masks]
    fqns = getattr(pruner, "_fqns", None)  # IterativePruning before its first round
    if isinstance(fqns, (list, tuple)) and fqns:
        return [str(n) for n in fqns]
    return None


def _default_weight_names(model: nn.Module) -> list[str]:
    """Weights of Conv/Linear modules (the pruning default), else every trainable parameter."""
    try:
        from lightning_fairprune.pruning.selection import select_parameters

        names = list(select_parameters(model))
        if names:
            return names
    except Exception:  # selection module missing or nothing matched: use every weight
        pass
    return [n for n, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# the measurement context: nothing the monitor does may leak into training
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserve_training_state(model: nn.Module) -> Iterator[None]:
    """Run a measurement without disturbing training.

    Inside: gradients enabled, inference mode off, every module of ``model`` in eval mode and
    every parameter's ``.grad`` set to ``None``. On exit (also on error): the train/eval flag of
    every module, the ``.grad`` objects and the RNG states (torch CPU, CUDA when initialized,
    Python `random`, NumPy) are restored exactly.

    Args:
        model: the module being measured.

    Example:
        >>> import random
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> net[0].weight.grad = torch.ones(2, 2)
        >>> before = (torch.rand(1), random.random())
        >>> _ = torch.manual_seed(0); _ = random.seed(0)
        >>> with torch.inference_mode(), preserve_training_state(net):
        ...     print(torch.is_grad_enabled(), net.training, net[0].weight.grad)
        ...     _ = torch.rand(5); _ = random.random()
        True False None
        >>> (torch.rand(1), random.random()) == (torch.manual_seed(0) and torch.rand(1),
        ...                                      random.seed(0) or random.random())
        True
        >>> net.training, net[0].weight.grad.sum().item()
        (True, 4.0)
    """
    modes = [(module, module.training) for module in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    torch_state = torch.get_rng_state()
    python_state = random.getstate()
    numpy_state = None
    try:
        import numpy as np

        numpy_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch installs
        np = None  # type: ignore[assignment]
    cuda_state = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_state = torch.cuda.get_rng_state_all()
    try:
        for p in params:
            p.grad = None
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        if numpy_state is not None and np is not None:
            np.random.set_state(numpy_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


# --------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------
class FairnessMonitor(Callback):
    """Measure per-group fairness and its factors around every pruning round.

    Attach it to a `Trainer` together with `IterativePruning` (any callback that follows the
    pruning-round protocol works). See the module docstring for the moments, and the README's
    `FairnessMonitor` section for the fields of each record in `history`.

    Data: ``dataloader`` if given, used as is on every process (under DDP give each process its
    own shard: the per-process sums are all-reduced), else the trainer's validation dataloader
    (under DDP already sharded by Lightning's `DistributedSampler`, which may repeat up to
    ``world_size - 1`` samples to even the shards); when the trainer has none set up, the
    datamodule's or module's ``val_dataloader()``, sharded by batch index across processes. The
    loader is resolved once, at the first measurement, so every record sees the same data.

    Groups: a batch ``(x, y)`` means groups = classes; ``(x, y, g)`` or a dict with
    ``input_key``/``target_key``/``group_key`` carries a protected attribute ``g``; or
    ``group_fn(batch) -> (x, y, g)``. ``num_groups`` is required when the groups are not the
    classes. The number of classes is read from the logits.

    Args:
        dataloader: fairness dataloader; ``None`` uses the validation dataloader.
        num_groups: number of groups G (ids in [0, G)); default: number of classes when the
            groups are the classes; required for protected attributes.
        max_batches: at most this many batches per measurement (per process); ``None``: all.
        group_fn: ``fn(batch) -> (inputs, targets, groups)``; overrides the batch parsing.
        input_key: key of the inputs in a dict batch.
        target_key: key of the class targets in a dict batch.
        group_key: key of the group ids in a dict batch; ``None``: groups = classes.
        params: parameters used for gradient norms, Hessian traces and the predicted excessive
            loss: ``None`` (the parameters the pruner prunes, else the Conv/Linear weights),
            ``"all"`` (every trainable parameter), or a sequence of fnmatch patterns on the
            parameter FQNs.
        num_probes: Rademacher probes of the Hutchinson Hessian trace; ``0`` disables it.
        lambda_max_iterations: power iterations for the top Hessian eigenvalue λ_max of each
            group (record key ``hessian_lambda_max``); each is one more pass over the fairness
            data with one Hessian-vector product per chunk; ``0`` (default) disables it.
        gradient_norms: measure the per-group gradient norms.
        predict_excess_loss: compute the predicted excessive loss at every ``after_round``.
        seed: seed of the Hutchinson probes (the same probes at every measurement).
        every_n_epochs: also measure (moment ``"periodic"``) at the end of every n-th training
            epoch; ``None``: never.
        measure_end: measure at the end of training (moment ``"end"``).
        history_path: JSON-lines file of the history; default
            ``<trainer.log_dir>/fairprune_history.jsonl``. Written by global rank 0 only.
        loss_fn: per-sample loss ``fn(logits, targets) -> Tensor[N]``; default cross-entropy.
        forward_fn: ``fn(model, inputs) -> logits``; default ``model(inputs)``.
        log: send the scalars of each record to the trainer's loggers; also, on global rank
            0, put `settings` into the W&B run config (``fairprune/monitor``) in ``setup`` and
            the final numbers of `history` into the W&B run summary at the end of training.
        name: distinguishes several monitors in one trainer (checkpoint state key).

    Example:
        >>> monitor = FairnessMonitor(num_probes=0, max_batches=2)
        >>> monitor.history
        []
        >>> FairnessMonitor(num_probes=-1)
        Traceback (most recent call last):
        ...
        ValueError: Expected `num_probes` to be an int >= 0, but got -1
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | None = None,
        *,
        num_groups: int | None = None,
        max_batches: int | None = None,
        group_fn: Callable[[Any], tuple[Any, Tensor, Tensor]] | None = None,
        input_key: str = "x",
        target_key: str = "y",
        group_key: str | None = "group",
        params: str | Sequence[str] | None = None,
        num_probes: int = 8,
        lambda_max_iterations: int = 0,
        gradient_norms: bool = True,
        predict_excess_loss: bool = True,
        seed: int = 0,
        every_n_epochs: int | None = None,
        measure_end: bool = True,
        history_path: str | os.PathLike[str] | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        log: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if dataloader is not None and not isinstance(dataloader, Iterable):
            raise TypeError(
                f"Expected `dataloader` to be an iterable of batches (a DataLoader) or None, "
                f"but got {type(dataloader).__name__}"
            )
        _check_int(num_groups, "num_groups", 1, allow_none=True)
        _check_int(max_batches, "max_batches", 1, allow_none=True)
        _check_int(num_probes, "num_probes", 0)
        _check_int(lambda_max_iterations, "lambda_max_iterations", 0)
        _check_int(seed, "seed", 0)
        _check_int(every_n_epochs, "every_n_epochs", 1, allow_none=True)
        if group_fn is not None and not callable(group_fn):
            raise TypeError(f"Expected `group_fn` to be callable or None, but got {group_fn!r}")
        for arg, value in (("loss_fn", loss_fn), ("forward_fn", forward_fn)):
            if value is not None and not callable(value):
                raise TypeError(f"Expected `{arg}` to be callable or None, but got {value!r}")
        for arg, value in (("input_key", input_key), ("target_key", target_key)):
            if not isinstance(value, str):
                raise TypeError(f"Expected `{arg}` to be a str, but got {value!r}")
        if group_key is not None and not isinstance(group_key, str):
            raise TypeError(f"Expected `group_key` to be a str or None, but got {group_key!r}")
        if isinstance(params, str):
            if params != "all":
                raise ValueError(
                    "Expected `params` to be None, 'all' or a sequence of parameter name "
                    f"patterns, but got {params!r}"
                )
        elif params is not None:
            if not isinstance(params, Sequence) or not all(isinstance(p, str) for p in params):
                raise TypeError(
                    "Expected `params` to be None, 'all' or a sequence of parameter name "
                    f"patterns (str), but got {params!r}"
                )
            if len(params) == 0:
                raise ValueError("Expected `params` to hold at least one pattern, but got []")
        for arg, flag in (
            ("gradient_norms", gradient_norms),
            ("predict_excess_loss", predict_excess_loss),
            ("measure_end", measure_end),
            ("log", log),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"Expected `{arg}` to be a bool, but got {flag!r}")

        self.dataloader = dataloader
        self.num_groups = num_groups
        self.max_batches = max_batches
        self.group_fn = group_fn
        self.input_key = input_key
        self.target_key = target_key
        self.group_key = group_key
        self.params = params if params is None or isinstance(params, str) else list(params)
        self.num_probes = num_probes
        self.lambda_max_iterations = lambda_max_iterations
        self.gradient_norms = gradient_norms
        self.predict_excess_loss = predict_excess_loss
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self.measure_end = measure_end
        self.history_path = None if history_path is None else Path(history_path)
        self.loss_fn = loss_fn
        self.forward_fn = forward_fn
        # Lightning replaces `callback.log` with the module's `log` method at fit start
        # (`_attach_model_logging_functions`): the flag lives in `_log_enabled`
        self.log = log
        self._log_enabled = log
        self.name = name

        self.history: list[dict[str, Any]] = []
        self._dense: dict[str, Any] | None = None
        self._num_classes: int | None = None
        self._num_groups: int | None = num_groups
        self._param_names: list[str] | None = None
        self._loader: Iterable[Any] | None = None
        self._stride = False
        self._pre_round: dict[str, Tensor] | None = None
        self._resolved_path: Path | None = None
        self._file_synced = False

    # ---------------------------------------------------------------- state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def dense_reference(self) -> dict[str, Any] | None:
        """The dense reference (plain values: recall, norm_balance, loss, accuracy), or None."""
        return None if self._dense is None else dict(self._dense)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": _plain(self.history),
            "dense": _plain(self._dense),
            "num_classes": self._num_classes,
            "num_groups": self._num_groups,
            "param_names": None if self._param_names is None else list(self._param_names),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or "history" not in state_dict:
            raise ValueError(
                "Expected a FairnessMonitor state dict with a 'history' entry, but got "
                f"{type(state_dict).__name__} with keys "
                f"{sorted(state_dict) if isinstance(state_dict, Mapping) else None}"
            )
        saved_groups = state_dict.get("num_groups")
        if self.num_groups is not None and saved_groups not in (None, self.num_groups):
            raise ValueError(
                f"Expected the checkpoint's FairnessMonitor `num_groups` to equal "
                f"{self.num_groups}, but got {saved_groups}"
            )
        self.history = [dict(r) for r in state_dict["history"]]
        dense = state_dict.get("dense")
        self._dense = None if dense is None else dict(dense)
        self._num_classes = state_dict.get("num_classes")
        self._num_groups = saved_groups if saved_groups is not None else self.num_groups
        names = state_dict.get("param_names")
        self._param_names = None if names is None else list(names)
        self._file_synced = False

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts: resolve it here, on every process
        if self.history_path is not None:
            self._resolved_path = self.history_path
        else:
            log_dir = trainer.log_dir or trainer.default_root_dir
            self._resolved_path = Path(log_dir) / HISTORY_FILENAME
        self._file_synced = False
        self._loader = None
        if self._log_enabled and bool(getattr(trainer, "is_global_zero", True)):
            fp_logging.log_config(trainer, "monitor", self.settings())

    def settings(self) -> dict[str, Any]:
        """The constructor settings as plain JSON values (callables by qualified name).

        Example:
            >>> s = FairnessMonitor(num_probes=2, params=["fc.*"]).settings()
            >>> s["num_probes"], s["params"], s["dataloader"], s["loss_fn"]
            (2, ['fc.*'], None, None)
        """
        return {
            "dataloader": _qualified_name(self.dataloader),
            "num_groups": self.num_groups,
            "max_batches": self.max_batches,
            "group_fn": _qualified_name(self.group_fn),
            "input_key": self.input_key,
            "target_key": self.target_key,
            "group_key": self.group_key,
            "params": _plain(self.params),
            "num_probes": self.num_probes,
            "lambda_max_iterations": self.lambda_max_iterations,
            "gradient_norms": self.gradient_norms,
            "predict_excess_loss": self.predict_excess_loss,
            "seed": self.seed,
            "every_n_epochs": self.every_n_epochs,
            "measure_end": self.measure_end,
            "history_path": None if self.history_path is None else str(self.history_path),
            "loss_fn": _qualified_name(self.loss_fn),
            "forward_fn": _qualified_name(self.forward_fn),
            "log": self._log_enabled,
            "name": self.name,
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _find_pruner(trainer) is None and self.every_n_epochs is None and not self.history:
            warnings.warn(
                "FairnessMonitor found no pruning callback (IterativePruning) in "
                "`trainer.callbacks`: it will only measure at the end of training, with no "
                "dense reference. Add IterativePruning, or set `every_n_epochs`.",
                UserWarning,
                stacklevel=2,
            )

    def on_before_pruning_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent
    ) -> None:
        """Measure the dense reference (round 0) or the fine-tuned model (later rounds)."""
        moment = "dense" if event.round_index == 0 else "before_round"
        if moment == "before_round" and self._dense is None:
            warnings.warn(
                f"FairnessMonitor has no dense reference at pruning round {event.round_index}; "
                "the quantities relative to it are recorded as None.",
                UserWarning,
                stacklevel=2,
            )
        self.measure(trainer, pl_module, moment, event)
        self._snapshot(pl_module)

    def on_pruning_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: PruningEvent
    ) -> None:
        """Measure the immediate damage of the round, with its predicted excessive loss."""
        try:
            self.measure(trainer, pl_module, "after_round", event)
        finally:
            self._pre_round = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.every_n_epochs is not None
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        ):
            self.measure(trainer, pl_module, "periodic")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_end:
            self.measure(trainer, pl_module, "end")
        if self._log_enabled and bool(getattr(trainer, "is_global_zero", True)):
            fp_logging.log_summary(trainer, self.history)

    # ---------------------------------------------------------------- measurement
    def measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        moment: str,
        event: PruningEvent | None = None,
    ) -> dict[str, Any]:
        """Take one measurement now, append it to `history`, write and log it.

        Safe to call from any training-side hook (it enables gradients and leaves inference
        mode itself); under DDP every process must call it at the same point.

        Args:
            trainer: the running trainer.
            pl_module: the module being trained.
            moment: one of `MOMENTS`.
            event: the pruning event of the round, for the pruning moments.

        Returns:
            The new history record.

        Example:
            >>> _ = torch.manual_seed(0)
            >>> x, y = torch.randn(12, 4), torch.tensor([0, 1, 2] * 4)
            >>> monitor = FairnessMonitor([(x, y)], num_probes=2, log=False)
            >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False)
            >>> record = monitor.measure(trainer, nn.Linear(4, 3), "dense")
            >>> record["moment"], record["support"], record["alpha"]
            ('dense', [4, 4, 4], 1.0)
            >>> len(record["hessian_trace"]), record["excess_loss"]
            (3, [0.0, 0.0, 0.0])
        """
        if moment not in MOMENTS:
            raise ValueError(f"Expected `moment` to be one of {MOMENTS}, but got {moment!r}")
        with preserve_training_state(pl_module):
            record = self._measure(trainer, pl_module, moment, event)
        self.history.append(record)
        if moment == "dense":
            self._dense = {
                "recall": record["recall"],
                "norm_balance": record["norm_balance"],
                "loss": record["loss"],
                "accuracy": record["accuracy"],
            }
            # the dense record is its own reference
            self._fill_relative(record)
        self._write(trainer)
        if self._log_enabled:
            self._log(trainer, record)
        return record

    def _measure(
        self,
        trainer: pl.Trainer,
        model: pl.LightningModule,
        moment: str,
        event: PruningEvent | None,
    ) -> dict[str, Any]:
        from lightning_fairprune.diagnostics import measure_groups

        batches = self._batches(trainer, model)
        num_classes, num_groups = self._resolve_sizes(model, batches)
        names = self._resolve_param_names(trainer, model)
        named = dict(model.named_parameters())
        params = {n: named[n] for n in names}
        reduce_fn = self._reduce_fn(trainer)
        common: dict[str, Any] = {
            "params": params,
            "loss_fn": self.loss_fn,
            "forward_fn": self.forward_fn,
            "reduce_fn": reduce_fn,
        }

        predicted = None
        pre = self._pre_round
        if moment == "after_round" and self.predict_excess_loss and pre is not None:
            predicted = self._predicted(model, batches, num_groups, params, common, pre)

        measurement = measure_groups(
            model,
            batches,
            num_groups,
            num_classes,
            num_probes=self.num_probes,
            seed=self.seed,
            gradients=self.gradient_norms,
            **common,
        )
        if self.lambda_max_iterations:
            from lightning_fairprune.diagnostics import group_hessian_lambda_max

            with warnings.catch_warnings():  # absent groups were already reported above
                warnings.simplefilter("ignore", UserWarning)
                measurement.hessian_lambda_max = group_hessian_lambda_max(
                    model,
                    batches,
                    num_groups,
                    iterations=self.lambda_max_iterations,
                    seed=self.seed,
                    **common,
                )
        return self._record(trainer, model, moment, event, measurement, predicted, num_groups)

    def _predicted(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        num_groups: int,
        params: dict[str, nn.Parameter],
        common: dict[str, Any],
        pre: dict[str, Tensor],
    ) -> Tensor:
        """g_aᵀδ + ½δᵀH_aδ at the pre-round weights for the round's step δ = θ̄ − θ_pre.

        The pre-round values are loaded for the measurement and the pruned values restored
        bit for bit afterwards (also on error).
        """
        from lightning_fairprune.diagnostics import predicted_excess_loss

        post = {n: params[n].detach().clone() for n in pre}
        delta = {n: post[n] - pre[n] for n in pre}
        try:
            with torch.no_grad():
                for n in pre:
                    params[n].copy_(pre[n])
            return predicted_excess_loss(model, batches, delta, num_groups, **common)
        finally:
            with torch.no_grad():
                for n in pre:
                    params[n].copy_(post[n])

    def _snapshot(self, model: nn.Module) -> None:
        """Keep θ_pre of the measured parameters for the predicted excessive loss."""
        if not self.predict_excess_loss or self._param_names is None:
            self._pre_round = None
            return
        named = dict(model.named_parameters())
        self._pre_round = {n: named[n].detach().clone() for n in self._param_names}

    # ---------------------------------------------------------------- record
    def _record(
        self,
        trainer: pl.Trainer,
        model: nn.Module,
        moment: str,
        event: PruningEvent | None,
        m: Any,
        predicted: Tensor | None,
        num_groups: int,
    ) -> dict[str, Any]:
        from lightning_fairprune.diagnostics import disparity, normalized_recall_balance
        from lightning_fairprune.diagnostics import recall_balance as _balance

        recall = m.recall.double()
        accuracy = float(m.accuracy)
        support = m.support.sum(dim=1) if m.support.ndim == 2 else m.support
        loss = m.mean_loss.double()
        grad_norm = getattr(m, "grad_norms", None)
        trace = getattr(m, "hessian_trace", None)
        trace_se = getattr(m, "hessian_trace_stderr", None)
        lam = getattr(m, "hessian_lambda_max", None)
        record: dict[str, Any] = {
            "moment": moment,
            "round": self._round(trainer, moment, event),
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "sparsity": self._sparsity(trainer, model, moment, event),
            "accuracy": _plain(accuracy),
            "num_groups": int(num_groups),
            "support": [round(float(s)) for s in support.tolist()],
            "recall": _plain(recall),
            "recall_dense": None,
            "balance": _plain(_balance(recall, accuracy)),
            "norm_balance": _plain(normalized_recall_balance(recall, accuracy)),
            "intensification": None,
            "alpha": None,
            "loss": _plain(loss),
            "excess_loss": None,
            "predicted_excess_loss": None if predicted is None else _plain(predicted),
            "grad_norm": None if grad_norm is None else _plain(grad_norm),
            "hessian_trace": None if trace is None else _plain(trace),
            "hessian_trace_se": None if trace_se is None else _plain(trace_se),
            "hessian_lambda_max": None if lam is None else _plain(lam),
        }
        record["disparity"] = {
            "recall": _plain(disparity(recall, higher_is_worse=False)),
            "grad_norm": None if grad_norm is None else _plain(disparity(grad_norm)),
            "hessian_trace": None if trace is None else _plain(disparity(trace)),
            "hessian_lambda_max": None if lam is None else _plain(disparity(lam)),
            "loss": _plain(disparity(loss)),
        }
        self._fill_relative(record)
        return record

    def _fill_relative(self, record: dict[str, Any]) -> None:
        """Fill the fields relative to the dense reference (if there is one)."""
        from lightning_fairprune.diagnostics import (
            excessive_loss,
            intensification_alpha,
            intensification_ratio,
        )

        if self._dense is None:
            return
        dense = self._dense
        if len(dense["recall"]) != record["num_groups"]:
            raise ValueError(
                f"Expected {len(dense['recall'])} groups as in the dense reference, but the "
                f"measurement has {record['num_groups']}"
            )
        nrb, nrb_ref = _f64(record["norm_balance"]), _f64(dense["norm_balance"])
        record["recall_dense"] = list(dense["recall"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            record["intensification"] = _plain(intensification_ratio(nrb, nrb_ref))
            record["alpha"] = _plain(float(intensification_alpha(nrb, nrb_ref)))
        record["excess_loss"] = _plain(excessive_loss(_f64(record["loss"]), _f64(dense["loss"])))

    def _round(self, trainer: pl.Trainer, moment: str, event: PruningEvent | None) -> int:
        if event is not None:
            return int(event.round_index) + (1 if moment == "after_round" else 0)
        pruner = _find_pruner(trainer)
        done = getattr(pruner, "rounds_done", None) if pruner is not None else None
        if isinstance(done, int):
            return done
        return sum(1 for r in self.history if r.get("moment") == "after_round")

    def _sparsity(
        self, trainer: pl.Trainer, model: nn.Module, moment: str, event: PruningEvent | None
    ) -> float:
        if event is not None:
            if moment == "after_round" and event.realized_sparsity is not None:
                return float(event.realized_sparsity)
            if moment in ("dense", "before_round"):
                return float(event.previous_sparsity)
        pruner = _find_pruner(trainer)
        if pruner is not None:
            value = getattr(pruner, "current_sparsity", None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            names = _pruner_parameter_names(pruner, model)
        else:
            names = None
        names = names or self._param_names or _default_weight_names(model)
        named = dict(model.named_parameters())
        zeros = sum(int((named[n] == 0).sum()) for n in names if n in named)
        total = sum(named[n].numel() for n in names if n in named)
        return zeros / total if total else 0.0

    # ---------------------------------------------------------------- data
    def split_batch(self, batch: Any) -> tuple[Any, Tensor, Tensor | None]:
        """Return ``(inputs, targets, groups)`` of a batch; ``groups`` None means the classes.

        Override this (or pass ``group_fn``) for other batch structures.

        Args:
            batch: one batch of the fairness dataloader.

        Example:
            >>> m = FairnessMonitor(num_groups=2)
            >>> x, y, g = m.split_batch({"x": torch.zeros(2, 3), "y": torch.tensor([0, 1]),
            ...                          "group": torch.tensor([1, 1])})
            >>> g.tolist()
            [1, 1]
            >>> m.split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))[2] is None
            True
        """
        if self.group_fn is not None:
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
            if self.group_key is not None and self.group_key not in batch:
                missing.append(self.group_key)
            if missing:
                raise ValueError(
                    f"Expected a dict batch with keys {missing} (`input_key`, `target_key`, "
                    f"`group_key`), but the batch has keys {sorted(map(str, batch))}; set the "
                    "keys, `group_key=None` for groups = classes, or pass `group_fn`"
                )
            groups = None if self.group_key is None else batch[self.group_key]
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

    def _resolve_loader(self, trainer: pl.Trainer, model: pl.LightningModule) -> Iterable[Any]:
        if self._loader is not None:
            return self._loader
        self._stride = False
        loader: Any = self.dataloader
        if loader is None:
            loader = getattr(trainer, "val_dataloaders", None)
            reason = ""
            if loader is None:
                datamodule = getattr(trainer, "datamodule", None)
                source = datamodule if datamodule is not None else model
                getter = getattr(source, "val_dataloader", None)
                try:
                    loader = getter() if callable(getter) else None
                except Exception as err:  # e.g. "`val_dataloader` must be implemented"
                    reason = f" ({type(source).__name__}.val_dataloader(): {err})"
                self._stride = int(getattr(trainer, "world_size", 1)) > 1
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

    def _check_not_empty(self, trainer: pl.Trainer, model: nn.Module, loader: Any) -> None:
        """Raise on every process when some process would measure no batch (no deadlock)."""
        try:
            total = len(loader)
        except TypeError:  # an iterable without len (an IterableDataset): peek at it below
            total = None
        world = int(getattr(trainer, "world_size", 1))
        rank = int(getattr(trainer, "global_rank", 0))
        if total is None:
            # iterate only as far as this process's first batch (rank + 1 batches when the
            # monitor shards by batch index), so that every process learns whether any is empty
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
        if world > 1:
            device = next(model.parameters()).device
            flag = torch.tensor([empty], dtype=torch.float32, device=device)
            empty = float(trainer.strategy.reduce(flag, reduce_op="sum").sum())
        if empty > 0:
            where = "" if world == 1 else f" on {int(empty)} of {world} processes"
            raise ValueError(
                "Expected the fairness dataloader to yield at least one batch on every "
                f"process, but it has no batches{where}"
                + (f" (len {total})" if total is not None else "")
                + "; pass a `dataloader` "
                "with data for every process"
            )

    def _batches(self, trainer: pl.Trainer, model: pl.LightningModule) -> _Batches:
        loader = self._resolve_loader(trainer, model)
        rank = int(getattr(trainer, "global_rank", 0)) if self._stride else 0
        world = int(getattr(trainer, "world_size", 1)) if self._stride else 1
        device = getattr(model, "device", None)
        if not isinstance(device, torch.device):
            device = next(model.parameters()).device
        return _Batches(self, loader, device, rank, world)

    def _resolve_sizes(self, model: nn.Module, batches: _Batches) -> tuple[int, int]:
        if self._num_classes is not None and self._num_groups is not None:
            return self._num_classes, self._num_groups
        x, _, _ = batches.first()
        with torch.no_grad():
            logits = model(x) if self.forward_fn is None else self.forward_fn(model, x)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise ValueError(
                "Expected the model (or `forward_fn`) to return logits of shape (N, C), but got "
                f"{getattr(logits, 'shape', type(logits).__name__)}"
            )
        self._num_classes = int(logits.shape[1])
        if self._num_groups is None:
            if batches.groups_from_batch:
                raise ValueError(
                    "Expected `num_groups` to be given when the batches carry group ids "
                    "(a protected attribute), but got None"
                )
            self._num_groups = self._num_classes
        return self._num_classes, self._num_groups

    def _resolve_param_names(self, trainer: pl.Trainer, model: nn.Module) -> list[str]:
        if self._param_names is not None:
            return self._param_names
        named = dict(model.named_parameters())
        if self.params == "all":
            names = [n for n, p in named.items() if p.requires_grad]
        elif self.params is not None:
            names = [
                n
                for n, p in named.items()
                if p.requires_grad and any(fnmatch.fnmatchcase(n, pat) for pat in self.params)
            ]
        else:
            pruner = _find_pruner(trainer)
            found = _pruner_parameter_names(pruner, model) if pruner is not None else None
            names = found or _default_weight_names(model)
            names = [n for n in names if n in named and named[n].requires_grad]
        if not names:
            raise ValueError(
                f"Expected `params` {self.params!r} to select at least one trainable parameter "
                f"of {type(model).__name__}, but it selected none"
            )
        self._param_names = names
        return names

    @staticmethod
    def _reduce_fn(trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if int(getattr(trainer, "world_size", 1)) <= 1:
            return None
        strategy = trainer.strategy

        def reduce_sum(tensor: Tensor) -> Tensor:
            return strategy.reduce(tensor, reduce_op="sum")

        return reduce_sum

    # ---------------------------------------------------------------- output
    def _write(self, trainer: pl.Trainer) -> None:
        if not bool(getattr(trainer, "is_global_zero", True)) or self._resolved_path is None:
            return
        path = self._resolved_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not self._file_synced:
                # first write of this run: the file holds the whole (possibly resumed) history
                tmp = path.with_name(path.name + ".tmp")
                with tmp.open("w", encoding="utf-8") as fh:
                    for rec in self.history:
                        fh.write(json.dumps(_plain(rec), allow_nan=False) + "\n")
                os.replace(tmp, path)
                self._file_synced = True
            else:
                with path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(_plain(self.history[-1]), allow_nan=False) + "\n")
        except OSError as err:
            warnings.warn(
                f"FairnessMonitor could not write its history to {str(path)!r} "
                f"({type(err).__name__}: {err}); the history is kept in memory and in checkpoints.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _log(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        fp_logging.log_round(trainer, record, self.history)


class _Batches:
    """Re-iterable view of the fairness dataloader as validated ``(x, y, g)`` on the device."""

    def __init__(
        self,
        monitor: FairnessMonitor,
        loader: Iterable[Any],
        device: torch.device,
        rank: int,
        world_size: int,
    ) -> None:
        self.monitor = monitor
        self.loader = loader
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.groups_from_batch = False

    def _convert(self, batch: Any) -> tuple[Any, Tensor, Tensor]:
        x, y, g = self.monitor.split_batch(batch)
        if not isinstance(y, Tensor) or y.ndim != 1 or y.dtype.is_floating_point:
            raise ValueError(
                "Expected the targets of a fairness batch to be a 1-D integer tensor of class "
                f"ids, but got {getattr(y, 'dtype', type(y).__name__)} of shape "
                f"{tuple(getattr(y, 'shape', ()))}"
            )
        if g is None:
            g = y
        else:
            self.groups_from_batch = True
            if not isinstance(g, Tensor) or g.shape != y.shape or g.dtype.is_floating_point:
                raise ValueError(
                    "Expected the groups of a fairness batch to be a 1-D integer tensor with "
                    f"one id per sample ({tuple(y.shape)}), but got "
                    f"{getattr(g, 'dtype', type(g).__name__)} of shape "
                    f"{tuple(getattr(g, 'shape', ()))}"
                )
            g = g.long()
        num_groups = self.monitor._num_groups
        if num_groups is not None and g.numel():
            low, high = int(g.min()), int(g.max())
            if low < 0 or high >= num_groups:
                raise ValueError(
                    f"Expected group ids in [0, {num_groups}) (`num_groups`={num_groups}), but "
                    f"got ids from {low} to {high}"
                )
        x, y, g = move_data_to_device((x, y.long(), g), self.device)
        return x, y, g

    def first(self) -> tuple[Any, Tensor, Tensor]:
        for batch in self:
            return batch
        raise ValueError(
            "Expected the fairness dataloader to yield at least one batch, but got none"
        )

    def __iter__(self) -> Iterator[tuple[Any, Tensor, Tensor]]:
        count = 0
        limit = self.monitor.max_batches
        for index, batch in enumerate(self.loader):
            if self.world_size > 1 and index % self.world_size != self.rank:
                continue
            if limit is not None and count >= limit:
                break
            count += 1
            yield self._convert(batch)
        if count == 0 and self.world_size == 1:
            raise ValueError(
                "Expected the fairness dataloader to yield at least one batch, but got none"
            )
