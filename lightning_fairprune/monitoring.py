"""What a fairness measurement measures, and the record it gives; plain torch, no Lightning.

`MeasureOptions` holds the measurement settings of `FairnessMonitor` (validated once, at
construction): which parameters the gradient and curvature factors use, the Hutchinson probes
and power iterations, the loss and forward functions, the metric definitions (positive class,
confidence level, small-group size) and any torchmetrics metrics per group.
`MeasureOptions.measure` takes one measurement of a model on fairness batches: one pass of
`lightning_fairprune.diagnostics.measure_groups` (plain or FSDP2-sharded parameters alike),
the group metrics of its confusion counts
(`lightning_fairprune.diagnostics.group_metrics.group_metrics`), the ``metrics=`` per group,
and the `lightning_fairprune.records.Record` of it all. The monitor decides *when* to measure
and keeps the history; this module says *what* a measurement is.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import Tensor, nn

from lightning_fairprune.checks import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_metric_map,
    check_param_patterns,
    check_pos_label,
    check_real,
)
from lightning_fairprune.diagnostics.curvature import measure_groups
from lightning_fairprune.diagnostics.group_metrics import SMALL_GROUP_SIZE, group_metrics
from lightning_fairprune.diagnostics.sharded_pass import GATE_MEMORY, FiniteDifference
from lightning_fairprune.diagnostics.user_metrics import user_metric_values
from lightning_fairprune.fairness_data import FairnessBatches, GroupSpec
from lightning_fairprune.history import to_plain
from lightning_fairprune.progress import track
from lightning_fairprune.pruning.selection import select_parameters
from lightning_fairprune.records import Record, RecordContext, make_record

__all__ = ["MeasureOptions", "default_weight_names", "sum_across_processes"]

ReduceFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MeasureOptions:
    """What one fairness measurement measures (the `FairnessMonitor` arguments of that name).

    Attributes:
        params: parameters of the gradient norms, Hessian traces and predicted excess loss:
            ``None`` (the given default: the pruner's, else the Conv/Linear weights), ``"all"``
            (every trainable parameter) or fnmatch patterns on the parameter FQNs.
        num_probes: Rademacher probes of the Hutchinson Hessian trace (``0``: none).
        lambda_max_iterations: power iterations for each group's top Hessian eigenvalue.
        gradient_norms: measure the per-group gradient norms.
        predict_excess_loss: compute the predicted excess loss after a round.
        seed: seed of the Hutchinson probes.
        loss_fn: per-sample loss ``fn(logits, targets) -> Tensor[N]``; default cross-entropy.
        forward_fn: ``fn(model, inputs) -> logits``; default ``model(inputs)``.
        gate_memory: FSDP2 only: bytes the frozen activation gates may take (``None``: no limit).
        pos_label: positive class of a binary task (``None``: two classes as multiclass).
        confidence: level of the Wilson intervals.
        min_group_size: groups with fewer samples are flagged small.
        metrics: torchmetrics metrics computed per group, ``{name: Metric}``.
        metrics_input: what the metrics get: ``"preds"`` or ``"probs"``.

    Example:
        >>> MeasureOptions(num_probes=2, params=["fc.*"]).settings()["params"]
        ['fc.*']
        >>> MeasureOptions(confidence=1.0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `confidence` to be a float in (0, 1), but got 1.0
    """

    params: str | Sequence[str] | None = None
    num_probes: int = 8
    lambda_max_iterations: int = 0
    gradient_norms: bool = True
    predict_excess_loss: bool = True
    seed: int = 0
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    forward_fn: Callable[[nn.Module, Any], Tensor] | None = None
    gate_memory: int | None = GATE_MEMORY
    pos_label: int | None = 1
    confidence: float = 0.95
    min_group_size: int = SMALL_GROUP_SIZE
    metrics: Mapping[str, Any] | None = None
    metrics_input: str = "preds"

    def __post_init__(self) -> None:
        checked = {
            "params": check_param_patterns(self.params),
            "num_probes": check_int(self.num_probes, "num_probes", 0),
            "lambda_max_iterations": check_int(
                self.lambda_max_iterations, "lambda_max_iterations", 0
            ),
            "gradient_norms": check_bool(self.gradient_norms, "gradient_norms"),
            "predict_excess_loss": check_bool(self.predict_excess_loss, "predict_excess_loss"),
            "seed": check_int(self.seed, "seed", 0),
            "loss_fn": check_callable(self.loss_fn, "loss_fn"),
            "forward_fn": check_callable(self.forward_fn, "forward_fn"),
            "gate_memory": check_int(self.gate_memory, "gate_memory", 0, allow_none=True),
            "pos_label": check_pos_label(self.pos_label),
            "confidence": check_real(
                self.confidence, "confidence", low=0.0, high=1.0, low_open=True, high_open=True
            ),
            "min_group_size": check_int(self.min_group_size, "min_group_size", 1),
            "metrics": check_metric_map(self.metrics),
            "metrics_input": check_choice(self.metrics_input, "metrics_input", ("preds", "probs")),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def settings(self) -> dict[str, Any]:
        """The options as plain JSON values (callables by qualified name, metrics by name)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["metrics"] = sorted(self.metrics or {})
        return to_plain(values)

    def parameter_names(self, model: nn.Module, pruned: Sequence[str] | None = None) -> list[str]:
        """The FQNs of the measured parameters of ``model`` (trainable ones only).

        Args:
            model: the model.
            pruned: the pruned parameters: the default when ``params`` is ``None`` (if none,
                `default_weight_names`).

        Raises:
            ValueError: when nothing trainable is selected.

        Example:
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
            >>> MeasureOptions(params=["1.*"]).parameter_names(net)
            ['1.weight', '1.bias']
            >>> MeasureOptions().parameter_names(net)  # the classifier is not pruned by default
            ['0.weight']
        """
        named = [n for n, p in model.named_parameters() if p.requires_grad]
        if self.params == "all":
            names = named
        elif self.params is not None:
            names = [n for n in named if any(fnmatch.fnmatchcase(n, p) for p in self.params)]
        else:
            names = [n for n in pruned or default_weight_names(model) if n in named]
        if not names:
            raise ValueError(
                f"Expected `params` {self.params!r} to select at least one trainable parameter "
                f"of {type(model).__name__}, but it selected none"
            )
        return names

    def small_groups_note(self, record: Mapping[str, Any]) -> str | None:
        """The warning about a record's small groups (``None`` when it has none).

        Example:
            >>> MeasureOptions().small_groups_note({"small_groups": [1], "support": [90, 12],
            ...                                     "group_names": ["a", "b"]}).split(" in ")[0]
            "FairnessMonitor: group(s) ['b'] have fewer than 30 samples ([12])"
        """
        small = record.get("small_groups") or []
        if not small:
            return None
        names = record.get("group_names") or []
        shown = [names[g] if g < len(names) else g for g in small]
        sizes = [record["support"][g] for g in small]
        size = self.min_group_size
        return (
            f"FairnessMonitor: group(s) {shown} have fewer than {size} samples ({sizes}) in the "
            f"fairness data; one sample moves their rates by more than {100 / size:.1f} points. "
            "Read their numbers with their Wilson intervals (`<rate>_ci` in the records, "
            "`_lower`/`_upper` keys)."
        )

    def user_metrics(
        self,
        model: nn.Module,
        batches: Any,
        groups: GroupSpec,
        reduce_fn: ReduceFn | None = None,
    ) -> dict[str, list[Any]]:
        """The ``metrics`` per group over ``batches`` (plain values; `user_metric_values`)."""
        values = user_metric_values(
            model,
            batches,
            self.metrics,
            groups.num_groups,
            forward_fn=self.forward_fn,
            metrics_input=self.metrics_input,
            pos_label=self.pos_label,
            group_names=list(groups.names),
            reduce_fn=reduce_fn,
        )
        return {name: to_plain(value) for name, value in values.items()}

    def measure(
        self,
        model: nn.Module,
        batches: FairnessBatches,
        groups: GroupSpec,
        context: RecordContext,
        *,
        params: Sequence[str],
        pre: Mapping[str, Tensor] | None = None,
        reduce_fn: ReduceFn | None = None,
        progress: bool = False,
    ) -> tuple[Record, GroupSpec]:
        """One measurement of ``model`` on ``batches``, as a record in ``context``.

        Args:
            model: the model (measured as it is: isolate it first,
                `lightning_fairprune.measure.isolated`).
            batches: the fairness batches (`lightning_fairprune.fairness_data.FairnessData`).
            groups: the groups (the number of classes may be ``None``: read from the logits).
            context: when and for whom; the groups' names, whether they are the classes and
                the ``metrics`` values are filled in here.
            params: FQNs of the measured parameters (`parameter_names`).
            pre: θ_pre of those parameters for the predicted excess loss (after a round).
            reduce_fn: sum over processes (data parallelism).
            progress: show a progress bar (`lightning_fairprune.progress.track`).

        Returns:
            The record, and ``groups`` with the number of classes of the measurement.
        """
        named = dict(model.named_parameters())
        label = (
            "FairnessMonitor" if context.monitor is None else f"FairnessMonitor[{context.monitor}]"
        )
        with track(batches, desc=f"{label}: {context.moment}", enabled=progress) as it:
            measurement = measure_groups(  # plain or FSDP2-sharded parameters alike
                model,
                it,
                groups.num_groups,
                groups.num_classes,
                params={n: named[n] for n in params},
                num_probes=self.num_probes,
                lambda_max_iterations=self.lambda_max_iterations,
                pre=pre if self.predict_excess_loss else None,
                seed=self.seed,
                loss_fn=self.loss_fn,
                forward_fn=self.forward_fn,
                reduce_fn=reduce_fn,
                gradients=self.gradient_norms,
                finite_difference=FiniteDifference(gate_memory=self.gate_memory),
            )
            user = self.user_metrics(model, it, groups, reduce_fn) if self.metrics else None
        metrics = group_metrics(
            measurement.confusion,  # type: ignore[arg-type]
            pos_label=self.pos_label,
            confidence=self.confidence,
            min_group_size=self.min_group_size,
        )
        context = replace(
            context,
            group_names=groups.names,
            groups_are_classes=not batches.groups_from_batch,
            user_metrics=user,
        )
        classes = int(measurement.support.shape[1])
        return make_record(measurement, metrics, context), replace(groups, num_classes=classes)


def default_weight_names(model: nn.Module) -> list[str]:
    """Weights of Conv/Linear modules (the pruning default), else every trainable parameter.

    Example:
        >>> default_weight_names(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
        ['0.weight']
    """
    try:
        names = list(select_parameters(model))
    except ValueError:  # nothing matched (e.g. a model whose only layer is its classifier)
        names = []
    return names or [n for n, p in model.named_parameters() if p.requires_grad]


def sum_across_processes(trainer: Any) -> ReduceFn | None:
    """A sum over the processes of ``trainer`` (its strategy's ``reduce``); ``None`` for one.

    The trainer is duck-typed (``world_size``, ``strategy.reduce``).

    Example:
        >>> class _Trainer:
        ...     world_size = 1
        >>> sum_across_processes(_Trainer()) is None
        True
    """
    if int(getattr(trainer, "world_size", 1) or 1) <= 1:
        return None
    strategy = trainer.strategy

    def reduce_sum(tensor: Tensor) -> Tensor:
        return strategy.reduce(tensor, reduce_op="sum")

    return reduce_sum
