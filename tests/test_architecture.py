"""The shape of the package: no import cycles (counting imports inside functions and under
TYPE_CHECKING), a recipe parses without torch, no module grows past 450 lines, and test modules
share helpers through conftest only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "opt_deus_cli"
TESTS = Path(__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every package module `path` imports, anywhere in the file (`from .x import y` counts as
    x.y when x.y is a module, else x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycles():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    from opt_deus_cli.methods import registry  # its lazy imports are edges too

    graph[registry.__name__] |= {f"opt_deus_cli.methods.{entry.split(':')[0]}" for entry in registry._METHODS.values()}
    assert graph["opt_deus_cli.recipe"], "the import scan found nothing: it is broken"
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_recipes_parse_without_torch():
    """Parsing a recipe is cheap: with torch made unimportable, every shipped recipe parses."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from opt_deus_cli.recipe import load_recipe, shipped_recipes\n"
        "names = list(shipped_recipes())\n"
        "assert len(names) >= 5, names\n"
        "for name in names: load_recipe(name).to_dict()\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok', len(names))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTS)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 450


def test_test_modules_do_not_import_each_other():
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("test_") for n in names), f"{path.name} imports {names}"
