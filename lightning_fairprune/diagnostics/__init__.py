"""Plain-torch fairness diagnostics: group recall, intensification, curvature factors.

* `counts`: per-(group, class) confusion counts, computed one way and shared
  (`group_confusion`, `GroupConfusion`, `group_counts`).
* `recall`: group recall, accuracy, recall balance B, normalized balance B̃, intensification
  ratio I and slope α, excessive loss, disparity.
* `group_metrics`: field-standard fairness metrics (accuracy, TPR, FPR, selection rate,
  demographic parity, equalized odds, equal opportunity) with Wilson intervals, guarded
  intensification and any torchmetrics metric per group.
* `groups`: group names, intersectional (product) groups, logger-safe slugs.
* `curvature`: per-group gradient norms, Hutchinson Hessian traces, λ_max, directional
  terms, predicted excess loss and `measure_groups`, each written once over the pass engine;
  `statistics`: the fairness-aware criteria's per-group gradient sums and Fisher / Hutchinson
  diagonals over the same engine.
* `passes`: the engine (`PassRequest` -> `Sums`) and its plain backend; `sharded_pass`: its
  FSDP2 backend (local shards, finite-difference curvature, `FiniteDifference`), chosen by the
  parameters' type; `probes`: the one probe generator.
* `gates`: `FrozenGates`, which replays the activation pattern of ReLU-like ops and max
  pools at perturbed weights (the finite differences of the FSDP2 backend use it).
"""

from __future__ import annotations

from lightning_fairprune.diagnostics.counts import (
    GroupConfusion,
    confusion_to_counts,
    group_confusion,
    group_counts,
)
from lightning_fairprune.diagnostics.curvature import (
    GroupDirectional,
    GroupGradients,
    GroupHessianTrace,
    GroupMeasurement,
    group_directional,
    group_gradient_norms,
    group_hessian_lambda_max,
    group_hessian_trace,
    measure_groups,
    predicted_excess_loss,
)
from lightning_fairprune.diagnostics.gates import FrozenGates
from lightning_fairprune.diagnostics.group_metrics import (
    INTENSIFICATION_MIN_ABS_REF,
    SMALL_GROUP_SIZE,
    GroupMetrics,
    PerGroupMetric,
    Rate,
    group_metrics,
    guarded_intensification_ratio,
    rate,
    wilson_interval,
)
from lightning_fairprune.diagnostics.groups import (
    CombinedGroups,
    combine_groups,
    group_slugs,
    normalize_group_names,
    product_group_names,
    split_groups,
)
from lightning_fairprune.diagnostics.probes import local_rademacher_probes, rademacher_probes
from lightning_fairprune.diagnostics.recall import (
    accuracy,
    disparity,
    excessive_loss,
    group_recall,
    intensification_alpha,
    intensification_ratio,
    normalized_recall_balance,
    recall_balance,
)
from lightning_fairprune.diagnostics.sharded_pass import GATE_MEMORY, FiniteDifference
from lightning_fairprune.diagnostics.statistics import GroupStatistics, group_statistics

__all__ = [
    "GATE_MEMORY",
    "INTENSIFICATION_MIN_ABS_REF",
    "SMALL_GROUP_SIZE",
    "CombinedGroups",
    "FiniteDifference",
    "FrozenGates",
    "GroupConfusion",
    "GroupDirectional",
    "GroupGradients",
    "GroupHessianTrace",
    "GroupMeasurement",
    "GroupMetrics",
    "GroupStatistics",
    "PerGroupMetric",
    "Rate",
    "accuracy",
    "combine_groups",
    "confusion_to_counts",
    "disparity",
    "excessive_loss",
    "group_confusion",
    "group_counts",
    "group_directional",
    "group_gradient_norms",
    "group_hessian_lambda_max",
    "group_hessian_trace",
    "group_metrics",
    "group_recall",
    "group_slugs",
    "group_statistics",
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
    "split_groups",
    "wilson_interval",
]
