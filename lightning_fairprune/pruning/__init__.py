"""Plain-torch pruning core: criteria -> scores, structures -> masks, enforcement, mask state.

Selection (`global_masks`, `layerwise_masks`) takes plain tensors and FSDP2 DTensors alike;
criteria are objects in one registry (`CRITERIA`, `register`); `MaskState` keeps masks,
counts and rewind weights of a run with sharding hidden.
"""

from __future__ import annotations

from lightning_fairprune.pruning.criteria import (
    CRITERIA,
    Criterion,
    CriterionContext,
    ScoreCriterion,
    compute_scores,
    register,
)
from lightning_fairprune.pruning.enforce import (
    MaskEnforcer,
    apply_masks,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.pruning.fair_criteria import fair_masks
from lightning_fairprune.pruning.mask_io import (
    gather_full_masks,
    load_masks,
    masks_from_state,
    masks_to_state,
    save_masks,
    shard_full_masks,
)
from lightning_fairprune.pruning.select import (
    check_masks_fit,
    global_masks,
    layerwise_masks,
    num_to_prune,
)
from lightning_fairprune.pruning.selection import select_parameters
from lightning_fairprune.pruning.state import (
    MaskState,
    mask_counts,
    realized_sparsity,
    sparsity_report,
)

__all__ = [
    "CRITERIA",
    "Criterion",
    "CriterionContext",
    "MaskEnforcer",
    "MaskState",
    "ScoreCriterion",
    "apply_masks",
    "check_masks_fit",
    "compute_scores",
    "fair_masks",
    "gather_full_masks",
    "global_masks",
    "layerwise_masks",
    "load_masks",
    "mask_counts",
    "masks_from_state",
    "masks_to_state",
    "num_to_prune",
    "realized_sparsity",
    "register",
    "save_masks",
    "select_parameters",
    "shard_full_masks",
    "sparsity_report",
    "zero_pruned_optimizer_state",
]
