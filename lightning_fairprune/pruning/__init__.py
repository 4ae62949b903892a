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
    "NEEDS_GRADIENTS",
    "MaskEnforcer",
    "apply_masks",
    "check_masks_fit",
    "compute_scores",
    "find_classifier",
    "full_masks",
    "global_masks",
    "gradient_scores",
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
    "zero_pruned_optimizer_state",
]
