"""Plain-torch fairness diagnostics: group recall, intensification, curvature factors.

* `recall`: per-(group, class) count sums, group recall, accuracy, recall balance B,
  normalized balance B̃, intensification ratio I and slope α, excessive loss, disparity.
* `curvature`: per-group gradient norms, Hutchinson Hessian traces (and λ_max), predicted
  excess loss, and `measure_groups` that does all of it in one pass.
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

__all__ = [
    "GroupGradients",
    "GroupHessianTrace",
    "GroupMeasurement",
    "accuracy",
    "disparity",
    "excessive_loss",
    "group_counts",
    "group_gradient_norms",
    "group_hessian_lambda_max",
    "group_hessian_trace",
    "group_recall",
    "intensification_alpha",
    "intensification_ratio",
    "measure_groups",
    "normalized_recall_balance",
    "predicted_excess_loss",
    "rademacher_probes",
    "recall_balance",
]
