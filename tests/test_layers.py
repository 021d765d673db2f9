"""The package's layering, read from the source: which layer may import which, and no import cycle in the zoo.

Imports are parsed from every module's syntax tree, at module level and inside functions (a lazy import
is still a dependency). ``from P import n`` counts as importing both ``P`` and ``P.n`` (``n`` may be a
submodule); relative imports are resolved against the importing module's package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "karcher_lab"

RULES = {
    # layer: modules and libraries none of its modules may import
    "diagnostics": ("karcher_lab.zoo", "karcher_lab.pipeline"),
    "methods": ("karcher_lab.io", "karcher_lab.pipeline", "karcher_lab.zoo"),
    "geometry": ("karcher_lab.methods", "karcher_lab.io", "karcher_lab.zoo", "karcher_lab.diagnostics", "pandas",
                 "transformers"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, functions' included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            found.append((node.lineno, source))
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("layer", sorted(RULES))
def test_each_layer_imports_only_what_it_may(layer):
    broken: dict[str, str] = {}  # one message per import statement
    for path in sorted((PACKAGE_DIR / layer).rglob("*.py")):
        for line, module in imports(path):
            banned = next((b for b in RULES[layer] if _within(module, b)), None)
            where = f"{path.relative_to(PACKAGE_DIR.parent)}:{line}"
            if banned and where not in broken:
                broken[where] = f"{where} imports {module} ({layer}/ must not import {banned})"
    assert not broken, "\n".join(broken.values())


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` ({module: {imported module: line}}) as a path a → … → a, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {}}) is None
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}}) == ["a", "b", "c", "a"]


def test_the_zoo_import_graph_has_no_cycle():
    modules = {module_name(p): p for p in sorted((PACKAGE_DIR / "zoo").glob("*.py"))}
    graph = {name: {} for name in modules}
    for name, path in modules.items():
        for line, module in imports(path):
            if module in modules and module != name:
                graph[name].setdefault(module, line)
    cycle = find_cycle(graph)
    assert cycle is None, "zoo import cycle: " + " → ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" → {cycle[-1]}"


def test_the_pool_key_hashes_the_diagnostics_code_the_zoo_builds_with():
    from karcher_lab.zoo.cache import BUILD_MODULES

    assert all((PACKAGE_DIR / name).is_file() for name in BUILD_MODULES), BUILD_MODULES
    hashed = {module_name(PACKAGE_DIR / name) for name in BUILD_MODULES}
    used = {module for name in BUILD_MODULES for _, module in imports(PACKAGE_DIR / name)
            if _within(module, "karcher_lab.diagnostics")
            and (PACKAGE_DIR.parent / module.replace(".", "/")).with_suffix(".py").is_file()}
    assert used <= hashed, f"the zoo builds with {sorted(used - hashed)}, which the pool key (BUILD_MODULES) does not hash"


def method_name_comparisons(path: Path, names: set[str]) -> list[str]:
    """``x == "karcher"``-style comparisons (==, !=, in, not in) against a registered method's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        literals = {c.value for o in operands for c in ([o] if isinstance(o, ast.Constant) else
                                                      getattr(o, "elts", [])) if isinstance(c, ast.Constant)}
        hit = sorted(literals & names)
        if hit:
            found.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno} compares with {hit}")
    return found


def test_no_caller_branches_on_a_merge_methods_name():
    """Method rules live in the method objects (karcher_lab.methods.registry.MergeMethod), so nothing
    outside methods/ asks which method it has by name."""
    from karcher_lab.methods import list_methods

    names = set(list_methods())
    found = [hit for path in sorted(PACKAGE_DIR.rglob("*.py")) if "methods" not in path.relative_to(PACKAGE_DIR).parts[:1]
             for hit in method_name_comparisons(path, names)]
    assert not found, "\n".join(found)
