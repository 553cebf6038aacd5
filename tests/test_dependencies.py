"""Dependencies one way: static checks of the package's import structure (no imports executed).

Every ``.py`` file of ``src/timers1`` and of ``kernels/`` (installed as ``timers1.kernels``) is
parsed with ``ast``. Every import statement counts, wherever it is: at the top, inside a
function (lazy imports), under ``if TYPE_CHECKING``. Relative imports are resolved. Imports
by name through ``importlib.import_module`` (the CLI's subcommand lists) are not seen.

A *unit* is the first component after ``timers1.`` of a module's dotted name (``timers1.train``
for ``timers1.train.checkpoint``, ``timers1.forecast`` for ``timers1/forecast.py``); the
package's own ``__init__`` is the unit ``timers1``. ``from timers1 import x`` depends on unit
``x`` when ``x`` is a unit, on ``timers1`` otherwise.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
SRC_DIR = REPO_DIR / "src" / "timers1"
KERNELS_DIR = REPO_DIR / "kernels"
ROOT = "timers1"


# ------------------------------------------------------------------------------------ scanning

@dataclass(frozen=True)
class Import:
    source: Path  # the importing file
    line: int
    module: str  # the importing module, dotted
    target: str  # the imported module (or the package a name is taken from), dotted, absolute

    @property
    def order(self) -> tuple[str, int, str]:
        return str(self.source), self.line, self.target

    @property
    def where(self) -> str:
        return f"{self.source.relative_to(REPO_DIR)}:{self.line}"


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for the whole installed package."""
    files: dict[str, Path] = {}
    for base, prefix in ((SRC_DIR, (ROOT,)), (KERNELS_DIR, (ROOT, "kernels"))):
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(prefix + parts)] = path
    return files


@lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    files = _module_files()
    assert f"{ROOT}.forecast" in files and f"{ROOT}.kernels" in files, f"package layout not found under {REPO_DIR}"
    return files


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_package(module: str) -> bool:
    return _modules()[module].name == "__init__.py"


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """Absolute dotted names imported by one statement of a module in ``package``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        assert base and base[0], f"line {node.lineno}: relative import above the top-level package"
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # ``from pkg import sub`` imports the submodule pkg.sub when there is one.
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in _modules() else source for alias in node.names]


def _imports_of(module: str) -> list[Import]:
    path = _modules()[module]
    package = module if _is_package(module) else module.rpartition(".")[0]
    return [Import(path, node.lineno, module, target)
            for node in ast.walk(_tree(path)) if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in _imported(node, package)]


@lru_cache(maxsize=None)
def _all_imports() -> tuple[Import, ...]:
    return tuple(imp for module in _modules() for imp in _imports_of(module))


def unit_of(module: str) -> str | None:
    """The top-level unit of a dotted ``timers1`` name; None for modules outside the package."""
    parts = module.split(".")
    if parts[0] != ROOT:
        return None
    if len(parts) == 1:
        return ROOT
    unit = f"{ROOT}.{parts[1]}"
    # ``from timers1 import load_forecaster``: a name of the package root, not a unit.
    return unit if unit in _modules() else ROOT


def _internal_imports() -> list[tuple[str, str, Import]]:
    """(importing unit, imported unit, the import) for every import of the package by itself."""
    edges = []
    for imp in _all_imports():
        target = unit_of(imp.target)
        if target is not None:
            edges.append((unit_of(imp.module), target, imp))
    return edges


def _in_file_set(path: Path, *roots: Path) -> bool:
    return any(path == root or root in path.parents for root in roots)


# -------------------------------------------------------------------------- a: forecast, eval

def test_forecast_and_eval_do_not_import_train():
    """Inference and evaluation find checkpoints through timers1.rundir, never the trainer."""
    checked = (SRC_DIR / "forecast.py", SRC_DIR / "eval")
    bad = [imp for src, dst, imp in _internal_imports()
           if dst == f"{ROOT}.train" and _in_file_set(imp.source, *checked)]
    assert not bad, "forecast.py / eval/ import timers1.train (use timers1.rundir for run-dir layout):\n" + \
        "\n".join(f"  {imp.where}: imports {imp.target}" for imp in bad)


# ----------------------------------------------------------------------- b: no class swapping

def _class_assignments(tree: ast.AST) -> list[tuple[int, str]]:
    found = []

    def targets(node):
        if isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                yield from targets(elt)
        elif isinstance(node, ast.Starred):
            yield from targets(node.value)
        else:
            yield node

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            assigned = [t for target in node.targets for t in targets(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            assigned = list(targets(node.target))
        else:
            assigned = []
        for target in assigned:
            if isinstance(target, ast.Attribute) and target.attr == "__class__":
                found.append((node.lineno, f"assigns {ast.unparse(target)}"))
        # setattr(obj, "__class__", cls) / object.__setattr__(obj, "__class__", cls)
        if isinstance(node, ast.Call) and len(node.args) >= 2:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            key = node.args[1]
            if name in ("setattr", "__setattr__") and isinstance(key, ast.Constant) and key.value == "__class__":
                found.append((node.lineno, f"calls {ast.unparse(node)}"))
    return found


def test_parallel_never_assigns_class():
    """Parallel wrappers compose modules; they never swap an object's class in place."""
    bad = [(path, line, what) for path in sorted((SRC_DIR / "parallel").rglob("*.py"))
           for line, what in _class_assignments(_tree(path))]
    assert not bad, "__class__ assignments under src/timers1/parallel/:\n" + \
        "\n".join(f"  {path.relative_to(REPO_DIR)}:{line}: {what}" for path, line, what in bad)


def test_class_assignment_detector():
    probe = ast.parse("x.__class__ = A\na, b.__class__ = 1, B\nc.__class__ += 1\n"
                      "setattr(d, '__class__', D)\ny.__class__\nz = w.__class__\n")
    assert [line for line, _ in _class_assignments(probe)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- c: no torch._C

def _torch_c_uses(tree: ast.AST) -> list[tuple[int, str]]:
    aliases = {"torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {alias.asname for alias in node.names if alias.name == "torch" and alias.asname}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "_C" and \
                isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if a.name == "torch._C" or a.name.startswith("torch._C.")]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == "torch._C" or node.module.startswith("torch._C."):
                found.append((node.lineno, f"from {node.module} import ..."))
            elif node.module == "torch" and any(a.name == "_C" for a in node.names):
                found.append((node.lineno, "from torch import _C"))
    return sorted(set(found))


def test_no_private_torch_c():
    """``torch._C`` is private and changes between releases; only public torch APIs are used."""
    bad = [(path, line, what) for path in _modules().values() for line, what in _torch_c_uses(_tree(path))]
    assert not bad, "torch._C used in:\n" + \
        "\n".join(f"  {path.relative_to(REPO_DIR)}:{line}: {what}" for path, line, what in bad)


def test_torch_c_detector():
    probe = ast.parse("import torch as th\nimport torch\nth._C._foo()\ntorch._C.bar\nimport torch._C\n"
                      "from torch._C import _x\nfrom torch import _C\ntorch.cuda._C_like\n")
    assert [line for line, _ in _torch_c_uses(probe)] == [3, 4, 5, 6, 7]


# ------------------------------------------------------------------------ d: no unit cycles

def _unit_graph() -> dict[str, dict[str, Import]]:
    """unit -> {imported unit: the first import (by file and line) that makes the edge}."""
    graph: dict[str, dict[str, Import]] = {unit_of(m): {} for m in _modules()}
    for src, dst, imp in sorted(_internal_imports(), key=lambda e: e[2].order):
        if src != dst:
            graph[src].setdefault(dst, imp)
    return graph


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one unit, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _shortest_cycle(graph: dict[str, dict[str, Import]], component: list[str]) -> list[str]:
    """A shortest cycle through the first unit of a strongly connected component."""
    start = component[0]
    members = set(component)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles_between_units():
    graph = _unit_graph()
    components = _strongly_connected(graph)
    if not components:
        return
    lines = []
    for component in components:
        cycle = _shortest_cycle(graph, component)
        lines.append("cycle: " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            imp = graph[a][b]
            lines.append(f"  {a} -> {b}: {imp.where} imports {imp.target}")
        inside = [(a, b) for a in component for b in sorted(graph[a]) if b in component]
        lines.append(f"  every edge among {', '.join(component)} (remove edges until no cycle is left):")
        for a, b in inside:
            imp = graph[a][b]
            lines.append(f"    {a} -> {b}: {imp.where} imports {imp.target}")
    pytest.fail("import cycles between package units:\n" + "\n".join(lines), pytrace=False)


def test_cycle_finder():
    probe = Import(Path("p"), 1, "m", "t")
    graph = {"a": {"b": probe}, "b": {"c": probe}, "c": {"a": probe, "d": probe}, "d": {}, "e": {"e": probe}}
    components = _strongly_connected(graph)
    assert components == [["a", "b", "c"]]
    assert _shortest_cycle(graph, components[0]) == ["a", "b", "c", "a"]


# -------------------------------------------------------------------------- direction rules

# unit -> units it must never import (directly, top-level or lazily).
FORBIDDEN = {
    "model": ["parallel", "train", "data", "eval", "bench", "cli"],
    "data": ["model", "parallel", "train"],
    "parallel": ["train", "data"],
    "eval": ["train"],
    "forecast": ["train"],
}
# unit -> the only timers1 units it may import (besides itself).
ONLY = {
    "kernels": [],
    "rundir": ["errors", "config"],
}


def _rule_violations(unit: str, allowed) -> list[str]:
    unit = f"{ROOT}.{unit}"
    return [f"  {imp.where}: {unit} imports {imp.target}"
            for src, dst, imp in sorted(_internal_imports(), key=lambda e: e[2].order)
            if src == unit and dst != unit and not allowed(dst)]


@pytest.mark.parametrize("unit", sorted(FORBIDDEN))
def test_unit_never_imports(unit):
    forbidden = {f"{ROOT}.{u}" for u in FORBIDDEN[unit]}
    bad = _rule_violations(unit, lambda dst: dst not in forbidden)
    assert not bad, f"timers1.{unit} must not import {', '.join(sorted(forbidden))}:\n" + "\n".join(bad)


@pytest.mark.parametrize("unit", sorted(ONLY))
def test_unit_imports_only(unit):
    allowed = {f"{ROOT}.{u}" for u in ONLY[unit]}
    bad = _rule_violations(unit, lambda dst: dst in allowed)
    assert not bad, f"timers1.{unit} may import only {sorted(allowed) or 'nothing of timers1'}:\n" + "\n".join(bad)


def test_units_named_in_rules_exist():
    """A renamed unit must not silently turn its rules into no-ops."""
    named = set(FORBIDDEN) | set(ONLY) | {u for us in (*FORBIDDEN.values(), *ONLY.values()) for u in us}
    missing = sorted(u for u in named if f"{ROOT}.{u}" not in _modules())
    assert not missing, f"rules name units that do not exist: {missing}"


def test_scanner_sees_lazy_relative_and_from_package_imports():
    """The scanner itself: lazy imports, relative imports and ``from timers1 import unit``."""
    targets = {(imp.module, imp.target) for imp in _all_imports()}
    # forecast.load_model imports hf inside the function: ``from timers1 import hf``.
    assert ("timers1.forecast", "timers1.hf") in targets
    probe = ast.parse("from . import checkpoint\nfrom ..eval import metrics\nfrom .. import hf\n"
                      "from ..hf import OUR_WEIGHTS\nfrom timers1 import load_forecaster\nimport timers1.train.cli\n")
    resolved = [t for node in probe.body for t in _imported(node, "timers1.train")]
    assert resolved == ["timers1.train.checkpoint", "timers1.eval.metrics", "timers1.hf", "timers1.hf", "timers1",
                        "timers1.train.cli"]
    assert unit_of("timers1.train.checkpoint") == "timers1.train"
    assert unit_of("timers1.load_forecaster") == "timers1"
    assert unit_of("torch.nn") is None


def test_rundir_is_low_level():
    """timers1.rundir is read by the trainer and by inference alike: stdlib and torch only."""
    import sys

    bad = [f"  {imp.where}: imports {imp.target}" for imp in _imports_of(f"{ROOT}.rundir")
           if unit_of(imp.target) is None and imp.target.split(".")[0] not in (*sys.stdlib_module_names, "torch")]
    assert not bad, "timers1.rundir imports beyond the standard library and torch:\n" + "\n".join(bad)
