from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Keep W&B, torch and temp files out of HOME; never touch the network.
_TMP = Path(tempfile.mkdtemp(prefix="fairprune-tests-"))
for _var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
    os.environ.setdefault(_var, str(_TMP / _var.lower()))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_TMP / "inductor"))
os.environ.setdefault("PL_DISABLE_FORK", "1")

sys.path.insert(0, str(Path(__file__).parent))


import torch  # noqa: E402

# Tiny models on a small shared machine: one intra-op thread is 20-50x faster than two
# under contention, and keeps timings of the suite predictable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
