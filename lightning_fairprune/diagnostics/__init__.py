"""Plain-torch fairness diagnostics: group recall, intensification, curvature factors.

* `recall`: per-(group, class) count sums, group recall, accuracy, recall balance B,
  normalized balance B̃, intensification ratio I and slope α, excessive loss, disparity.
* `group_metrics`: streaming per-group confusion counts, field-standard fairness metrics
  (accuracy, TPR, FPR, selection rate, demographic parity, equalized odds, equal
  opportunity) with Wilson intervals, guarded intensification, group names, intersectional
  groups and any torchmetrics metric per group.
* `curvature`: per-group gradient norms, Hutchinson Hessian traces (and λ_max), predicted
  excess loss, and `measure_groups` that does all of it in one pass.
* `sharded`: per-group gradient norms, forward-only measurements, Hutchinson traces,
  predicted excess loss and λ_max (finite-difference Hessian-vector products) on
  FSDP2-sharded parameters (local shards, no gather).
* `gates`: `FrozenGates`, which replays the activation pattern of ReLU-like ops and max
  pools at perturbed weights (the finite differences of `sharded` use it).
"""

from __future__ import annotations

from lightning_fairprune.diagnostics.curvature import (
    GroupGradients,
    GroupHessianTrace,
    GroupMeasurement,
    group_gradient_norms,
    group_hessian_lambda_max,
    group_hessian_trace,
    measure_groups,
    predicted_excess_loss,
    rademacher_probes,
)
from lightning_fairprune.diagnostics.gates import FrozenGates
from lightning_fairprune.diagnostics.group_metrics import (
    INTENSIFICATION_MIN_ABS_REF,
    SMALL_GROUP_SIZE,
    CombinedGroups,
    GroupConfusion,
    GroupMetrics,
    PerGroupMetric,
    Rate,
    combine_groups,
    confusion_to_counts,
    group_confusion,
    group_metrics,
    group_slugs,
    guarded_intensification_ratio,
    normalize_group_names,
    product_group_names,
    rate,
    split_groups,
    wilson_interval,
)
from lightning_fairprune.diagnostics.recall import (
    accuracy,
    disparity,
    excessive_loss,
    group_counts,
    group_recall,
    intensification_alpha,
    intensification_ratio,
    normalized_recall_balance,
    recall_balance,
)
from lightning_fairprune.diagnostics.sharded import (
    GATE_MEMORY,
    GroupDirectional,
    local_rademacher_probes,
    sharded_group_directional,
    sharded_group_gradient_norms,
    sharded_group_hessian_lambda_max,
    sharded_group_hessian_trace,
    sharded_measure_groups,
    sharded_predicted_excess_loss,
)

__all__ = [
    "GATE_MEMORY",
    "INTENSIFICATION_MIN_ABS_REF",
    "SMALL_GROUP_SIZE",
    "CombinedGroups",
    "FrozenGates",
    "GroupConfusion",
    "GroupDirectional",
    "GroupGradients",
    "GroupHessianTrace",
    "GroupMeasurement",
    "GroupMetrics",
    "PerGroupMetric",
    "Rate",
    "accuracy",
    "combine_groups",
    "confusion_to_counts",
    "disparity",
    "excessive_loss",
    "group_confusion",
    "group_counts",
    "group_gradient_norms",
    "group_hessian_lambda_max",
    "group_hessian_trace",
    "group_metrics",
    "group_recall",
    "group_slugs",
    "guarded_intensification_ratio",
    "intensification_alpha",
    "intensification_ratio",
    "local_rademacher_probes",
    "measure_groups",
    "normalize_group_names",
    "normalized_recall_balance",
    "predicted_excess_loss",
    "product_group_names",
    "rademacher_probes",
    "rate",
    "recall_balance",
    "sharded_group_directional",
    "sharded_group_gradient_norms",
    "sharded_group_hessian_lambda_max",
    "sharded_group_hessian_trace",
    "sharded_measure_groups",
    "sharded_predicted_excess_loss",
    "split_groups",
    "wilson_interval",
]
