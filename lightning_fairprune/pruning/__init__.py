"""Plain-torch pruning core: criteria -> scores, scores -> masks, parameter selection."""

from __future__ import annotations

from lightning_fairprune.pruning.criteria import (
    CRITERIA,
    NEEDS_GRADIENTS,
    compute_scores,
    gradient_scores,
    magnitude_scores,
    random_scores,
    undecayed_scores,
)
from lightning_fairprune.pruning.events import PruningEvent, PruningListener
from lightning_fairprune.pruning.fair_criteria import (
    FAIR_CRITERIA,
    GroupStatistics,
    MinimaxResult,
    fair_masks,
    fairgrape_masks,
    fairprune_masks,
    forecast_group_damage,
    group_statistics,
    worst_group_masks,
)
from lightning_fairprune.pruning.masks import (
    MaskEnforcer,
    apply_masks,
    check_masks_fit,
    full_masks,
    global_masks,
    layerwise_masks,
    load_masks,
    masks_to_state,
    num_to_prune,
    realized_sparsity,
    save_masks,
    sparsity_report,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.pruning.selection import find_classifier, select_parameters

__all__ = [
    "CRITERIA",
    "FAIR_CRITERIA",
    "NEEDS_GRADIENTS",
    "GroupStatistics",
    "MaskEnforcer",
    "MinimaxResult",
    "PruningEvent",
    "PruningListener",
    "apply_masks",
    "check_masks_fit",
    "compute_scores",
    "fair_masks",
    "fairgrape_masks",
    "fairprune_masks",
    "find_classifier",
    "forecast_group_damage",
    "full_masks",
    "global_masks",
    "gradient_scores",
    "group_statistics",
    "layerwise_masks",
    "load_masks",
    "magnitude_scores",
    "masks_to_state",
    "num_to_prune",
    "random_scores",
    "realized_sparsity",
    "save_masks",
    "select_parameters",
    "sparsity_report",
    "undecayed_scores",
    "worst_group_masks",
    "zero_pruned_optimizer_state",
]
