"""Cost of frozen gates recomputed per chunk (``gate_memory`` exceeded) against stored gates.

For the ReLU MLP and the ReLU + max-pool CNN of ``sharded_curvature_accuracy.py`` and a larger
CNN (two 3x3 convolutions with 16 and 32 channels on 8x8 digits upsampled to 28x28), float32,
G = 10 groups (the digit labels), 400 samples, ``chunk_size=50``: CPU time (one torch thread,
``time.thread_time``, median of interleaved repeats) of `group_hessian_trace` (K = 4
probes: 1 record pass + 8 perturbed passes) and `predicted_excess_loss` (1 + 2) on the FSDP2
backend (``FiniteDifference(force=True)``, one process) with
``gate_memory=None`` (stored) and ``gate_memory=0`` (per chunk), the peak bytes of gates held
(from the module's debug log), and a check that both modes give the same numbers bit for bit.
Single process (world size 1): under FSDP2 the extra no-grad forward per chunk also
all-gathers the parameters once more.

Usage: ``python benchmarks/gate_memory_overhead.py [--repeats 3]`` (about a minute on 2 CPU
cores).
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_fairprune.diagnostics import (
    FiniteDifference,
    group_hessian_trace,
    predicted_excess_loss,
)

GROUPS = 10


class _Peaks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.peaks: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"peak (\d+) bytes held", record.getMessage())
        if found:
            self.peaks.append(int(found.group(1)))


def data(size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    digits = load_digits()
    x = torch.tensor(digits.data[:400], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:400])
    if size != 8:
        x = nn.functional.interpolate(x.view(-1, 1, 8, 8), size=size, mode="bilinear")
    return [(x[i : i + 100], y[i : i + 100], y[i : i + 100]) for i in range(0, 400, 100)]


def models() -> dict[str, tuple[nn.Module, int]]:
    torch.manual_seed(0)
    return {
        "relu_mlp": (nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)), 8),
        "relu_cnn": (
            nn.Sequential(
                nn.Unflatten(1, (1, 8, 8)),
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(64, 10),
            ),
            8,
        ),
        "cnn_28px": (
            nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 49, 10),
            ),
            28,
        ),
    }


def _fd(gate_memory: int | None) -> FiniteDifference:
    """The FSDP2 backend on one process with the given gate budget."""
    return FiniteDifference(gate_memory=gate_memory, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    handler = _Peaks()
    logger = logging.getLogger("lightning_fairprune.diagnostics.sharded_pass")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    print(
        "| model | call | stored CPU s | per-chunk CPU s | ratio | peak gates stored | per chunk |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (model, size) in models().items():
        batches = data(size)  # 8: flat [N, 64]; 28: [N, 1, 28, 28]
        first = next(p for p in model.parameters() if p.ndim > 1)
        delta = {n: -0.5 * p.detach() for n, p in model.named_parameters() if p is first}
        calls = {
            "trace K=4": lambda gm, m=model, b=batches: (
                group_hessian_trace(
                    m, b, GROUPS, num_probes=4, chunk_size=50, finite_difference=_fd(gm)
                ).probe_values
            ),
            "predicted": lambda gm, m=model, b=batches, d=delta: predicted_excess_loss(
                m, b, d, GROUPS, chunk_size=50, finite_difference=_fd(gm)
            ),
        }
        for call, fn in calls.items():
            times: dict[int | None, list[float]] = {None: [], 0: []}
            peaks: dict[int | None, int] = {}
            results = {}
            for _ in range(args.repeats):
                for gm in (None, 0):
                    handler.peaks.clear()
                    start = time.thread_time()
                    results[gm] = fn(gm)
                    times[gm].append(time.thread_time() - start)
                    peaks[gm] = handler.peaks[-1]
            assert torch.equal(results[None], results[0]), (name, call)
            stored, chunked = statistics.median(times[None]), statistics.median(times[0])
            print(
                f"| {name} | {call} | {stored:.3f} | {chunked:.3f} | {chunked / stored:.2f} | "
                f"{peaks[None]:,} B | {peaks[0]:,} B |"
            )


if __name__ == "__main__":
    main()
