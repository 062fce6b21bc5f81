"""The core's imports point one way: data at the bottom, services above, no cycles.

Every import counts, at module level, inside functions and under ``TYPE_CHECKING``:
a lazy import is still a dependency a reader has to follow. The only module allowed to
reach up from the data is ``interventions.graph``, the façade, and nothing imports it
from below (that would be a cycle, which this test reports with its path).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the data at the bottom: these import only each other
DATA = {
    "interventions.errors",
    "interventions.sites",
    "interventions.ops",
    "interventions.runs",
    "interventions.builder",
    "interventions.spec",
    "interventions.tensor_bytes",
    # the SAE kinds a graph may splice: weights and their formulas (not loading or training)
    "interventions.sae.base",
    "interventions.sae.info",
    "interventions.sae.kinds",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "adapters":  # installed as interventions.adapters
        parts = ["interventions", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def known_modules() -> dict[str, Path]:
    files = [*(ROOT / "interventions").rglob("*.py"), *(ROOT / "adapters").rglob("*.py")]
    return {module_name(p): p for p in files}


def imports_of(path: Path, known: Mapping[str, Path]) -> set[str]:
    """Modules of this package that ``path`` imports, wherever the import statement is."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            subs = {f"{base}.{a.name}" for a in node.names} & known.keys()
            found.update(subs or {base})
    return {m for m in found if m in known and m != me}


def import_graph() -> dict[str, set[str]]:
    known = known_modules()
    return {name: imports_of(path, known) for name, path in known.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path.pop()] = 2
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_import_graph_sees_lazy_and_type_checking_imports() -> None:
    graph = import_graph()
    # graph.py delegates upward at module level; serialize imports the data
    assert {"interventions.serialize", "interventions.validation"} <= graph["interventions.graph"]
    assert "interventions.spec" in graph["interventions.serialize"]
    # the registry names adapters by string, so the core's graph has no edge to them
    assert "interventions.adapters.torch_hooks" in graph
    assert len(graph) > 30


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_data_layer_imports_only_itself() -> None:
    graph = import_graph()
    for name in sorted(DATA):
        above = graph[name] - DATA
        assert not above, f"{name} (data) imports {sorted(above)} from above it"


def test_nothing_but_the_package_entry_imports_the_facade_from_the_core() -> None:
    graph = import_graph()
    below = {
        "interventions.validation",
        "interventions.op_checks",
        "interventions.plan",
        "interventions.batching",
        "interventions.serialize",
        "interventions.deserialize",
        "interventions.ragged",
        "interventions.ragged_layout",
        "interventions.ragged_ops",
        "interventions.printing",
        "interventions.apply",
        "interventions.backends",
    }
    for name in sorted(below):
        assert "interventions.graph" not in graph[name], f"{name} imports the façade"


def test_the_core_never_imports_an_adapter_and_adapters_not_each_other() -> None:
    graph = import_graph()
    adapters = "interventions.adapters"
    for name, deps in graph.items():
        if not name.startswith(adapters + ".") and name != adapters:
            assert not {d for d in deps if d.startswith(adapters)}, f"{name} imports an adapter"
            continue
        mine = name.removeprefix(adapters + ".").split(".")[0]
        others = {
            d
            for d in deps
            if d.startswith(adapters + ".") and d.removeprefix(adapters + ".").split(".")[0] != mine
        }
        assert not others, f"{name} imports another adapter: {sorted(others)}"
