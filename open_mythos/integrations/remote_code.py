"""The modeling code an exported Hugging Face directory ships, for ``trust_remote_code``.

``transformers`` loads a model type it does not know from Python files in the model
directory, named by ``auto_map`` in ``config.json``; it copies the file ``auto_map`` names and
every file that one imports as ``from .name import ...``, flat, from the same directory. So
:func:`write_modeling_code` copies :mod:`open_mythos.integrations.hf` and every module of this
package it imports (directly or not, lazily included: about twenty files of torch-only code)
into the directory as flat modules, with their imports rewritten:

* ``open_mythos/integrations/hf.py`` -> ``modeling_openmythos.py`` (``auto_map`` names its
  config and model classes);
* every other module ``open_mythos/a/b.py`` -> ``openmythos_a_b.py``, a package's
  ``__init__.py`` -> ``openmythos_<package>.py``;
* ``from ..a.b import x`` (or ``from open_mythos.a.b import x``) -> ``from .openmythos_a_b
  import x``; ``from . import b`` -> ``from . import openmythos_b as b``.

Then ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` needs only
``torch``, ``transformers`` and ``safetensors``. Where this package is installed and imported,
the same directory loads natively: the registered ``"openmythos"`` type wins over
``auto_map`` (with transformers 5.25 even when ``trust_remote_code=True`` is passed; either
way the weights and logits are the same).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

PACKAGE = "open_mythos"
ENTRY_MODULE = f"{PACKAGE}.integrations.hf"
ENTRY_FILE = "modeling_openmythos"
AUTO_MAP = {
    "AutoConfig": f"{ENTRY_FILE}.OpenMythosHFConfig",
    "AutoModelForCausalLM": f"{ENTRY_FILE}.OpenMythosForCausalLM",
}

_FROM = re.compile(r"from\s+[.\w]+\s+import")


def flat_name(module: str) -> str:
    """The file stem a module of this package gets in the bundle."""
    if module == ENTRY_MODULE:
        return ENTRY_FILE
    return "openmythos_" + module[len(PACKAGE) + 1:].replace(".", "_")


def _source(module: str) -> tuple[Path, bool]:
    """``(file, is_package)`` of a module of this package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the source of {module}")
    return Path(spec.origin), spec.submodule_search_locations is not None


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The module of this package that ``node`` imports from, or None for another package."""
    if node.level == 0:
        name = node.module or ""
        return name if name == PACKAGE or name.startswith(PACKAGE + ".") else None
    parts = module.split(".") if is_package else module.split(".")[:-1]
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _rewrite(module: str) -> tuple[str, list[str]]:
    """``(rewritten source, modules of this package it imports)``."""
    path, is_package = _source(module)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    deps: list[str] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            if any(a.name.split(".")[0] == PACKAGE for a in node.names):
                raise ValueError(f"{path}:{node.lineno}: write 'from ... import' for this package")
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _target(module, is_package, node)
        if target is None:
            continue
        i = node.lineno - 1
        if node.module is None or target == PACKAGE:  # from . import a, b
            if node.end_lineno != node.lineno:
                raise ValueError(f"{path}:{node.lineno}: keep 'from . import' on one line")
            names = [a.name for a in node.names]
            for n in names:
                if importlib.util.find_spec(f"{target}.{n}") is None:
                    raise ValueError(f"{path}:{node.lineno}: import {n!r} from its module, "
                                     f"not from the package {target}")
            deps += [f"{target}.{n}" for n in names]
            new = ", ".join(f"{flat_name(f'{target}.{a.name}')} as {a.asname or a.name}"
                            for a in node.names)
            lines[i] = re.sub(r"from\s+[.\w]*\s+import\s+.*", f"from . import {new}", lines[i])
            continue
        deps.append(target)
        lines[i], n = _FROM.subn(f"from .{flat_name(target)} import", lines[i], count=1)
        if n != 1:
            raise ValueError(f"{path}:{node.lineno}: cannot rewrite this import")
    return "".join(lines), deps


def modeling_sources() -> dict[str, str]:
    """``{file name: source}`` of the bundle: :data:`ENTRY_MODULE` and every module of this
    package it imports, rewritten as described in the module docstring."""
    out: dict[str, str] = {}
    todo, seen = [ENTRY_MODULE], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        text, deps = _rewrite(module)
        header = (f"# Generated by `openmythos export` from {module} for transformers' "
                  "trust_remote_code; edit the package, not this file.\n")
        out[f"{flat_name(module)}.py"] = header + text
        todo += deps
    return out


def write_modeling_code(out_dir: str | Path) -> list[Path]:
    """Write the bundle into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    written = []
    for name, text in sorted(modeling_sources().items()):
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    return written


__all__ = ["AUTO_MAP", "ENTRY_FILE", "flat_name", "modeling_sources", "write_modeling_code"]
