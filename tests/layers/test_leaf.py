"""``layers/`` is a leaf package: it needs only ``torch`` and :mod:`open_mythos.config`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import open_mythos

PACKAGE = Path(open_mythos.__file__).parent
#: What a layer may import from the package: the layers themselves and the config.
ALLOWED = {"config", "layers"}


def _package_imports(path: Path) -> set[str]:
    """Top-level ``open_mythos`` subpackages imported by one file of ``layers/``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue  # a sibling inside layers/
            if node.level == 2:
                found.add((node.module or "").split(".")[0] or "open_mythos")
            elif node.level == 0 and (node.module or "").startswith("open_mythos"):
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else "open_mythos")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("open_mythos"):
                    parts = alias.name.split(".")
                    found.add(parts[1] if len(parts) > 1 else "open_mythos")
    return found


def test_layers_import_only_config_and_each_other():
    files = sorted((PACKAGE / "layers").glob("*.py"))
    assert len(files) >= 7
    offenders = {f.name: sorted(_package_imports(f) - ALLOWED) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_layers_import_alone_in_a_fresh_interpreter():
    # The package's __init__ is bypassed: importing open_mythos.layers must load no other
    # part of open_mythos (a cycle through inference/ used to work only by import order).
    code = f"""
import sys, types
pkg = types.ModuleType("open_mythos")
pkg.__path__ = [{str(PACKAGE)!r}]
sys.modules["open_mythos"] = pkg
import open_mythos.layers as layers
loaded = sorted(m for m in sys.modules if m.startswith("open_mythos."))
extra = [m for m in loaded if not m.startswith(("open_mythos.layers", "open_mythos.config"))]
assert not extra, extra
assert layers.RMSNorm and layers.MoEFFN and layers.RecurrentBlock
print("ok", len(loaded))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
