"""The package's shape: modules depend on each other in one direction only."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sniproxy"


def imports_of(path: Path) -> set[str]:
    """The sniproxy modules a module imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sniproxy."):
            found.add(node.module.split(".")[1])
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_no_import_cycle():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}
    done, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert graph["connection"].isdisjoint({"worker", "master"})   # a connection sees only its Context
