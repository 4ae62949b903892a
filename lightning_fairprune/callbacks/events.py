"""The pruning-round protocol between callbacks: the event, the listener and the pruner.

`IterativePruning` announces every pruning round to every other callback attached to the
`Trainer` that defines the listener hooks (no subclassing needed):

* ``on_before_pruning_round(trainer, pl_module, event)``: the masks of this round are about
  to be computed and applied; the weights are still those of the model before the round
  (for round 0, the dense model θ*). `FairnessMonitor` measures its dense reference here.
* ``on_pruning_round(trainer, pl_module, event)``: the masks have been applied; the weights
  are those of the pruned model θ̄.

Both receive the same `PruningEvent`, a plain dataclass (serializable with `to_dict`).

Other callbacks find the pruner through the declared, runtime-checkable `Pruner` protocol
(`find_pruner`), not by class name: any callback with ``masks``, ``rounds_done``,
``current_sparsity`` and ``parameter_names`` is a pruner to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = [
    "Pruner",
    "PruningEvent",
    "PruningListener",
    "ScheduledPruner",
    "announce",
    "find_pruner",
    "pruned_parameter_sets",
    "pruning_has_started",
    "schedule_complete",
]


@dataclass(frozen=True)
class PruningEvent:
    """What happened (or is about to happen) in one pruning round.

    Attributes:
        round_index: 0-based index of the round (scheduled and extra rounds counted together).
        num_rounds: total number of rounds the schedule plans (``None`` if open-ended).
        target_sparsity: cumulative fraction of prunable weights that are zero after the round.
        previous_sparsity: cumulative fraction of prunable weights zero before the round.
        epoch: ``trainer.current_epoch`` when the round ran.
        global_step: ``trainer.global_step`` (optimizer steps) when the round ran.
        criterion: name of the criterion (``"magnitude"``, ``"gradient"``, ...).
        parameter_names: fully-qualified names of the pruned parameters.
        realized_sparsity: fraction of prunable weights actually zero after the round
            (``None`` in ``on_before_pruning_round``).
        layer_sparsity: per-parameter realized sparsity, keyed by fully-qualified name
            (empty in ``on_before_pruning_round``).
        rewound: whether the surviving weights were rewound (lottery-ticket style) in this
            round (always ``False`` in ``on_before_pruning_round``).
        scheduled: whether the round is one of the schedule's (``False`` for an extra
            ``prune_now(sparsity=...)`` round).
        structure: what the round prunes: ``"weight"``, ``"channel"`` or ``"n:m"``.
        cost: ``{"params", "flops"}`` of one forward pass of the pruned model after the round
            (channels: of its compact copy; `lightning_fairprune.cost.pruned_cost`), or
            ``None`` when not measured (no example input).
        previous_cost: the same before the round.

    Example:
        >>> event = PruningEvent(round_index=0, num_rounds=3, target_sparsity=0.5,
        ...                      previous_sparsity=0.0, epoch=1, global_step=40,
        ...                      criterion="magnitude", parameter_names=("0.weight",))
        >>> event.to_dict()["target_sparsity"], event.parameter_names
        (0.5, ('0.weight',))
    """

    round_index: int
    num_rounds: int | None
    target_sparsity: float
    previous_sparsity: float
    epoch: int
    global_step: int
    criterion: str
    parameter_names: tuple[str, ...] = ()
    realized_sparsity: float | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    rewound: bool = False
    scheduled: bool = True
    structure: str = "weight"
    cost: dict[str, int] | None = None
    previous_cost: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a dict of plain Python values."""
        out = asdict(self)
        out["parameter_names"] = list(self.parameter_names)
        return out

    def metrics(self) -> dict[str, float]:
        """The scalars a logger records for the round (``fairprune/...``).

        Example:
            >>> event = PruningEvent(0, 1, 0.5, 0.0, 1, 10, "magnitude", ("w",),
            ...                      realized_sparsity=0.5, layer_sparsity={"w": 0.5})
            >>> event.metrics()["fairprune/sparsity/w"]
            0.5
        """
        out = {
            "fairprune/sparsity": float(self.realized_sparsity or 0.0),
            "fairprune/target_sparsity": float(self.target_sparsity),
            "fairprune/round": float(self.round_index + 1),
        }
        out.update(
            {f"fairprune/pruned_{k}": float(v) for k, v in self.cost_at("after_round").items()}
        )
        out.update({f"fairprune/sparsity/{k}": float(v) for k, v in self.layer_sparsity.items()})
        return out

    def cost_at(self, moment: str) -> dict[str, int]:
        """``{"params", "flops"}`` of the model at a monitor moment (empty if not measured).

        ``"dense"``/``"before_round"``: the model before the round; any later moment
        (``"after_round"``, ``"periodic"``, ``"end"``): the pruned model.

        Example:
            >>> event = PruningEvent(0, 1, 0.5, 0.0, 1, 10, "magnitude",
            ...                      cost={"params": 10, "flops": 40},
            ...                      previous_cost={"params": 20, "flops": 80})
            >>> event.cost_at("dense"), event.cost_at("after_round")
            ({'params': 20, 'flops': 80}, {'params': 10, 'flops': 40})
        """
        cost = self.previous_cost if moment in ("dense", "before_round") else self.cost
        return {k: int(v) for k, v in (cost or {}).items()}

    def summary(self, interval: str) -> str:
        """One line describing the round (``verbose`` output).

        Example:
            >>> PruningEvent(0, 1, 0.5, 0.0, 1, 10, "magnitude", realized_sparsity=0.5).summary(
            ...     "epoch")
            'IterativePruning: round 1 at epoch 1: sparsity 0.5000 (target 0.5000)'
        """
        at = self.epoch if interval == "epoch" else self.global_step
        return (
            f"IterativePruning: round {self.round_index + 1} at {interval} {at}: sparsity "
            f"{self.realized_sparsity or 0.0:.4f} (target {self.target_sparsity:.4f})"
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PruningEvent:
        """The event of `to_dict` (unknown keys ignored).

        Example:
            >>> event = PruningEvent(0, 1, 0.5, 0.0, 1, 10, "magnitude", ("w",))
            >>> PruningEvent.from_dict(event.to_dict()) == event
            True
        """
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in names}
        kept["parameter_names"] = tuple(kept.get("parameter_names", ()))
        kept["layer_sparsity"] = dict(kept.get("layer_sparsity", {}))
        return cls(**kept)


def announce(trainer: Any, pl_module: Any, hook: str, event: PruningEvent, sender: Any) -> None:
    """Call ``hook(trainer, pl_module, event)`` on every callback but ``sender`` defining it.

    Example:
        >>> class Spy:
        ...     def on_pruning_round(self, trainer, pl_module, event): print(event.round_index)
        >>> class T: callbacks = [Spy()]
        >>> announce(T(), None, "on_pruning_round", PruningEvent(2, 3, 0.5, 0.3, 1, 9, "m"), None)
        2
    """
    for callback in list(getattr(trainer, "callbacks", None) or []):
        fn = getattr(callback, hook, None)
        if callback is not sender and callable(fn):
            fn(trainer, pl_module, event)


class PruningListener:
    """Documentation base of the hooks `IterativePruning` calls on other callbacks.

    Callbacks do not need to inherit from this class; defining methods with these names is
    enough. It exists so that the protocol is written down in one place.
    """

    def on_before_pruning_round(self, trainer: Any, pl_module: Any, event: PruningEvent) -> None:
        """Called before the masks of a round are computed (weights are pre-round)."""

    def on_pruning_round(self, trainer: Any, pl_module: Any, event: PruningEvent) -> None:
        """Called after the masks of a round are applied (weights are pruned)."""


@runtime_checkable
class Pruner(Protocol):
    """What other callbacks may rely on in a pruning callback.

    `IterativePruning` implements it; a custom pruning callback that has these four
    attributes is found by `FairnessMonitor` and `GroupEqualizer` as well.

    Example:
        >>> class MyPruner:
        ...     masks, rounds_done, current_sparsity, parameter_names = {}, 0, 0.0, ["w"]
        >>> isinstance(MyPruner(), Pruner), isinstance(object(), Pruner)
        (True, False)
    """

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Current keep-masks by parameter name (empty before the first round)."""
        ...

    @property
    def rounds_done(self) -> int:
        """Number of scheduled rounds run so far."""
        ...

    @property
    def current_sparsity(self) -> float:
        """Realized fraction of the prunable weights that are pruned."""
        ...

    @property
    def parameter_names(self) -> list[str]:
        """Names of the prunable parameters."""
        ...


@runtime_checkable
class ScheduledPruner(Pruner, Protocol):
    """A `Pruner` that also says how many scheduled rounds it plans (`IterativePruning` does).

    Optional: a pruner without ``num_rounds`` is still a `Pruner`; other callbacks then cannot
    tell when its target sparsity is reached (`schedule_complete` is False).

    Example:
        >>> class MyPruner:
        ...     masks, rounds_done, current_sparsity, parameter_names = {}, 2, 0.9, ["w"]
        ...     num_rounds = 2
        >>> isinstance(MyPruner(), ScheduledPruner)
        True
    """

    @property
    def num_rounds(self) -> int | None:
        """Number of scheduled rounds (``None``: open-ended, or not resolved yet)."""
        ...


def find_pruner(trainer: Any) -> Pruner | None:
    """The first callback of ``trainer`` that implements `Pruner`, or ``None``.

    Example:
        >>> class T: callbacks = [object()]
        >>> find_pruner(T()) is None
        True
    """
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, Pruner):
            return callback
    return None


def pruned_parameter_sets(trainer: Any) -> dict[str, list[str]]:
    """The parameter names of every `Pruner` of ``trainer``, keyed by a label naming it.

    The label is ``"Type(name='...')"`` for a named callback, else its position in
    ``trainer.callbacks``.

    Example:
        >>> class P:
        ...     masks, rounds_done, current_sparsity, parameter_names = {}, 0, 0.0, ["w"]
        ...     name = None
        >>> class T: callbacks = [object(), P()]
        >>> pruned_parameter_sets(T())
        {'P at trainer.callbacks[1]': ['w']}
    """
    out: dict[str, list[str]] = {}
    for i, callback in enumerate(getattr(trainer, "callbacks", None) or []):
        if isinstance(callback, Pruner):
            name = getattr(callback, "name", None)
            kind = type(callback).__name__
            label = f"{kind}(name={name!r})" if name else f"{kind} at trainer.callbacks[{i}]"
            out[label] = list(callback.parameter_names)
    return out


def pruning_has_started(trainer: Any) -> bool:
    """Whether the trainer's pruner has run at least one scheduled round.

    Example:
        >>> class P:
        ...     masks, rounds_done, current_sparsity, parameter_names = {}, 1, 0.5, []
        >>> class T: callbacks = [P()]
        >>> pruning_has_started(T())
        True
    """
    pruner = find_pruner(trainer)
    return pruner is not None and int(pruner.rounds_done) > 0


def schedule_complete(trainer: Any) -> bool:
    """Whether the trainer's model is at its target sparsity: every scheduled round has run.

    True without a pruner (nothing to reach); False for a pruner that does not say how many
    rounds it plans (not a `ScheduledPruner`), or whose schedule is open-ended.

    Example:
        >>> class P:
        ...     masks, rounds_done, current_sparsity, parameter_names = {}, 1, 0.5, []
        ...     num_rounds = 3
        >>> class T: callbacks = [P()]
        >>> schedule_complete(T())
        False
        >>> P.rounds_done = 3
        >>> schedule_complete(T()), schedule_complete(object())
        (True, True)
    """
    pruner = find_pruner(trainer)
    if pruner is None:
        return True
    flag = getattr(pruner, "schedule_complete", None)
    if isinstance(flag, bool):  # the pruner knows (e.g. an extra round reached the target)
        return flag
    if not isinstance(pruner, ScheduledPruner) or pruner.num_rounds is None:
        return False
    return int(pruner.rounds_done) >= int(pruner.num_rounds)
