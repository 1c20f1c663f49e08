"""The package's floor plan holds: no import cycles between modules (lazy imports inside functions count too), each
room imports only the rooms its docstring names, and the command line loads no benchmarking, profiling or evaluation
code (nor lm-eval) until a command needs it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flexgen_dist"

# Each room and the rooms it may import, as its __init__ docstring says ("top" is the command line and the run
# orchestration at the package's top level, which may import every room).
ALLOWED = {
    "base": set(),
    "models": {"base"},
    "io": {"base", "models"},
    "memory": {"base", "models", "io"},
    "engine": {"base", "models", "io", "memory"},
    "runtime": {"base", "models", "io", "memory", "engine"},
    "policy": {"base", "models", "io", "memory", "engine", "runtime"},
    "observability": {"base", "memory", "runtime"},
    "bench": {"base", "models", "io", "memory", "engine", "runtime", "policy", "observability"},
    # Above the run orchestration: lm-eval's model runs its jobs through run.py and score_run.py.
    "evaluation": {"base", "io", "memory", "engine", "top"},
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("flexgen_dist",) + path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its body."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "top"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_rooms_import_only_what_their_docstrings_allow():
    assert set(ALLOWED) | {"top"} == {room(m) for m in module_names()}, "a new room needs its row in ALLOWED"
    wrong = sorted(f"{m} imports {t}" for m, targets in import_graph().items() for t in targets
                   if room(m) != "top" and room(t) != room(m) and room(t) not in ALLOWED[room(m)])
    assert not wrong, "\n".join(wrong)
    for name, allowed in ALLOWED.items():
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        stated = set(re.findall(r"\w+", doc.rsplit("May import:", 1)[-1])) & (set(ALLOWED) | {"top"})
        assert "May import:" in doc and stated == allowed, f"{name}/__init__.py must state {sorted(allowed)}"


def test_only_the_command_line_imports_evaluation():
    importers = sorted(m for m, targets in import_graph().items()
                       if room(m) != "evaluation" and any(room(t) == "evaluation" for t in targets))
    assert importers == ["flexgen_dist.cli"]


def imports_package(path: Path, package: str) -> bool:
    """Whether the module at `path` imports `package` or one of its modules anywhere in its body."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return any(n == package or n.startswith(package + ".") for n in names)


def test_only_the_helm_modules_import_helm():
    """crfm-helm lives in .venv-helm only (launch/setup_helm.sh): evaluation/helm_*.py alone import it, and nothing
    else imports them."""
    helm_modules = {m for m in module_names() if m.startswith("flexgen_dist.evaluation.helm_")}
    assert {"flexgen_dist.evaluation.helm_run", "flexgen_dist.evaluation.helm_runner"} <= helm_modules
    assert sorted(m for m, p in module_names().items() if imports_package(p, "helm")) == sorted(helm_modules)
    importers = sorted(m for m, targets in import_graph().items() if m not in helm_modules and targets & helm_modules)
    assert importers == []


def test_cli_loads_no_benchmarking_profiling_or_evaluation_code():
    code = ("import sys, flexgen_dist.cli; print(' '.join(m for m in sys.modules if m.startswith(("
            "'flexgen_dist.bench', 'flexgen_dist.policy.profiler', 'flexgen_dist.policy.roofline', "
            "'flexgen_dist.evaluation', 'lm_eval'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
