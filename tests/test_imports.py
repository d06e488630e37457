"""The library's import graph: no cycles, and nothing imported from outside the installed package
(`configs/`, `benchmarks/`) or from the test stack (torch) outside `openvla_jax.testing`.

Every `import` counts, at module level or inside a function: a lazy import that closes a cycle is
still a cycle a reader has to untangle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openvla_jax"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules=frozenset()) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved). `from pkg import
    name` imports the module `pkg.name` when that is one of `modules`, else (a name defined in its
    `__init__`) `pkg`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return out


def graph() -> dict[str, set[str]]:
    """module -> the modules importing it runs: what it imports, and the `__init__` of every package
    above those (importing `a.b.c` runs `a/__init__` and `a/b/__init__` first)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for m, p in modules.items():
        deps = set()
        for d in imports(p, frozenset(modules)):
            parts = d.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # not the root package
        own = {".".join(m.split(".")[:i]) for i in range(1, len(m.split(".")) + 1)}  # itself, its parents
        out[m] = {d for d in deps if d in modules and d not in own}
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_library():
    found = cycles(graph())
    assert not found, f"import cycles in openvla_jax: {found}"


def test_the_library_imports_nothing_from_outside_the_package():
    bad = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        top = {i.split(".")[0] for i in imports(path)}
        outside = top & {"configs", "benchmarks", "tests", "helpers"}
        if not name.startswith("openvla_jax.testing"):
            outside |= top & {"torch", "timm", "transformers"}
        if outside:
            bad[name] = sorted(outside)
    assert not bad, f"library modules importing from outside the package / the test stack: {bad}"
