"""The README's quickstart is real code: run it and check what it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path):
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "quickstart.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "sparsity 0.900" in out
    moments = re.findall(r"^\s*(\w+) sparsity=", out, re.M)
    assert moments == ["dense"] + ["after_round", "before_round"] * 2 + ["after_round", "end"]
