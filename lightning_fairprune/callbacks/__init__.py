"""Thin Lightning callbacks over the plain-torch cores."""

from __future__ import annotations

__all__: list[str] = []
