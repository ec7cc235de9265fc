"""The package layout: old module paths still import, and dependencies point one way."""

import ast
import importlib
from pathlib import Path

import tfharness
from tfharness import _aliases

PACKAGE = Path(tfharness.__file__).resolve().parent
STAGES = ("config", "data", "models", "finetune", "artifacts", "sources", "tracking")


def test_every_old_module_path_is_the_module_that_holds_the_code_now():
    for old, new in _aliases.MOVED.items():
        module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        # The alias leaves the module its own name and spec.
        assert module.__name__ == new and module.__spec__.name == new
    from tfharness import serialization
    from tfharness.artifacts import serialization as moved

    assert serialization is moved


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_stage_folders_never_import_the_pipeline_or_the_commands():
    offenders = []
    for stage in STAGES:
        for path in (PACKAGE / stage).rglob("*.py"):
            for module in _imports(path):
                if module.startswith(("tfharness.pipeline", "tfharness.cli", "tfharness.sweeps",
                                      "tfharness.runner")):
                    offenders.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert offenders == []


def test_config_imports_no_other_stage():
    for path in (PACKAGE / "config").rglob("*.py"):
        for module in _imports(path):
            if module.startswith("tfharness."):
                assert module.startswith(("tfharness.config", "tfharness.errors")), (path, module)
