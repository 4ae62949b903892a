"""Plain-torch pruning core: criteria -> scores, scores -> masks, parameter selection."""

from __future__ import annotations

from lightning_fairprune.pruning.events import PruningEvent, PruningListener

__all__ = ["PruningEvent", "PruningListener"]
