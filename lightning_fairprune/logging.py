"""Send scalars to every Lightning logger attached to a `Trainer`, never failing training.

This is the only module besides `callbacks/` that knows about Lightning loggers. A logger
that raises (W&B down, a full disk) produces one warning per logger and is skipped; the
measurement itself is kept by the caller (the callbacks also keep a local history).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["find_wandb_logger", "is_global_zero", "log_scalars"]

_warned: set[int] = set()


def is_global_zero(trainer: Any) -> bool:
    """Return ``trainer.is_global_zero``, or ``True`` for objects without it."""
    return bool(getattr(trainer, "is_global_zero", True))


def _finite_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def log_scalars(trainer: Any, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log scalar metrics to every logger of ``trainer``; failures become warnings.

    Non-finite values and ``None`` (a group with no samples) are dropped, because most
    loggers reject NaN; the callers keep them in their local histories. Only global rank 0
    logs, as Lightning's loggers expect.

    Args:
        trainer: a `lightning.pytorch.Trainer` (anything with a ``loggers`` list works).
        metrics: name -> number (Python number or 0-d tensor).
        step: the step to log at; defaults to ``trainer.global_step``.

    Example:
        >>> class _Logger:
        ...     def __init__(self): self.seen = {}
        ...     def log_metrics(self, metrics, step): self.seen.update(metrics)
        >>> class _Trainer:
        ...     loggers = [_Logger()]; global_step = 3; is_global_zero = True
        >>> t = _Trainer()
        >>> log_scalars(t, {"fairprune/sparsity": 0.5, "fairprune/missing": float("nan")})
        >>> t.loggers[0].seen
        {'fairprune/sparsity': 0.5}
    """
    if not is_global_zero(trainer):
        return
    values = _finite_scalars(metrics)
    if not values:
        return
    if step is None:
        step = int(getattr(trainer, "global_step", 0))
    for logger in list(getattr(trainer, "loggers", None) or []):
        try:
            logger.log_metrics(values, step=step)
        except Exception as err:  # a logger failure must never stop training
            if id(logger) not in _warned:
                _warned.add(id(logger))
                warnings.warn(
                    f"lightning_fairprune: logging to {type(logger).__name__} failed "
                    f"({type(err).__name__}: {err}); training continues and the measurements "
                    "are kept in the callback's local history.",
                    RuntimeWarning,
                    stacklevel=2,
                )


def find_wandb_logger(trainer: Any) -> Any | None:
    """Return the first `WandbLogger` attached to ``trainer``, or ``None``.

    Detected by class name so that neither wandb nor the logger class is imported here.
    """
    for logger in list(getattr(trainer, "loggers", None) or []):
        if type(logger).__name__ == "WandbLogger":
            return logger
    return None
