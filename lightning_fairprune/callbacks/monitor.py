"""`FairnessMonitor`: who lost accuracy, and why, around every pruning round.

The monitor reacts to the pruning-round protocol of `IterativePruning`
(`lightning_fairprune.callbacks.events`) and measures, on a fairness dataloader, per-group
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
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_fairprune import logging as fp_logging
from lightning_fairprune.callbacks.events import PruningEvent, find_pruner
from lightning_fairprune.checks import check_bool, check_callable, check_int, check_real
from lightning_fairprune.diagnostics.sharded import GATE_MEMORY
from lightning_fairprune.fairness_data import FairnessBatches, FairnessData, agree
from lightning_fairprune.history import (
    HISTORY_FILENAME,
    MOMENTS,
    HistoryFile,
    dense_reference,
    history_filename,
    make_record,
    qualified_name,
    record_scalars,
    to_plain,
)
from lightning_fairprune.measure import isolated, precision_context

__all__ = ["HISTORY_FILENAME", "MOMENTS", "FairnessMonitor", "preserve_training_state"]

BatchSplitter = Callable[[Any], "tuple[Any, Tensor, Tensor]"]


def _default_weight_names(model: nn.Module) -> list[str]:
    """Weights of Conv/Linear modules (the pruning default), else every trainable parameter."""
    from lightning_fairprune.pruning.selection import select_parameters

    try:
        names = list(select_parameters(model))
    except ValueError:  # nothing matched (e.g. a model whose only layer is its classifier)
        names = []
    return names or [n for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def preserve_training_state(model: nn.Module) -> Iterator[None]:
    """Run a measurement without disturbing training (`lightning_fairprune.measure.isolated`).

    Kept for compatibility: the isolation context of every measurement is
    :func:`lightning_fairprune.measure.isolated` (eval mode inside; module modes, buffers,
    ``.grad``, ``requires_grad`` and RNG states restored on exit).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
        >>> with torch.inference_mode(), preserve_training_state(net):
        ...     print(torch.is_grad_enabled(), net.training)
        True False
        >>> net.training
        True
    """
    with isolated(model, mode="eval"):
        yield


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
    classes; give one size per attribute (and a list of ``group_key`` s, or a ``[N, k]`` group
    column) for intersectional groups such as race × sex. The number of classes is read from
    the logits. At fit start, before any training, the monitor peeks at one fairness batch and
    checks the groups (presence, dtype, range, ``num_groups``).

    Metrics: per group, the accuracy within the group (the recall of a class when the groups
    are the classes) and, for binary tasks, TPR, FPR and selection rate, each with a Wilson
    interval; the fairness summaries (worst-group accuracy, accuracy difference, demographic
    parity difference and ratio, equal-opportunity and equalized-odds differences), as
    fairlearn defines them; the recall-distortion and disparate-impact quantities of the
    papers; and any torchmetrics metric per group (``metrics=``). Every scalar of the latest
    measurement is in ``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor=...)`` and
    ``EarlyStopping`` can use e.g. ``"fairprune/worst_group_accuracy"``).

    Args:
        dataloader: fairness dataloader; ``None`` uses the validation dataloader.
        num_groups: number of groups G (ids in [0, G)); default: number of classes when the
            groups are the classes; required for protected attributes.
        max_batches: at most this many batches per measurement (per process); ``None``: all.
        group_fn: ``fn(batch) -> (inputs, targets, groups)``; overrides the batch parsing.
        input_key: key of the inputs in a dict batch.
        target_key: key of the class targets in a dict batch.
        group_key: key of the group ids in a dict batch (a list of keys for intersectional
            groups); ``None``: groups = classes.
        group_names: names of the groups, used in logger keys (as slugs), tables, plots and
            the history: a list of G names, a mapping id -> name, or for intersectional groups
            a mapping attribute key -> list of value names (product names then read
            ``"race=black & sex=F"``). Default: ``g0, g1, ...`` (or ``key=value`` products).
        pos_label: the positive class of a binary task (TPR, FPR, selection rate); ``None``
            treats two classes as multiclass.
        confidence: level of the Wilson intervals of every rate.
        min_group_size: groups with fewer samples than this (default 30: one sample moves a
            rate by 3.3 points there) are flagged in ``small_groups`` and warned about once.
        metrics: torchmetrics metrics computed per group, ``{name: Metric}``: each is cloned
            per group and updated with ``(logits, targets)`` of that group's samples only (a
            batch without a group leaves that group's clone untouched); results in the
            record's ``metrics`` and logged as ``fairprune/<name>/<group>``. One more forward
            pass over the fairness data per measurement.
        metrics_input: what the ``metrics`` get with the targets: ``"preds"`` (the predicted
            class ids, for accuracy/F1/precision... of binary and multiclass metrics) or
            ``"probs"`` (softmax probabilities; for two classes and a ``pos_label``, the
            probability of the positive class, as binary AUROC expects).
        params: parameters used for gradient norms, Hessian traces and the predicted excessive
            loss: ``None`` (the parameters the pruner prunes, else the Conv/Linear weights),
            ``"all"`` (every trainable parameter), or a sequence of fnmatch patterns on the
            parameter FQNs.
        num_probes: Rademacher probes of the Hutchinson Hessian trace; ``0`` disables it.
        lambda_max_iterations: power iterations for the top Hessian eigenvalue λ_max of each
            group (record key ``hessian_lambda_max``); each is one more pass over the fairness
            data with one Hessian-vector product per chunk (under FSDP2: two lockstep
            backward sets per group, finite differences with frozen gates); ``0`` (default)
            disables it.
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
        name: distinguishes several monitors in one trainer (checkpoint state key, history
            file ``fairprune_history-<name>.jsonl``, ``"monitor"`` field of the records).
        gate_memory: FSDP2-sharded models only: bytes the frozen activation gates of the
            finite-difference curvature (trace, λ_max, predicted excess loss) may take when
            stored for the whole fairness data (default 1 GiB, the diagnostics'
            ``GATE_MEMORY``); above it they are recomputed per chunk (the same numbers, one
            more no-grad forward per chunk); ``None``: no limit.

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
        num_groups: int | Sequence[int] | None = None,
        max_batches: int | None = None,
        group_fn: Callable[[Any], tuple[Any, Tensor, Tensor]] | None = None,
        input_key: str = "x",
        target_key: str = "y",
        group_key: str | Sequence[str] | None = "group",
        group_names: Sequence[str] | Mapping[Any, Any] | None = None,
        pos_label: int | None = 1,
        confidence: float = 0.95,
        min_group_size: int = 30,
        metrics: Mapping[str, Any] | None = None,
        metrics_input: str = "preds",
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
        gate_memory: int | None = GATE_MEMORY,
    ) -> None:
        super().__init__()
        # the fairness-data path validates dataloader, num_groups, max_batches, group_fn, keys
        self.data = FairnessData(
            dataloader,
            num_groups=num_groups,
            max_batches=max_batches,
            group_fn=group_fn,
            input_key=input_key,
            target_key=target_key,
            group_key=group_key,
        )
        if type(self).split_batch is not FairnessMonitor.split_batch and group_fn is None:
            self.data.group_fn = self._split_with_override  # a subclass parses batches itself
        check_int(num_probes, "num_probes", 0)
        check_int(lambda_max_iterations, "lambda_max_iterations", 0)
        check_int(gate_memory, "gate_memory", 0, allow_none=True)
        check_int(seed, "seed", 0)
        check_int(every_n_epochs, "every_n_epochs", 1, allow_none=True)
        check_callable(loss_fn, "loss_fn")
        check_callable(forward_fn, "forward_fn")
        if pos_label is not None and pos_label not in (0, 1):
            raise ValueError(f"Expected `pos_label` to be 0, 1 or None, but got {pos_label!r}")
        self.pos_label = pos_label
        self.confidence = check_real(
            confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.min_group_size = check_int(min_group_size, "min_group_size", 1)
        self.group_names = group_names
        self._names = self._check_group_names(group_names)
        self.metrics = self._check_metrics(metrics)
        if metrics_input not in ("preds", "probs"):
            raise ValueError(
                f"Expected `metrics_input` to be 'preds' or 'probs', but got {metrics_input!r}"
            )
        self.metrics_input = metrics_input
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Expected `name` to be a str or None, but got {name!r}")
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
            check_bool(flag, arg)

        self.params = params if params is None or isinstance(params, str) else list(params)
        self.num_probes = num_probes
        self.lambda_max_iterations = lambda_max_iterations
        self.gate_memory = gate_memory
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
        self._num_groups: int | None = self.data.num_groups
        self._param_names: list[str] | None = None
        self._pre_round: dict[str, Tensor] | None = None
        self._file: HistoryFile | None = None
        self._warned_small = False
        self._sharded = False  # the measured parameters are FSDP2 DTensors
        self._last_logged_step: int | None = None
        self._periodic_epoch: int | None = None

    # ---------------------------------------------------------------- the data's arguments
    @property
    def dataloader(self) -> Iterable[Any] | None:
        """The ``dataloader`` argument."""
        return self.data.dataloader

    @dataloader.setter
    def dataloader(self, value: Iterable[Any] | None) -> None:
        if value is not None and not isinstance(value, Iterable):
            raise TypeError(
                f"Expected `dataloader` to be an iterable of batches (a DataLoader) or None, "
                f"but got {type(value).__name__}"
            )
        self.data.dataloader = value
        self.data.reset()

    @property
    def num_groups(self) -> int | None:
        """The ``num_groups`` argument."""
        return self.data.num_groups

    @num_groups.setter
    def num_groups(self, value: int | None) -> None:
        self.data.num_groups = check_int(value, "num_groups", 1, allow_none=True)
        self._num_groups = self.data.num_groups

    @property
    def max_batches(self) -> int | None:
        """The ``max_batches`` argument."""
        return self.data.max_batches

    @max_batches.setter
    def max_batches(self, value: int | None) -> None:
        self.data.max_batches = check_int(value, "max_batches", 1, allow_none=True)

    @property
    def group_fn(self) -> BatchSplitter | None:
        """The ``group_fn`` argument."""
        fn = self.data.group_fn
        return None if fn == self._split_with_override else fn

    @property
    def input_key(self) -> str:
        """The ``input_key`` argument."""
        return self.data.input_key

    @property
    def target_key(self) -> str:
        """The ``target_key`` argument."""
        return self.data.target_key

    @property
    def group_key(self) -> str | None:
        """The ``group_key`` argument."""
        return self.data.group_key

    @property
    def history_file(self) -> Path | None:
        """Where the history is written (known from ``setup`` on)."""
        return None if self._file is None else self._file.path

    # ---------------------------------------------------------------- groups and metrics
    def _check_group_names(self, names: Any) -> list[str] | None:
        """Names known at construction (``None``: resolved when G is known)."""
        from lightning_fairprune.diagnostics.group_metrics import (
            normalize_group_names,
            product_group_names,
        )

        sizes = self.data.attribute_sizes
        if sizes is not None and len(sizes) > 1:
            keys = self.data.group_keys or [f"a{i}" for i in range(len(sizes))]
            if names is None:
                return product_group_names(sizes, keys)
            if isinstance(names, Mapping) and all(k in names for k in keys):
                return product_group_names(sizes, keys, [names[k] for k in keys])
            return normalize_group_names(names, math.prod(sizes))
        if names is None:
            return None
        if isinstance(names, str) or not isinstance(names, (Sequence, Mapping)):
            raise TypeError(
                "Expected `group_names` to be a list of names, a mapping id -> name, or (for "
                f"intersectional groups) a mapping attribute -> value names, but got {names!r}"
            )
        count = self.data.num_groups
        if count is None and isinstance(names, Sequence):
            count = len(names)
        if count is not None:
            return normalize_group_names(names, count)
        return None  # a mapping without `num_groups`: checked once G is known

    def _check_metrics(self, metrics: Any) -> dict[str, Any]:
        if metrics is None:
            return {}
        if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
            raise TypeError(
                "Expected `metrics` to be a mapping name -> torchmetrics Metric, but got "
                f"{type(metrics).__name__}"
            )
        for name, metric in metrics.items():
            if not (callable(getattr(metric, "update", None)) and callable(metric.compute)):
                raise TypeError(
                    f"Expected `metrics[{name!r}]` to be a torchmetrics Metric (with update and "
                    f"compute), but got {type(metric).__name__}"
                )
        return dict(metrics)

    def resolved_group_names(self) -> list[str] | None:
        """The group names in use (known once the number of groups is)."""
        from lightning_fairprune.diagnostics.group_metrics import normalize_group_names

        if self._num_groups is None:
            return self._names
        if self._names is None or len(self._names) != self._num_groups:
            self._names = normalize_group_names(self.group_names, self._num_groups)
        return self._names

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
            "history": to_plain(self.history),
            "dense": to_plain(self._dense),
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
        if self._file is not None:
            self._file.synced = False

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts: resolve it here, on every process
        if self.history_path is not None:
            path = self.history_path
        else:
            path = self._run_dir(trainer) / history_filename(self.name)
        self._file = HistoryFile(path)
        self.data.reset()
        self._warned_small = False
        self._last_logged_step = None
        if self._log_enabled and bool(getattr(trainer, "is_global_zero", True)):
            fp_logging.log_config(trainer, self._config_name(), self.settings())

    def _config_name(self) -> str:
        return "monitor" if self.name is None else f"monitor-{self.name}"

    @staticmethod
    def _run_dir(trainer: pl.Trainer) -> Path:
        """The run's own directory: ``trainer.log_dir``, or ``<save_dir>/fairprune/<run id>``.

        TensorBoard and CSV loggers give each run its own ``version_N`` directory, but a
        `WandbLogger` first in ``trainer.loggers`` only has its shared ``save_dir``: the W&B run
        id is appended so that two runs never write the same history. Resolved on every process
        (``trainer.log_dir`` broadcasts; the run id is broadcast from rank 0).
        """
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        loggers = list(getattr(trainer, "loggers", None) or [])
        if not loggers or type(loggers[0]).__name__ != "WandbLogger":
            return log_dir
        version = None
        if bool(getattr(trainer, "is_global_zero", True)):
            try:
                version = loggers[0].version
            except Exception:  # a logger that cannot start: the shared directory it is
                version = None
        version = trainer.strategy.broadcast(version)
        if version is None or str(version) == "":
            return log_dir
        return log_dir / "fairprune" / str(version)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_data(trainer, pl_module)

    def check_data(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> None:
        """Validate the whole fairness data before any training.

        Checks that the loader exists and is not empty on any process, that ``num_groups`` is
        given when the batches carry groups, and that batches *without* a group column are not
        silently measured as class groups when ``num_groups`` (a protected attribute) was
        given with a count other than the number of classes; learns the number of classes from
        the logits of the first batch. Then `FairnessData.scan` checks every batch (at most
        ``max_batches``, this process's share): targets and groups are integer ids of one per
        sample within the number of groups, inputs are finite (errors name the batch index, the
        offending ids or the groups of the non-finite samples), and groups with no sample are
        reported; every process reaches the same verdict.

        Raises:
            ValueError: naming what is wrong.
        """
        error: ValueError | None = None
        try:  # the first batch (one forward): sizes, and groups present when num_groups given
            with isolated(pl_module, mode="eval"), precision_context(trainer):
                batches = self._batches(trainer, pl_module)  # type: ignore[arg-type]
                self._num_classes = None
                self._resolve_sizes(pl_module, batches)
            self.data.check_group_column(batches.groups_from_batch, self._num_classes)
        except ValueError as err:
            error = err
        agree(trainer, pl_module, error, "FairnessMonitor")  # every process raises, or none
        # every batch, not only the first: ids, non-finite inputs, empty groups (forward-free)
        self.data.scan(trainer, pl_module, num_groups=self._num_groups, owner="FairnessMonitor")
        self.resolved_group_names()
        self.data.reset()  # the loader is resolved again at the first measurement

    def settings(self) -> dict[str, Any]:
        """The constructor settings as plain JSON values (callables by qualified name).

        Example:
            >>> s = FairnessMonitor(num_probes=2, params=["fc.*"]).settings()
            >>> s["num_probes"], s["params"], s["dataloader"], s["loss_fn"]
            (2, ['fc.*'], None, None)
        """
        return {
            "dataloader": qualified_name(self.dataloader),
            "num_groups": self.num_groups,
            "max_batches": self.max_batches,
            "group_fn": qualified_name(self.group_fn),
            "input_key": self.input_key,
            "target_key": self.target_key,
            "group_key": self.group_key,
            "params": to_plain(self.params),
            "num_probes": self.num_probes,
            "lambda_max_iterations": self.lambda_max_iterations,
            "gate_memory": self.gate_memory,
            "gradient_norms": self.gradient_norms,
            "predict_excess_loss": self.predict_excess_loss,
            "seed": self.seed,
            "every_n_epochs": self.every_n_epochs,
            "measure_end": self.measure_end,
            "group_names": to_plain(self.group_names),
            "pos_label": self.pos_label,
            "confidence": self.confidence,
            "min_group_size": self.min_group_size,
            "metrics": sorted(self.metrics),
            "metrics_input": self.metrics_input,
            "history_path": None if self.history_path is None else str(self.history_path),
            "loss_fn": qualified_name(self.loss_fn),
            "forward_fn": qualified_name(self.forward_fn),
            "log": self._log_enabled,
            "name": self.name,
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if find_pruner(trainer) is None and self.every_n_epochs is None and not self.history:
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

    def _periodic_due(self, trainer: pl.Trainer) -> bool:
        return (
            self.every_n_epochs is not None
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            and self._periodic_epoch != trainer.current_epoch
        )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # measure before ModelCheckpoint/EarlyStopping act on this validation (they run after
        # the validation that ends the epoch, before `on_train_epoch_end`)
        if trainer.sanity_checking or not trainer.training:
            return
        progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
        if not bool(getattr(progress, "is_last_batch", True)):
            return  # a mid-epoch validation (`val_check_interval` < 1)
        if self._periodic_due(trainer):
            self._periodic_epoch = trainer.current_epoch
            self.measure(trainer, pl_module, "periodic")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._periodic_due(trainer):
            self._periodic_epoch = trainer.current_epoch
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
        with isolated(pl_module, mode="eval"), precision_context(trainer):
            record = self._measure(trainer, pl_module, moment, event)
        self.history.append(record)
        if moment == "dense":
            self._dense = dense_reference(record)
        self._write(trainer)
        self._warn_small_groups(record)
        self._publish(trainer, record)
        if self._log_enabled:
            self._log(trainer, record)
        return record

    def _warn_small_groups(self, record: Mapping[str, Any]) -> None:
        small = record.get("small_groups") or []
        if small and not self._warned_small:
            self._warned_small = True
            names = record.get("group_names") or []
            shown = [names[g] if g < len(names) else g for g in small]
            sizes = [record["support"][g] for g in small]
            warnings.warn(
                f"FairnessMonitor: group(s) {shown} have fewer than {self.min_group_size} "
                f"samples ({sizes}) in the fairness data; one sample moves their rates by "
                f"more than {100 / self.min_group_size:.1f} points. Read their numbers with "
                "their Wilson intervals (`<rate>_ci` in the records, `_lower`/`_upper` keys).",
                UserWarning,
                stacklevel=3,
            )

    def _publish(self, trainer: pl.Trainer, record: Mapping[str, Any]) -> None:
        """Put the record's scalars into ``trainer.callback_metrics`` (the latest wins).

        ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` read them from there. Every
        record updates the plain keys (``fairprune/worst_group_accuracy``...), so they always
        describe the latest measured model; the same values are also kept under
        ``fairprune/<moment>/...`` for the dense and after-round records.
        """
        metrics = getattr(trainer, "callback_metrics", None)
        if not isinstance(metrics, dict):
            return
        scalars = record_scalars(record)
        moment = record.get("moment")
        if moment in ("dense", "after_round"):
            scalars.update(
                {
                    f"fairprune/{moment}/{k.removeprefix('fairprune/')}": v
                    for k, v in record_scalars(record).items()
                }
            )
        for key, value in scalars.items():
            metrics[key] = torch.tensor(value, dtype=torch.float32)

    def _measure(
        self,
        trainer: pl.Trainer,
        model: pl.LightningModule,
        moment: str,
        event: PruningEvent | None,
    ) -> dict[str, Any]:
        from lightning_fairprune.diagnostics.sharded import has_dtensor_params

        batches = self._batches(trainer, model)
        num_classes, num_groups = self._resolve_sizes(model, batches, classes=False)
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

        self._sharded = has_dtensor_params(params.values())
        if self._sharded:  # FSDP2: no double backward; finite-difference curvature
            measurement, predicted = self._measure_sharded(
                model, batches, num_groups, num_classes, common, moment
            )
        else:
            measurement, predicted = self._measure_plain(
                model, batches, num_groups, num_classes, params, common, moment
            )
        self._num_classes = int(measurement.support.shape[1])  # from the measurement's logits
        record = make_record(
            measurement,
            moment=moment,
            round_index=self._round(trainer, moment, event),
            epoch=int(trainer.current_epoch),
            global_step=int(trainer.global_step),
            sparsity=self._sparsity(trainer, model, moment, event),
            num_groups=num_groups,
            predicted=predicted,
            dense=self._dense,
            monitor=self.name,
            group_names=self.resolved_group_names(),
            groups_are_classes=not batches.groups_from_batch,
            pos_label=self.pos_label,
            confidence=self.confidence,
            min_group_size=self.min_group_size,
        )
        cost = {} if event is None else event.cost_at(moment)  # the pruner's, when it measured
        record.update(params=cost.get("params"), flops=cost.get("flops"))  # plot vs FLOPs
        if self.metrics:
            record["metrics"] = self._user_metrics(trainer, model, batches, num_groups)
        return record

    def _measure_plain(
        self,
        model: nn.Module,
        batches: FairnessBatches,
        num_groups: int,
        num_classes: int | None,
        params: dict[str, nn.Parameter],
        common: dict[str, Any],
        moment: str,
    ) -> tuple[Any, Tensor | None]:
        """`measure_groups` (and λ_max, the predicted excess loss) on unsharded parameters."""
        from lightning_fairprune.diagnostics import measure_groups

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
        return measurement, predicted

    def _measure_sharded(
        self,
        model: nn.Module,
        batches: FairnessBatches,
        num_groups: int,
        num_classes: int | None,
        common: dict[str, Any],
        moment: str,
    ) -> tuple[Any, Tensor | None]:
        """FSDP2-sharded parameters: everything from local shards.

        Forward-only sums and gradient norms (`sharded_measure_groups`), the Hutchinson trace
        with its standard error (`sharded_group_hessian_trace`, the probes of the unsharded
        path), the predicted excess loss (`sharded_predicted_excess_loss`) and λ_max
        (`sharded_group_hessian_lambda_max`, the start vectors of the unsharded path), all by
        central differences of sharded gradients with frozen gates (``(2 · num_probes + 1) ·
        G``, ``3 · G`` and ``(2 · lambda_max_iterations + 1) · G`` sharded backward sets),
        stored for the whole data within ``gate_memory``, else recomputed per chunk (same
        results, one more no-grad forward per chunk).
        """
        from lightning_fairprune.diagnostics.sharded import (
            sharded_group_hessian_lambda_max,
            sharded_group_hessian_trace,
            sharded_measure_groups,
        )

        params = common["params"]
        predicted = None
        pre = self._pre_round
        if moment == "after_round" and self.predict_excess_loss and pre is not None:
            predicted = self._predicted_sharded(model, batches, num_groups, params, pre)
        measurement = sharded_measure_groups(
            model,
            batches,
            num_groups,
            num_classes,
            params=params,
            loss_fn=self.loss_fn,
            forward_fn=self.forward_fn,
            gradients=self.gradient_norms,
        )
        if self.num_probes > 0:
            with warnings.catch_warnings():  # absent groups were already reported above
                warnings.simplefilter("ignore", UserWarning)
                trace = sharded_group_hessian_trace(
                    model,
                    batches,
                    num_groups,
                    num_probes=self.num_probes,
                    seed=self.seed,
                    gate_memory=self.gate_memory,
                    params=params,
                    loss_fn=self.loss_fn,
                    forward_fn=self.forward_fn,
                )
            measurement.hessian_trace = trace.trace
            measurement.hessian_trace_stderr = trace.stderr
            measurement.num_probes = trace.num_probes
        if self.lambda_max_iterations > 0:
            with warnings.catch_warnings():  # absent groups were already reported above
                warnings.simplefilter("ignore", UserWarning)
                measurement.hessian_lambda_max = sharded_group_hessian_lambda_max(
                    model,
                    batches,
                    num_groups,
                    iterations=self.lambda_max_iterations,
                    seed=self.seed,
                    gate_memory=self.gate_memory,
                    params=params,
                    loss_fn=self.loss_fn,
                    forward_fn=self.forward_fn,
                )
        return measurement, predicted

    def _predicted_sharded(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        num_groups: int,
        params: dict[str, nn.Parameter],
        pre: dict[str, Tensor],
    ) -> Tensor:
        """`_predicted` on local shards: δ = θ̄ − θ_pre per shard, measured at θ_pre."""
        from lightning_fairprune.diagnostics.sharded import sharded_predicted_excess_loss
        from lightning_fairprune.dtensor import local_tensor

        shards = {n: local_tensor(params[n]) for n in pre}
        post = {n: shards[n].detach().clone() for n in pre}
        delta = {n: post[n] - pre[n] for n in pre}
        try:
            with torch.no_grad():
                for n in pre:
                    shards[n].copy_(pre[n])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return sharded_predicted_excess_loss(
                    model,
                    batches,
                    delta,
                    num_groups,
                    gate_memory=self.gate_memory,
                    params=list(pre),
                    loss_fn=self.loss_fn,
                    forward_fn=self.forward_fn,
                )
        finally:
            with torch.no_grad():
                for n in pre:
                    shards[n].copy_(post[n])

    def _user_metrics(
        self,
        trainer: pl.Trainer,
        model: nn.Module,
        batches: FairnessBatches,
        num_groups: int,
    ) -> dict[str, list[Any]]:
        """The ``metrics=`` per group: one forward pass, one clone of each metric per group."""
        from lightning_fairprune.diagnostics.group_metrics import PerGroupMetric

        device = next(model.parameters()).device
        per_group = {
            name: PerGroupMetric(metric, num_groups).to(device)
            for name, metric in self.metrics.items()
        }
        with torch.no_grad():
            for x, y, g in batches:
                logits = model(x) if self.forward_fn is None else self.forward_fn(model, x)
                if self.metrics_input == "preds":
                    inputs = logits.argmax(1)
                else:
                    inputs = logits.float().softmax(1)
                    if inputs.shape[1] == 2 and self.pos_label is not None:
                        inputs = inputs[:, self.pos_label]
                for metric in per_group.values():
                    metric.update(inputs, y, groups=g)
        return {name: to_plain(metric.compute()) for name, metric in per_group.items()}

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
        from lightning_fairprune.dtensor import local_tensor

        named = dict(model.named_parameters())  # FSDP2: the local shards
        self._pre_round = {n: local_tensor(named[n]).detach().clone() for n in self._param_names}

    # ---------------------------------------------------------------- record
    def _round(self, trainer: pl.Trainer, moment: str, event: PruningEvent | None) -> int:
        if event is not None:
            return int(event.round_index) + (1 if moment == "after_round" else 0)
        pruner = find_pruner(trainer)
        if pruner is not None:
            return int(pruner.rounds_done)
        return sum(1 for r in self.history if r.get("moment") == "after_round")

    def _sparsity(
        self, trainer: pl.Trainer, model: nn.Module, moment: str, event: PruningEvent | None
    ) -> float:
        if event is not None:
            if moment == "after_round" and event.realized_sparsity is not None:
                return float(event.realized_sparsity)
            if moment in ("dense", "before_round"):
                return float(event.previous_sparsity)
        pruner = find_pruner(trainer)
        if pruner is not None:
            return float(pruner.current_sparsity)
        names = self._param_names or _default_weight_names(model)
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
        return self.data.split_batch(
            batch, use_group_fn=self.data.group_fn != self._split_with_override
        )

    def _split_with_override(self, batch: Any) -> tuple[Any, Tensor, Tensor | None]:
        return self.split_batch(batch)

    def _batches(self, trainer: pl.Trainer, model: pl.LightningModule) -> FairnessBatches:
        return self.data.batches(trainer, model, num_groups=self._num_groups)

    def _resolve_sizes(
        self, model: nn.Module, batches: FairnessBatches, *, classes: bool = True
    ) -> tuple[int | None, int]:
        """(number of classes, number of groups); a forward pass only when it must.

        With ``num_groups`` known and ``classes=False`` the number of classes stays ``None``:
        the measurement pass reads it from the logits. Otherwise (groups = classes, G not
        known yet) one batch's logits give it, once per fit (at fit start, `check_data`).
        """
        if self._num_groups is not None and (self._num_classes is not None or not classes):
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
            pruner = find_pruner(trainer)
            found = list(pruner.parameter_names) if pruner is not None else None
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
        if bool(getattr(trainer, "is_global_zero", True)) and self._file is not None:
            self._file.write(self.history)

    def _log(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        # "end" right after a periodic measurement at the same step measured the same model:
        # it is in the history and the summary, but not logged twice at one step
        step = int(trainer.global_step)
        if record.get("moment") == "end" and self._last_logged_step == step:
            return
        if record.get("moment") not in ("dense", "after_round"):
            self._last_logged_step = step
        fp_logging.log_round(trainer, record, self.history)
