"""The package's shape: imports run one way (CLI → API → pipeline → driver → methods → the
building blocks), with no cycles. Every import counts, also the ones inside functions."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "slimgpt"

# Top to bottom; a module may import its own layer or lower ones, never a higher one.
LAYERS: list[list[str]] = [
    ["slimgpt.cli", "slimgpt.cli.*"],
    ["slimgpt.api", "slimgpt.compare", "slimgpt.finetune", "slimgpt.report", "slimgpt.recovery",
     "slimgpt.recovery.*"],
    ["slimgpt.pipeline"],
    ["slimgpt.streaming", "slimgpt.checkpoint", "slimgpt.driver", "slimgpt.config"],
    ["slimgpt.methods", "slimgpt.methods.*", "slimgpt.search", "slimgpt.search.*", "slimgpt.allocation"],
    ["slimgpt.evaluation", "slimgpt.evaluation.*", "slimgpt.export", "slimgpt.export.*", "slimgpt.io",
     "slimgpt.surgery", "slimgpt.runner", "slimgpt.twin", "slimgpt.zoo", "slimgpt.data", "slimgpt.data.*", "slimgpt.preflight"],
    ["slimgpt.solvers", "slimgpt.solvers.*", "slimgpt.arch", "slimgpt.arch.*", "slimgpt.schedule", "slimgpt.serving", "slimgpt.plan",
     "slimgpt.modeling", "slimgpt.modeling.*", "slimgpt"],
    ["slimgpt.utils", "slimgpt.errors", "slimgpt.distributed", "slimgpt.defaults", "slimgpt.lazy"],
]


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("slimgpt"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slimgpt")}
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> int:
    for i, patterns in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layers.py; place it")


def test_no_module_imports_a_higher_layer() -> None:
    known = modules()
    upward = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
              for m, p in known.items() for d in sorted(imports(m, p, known)) if layer_of(d) < layer_of(m)]
    assert not upward, "\n".join(upward)


def test_imports_have_no_cycles() -> None:
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path[path.index(d):], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule can fail: a solver importing the driver is caught."""
    fake = tmp_path / "heads.py"
    fake.write_text("from slimgpt.driver import run_layerwise\n")
    known = modules()
    deps = imports("slimgpt.solvers.heads", fake, known)
    assert deps == {"slimgpt.driver"} and layer_of("slimgpt.driver") < layer_of("slimgpt.solvers.heads")
