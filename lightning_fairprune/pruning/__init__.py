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
    resolve_criterion,
)
from lightning_fairprune.pruning.enforce import (
    MaskEnforcer,
    apply_masks,
    zero_pruned_optimizer_state,
)
from lightning_fairprune.pruning.fair_criteria import (
    FAIR_CRITERIA,
    GroupStatistics,
    MinimaxResult,
    fair_masks,
    forecast_group_damage,
    group_statistics,
)
from lightning_fairprune.pruning.mask_io import (
    gather_full_masks,
    load_masks,
    masks_from_state,
    masks_to_state,
    pack_mask,
    save_masks,
    shard_full_masks,
    unpack_mask,
)
from lightning_fairprune.pruning.select import (
    check_masks_fit,
    full_masks,
    global_masks,
    layerwise_masks,
    num_to_prune,
)
from lightning_fairprune.pruning.selection import find_classifier, select_parameters
from lightning_fairprune.pruning.state import (
    MaskState,
    mask_counts,
    realized_sparsity,
    sparsity_report,
)
from lightning_fairprune.pruning.units import ChannelUnits, NMUnits, Units, WeightUnits

__all__ = [
    "CRITERIA",
    "FAIR_CRITERIA",
    "ChannelUnits",
    "Criterion",
    "CriterionContext",
    "GroupStatistics",
    "MaskEnforcer",
    "MaskState",
    "MinimaxResult",
    "NMUnits",
    "ScoreCriterion",
    "Units",
    "WeightUnits",
    "apply_masks",
    "check_masks_fit",
    "compute_scores",
    "fair_masks",
    "find_classifier",
    "forecast_group_damage",
    "full_masks",
    "gather_full_masks",
    "global_masks",
    "group_statistics",
    "layerwise_masks",
    "load_masks",
    "mask_counts",
    "masks_from_state",
    "masks_to_state",
    "num_to_prune",
    "pack_mask",
    "realized_sparsity",
    "register",
    "resolve_criterion",
    "save_masks",
    "select_parameters",
    "shard_full_masks",
    "sparsity_report",
    "unpack_mask",
    "zero_pruned_optimizer_state",
]
