"""lightning_fairprune: prune neural networks in PyTorch Lightning and see who lost accuracy."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lightning_fairprune.pruning.events import PruningEvent, PruningListener

try:
    __version__ = version("lightning_fairprune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "PruningEvent",
    "PruningListener",
    "__version__",
]
