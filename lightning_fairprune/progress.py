"""Progress of long measurement passes, shown the way Lightning shows training progress.

A measurement (the monitor's per-group statistics, Hutchinson probes, λ_max power iterations;
the fair pruning criteria's group statistics) iterates the same batches several times. Over a
large loader that takes a while, so `track` wraps the batches in a `tqdm` bar that restarts at
every pass (``pass=k`` in its postfix) and disappears when the measurement is done (like
Lightning's validation bar, ``leave=False``).

It shows only where Lightning would show one: on global rank 0, when the trainer has an
enabled progress bar (`progress_enabled`: ``Trainer(enable_progress_bar=True)``, the default),
and when a pass has at least `MIN_BATCHES` batches (or an unknown number). Everywhere else
(tests run with ``enable_progress_bar=False``, other ranks, tiny loaders) `track` yields the
batches themselves and prints nothing. Plain torch: the trainer is duck-typed.

Use it around any re-iterable of batches::

    with track(batches, desc="FairnessMonitor: dense", enabled=progress_enabled(trainer)) as it:
        measure_groups(model, it, ...)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["MIN_BATCHES", "PassProgress", "batches_per_pass", "progress_enabled", "track"]

#: A pass over fewer batches than this is quick: no bar.
MIN_BATCHES = 8


def progress_enabled(trainer: Any) -> bool:
    """Whether ``trainer`` shows a progress bar on this process (Lightning's rule).

    True on global rank 0 when the trainer has an enabled progress-bar callback
    (``trainer.progress_bar_callback``); False without a trainer.

    Example:
        >>> progress_enabled(None)
        False
        >>> class _Bar:
        ...     is_enabled = True
        >>> class _Trainer:
        ...     progress_bar_callback, is_global_zero = _Bar(), True
        >>> progress_enabled(_Trainer())
        True
    """
    bar = getattr(trainer, "progress_bar_callback", None)
    return (
        bar is not None
        and bool(getattr(bar, "is_enabled", True))
        and bool(getattr(trainer, "is_global_zero", True))
    )


def batches_per_pass(batches: Any) -> int | None:
    """The number of batches one pass over ``batches`` yields on this process, if known.

    ``len(batches)`` when it has one; for `lightning_fairprune.fairness_data.FairnessBatches`
    the length of its loader, sharded by batch index over ``world_size`` processes and capped
    at ``max_batches``; else ``None``.

    Example:
        >>> batches_per_pass([1, 2, 3]), batches_per_pass(iter([1]))
        (3, None)
    """
    try:
        return len(batches)
    except TypeError:
        pass
    loader = getattr(batches, "loader", None)
    try:
        count = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
    world, rank = int(getattr(batches, "world_size", 1)), int(getattr(batches, "rank", 0))
    if world > 1:
        count = len(range(rank, count, world))
    limit = getattr(getattr(batches, "data", None), "max_batches", None)
    return count if limit is None else min(count, int(limit))


class PassProgress:
    """Re-iterable ``batches`` that advance a tqdm bar, restarted at every pass.

    Every other attribute is the wrapped object's (e.g. ``groups_from_batch``).

    Args:
        batches: a re-iterable of batches.
        bar: an open `tqdm` bar (closed by the owner).
        total: batches per pass, or ``None``.

    Example:
        >>> import io
        >>> from tqdm.auto import tqdm
        >>> out = io.StringIO()
        >>> with tqdm(file=out, desc="demo") as bar:
        ...     wrapped = PassProgress([1, 2, 3], bar, total=3)
        ...     sums = [sum(wrapped), sum(wrapped)]
        >>> sums, wrapped.passes, "3/3" in out.getvalue(), "pass=2" in out.getvalue()
        ([6, 6], 2, True, True)
    """

    def __init__(self, batches: Iterable[Any], bar: Any, total: int | None) -> None:
        self.batches = batches
        self.bar = bar
        self.total = total
        self.passes = 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        self.bar.set_postfix_str(f"pass={self.passes}", refresh=False)
        self.bar.reset(total=self.total)  # shows the new pass
        for batch in self.batches:
            yield batch
            self.bar.update()

    def __getattr__(self, name: str) -> Any:
        if name == "batches":  # not set yet (e.g. while copying)
            raise AttributeError(name)
        return getattr(self.batches, name)


@contextlib.contextmanager
def track(
    batches: Iterable[Any],
    *,
    desc: str,
    enabled: bool,
    total: int | None = None,
    min_batches: int = MIN_BATCHES,
    file: Any = None,
) -> Iterator[Iterable[Any]]:
    """Yield ``batches`` wrapped in a progress bar (`PassProgress`), or unchanged.

    Args:
        batches: a re-iterable of batches (each pass re-iterates it).
        desc: the bar's label, e.g. ``"FairnessMonitor: dense"``.
        enabled: whether this process may show a bar (`progress_enabled`).
        total: batches per pass; default `batches_per_pass`.
        min_batches: no bar when a pass is known to have fewer batches.
        file: where the bar is written (default ``sys.stdout``, as Lightning's bar).

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with track(list(range(10)), desc="measure", enabled=True, file=out) as it:
        ...     _ = [sum(it) for _ in range(2)]
        >>> "measure" in out.getvalue(), "/10 " in out.getvalue()
        (True, True)
        >>> with track([1, 2], desc="measure", enabled=True, file=out) as it:
        ...     it == [1, 2]  # a short pass: no bar
        True
    """
    count = batches_per_pass(batches) if total is None else total
    if not enabled or (count is not None and count < min_batches):
        yield batches
        return
    from tqdm.auto import tqdm

    with tqdm(
        total=count,
        desc=desc,
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        smoothing=0,
        file=sys.stdout if file is None else file,
    ) as bar:
        yield PassProgress(batches, bar, count)
