"""Where code lives (docs/extending.md): every import of ``mmfactory`` runs down the layers below, never up,
and no two modules import each other. Type-only imports (``if TYPE_CHECKING:``) do not count: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mmfactory

PACKAGE = Path(mmfactory.__file__).parent

# Lowest first. A module may import its own layer and any layer before it.
LAYERS = [
    {"config", "atomic", "environment", "recipes"},  # settings and files
    {"world"},  # the built-in world (only data/world_source.py reads it: tests/data/test_layering.py)
    {"data"},  # sources, readers, samples, chat templates, benchmark records
    {"models"},  # Hugging Face models and their components
    {"losses"},  # pure loss functions
    {"eval", "examples"},  # metrics, benchmarks, FLOPs, shown examples
    {"mars", "sag", "filter_align", "llava_mod", "artifacts"},  # a method's glue, stage artifacts
    {"tasks"},  # the task contract and each method's task
    {"train", "lineage", "model_card"},  # the loop, checkpoints, stage fingerprints, model cards
    {"runner", "auto"},  # stages of a recipe
    {"reproduce", "report", "cli"},  # claims tables, HTML reports, the command line
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    return module.split(".")[1]


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``mmfactory`` import that runs (module level or inside functions)."""
    type_only = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and ast.unparse(stmt.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for node in ast.walk(stmt)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmfactory."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mmfactory.")]
    return found


def _modules() -> dict[str, Path]:
    return {
        "mmfactory." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def test_every_top_level_module_and_package_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert tops - RANK.keys() == set()


def test_imports_run_down_the_layers():
    upward = []
    for name, path in _modules().items():
        if name == "mmfactory":
            continue
        source = _top(name)
        for line, module in _runtime_imports(ast.parse(path.read_text())):
            target = _top(module) if module.count(".") else module
            if RANK.get(target, -1) > RANK[source]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert upward == []


def test_no_two_modules_import_each_other_at_module_level():
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, ast.ImportFrom | ast.Import)]
        targets = set()
        for node in top_level:
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            targets |= {m for m in names if m and m in modules and m != name}
        edges[name] = targets
    assert _cycles(edges) == set()


def test_tasks_leave_processes_to_the_loop_and_the_losses_that_gather():
    """Tasks never talk to the process group: the loop and accelerate do, and a loss that gathers owns its
    collective (``losses/contrastive.py``)."""
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted((PACKAGE / "tasks").glob("*.py"))
        if "torch.distributed" in path.read_text()
    ]
    assert offenders == []


def _cycles(edges: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The sets of modules on a cycle of ``edges`` (each cycle once, sorted)."""

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    return path
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    return {tuple(sorted(c)) for name in edges if (c := cycle_from(name))}


def test_no_import_cycle_even_through_imports_inside_functions_or_the_format_table():
    """Lazy imports and the format table's ``"module:function"`` readers count too: the readers import
    the source types from ``data.source_config``, never the module that dispatches to them."""
    from mmfactory.data.source_config import FORMATS

    modules = _modules()
    edges = {
        name: {m for _, m in _runtime_imports(ast.parse(path.read_text())) if m in modules and m != name}
        for name, path in modules.items()
    }
    edges["mmfactory.data.sources"] |= {f.reader.split(":")[0] for f in FORMATS.values()}
    assert _cycles(edges) == set()
