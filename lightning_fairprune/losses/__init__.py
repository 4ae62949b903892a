"""Group losses: one `GroupLoss` core, small weighting strategies, and the public losses.

==========================  ===============  ==============================================
loss                        strategy         dual step (``GroupEqualizer`` or ``dual_step``)
==========================  ===============  ==============================================
`GroupEqualizedLoss`        `Equalize`       ``λ_a ← max(0, λ_a + η·c(J_a − J))`` (Tran)
`GroupDROLoss`              `DRO`            ``q_a ∝ q_a·exp(η·J_a)`` (Sagawa)
`GroupWeightedLoss`         `Fixed`          none (static weights)
`ConstrainedGapLoss`        `ConstrainedGap` ``λ_a ← max(0, λ_a + η·(ψ_a − ε))`` (Balancing Act)
==========================  ===============  ==============================================

`GroupLoss` (``lightning_fairprune.losses.core``) turns a batch into per-sample losses, groups
them and accumulates the per-group sums the dual step reads, once for all of them; a strategy
(`Weighting`) declares what it expects and implements its primal and dual contributions.
Plain torch: nothing here imports Lightning.
"""

from lightning_fairprune.losses.core import (
    GroupLoss,
    GroupTerms,
    Statistics,
    Weighting,
    group_gaps,
    measure_statistics,
)
from lightning_fairprune.losses.gaps import ConstrainedGap, ConstrainedGapLoss, ReplayBuffer
from lightning_fairprune.losses.strategies import (
    CONSTRAINTS,
    DRO,
    Equalize,
    Fixed,
    GroupDROLoss,
    GroupEqualizedLoss,
    GroupWeightedLoss,
    constraint_values,
    inverse_frequency_weights,
)

__all__ = [
    "CONSTRAINTS",
    "DRO",
    "ConstrainedGap",
    "ConstrainedGapLoss",
    "Equalize",
    "Fixed",
    "GroupDROLoss",
    "GroupEqualizedLoss",
    "GroupLoss",
    "GroupTerms",
    "GroupWeightedLoss",
    "ReplayBuffer",
    "Statistics",
    "Weighting",
    "constraint_values",
    "group_gaps",
    "inverse_frequency_weights",
    "measure_statistics",
]
