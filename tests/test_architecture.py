"""The shape of the package: imports point down the layers of LAYERS only and no method imports
another, no import cycles (both counting imports inside functions, under TYPE_CHECKING and the
registry's lazy ones), a recipe parses without torch, no module grows past 450 lines, and test
modules share helpers through conftest only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "opt_deus_cli"
TESTS = Path(__file__).resolve().parent
README = PACKAGE.parent / "README.md"

# The package's layers, lowest first: a module may import its own layer and the layers below it,
# never one above (the README's Layout names them). Entries are modules relative to opt_deus_cli;
# "x.*" is x and everything under it, "__init__" the package itself. A new module goes in the
# lowest layer its imports allow; a module in no layer fails the test. In "methods" every entry
# is a silo: a method never imports another one (what they share lives in methods.base).
LAYERS = (
    ("base", ("__init__", "errors", "devices", "dtypes", "hashing", "figures")),
    ("storage", ("checkpoint", "shards", "architectures", "ot_names", "ot", "solvers")),
    ("model", ("hub", "block", "configs", "source", "manifest", "card", "output", "settings", "options")),
    ("contract", ("methods", "methods.base")),
    ("methods", ("methods.copy", "methods.average", "methods.lesa.*", "methods.opt_deus.*")),
    ("plan", ("methods.registry", "recipe", "layers")),
    (
        "work",
        ("job", "upscale", "inspect", "perplexity", "verify", "training.*", "handoff", "evaluation.*", "compare.*"),
    ),
    ("cli", ("cli.*",)),
)
SILOS = {"methods"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """Every package module `path` imports, anywhere in the file (`from .x import y` counts as
    x.y when x.y is a module, else x)."""
    name = module_name(path, root)
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
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports, the method registry's lazy imports included."""
    files = sorted(package.rglob("*.py"))
    modules = {module_name(p, package) for p in files}
    graph = {module_name(p, package): imports_of(p, modules, package) for p in files}
    from opt_deus_cli.methods import registry  # its lazy imports are edges too

    graph[registry.__name__] |= {f"opt_deus_cli.methods.{entry.split(':')[0]}" for entry in registry._METHODS.values()}
    assert graph["opt_deus_cli.recipe"], "the import scan found nothing: it is broken"
    return graph


def layer_of(module: str) -> tuple[int, str] | None:
    """(layer index, the LAYERS entry) of a module such as `opt_deus_cli.methods.opt_deus.mlp`."""
    rel = module.removeprefix("opt_deus_cli").removeprefix(".") or "__init__"
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if rel == entry.removesuffix(".*") or (entry.endswith(".*") and rel.startswith(entry[:-1])):
                return index, entry
    return None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        placed = layer_of(module)
        if placed is None:
            found.append(
                f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py, in the lowest "
                "layer its imports allow"
            )
            continue
        for target in sorted(imported):
            (layer, entry), (target_layer, target_entry) = placed, layer_of(target) or (len(LAYERS), "?")
            if target_layer > layer:
                found.append(f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]}, above it)")
            elif target_layer == layer and LAYERS[layer][0] in SILOS and entry != target_entry:
                found.append(
                    f"{module} imports {target}: a method never imports another method "
                    "(move what they share to methods.base)"
                )
    return found


def test_imports_point_down_the_layers():
    assert layering_violations(import_graph()) == []


def test_layering_check_catches_an_import_against_the_order(tmp_path):
    """The check itself: a copy of the package with one planted up-pointing import (lazy, inside a
    function) and one method importing another fails, naming both."""
    import shutil

    copy = tmp_path / "opt_deus_cli"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    ot = copy / "ot.py"
    ot.write_text(ot.read_text() + "\n\ndef _planted():\n    from .job import Job  # up: storage -> work\n")
    copy_method = copy / "methods" / "copy.py"
    copy_method.write_text(copy_method.read_text() + "\nfrom .average import AverageMethod\n")
    violations = layering_violations(import_graph(copy))
    assert any(v.startswith("opt_deus_cli.ot (storage) imports opt_deus_cli.job (work") for v in violations), violations
    assert any("opt_deus_cli.methods.copy imports opt_deus_cli.methods.average" in v for v in violations), violations
    assert len(violations) == 2, violations


def test_readme_layout_names_the_layers():
    """The README's Layout lists the layers of LAYERS, in their order, one line each."""
    layout = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    names = {name for name, _ in LAYERS}
    listed = [line.split()[0] for line in layout.splitlines() if line.startswith("  ") and line.split()[0] in names]
    assert listed == [name for name, _ in LAYERS]


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
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
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("test_") for n in names), f"{path.name} imports {names}"
