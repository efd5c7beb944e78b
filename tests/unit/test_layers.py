"""The package's layers, read from the import graph: lower layers never import higher ones.

Every `import` / `from ... import` in every module counts, at module level or inside a function
(a lazy import is still a dependency), so a reach upward cannot hide in a function body. The
order is the one docs/DESIGN.md draws; a package is one unit, and units on one line may import
each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "opt_study"

# Lowest first. A module may import modules of its own unit or of a unit on an earlier line.
LAYERS = [
    ("storage",),
    ("config",),
    ("plugins",),
    ("distributed",),
    ("workloads", "optim"),
    ("validate",),
    ("measure",),
    ("results",),
    ("plan",),
    ("trial",),
    ("replay",),
    ("report",),
    ("study",),
    ("cli", "prebuild", "api"),
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported opt_study module, line) for every import statement anywhere in the file.
    `from pkg import name` names the submodule pkg.name when there is one, else pkg itself."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "opt_study"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, path.name == "__init__.py", node)
            if target.split(".")[0] != "opt_study":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in modules else target, node.lineno))
    return out


def unit_of(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _ in imports_of(m, p, modules) if t != m} for m, p in modules.items()}


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in _modules()} - {None}
    assert units <= set(RANK), f"add these packages/modules to LAYERS: {sorted(units - set(RANK))}"


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    bad = []
    for mod, path in sorted(modules.items()):
        src = unit_of(mod)
        for target, line in imports_of(mod, path, modules):
            dst = unit_of(target)
            if src and dst and src != dst and RANK[dst] > RANK[src]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {src} imports {target} ({dst} is above {src})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_module_graph_has_no_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return path + [m, n]
            if n in g and n not in state:
                found = visit(n, path + [m])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :])


def test_the_checker_sees_function_level_and_upward_imports(tmp_path):
    """The checker itself: a function-level import is found, and an upward one is refused."""
    src = tmp_path / "opt_study" / "storage" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from opt_study.study import run\n")
    found = imports_of("opt_study.storage.x", src, {"opt_study.study.run": src})
    assert found == [("opt_study.study.run", 2)]
    assert RANK[unit_of(found[0][0])] > RANK["storage"]


@pytest.mark.parametrize(
    "module",
    [
        "opt_study",  # the Python API: lazy, so `import opt_study` stays light
        "opt_study.plugins",
        "opt_study.plan.planners",
        "opt_study.plan.fingerprint",
        "opt_study.config",
        "opt_study.storage.layout",
        "opt_study.trial.control",
        "opt_study.results.trials",
    ],
)
def test_driver_side_modules_import_no_training_stack(module):
    """The driver plans, records and stops trials without importing torch, DeepSpeed or Ray."""
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"{module} pulls in {out.strip()}"
