"""Plain-torch fairness diagnostics: group recall, intensification, curvature factors."""

from __future__ import annotations

__all__: list[str] = []
