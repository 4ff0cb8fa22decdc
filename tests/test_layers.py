"""The package's folders form floors: a module imports only its own floor and the ones below, and no modules
import each other in a circle (imports inside functions count too: hiding one does not make the arrow go away)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "attnconv"

# Lowest first. A module on floor k may import floors 0..k; `attnconv` itself only registers models lazily.
FLOORS = [
    {"errors", "dtypes", "settings", "model_shape", "families", "engines", "fingerprint", "runtime", "textdata",
     "outputs", "reference", "tensor_io", "model_folder", "loading", "finite"},
    {"kernels"},
    {"models"},
    {"patches"},
    {"calibration"},
    {"convert"},
    {"eval", "uptrain", "push", "llamacpp"},
    {"commands"},
    {"recipes", "testing"},
    {"cli", "__main__"},
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:  # `from attnconv.x import y` may name module x.y
            names += [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules and n != "attnconv"}
    return found


def _floor(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return FLOOR[top]


def test_every_module_has_a_floor():
    missing = sorted({m.split(".")[1] for m in _modules() if m.count(".")} - set(FLOOR))
    assert not missing, f"give these a floor in FLOORS: {missing}"


def test_no_import_goes_up_a_floor():
    modules = _modules()
    upward = [f"{m} -> {t}" for m, p in modules.items() if m != "attnconv"
              for t in _imports(p, modules) if _floor(t) > _floor(m)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circles():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items() if m != "attnconv"}
    # a package's __init__ re-exporting its children is not a circle through the child
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
