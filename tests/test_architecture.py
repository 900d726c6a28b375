"""The package's shape: no import loops, core/ free of Ray and MLflow, jobs/ below cluster/, files of a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "jobs", "cluster", "bench")
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(path: Path) -> set[str]:
    """Every module name `path` imports at run time, at any depth of the file (imports under
    `if TYPE_CHECKING:` are for annotations only and do not count)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for guard in ast.walk(tree) if isinstance(guard, ast.If)
               and "TYPE_CHECKING" in ast.unparse(guard.test) for node in ast.walk(guard)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports at run time. A bench script's bare imports are of its
    sibling scripts (bench/ is on its path when it runs)."""
    found = set()
    for name in imported_names(path):
        if path.parent.name == "bench" and f"bench.{name}" in known:
            name = f"bench.{name}"
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def test_no_module_imports_one_that_imports_it_back():
    mods = modules()
    graph = {name: imports(path, set(mods)) - {name} for name, path in mods.items()}
    loops, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                loops.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not loops, "import loops: " + "; ".join(" -> ".join(loop) for loop in loops)


def test_layers_import_downwards_only():
    mods = modules()
    for name, path in mods.items():
        deps = imports(path, set(mods))
        if name.startswith("core"):
            assert not {d for d in deps if not d.startswith("core")}, f"{name} imports {deps}"
        if name.startswith("jobs"):
            assert not {d for d in deps if d.startswith("cluster")}, f"{name} imports {deps}"


def test_core_imports_neither_ray_nor_mlflow():
    """Read from the source (an import inside a function counts) and from a real import of every
    core module (what its dependencies pull in counts too)."""
    for name, path in modules().items():
        if name.startswith("core"):
            direct = {n for n in imported_names(path) if n.split(".")[0] in ("ray", "mlflow")}
            assert not direct, f"{name} imports {sorted(direct)}"
    names = sorted(name for name in modules() if name.startswith("core"))
    code = ("import sys\n" + "".join(f"import {name}\n" for name in names)
            + "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_source_file_is_over_450_lines():
    long = {str(path.relative_to(ROOT)): n for path in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along their sections: {long}"
