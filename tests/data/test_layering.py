"""The data-source layer is the one door into the built-in world: no task, model, evaluation or reader
imports :mod:`mmfactory.world`; only ``world/`` itself, the layer's world adapter and the CLI's ``world``
command do."""

import ast
from pathlib import Path

import mmfactory

PACKAGE = Path(mmfactory.__file__).parent
ALLOWED = {"data/world_source.py", "cli.py"}


def world_imports(path: Path) -> list[int]:
    """Lines of ``path`` that import ``mmfactory.world`` or a module under it."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        if any(n == "mmfactory.world" or n.startswith("mmfactory.world.") for n in names):
            lines.append(node.lineno)
    return lines


def test_only_the_world_adapter_and_the_cli_import_the_world():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("world/") or relative in ALLOWED:
            continue
        if lines := world_imports(path):
            offenders[relative] = lines
    assert offenders == {}


def test_the_cli_imports_the_world_for_its_world_command_only():
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    functions = [
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        and any(
            isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mmfactory.world")
            for n in ast.walk(f)
        )
    ]
    assert functions == ["_cmd_world_export"]
