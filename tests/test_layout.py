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


def _module_graph() -> dict:
    """Each tfharness module -> the tfharness modules it imports, anywhere in it (imports inside
    functions included): ``from pkg import name`` counts as importing ``pkg.name`` where that is
    a module, else ``pkg``."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("tfharness",) + path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                               else base for alias in node.names)
        graph[name] = {owner(t) for t in targets if owner(t) not in (None, name)}
    return graph


def test_no_import_cycle_among_the_modules():
    graph = _module_graph()
    assert len(graph) > 50 and graph["tfharness.pipeline.runner"]  # the walk found the package
    cycles, done = [], set()

    def visit(name: str, path: list) -> None:
        if name in path:
            cycles.append(" -> ".join(path[path.index(name):] + [name]))
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []


def test_no_function_over_60_lines_and_no_class_over_250():
    """The limits a reader feels (docstrings and comments count): a longer one is split, or
    given its reason here."""
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = (60 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     else 250 if isinstance(node, ast.ClassDef) else None)
            if limit is not None and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert too_long == []
