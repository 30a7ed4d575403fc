"""The layering holds: services/common is the floor, the services stand side by side on it, nothing
imports back up, and no project modules import each other in a cycle (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "kernels", "folio")
SERVICES = ("services.engine", "services.router", "services.tokenizer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            out[_module_name(f)] = f
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            # the longest known module that is the name or a prefix of it
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_common_imports_nothing_above_it():
    bad = [(m, d) for m, ds in _graph().items() if _under(m, "services.common") for d in ds
           if any(_under(d, s) for s in SERVICES) or _under(d, "folio")]
    assert not bad, f"services/common imports from the services above it: {bad}"


def test_services_do_not_import_each_other():
    bad = [(m, d) for m, ds in _graph().items() for d in ds for a in SERVICES for b in SERVICES
           if a != b and _under(m, a) and _under(d, b)]
    assert not bad, f"a service imports another service's internals: {bad}"


def test_kernels_and_services_do_not_import_the_facade():
    bad = [(m, d) for m, ds in _graph().items() if not _under(m, "folio") for d in ds if _under(d, "folio")]
    assert not bad, f"the folio facade sits on top; nothing below may import it: {bad}"


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components; any component with more than one module is a cycle.
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            # importing a package runs its __init__: edges to packages count, edges from them too
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles among project modules: {cycles}"


def test_the_checker_sees_imports():
    # Guard against a vacuous pass: the graph must contain edges we know exist.
    graph = _graph()
    assert "services.common.errors" in graph["services.common.grpc_errors"]
    assert "services.common.sampling_params" in graph["services.engine.engine"]
