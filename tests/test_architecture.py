"""The package's imports run one way (docs/architecture.md): no module imports one that imports
it back, directly or around a loop, and the frame core knows nothing of the layers above it."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
# the package's folders as installed (pyproject's package-dir)
FOLDERS = {"csm_mlx": ROOT / "csm_mlx", "csm_mlx.cli": ROOT / "cli", "csm_mlx.convert": ROOT / "convert"}
CORE = ["csm_mlx.frame_batch", "csm_mlx.sampling", "csm_mlx.utterance", "csm_mlx.prompt", "csm_mlx.context"]
ABOVE_CORE = ["csm_mlx.api", "csm_mlx.chat", "csm_mlx.engine", "csm_mlx.conversation", "csm_mlx.static_batch", "csm_mlx.server",
              "csm_mlx.cli", "csm_mlx.convert"]


def modules():
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package,) + parts)
            if package == "csm_mlx" and parts[:1] in (("cli",), ("convert",)):
                continue
            found[name] = path
    return found


def imports(name, path, known):
    """The package's modules that name imports (a package counts as its __init__)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name if is_package else name.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            module = node.module if node.level == 0 else ".".join(filter(None, [base, node.module]))
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    assert "csm_mlx.frame_batch" in edges and "csm_mlx.cli.serve" in edges
    # the package's face loads its names lazily, from the modules below it
    edges["csm_mlx"] = {m for m in edges["csm_mlx"] if m == "csm_mlx.blas"}
    assert cycles(edges) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_nothing_above_it():
    edges = graph()

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for module in CORE:
        above = {m for m in reachable(module) if any(m == a or m.startswith(a + ".") for a in ABOVE_CORE)}
        assert not above, f"{module} reaches {sorted(above)}"
