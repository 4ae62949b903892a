"""lightning_fairprune: prune neural networks in PyTorch Lightning and see who lost accuracy.

The callbacks (`IterativePruning`, `FairnessMonitor`, `GroupEqualizer`), the fairness-data
path (`FairnessData`) and the loss modules (`GroupEqualizedLoss`, `GroupDROLoss`,
`GroupWeightedLoss`, `ConstrainedGapLoss`), and `compact` / `load_compact` / `model_cost` for a
physically smaller channel-pruned model, are exported here. The plain-torch cores live in
`lightning_fairprune.schedules`, `lightning_fairprune.pruning` and
`lightning_fairprune.diagnostics`, usable without a Trainer.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.callbacks.events import (
    Pruner,
    PruningEvent,
    PruningListener,
    find_pruner,
)
from lightning_fairprune.callbacks.monitor import FairnessMonitor
from lightning_fairprune.callbacks.pruning import IterativePruning
from lightning_fairprune.compact import compact, load_compact
from lightning_fairprune.cost import model_cost
from lightning_fairprune.diagnostics import (
    group_gradient_norms,
    group_hessian_trace,
    intensification_alpha,
    measure_groups,
    predicted_excess_loss,
)
from lightning_fairprune.fairness_data import FairnessData
from lightning_fairprune.logging import log_config, log_round, log_scalars, log_summary
from lightning_fairprune.losses import (
    ConstrainedGapLoss,
    GroupDROLoss,
    GroupEqualizedLoss,
    GroupWeightedLoss,
    inverse_frequency_weights,
)
from lightning_fairprune.pruning.mask_io import load_masks, save_masks
from lightning_fairprune.pruning.selection import select_parameters
from lightning_fairprune.pruning.state import sparsity_report
from lightning_fairprune.report import write_report
from lightning_fairprune.schedules import SCHEDULES, schedule_values

try:
    __version__ = version("lightning_fairprune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "SCHEDULES",
    "ConstrainedGapLoss",
    "FairnessData",
    "FairnessMonitor",
    "GroupDROLoss",
    "GroupEqualizedLoss",
    "GroupEqualizer",
    "GroupWeightedLoss",
    "IterativePruning",
    "Pruner",
    "PruningEvent",
    "PruningListener",
    "__version__",
    "compact",
    "find_pruner",
    "group_gradient_norms",
    "group_hessian_trace",
    "intensification_alpha",
    "inverse_frequency_weights",
    "load_compact",
    "load_masks",
    "log_config",
    "log_round",
    "log_scalars",
    "log_summary",
    "measure_groups",
    "model_cost",
    "predicted_excess_loss",
    "save_masks",
    "schedule_values",
    "select_parameters",
    "sparsity_report",
    "write_report",
]
