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


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    torch.manual_seed(0)
