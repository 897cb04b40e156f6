"""Register the ``"openmythos"`` model type with ``transformers`` without slowing imports.

``import open_mythos`` must make ``AutoModelForCausalLM.from_pretrained(dir)`` work, but
importing ``transformers``' model classes costs seconds that users without transformers
should not pay. So: if ``transformers`` is already imported, register now; otherwise a
one-shot import hook registers right after ``transformers`` is first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType


def _register() -> None:
    from . import hf  # noqa: F401  (importing the module registers the Auto classes)


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``transformers`` to register after it."""

    def find_spec(self, name: str, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if ``transformers`` is loaded, else when it is first imported."""
    if "transformers" in sys.modules:
        try:
            _register()
        except ImportError:  # a transformers too old for the integration: nothing to register
            pass
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterTransformersImport())
