"""Thin Lightning callbacks over the plain-torch cores."""

from __future__ import annotations

from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.callbacks.monitor import FairnessMonitor
from lightning_fairprune.callbacks.pruning import IterativePruning

__all__ = ["FairnessMonitor", "GroupEqualizer", "IterativePruning"]
