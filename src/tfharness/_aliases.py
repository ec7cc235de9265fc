"""The module paths of tfharness 0.1, before the package was split into folders.

``tfharness.serialization``, ``tfharness.inmemory``, ``tfharness.serving`` and the other flat
modules were public (the README showed them in examples), so code written against them keeps
importing: each old name is an alias of the module that now holds the code, the same module
object, so an attribute set through one path is seen through the other.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "tfharness.serialization": "tfharness.artifacts.serialization",
    "tfharness.serving": "tfharness.artifacts.serving",
    "tfharness.inmemory": "tfharness.artifacts.inmemory",
    "tfharness.integrity": "tfharness.artifacts.integrity",
    "tfharness.checkpoint": "tfharness.artifacts.checkpoint",
    "tfharness.spool": "tfharness.tracking.spool",
    "tfharness.mlflow_model": "tfharness.tracking.mlflow_model",
    "tfharness.legacy_keras": "tfharness.sources.legacy_keras",
    "tfharness.runner": "tfharness.pipeline.runner",
    "tfharness.distribute": "tfharness.pipeline.distribute",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module now holding its code."""

    def __init__(self) -> None:
        # The module's own spec, by old name, from create_module to exec_module.
        self._own_specs: dict = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system has stamped the alias's spec on the module; give it back its own,
        # so the module still names where its code lives (pickling, reloads, tracebacks).
        module.__spec__ = self._own_specs.pop(module.__spec__.name)


def install() -> None:
    """Adds the finder once (importing tfharness twice must not stack them)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
