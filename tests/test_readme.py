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


def _calls_with_unknown_arguments(code: str) -> list[str]:
    """Imports of lightning_fairprune names that do not exist, and keyword arguments that the
    called function or class does not take (what a user copying the snippet would hit)."""
    import ast
    import importlib
    import inspect

    problems, names = [], {}
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "lightning_fairprune"
        ):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    problems.append(f"{node.module} has no {alias.name}")
                else:
                    names[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        target = names.get(node.func.id)
        if target is None:
            continue
        params = inspect.signature(target).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        problems += [
            f"line {node.lineno}: {node.func.id}() takes no argument {kw.arg!r}"
            for kw in node.keywords
            if kw.arg is not None and kw.arg not in params
        ]
    return problems


def test_calls_with_unknown_arguments_are_found():
    code = "from lightning_fairprune import IterativePruning\nIterativePruning(0.5, rounds=3)\n"
    assert _calls_with_unknown_arguments(code) == [
        "line 2: IterativePruning() takes no argument 'rounds'"
    ]
    assert _calls_with_unknown_arguments("from lightning_fairprune import Nope\n") == [
        "lightning_fairprune has no Nope"
    ]


def test_every_python_snippet_in_the_docs_calls_the_api_as_it_is():
    docs = [README, *sorted((README.parent / "docs").glob("*.md"))]
    found = {}
    for path in docs:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S)):
            problems = _calls_with_unknown_arguments(code)
            if problems:
                found[f"{path.name} block {i}"] = problems
    assert found == {}
