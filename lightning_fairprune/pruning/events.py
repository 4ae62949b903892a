"""The pruning-round event that other callbacks react to.

`IterativePruning` announces every pruning round to every callback attached to the
`Trainer` that defines the two duck-typed hooks below (no subclassing, no import of the
pruning callback needed):

* ``on_before_pruning_round(trainer, pl_module, event)``: the masks of this round are about
  to be computed and applied; the weights are still those of the model before the round
  (for round 0, the dense model θ*). `FairnessMonitor` measures its dense reference here.
* ``on_pruning_round(trainer, pl_module, event)``: the masks have been applied; the weights
  are those of the pruned model θ̄.

Both receive the same `PruningEvent`, a plain dataclass (serializable with `to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PruningEvent", "PruningListener"]


@dataclass(frozen=True)
class PruningEvent:
    """What happened (or is about to happen) in one pruning round.

    Attributes:
        round_index: 0-based index of the round in the schedule.
        num_rounds: total number of rounds the schedule plans (``None`` if open-ended).
        target_sparsity: cumulative fraction of prunable weights that are zero after the round.
        previous_sparsity: cumulative fraction of prunable weights zero before the round.
        epoch: ``trainer.current_epoch`` when the round ran.
        global_step: ``trainer.global_step`` (optimizer steps) when the round ran.
        criterion: name of the criterion (``"magnitude"``, ``"gradient"``, ...).
        realized_sparsity: fraction of prunable weights actually zero after the round
            (``None`` in ``on_before_pruning_round``).
        layer_sparsity: per-parameter realized sparsity, keyed by fully-qualified name
            (empty in ``on_before_pruning_round``).
        rewound: whether the surviving weights were rewound (lottery-ticket style) in this
            round, so that the pruned model's weights are the rewind point's, not the trained
            ones (always ``False`` in ``on_before_pruning_round``).

    Example:
        >>> event = PruningEvent(round_index=0, num_rounds=3, target_sparsity=0.5,
        ...                      previous_sparsity=0.0, epoch=1, global_step=40,
        ...                      criterion="magnitude")
        >>> event.to_dict()["target_sparsity"]
        0.5
    """

    round_index: int
    num_rounds: int | None
    target_sparsity: float
    previous_sparsity: float
    epoch: int
    global_step: int
    criterion: str
    realized_sparsity: float | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    rewound: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a dict of plain Python values."""
        return asdict(self)


class PruningListener:
    """Documentation-only base: the hooks `IterativePruning` calls on other callbacks.

    Callbacks do not need to inherit from this class; defining methods with these names is
    enough. It exists so that the protocol is written down in one place.
    """

    def on_before_pruning_round(self, trainer: Any, pl_module: Any, event: PruningEvent) -> None:
        """Called before the masks of a round are computed (weights are pre-round)."""

    def on_pruning_round(self, trainer: Any, pl_module: Any, event: PruningEvent) -> None:
        """Called after the masks of a round are applied (weights are pruned)."""
